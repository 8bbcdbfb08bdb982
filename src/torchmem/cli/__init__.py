"""The ``torchmem`` command: run a script under the profiler, then summarise, diff and export traces.

    torchmem run [-o TRACE] [--no-stacks] SCRIPT [ARGS...]
    torchmem summary TRACE [TRACE...]
    torchmem leaks TRACE [--top N] [--min-age-steps K]
    torchmem export TRACE --format memory_viz|perfetto|html -o OUT
    torchmem diff TRACE_A TRACE_B [--top N]

A missing, foreign, corrupt or truncated trace gives a one-line error on
stderr and exit status 2. docs/cli.md has examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types
from typing import Any, Sequence

from ..export._common import live_bytes_by_site
from ..units import format_bytes
from ..storage.base import TraceFormatError

__all__ = ["main"]

EXIT_BAD_TRACE = 2


class CliError(Exception):
    """A user error reported as one line, exit status 2."""


def _load(path: str) -> Any:
    from ..storage import load

    return load(path)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: Any) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        # First column left-aligned (names), numbers right-aligned.
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _summary_row(name: str, prof: Any) -> list[Any]:
    s = prof.get_statistics()
    live = prof.live_allocations()
    return [name, f"{len(prof.get_event_rows()):,}", format_bytes(s.total_allocated_bytes, 1),
            format_bytes(s.peak_usage_bytes, 1), format_bytes(s.current_usage_bytes, 1),
            f"{s.allocation_count:,}", f"{s.deallocation_count:,}", f"{len(live):,}",
            f"{s.gc_count} / {s.total_gc_time.total_seconds() * 1e3:.1f} ms",
            prof.anomalies["total"]]


_SUMMARY_HEADERS = ["trace", "events", "allocated", "peak", "live at end", "allocs", "frees",
                    "live count", "GC (count / time)", "anomalies"]


def print_summary(profilers: Sequence[tuple[str, Any]], out: Any = None) -> None:
    """Prints the summary table of one or more profilers (one row each, plus merged totals)."""
    out = out if out is not None else sys.stdout
    rows = [_summary_row(name, p) for name, p in profilers]
    if len(profilers) > 1:
        stats = [p.get_statistics() for _, p in profilers]
        rows.append([
            "all (merged)", f"{sum(len(p.get_event_rows()) for _, p in profilers):,}",
            format_bytes(sum(s.total_allocated_bytes for s in stats), 1),
            f"{format_bytes(sum(s.peak_usage_bytes for s in stats), 1)} (sum of peaks)",
            format_bytes(sum(s.current_usage_bytes for s in stats), 1),
            f"{sum(s.allocation_count for s in stats):,}",
            f"{sum(s.deallocation_count for s in stats):,}",
            f"{sum(len(p.live_allocations()) for _, p in profilers):,}",
            f"{sum(s.gc_count for s in stats)} / "
            f"{sum(s.total_gc_time.total_seconds() for s in stats) * 1e3:.1f} ms",
            sum(p.anomalies["total"] for _, p in profilers)])
    _print_table(_SUMMARY_HEADERS, rows, out)
    by_type: dict[str, int] = {}
    for _, p in profilers:
        for t, v in p.get_statistics().usage_by_type.items():
            by_type[t] = by_type.get(t, 0) + v
    if by_type:
        print("live at end by type: " + ", ".join(f"{t} {format_bytes(v, 1)}"
                                                  for t, v in sorted(by_type.items())), file=out)


def _trace_label(path: str, prof: Any) -> str:
    rank = (getattr(prof, "trace_metadata", None) or {}).get("rank")
    return f"{path} (rank {rank})" if rank is not None else path


# -- commands ------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    profs = [(_trace_label(p, prof), prof) for p, prof in ((p, _load(p)) for p in args.traces)]
    print_summary(profs)
    return 0


def cmd_leaks(args: argparse.Namespace) -> int:
    prof = _load(args.trace)
    leaks = prof.detect_potential_leaks(min_age_steps=args.min_age_steps)
    total = sum(leak.size_bytes for leak in leaks)
    print(f"{len(leaks):,} allocations live at the end ({format_bytes(total, 1)}), "
          f"at least {args.min_age_steps} steps old; largest first:")
    for leak in leaks[:args.top]:
        print(f"\n{format_bytes(leak.size_bytes, 1)} at 0x{leak.address:x}")
        print(leak.stack_trace.format() if leak.stack_trace else "  (no stack captured)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import FORMATS, ProgressBar

    prof = _load(args.trace)
    bar = ProgressBar(f"export {args.format}", force=args.progress)
    try:
        FORMATS[args.format](prof, args.output, progress=bar)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    finally:
        bar.close()
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = _load(args.trace_a), _load(args.trace_b)
    la, lb = live_bytes_by_site(a), live_bytes_by_site(b)
    rows = []
    for site in set(la) | set(lb):
        (ba, ca), (bb, cb) = la.get(site, (0, 0)), lb.get(site, (0, 0))
        if ba != bb or ca != cb:
            rows.append((bb - ba, site, ba, bb, cb - ca))
    rows.sort(key=lambda r: (-r[0], r[1]))
    sa, sb = a.get_statistics(), b.get_statistics()
    print(f"live at end: {format_bytes(sa.current_usage_bytes, 1)} -> "
          f"{format_bytes(sb.current_usage_bytes, 1)} "
          f"({'+' if sb.current_usage_bytes >= sa.current_usage_bytes else '-'}"
          f"{format_bytes(abs(sb.current_usage_bytes - sa.current_usage_bytes), 1)}); peak "
          f"{format_bytes(sa.peak_usage_bytes, 1)} -> {format_bytes(sb.peak_usage_bytes, 1)}")
    if not rows:
        print("no per-site change in live bytes")
        return 0
    _print_table(["site", "growth", "live in A", "live in B", "count change"],
                 [(site, ("+" if g >= 0 else "-") + format_bytes(abs(g), 1), format_bytes(x, 1),
                   format_bytes(y, 1), f"{dc:+,}") for g, site, x, y, dc in rows[:args.top]],
                 sys.stdout)
    return 0


def _start_profiler(storage: Any, stacks: bool) -> Any:
    """The process-wide profiler (torchmem.enable), writing to ``storage``.

    The CLI prints its own summary, so enable()'s at-exit one is off.
    """
    from .._session import enable

    return enable(storage=storage, capture_stack_traces=stacks, summary=False)


def cmd_run(args: argparse.Namespace) -> int:
    from ..storage import SQLiteStorage

    script = args.script
    if not os.path.isfile(script):
        raise CliError(f"no such script: {script}")
    stem = os.path.splitext(os.path.basename(script))[0]
    output = args.output or f"torchmem-{stem}-{os.getpid()}.db"
    try:
        storage = SQLiteStorage(output, overwrite=args.overwrite)
    except FileExistsError:
        raise CliError(f"{output} exists; use --overwrite or another -o") from None
    except OSError as exc:
        raise CliError(f"cannot create {output}: {exc.strerror or exc}") from None
    profiler = _start_profiler(storage, args.stacks)
    old_argv, old_path0 = sys.argv, sys.path[0] if sys.path else None
    old_main = sys.modules.get("__main__")
    sys.argv = [script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    # The script's module stays referenced until the profiler is closed, so
    # "live at end" is what the script held when it finished, not what
    # happens to survive the module's teardown.
    module = types.ModuleType("__main__")
    module.__file__ = script
    module.__builtins__ = __builtins__
    status = 0
    try:
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec")
        sys.modules["__main__"] = module
        exec(code, module.__dict__)
    except SystemExit as exc:
        code = exc.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException:  # the script's own error: report it, keep the trace
        traceback.print_exc()
        status = 1
    finally:
        sys.argv = old_argv
        if old_main is not None:
            sys.modules["__main__"] = old_main
        if sys.path and sys.path[0] != old_path0:
            sys.path.pop(0)
        from .._session import disable

        disable()
        profiler.close()
    del module
    print(f"\ntorchmem: trace written to {output}", file=sys.stderr)
    print_summary([(output, profiler)], out=sys.stderr)
    if getattr(storage, "write_error", None):
        print(f"torchmem: warning: the trace is incomplete ({storage.write_error})",
              file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchmem", description="Memory profiler for PyTorch training.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a Python script under the profiler, writing a trace")
    r.add_argument("-o", "--output", help="trace file (default torchmem-SCRIPT-PID.db)")
    # Stacks are on by default, as in torchmem.enable(): leaks and reports
    # without an allocation site answer the wrong question.
    r.add_argument("--no-stacks", dest="stacks", action="store_false",
                   help="do not capture the Python stack of each allocation")
    r.add_argument("--overwrite", action="store_true", help="replace an existing trace file")
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("summary", help="totals of one or more traces (e.g. one per rank)")
    s.add_argument("traces", nargs="+", metavar="TRACE")
    s.set_defaults(fn=cmd_summary)
    lk = sub.add_parser("leaks", help="allocations still live at the end of a trace")
    lk.add_argument("trace", metavar="TRACE")
    lk.add_argument("--top", type=int, default=20)
    lk.add_argument("--min-age-steps", type=int, default=0)
    lk.set_defaults(fn=cmd_leaks)
    e = sub.add_parser("export", help="write a trace as memory_viz, perfetto or html")
    e.add_argument("trace", metavar="TRACE")
    e.add_argument("--format", "-f", required=True, choices=["memory_viz", "perfetto", "html"])
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--progress", action="store_true", help="draw the progress bar even when "
                   "stderr is not a terminal")
    e.set_defaults(fn=cmd_export)
    d = sub.add_parser("diff", help="per-site growth of live bytes from TRACE_A to TRACE_B")
    d.add_argument("trace_a", metavar="TRACE_A")
    d.add_argument("trace_b", metavar="TRACE_B")
    d.add_argument("--top", type=int, default=20)
    d.set_defaults(fn=cmd_diff)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchmem`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (TraceFormatError, CliError) as exc:
        print(f"torchmem: error: {exc}", file=sys.stderr)
        return EXIT_BAD_TRACE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
