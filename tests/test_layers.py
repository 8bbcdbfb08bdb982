"""The layers of docs/architecture.md: import-linter's contracts hold, a back edge breaks
them, and what import-linter cannot see (the C++ extension, private recorder
methods, module length) is checked here."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import importlinter  # noqa: F401  (in the test extra: the layers are part of the suite)

from torchmem import _native

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "torchmem"

#: Modules above the sources: they read the recorder through MemoryProfiler only.
ABOVE_SOURCES = ("analysis", "storage", "publisher", "export", "reports", "epoch", "oom",
                 "summary", "distributed", "_oom_hooks", "_compat", "cli", "pytest_plugin",
                 "integrations")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(["torchmem", *parts]), path))
    return out


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, *(["-S"] if env else []), "-c", code, "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_lint_imports_keeps_every_contract():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


def test_a_back_edge_breaks_the_layers(tmp_path):
    # A copy of the package where the profiler imports analysis: lint-imports
    # must fail (run without site, so the copy, not the installed package, is read).
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "torchmem", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(copy / "torchmem" / "profiler.py", "a") as f:
        f.write("\nfrom .analysis import sites  # a back edge\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    site = sysconfig.get_paths()["purelib"]
    r = _lint(tmp_path, env={"PYTHONPATH": os.pathsep.join([str(copy), site]),
                             "PATH": os.environ.get("PATH", "")})
    assert r.returncode != 0, r.stdout + r.stderr
    assert "torchmem.profiler -> torchmem.analysis.sites" in r.stdout
    assert "BROKEN" in r.stdout


def test_only_the_profiler_calls_private_recorder_methods():
    private = {n for n in dir(_native.Recorder) if n.startswith("_") and not n.startswith("__")}
    assert {"_counters", "_read_events", "_live", "_write_event_columns"} <= private
    found = []
    for name, path in _modules():
        if name == "torchmem.profiler":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # self._x is the module's own attribute; anything else._x of a
            # recorder name is a read of the recorder past the profiler.
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{name}:{node.lineno} .{node.attr}")
    assert found == []


def test_nothing_above_the_sources_imports_the_extension():
    found = []
    for name, path in _modules():
        if (name.split(".") + [""])[1] not in ABOVE_SOURCES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.split(".")[-1] in ("_native", "_recorder") for n in names):
                found.append(f"{name}:{node.lineno}")
    assert found == []


def test_no_module_over_400_lines_without_a_reason_at_its_top():
    long = []
    for name, path in _modules():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 400 and "400 lines" not in doc:
            long.append(f"{name}: {lines} lines")
    assert long == []


def test_no_native_source_over_400_lines_without_a_reason_at_its_top():
    # The C++ sources' "docstring": the comment lines before the first code line.
    long = []
    for path in sorted([*(ROOT / "csrc").glob("*.[ch]pp"), *(PACKAGE / "_hook").glob("*.cpp")]):
        text = path.read_text()
        top = []
        for line in text.splitlines():
            if not line.startswith("//"):
                break
            top.append(line)
        if text.count("\n") > 400 and "400 lines" not in " ".join(top):
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert long == []


def test_the_console_script_entry_point_is_the_cli_package():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["torchmem"] == "torchmem.cli:main"
    assert "import-linter" in " ".join(meta["project"]["optional-dependencies"]["test"])
    verbs = sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if not p.stem.startswith("_"))
    assert verbs == ["diff", "export", "leaks", "live", "run", "summary"]
    from torchmem.cli import COMMANDS

    assert sorted(c.name for c in COMMANDS) == verbs


def test_ci_runs_lint_imports_before_pytest():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "lint-imports" in ci and ci.index("lint-imports") < ci.index("python -m pytest")
