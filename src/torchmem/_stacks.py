"""Resolving interned stack ids to StackTrace objects."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _recorder
from ._events import STACK_NODE_DTYPE
from ._types import StackTrace


class LiveStacks:
    """The process-wide native stack table (stacks captured in this process)."""

    def __init__(self) -> None:
        self._cache: dict[int, StackTrace] = {}

    def resolve(self, stack_id: int) -> StackTrace | None:
        if not stack_id:
            return None
        trace = self._cache.get(stack_id)
        if trace is None:
            trace = StackTrace(tuple(_recorder.resolve_stack(stack_id)))
            self._cache[stack_id] = trace
        return trace


class SavedStacks:
    """A stack table read back from a trace: frames and prefix-tree nodes."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, str]] = []
        self.nodes = np.zeros(1, dtype=STACK_NODE_DTYPE)  # node 0: the root
        self._cache: dict[int, StackTrace] = {}

    def extend(self, frames: Sequence[tuple[str, int, str]], frames_start: int,
               nodes: np.ndarray, nodes_start: int) -> None:
        """Adds frames and nodes whose ids start at the given offsets."""
        if nodes_start == 0 and len(nodes):
            nodes, nodes_start = nodes[1:], 1  # node 0, the root, is implicit
        if frames_start != len(self.frames) or (len(nodes) and nodes_start != len(self.nodes)):
            raise ValueError(
                f"stack table out of order: have {len(self.frames)} frames and "
                f"{len(self.nodes)} nodes, got frames from {frames_start}, nodes from {nodes_start}")
        self.frames.extend((str(f), int(line), str(fn)) for f, line, fn in frames)
        if len(nodes):
            self.nodes = np.concatenate([self.nodes, np.asarray(nodes, dtype=STACK_NODE_DTYPE)])

    def resolve(self, stack_id: int) -> StackTrace | None:
        if not stack_id:
            return None
        trace = self._cache.get(stack_id)
        if trace is None:
            frames = []
            node = stack_id
            # Bounded walk: a corrupt table must not loop forever.
            for _ in range(len(self.nodes)):
                if node == 0 or node >= len(self.nodes):
                    break
                parent, frame = self.nodes[node]
                if frame < len(self.frames):
                    frames.append(self.frames[frame])
                node = int(parent)
            trace = StackTrace(tuple(frames))
            self._cache[stack_id] = trace
        return trace
