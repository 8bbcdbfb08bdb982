"""``TorchmemCallback`` for Lightning 2.x (``lightning.pytorch`` or ``pytorch_lightning``).

```python
import lightning.pytorch as pl
from torchmem.integrations.lightning import TorchmemCallback

callback = TorchmemCallback()          # enables torchmem now: before the model meets the GPU
trainer = pl.Trainer(max_epochs=3, callbacks=[callback])
trainer.fit(model, loader)
```

- Making the callback enables torchmem (``torchmem.enable(**enable_settings)``),
  so make it before the Trainer and the model touch CUDA; ``setup`` resumes a
  profiler that was disabled since.
- At each training batch's end it logs, through ``pl_module.log`` (so every
  Lightning logger gets them, at the Trainer's ``log_every_n_steps``), the
  steps that finished: ``torchmem/peak_bytes`` (the highest live bytes after
  any of the step's events), ``torchmem/current_bytes`` and, when the profiler attributes
  memory (``MemoryProfiler.breakdown``), ``torchmem/category_bytes/CATEGORY``
  at the step's peak. torchmem's step is the optimizer step.
- At each training epoch's end it runs the leak check (``torchmem.mark_epoch``),
  logs ``torchmem/epoch_grown_bytes`` and ``torchmem/epoch_live_bytes``, prints
  the report on rank 0 when a site grew and, with ``raise_on_leak=True``,
  raises ``LeakError`` when the growth is over ``tolerance_bytes``.
- At the end of training it gathers the distributed summary
  (``torchmem.distributed.summary``; rank 0 prints it) into ``summaries``.

The callback class derives from the ``Callback`` of whichever Lightning is
imported (both, when both are): ``lightning.pytorch`` is preferred when
neither is imported yet.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ._common import CallbackCore, CoreAccess

__all__ = ["TorchmemCallback"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _callback_bases() -> tuple[type, ...]:
    # Importing a second Lightning costs seconds and a run uses one: take the
    # ones already imported, and import one only when none is.
    imported = [n for n in _PACKAGES if n in sys.modules]
    bases: list[type] = []
    errors: list[str] = []
    for name in imported or _PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        version = str(getattr(module, "__version__", "0"))
        if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 2:
            errors.append(f"{name} {version} is older than 2.0")
            continue
        bases.append(module.Callback)
        if not imported:
            break
    if not bases:
        raise ImportError("torchmem.integrations.lightning needs Lightning 2.x (pip install "
                          "torchmem[lightning]): " + "; ".join(errors))
    return tuple(bases)


def _float64(value: float) -> Any:
    import torch

    # Lightning casts Python numbers to float32, exact only up to 16 MiB.
    return torch.tensor(value, dtype=torch.float64)


class _TorchmemCallback(CoreAccess):
    """Memory metrics, the epoch leak check and the distributed summary for Lightning.

    Args:
        raise_on_leak: raise ``torchmem.LeakError`` at an epoch end whose leak
            check found more than ``tolerance_bytes`` bytes of growth.
        tolerance_bytes: growth accepted without raising (bytes).
        log_categories: log the category breakdown when the profiler has one.
        verbose: print the leak report on rank 0 when a site grew.
        profiler: a MemoryProfiler to read instead of enabling torchmem's own.
        **enable_settings: passed to ``torchmem.enable()`` (``trace_dir=``, ...).

    ``epoch_results`` lists the leak checks, ``logged`` the (step, metrics)
    logged, ``summaries`` the distributed summary after training.
    """

    def __init__(self, raise_on_leak: bool = False, tolerance_bytes: int = 0, *,
                 log_categories: bool = True, verbose: bool = True, profiler: Any = None,
                 **enable_settings: Any) -> None:
        super().__init__()
        self.core = CallbackCore(raise_on_leak=raise_on_leak, tolerance_bytes=tolerance_bytes,
                                 log_categories=log_categories, verbose=verbose,
                                 profiler=profiler, enable_settings=enable_settings)
        self._epoch_open = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.core.resume()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        got = self.core.step_metrics()
        if got is None:
            return
        for name, value in got[1].items():
            pl_module.log(name, _float64(value), on_step=True, on_epoch=False, logger=True,
                          prog_bar=False, batch_size=1)

    # Lightning computes and caches its epoch-level metrics after the callbacks'
    # on_train_epoch_end, and keeps them: a check there sees them appear after
    # the first epoch as growth. So an epoch's check runs when Lightning is
    # done with the epoch: at the next epoch's start, or at the end of training.
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._epoch_open:
            self._end_epoch(trainer)
        self._epoch_open = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._epoch_open:
            self._end_epoch(trainer)
        self.core.train_end()

    def _end_epoch(self, trainer: Any) -> None:
        self._epoch_open = False
        result = self.core.epoch_end(is_rank_zero=trainer.is_global_zero)
        metrics = self.core.epoch_metrics(result)
        # Straight to the loggers: pl_module.log would make Lightning keep
        # result tensors of its own, which the next check would count.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.core.check_raise(result)


TorchmemCallback = type("TorchmemCallback", (_TorchmemCallback, *_callback_bases()),
                        {"__module__": __name__, "__doc__": _TorchmemCallback.__doc__,
                         "__qualname__": "TorchmemCallback"})
