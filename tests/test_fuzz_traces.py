"""Fuzzing the trace loader: mutated files open as a trace or raise TraceFormatError.

The parser of files torchmem reads is ``torchmem.storage.load`` (SQLite
traces; the CLI's summary / leaks / diff / export all go through it). A valid
trace is mutated two ways, over and over:

- bytes: bit flips, random overwrites, truncation, zeroed pages, extreme
  integers at random offsets (page headers, cell pointers, record headers);
- rows: through SQL, hostile values in every column (NULL, negatives, -2 as a
  device, 2**63-1, text, blobs, floats, huge strings), deleted rows, dropped
  tables, junk metadata, stack-node cycles, duplicate and out-of-order events.

Every outcome must be a loaded trace (whose queries then work) or a
TraceFormatError; any other exception, a hang or a crash of the process is a
failure, and the input is saved for reproduction. The loop runs in a child
process so a crash is reported instead of taking pytest down.

    python tests/test_fuzz_traces.py --seconds 600     # longer runs (scripts/fuzz.sh)
    python tests/test_fuzz_traces.py --replay FILE     # one saved input
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback

HOSTILE = [None, -1, -2, -3, -32768, 0, 1, 2**15, 2**16 - 1, 2**31, 2**32 + 1, 2**63 - 1,
           -2**63, "", "text", "\x00\u202e<script>", b"\x00\xff", 1e308, -0.5, "x" * 100_000,
           '{"a": [1, {"b": null}]}', "[]", "null"]
TABLES = ["metadata", "events", "types", "frames", "stack_nodes", "gc_records", "snapshots",
          "ooms", "anomalies"]


def make_seed(path: str) -> None:
    """A small valid trace touching every table."""
    import torchmem
    from torchmem.storage import SQLiteStorage

    st = SQLiteStorage(path, overwrite=True)
    p = torchmem.MemoryProfiler(st, auto_snapshot=False, capture_stack_traces=True)

    def site(i: int) -> None:
        p.track_allocation(0x1000 + i * 64, 100 + i, ("CPU", "GPU", "Pinned", "user")[i % 4],
                           (-1, 0, -1, 3)[i % 4], i % 3)

    for i in range(40):
        site(i)
        if i % 3 == 0:
            p.track_deallocation(0x1000 + i * 64)
        if i % 10 == 9:
            p.step()
            p.track_snapshot()
    p.track_reallocation(0x1000 + 64, 0x9000, 5000)
    p.track_deallocation(0xdead)  # an anomaly
    p.record_gc_start(1)
    p.record_gc_end(1, 10, 0)
    p.record_oom(1 << 30, 0, 0, 100, 1000)
    p.close()


def mutate_bytes(data: bytearray, rng: random.Random) -> bytearray:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        n = len(data)
        if n == 0:
            break
        if op == 0:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(n)
                data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # random overwrite
            i = rng.randrange(n)
            k = rng.randint(1, 64)
            data[i:i + k] = bytes(rng.randrange(256) for _ in range(min(k, n - i)))
        elif op == 2:  # truncation
            del data[rng.randrange(n):]
        elif op == 3:  # a zeroed page
            page = 4096
            i = rng.randrange(max(n // page, 1)) * page
            data[i:i + page] = bytes(min(page, n - i))
        elif op == 4:  # extreme integers at an offset
            i = rng.randrange(n)
            width = rng.choice([1, 2, 4])
            value = rng.choice([0, 2**(8 * width) - 1, 2**(8 * width - 1), 1])
            data[i:i + width] = value.to_bytes(width, "big")[:n - i]
        else:  # header fields (page size, counts, schema cookie)
            i = rng.choice([16, 18, 19, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 92, 96])
            if i + 4 <= n:
                data[i:i + 4] = rng.randrange(2**32).to_bytes(4, "big")
    return data


def mutate_rows(path: str, rng: random.Random) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    # No fsync per statement (what made a case ~50 ms): the file the loader
    # then reads holds the same bytes.
    con.execute("PRAGMA synchronous=OFF")
    try:
        for _ in range(rng.randint(1, 5)):
            table = rng.choice(TABLES)
            try:
                cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
                if not cols:
                    continue
                op = rng.randrange(10)
                if op <= 4:
                    col = rng.choice(cols)
                    value = rng.choice(HOSTILE)
                    con.execute(f"UPDATE {table} SET {col} = ? WHERE rowid IN "
                                f"(SELECT rowid FROM {table} ORDER BY random() LIMIT ?)",
                                (value, rng.choice([1, 1, 3, 1000])))
                elif op == 5:
                    con.execute(f"DELETE FROM {table} WHERE rowid IN "
                                f"(SELECT rowid FROM {table} ORDER BY random() LIMIT 1)")
                elif op == 6:
                    con.execute(f"DROP TABLE {table}")
                elif op == 7:
                    key = rng.choice(["format", "schema_version", "torch", "settings"])
                    con.execute("INSERT OR REPLACE INTO metadata VALUES (?, ?)",
                                (key, rng.choice(["1", "2", "99", '"torchmem-trace"', "{",
                                                  "null", '"x"', "-1", "1e999"])))
                elif op == 8:  # a copy of a row with a shifted key (duplicates, gaps)
                    row = con.execute(f"SELECT * FROM {table} ORDER BY random() LIMIT 1").fetchone()
                    if row:
                        row = list(row)
                        if isinstance(row[0], int):
                            row[0] += rng.choice([1, 7, 1000, -1, 2**40])
                        con.execute(f"INSERT OR REPLACE INTO {table} VALUES "
                                    f"({', '.join('?' * len(row))})", row)
                else:  # stack-node cycles and self-loops
                    con.execute("UPDATE stack_nodes SET parent = node_id WHERE node_id IN "
                                "(SELECT node_id FROM stack_nodes ORDER BY random() LIMIT 2)")
                    con.execute("UPDATE stack_nodes SET parent = parent + 1")
            except sqlite3.Error:
                pass  # the mutation itself did not apply: fine
    finally:
        con.close()


def exercise(path: str) -> str:
    """Loads `path` and queries it; 'ok' or 'rejected', or raises (a finding)."""
    from torchmem.storage import TraceFormatError, load

    try:
        prof = load(path)
    except TraceFormatError as exc:
        msg = str(exc)
        assert "\n" not in msg and path in msg, f"TraceFormatError not one line: {msg!r}"
        return "rejected"
    # load() is lazy: corruption in the events surfaces at the first query
    # that reads them, as the same one-line TraceFormatError.
    try:
        prof.get_statistics()
        events = prof.get_events()
        for e in events[:200]:
            if e.stack_trace is not None:
                e.stack_trace.format()
        prof.get_events(1, 2)
        prof.get_allocations_since(0)
        prof.detect_potential_leaks(min_age_steps=1)
        prof.live_allocations()
        prof.anomalies
        prof.snapshots
        prof.gc_records
        prof.oom_events
        for t in prof.type_names[:8]:
            prof.get_statistics_for_type(t)
    except TraceFormatError as exc:
        msg = str(exc)
        assert "\n" not in msg and path in msg, f"TraceFormatError not one line: {msg!r}"
        return "rejected"
    finally:
        prof.close()
    return "ok"


def fuzz(seconds: float, seed: int, out_dir: str, verbose: bool = False,
         cases: int | None = None) -> int:
    """Runs until `seconds` pass (or `cases` cases are run, when given); returns
    the number of findings (saved in out_dir)."""
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="torchmem-fuzz-")
    seed_path = os.path.join(work, "seed.db")
    make_seed(seed_path)
    seed_bytes = bytearray(open(seed_path, "rb").read())
    assert exercise(seed_path) == "ok"
    findings = 0
    outcomes = {"ok": 0, "rejected": 0}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline and (cases is None or i < cases):
        i += 1
        path = os.path.join(work, f"case-{i}.db")
        if rng.random() < 0.5:
            with open(path, "wb") as f:
                f.write(mutate_bytes(seed_bytes, rng))
        else:
            shutil.copyfile(seed_path, path)
            mutate_rows(path, rng)
        keep = os.path.join(out_dir, f"finding-{seed}-{i}.db")
        shutil.copyfile(path, keep)  # kept if this case crashes the process
        try:
            outcomes[exercise(path)] += 1
            os.remove(keep)
        except Exception:  # noqa: BLE001 - anything but TraceFormatError is a finding
            findings += 1
            print(f"FINDING {keep}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
    shutil.rmtree(work, ignore_errors=True)
    print(f"fuzz: {i} cases, {outcomes['ok']} loaded, {outcomes['rejected']} rejected, "
          f"{findings} findings", flush=True)
    return findings


def run_atheris(seconds: float, out_dir: str) -> None:
    """Coverage-guided byte fuzzing with atheris (optional)."""
    import atheris

    work = tempfile.mkdtemp(prefix="torchmem-atheris-")
    seed_path = os.path.join(work, "seed.db")
    make_seed(seed_path)
    case = os.path.join(work, "case.db")

    def one(data: bytes) -> None:
        with open(case, "wb") as f:
            f.write(data)
        for suffix in ("-wal", "-shm"):
            try:
                os.remove(case + suffix)
            except FileNotFoundError:
                pass
        exercise(case)

    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    shutil.copyfile(seed_path, os.path.join(corpus, "seed"))
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], corpus, f"-max_total_time={int(seconds)}",
                   f"-artifact_prefix={out_dir}/", "-max_len=1000000"], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fuzz torchmem's trace loader")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, help="stop after this many cases (before --seconds)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "torchmem-fuzz-findings"))
    ap.add_argument("--atheris", action="store_true", help="coverage-guided (needs atheris)")
    ap.add_argument("--replay", help="run one saved input and show the outcome")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.replay:
        print(exercise(args.replay))
        return 0
    if args.atheris:
        run_atheris(args.seconds, args.out)
        return 0
    return 1 if fuzz(args.seconds, args.seed, args.out, cases=args.cases) else 0


# -- pytest ---------------------------------------------------------------------------
def test_fuzz_trace_loader(tmp_path):
    """1000 mutated traces in a child process (~9 s on 2 cores; 20 s of the loop
    did ~570 before the row mutations stopped fsyncing): no crash, no other
    exception."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cases", "1000",
                           "--seconds", "100", "--seed", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    kept = sorted(os.listdir(tmp_path))
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (negative: killed by a signal); inputs kept: {kept}\n"
        f"{proc.stderr[-4000:]}\n{proc.stdout[-1000:]}")
    assert "fuzz: 1000 cases," in proc.stdout and " 0 findings" in proc.stdout


def test_trace_files_are_private(tmp_path):
    """Traces (and SQLite's -wal / -shm files) are mode 0600 whatever the umask."""
    import stat

    old = os.umask(0)
    try:
        path = str(tmp_path / "t.db")
        import torchmem
        from torchmem.storage import SQLiteStorage

        st = SQLiteStorage(path)
        p = torchmem.MemoryProfiler(st, auto_snapshot=False)
        p.track_allocation(1, 1)
        p.flush()
        st.flush()
        modes = {s: stat.S_IMODE(os.stat(path + s).st_mode)
                 for s in ("", "-wal", "-shm") if os.path.exists(path + s)}
        p.close()
    finally:
        os.umask(old)
    assert modes[""] == 0o600
    assert all(m == 0o600 for m in modes.values()), modes


def test_torchmem_never_unpickles():
    """No module under src/torchmem loads pickles (traces are SQLite, read as data)."""
    import re

    import torchmem

    root = os.path.dirname(torchmem.__file__)
    pattern = re.compile(r"\b(pickle|cPickle|_pickle|dill|cloudpickle|joblib)\s*\.\s*"
                         r"(load|loads|Unpickler)\b|\bfrom\s+(pickle|_pickle)\s+import\s+"
                         r"[^\n]*\b(load|loads|Unpickler)\b|torch\.load\s*\(|"
                         r"numpy\.load\s*\([^)]*allow_pickle\s*=\s*True|"
                         r"np\.load\s*\([^)]*allow_pickle\s*=\s*True")
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if pattern.search(line.split("#", 1)[0]):
                            hits.append(f"{os.path.relpath(path, root)}:{lineno}: {line.strip()}")
    assert hits == []


if __name__ == "__main__":
    sys.exit(main())
