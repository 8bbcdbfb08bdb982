"""``UntypedStorage.resize_`` seen by the dispatch-mode host tracker.

A storage resize (``t.untyped_storage().resize_(n)``) is not an op: no
dispatch mode sees it. FSDP frees a sharded parameter that way
(``resize_(0)``) and brings it back (``resize_(nbytes)``) before the next
all-gather, so without this the tracker kept counting freed memory as live
and missed the regrowth.

While a watcher is registered, ``torch.UntypedStorage.resize_`` is a
Python wrapper that calls torch's own method and then tells each watcher
which storage changed; with no watcher left the class attribute is removed,
so torch's method is found again as it was. The wrapper changes nothing
torch does (same arguments, same result, same exceptions); the tracker marks
its frame skipped for Dynamo, so a compiled region that resizes a storage
breaks its graph there while the tracker, the slow fallback source, is on.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

__all__ = ["watch", "unwatch"]

# Reentrant: a watcher is removed from a weakref callback, which garbage
# collection may run inside watch() on the same thread.
_lock = threading.RLock()
_watchers: dict[int, Callable[[Any], None]] = {}
_original = torch._C.StorageBase.resize_


def _tracked_resize_(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = _original(self, *args, **kwargs)
    for watcher in list(_watchers.values()):
        try:
            watcher(self)
        except Exception:  # the training run's resize must not fail because of us
            pass
    return out


def watch(key: int, callback: Callable[[Any], None]) -> None:
    """Calls ``callback(storage)`` after every storage resize until ``unwatch(key)``."""
    with _lock:
        _watchers[key] = callback
        if "resize_" not in torch.UntypedStorage.__dict__:
            torch.UntypedStorage.resize_ = _tracked_resize_


def unwatch(key: int) -> None:
    """Stops ``watch(key)``; the last one restores torch's own ``resize_``."""
    with _lock:
        _watchers.pop(key, None)
        if not _watchers and torch.UntypedStorage.__dict__.get("resize_") is _tracked_resize_:
            del torch.UntypedStorage.resize_
