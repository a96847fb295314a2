"""The report stage on hand-written run folders, the raw-pixel floor on a tiny dataset, and the attention
stage's choices: every cell has a value or says why not; links point at the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semanticmim.data.embedded import generate_embedded
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import RunOptions
from semanticmim.errors import InputError
from semanticmim.eval import pixels
from stages.attention import depth_choice
from stages.report import SeedsParams, Sources, load_seeds, metric_value, table_cells


def write_run(folder: Path, metrics: dict, run: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "run.json").write_text(json.dumps(run or {"git_commit": "abc123", "params": {
        "encoder": {"sha256": "f" * 64}}}))


def test_table_cells_read_values_say_why_a_cell_is_empty_and_link_the_run(tmp_path):
    sources = Sources(tmp_path)
    write_run(sources.eval_dir("beit", "linear_cls"), {"cached": {"top1_cls": 20.0, "top1_patch": 30.0}})
    write_run(sources.eval_dir("beit-semanticmim", "linear_cls"), {"cached": {"top1_cls": 25.5, "top1_patch": 28.0}})
    write_run(sources.eval_dir("beit", "linear_seg"), {"miou": 11.0})
    write_run(sources.pixels_dir(), {"top1": 35.0})
    (sources.pretrain_dir("beit")).mkdir(parents=True)
    (sources.pretrain_dir("beit") / "run.json").write_text(json.dumps({"params": {"tokenizer_identity": {
        "kind": "ours: the dvae stage's dVAE", "sha256": "a" * 64}}}))
    cells = {(c.row, c.column): c for c in table_cells(sources, ["linear_cls", "linear_seg"], ["beit",
                                                                                              "beit-semanticmim"])}
    assert cells[("beit", "linear_cls")].value == 20.0 and cells[("beit-semanticmim", "linear_cls")].value == 25.5
    source = cells[("beit", "linear_cls")].source
    assert source["metrics"] == "runs/eval/beit/linear_cls/metrics.json" and source["commit"] == "abc123"
    assert source["tokenizer"].startswith("ours") and source["preset"] == "cached mode"
    assert cells[("beit", "finetune_cls")].value is None
    assert "not in eval.protocols" in cells[("beit", "finetune_cls")].note
    assert "not in eval.encoders" in cells[("mocov3", "linear_cls")].note
    assert "was not written" in cells[("beit-semanticmim", "voc_linear_miou")].note
    assert cells[("raw-pixels", "linear_cls")].value == 35.0 and "n/a" in cells[("raw-pixels", "finetune_cls")].note


def test_cells_of_the_seeded_variants_are_the_mean_and_std_over_every_seed(tmp_path):
    sources = Sources(tmp_path)
    for folder, (cls, patch) in {sources.eval_dir("beit", "linear_cls"): (20.0, 30.0),
                                 sources.seed_eval_dir(1, "beit", "linear_cls"): (22.0, 31.0),
                                 sources.seed_eval_dir(2, "beit", "linear_cls"): (24.0, 29.0),
                                 sources.eval_dir("maskfeat", "linear_cls"): (10.0, 12.0),
                                 sources.seed_eval_dir(1, "maskfeat", "linear_cls"): (14.0, 12.0)}.items():
        write_run(folder, {"cached": {"top1_cls": cls, "top1_patch": patch}})
    seeds = SeedsParams(extra=(1, 2), variants=("beit", "maskfeat"), protocols=("linear_cls",))
    cells = {(c.row, c.column): c for c in table_cells(sources, ["linear_cls"], ["beit", "maskfeat"], seeds)}
    beit = cells[("beit", "linear_cls")]
    assert (beit.value, beit.spread, beit.seeds, beit.note) == (22.0, 2.0, 3, "")
    assert cells[("beit", "linear_patch")].spread == pytest.approx(1.0)
    maskfeat = cells[("maskfeat", "linear_cls")]  # seed 2 not run yet: said, and the spread is over two
    assert (maskfeat.value, maskfeat.seeds, maskfeat.note) == (12.0, 2, "2 of 3 seeds have a result")
    assert maskfeat.spread == pytest.approx(2.8284, abs=1e-4)
    assert cells[("beit", "voc_linear_miou")].seeds == 1  # not a seeded protocol


@pytest.mark.parametrize("seeds, message", [
    ({"extra": [0]}, "seeds.extra: 0 is the main runs' seed"),
    ({"extra": [1, 1]}, "lists a seed twice"),
    ({"variants": ["dino"]}, "are not Table 1 rows"),
    ({"protocols": ["knn"]}, "seeds.protocols"),
])
def test_bad_seeds_fail_in_one_line(tmp_path, seeds, message):
    import yaml

    document = yaml.safe_load((Path(__file__).resolve().parents[1] / "params" / "smoke.yaml").read_text())
    document["seeds"].update(seeds)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(InputError) as error:
        load_seeds(tmp_path / "params.yaml")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_metric_value_prefers_the_top_level_and_names_the_mode():
    assert metric_value({"miou": 3.0}, ("miou",)) == (3.0, "")
    assert metric_value({"paper": {"top1_cls": 5.0}}, ("top1_cls",)) == (5.0, "paper mode")
    assert metric_value({"other": 1}, ("top1_cls",)) == (None, "")


def test_depth_choice_spreads_blocks_to_the_last():
    assert depth_choice(12, 4) == [3, 6, 9, 12] and depth_choice(2, 4) == [1, 2] and depth_choice(6, 1) == [6]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixels")
    generate_embedded(root / "data", image_size=32, train=64, val=32, seed=0, workers=1)
    return root / "data" / "classification"


def test_the_raw_pixel_floor_learns_above_chance_and_writes_numbers_only(tiny_dataset, tmp_path):
    settings = pixels.Settings(img_size=16, epochs=30, batch_size=32, lr=1e-2, lr_batch=32, eval_every=10,
                               num_workers=0, run=RunOptions(log_every=1000, checkpoint_every=1000))
    torch.manual_seed(0)
    results = pixels.evaluate(tiny_dataset, "imagefolder", settings, tmp_path / "out", DistEnv(), quiet=True)
    metrics = results["metrics"]
    assert set(metrics) == {"top1", "best_epoch_top1", "best_epoch"}
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert results["run"]["features"] == 3 * 16 * 16 and results["run"]["classes"] == 10
    # the embedded classes differ in colour and shape: raw pixels beat chance (10 %) clearly
    assert metrics["best_epoch_top1"] > 20.0
