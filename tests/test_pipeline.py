"""The DVC pipeline end to end on the smoke profile: `dvc repro` in a fresh git+dvc repo builds every
stage, a second `dvc repro` does nothing, a params change reruns only what depends on it, and `dvc exp run
-S` works in the workspace, in a temporary workspace and from the queue."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3")


def run(args: list[str], cwd: Path, check: bool = True) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc(*args: str, cwd: Path, check: bool = True) -> str:
    return run([str(BIN / "dvc"), *args], cwd, check)


def make_project(root: Path) -> Path:
    for name in ("semanticmim", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params" / "smoke.yaml", root / "params.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    run(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "smoke project"], root)
    return root


def set_param(project: Path, path: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    section = params
    *parents, last = path.split(".")
    for parent in parents:
        section = section[parent]
    section[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.fail("dvc is not installed in this environment (it is a project dependency)")
    root = make_project(tmp_path_factory.mktemp("pipeline"))
    dvc("repro", cwd=root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "reproduced"], root)
    return root


def test_dvc_repro_builds_every_stage_then_is_up_to_date(project):
    probe = json.loads((project / "runs" / "eval" / "maskfeat" / "linear_cls" / "metrics.json").read_text())
    assert 0 <= probe["cached"]["top1_cls"] <= 100 and 0 <= probe["cached"]["top1_patch"] <= 100
    assert all(isinstance(v, int | float | dict) for v in probe.values())  # numbers only
    info = json.loads((project / "runs" / "eval" / "maskfeat" / "linear_cls" / "run.json").read_text())
    assert info["stage"] == "eval linear-cls" and info["versions"]["torch"] and "git_commit" in info
    segmentation = json.loads((project / "runs" / "eval" / "beit" / "linear_seg" / "metrics.json").read_text())
    assert 0 <= segmentation["miou"] <= 100
    for variant in VARIANTS:
        metrics = json.loads((project / "runs" / "pretrain" / variant / "metrics.json").read_text())
        assert metrics["steps"] == 8 and metrics["final_loss"] > 0
        assert (project / "runs" / "pretrain" / variant / "encoder" / "config.json").is_file()
        for protocol in ("linear_cls", "linear_seg"):
            assert (project / "runs" / "eval" / variant / protocol / "metrics.json").is_file()
    shown = dvc("metrics", "show", "--json", cwd=project)
    assert "runs/pretrain/maskfeat/metrics.json" in shown
    assert "Running stage" not in dvc("repro", cwd=project)


def test_the_report_is_complete_and_well_formed(project):
    reports = project / "reports"
    page = (reports / "README.md").read_text()
    figures = sorted(path.name for path in reports.glob("*.png"))
    assert {"fig7_patch_queries.png", "fig8_proxy_queries.png", "fig9_proxy_heatmaps.png", "fig10_depth.png",
            "fig14_attention_distance.png", "consistency_completeness.png", "pretraining_loss.png",
            "fig_probe_vs_epoch.png"} <= set(figures)
    for name in figures:
        assert (reports / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in page
    with (reports / "table1.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"row", "column", "value", "paper", "delta", "direction_ok", "note"} <= set(rows[0])
    values = {(r["row"], r["column"]): r for r in rows}
    for row in ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3", "random-init"):
        for column in ("linear_cls", "linear_patch", "voc_linear_miou"):
            assert values[(row, column)]["value"] != "", (row, column, values[(row, column)]["note"])
        assert "not run at this profile" in values[(row, "finetune_cls")]["note"]  # said, never silently empty
    assert values[("raw-pixels", "linear_cls")]["value"] != ""
    for row in ("beit", "beit-semanticmim"):  # the smoke profile's second seed: mean ± std over two
        assert values[(row, "linear_cls")]["seeds"] == "2" and values[(row, "linear_cls")]["spread"] != ""
    assert values[("maskfeat", "linear_cls")]["seeds"] == "1"
    assert values[("beit-semanticmim", "linear_cls")]["beyond_spread"] in ("True", "False")
    assert values[("beit-semanticmim", "linear_cls")]["delta"] != ""
    assert "\\begin{tabular}" in (reports / "table1.tex").read_text()
    with (reports / "consistency_completeness.csv").open() as handle:
        scores = {r["variant"]: r for r in csv.DictReader(handle)}
    assert {"mocov3", "beit", "beit-semanticmim", "random-init"} <= set(scores)
    assert 0 <= float(scores["random-init"]["coverage"]) <= 1


def test_the_probe_curve_ends_at_the_main_evaluation(project):
    with (project / "runs/eval/beit-semanticmim/probe_curve/curve.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # smoke: 2 epochs, a snapshot after each
    main = json.loads((project / "runs/eval/beit-semanticmim/linear_cls/metrics.json").read_text())["cached"]
    assert float(rows[-1]["top1_cls"]) == pytest.approx(main["top1_cls"], abs=1e-3)


def test_one_variants_change_leaves_the_other_variants_up_to_date(project):
    set_param(project, "pretrain.variants.beit-semanticmim", {"num_proxy": 4})
    status = dvc("status", "--json", cwd=project)
    changed = set(json.loads(status))
    # its evaluations follow once it reruns; the ablation points are beit-semanticmim with one value changed
    assert changed == {"pretrain-beit@beit-semanticmim", "ablation-num-proxy@2", "ablation-mask-ratio@0.4",
                       "ablation-img-mask-ratio@0.4", "pretrain-seed@beit-semanticmim-1"}, changed
    run(["git", "checkout", "--", "params.yaml"], project)


def test_a_new_sweep_point_reruns_only_that_point_and_the_report(project):
    set_param(project, "ablation.num_proxy", [2, 4])
    changed = set(json.loads(dvc("status", "--json", cwd=project)))
    assert changed == {"ablation-num-proxy@4", "ablation-eval-num-proxy@4-linear_cls", "report"}, changed
    run(["git", "checkout", "--", "params.yaml"], project)


def test_each_sweep_is_drawn_with_the_main_run_as_one_of_its_points(project):
    reports = project / "reports"
    page = (reports / "README.md").read_text()
    for axis, figure, main in (("num_proxy", "fig5_num_proxy.png", 8), ("mask_ratio", "fig6_mask_ratio.png", 0.6),
                               ("img_mask_ratio", "fig_img_mask_ratio.png", 0.6)):
        assert (reports / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({figure})" in page
        with (reports / f"ablation_{axis}.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert [float(r["value"]) for r in rows] == sorted([main, {"num_proxy": 2}.get(axis, 0.4)])
        assert [r["main"] for r in rows if float(r["value"]) == main] == ["True"]
        for row in rows:
            assert 0 <= float(row["linear CLS top-1 (%)"]) <= 100 and row["note"] == "", row
    point = json.loads((project / "runs/ablation/num_proxy/2/pretrain/run.json").read_text())["params"]
    assert point["resolved_recipe"]["num_proxy"] == 2 and point["resolved_recipe"]["mask_ratio"] == 0.6
    main_cls = json.loads((project / "runs/eval/beit-semanticmim/linear_cls/metrics.json").read_text())
    main_row = next(r for r in csv.DictReader((reports / "ablation_num_proxy.csv").open()) if r["main"] == "True")
    assert float(main_row["linear CLS top-1 (%)"]) == pytest.approx(main_cls["cached"]["top1_cls"], abs=0.01)


def restore(project: Path) -> None:
    """Back to the committed results without recomputing them: params and the uncached outputs from git,
    the cached ones from DVC's cache."""
    run(["git", "checkout", "--", "."], project)
    dvc("checkout", "--force", cwd=project)
    out = dvc("repro", cwd=project)  # the report reads whole run folders, whose checkpoints moved on
    assert "Running stage 'pretrain" not in out and "Running stage 'eval" not in out
    assert "Running stage" not in dvc("repro", cwd=project)


def test_a_params_change_reruns_only_its_stages(project):
    set_param(project, "eval.linear_seg.epochs", 2)
    out = dvc("repro", cwd=project)
    assert "Running stage 'eval@maskfeat-linear_seg'" in out and "Running stage 'eval@beit-linear_seg'" in out
    assert "Running stage 'report'" in out and "Running stage 'attention" not in out
    assert "Running stage 'eval@maskfeat-linear_cls'" not in out and "Running stage 'pretrain" not in out
    restore(project)
    set_param(project, "pretrain.variants.maskfeat", {"mask_ratio": 0.5})
    out = dvc("repro", cwd=project)
    assert "Running stage 'pretrain-maskfeat@maskfeat'" in out and "Running stage 'eval@maskfeat-linear_cls'" in out
    assert "Running stage 'report'" in out and "Running stage 'dvae'" not in out
    assert "Running stage 'pretrain-maskfeat@maskfeat-semanticmim'" not in out
    assert "Running stage 'pretrain-beit" not in out
    assert "Running stage 'eval@beit-linear_cls'" not in out and "Running stage 'ablation" not in out
    restore(project)  # every output is back, none is missing, and nothing reruns


@pytest.mark.parametrize("mode", ["workspace", "temp", "queue"])
def test_dvc_exp_run_with_a_changed_param(project, mode):
    """`dvc exp run -S` as the README shows it, in each mode; `dvc exp show` lists the changed metric."""
    name = f"k-{mode}"
    args = ["exp", "run", "-n", name, "-S", "pretrain.variants.maskfeat-semanticmim.num_proxy=2"]
    if mode == "temp":
        args.append("--temp")
    if mode == "queue":
        args.append("--queue")
    out = dvc(*args, cwd=project)
    if mode == "queue":
        out = dvc("queue", "start", cwd=project) + dvc("queue", "logs", name, cwd=project, check=False)
        waited = dvc("exp", "show", "--json", cwd=project)
        for _ in range(120):  # the queue's worker runs in the background
            if f'"{name}"' in waited and "Running" not in dvc("queue", "status", cwd=project):
                break
            subprocess.run(["sleep", "5"], check=True)
            waited = dvc("exp", "show", "--json", cwd=project)
    assert "pretrain-beit@beit'" not in out.replace("'pretrain-beit@beit' didn't change", "")
    shown = json.loads(dvc("exp", "show", "--json", cwd=project))
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    ours = [exp for exp in experiments if exp.get("name") == name]
    assert ours, f"experiment {name} not listed"
    revision = ours[0]["revs"][0]["data"]
    params = revision["params"]["params.yaml"]["data"]["pretrain"]["variants"]["maskfeat-semanticmim"]
    assert params["num_proxy"] == 2
    metrics = revision["metrics"]["runs/eval/maskfeat-semanticmim/linear_cls/metrics.json"]["data"]
    assert 0 <= metrics["cached"]["top1_cls"] <= 100
    dvc("exp", "remove", name, cwd=project, check=False)
    run(["git", "checkout", "--", "."], project)
    dvc("repro", cwd=project)  # a plain repro with the original params after the experiment: it succeeds,
    assert "Running stage" not in dvc("repro", cwd=project)  # and leaves everything up to date
