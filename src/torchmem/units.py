"""Byte sizes as text and back: one table of units for all of torchmem.

IEC units are powers of 1024 and SI units powers of 1000, everywhere:

======  ==========  ======  ==========
IEC     bytes       SI      bytes
======  ==========  ======  ==========
KiB     1024        kB, KB  1000
MiB     1024**2     MB      1000**2
GiB     1024**3     GB      1000**3
TiB     1024**4     TB      1000**4
PiB     1024**5     PB      1000**5
======  ==========  ======  ==========

``B`` and ``bytes`` are 1; the one-letter forms ``K``, ``M``, ``G``, ``T``
(what ``ls -h`` and torch's own messages print) are the IEC units. Parsing
ignores case ("512 mib" is 512 MiB, "1.5 gb" is 1.5 GB). torchmem prints
sizes with IEC units only (``format_bytes``), as torch does in its
out-of-memory messages.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["UNITS", "format_bytes", "parse_bytes"]

#: Every unit ``parse_bytes`` reads, lower-cased, in bytes.
UNITS: dict[str, int] = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
}
_FORMAT_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def format_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes as text with an IEC unit: "1.50 MiB" (``digits`` decimals).

    Below 1 KiB the value is whole bytes ("512 B"); negative values keep
    their sign ("-2.00 KiB").
    """
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{round(n)} B"
    for unit in _FORMAT_UNITS:
        n /= 1024.0
        if n < 1024 or unit == _FORMAT_UNITS[-1]:
            break
    return f"{sign}{n:.{digits}f} {unit}"


def parse_bytes(value: Any) -> int:
    """Bytes in ``value``: an int, or text like "512 MiB", "1.5 GB", "100kB", "2G".

    Units are those of ``UNITS`` (see the module doc). Raises TypeError for
    anything but an int or a str, ValueError for a negative size or text
    that is not a size. Fractions of a byte are dropped.
    """
    if isinstance(value, bool):
        raise TypeError("a size must be an int or a string like '512 MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"a size must be an int or a string like '512 MiB', "
                        f"not {type(value).__name__}")
    m = _SIZE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise ValueError(f"cannot read {value!r} as a size (try '512 MiB' or an int of bytes)")
    return int(float(m.group(1)) * UNITS[unit])
