"""Linear probe against pretraining epoch: a pretraining with `snapshot_every` exports its encoder at the due
epochs (the last one included, equal to the final encoder), a rerun of the finished run still publishes
them, and the probe-curve stage probes each one, its last point equal to a direct probe of the encoder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from support import REPO
from typer.testing import CliRunner

from semanticmim.errors import InputError
from stages import probe_curve
from stages.cli import app

runner = CliRunner()
VARIANT = "maskfeat-semanticmim"  # HOG targets: no tokenizer needed


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curve")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    document = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    document["pretrain"]["snapshot_every"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(document))
    assert runner.invoke(app, ["data", "prepare", "--params", str(root / "params.yaml")]).exit_code == 0
    return root


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pretrained(project) -> Path:
    out = project / "runs" / "pretrain" / VARIANT
    invoke("pretrain", VARIANT, "--params", str(project / "params.yaml"), "--out", str(out), "--quiet")
    return out


def test_snapshots_are_the_due_epochs_and_the_last_is_the_final_encoder(pretrained):
    snapshots = probe_curve.snapshot_epochs(pretrained / "snapshots")
    assert list(snapshots) == [1, 2]  # smoke: 2 epochs, every 1
    last, final = (load_file(str(folder / "model.safetensors")) for folder in (snapshots[2], pretrained / "encoder"))
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in final)
    first = load_file(str(snapshots[1] / "model.safetensors"))
    assert any(not (first[k] == final[k]).all() for k in final)  # epoch 1 is another encoder
    assert json.loads((snapshots[1] / "config.json").read_text()) == json.loads(
        (pretrained / "encoder" / "config.json").read_text())


def test_a_rerun_of_the_finished_run_publishes_the_snapshots_again(project, pretrained):
    shutil.rmtree(pretrained / "snapshots")  # as dvc does with a stage's outputs before rerunning it
    invoke("pretrain", VARIANT, "--params", str(project / "params.yaml"), "--out", str(pretrained), "--quiet")
    assert list(probe_curve.snapshot_epochs(pretrained / "snapshots")) == [1, 2]


def test_the_curve_probes_every_snapshot_and_ends_at_the_encoders_own_probe(project, pretrained):
    params = str(project / "params.yaml")
    out = project / "runs" / "eval" / VARIANT
    invoke("probe-curve", "--snapshots", str(pretrained / "snapshots"), "--params", params, "--out",
           str(out / "probe_curve"), "--quiet")
    with (out / "probe_curve" / "curve.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["top1_cls"]) <= 100 for r in rows)
    metrics = json.loads((out / "probe_curve" / "metrics.json").read_text())
    assert set(metrics) == {"epoch_0001", "epoch_0002"} and set(metrics["epoch_0002"]) == {"top1_cls", "top1_patch"}
    invoke("eval", "linear_cls", "--encoder", str(pretrained / "encoder"), "--params", params, "--out",
           str(out / "linear_cls"), "--quiet")
    direct = json.loads((out / "linear_cls" / "metrics.json").read_text())["cached"]
    assert metrics["epoch_0002"]["top1_cls"] == pytest.approx(direct["top1_cls"], abs=1e-3)
    assert metrics["epoch_0002"]["top1_patch"] == pytest.approx(direct["top1_patch"], abs=1e-3)


def test_no_snapshot_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no snapshots folder"):
        probe_curve.snapshot_epochs(tmp_path / "missing")
    (tmp_path / "snapshots" / "final").mkdir(parents=True)
    with pytest.raises(InputError, match=r"holds no epoch_NNNN snapshot; set pretrain\.snapshot_every"):
        probe_curve.snapshot_epochs(tmp_path / "snapshots")


def test_probe_values_read_either_mode():
    assert probe_curve.probe_values({"cached": {"top1_cls": 1.0, "top1_patch": 2.0}}) == {"top1_cls": 1.0,
                                                                                            "top1_patch": 2.0}
    assert probe_curve.probe_values({"paper": {"top1_cls": 3}}) == {"top1_cls": 3.0}
    assert probe_curve.probe_values({"other": 1}) == {}
