"""The settings of ``torchmem.enable()``: defaults, the environment, and what a trace records of them."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from ._checks import check_bool, check_interval_ms, check_nonneg_int, check_stack_depth

__all__ = ["DEFAULT_TRACE_DIR", "HOST_CHOICES", "LIVE_SETTINGS", "RETENTION_IN_MEMORY",
           "RETENTION_WITH_STORAGE", "check_settings", "defaults", "rank", "retention_events",
           "run_metadata", "trace_dir", "world_size"]

DEFAULT_TRACE_DIR = "torchmem-traces"
#: Settings that can change on a running profiler (enable() applies them again).
LIVE_SETTINGS = ("capture_stack_traces", "max_stack_trace_depth", "snapshot_interval_ms",
                 "auto_snapshot")
HOST_CHOICES = (True, False, "auto", "allocator", "dispatch")



def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _distributed(query: str, variable: str) -> int | None:
    # torch.distributed when it is initialised, else the launcher's variable.
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(getattr(dist, query)())
    except Exception:
        pass
    value = os.environ.get(variable, "").strip()
    return int(value) if value.isdigit() else None


def rank() -> int | None:
    """This process's rank in a distributed job, or None outside one."""
    return _distributed("get_rank", "RANK")


def world_size() -> int | None:
    """The job's number of ranks, or None outside a distributed job."""
    return _distributed("get_world_size", "WORLD_SIZE")


def trace_dir(settings: dict[str, Any]) -> str:
    return os.path.abspath(settings["trace_dir"] or os.environ.get("TORCHMEM_DIR")
                           or DEFAULT_TRACE_DIR)


def run_metadata(settings: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """What enable() adds to the trace's run metadata (the pump adds torch
    version, devices, host and start time)."""
    return {"rank": rank, "world_size": world_size(), "argv": list(sys.argv), "pid": os.getpid(),
            "enable_settings": {k: v for k, v in settings.items()
                                if isinstance(v, (bool, int, str, type(None)))}}


#: Events enable() keeps in memory with a storage, which answers queries for
#: older events (MemoryProfiler.get_event_rows reads them back): 8 chunks,
#: ~2.9 MiB, instead of a ~45 MiB floor (issue 12: profiling memory under 5%
#: of a small run's).
RETENTION_WITH_STORAGE = 1 << 16
#: ... and without one: memory is then the only copy of the events.
RETENTION_IN_MEMORY = 1 << 20


def retention_events(settings: dict[str, Any], storage: Any) -> int:
    """The ring's retention: the setting when given, else by whether there is a storage."""
    if settings["retention_events"] is not None:
        return settings["retention_events"]
    return RETENTION_WITH_STORAGE if storage is not None else RETENTION_IN_MEMORY


def defaults() -> dict[str, Any]:
    return {
        "capture_stack_traces": _env_flag("TORCHMEM_STACKS", True),
        "max_stack_trace_depth": 10,
        "snapshot_interval_ms": 1000,
        "auto_snapshot": True,
        "retention_events": None,  # retention_events(): depends on the storage
        "trace": True,
        "trace_dir": None,
        "gpu_source": os.environ.get("TORCHMEM_GPU_SOURCE") or "auto",
        "host": _env_host(),
        "gc": True,
        "auto_step": True,
        "attribution": True,
        "oom_report": True,
        "summary": _env_flag("TORCHMEM_SUMMARY", True),
    }


_BOOL_SETTINGS = ("capture_stack_traces", "auto_snapshot", "trace", "gc", "auto_step",
                  "oom_report", "summary")


def check_settings(settings: dict[str, Any]) -> None:
    """Raises TypeError / ValueError naming the first bad setting, as the profiler's
    constructor and setters would (before enable() creates anything)."""
    for name in _BOOL_SETTINGS:
        if name in settings:
            settings[name] = check_bool(settings[name], name)
    if "snapshot_interval_ms" in settings:
        check_interval_ms(settings["snapshot_interval_ms"], "snapshot_interval_ms")
    if settings.get("retention_events") is not None:  # None: by the storage
        check_nonneg_int(settings["retention_events"], "retention_events")
    if "max_stack_trace_depth" in settings:
        check_stack_depth(settings["max_stack_trace_depth"])
    directory = settings.get("trace_dir")
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"trace_dir must be a path (str) or None, not {type(directory).__name__}")


def _env_host() -> Any:
    value = (os.environ.get("TORCHMEM_HOST") or "auto").strip().lower()
    if value in ("0", "false", "no", "off", "none"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return "auto"
    if value not in HOST_CHOICES:
        # An environment typo must not stop the training run.
        warnings.warn(f"torchmem: TORCHMEM_HOST={value!r} is not one of auto, allocator, "
                      "dispatch, 0; using auto", RuntimeWarning, stacklevel=3)
        return "auto"
    return value


