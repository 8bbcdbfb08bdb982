"""torchmem where training already runs: Lightning, Hugging Face Trainer, TensorBoard.

- ``torchmem.integrations.lightning.TorchmemCallback`` (``lightning`` or
  ``pytorch_lightning`` 2.x),
- ``torchmem.integrations.transformers.TorchmemCallback`` (a ``TrainerCallback``),
- ``torchmem.integrations.tensorboard.TorchmemCallback`` (SummaryWriter scalars
  from the live profiler).

Each module imports its framework only when it is imported itself, so this
package costs nothing to have; the frameworks are optional dependencies
(``pip install torchmem[lightning]``, ``[transformers]``, ``[tensorboard]``).
docs/integrations.md shows each with a runnable example.
"""
