"""``torchmem live``: a terminal view of a trace while it is being written.

``state.LiveTrace`` follows the trace (storage.follow) and computes the
figures; ``view`` draws them as rich renderables; ``app.LiveApp`` is the
textual application that refreshes them about once a second and takes the
keys. docs/cli.md describes the screen.
"""
