"""semanticmim.report is library code: it never imports the app layer (stages, CLI, params/config), not even
through the library modules it uses."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "semanticmim" / "report"
ALLOWED_PROJECT = ("semanticmim.report", "semanticmim.models", "semanticmim.eval", "semanticmim.data",
                   "semanticmim.errors")
ALLOWED_THIRD_PARTY = {"torch", "timm", "numpy", "pandas", "matplotlib", "__future__"}
# semanticmim.settings is the params schema's new name (semanticmim.schema before the restructuring)
APP = ("stages", "semanticmim.cli", "semanticmim.config", "semanticmim.schema", "semanticmim.settings")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved; `from a import b` also
    counts a.b, which may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def source_of(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_report_imports_only_the_library_layers_it_may():
    files = sorted(REPORT.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "attention.py", "table1.py", "figures.py"}
    for path in files:
        for name in imports(path):
            top = name.split(".")[0]
            if top in ("semanticmim", "stages"):
                assert name.startswith(ALLOWED_PROJECT), f"{path.name} imports {name}"
            else:
                assert top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def reachable(start: list[str]) -> dict[str, str]:
    """Every project module imported, directly or not, from `start` -> the module that imported it."""
    seen: dict[str, str] = {}
    todo = [(name, "") for name in start]
    while todo:
        name, parent = todo.pop()
        if name in seen:
            continue
        seen[name] = parent
        path = source_of(name)
        if path is not None:
            todo += [(n, name) for n in imports(path) if n.split(".")[0] in ("semanticmim", "stages")]
    return {name: parent for name, parent in seen.items() if source_of(name) is not None}


def test_nothing_the_report_imports_reaches_the_app_layer():
    seen = reachable([module_name(p) for p in REPORT.glob("*.py")])
    assert "semanticmim.errors" in seen
    reached = sorted(n for n in seen if n.startswith(APP))
    assert not reached, [f"{n} (via {seen[n]})" for n in reached]
    assert "semanticmim.models.vit" in reachable(["semanticmim.models"])  # the walk follows packages
