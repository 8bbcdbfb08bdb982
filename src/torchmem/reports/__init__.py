"""Text reports: renderers that turn analysis results into the text torchmem prints.

Each takes the profiler (or the analysis data) it reports on; the public
entry points that default to the session's profiler (``torchmem.summary``,
``torchmem.oom``, ``torchmem.distributed``) sit in the session layer above.
"""
