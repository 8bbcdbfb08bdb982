"""``torchmem.enable()``: one process-wide profiler with the right sources.

``enable()`` builds (once per process) a MemoryProfiler and starts, for the
machine it runs on:

- GPU: the trace tracker on torch's own caching allocator when CUDA is
  present (the plugin on request; torch's allocation history where neither
  can be built: ``torchmem.cuda`` decides and warns on a fallback); nothing
  without CUDA;
- the host tracker (CPU and pinned tensors) on the calling thread;
- the GC monitor, and timed snapshots with NVML device totals;
- a SQLite trace in ``trace_dir`` (rank in the file name in a distributed
  job), when the storage package is available;
- the out-of-memory report hooks (``torchmem.oom``);
- an optimizer-step hook that advances ``profiler.step()`` (``auto_step``);
- attribution: the module and phase of every allocation, and what torch's
  objects say it is (``torchmem.sources.context``; ``attribution``);
- at exit, a short summary on stderr.

Calling it again returns the same profiler (applying the settings that can
change while running); ``disable()`` stops recording and ``enable()``
resumes it. Every function here is safe to call from any thread.

Over 400 lines for a reason: this module is the one owner of the process's
profiling state, and enable, disable, exit and a fork each change that state;
split across modules, each would reach into the others' globals.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from typing import Any


from . import _oom_hooks, _recorder
from ._settings import (
    DEFAULT_TRACE_DIR,
    HOST_CHOICES,
    LIVE_SETTINGS,
    check_settings as _check_settings,
    defaults as _defaults,
    rank as _rank,
    retention_events as _retention_events,
    run_metadata as _run_metadata,
    trace_dir as _trace_dir,
)
from .profiler import MemoryProfiler
from .reports.oom import report_pending
from .reports.summary import format_summary
from .sources.nvml import query_devices
from ._pump import stop_all as stop_pumps
from .storage import SQLiteStorage
from .storage.sqlite import close_all as close_storages

__all__ = ["enable", "disable", "get_profiler", "is_enabled", "trace_path", "DEFAULT_TRACE_DIR"]

# Snapshots carry NVML's device totals: the profiler does not import sources,
# the session gives it the query (every profiler, the session's or not).
MemoryProfiler.device_query = staticmethod(query_devices)


@atexit.register
def _sinks_at_exit() -> None:
    """The exit order of the sinks, for every profiler of the process: each
    pump's last hand-over first, then the storages still open (registered at
    import, so it runs after the session's own exit handler and the user's)."""
    try:
        stop_pumps()
    finally:
        close_storages()

_lock = threading.RLock()
_session: "_Session | None" = None
# A forked child's copy of its parent's session: it records nowhere (the
# trace's writer and the pump belong to the parent), so the child is not
# profiled until it calls enable(), which stops these sources first.
_inherited: "list[_Session]" = []


def _after_fork_in_child() -> None:
    global _lock, _session
    _lock = threading.RLock()  # another thread of the parent may have held it
    if _session is not None:
        _inherited.append(_session)
        _session = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _retire_inherited() -> None:
    """Stops what a forked child inherited from its parent's session (its hooks
    would record the child's memory into the parent's copy of the profiler)."""
    while _inherited:
        s = _inherited.pop()
        s.finished = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _stop_sources(s)
                s.profiler.close()
        except Exception as exc:
            print(f"torchmem: stopping the parent's profiler in pid {os.getpid()} failed: "
                  f"{exc!r}", file=sys.stderr)


class _Session:
    """Everything enable() started, so disable() and exit can undo it."""

    def __init__(self, profiler: MemoryProfiler, settings: dict[str, Any]) -> None:
        self.profiler = profiler
        self.settings = settings
        self.pid = os.getpid()
        self.start_ns = time.time_ns()
        self.trace_path: str | None = None
        self.rank: int | None = None
        self.host: Any = None
        self.host_thread: int | None = None
        self.gc: Any = None
        self.gpu: Any = None  # torchmem.cuda.GpuRecording
        self.step_hook: Any = None
        self.context: Any = None  # torchmem.sources.context.ContextSource
        self.active = False
        self.finished = False


def _make_storage(settings: dict[str, Any], rank: int | None) -> tuple[Any, str | None]:
    if not settings["trace"]:
        return None, None
    directory = _trace_dir(settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-rank{rank}" if rank is not None else ""
    path = os.path.abspath(os.path.join(directory, f"torchmem-{stamp}-{os.getpid()}{suffix}.db"))
    try:
        os.makedirs(directory, exist_ok=True)
        storage = SQLiteStorage(path)
    except OSError as exc:
        # The training run goes on whatever the trace directory is: one warning.
        where = ("trace_dir" if settings.get("trace_dir") else
                 "TORCHMEM_DIR" if os.environ.get("TORCHMEM_DIR") else "the default")
        warnings.warn(f"torchmem: cannot write a trace in {directory} ({where}: "
                      f"{exc.strerror or exc}); profiling in memory only, without a trace file",
                      RuntimeWarning, stacklevel=4)
        return None, None
    storage.open(_run_metadata(settings, rank))
    return storage, path


def _start_sources(s: _Session) -> None:
    prof, settings = s.profiler, s.settings
    if settings["gpu_source"] != "none":
        from .cuda import start_gpu_recording

        s.gpu = start_gpu_recording(prof, settings["gpu_source"])
        if s.gpu.history is not None:
            prof.add_batch_source(s.gpu.history.poll)
    if settings["host"] and s.host is None:
        s.host = _start_host_source(prof, settings["host"])
        s.host_thread = threading.get_ident()
    if settings["gc"] and s.gc is None:
        from .sources.gc_monitor import GCMonitor

        s.gc = GCMonitor(prof).start()
    if settings["auto_step"] and s.step_hook is None:
        try:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            # Every optimizer.step() ends a training step: events then carry
            # the step they belong to without a line of user code.
            s.step_hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        except Exception:
            s.step_hook = None
    if settings["attribution"] and s.context is None:
        from .sources.context import ContextSource

        s.context = ContextSource(prof).start()
    if settings["oom_report"]:
        _oom_hooks.install(get_profiler, directory=_trace_dir(settings))


def _start_host_source(prof: MemoryProfiler, choice: Any) -> Any:
    """The CPU allocator hook; the dispatch-mode tracker where it cannot run."""
    if choice in (True, "auto", "allocator"):
        from .sources.cpu_allocator import CPUAllocatorHook, HookUnavailable

        try:
            return CPUAllocatorHook(prof).start()
        except Exception as exc:  # enable() must not take the training run down
            if choice == "allocator":
                raise
            why = str(exc) if isinstance(exc, HookUnavailable) else repr(exc)
            warnings.warn(f"torchmem: {why}; tracking CPU tensors with a dispatch mode "
                          "instead (slower, this thread only)", RuntimeWarning, stacklevel=4)
    from .sources.host import HostTracker

    return HostTracker(prof).start()


def enable(*, storage: Any = None, capture_stack_traces: bool | None = None,
           **settings: Any) -> MemoryProfiler:
    """Starts (or resumes) the process-wide profiler and returns it.

    Settings (all optional):
        storage: a StorageBackend to write to instead of the SQLite trace
            enable() would create (``torchmem run -o FILE`` passes its own).
        capture_stack_traces (bool, default True; env TORCHMEM_STACKS): record
            the Python stack of every allocation, so reports name lines.
        max_stack_trace_depth (int, 10): frames kept per stack.
        snapshot_interval_ms (int, 1000) and auto_snapshot (bool, True):
            timed snapshots with NVML device totals.
        retention_events (int): events kept in memory at least; default
            2**16 (~2.9 MiB) with a trace or storage, which answers queries
            for older events, else 2**20 (~45 MiB).
        trace (bool, True): write a SQLite trace.
        trace_dir (str; env TORCHMEM_DIR; default ./torchmem-traces): where.
        gpu_source ("auto" | "tracker" | "plugin" | "history" | "none", default
            "auto" = the tracker; env TORCHMEM_GPU_SOURCE; docs/gpu-sources.md).
        host ("auto" | "allocator" | "dispatch" | False; default "auto"; env
            TORCHMEM_HOST): how CPU tensors are tracked. "allocator" hooks
            c10's CPU allocator (every thread, about 0.1 us per allocation;
            built with the C++ compiler on first use); "dispatch" uses a
            TorchDispatchMode on this thread (also labels pinned tensors;
            about 15 us per op); "auto" (or True) is the hook, else dispatch.
        gc (bool, True): monitor garbage collections.
        auto_step (bool, True): each optimizer.step() advances profiler.step();
            turn off if you call profiler.step() yourself.
        attribution (bool, True): stamp every allocation with the module and
            phase (forward, backward, optimizer, other) it was made in, and
            tell parameters, buffers, gradients, optimizer state and inputs
            apart, through a wrapper around nn.Module.__call__, torch's
            global optimizer hooks and autograd node pre-hooks (breakdown(), peak_report()).
        oom_report (bool, True): write a report when an OOM reaches user code.
        summary (bool, True; env TORCHMEM_SUMMARY): print a summary at exit.

    Idempotent and thread safe: every call returns the same profiler; a later
    call applies the settings that can change while running
    (capture_stack_traces, max_stack_trace_depth, snapshot_interval_ms,
    auto_snapshot) and ignores the others with a warning.

    In a forked child (a multiprocessing or DataLoader worker) the parent's
    profiler is not the child's: until the child calls enable() itself,
    ``is_enabled()`` is False and ``get_profiler()`` / ``trace_path()`` None;
    enable() there starts the child's own profiler and trace
    (``torchmem-STAMP-CHILDPID.db``).
    """
    global _session
    if capture_stack_traces is not None:
        settings["capture_stack_traces"] = capture_stack_traces
    with _lock:
        s = _session
        if s is not None:
            if storage is not None and storage is not s.profiler.storage:
                warnings.warn("torchmem is already enabled; its storage cannot change (ignored)",
                              RuntimeWarning, stacklevel=2)
            _apply_live_settings(s, settings)
            if not s.active:
                s.profiler.enable()
                _start_sources(s)
                s.active = True
            return s.profiler
        forked = bool(_inherited)
        _retire_inherited()
        opts = _defaults()
        unknown = set(settings) - set(opts)
        if unknown:
            raise TypeError(f"enable() got unknown settings: {', '.join(sorted(unknown))}")
        opts.update(settings)
        _check_settings(opts)
        if opts["host"] not in HOST_CHOICES:
            raise ValueError(f"enable(host=...) must be one of {HOST_CHOICES[1:]}, "
                             f"got {opts['host']!r}")
        rank = _rank()
        if storage is not None:
            path = getattr(storage, "path", None)
            if hasattr(storage, "open"):
                storage.open(_run_metadata(opts, rank))
        else:
            storage, path = _make_storage(opts, rank)
        prof = MemoryProfiler(
            storage,
            retention_events=_retention_events(opts, storage),
            capture_stack_traces=opts["capture_stack_traces"],
            max_stack_trace_depth=opts["max_stack_trace_depth"],
            snapshot_interval_ms=opts["snapshot_interval_ms"],
            auto_snapshot=opts["auto_snapshot"],
        )
        # The CUDA plugin records into the global profiler and reads its stack
        # settings from native globals, which the profiler then keeps in step.
        prof.attach_native_source("gpu")
        s = _Session(prof, opts)
        s.trace_path, s.rank = path, rank
        _session = s
        if forked:
            _child_gpu_source(opts)
        _start_sources(s)
        s.active = True
        atexit.register(_at_exit)
        if forked and "multiprocessing" in sys.modules:
            # A multiprocessing child ends with os._exit: no atexit handlers,
            # but its finalizers run (before the queues' own, priority 0).
            from multiprocessing.util import Finalize

            Finalize(None, _at_exit, exitpriority=100)
        return prof


def _child_gpu_source(opts: dict[str, Any]) -> None:
    """A child forked after its parent initialised CUDA cannot use it (torch says
    so at the first CUDA call): no GPU source there."""
    torch = sys.modules.get("torch")
    bad_fork = getattr(getattr(torch, "cuda", None), "_is_in_bad_fork", None)
    try:
        if bad_fork is not None and bad_fork():
            opts["gpu_source"] = "none"
    except Exception:
        pass


def _apply_live_settings(s: _Session, settings: dict[str, Any]) -> None:
    fixed = []
    for name, value in settings.items():
        if name in LIVE_SETTINGS:
            setattr(s.profiler, name, value)
            s.settings[name] = value
        elif name == "summary":
            s.settings["summary"] = _check_settings_one("summary", value)
        elif name not in s.settings:
            raise TypeError(f"enable() got an unknown setting: {name}")
        elif s.settings[name] != value:
            fixed.append(name)
    if fixed:
        warnings.warn(f"torchmem is already enabled; {', '.join(sorted(fixed))} cannot change "
                      "while it runs (ignored)", RuntimeWarning, stacklevel=3)


def _check_settings_one(name: str, value: Any) -> Any:
    one = {name: value}
    _check_settings(one)
    return one[name]


def _stop_sources(s: _Session) -> None:
    if s.host is not None:
        try:
            s.host.stop()
            s.host = None
        except RuntimeError as exc:  # another thread, or a mode pushed above ours
            warnings.warn(f"torchmem: host tracker left running: {exc}", RuntimeWarning)
    if s.gc is not None:
        s.gc.stop()
        s.gc = None
    if s.gpu is not None and s.gpu.source_object is not None:
        if s.gpu.history is not None:
            s.profiler.remove_batch_source(s.gpu.history.poll)
        s.gpu.stop()
        s.gpu = None
    # The plugin stays installed (the swap cannot be undone); it keeps
    # recording into the profiler, which ignores events while disabled.
    if s.step_hook is not None:
        s.step_hook.remove()
        s.step_hook = None
    if s.context is not None:
        s.context.stop()
        s.context = None


def disable() -> None:
    """Stops recording: sources stopped, profiler disabled, trace flushed.

    The profiler stays readable (``get_profiler()``); ``enable()`` resumes it.
    Frees that happen while disabled are not seen, so memory freed meanwhile
    may still count as live after resuming. Call it on the thread that called
    enable() (the host tracker lives on that thread).
    """
    with _lock:
        s = _session
        if s is None or not s.active:
            return
        _stop_sources(s)
        s.profiler.disable()
        s.profiler.flush()
        s.active = False


def get_profiler() -> MemoryProfiler | None:
    """The process-wide profiler made by enable(), or None before the first call."""
    s = _session
    return s.profiler if s is not None else None


def is_enabled() -> bool:
    """Whether the process-wide profiler exists and is recording."""
    s = _session
    return s is not None and s.active


def trace_path() -> str | None:
    """Path of the SQLite trace being written, or None (no storage, not enabled)."""
    s = _session
    return s.trace_path if s is not None else None


def _at_exit() -> None:
    s = _session
    if s is None or s.finished or os.getpid() != s.pid:
        return  # a forked child inherits the handler but not the run
    s.finished = True
    prof = s.profiler
    try:
        prof.poll_sources()
        if s.settings.get("oom_report"):
            report_pending(prof, _oom_hooks.installed_directory())
        text = format_summary(prof, trace=s.trace_path) if s.settings.get("summary") else None
        with _lock:
            if s.active:
                _stop_sources(s)
                s.active = False
        prof.close()
        if text:
            print(text, file=sys.stderr)
    except Exception as exc:  # the exit path must never hide the user's own error
        print(f"torchmem: summary failed: {exc!r}", file=sys.stderr)


def _detach_gpu_recorder() -> None:
    """The CUDA plugin records into nothing from now on (the process-wide slot is
    the session's global state, like the allocator swap)."""
    _recorder.set_gpu_recorder(None)


def _reset_for_tests() -> None:
    """Closes and forgets the global profiler (tests only; the CUDA plugin stays)."""
    global _session
    with _lock:
        s = _session
        if s is None:
            return
        if s.active:
            _stop_sources(s)
        s.finished = True
        s.profiler.close()
        _detach_gpu_recorder()
        _oom_hooks.uninstall()
        _session = None
