"""`load_encoder` on any timm ViT export: encoders without prefix tokens, weights that disagree with
config.json, sizes that are not a multiple of the patch, `no_embed_class` resizing, and the
normalisation read from config.json. Every bad input is a one-line InputError naming the file."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from semanticmim.data.transforms import normalize
from semanticmim.errors import InputError
from semanticmim.eval.encoder import load_encoder

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, **{**TINY, **kwargs}).eval()


def export(folder: Path, model_kwargs: dict | None = None, config_kwargs: dict | None = None,
           **config_extra) -> torch.nn.Module:
    """Save a tiny ViT built with `model_kwargs` under a config.json that says `config_kwargs`
    (the same by default) -> the saved model."""
    model_kwargs = model_kwargs or {}
    model = tiny_vit(**model_kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    kwargs = {**TINY, **(model_kwargs if config_kwargs is None else config_kwargs)}
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "kwargs": kwargs, **config_extra}))
    return model


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip(), message
    assert "--" not in message, f"a library error quotes a CLI flag: {message}"
    return message


# ------------------------------------------------------------------------------------ prefix tokens


@pytest.mark.parametrize(("kwargs", "prefix"), [
    (dict(class_token=False, global_pool="avg"), 0),
    (dict(reg_tokens=2), 3),
])
def test_block_tokens_split_prefix_and_patches_as_timm_does(tmp_path, kwargs, prefix):
    model = export(tmp_path / "vit", kwargs)
    encoder = load_encoder(tmp_path / "vit")
    x = images()
    tokens = encoder.block_tokens(x, [1, 2])
    with torch.no_grad():
        patches_only = model.forward_intermediates(x, indices=[0, 1], norm=False, output_fmt="NLC",
                                                   intermediates_only=True)
        sequence, by_hand = model.norm_pre(model._pos_embed(model.patch_embed(x))), []
        for block in model.blocks:
            sequence = block(sequence)
            by_hand.append(sequence)
    assert encoder.num_prefix_tokens == prefix and len(tokens) == 2
    for (prefix_tokens, patches), timm_patches, full in zip(tokens, patches_only, by_hand, strict=True):
        assert prefix_tokens.shape == (2, prefix, 32) and patches.shape == (2, 16, 32)
        torch.testing.assert_close(patches, timm_patches, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([prefix_tokens, patches], 1), full, rtol=0, atol=0)


def test_cls_pooling_refuses_an_encoder_without_prefix_tokens_in_one_line(tmp_path):
    export(tmp_path / "gap", dict(class_token=False, global_pool="avg"))
    export(tmp_path / "cls", {})
    with pytest.raises(InputError) as error:
        load_encoder(tmp_path / "gap").require_prefix("eval.linear_cls.poolings")
    message = one_line(error)
    assert message.startswith("eval.linear_cls.poolings:") and "no prefix tokens" in message
    assert str(tmp_path / "gap" / "model.safetensors") in message and "poolings: [patch]" in message
    load_encoder(tmp_path / "cls").require_prefix("eval.linear_cls.poolings")  # a class token: no error


# --------------------------------------------------------------------------- weights vs config.json


@pytest.mark.parametrize(("model_kwargs", "config_kwargs", "key"), [
    ({}, dict(embed_dim=48), "cls_token"),  # embed dim
    ({}, dict(img_size=48), "pos_embed"),  # pos-embed grid vs img_size
    (dict(reg_tokens=1), dict(reg_tokens=2), "reg_token"),  # register count
    (dict(class_token=False, global_pool="avg", no_embed_class=True),
     dict(class_token=False, global_pool="avg", no_embed_class=True, patch_size=4), "pos_embed"),
])
@pytest.mark.parametrize("img_size", [None, 64])
def test_weights_that_disagree_with_config_are_one_line_naming_file_and_key(tmp_path, model_kwargs, config_kwargs,
                                                                             key, img_size):
    export(tmp_path / "vit", model_kwargs, config_kwargs)
    got = tiny_vit(**model_kwargs).state_dict()[key].shape
    want = tiny_vit(**config_kwargs).state_dict()[key].shape
    with pytest.raises(InputError) as error:
        load_encoder(tmp_path / "vit", img_size=img_size)
    message = one_line(error)
    assert str(tmp_path / "vit" / "model.safetensors") in message and f"'{key}'" in message
    assert str(tuple(got)) in message and str(tuple(want)) in message


def test_missing_and_unexpected_keys_are_one_line(tmp_path):
    export(tmp_path / "vit", dict(reg_tokens=1), {})
    with pytest.raises(InputError, match=r"does not match .*unexpected \['reg_token'\]") as error:
        load_encoder(tmp_path / "vit")
    one_line(error)


@pytest.mark.parametrize(("config_kwargs", "img_size", "key", "expected"), [
    (dict(img_size=36), None, None, "config.json: img_size=36: expected a multiple of the patch size 8"),
    ({}, 30, None, "img_size=30: expected a positive multiple of the patch size 8 of "),
    ({}, 0, None, "img_size=0: expected a positive multiple"),
    ({}, 36, "eval.finetune_seg.crop_size", "eval.finetune_seg.crop_size=36: expected a positive multiple"),
])
def test_an_img_size_off_the_patch_grid_is_one_line_up_front(tmp_path, monkeypatch, config_kwargs, img_size, key,
                                                             expected):
    export(tmp_path / "vit", {}, config_kwargs)
    read = []
    monkeypatch.setattr("semanticmim.eval.encoder.load_file", lambda path: read.append(path))
    with pytest.raises(InputError) as error:
        load_encoder(tmp_path / "vit", img_size=img_size, **({"size_key": key} if key else {}))
    assert expected in one_line(error) and str(tmp_path / "vit" / "config.json") in str(error.value)
    assert not read, "the weights were read before the size was checked"


# ----------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("kwargs", [
    dict(reg_tokens=2),  # pos-embed covers cls + registers + patches
    dict(reg_tokens=2, no_embed_class=True),  # pos-embed covers the patches only
    dict(class_token=False, global_pool="avg", no_embed_class=True, reg_tokens=1),
])
def test_img_size_resamples_the_pos_embed_as_timm_does_at_run_time(tmp_path, kwargs):
    original = export(tmp_path / "vit", kwargs)
    prefix = 0 if original.no_embed_class else original.num_prefix_tokens
    native = load_encoder(tmp_path / "vit", img_size=32).model.eval()
    for name, tensor in original.state_dict().items():
        assert torch.equal(native.state_dict()[name], tensor), name

    resized = load_encoder(tmp_path / "vit", img_size=64).model.eval()
    assert resized.pos_embed.shape == (1, prefix + 64, 32) and tuple(resized.patch_embed.img_size) == (64, 64)
    expected = resample_abs_pos_embed(original.pos_embed.detach(), new_size=(8, 8), num_prefix_tokens=prefix)
    torch.testing.assert_close(resized.pos_embed.detach(), expected, rtol=0, atol=0)
    # timm's own resampling: the original weights at run time, in a dynamic-size model
    dynamic = tiny_vit(**kwargs, dynamic_img_size=True)
    dynamic.load_state_dict(original.state_dict())
    with torch.no_grad():
        features, reference = resized.forward_features(images(size=64)), dynamic.forward_features(images(size=64))
    assert features.shape == (2, original.num_prefix_tokens + 64, 32) and torch.isfinite(features).all()
    torch.testing.assert_close(features, reference)


# ------------------------------------------------------------------------------------ normalisation


def test_normalisation_defaults_to_imagenet_and_matches_the_pipeline(tmp_path):
    export(tmp_path / "vit")
    encoder = load_encoder(tmp_path / "vit")
    assert encoder.mean == tuple(IMAGENET_DEFAULT_MEAN) and encoder.std == tuple(IMAGENET_DEFAULT_STD)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(encoder.normalize(pixels), normalize(pixels))
    assert encoder.normalization.is_imagenet and torch.equal(encoder.normalization(pixels), normalize(pixels))
    for convert in (encoder.normalize, encoder.normalization):
        with pytest.raises(TypeError, match="uint8"):
            convert(pixels.float())


@pytest.mark.parametrize("extra", [
    dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 0.125]),
    dict(pretrained_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.125], "input_size": [3, 32, 32]}),
    dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 0.125], pretrained_cfg={"mean": [0, 0, 0], "std": [1, 1, 1]}),
])
def test_normalisation_is_read_from_config(tmp_path, extra):
    export(tmp_path / "vit", **extra)
    encoder = load_encoder(tmp_path / "vit")
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.25, 0.5, 0.125)
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = (pixels.float() / 255 - 0.5) / torch.tensor([0.25, 0.5, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.normalize(pixels), expected)
    # the small picklable form data workers normalise with: the same numbers
    normalization = pickle.loads(pickle.dumps(encoder.normalization))
    assert torch.equal(normalization(pixels), encoder.normalize(pixels)) and not normalization.is_imagenet
    assert set(encoder.identity) == {"path", "sha256"}
    weights = tmp_path / "vit" / "model.safetensors"
    assert encoder.identity == {"path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


@pytest.mark.parametrize(("extra", "expected"), [
    (dict(mean=[0.5, 0.5], std=[0.2, 0.2, 0.2]), "'mean' must be 3 numbers"),
    (dict(mean=[0.5, 0.5, 0.5], std=[0.2, 0.0, 0.2]), "'std' values must be in (0, 1]"),
    (dict(mean=[0.5, 0.5, 0.5], std=[0.2, -0.1, 0.2]), "'std' values must be in (0, 1]"),
    (dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]), "'mean' values must be in [0, 1]"),
    (dict(mean=["a", 0.5, 0.5], std=[0.2, 0.2, 0.2]), "'mean' must be 3 numbers"),
    (dict(mean=[0.5, 0.5, 0.5]), "'mean' is given without 'std'"),
    (dict(pretrained_cfg={"std": [0.2, 0.2, 0.2]}), "'pretrained_cfg.std' is given without 'pretrained_cfg.mean'"),
    (dict(pretrained_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, True]}), "'pretrained_cfg.std' must be 3"),
    (dict(pretrained_cfg=[0.5]), "'pretrained_cfg' must be an object"),
])
def test_bad_normalisation_is_one_line_naming_config_and_key(tmp_path, extra, expected):
    export(tmp_path / "vit", **extra)
    with pytest.raises(InputError) as error:
        load_encoder(tmp_path / "vit")
    message = one_line(error)
    assert expected in message and str(tmp_path / "vit" / "config.json") in message


@pytest.mark.parametrize(("config", "expected"), [
    ("{not json", "not JSON"),
    ('["vit"]', "expected a JSON object with 'architecture'"),
    (json.dumps({"architecture": ARCH, "kwargs": [1]}), "'kwargs' must be an object"),
    (json.dumps({"architecture": "no_such_vit", "kwargs": {}}), "timm cannot build 'no_such_vit'"),
    (json.dumps({"architecture": "resnet10t", "kwargs": {}}), "'resnet10t' is not a timm ViT"),
])
def test_bad_config_json_is_one_line(tmp_path, config, expected):
    export(tmp_path / "vit")
    (tmp_path / "vit" / "config.json").write_text(config)
    with pytest.raises(InputError) as error:
        load_encoder(tmp_path / "vit")
    assert expected in one_line(error) and str(tmp_path / "vit" / "config.json") in str(error.value)
