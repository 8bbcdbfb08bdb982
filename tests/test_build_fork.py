"""A process forked while torchmem compiles a hook on a background thread
(enable() in a DataLoader or multiprocessing parent, first run on a clean
machine) neither waits for that build nor makes the build wait for it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from torchmem.sources import _build

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_compiling_thread_does_not_wait_for_children_forked_meanwhile():
    # Before: the compiler ran with pipes, and a child forked while it was being
    # started kept a copy of a pipe end; the build then waited for that child
    # to exit, while the child waited (on the build lock) for the build.
    durations: list[float] = []
    stop = threading.Event()

    def compile_in_a_loop() -> None:
        while not stop.is_set():
            t = time.monotonic()
            assert _build._compile(["true"]) == (0, "")
            durations.append(time.monotonic() - t)

    thread = threading.Thread(target=compile_in_a_loop)
    thread.start()
    children = []
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
            time.sleep(0.01)
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "a compile waited for a forked child to exit"
    finally:
        stop.set()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        thread.join()
    assert len(durations) > 1 and max(durations) < 10


def test_compiler_output_comes_back_whole():
    assert _build._compile(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\nerr\n")


def test_a_forked_child_gets_fresh_module_locks():
    lock = _build._module_lock("held-by-a-parent-thread")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:
            ok = _build._module_lock("held-by-a-parent-thread").acquire(timeout=5)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0
