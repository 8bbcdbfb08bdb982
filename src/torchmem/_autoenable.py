"""``TORCHMEM=1 python train.py``: enable torchmem before the script runs.

The package installs ``torchmem-autoenable.pth`` into site-packages; Python
runs its one line at start-up, and that line imports this module only when
the TORCHMEM environment variable is set to something other than "" or "0".
Nothing else happens at start-up, with or without the variable.

Skipped in processes that are workers of the main one (multiprocessing
children started with spawn / forkserver, which re-run start-up) and in the
``torchrun`` launcher itself: each would write its own, mostly empty, trace.
torchrun's training processes are separate interpreters and each records its
own trace, with its rank in the file name.
"""

from __future__ import annotations

import os
import sys


def _should_enable() -> bool:
    if os.environ.get("TORCHMEM", "").strip() in ("", "0"):
        return False
    argv = getattr(sys, "argv", None) or getattr(sys, "orig_argv", [])
    if "--multiprocessing-fork" in argv or any("multiprocessing" in a and "spawn_main" in a
                                               for a in getattr(sys, "orig_argv", [])):
        return False
    prog = os.path.basename(argv[0]) if argv else ""
    return prog not in ("torchrun",) and "torch.distributed.run" not in getattr(sys, "orig_argv", [])


if _should_enable():
    try:
        from ._session import enable

        enable()
    except Exception as exc:  # start-up must never fail because of profiling
        print(f"torchmem: TORCHMEM is set but enabling failed: {exc!r}", file=sys.stderr)
