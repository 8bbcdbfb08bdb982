"""torchmem's per-step memory scalars in TensorBoard while training runs.

```python
from torchmem.integrations.tensorboard import TorchmemCallback

tb = TorchmemCallback("runs/exp1")    # enables torchmem; or writer=an existing SummaryWriter
for x, y in loader:                   # any loop: every optimizer.step() ends a step
    loss_fn(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
tb.close()                            # the last step's scalars, then the writer's flush
```

After every ``optimizer.step()`` (a global optimizer hook; ``auto=False`` to
call ``update()`` yourself, e.g. after ``profiler.step()``) it writes, for
each step finished since the last write, the scalars of
``torchmem.export.tensorboard`` at ``global_step`` = torchmem's step:
current and peak bytes, by allocation type and device, by category at the
step's peak when the profiler attributes memory, and GC time. ``torchmem
export TRACE --format tensorboard -o DIR`` writes the same from a saved
trace. Needs the ``tensorboard`` package (``pip install torchmem[tensorboard]``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from .. import _session
from ..analysis.category_tracker import StepCategoryTracker
from ..analysis.steps import StepTracker
from ..export.tensorboard import PREFIX, summary_writer, write_step

__all__ = ["TensorBoardCallback", "TorchmemCallback"]


class TorchmemCallback:
    """Writes torchmem's per-step scalars to a TensorBoard SummaryWriter.

    Args:
        log_dir: where a new SummaryWriter writes its event files (its
            default, ``runs/DATE_HOST``, when both this and ``writer`` are None).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to add
            the scalars to (it is flushed, not closed, by ``close``).
        profiler: the MemoryProfiler to read (default: ``torchmem.enable()``'s).
        auto: write after every ``optimizer.step()`` (a global optimizer hook).
        categories: add the category breakdown when the profiler has one.
        prefix: the tags' first part ("torchmem").
        **enable_settings: passed to ``torchmem.enable()`` when ``profiler`` is None.

    ``steps_written`` counts the steps written so far.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None,
                 profiler: Any = None, auto: bool = True, categories: bool = True,
                 prefix: str = PREFIX, **enable_settings: Any) -> None:
        self.profiler = profiler if profiler is not None else _session.enable(**enable_settings)
        self._owns_writer = writer is None
        self.writer = writer if writer is not None else summary_writer(log_dir)
        self.prefix = prefix
        self.categories = bool(categories)
        self.steps_written = 0
        self._tracker = StepTracker(self.profiler)
        self._categories = StepCategoryTracker(self.profiler)
        self._hook = None
        self._failed = False
        if auto:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self._hook = register_optimizer_step_post_hook(lambda *_: self.update())

    def update(self, final: bool = False) -> int:
        """Writes the steps finished since the last call (``final``: and the one in
        progress, which is then the last); returns how many."""
        if self._failed:
            return 0
        try:
            done = self._tracker.update(final)
            # Each step's events read once (analysis.category_tracker).
            by_step = (self._categories.categories([r.step for r in done])
                       if self.categories and done else None)
            for rec in done:
                write_step(self.writer, rec, by_step.get(rec.step) if by_step else None,
                           prefix=self.prefix)
        except Exception as exc:  # the training run must go on
            self._failed = True
            warnings.warn(f"torchmem: TensorBoard scalars are off ({exc!r})", RuntimeWarning,
                          stacklevel=2)
            return 0
        self.steps_written += len(done)
        return len(done)

    def close(self) -> None:
        """Writes what is left (the last step included), removes the hook, flushes the writer
        (and closes it when this callback made it)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.update(final=True)  # the step in progress ends here: it gets its point too
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

    def __enter__(self) -> "TorchmemCallback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The same class under a name that says where it writes.
TensorBoardCallback = TorchmemCallback
