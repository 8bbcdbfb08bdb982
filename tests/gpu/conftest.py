"""GPU tests: skipped entirely without CUDA.

Swapping torch's allocator is possible once per process and only before CUDA
is initialised, so every test that installs the plugin runs its body in a
fresh interpreter (``run_gpu_script``); the test process itself never touches
CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def run_gpu_script(tmp_path):
    """Runs `code` in a fresh Python; it must print OK. Returns its stdout."""

    def run(code: str, timeout: float = 120.0, env: dict | None = None) -> str:
        script = tmp_path / "gpu_case.py"
        script.write_text(textwrap.dedent(code))
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=str(tmp_path))
        if proc.returncode != 0 or "OK" not in proc.stdout.splitlines():
            pytest.fail(f"GPU script failed (rc={proc.returncode})\n--- stdout\n{proc.stdout}"
                        f"\n--- stderr\n{proc.stderr[-6000:]}")
        return proc.stdout

    return run
