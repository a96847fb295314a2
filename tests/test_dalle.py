"""DalleTokenizer: bit-compatible with OpenAI's dall_e Encoder, self-describing safetensors files, and the
one pickle import (`semanticmim targets import-dalle`) working without dall_e and refusing foreign code."""

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from semanticmim.errors import InputError
from semanticmim.targets import DalleTokenizer, DalleTokenizerConfig, import_openai_pickle, map_pixels
from stages.cli import app


@pytest.fixture(scope="module")
def dall_e():
    """OpenAI's reference package (a dev dependency); only the tests comparing against it need it."""
    return SimpleNamespace(
        encoder=pytest.importorskip("dall_e.encoder"), map_pixels=pytest.importorskip("dall_e.utils").map_pixels
    )


def openai_encoder(dall_e, **kwargs) -> torch.nn.Module:
    """A randomly initialised OpenAI Encoder (its own init: N(0, 1/fan_in) weights, zero biases)."""
    encoder = dall_e.encoder.Encoder(device=torch.device("cpu"), requires_grad=False, **kwargs)
    with torch.no_grad():  # non-zero biases so that a bias mix-up cannot go unnoticed
        for name, parameter in encoder.named_parameters():
            if name.endswith(".b"):
                parameter.normal_(std=0.1)
    return encoder.eval()


@pytest.fixture(scope="module")
def small_encoder(dall_e) -> torch.nn.Module:
    """The smallest Encoder dall_e allows (n_hid 64, 512 codes), one block per group."""
    torch.manual_seed(0)
    return openai_encoder(dall_e, n_hid=64, n_blk_per_group=1, vocab_size=512)


def test_default_config_matches_openai_logits_and_tokens(dall_e):
    torch.manual_seed(0)
    encoder = openai_encoder(dall_e)
    tokenizer = DalleTokenizer.from_state_dict(encoder.state_dict())
    assert tokenizer.config == DalleTokenizerConfig()  # 8192 codes, n_hid 256, 4 groups x 2 blocks
    images = torch.rand(1, 3, 112, 112)  # one image: the full-size encoder is the slow part of this file
    expected = encoder(dall_e.map_pixels(images))
    logits = tokenizer.logits(images)
    assert logits.shape == (1, 8192, 14, 14) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    tokens = tokenizer(images)
    assert tokens.shape == (1, 196) and tokens.dtype == torch.long
    assert torch.equal(tokens, expected.argmax(1).flatten(1))  # raster order


def test_map_pixels_is_openais(dall_e):
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(map_pixels(x), dall_e.map_pixels(x))


def test_state_dict_keys_mirror_openai(small_encoder):
    ours = DalleTokenizer(vocab_size=512, n_hid=64, n_blk_per_group=1).state_dict()
    theirs = small_encoder.state_dict()
    renamed = {
        key.removesuffix(".weight") + ".w" if key.endswith(".weight") else key[: -len(".bias")] + ".b" for key in ours
    }
    assert renamed == set(theirs)
    assert all(ours[k].shape == theirs[k.replace(".weight", ".w").replace(".bias", ".b")].shape for k in ours)


@pytest.mark.parametrize(("config", "size", "grid"), [((64, 16, 2, 1), 16, 8), ((32, 8, 3, 2), 24, 6)])
def test_configurable_and_own_state_dict_round_trip(config, size, grid):
    tokenizer = DalleTokenizer(*config)
    images = torch.rand(3, 3, size, size)
    assert tokenizer.logits(images).shape == (3, config[0], grid, grid)
    rebuilt = DalleTokenizer.from_state_dict(tokenizer.state_dict())
    assert rebuilt.config == tokenizer.config
    assert torch.equal(rebuilt(images), tokenizer(images))
    assert tokenizer(images).shape == (3, grid * grid)


def test_logits_fp32_under_autocast_and_differentiable():
    tokenizer = DalleTokenizer(64, 16, 2, 1)
    images = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tokenizer.logits(images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, tokenizer.logits(images))
    logits.sum().backward()
    assert tokenizer.blocks.input.weight.grad is not None
    assert not tokenizer(images).requires_grad


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(1, 1, 16, 16), r"expected a float \(B, 3, h, w\)"),
        (torch.rand(3, 16, 16), r"expected a float \(B, 3, h, w\)"),
        (torch.randint(0, 255, (1, 3, 16, 16)), r"expected a float \(B, 3, h, w\)"),
        (torch.rand(1, 3, 16, 12), r"h, w \(16, 12\) must be multiples of 8"),
        (torch.randn(1, 3, 16, 16) * 2, r"expected pixels in \[0, 1\]"),  # a normalised image
        (torch.rand(1, 3, 16, 16) * 255, r"expected pixels in \[0, 1\]"),
    ],
)
def test_bad_images_raise_one_line_input_error(images, match):
    tokenizer = DalleTokenizer(64, 16, 4, 1)
    with pytest.raises(InputError, match=match) as error:
        tokenizer(images)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ bad state dicts


def _one_line_error(state_dict, match):
    with pytest.raises(InputError, match=match) as error:
        DalleTokenizer.from_state_dict(state_dict)
    assert "\n" not in str(error.value)


def test_missing_key_is_named(small_encoder):
    state_dict = dict(small_encoder.state_dict())
    del state_dict["blocks.group_2.block_1.res_path.conv_3.b"]
    _one_line_error(state_dict, r"missing key 'blocks\.group_2\.block_1\.res_path\.conv_3\.bias'.*conv_3\.b'")


def test_wrong_shape_is_named(small_encoder):
    state_dict = dict(small_encoder.state_dict())
    state_dict["blocks.group_3.block_1.res_path.conv_2.w"] = torch.zeros(64, 64, 1, 1)
    _one_line_error(state_dict, r"'blocks\.group_3\.block_1\.res_path\.conv_2\.w' has shape \(64, 64, 1, 1\), expected")


def test_unexpected_key_is_named(small_encoder):
    state_dict = {**small_encoder.state_dict(), "blocks.group_1.extra.w": torch.zeros(1)}
    _one_line_error(state_dict, r"unexpected key 'blocks\.group_1\.extra\.w'")


@pytest.mark.parametrize(
    ("state_dict", "match"),
    [
        ({}, "non-empty state dict"),
        ({"blocks.input.w": [1, 2]}, r"key 'blocks\.input\.w' is a list, expected a floating-point tensor"),
        ({"blocks.input.w": torch.zeros(2, dtype=torch.long)}, r"key 'blocks\.input\.w' is a torch\.int64"),
        (
            {"blocks.output.conv.w": torch.zeros(8, 4, 1, 1)},
            r"missing key 'blocks\.input\.weight' \(OpenAI name 'blocks\.input\.w'\)",
        ),
        (
            {"blocks.input.w": torch.zeros(64, 1, 7, 7), "blocks.output.conv.w": torch.zeros(8, 4, 1, 1)},
            r"'blocks\.input\.w' has shape \(64, 1, 7, 7\), expected \(n_hid, 3, 7, 7\)",
        ),
    ],
)
def test_malformed_state_dicts(state_dict, match):
    _one_line_error(state_dict, match)


# ------------------------------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_is_self_describing(tmp_path):
    tokenizer = DalleTokenizer(64, 16, 3, 1)
    path = tmp_path / "sub" / "tok.safetensors"
    tokenizer.save_safetensors(path)
    assert os.listdir(path.parent) == ["tok.safetensors"]  # the temporary file was renamed away
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "semanticmim.DalleTokenizer"
        assert '"group_count": 3' in handle.metadata()["config"]
    loaded = DalleTokenizer.load(path)
    assert loaded.config == tokenizer.config
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.logits(images), tokenizer.logits(images))


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        DalleTokenizer.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match=r"junk\.safetensors is not a readable safetensors file"):
        DalleTokenizer.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    tensors = DalleTokenizer(64, 16, 2, 1).state_dict()
    save_file(
        tensors,
        str(tmp_path / "lying.safetensors"),
        metadata={"config": '{"vocab_size": 64, "n_hid": 16, "group_count": 2, "n_blk_per_group": 2}'},
    )
    with pytest.raises(InputError, match=r"metadata config .* does not match the tensors"):
        DalleTokenizer.load(tmp_path / "lying.safetensors")


# ------------------------------------------------------------------------------- OpenAI pickle import


def _invoke(*args):
    result = CliRunner().invoke(app, ["targets", "import-dalle", *map(str, args)])
    return result, result.output


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_import_dalle_cli_round_trip(tmp_path, small_encoder, zipfile_format, dall_e):
    pkl = tmp_path / "encoder.pkl"
    torch.save(small_encoder, pkl, _use_new_zipfile_serialization=zipfile_format)
    out = tmp_path / "dalle.safetensors"
    result, output = _invoke(pkl, out)
    assert result.exit_code == 0, output
    assert "unpickled" in result.stderr and "trust" in result.stderr
    assert f"wrote {out}" in result.stdout and "vocab_size=512" in result.stdout
    tokenizer = DalleTokenizer.load(out)
    images = torch.rand(2, 3, 64, 64)
    expected = small_encoder(dall_e.map_pixels(images))
    torch.testing.assert_close(tokenizer.logits(images), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokenizer(images), expected.argmax(1).flatten(1))


def test_import_works_without_dall_e_installed(tmp_path, small_encoder, monkeypatch):
    pkl = tmp_path / "encoder.pkl"
    torch.save(small_encoder, pkl)
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils", "dall_e.decoder"):
        monkeypatch.setitem(sys.modules, name, None)  # `import dall_e...` now raises ImportError
    with pytest.raises(ImportError):
        importlib.import_module("dall_e.encoder")
    tokenizer = import_openai_pickle(pkl, tmp_path / "out.safetensors")
    expected = DalleTokenizer.from_state_dict(small_encoder.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(tokenizer.state_dict()[key], value), key


def test_import_accepts_a_pickled_state_dict(tmp_path, small_encoder):
    pkl = tmp_path / "encoder_state.pt"
    torch.save(small_encoder.state_dict(), pkl)
    tokenizer = import_openai_pickle(pkl, tmp_path / "out.safetensors")
    assert tokenizer.config == DalleTokenizerConfig(vocab_size=512, n_hid=64, n_blk_per_group=1)


class _Payload:
    """Unpickles into a call of os.mkdir: what a malicious pickle would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_import_refuses_foreign_globals_without_running_them(tmp_path):
    marker = tmp_path / "payload_ran"
    pkl = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": _Payload(marker)}, pkl)
    result, output = _invoke(pkl, tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert "refusing to load global" in output and "mkdir" in output
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_import_cli_bad_inputs_exit_2_with_one_line(tmp_path, small_encoder):
    missing = tmp_path / "nope.pkl"
    garbage = tmp_path / "garbage.pkl"
    garbage.write_text("this is not a pickle\n")
    broken = tmp_path / "broken.pkl"
    state_dict = dict(small_encoder.state_dict())
    del state_dict["blocks.output.conv.b"]
    torch.save(state_dict, broken)
    for path, match in [
        (missing, "does not exist"),
        (garbage, "is not a readable torch pickle of the DALL-E encoder"),
        (broken, "missing key 'blocks.output.conv.bias'"),
    ]:
        result, _ = _invoke(path, tmp_path / "out.safetensors")
        assert result.exit_code == 2, result.output
        note, error = result.stderr.splitlines()  # the unpickling note, then exactly one error line
        assert note.startswith("note:") and error.startswith("error:") and match in error
    assert not (tmp_path / "out.safetensors").exists()
