"""``TorchmemCallback`` for the Hugging Face ``Trainer`` (a ``TrainerCallback``).

```python
from transformers import Trainer, TrainingArguments
from torchmem.integrations.transformers import TorchmemCallback

callback = TorchmemCallback()     # enables torchmem now: before TrainingArguments, which
args = TrainingArguments(...)     # initialises CUDA, and before the Trainer moves the model
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
trainer.train()
```

- Making the callback enables torchmem (``torchmem.enable(**enable_settings)``);
  ``on_train_begin`` resumes a profiler that was disabled since.
- At each logging step of the Trainer (``logging_steps``) it logs through
  ``Trainer.log`` (so ``state.log_history`` and every ``report_to``
  integration get them) ``torchmem/peak_bytes``, the highest step peak
  since the last log (torchmem.analysis.steps), ``torchmem/current_bytes`` and, when
  the profiler attributes memory (``MemoryProfiler.breakdown``),
  ``torchmem/category_bytes/CATEGORY`` at that peak. torchmem's step is the
  optimizer step, as the Trainer's ``global_step`` is.
- At each epoch's end it runs the leak check (``torchmem.mark_epoch``), logs
  ``torchmem/epoch_grown_bytes`` and ``torchmem/epoch_live_bytes``, prints the
  report on the main process when a site grew and, with
  ``raise_on_leak=True``, raises ``LeakError`` when the growth is over
  ``tolerance_bytes``.
- At the end of training it gathers the distributed summary
  (``torchmem.distributed.summary``; rank 0 prints it) into ``summaries``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from transformers import TrainerCallback

from ._common import CallbackCore, CoreAccess

__all__ = ["TorchmemCallback"]


def _calling_trainer(max_depth: int = 30) -> Any:
    """The Trainer whose method is calling this callback, or None.

    The TrainerCallback API hands a callback no Trainer, but its hooks are
    only ever called from the Trainer's own methods, whose ``self`` it is.
    """
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class TorchmemCallback(CoreAccess, TrainerCallback):
    """Memory metrics, the epoch leak check and the distributed summary for the Trainer.

    Args:
        raise_on_leak: raise ``torchmem.LeakError`` at an epoch end whose leak
            check found more than ``tolerance_bytes`` bytes of growth.
        tolerance_bytes: growth accepted without raising (bytes).
        log_categories: log the category breakdown when the profiler has one.
        verbose: print the leak report on the main process when a site grew.
        profiler: a MemoryProfiler to read instead of enabling torchmem's own.
        **enable_settings: passed to ``torchmem.enable()`` (``trace_dir=``, ...).

    ``epoch_results`` lists the leak checks, ``logged`` the (step, metrics)
    logged, ``summaries`` the distributed summary after training;
    ``trainer`` is the Trainer it logs through (found when training begins;
    set it yourself to log through another).
    """

    def __init__(self, raise_on_leak: bool = False, tolerance_bytes: int = 0, *,
                 log_categories: bool = True, verbose: bool = True, profiler: Any = None,
                 **enable_settings: Any) -> None:
        self.core = CallbackCore(raise_on_leak=raise_on_leak, tolerance_bytes=tolerance_bytes,
                                 log_categories=log_categories, verbose=verbose,
                                 profiler=profiler, enable_settings=enable_settings)
        self.trainer: Any = None
        self._warned = False

    def _log(self, metrics: dict[str, float], control: Any) -> None:
        if self.trainer is not None:
            # Trainer.log clears control.should_log (its own on_log does): the
            # Trainer's own log of this step must still happen.
            should_log = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = should_log
        elif not self._warned:
            self._warned = True
            warnings.warn("torchmem: no Trainer is calling this callback; memory metrics are "
                          "kept in callback.logged only", RuntimeWarning, stacklevel=3)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.core.resume()
        if self.trainer is None:
            self.trainer = _calling_trainer()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # At the Trainer's own logging cadence: the default flow callback,
        # which runs before this one, has just decided it.
        if not control.should_log:
            return
        got = self.core.step_metrics()
        if got is not None:
            self._log(got[1], control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        result = self.core.epoch_end(is_rank_zero=state.is_world_process_zero)
        self._log(self.core.epoch_metrics(result), control)
        self.core.check_raise(result)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.core.train_end()
