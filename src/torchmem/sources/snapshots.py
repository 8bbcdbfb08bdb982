"""Deprecated path: the snapshot timer is ``torchmem._snapshots`` (the profiler's own thread).

``auto_snapshot`` is a profiler setting and the profiler may not import the
sources; the timer moved down beside it in 0.2. ``AutoSnapshotter`` still
works from here for one release, with a DeprecationWarning.
"""

from __future__ import annotations

from .._deprecation import moved_names

__getattr__ = moved_names(__name__, {"AutoSnapshotter": "torchmem._snapshots:AutoSnapshotter"})
