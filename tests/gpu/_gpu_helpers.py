"""Marks shared by the GPU tests (the test process itself never initialises CUDA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

# Multi-GPU cases; device_count() asks the driver without initialising CUDA.
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs")
