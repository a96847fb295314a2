"""`semanticmim bench`: one record per variant, measured in one run, with the ratios it promises."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stages.cli import app

runner = CliRunner()


def test_bench_json_records_measure_every_variant():
    result = runner.invoke(app, ["bench", "--preset", "tiny", "--batch-size", "4", "--steps", "1", "--rounds", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    records = {r["variant"]: r for r in json.loads(result.output)}
    assert set(records) == {"beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3", "timm-vit"}
    for record in records.values():
        seconds = record["step_ms"] / 1e3
        assert seconds > 0 and record["flops_per_step"] > 0 and record["peak_flops"] > 0
        assert abs(record["img_per_s"] - 4 / seconds) < 0.01 * record["img_per_s"] + 0.01
        assert abs(record["achieved_flops"] * seconds / record["flops_per_step"] - 1) < 0.01
        assert record["mfu"] == round(record["achieved_flops"] / record["peak_flops"], 4)
    # MoCo v3 runs two views through two encoders: it must count more work than the one-view baseline.
    assert records["mocov3"]["flops_per_step"] > records["maskfeat"]["flops_per_step"]
    # The 8192-way BEiT head costs more than MaskFeat's 48-d HOG head on the same tokens.
    assert records["beit"]["flops_per_step"] > records["maskfeat"]["flops_per_step"]
    assert records["timm-vit"]["img_per_s_vs_timm"] == 1.0
    assert "step_vs_baseline" in records["beit-semanticmim"] and "step_vs_baseline" in records["maskfeat-semanticmim"]


def test_bench_bad_arguments():
    for args, message in ((["--preset", "huge"], "preset must be one of"),
                          (["--device", "tpu"], "device must be 'cpu' or 'cuda'"),
                          (["--variant", "mae"], "unknown variants ['mae']")):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_bench_loop_reports_where_step_time_goes(tmp_path):
    from semanticmim.data.embedded import generate_embedded

    generate_embedded(tmp_path / "data", image_size=32, train=64, val=16, workers=1)
    params = tmp_path / "params.yaml"
    params.write_text(
        "pretrain:\n"
        "  model: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}\n"
        f"  data: {{root: {tmp_path / 'data' / 'classification'}, num_workers: 0}}\n"
        "  recipe: {epochs: 7, batch_size: 16, lr_batch: 16, mlp_dim: 32, out_dim: 16}\n"
        "  variants: {mocov3: {epochs: 3}}\n")
    result = runner.invoke(app, ["bench", "--loop", "--params", str(params), "--variant", "maskfeat",
                                 "--variant", "mocov3", "--json"])
    assert result.exit_code == 0, result.output
    records = {r["variant"]: r for r in json.loads(result.output[result.output.index("["):])}
    assert set(records) == {"maskfeat", "mocov3"}
    for record in records.values():
        assert record["steps"] == 4  # one epoch of 64 images at batch 16, whatever the params' epochs
        shares = record["time_share"]
        assert set(shares) == {"data", "targets", "forward_backward", "optimizer", "other"}
        assert abs(sum(shares.values()) - 1) < 0.01 and min(shares.values()) >= 0
    assert records["maskfeat"]["time_share"]["targets"] > 0  # HOG is computed and timed
    assert records["mocov3"]["time_share"]["targets"] == 0


def test_bench_data_measures_every_pipeline(tmp_path):
    from semanticmim.data.embedded import generate_embedded

    generate_embedded(tmp_path / "data", image_size=32, train=16, val=8, workers=1)
    result = runner.invoke(app, ["bench", "--data", str(tmp_path / "data" / "classification"), "--img-size", "32",
                                 "--seconds", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert {r["pipeline"] for r in records} >= {"decode", "maskfeat", "beit", "mocov3", "finetune", "linear", "eval"}
    assert all(r["images"] > 0 and r["img_per_s_per_core"] > 0 for r in records)
    missing = runner.invoke(app, ["bench", "--data", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1
