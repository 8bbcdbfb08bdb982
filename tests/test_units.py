"""torchmem.units: one table of byte units (IEC = powers of 1024, SI = powers of 1000)."""

from __future__ import annotations

import pytest

from torchmem.units import UNITS, format_bytes, parse_bytes


@pytest.mark.parametrize("text,value", [
    (512, 512), ("512 MiB", 512 << 20), ("1.5GiB", 3 << 29), ("100kB", 100_000),
    ("2 GB", 2_000_000_000), ("10", 10), ("64 B", 64), ("1K", 1024), ("3 bytes", 3),
    ("1 MB", 1_000_000), ("1 mb", 1_000_000), ("1 MiB", 1_048_576), ("1 KB", 1000),
    ("1 TB", 10**12), ("1 TiB", 2**40), ("2 PiB", 2**51), ("1e3 B", 1000), ("0.5 KiB", 512)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "MiB", "1 XB", "1 MiBs", "-1 MiB", -1, 1.5, True, None])
def test_parse_bytes_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_bytes(bad)


def test_iec_is_1024_and_si_is_1000_in_one_table():
    for i, (iec, si) in enumerate([("kib", "kb"), ("mib", "mb"), ("gib", "gb"), ("tib", "tb")], 1):
        assert UNITS[iec] == 1024 ** i and UNITS[si] == 1000 ** i


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"),
    (3 << 20, "3.00 MiB"), (2**30, "1.00 GiB"), (-2048, "-2.00 KiB"), (2**50, "1.00 PiB"),
    (2**60, "1024.00 PiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_bytes_digits_and_round_trip():
    assert format_bytes(1536, digits=1) == "1.5 KiB"
    for n in (1, 999, 4096, 5 << 20, 7 << 30):
        assert parse_bytes(format_bytes(n, digits=6)) == n


def test_the_oom_message_and_the_pytest_marker_agree_on_mb():
    # One table: "MB" is 10**6 wherever torchmem reads a size.
    from torchmem.analysis.oom import requested_from_message

    assert requested_from_message("Tried to allocate 2.00 MB") == parse_bytes("2 MB") == 2 * 10**6
    assert requested_from_message("Tried to allocate 2.00 MiB") == 2 << 20
