"""dvc.yaml against the code: every module a stage runs is inside that stage's `deps`, and every params
key a stage tracks exists in every profile (DVC refuses a missing key)."""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support import PROFILES

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"data prepare": "stages/prepare.py", "targets train-dvae": "stages/dvae.py",
         "ablation pretrain": "stages/pretrain.py", "pretrain": "stages/pretrain.py", "eval": "stages/evaluate.py",
         "attention": "stages/attention.py", "probe-curve": "stages/probe_curve.py",
         "floor ": "stages/floors.py", "report": "stages/report.py"}
# the CLI's own module-level imports run for every command: stages/cli.py and what it imports at the top


def module_path(name: str) -> Path | None:
    """The project file a dotted module name refers to (package `__init__` or module), if any."""
    for candidate in (REPO / Path(*name.split(".")) / "__init__.py", REPO / f"{Path(*name.split('.'))}.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def closure(start: list[Path]) -> set[Path]:
    """Every project file reachable from `start` through imports (inside functions too), with the
    `__init__` of every package on the way (Python runs them)."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = module_path(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stages() -> dict[str, dict]:
    """Stage name -> its definition, with `${item}` forms left in (the code deps never use them)."""
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def definition(stage: dict) -> dict:
    return stage.get("do", stage)


def entry_file(cmd: str) -> Path:
    command = cmd.split("semanticmim ", 1)[1]
    for prefix, path in ENTRY.items():
        if command.startswith(prefix):
            return REPO / path
    raise AssertionError(f"no entry module known for {cmd!r}")


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


CLI_TOP = [REPO / "stages" / "cli.py"]


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_in_its_deps(name):
    stage = definition(stages()[name])
    deps = [dep for dep in stage["deps"] if "${" not in dep and not dep.startswith("runs/")]
    cli_imports = {module_path(n) for n in imports_of(CLI_TOP[0], top_level_only=True)} - {None}
    files = closure([entry_file(stage["cmd"]), *cli_imports]) | set(CLI_TOP)
    files = {f for f in files if f.name != "__init__.py" or f.stat().st_size > 0}
    missing = sorted(f.relative_to(REPO).as_posix() for f in files if not covered(f, deps))
    assert not missing, f"{name}: runs {missing} but its deps do not list them"


def lookup(document: dict, dotted: str):
    value = document
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, dotted
        value = value[part]
    return value


def interpolate(text: str, document: dict, item: dict) -> str:
    """`${item.x}` from `item`, any other `${a.b}` from the params document (as DVC does)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        return str(item[name.removeprefix("item.")] if name.startswith("item") else lookup(document, name))
    return re.sub(r"\$\{([^}]+)\}", value, text.replace("${item}", "${item.value}"))


def items_of(stage: dict, document: dict) -> list[dict]:
    """Every item of a foreach / matrix stage (`{"value": x}` for foreach), `[{}]` for a plain one."""
    if "foreach" in stage:
        values = stage["foreach"]
        values = lookup(document, values[2:-1]) if isinstance(values, str) else values
        return [{"value": value} for value in values]
    if "matrix" in stage:
        axes = {axis: lookup(document, values[2:-1]) if isinstance(values, str) else values
                for axis, values in stage["matrix"].items()}
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    return [{}]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_tracked_params_key_exists_in_every_profile(profile):
    document = yaml.safe_load(profile.read_text())
    for name, stage in stages().items():
        for item in items_of(stage, document):
            for key in definition(stage).get("params", []):
                resolved = interpolate(key, document, item)
                try:
                    lookup(document, resolved)
                except AssertionError:
                    pytest.fail(f"{profile.name}: {name} tracks {resolved}, which the profile lacks")
    assert set(document["pretrain"].get("variants", {})) >= {"beit", "beit-semanticmim", "maskfeat",
                                                              "maskfeat-semanticmim", "mocov3"}


def test_the_evaluation_matrix_reads_its_axes_from_params():
    matrix = definition(stages()["eval"])["matrix"]
    assert matrix == {"encoder": "${eval.encoders}", "protocol": "${eval.protocols}"}
    assert re.search(r"--out runs/eval/\$\{item.encoder\}/\$\{item.protocol\}", definition(stages()["eval"])["cmd"])


def paths_of(entries: list) -> list[str]:
    """dvc.yaml `outs`/`metrics`/`plots` entries: a path, or {path: options}."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries or []]


def tracked(path: str) -> bool:
    return bool(subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip())


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_data_dependency_is_made_by_a_stage_or_committed(profile):
    """DVC refuses a missing dependency only when it reaches the stage: in the mini profile (no sweep points)
    the report's `runs/ablation` used to fail after an hour of other stages."""
    document = yaml.safe_load(profile.read_text())
    resolved = [(name, {key: [interpolate(str(path), document, item) for path in paths]
                        for key, paths in (("deps", definition(stage).get("deps", [])),
                                           ("outs", [*paths_of(definition(stage).get("outs")),
                                                     *paths_of(definition(stage).get("metrics")),
                                                     *paths_of(definition(stage).get("plots"))]))})
                for name, stage in stages().items() for item in items_of(stage, document)]
    outs = [out.rstrip("/") for _, stage in resolved for out in stage["outs"]]
    for name, stage in resolved:
        for dep in (dep.rstrip("/") for dep in stage["deps"] if dep.startswith(("runs/", "data/"))):
            made = any(dep == out or out.startswith(dep + "/") or dep.startswith(out + "/") for out in outs)
            assert made or tracked(dep), f"{profile.name}: {name} depends on {dep}, which no stage makes"
