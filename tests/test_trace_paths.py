"""Trace paths: every name the filesystem allows opens exactly that file; read-only storage reads.

Issue 13, items 1 and 4. SQLite opens a read-only file through a ``file:``
URI, where ``#``, ``?`` and ``%XX`` mean something; a finished trace in WAL
mode needed to create ``PATH-shm``, which read-only storage does not allow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import torchmem
from torchmem.storage import SQLiteStorage, TraceFormatError, load

NAMES = [
    "exp#2.db", "run%31.db", "what?mode=rwc.db", "a b.db", "ünï cødé ✓.db", "new\nline.db",
    "-leading-dash.db", "--also.db", "file:looks-like-a-uri.db", "percent%.db", "amp&eq=.db",
    "n" * 240 + ".db",
]


def _write(path: str, n: int) -> None:
    st = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(st, auto_snapshot=False)
    for i in range(n):
        p.track_allocation(0x1000 + 16 * i, i + 1)
    p.close()


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("name", NAMES)
def test_every_name_opens_exactly_that_file(tmp_path, name):
    # Decoys that the unescaped URI would have opened instead.
    _write(str(tmp_path / "exp"), 1)
    _write(str(tmp_path / "run1.db"), 2)
    _write(str(tmp_path / "what"), 3)
    before = _listing(tmp_path)
    path = str(tmp_path / name)
    _write(path, 7)
    assert _listing(tmp_path) == sorted(before + [name])  # no stray file beside it
    prof = load(path)
    assert prof.get_statistics().allocation_count == 7
    assert prof.trace_path == path
    assert _listing(tmp_path) == sorted(before + [name])


def test_relative_names_and_symlinks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write("exp#3.db", 4)
    os.symlink("exp#3.db", "link?.db")
    assert load("exp#3.db").get_statistics().allocation_count == 4
    assert load("link?.db").get_statistics().allocation_count == 4
    assert load(tmp_path / "link?.db").get_statistics().allocation_count == 4  # a PathLike


def test_a_read_only_open_never_creates_a_file(tmp_path):
    for name in ("exp#2.db", "missing.db", "x?mode=rwc"):
        with pytest.raises(TraceFormatError, match="no such file"):
            load(tmp_path / name)
    # The reader of a trace whose name has a '#' must not create the name before it.
    _write(str(tmp_path / "exp#2.db"), 1)
    load(tmp_path / "exp#2.db")
    assert _listing(tmp_path) == ["exp#2.db"]


def test_a_path_longer_than_sqlite_allows_is_a_clear_error(tmp_path):
    d = str(tmp_path)
    while len(d) < 600:
        d = os.path.join(d, "d" * 100)
    os.makedirs(d)
    path = os.path.join(d, "t.db")
    with pytest.raises(ValueError, match="bytes long.*at most"):
        SQLiteStorage(path)
    assert not os.path.exists(path)
    open(path, "wb").close()
    with pytest.raises(TraceFormatError, match="bytes long.*at most"):
        load(path)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "torchmem", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_and_reads_hostile_names(tmp_path):
    (tmp_path / "s.py").write_text("import torchmem\n"
                                   "p = torchmem.get_profiler()\n"
                                   "p.track_allocation(0x10, 5)\n")
    _write(str(tmp_path / "exp"), 1)
    for name in ("exp#2.db", "-dash%31.db", "sp ace?.db"):
        r = _cli("run", "--no-stacks", f"--output={name}", "s.py", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        r = _cli("summary", "--", name, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert name in r.stdout
        assert load(tmp_path / name).get_statistics().total_allocated_bytes == 5
    assert not (tmp_path / "-dash1.db").exists()


# -- read-only storage ---------------------------------------------------------

def _read_only_mount(source: str) -> str | None:
    """A read-only bind mount of ``source`` (root only), or None."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    target = tempfile.mkdtemp(prefix="torchmem-ro-")
    ok = subprocess.run(["mount", "--bind", source, target], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", target],
                             capture_output=True).returncode == 0:
        return target
    if ok:
        subprocess.run(["umount", target], capture_output=True)
    os.rmdir(target)
    return None


def _unmount(target: str) -> None:
    subprocess.run(["umount", "-l", target], capture_output=True)
    os.rmdir(target)


def _chmod_read_only(directory: str, file: str) -> None:
    os.chmod(file, 0o400)
    os.chmod(directory, 0o500)


def test_a_closed_trace_reads_from_read_only_storage(tmp_path):
    src = tmp_path / "traces"
    src.mkdir()
    path = str(src / "done.db")
    _write(path, 9)
    assert _listing(src) == ["done.db"]  # one self-contained file
    # Read-only file and directory: chmod stops a non-root reader; as root
    # (chmod does not stop root) the same directory is bind-mounted read-only.
    _chmod_read_only(str(src), path)
    try:
        if os.geteuid() != 0:
            assert load(path).get_statistics().allocation_count == 9
        where = _read_only_mount(str(src))
        if where is None and os.geteuid() == 0:
            pytest.skip("root, and no read-only bind mount here: chmod cannot stop root")
        if where is not None:
            try:
                with pytest.raises(OSError):
                    open(os.path.join(where, "probe"), "w")
                prof = load(os.path.join(where, "done.db"))
                assert prof.get_statistics().allocation_count == 9
                assert _listing(where) == ["done.db"]
            finally:
                _unmount(where)
    finally:
        os.chmod(str(src), 0o700)
        os.chmod(path, 0o600)


KILLED = """
import os, sys, torchmem
from torchmem.storage import SQLiteStorage
st = SQLiteStorage(sys.argv[1])
p = torchmem.MemoryProfiler(st, auto_snapshot=False)
for i in range(5):
    p.track_allocation(0x1000 + 16 * i, 10)
p.flush()
st.flush()
print(st.writer_pid, flush=True)
os._exit(0)  # killed: the WAL and -shm stay beside the file
"""


def _wait_gone(pid: int) -> None:
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"writer {pid} still running")


def test_a_killed_trace_on_read_only_storage(tmp_path):
    src = tmp_path / "k"
    src.mkdir()
    path = str(src / "killed.db")
    r = subprocess.run([sys.executable, "-c", KILLED, path], check=True, timeout=120,
                       capture_output=True, text=True)
    _wait_gone(int(r.stdout.split()[-1]))  # the writer finishes on its own, then exits
    assert os.path.getsize(path + "-wal") > 0
    where = _read_only_mount(str(src))
    if where is None:
        pytest.skip("no read-only bind mount here (needs root)")
    try:
        files = _listing(where)
        if "killed.db-shm" in files:  # readable as it is: SQLite reads a read-only -shm
            loaded = load(os.path.join(where, "killed.db"))
            assert loaded.get_statistics().allocation_count == 5
            loaded.close()  # a lazy profiler keeps the file open, and SQLite its -shm
    finally:
        _unmount(where)
    os.remove(path + "-shm")
    where = _read_only_mount(str(src))
    try:
        if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal"):
            with pytest.raises(TraceFormatError, match="-wal.*read-only"):
                # load() is lazy: the error comes at load or at the first read.
                load(os.path.join(where, "killed.db")).get_statistics()
    finally:
        _unmount(where)
