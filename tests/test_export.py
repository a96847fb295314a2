"""`semanticmim export CHECKPOINT --to timm OUT_DIR`: timm loads the encoder strictly and agrees."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from semanticmim.methods import METHODS, build_variant
from semanticmim.models import EncoderConfig, load_model, save_model
from stages.cli import app

TINY = EncoderConfig(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)
runner = CliRunner()


def export(model, tmp_path):
    save_model(model, tmp_path / "model.safetensors")
    result = runner.invoke(app, ["export", str(tmp_path / "model.safetensors"), "--to", "timm", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    timm_model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["kwargs"])
    timm_model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    return timm_model.eval()


@pytest.mark.parametrize(("variant", "num_proxy"), [(name, k) for name in sorted(METHODS) for k in (1, 8)
                                                     if not (name == "mocov3" and k == 8)])
def test_timm_gives_the_same_features(variant, num_proxy, tmp_path):
    torch.manual_seed(0)
    model = build_variant(variant, TINY, num_proxy=num_proxy, target_dim=16).eval()
    with torch.no_grad():  # trained-looking weights: non-zero biases and layer scales
        for name, param in model.named_parameters():
            if name.endswith(("bias", "gamma")):
                param.normal_(0, 0.1)
    timm_model = export(model, tmp_path)
    assert timm_model.num_prefix_tokens == num_proxy
    for size in (32, 64):  # native, and 2x with the pos-embed interpolated (e.g. VOC at 448)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(timm_model.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)


def test_saved_model_round_trips(tmp_path):
    model = build_variant("beit-semanticmim", TINY, target_dim=16)
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_export_bad_inputs_are_one_line_errors(tmp_path):
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.safetensors"), str(tmp_path / "out")])
    assert missing.exit_code == 2 and "no such model file" in missing.output
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    junk = runner.invoke(app, ["export", str(tmp_path / "junk.safetensors"), str(tmp_path / "out")])
    assert junk.exit_code == 2 and "not a safetensors file" in junk.output
    wrong_format = runner.invoke(app, ["export", str(tmp_path / "junk.safetensors"), "--to", "onnx", "o"])
    assert wrong_format.exit_code == 2 and "'onnx' is not supported" in wrong_format.output
    for result in (missing, junk, wrong_format):
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = build_variant("maskfeat", TINY)
    save_model(small, tmp_path / "m.safetensors")
    wider = build_variant("maskfeat", EncoderConfig(**{**TINY.to_dict(), "embed_dim": 64}))
    from semanticmim.errors import InputError
    from semanticmim.serialization import load_state_strict

    with pytest.raises(InputError, match="has shape"):
        load_state_strict(wider, load_file(tmp_path / "m.safetensors"), "m.safetensors")
