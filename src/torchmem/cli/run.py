"""``torchmem run [-o TRACE] [--no-stacks] [--live] SCRIPT [ARGS...]``: a script under the profiler."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types

from .._session import disable, enable
from ..storage import SQLiteStorage, TraceLockedError
from ._common import EXIT_INTERRUPTED, CliError, print_summary


class RunCommand:
    """run a Python script under the profiler, writing a trace"""

    name = "run"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", help="trace file (default torchmem-SCRIPT-PID.db)")
        # Stacks are on by default, as in torchmem.enable(): leaks and reports
        # without an allocation site answer the wrong question.
        parser.add_argument("--no-stacks", dest="stacks", action="store_false",
                            help="do not capture the Python stack of each allocation")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing trace file")
        parser.add_argument("--live", action="store_true", help="show the live view while the "
                            "script runs (its output goes to a .log beside the trace)")
        parser.add_argument("script")
        parser.add_argument("args", nargs=argparse.REMAINDER)

    def run(self, args: argparse.Namespace) -> int:
        script = args.script
        if not os.path.isfile(script):
            raise CliError(f"no such script: {script}")
        stem = os.path.splitext(os.path.basename(script))[0]
        output = args.output or f"torchmem-{stem}-{os.getpid()}.db"
        if args.live:
            from .live import run_live

            return run_live(args, output)
        try:
            storage = SQLiteStorage(output, overwrite=args.overwrite)
        except TraceLockedError as exc:
            raise CliError(str(exc)) from None
        except FileExistsError:
            raise CliError(f"{output} exists; use --overwrite or another -o") from None
        except OSError as exc:
            raise CliError(f"cannot create {output}: {exc.strerror or exc}") from None
        # The CLI prints its own summary, so enable()'s at-exit one is off.
        profiler = enable(storage=storage, capture_stack_traces=args.stacks, summary=False)
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
        interrupted = False
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
        except KeyboardInterrupt:
            # Ctrl-C: the traceback Python prints, the trace closed and summarised,
            # then the status a shell gives a process killed by SIGINT (130).
            traceback.print_exc()
            interrupted = True
        except BaseException:  # the script's own error: report it, keep the trace
            traceback.print_exc()
            status = 1
        finally:
            sys.argv = old_argv
            if old_main is not None:
                sys.modules["__main__"] = old_main
            if sys.path and sys.path[0] != old_path0:
                sys.path.pop(0)
            disable()
            profiler.close()
        del module
        print(f"\ntorchmem: trace written to {output}", file=sys.stderr)
        print_summary([(output, profiler)], out=sys.stderr)
        if getattr(storage, "write_error", None):
            print(f"torchmem: warning: the trace is incomplete ({storage.write_error})",
                  file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else status
