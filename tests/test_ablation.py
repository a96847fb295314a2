"""The ablation sweeps: the `ablation` schema and its checks against the recipes, the report's sweep tables
read from hand-written run files, and the sweep figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from support import PROFILES

from semanticmim.errors import InputError
from semanticmim.report import plot_sweep
from stages import ablation
from stages.report import Sources, sweep_figures, sweep_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_profile_sweeps_valid_points_and_never_the_main_runs(profile):
    params = ablation.load(profile)
    document = yaml.safe_load(profile.read_text())
    main = {"num_proxy": 8, "mask_ratio": 0.6, **document["pretrain"]["variants"][params.base]}
    assert main["num_proxy"] not in params.num_proxy and main["mask_ratio"] not in params.mask_ratio
    assert any(params.points(axis) for axis in ablation.AXES) or profile.name == "mini.yaml"  # mini: none (budget)


def profile_with(tmp_path: Path, **values) -> Path:
    document = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    document["ablation"].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("values, message", [
    ({"num_proxy": [2, 8]}, "ablation.num_proxy: 8 is the main run's value"),
    ({"mask_ratio": [0.6]}, "ablation.mask_ratio: 0.6 is the main run's value"),
    ({"mask_ratio": [0.4, 0.4]}, "lists a point twice"),
    ({"mask_ratio": [1.5]}, "ablation.mask_ratio (point 1.5)"),
    ({"img_mask_ratio": [0.0]}, "ablation.img_mask_ratio (point 0.0)"),
    ({"num_proxy": [0]}, "ablation.num_proxy"),
    ({"base": "mocov3"}, "masks no patches"),
    ({"base": "beit-large"}, "unknown variant 'beit-large'"),
    ({"baseline": "maskfeat2"}, "unknown variant 'maskfeat2'"),
    ({"protocols": ["linear_seg"]}, "ablation.protocols"),
    ({"axes": [1]}, "ablation.axes"),
])
def test_bad_ablation_values_fail_in_one_line_naming_the_key(tmp_path, values, message):
    with pytest.raises(InputError) as error:
        ablation.load(profile_with(tmp_path, **values))
    text = str(error.value)
    assert message in text and "\n" not in text, text


def test_the_cli_refuses_an_unknown_axis_before_training(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["ablation", "pretrain", "depth", "4", "--params", str(REPO / "params.yaml"),
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "axis 'depth': expected one of num_proxy" in result.output
    assert not (tmp_path / "x").exists()


def write_run(folder: Path, metrics: dict | None = None, run: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))


def probe(cls: float, patch: float) -> dict:
    return {"cached": {"top1_cls": cls, "top1_patch": patch}}


@pytest.fixture
def project(tmp_path) -> Path:
    """Hand-written runs: the main beit-semanticmim run (K 8, r 0.6), its baseline, two K points (one not
    evaluated yet) and a mask-ratio point."""
    write_run(tmp_path / "runs/pretrain/beit-semanticmim", run={"params": {"resolved_recipe": {
        "num_proxy": 8, "mask_ratio": 0.6, "img_mask_ratio": None}}})
    write_run(tmp_path / "runs/eval/beit-semanticmim/linear_cls", probe(40.0, 35.0))
    write_run(tmp_path / "runs/eval/beit/linear_cls", probe(30.0, 33.0))
    write_run(tmp_path / "runs/ablation/num_proxy/2/linear_cls", probe(36.0, 34.0))
    write_run(tmp_path / "runs/ablation/num_proxy/16/pretrain", run={})
    write_run(tmp_path / "runs/ablation/mask_ratio/0.4/linear_cls", probe(38.0, 37.5))
    return tmp_path


def test_sweep_rows_put_the_main_run_among_the_points_and_name_a_missing_one(project):
    params = ablation.AblationParams(protocols=("linear_cls",), num_proxy=(2, 16), mask_ratio=(0.4,))
    rows = sweep_rows(Sources(project), params, "num_proxy")
    assert [(r["value"], r["main"]) for r in rows] == [(2, False), (8, True), (16, False)]
    assert rows[1]["linear CLS top-1 (%)"] == 40.0 and rows[0]["linear patch top-1 (%)"] == 34.0
    assert rows[2]["note"] == "missing: no metrics under runs/ablation/num_proxy/16"
    img = sweep_rows(Sources(project), params, "img_mask_ratio")
    assert [(r["value"], r["main"]) for r in img] == [(0.6, True)]  # the main run hides the MASK patches


def test_sweep_figures_write_a_table_and_figure_per_axis_with_points(project):
    params = ablation.AblationParams(protocols=("linear_cls",), num_proxy=(2, 16), mask_ratio=(0.4,))
    out = project / "reports"
    out.mkdir()
    written = dict(sweep_figures(Sources(project), params, out))
    assert set(written) == {"fig5_num_proxy.png", "fig6_mask_ratio.png"}  # no img_mask_ratio points listed
    table = (out / "ablation_mask_ratio.csv").read_text().splitlines()
    assert table[0] == "value,main,linear CLS top-1 (%),linear patch top-1 (%),note"
    assert table[1:] == ["0.40,False,38.00,37.50,", "0.60,True,40.00,35.00,"]
    assert (out / "fig5_num_proxy.png").read_bytes()[:4] == b"\x89PNG"


def test_no_sweep_point_evaluated_yet_draws_no_figure(project):
    shutil.rmtree(project / "runs/eval/beit-semanticmim")
    params = ablation.AblationParams(protocols=("linear_cls",), num_proxy=(16,))
    out = project / "reports"
    out.mkdir()
    assert sweep_figures(Sources(project), params, out) == []
    assert "missing" in (out / "ablation_num_proxy.csv").read_text()


def test_plot_sweep_draws_and_refuses_an_empty_sweep(tmp_path):
    path = plot_sweep("K", {"top-1": [(1, 10.0), (8, 30.0), (2, 20.0)]}, tmp_path / "f.png", reference={"top-1": 15},
                      main=8, optimum=8)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="no sweep point has a metric"):
        plot_sweep("K", {"top-1": []}, tmp_path / "g.png")
