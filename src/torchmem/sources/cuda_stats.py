"""torch.cuda's memory statistics under the C-function plugin (the fallback).

With torchmem's compiled allocator class installed, torch asks the class
(``getDeviceStats`` and friends) and every caller, C++ and Python,
``torch.accelerator`` included, gets the plugin's figures: nothing here runs.
When only the C functions could be registered (no compiler or headers),
torch's ``CUDAPluggableAllocator`` raises on every stats call (pytorch issue
133281), so :func:`patch_torch_stats` replaces the Python functions of
``torch.cuda.memory`` / ``torch.cuda`` with ones that answer from the
plugin's counters. C++ callers and ``torch.accelerator`` still fail then;
that is among the fallback's limits (docs/cuda-plugin.md).

The patched functions behave like torch's: called without a device they do
not initialise CUDA (they read the current device only once CUDA is
initialised, else device 0), ``memory_stats`` returns the flat dict sorted by
key (an OrderedDict, as torch does), ``reset_accumulated_memory_stats`` and
``get_per_process_memory_fraction`` work.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

__all__ = ["memory_stats_dict", "patch_torch_stats", "restore_torch_stats"]

_originals: list[tuple[Any, str, Any]] = []  # (namespace, name, torch's function)


def memory_stats_dict(stats: dict[str, int]) -> "collections.OrderedDict[str, int]":
    """torch.cuda.memory_stats()-shaped dict built from plugin counters, sorted by key.

    Every key torch.cuda.memory_summary reads is present; the plugin has no
    pools or splits, so everything lands in ``.all.`` and ``large_pool`` /
    ``small_pool`` / ``inactive_split`` stay 0. Block counts: current = live
    blocks, peak = the most blocks live at once.
    """
    out: dict[str, int] = {}

    def put(metric: str, current: int, peak: int, allocated: int, freed: int) -> None:
        for pool in ("all", "large_pool", "small_pool"):
            vals = (current, peak, allocated, freed) if pool == "all" else (0, 0, 0, 0)
            for key, v in zip(("current", "peak", "allocated", "freed"), vals):
                out[f"{metric}.{pool}.{key}"] = int(v)

    s = stats
    for metric in ("allocated_bytes", "active_bytes", "requested_bytes"):
        put(metric, s["current"], s["peak"], s["allocated"], s["freed"])
    put("reserved_bytes", s["reserved"], s["reserved_peak"], 0, 0)
    peak_blocks = s.get("peak_live_blocks", s["live_blocks"])
    for metric in ("allocation", "active"):
        put(metric, s["live_blocks"], peak_blocks, s["alloc_count"], s["free_count"])
    put("segment", 0, 0, 0, 0)
    put("inactive_split", 0, 0, 0, 0)
    put("inactive_split_bytes", 0, 0, 0, 0)
    out["num_alloc_retries"] = int(s["retry_count"])
    out["num_ooms"] = int(s["oom_count"])
    out["num_sync_all_streams"] = 0
    out["num_device_alloc"] = int(s["alloc_count"])
    out["num_device_free"] = int(s["free_count"])
    out["max_split_size"] = -1
    for metric in ("oversize_allocations", "oversize_segments"):
        for key in ("current", "peak", "allocated", "freed"):
            out[f"{metric}.{key}"] = 0
    return collections.OrderedDict(sorted(out.items()))


def _device_index(torch: Any, device: Any) -> int:
    """torch's device index, without initialising CUDA for ``None``."""
    if device is None:
        cuda = torch.cuda
        initialized = getattr(cuda, "is_initialized", lambda: False)
        return int(cuda.current_device()) if initialized() else 0
    return int(torch.cuda.memory._get_device_index(device, optional=True))


def patch_torch_stats(torch: Any, stats: Callable[[int], dict[str, int]],
                      reset_peak: Callable[[int], None],
                      reset_accumulated: Callable[[int], None],
                      fraction: Callable[[int], float]) -> None:
    """Replaces torch.cuda's stats functions by ones answering from ``stats(device)``."""
    memory = torch.cuda.memory

    def index(device: Any) -> int:
        return _device_index(torch, device)

    def memory_stats(device: Any = None) -> "collections.OrderedDict[str, int]":
        return memory_stats_dict(stats(index(device)))

    def memory_allocated(device: Any = None) -> int:
        return stats(index(device))["current"]

    def max_memory_allocated(device: Any = None) -> int:
        return stats(index(device))["peak"]

    def memory_reserved(device: Any = None) -> int:
        return stats(index(device))["reserved"]

    def max_memory_reserved(device: Any = None) -> int:
        return stats(index(device))["reserved_peak"]

    def reset_peak_memory_stats(device: Any = None) -> None:
        reset_peak(index(device))

    def reset_accumulated_memory_stats(device: Any = None) -> None:
        reset_accumulated(index(device))

    def get_per_process_memory_fraction(device: Any = None) -> float:
        return fraction(index(device))

    patches = {
        "memory_stats": memory_stats,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_accumulated_memory_stats": reset_accumulated_memory_stats,
        "get_per_process_memory_fraction": get_per_process_memory_fraction,
    }
    for name, fn in patches.items():
        fn.__doc__ = f"torchmem plugin version of torch.cuda.{name} (plugin counters)."
        original = getattr(memory, name, None)
        for module in (memory, torch.cuda):
            current = getattr(module, name, None)
            if current is original or (current is None and module is memory):
                _originals.append((module, name, current))
                setattr(module, name, fn)


def restore_torch_stats() -> None:
    """Puts torch's functions back (tests)."""
    while _originals:
        module, name, original = _originals.pop()
        if original is None:
            try:
                delattr(module, name)
            except AttributeError:
                pass
        else:
            setattr(module, name, original)
