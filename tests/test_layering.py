"""The architecture as a test: imports point one way, library <- stages <- CLI / dvc.yaml.

Every `import` and `from ... import` in every module (inside functions too) is read with `ast`. The
library (`semanticmim`) never imports the app layer (`stages`: the stages, the params schema, the CLI,
the benchmarks); the engine trains any `Task` and knows no model or target; models, targets and data know
no training, method or evaluation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package (dotted prefix) -> the top-level names or packages it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "semanticmim": ("stages",),
    "semanticmim.engine": ("semanticmim.models", "semanticmim.targets", "semanticmim.methods", "semanticmim.eval",
                           "semanticmim.report"),
    "semanticmim.models": ("semanticmim.engine", "semanticmim.methods", "semanticmim.eval", "semanticmim.report"),
    "semanticmim.targets": ("semanticmim.engine", "semanticmim.methods", "semanticmim.eval", "semanticmim.report"),
    "semanticmim.data": ("semanticmim.engine", "semanticmim.methods", "semanticmim.eval", "semanticmim.report",
                         "semanticmim.models"),
    "semanticmim.eval": ("semanticmim.methods", "semanticmim.report"),
    "semanticmim.report": ("semanticmim.methods",),  # reads exported timm encoders and records, not our models
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` imports, absolute, including relative imports and imports inside functions."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def violations(root: Path, forbidden: dict[str, tuple[str, ...]]) -> list[str]:
    """`file: module imports X` for every import that crosses a forbidden arrow under `root`."""
    found = []
    for path in sorted(p for folder in ("semanticmim", "stages") for p in (root / folder).rglob("*.py")):
        module = module_name(path, root)
        rules = [banned for prefix, banned in forbidden.items() if module == prefix or module.startswith(prefix + ".")]
        for name in sorted(imported_names(path, module)):
            for banned in (b for rule in rules for b in rule):
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(root)}: {module} imports {name}")
    return found


def test_the_library_never_imports_the_app_layer_and_the_engine_knows_no_model():
    assert violations(REPO, FORBIDDEN) == []


def test_the_checker_catches_a_back_arrow(tmp_path):
    """A deliberately bad fixture: each forbidden arrow, written the ways code writes imports."""
    bad = {
        "semanticmim/eval/probe.py": "def f():\n    from stages.params import load_section\n",
        "semanticmim/engine/loop.py": "from ..models.vit import ProxyViT\n",
        "semanticmim/engine/__init__.py": "import semanticmim.targets.hog\n",
        "semanticmim/data/x.py": "from semanticmim import models\n",
        "semanticmim/report/table.py": "import stages.cli as cli\n",
        "semanticmim/models/ok.py": "from semanticmim.errors import InputError\n",
    }
    for relative, source in bad.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    found = violations(tmp_path, FORBIDDEN)
    assert found == [
        "semanticmim/data/x.py: semanticmim.data.x imports semanticmim.models",
        "semanticmim/engine/__init__.py: semanticmim.engine imports semanticmim.targets.hog",
        "semanticmim/engine/loop.py: semanticmim.engine.loop imports semanticmim.models.vit",
        "semanticmim/engine/loop.py: semanticmim.engine.loop imports semanticmim.models.vit.ProxyViT",
        "semanticmim/eval/probe.py: semanticmim.eval.probe imports stages.params",
        "semanticmim/eval/probe.py: semanticmim.eval.probe imports stages.params.load_section",
        "semanticmim/report/table.py: semanticmim.report.table imports stages.cli",
    ]


def test_the_library_imports_without_the_app_layer(tmp_path):
    """`semanticmim` alone, with `stages` unimportable, still imports and builds a variant."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("raise ImportError('the app layer is absent')\n")
    code = ("import semanticmim.eval.linear, semanticmim.eval.segmentation.upernet, semanticmim.report\n"
            "from semanticmim.methods import build_variant\nfrom semanticmim.models import EncoderConfig\n"
            "build_variant('maskfeat-semanticmim', EncoderConfig(img_size=16, patch_size=8, embed_dim=16, depth=1,"
            " num_heads=2))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
