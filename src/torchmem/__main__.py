"""``python -m torchmem``: the same as the ``torchmem`` command."""

import sys

from .cli import main

sys.exit(main())
