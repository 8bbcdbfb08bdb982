"""What the Lightning and Hugging Face callbacks share (the frameworks only call it).

``CallbackCore`` enables torchmem when the callback is made (before the
framework initialises CUDA or moves the model), reads the steps that
finished at each batch's end (``StepTracker``), runs the epoch leak check,
and gathers the distributed summary at the end of training. The callbacks
only translate the framework's hooks and log what it returns through the
framework's own logger. Nothing here may break the training it observes: a
failure to compute metrics is one warning, then metrics are off; only the
leak check raises, and only when asked to.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from .. import _session
from ..analysis.category_tracker import StepCategoryTracker
from ..analysis.steps import StepMemory, StepTracker
from ..epoch import EpochResult, LeakError, mark_epoch
from ..export.tensorboard import PREFIX, step_scalars

__all__ = ["CallbackCore", "CoreAccess"]


class CallbackCore:
    """The framework-independent part of a torchmem training callback.

    Args:
        raise_on_leak: raise ``LeakError`` at an epoch end whose leak check
            found more than ``tolerance_bytes`` of growth.
        tolerance_bytes: growth in bytes accepted without raising.
        log_categories: log the category breakdown at each step's peak when
            the profiler has one (``MemoryProfiler.breakdown``).
        verbose: print the leak report (rank 0) when a site grew.
        profiler: the MemoryProfiler to read (default: ``torchmem.enable()``'s).
        enable_settings: passed to ``torchmem.enable()`` (trace_dir, ...).
    """

    def __init__(self, *, raise_on_leak: bool = False, tolerance_bytes: int = 0,
                 log_categories: bool = True, verbose: bool = True, profiler: Any = None,
                 enable_settings: dict[str, Any] | None = None) -> None:
        if not isinstance(tolerance_bytes, int) or isinstance(tolerance_bytes, bool) \
                or tolerance_bytes < 0:
            raise ValueError(f"tolerance_bytes must be an int >= 0, got {tolerance_bytes!r}")
        self.raise_on_leak = bool(raise_on_leak)
        self.tolerance_bytes = tolerance_bytes
        self.log_categories = bool(log_categories)
        self.verbose = bool(verbose)
        self._owns_session = profiler is None
        self.profiler = profiler if profiler is not None else \
            _session.enable(**(enable_settings or {}))
        self._tracker = StepTracker(self.profiler)
        self._categories = StepCategoryTracker(self.profiler)
        self._metrics_on = True
        #: Every leak check this callback ran, oldest first.
        self.epoch_results: list[EpochResult] = []
        #: (step, metrics) of every step-metrics log, oldest first.
        self.logged: list[tuple[int, dict[str, float]]] = []
        #: The distributed summary (one RankSummary per rank on rank 0) after training.
        self.summaries: list[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A Trainer that spawns its workers (Lightning's ddp_spawn) pickles its
        # callbacks; each worker records with its own profiler.
        if not self._owns_session:
            raise TypeError("a torchmem callback given its own profiler cannot be pickled "
                            "(let it enable torchmem in each process)")
        state = dict(self.__dict__)
        del state["profiler"], state["_tracker"], state["_categories"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.profiler = _session.enable()
        self._tracker = StepTracker(self.profiler)
        self._categories = StepCategoryTracker(self.profiler)

    def resume(self) -> None:
        """Starts recording again if the session's profiler was disabled since."""
        if self._owns_session and not _session.is_enabled():
            _session.enable()

    def step_metrics(self) -> tuple[int, dict[str, float]] | None:
        """(step, metrics) for the steps finished since the last call, None when none did.

        ``torchmem/peak_bytes`` is the highest of those steps' peaks,
        ``torchmem/current_bytes`` what was live at the last one's end, and
        ``torchmem/category_bytes/CATEGORY`` what was live at the peak by
        category (only with a profiler that can say).
        """
        if not self._metrics_on:
            return None
        try:
            done = self._tracker.update()
            if not done:
                return None
            peak = max(done, key=lambda r: (r.peak_bytes, r.step))
            rec = StepMemory(done[-1].step, done[-1].current_bytes, peak.peak_bytes)
            # Read a step's events once, not every event each step (analysis.category_tracker).
            by_step = (self._categories.categories([r.step for r in done])
                       if self.log_categories else None)
            categories = by_step.get(peak.step) if by_step else None
            metrics = {k: float(v) for k, v in
                       step_scalars(rec, categories, by_type_device=False, gc=False).items()}
        except Exception as exc:  # the training run must go on
            self._metrics_on = False
            warnings.warn(f"torchmem: step memory metrics are off ({exc!r})", RuntimeWarning,
                          stacklevel=2)
            return None
        self.logged.append((rec.step, metrics))
        return rec.step, metrics

    def epoch_end(self, is_rank_zero: bool = True) -> EpochResult:
        """The leak check of this epoch's end; raises LeakError when asked to and it grew."""
        result = mark_epoch(self.profiler)
        self.epoch_results.append(result)
        if self.verbose and is_rank_zero and result.leaks:
            print(result.report(), file=sys.stderr)
        return result

    def check_raise(self, result: EpochResult) -> None:
        """Raises LeakError when ``raise_on_leak`` and the growth is over the tolerance."""
        if self.raise_on_leak and result.total_grown_bytes > self.tolerance_bytes:
            raise LeakError(result, self.tolerance_bytes)

    @staticmethod
    def epoch_metrics(result: EpochResult) -> dict[str, float]:
        """What an epoch's leak check logs: growth and live bytes after the GC."""
        return {f"{PREFIX}/epoch_grown_bytes": float(result.total_grown_bytes),
                f"{PREFIX}/epoch_live_bytes": float(result.live_bytes)}

    def train_end(self) -> list[Any] | None:
        """The distributed summary: a collective in a process group (every rank calls
        it; rank 0 prints the table and gets the list), else this process's own."""
        import torch.distributed as dist

        from .. import distributed as tmd

        if dist.is_available() and dist.is_initialized():
            self.summaries = tmd.summary(self.profiler)
        else:
            self.summaries = [tmd.rank_summary(self.profiler)]
        return self.summaries


class CoreAccess:
    """What a framework callback shows of its CallbackCore (``self.core``)."""

    core: CallbackCore

    @property
    def profiler(self) -> Any:
        """The MemoryProfiler this callback reads."""
        return self.core.profiler

    @property
    def epoch_results(self) -> list[EpochResult]:
        """Every leak check this callback ran, oldest first."""
        return self.core.epoch_results

    @property
    def logged(self) -> list[tuple[int, dict[str, float]]]:
        """(torchmem step, metrics) of every step-metrics log, oldest first."""
        return self.core.logged

    @property
    def summaries(self) -> list[Any] | None:
        """The distributed summary after training (one RankSummary per rank on rank 0)."""
        return self.core.summaries
