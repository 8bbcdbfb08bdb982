"""The native recorder as Python sees it: the extension's ``Recorder`` and its process-wide functions.

``torchmem._native`` is a C++ extension, which import-linter cannot see;
the profiler, the stack table and the session reach the recorder through
this module, so the contract that keeps analysis, sinks, reports and the
CLI away from the recorder (they use MemoryProfiler's read API) has a
module to name. ``tests/test_layers.py`` checks that those never import
``torchmem._native`` directly either.
"""

from ._native import (
    EVENT_ROW_BYTES,
    LIVE_ROW_BYTES,
    Recorder,
    context_fn_addresses,
    contexts_since,
    get_context,
    intern_context,
    resolve_stack,
    set_context,
    set_gpu_recorder,
    set_skip_prefixes,
    set_stack_capture,
    stack_frames_since,
    stack_nodes_since,
    trace_format,
)

__all__ = [
    "EVENT_ROW_BYTES",
    "LIVE_ROW_BYTES",
    "Recorder",
    "context_fn_addresses",
    "contexts_since",
    "get_context",
    "intern_context",
    "resolve_stack",
    "set_context",
    "set_gpu_recorder",
    "set_skip_prefixes",
    "set_stack_capture",
    "stack_frames_since",
    "stack_nodes_since",
    "trace_format",
]
