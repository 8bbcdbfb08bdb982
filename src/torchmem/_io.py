"""The native extension's I/O helper, apart from the recorder.

``write_all(fd, data)`` writes every byte of ``data`` to ``fd`` with the GIL
released once for the whole buffer (OSError on failure). It lives in
``_native`` but is not the recorder: sinks may use it, while import-linter
forbids them ``torchmem._native`` itself.
"""

from ._native import write_all

__all__ = ["write_all"]
