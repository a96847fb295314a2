"""The DVC pipeline end to end on the smoke profile: `dvc repro` in a fresh git+dvc repo builds every
stage, a second `dvc repro` does nothing, and a params change reruns only what depends on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.fail("dvc is not installed in this environment (it is a project dependency)")
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("semanticmim", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params" / "smoke.yaml", root / "params.yaml")
    run(["git", "init", "-q"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "smoke project"], root)
    return root


def test_dvc_repro_builds_every_stage_then_is_up_to_date(project):
    out = run([str(BIN / "dvc"), "repro"], project)
    for stage in ("prepare", "dvae", "pretrain-beit@beit", "pretrain-maskfeat@maskfeat-semanticmim", "pretrain-mocov3",
                  "eval-linear-cls@beit-semanticmim", "eval-linear-seg@mocov3"):
        assert f"Running stage '{stage}'" in out
    probe = json.loads((project / "runs" / "eval" / "maskfeat" / "linear-cls" / "metrics.json").read_text())
    assert 0 <= probe["top1_cls"] <= 100 and 0 <= probe["top1_patch"] <= 100 and probe["protocol"] == "linear-cls"
    segmentation = json.loads((project / "runs" / "eval" / "beit" / "linear-seg" / "metrics.json").read_text())
    assert 0 <= segmentation["miou"] <= 100
    for variant in ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3"):
        metrics = json.loads((project / "runs" / "pretrain" / variant / "metrics.json").read_text())
        assert metrics["steps"] == 8 and metrics["final_loss"] > 0
        assert (project / "runs" / "pretrain" / variant / "encoder" / "config.json").is_file()
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], project))
    assert any("runs/pretrain/maskfeat/metrics.json" in json.dumps(rev) for rev in shown.values())
    again = run([str(BIN / "dvc"), "repro"], project)
    assert "Running stage" not in again


def test_a_params_change_reruns_only_its_stages(project):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("lr: 2.0e-3", "lr: 1.0e-3"))  # the dvae section's lr
    out = run([str(BIN / "dvc"), "repro"], project)
    assert "Running stage 'dvae'" in out and "Running stage 'pretrain-beit@beit'" in out
    assert "Running stage 'eval-linear-cls@beit'" in out  # its encoder changed
    assert "Running stage 'pretrain-maskfeat@maskfeat'" not in out and "Running stage 'prepare'" not in out
    assert "Running stage 'eval-linear-seg@maskfeat'" not in out
