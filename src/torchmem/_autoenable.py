"""``TORCHMEM=1 python train.py``: enable torchmem before the script runs.

The package installs ``torchmem-autoenable.pth`` into site-packages; Python
runs its one line at start-up, and that line imports this module only when
the TORCHMEM environment variable is set to something other than "" or "0".
Nothing else happens at start-up, with or without the variable.

Skipped in processes that run none of the user's code at start-up:
multiprocessing's own helpers (the resource tracker, the forkserver) and
the workers of the main process (children started with spawn / forkserver,
which re-run start-up), all started as ``python -c "from multiprocessing.X
import ..."``; and the ``torchrun`` launcher itself. Each would write its
own, mostly empty, trace and print a summary.
torchrun's training processes are separate interpreters and each records its
own trace, with its rank in the file name.
"""

from __future__ import annotations

import os
import sys


def _multiprocessing_helper(orig_argv: list[str]) -> bool:
    """``python [flags] -c "from multiprocessing.... import ..."``: how
    multiprocessing starts its resource tracker, forkserver and spawn workers."""
    if "--multiprocessing-fork" in orig_argv:
        return True
    if "-c" not in orig_argv[1:]:
        return False
    i = orig_argv.index("-c", 1)
    code = orig_argv[i + 1] if i + 1 < len(orig_argv) else ""
    return code.lstrip().startswith(("from multiprocessing.", "import multiprocessing."))


def _should_enable() -> bool:
    if os.environ.get("TORCHMEM", "").strip() in ("", "0"):
        return False
    argv = getattr(sys, "argv", None) or getattr(sys, "orig_argv", [])
    if "--multiprocessing-fork" in argv or _multiprocessing_helper(
            list(getattr(sys, "orig_argv", []))):
        return False
    prog = os.path.basename(argv[0]) if argv else ""
    return prog not in ("torchrun",) and "torch.distributed.run" not in getattr(sys, "orig_argv", [])


if _should_enable():
    try:
        from ._session import enable

        enable()
    except Exception as exc:  # start-up must never fail because of profiling
        print(f"torchmem: TORCHMEM is set but enabling failed: {exc!r}", file=sys.stderr)
