"""What the profiler hands to sinks: a TraceDelta, everything new since the last one.

Storage backends and the publisher never read the recorder themselves
(DESIGN.md: data flows one way); the profiler's pump gives them deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._events import STACK_NODE_DTYPE, empty_events
from ._types import GCRecord, MemoryEventType, OomEvent, Snapshot


@dataclass
class TraceDelta:
    """Events and side records new since the previous delta.

    ``events`` is an EVENT_DTYPE array with consecutive ``seq``. Frames and
    stack nodes are the new entries of the interned stack table, starting at
    ids ``frames_start`` and ``nodes_start``; node ``i`` is
    ``(parent, frame)``, node 0 the root. ``contexts`` are the new entries of
    the interned context table, ``(module path, phase name)`` from id
    ``contexts_start`` (id 0 is ``("", "other")``); ``marks`` the new
    attribution marks ``(seq, address, category, context_id)`` from index
    ``marks_start`` (torchmem.sources.context). ``gc_records``, ``snapshots``
    and ``ooms`` start at indices ``gc_start``, ``snapshots_start``,
    ``ooms_start`` (the address column of their marker events).
    """

    events: np.ndarray = field(default_factory=empty_events)
    type_names: list[str] = field(default_factory=list)
    frames: list[tuple[str, int, str]] = field(default_factory=list)
    frames_start: int = 0
    stack_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, STACK_NODE_DTYPE))
    nodes_start: int = 0
    contexts: list[tuple[str, str]] = field(default_factory=list)
    contexts_start: int = 0
    marks: list[tuple[int, int, str, int]] = field(default_factory=list)
    marks_start: int = 0
    gc_records: list[GCRecord] = field(default_factory=list)
    gc_start: int = 0
    snapshots: list[Snapshot] = field(default_factory=list)
    snapshots_start: int = 0
    ooms: list[dict[str, Any]] = field(default_factory=list)
    ooms_start: int = 0
    anomalies: dict[str, int] = field(default_factory=dict)
    #: The recorder's last examples of each kind (``profiler.anomalies["examples"]``),
    #: there only when the counts changed since the previous delta.
    anomaly_examples: list[dict[str, Any]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (len(self.events) or self.frames or len(self.stack_nodes)
                    or self.contexts or self.marks or self.gc_records or self.snapshots
                    or self.ooms)


def marker_details(kind: int, index: int, snapshots: list[Snapshot], gc_records: list[GCRecord],
                   ooms: list[OomEvent]) -> dict | None:
    """``MemoryEvent.details`` of a marker event: the side record whose index its
    address column holds (None for other kinds, or an index with no record)."""
    try:
        if kind == MemoryEventType.SNAPSHOT:
            return {"snapshot": snapshots[index]}
        if kind == MemoryEventType.GC_END:
            return {"gc": gc_records[index]}
        if kind == MemoryEventType.GC_START:
            return {"gc_index": index}
        if kind == MemoryEventType.OUT_OF_MEMORY:
            oom = OomEvent.from_dict(ooms[index])
            return {"oom": oom, **oom.as_dict()}
    except IndexError:
        return None
    return None
