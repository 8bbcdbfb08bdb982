"""Optional dependencies of the integration tests: CI installs them all (.ci/run), so
there a missing one fails the test; on a developer's machine it skips it."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(name: str) -> ModuleType:
    """Imports ``name``, or skips the test (fails it under CI) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed (CI installs it: .ci/run)")
