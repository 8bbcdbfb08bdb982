"""``torchmem export TRACE --format memory_viz|perfetto|html|tensorboard -o OUT``."""

from __future__ import annotations

import argparse
import sys

from ..export import FORMATS, ProgressBar
from ._common import CliError, add_trace_argument, load_trace


class ExportCommand:
    """write a trace as memory_viz, perfetto, html or tensorboard"""

    name = "export"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_trace_argument(parser)
        parser.add_argument("--format", "-f", required=True, choices=list(FORMATS))
        parser.add_argument("-o", "--output", required=True, help="the file to write "
                            "(tensorboard: a directory of event files)")
        parser.add_argument("--progress", action="store_true", help="draw the progress bar even "
                            "when stderr is not a terminal")

    def run(self, args: argparse.Namespace) -> int:
        prof = load_trace(args.trace)
        bar = ProgressBar(f"export {args.format}", force=args.progress)
        try:
            FORMATS[args.format](prof, args.output, progress=bar)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        except ImportError as exc:  # an optional dependency of the format (tensorboard)
            raise CliError(str(exc)) from None
        finally:
            bar.close()
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
