"""The native half of the holder search (``analysis.holders``): ``HeapWalk``.

``torchmem._native`` is a C++ extension, which import-linter cannot see; the
analysis layer reaches the heap walk through this module, as the profiler
reaches the recorder through ``_recorder``. It has nothing to do with the
recorder: a set of object addresses and the objects' tp_traverse
(csrc/heap_walk.cpp).
"""

from ._native import HeapWalk

__all__ = ["HeapWalk"]
