"""Argument checks shared by the public API: one rule per kind of value, one message per rule.

Every check raises TypeError (a wrong type) or ValueError (a wrong value)
naming the argument, and returns the value in the form the caller stores.
A wrong type of a *setting* raises ``SettingTypeError``, which is both:
settings raised ValueError for any bad value before these checks existed.
"""

from __future__ import annotations

import datetime
import math
import numbers
from fractions import Fraction
from typing import Any

__all__ = ["SettingTypeError", "check_bool", "check_device", "check_interval_ms",
           "check_nonneg_int", "check_seconds", "check_stack_depth", "epoch_ns", "MAX_INTERVAL_MS"]

#: The longest snapshot or flush interval: one day (a longer one is a unit mistake,
#: and waits past ``threading.TIMEOUT_MAX`` overflow).
MAX_INTERVAL_MS = 86_400_000
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
_MAX_DEVICE = 32767


class SettingTypeError(TypeError, ValueError):
    """A setting of the wrong type (also a ValueError, as settings raised before)."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_int(value: Any) -> bool:
    # int subclasses (IntEnum) and numpy integers (numpy bools are not Integral), never bool.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(value: Any, name: str) -> bool:
    """True / False (numpy bools and the ints 0 and 1 too); anything else, a
    string included ("no" is truthy), raises SettingTypeError."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ in ("bool_", "bool") and hasattr(value, "dtype"):  # numpy.bool_
        return bool(value)
    if _is_int(value) and int(value) in (0, 1):
        return bool(int(value))
    raise SettingTypeError(f"{name} must be True or False, not {value!r}")


def check_interval_ms(value: Any, name: str) -> float | int:
    """A finite number of milliseconds in (0, MAX_INTERVAL_MS]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingTypeError(f"{name} must be a number of milliseconds, not {value!r}")
    if not math.isfinite(value) or not 0 < value <= MAX_INTERVAL_MS:
        raise ValueError(f"{name} must be > 0 and at most {MAX_INTERVAL_MS} ms (one day), "
                         f"got {value!r}")
    return int(value) if _is_int(value) else float(value)


def check_stack_depth(value: Any, name: str = "max_stack_trace_depth") -> int:
    """Frames kept per stack: an int in 1..128."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingTypeError(f"{name} must be an int in 1..128, got {value!r}")
    if not 1 <= value <= 128:
        raise ValueError(f"{name} must be an int in 1..128, got {value!r}")
    return value


def check_nonneg_int(value: Any, name: str, maximum: int = _UINT64_MAX) -> int:
    """An int in 0..maximum (numpy integers and int subclasses accepted)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, not {_type_name(value)}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_device(value: Any, name: str = "device") -> int | None:
    """A device index: -1 (host memory), 0..32767, or None (every device)."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int (-1 for host memory) or None, "
                        f"not {_type_name(value)}")
    value = int(value)
    if not -1 <= value <= _MAX_DEVICE:
        raise ValueError(f"{name} must be -1 (host) or 0..{_MAX_DEVICE}, got {value}")
    return value


def check_seconds(value: Any, name: str) -> float:
    """A finite, non-negative duration in seconds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


_LAST_NS = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(
    microseconds=_INT64_MAX // 1000)


def epoch_ns(t: Any = None, since_ns: Any = None, name: str = "t") -> int:
    """The first wall-clock ns (``time.time_ns`` scale) that a query "at or after
    ``t``" covers; exactly one of ``t`` (a datetime or epoch seconds) and
    ``since_ns`` (integer ns, exact) is given.

    Seconds as a float hold about 0.24 us at today's epoch (one unit in the last
    place); an event whose float timestamp (``timestamp_ns / 1e9``) equals
    ``t`` is always included, and so are those up to one such unit earlier.
    A datetime has microsecond resolution: events up to 1 us before it are
    included. Times after 2262-04-11 (the end of int64 ns) are a ValueError.
    """
    if (t is None) == (since_ns is None):
        raise TypeError(f"give exactly one of {name} (datetime or epoch seconds) and since_ns "
                        "(integer ns)")
    if since_ns is not None:
        if not _is_int(since_ns):
            raise TypeError(f"since_ns must be an int (ns since the epoch), not "
                            f"{_type_name(since_ns)}")
        if not -_INT64_MAX - 1 <= int(since_ns) <= _INT64_MAX:
            raise ValueError(f"since_ns must fit in int64 ns (until 2262-04-11), got {since_ns}")
        return int(since_ns)
    if isinstance(t, datetime.datetime):
        try:
            aware = t if t.tzinfo is not None else t.astimezone()  # naive: local time
            late = aware > _LAST_NS
        except (OverflowError, ValueError, OSError):  # datetime.max in local time
            late = True
        if late:
            raise ValueError(f"{name} must be before 2262-04-11 (int64 ns), got {t!r}")
        us = (aware - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) \
            // datetime.timedelta(microseconds=1)
        return us * 1000 - 1000
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name} must be a datetime or epoch seconds (int or float), "
                        f"not {_type_name(t)}; for integer ns pass since_ns=")
    if isinstance(t, numbers.Integral):
        ns = int(t) * 10**9
    elif not math.isfinite(t):
        raise ValueError(f"{name} must be a finite number of epoch seconds, got {t!r}")
    else:
        ns = _first_ns_at_or_after(float(t))
    if not -_INT64_MAX - 1 <= ns <= _INT64_MAX:
        raise ValueError(f"{name} = {t!r} epoch seconds is after 2262-04-11 (int64 ns); "
                         "for integer nanoseconds (time.time_ns()) pass since_ns=")
    return ns


def _first_ns_at_or_after(seconds: float) -> int:
    """The smallest integer N whose ``N / 1e9`` (correctly rounded) is at least the
    float just below ``seconds``: every event whose float timestamp is ``seconds``."""
    target = math.nextafter(seconds, -math.inf)
    hi = math.ceil(Fraction(target) * 10**9)  # hi / 1e9 >= target, exactly and as a float
    if abs(hi) > 2**64:
        return hi  # out of range: the caller says so
    lo = hi - 2**22  # far below one float's worth of ns while the value fits int64
    while hi - lo > 1:  # N / 1e9 is monotone in N
        mid = (lo + hi) // 2
        if mid / 10**9 >= target:
            hi = mid
        else:
            lo = mid
    return hi
