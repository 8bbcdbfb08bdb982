"""Device memory totals from NVML (nvidia-ml-py, imported as ``pynvml``).

``query_devices()`` never raises. It returns a list of ``DeviceMemory`` (one
per device NVML sees, in NVML's index order, which follows PCI bus order and
may differ from CUDA's ordering under ``CUDA_VISIBLE_DEVICES`` or
``CUDA_DEVICE_ORDER``), or an ``NvmlUnavailable`` string ("unavailable: ...")
when there is no pynvml, no driver, or NVML fails.

``nvmlInit`` runs once per process (or once per backend set with
``use_backend``); a failed init is cached too, so a machine without a driver
pays for the attempt once.

Tests feed recorded answers through ``use_backend(RecordedNvml(data))``;
``record_answers()`` captures the same structure from the real library on a
GPU machine, so fixtures can be recorded there and replayed on CPU CI.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .._types import DeviceMemory, NvmlUnavailable

__all__ = [
    "DeviceMemory",
    "NvmlUnavailable",
    "RecordedNvml",
    "query_devices",
    "record_answers",
    "use_backend",
    "reset",
]


_lock = threading.Lock()
_backend: Any = None  # None: import pynvml on first use
_init_state: Any = None  # None: not tried; True: initialised; str: why not


def use_backend(backend: Any) -> Any:
    """Use ``backend`` (a pynvml-like object) instead of pynvml; None restores pynvml.

    Returns the previous backend. Resets the cached init state.
    """
    global _backend, _init_state
    with _lock:
        previous, _backend, _init_state = _backend, backend, None
    return previous


def reset() -> None:
    """Forget the cached init result (the next query initialises again)."""
    global _init_state
    with _lock:
        _init_state = None


def _init() -> tuple[Any, Any]:
    """(backend, None) once initialised, or (None, reason)."""
    global _backend, _init_state
    with _lock:
        if _init_state is True:
            return _backend, None
        if isinstance(_init_state, str):
            return None, _init_state
        if _backend is None:
            try:
                import pynvml  # nvidia-ml-py
            except Exception as exc:
                _init_state = f"pynvml not importable ({exc.__class__.__name__}: {exc})"
                return None, _init_state
            _backend = pynvml
        try:
            _backend.nvmlInit()
        except Exception as exc:
            _init_state = f"nvmlInit failed ({exc.__class__.__name__}: {exc})"
            return None, _init_state
        _init_state = True
        return _backend, None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _process_bytes(nv: Any, handle: Any, pid: int) -> int | None:
    try:
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    total, found = 0, False
    for p in procs or ():
        if getattr(p, "pid", None) != pid:
            continue
        used = getattr(p, "usedGpuMemory", None)
        if used is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. under WDDM or MIG)
            return None
        total += int(used)
        found = True
    return total if found else None


def query_devices() -> list[DeviceMemory] | NvmlUnavailable:
    """Every NVML device's total / used / free bytes and this process's usage.

    Never raises: any failure becomes ``NvmlUnavailable(reason)``. A device
    whose own query fails is left out of the list (the others still answer).
    """
    nv, reason = _init()
    if nv is None:
        return NvmlUnavailable(reason)
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception as exc:
        return NvmlUnavailable(f"nvmlDeviceGetCount failed ({exc.__class__.__name__}: {exc})")
    pid = os.getpid()
    devices: list[DeviceMemory] = []
    for index in range(count):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                name = _text(nv.nvmlDeviceGetName(handle))
            except Exception:
                name = f"device {index}"
            devices.append(DeviceMemory(
                index=index,
                name=name,
                total_bytes=int(mem.total),
                used_bytes=int(mem.used),
                free_bytes=int(mem.free),
                process_used_bytes=_process_bytes(nv, handle, pid),
            ))
        except Exception:
            continue
    return devices


# -- recorded answers -------------------------------------------------------
class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class RecordedNvml:
    """A pynvml stand-in that replays recorded answers.

    ``data`` is what ``record_answers()`` returns::

        {"devices": [{"name": str | bytes,
                      "memory": {"total": int, "used": int, "free": int},
                      "processes": [{"pid": int, "usedGpuMemory": int | None}]
                                   | {"error": str}}],
         "init_error": str (optional), "count_error": str (optional)}

    Any entry may be ``{"error": "..."}`` to make that call raise.
    """

    class NVMLError(Exception):
        pass

    def __init__(self, data: dict) -> None:
        self.data = data
        self.init_calls = 0

    def _maybe_raise(self, value: Any) -> Any:
        if isinstance(value, dict) and "error" in value:
            raise self.NVMLError(value["error"])
        return value

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if "init_error" in self.data:
            raise self.NVMLError(self.data["init_error"])

    def nvmlDeviceGetCount(self) -> int:
        if "count_error" in self.data:
            raise self.NVMLError(self.data["count_error"])
        return len(self.data.get("devices", ()))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self._maybe_raise(self.data["devices"][index])

    def nvmlDeviceGetName(self, handle: dict) -> Any:
        return self._maybe_raise(handle["name"])

    def nvmlDeviceGetMemoryInfo(self, handle: dict) -> Any:
        return _Obj(**self._maybe_raise(handle["memory"]))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: dict) -> list:
        return [_Obj(**p) for p in self._maybe_raise(handle.get("processes", []))]


def record_answers() -> dict:
    """The real pynvml's answers in ``RecordedNvml``'s format (raises if NVML fails)."""
    import pynvml

    pynvml.nvmlInit()
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        entry: dict[str, Any] = {
            "name": _text(pynvml.nvmlDeviceGetName(h)),
            "memory": {"total": int(mem.total), "used": int(mem.used), "free": int(mem.free)},
        }
        try:
            entry["processes"] = [
                {"pid": int(p.pid), "usedGpuMemory": p.usedGpuMemory}
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
        except pynvml.NVMLError as exc:
            entry["processes"] = {"error": str(exc)}
        devices.append(entry)
    return {"devices": devices}
