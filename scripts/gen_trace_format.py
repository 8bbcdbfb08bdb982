"""Writes src/torchmem/_trace_format.py from the native module's trace_format().

The trace format's constants are defined once, in csrc/trace_format.hpp. The
SQLite writer child cannot import the native module (it runs with
``python -I -S``, standard library only), so it reads a generated copy,
checked in beside the package. Run this after changing the header and
rebuilding:

    python scripts/gen_trace_format.py          # rewrite the file
    python scripts/gen_trace_format.py --check  # exit 1 if it is stale

tests/test_trace_format.py runs the check, and torchmem refuses to import
with a stale copy.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import pprint
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parent.parent / "src" / "torchmem" / "_trace_format.py"

HEADER = '''"""The trace format's constants, generated from csrc/trace_format.hpp: do not edit.

Regenerate with ``python scripts/gen_trace_format.py`` after changing the
header (and rebuilding); tests/test_trace_format.py fails, and torchmem
refuses to import, while this copy and the native module disagree. Standard
library only: the SQLite writer child (``python -I -S``) loads it by path.
docs/trace-format.md describes each value.
"""

'''


def render(values: dict[str, Any]) -> str:
    """The module text for ``values`` (the native ``trace_format()``)."""
    body = pprint.pformat(values, width=96, sort_dicts=True)
    return HEADER + "VALUES = " + body + "\n"


def native_values() -> dict[str, Any]:
    """``trace_format()`` of the built extension, loaded without the package
    (whose import checks the very file this script writes)."""
    loaded = sys.modules.get("torchmem._native")
    if loaded is not None:  # a second copy of an extension must not be loaded
        return loaded.trace_format()
    spec = importlib.util.find_spec("torchmem")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchmem is not installed (pip install -e .)")
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("_native*.so")):
            loader = importlib.machinery.ExtensionFileLoader("torchmem._native", str(path))
            module_spec = importlib.util.spec_from_loader("torchmem._native", loader)
            module = importlib.util.module_from_spec(module_spec)
            loader.exec_module(module)
            return module.trace_format()
    raise SystemExit("torchmem's native module is not built (pip install -e .)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render(native_values())
    current = TARGET.read_text() if TARGET.exists() else ""
    if args.check:
        if current != text:
            print(f"{TARGET} is stale: run python scripts/gen_trace_format.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TARGET.write_text(text)
        print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
