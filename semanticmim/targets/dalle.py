"""BEiT's visual tokenizer: the DALL-E dVAE encoder (OpenAI `dall_e` architecture) with standard modules.

The layout and module names mirror OpenAI's `dall_e.encoder.Encoder`, with `nn.Conv2d` (`weight`,
`bias`) in place of its `Conv2d` (`w`, `b`), so that its state dict converts by renaming the last key
component. Input images are in [0, 1] (the data pipeline hands the tokenizer its own [0, 1] view, not the
normalised one); `logits` applies OpenAI's `map_pixels` itself.

Files: `save_safetensors` / `DalleTokenizer.load` (configuration in the safetensors metadata).
`import_openai_pickle` is the one place that unpickles a file: OpenAI's `encoder.pkl`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import PositiveInt
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from semanticmim.errors import InputError

__all__ = [
    "DalleTokenizer",
    "DalleTokenizerConfig",
    "EncoderBlock",
    "import_openai_pickle",
    "map_pixels",
    "read_openai_pickle",
]

LOGIT_LAPLACE_EPS = 0.1
FILE_FORMAT = "semanticmim.DalleTokenizer"


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's input mapping [0, 1] -> [eps, 1 - eps] = 0.8 * x + 0.1."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def init_conv(conv: nn.Conv2d) -> None:
    """OpenAI's `Conv2d` initialisation: weights N(0, 1 / fan_in), zero bias."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.normal_(conv.weight, std=fan_in**-0.5)
    nn.init.zeros_(conv.bias)


def make_conv(n_in: int, n_out: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kernel_size, padding=(kernel_size - 1) // 2)
    init_conv(conv)
    return conv


@dataclass(frozen=True)
class DalleTokenizerConfig:
    """Defaults are OpenAI's encoder: 112x112 -> 14x14 tokens out of 8192."""

    vocab_size: PositiveInt = 8192
    n_hid: PositiveInt = 256
    group_count: PositiveInt = 4
    n_blk_per_group: PositiveInt = 2

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise InputError(f"vocab_size: expected >= 2 codes, got {self.vocab_size}")
        if self.n_hid < 4 or self.n_hid % 4:
            raise InputError(f"n_hid: expected a positive multiple of 4, got {self.n_hid}")
        if self.group_count < 1 or self.n_blk_per_group < 1:
            raise InputError(
                f"group_count/n_blk_per_group: expected >= 1, got {self.group_count}/{self.n_blk_per_group}"
            )

    @property
    def downsample(self) -> int:
        """Pixels per token side: one 2x max-pool after every group but the last."""
        return 2 ** (self.group_count - 1)

    def group_width(self, group: int) -> int:
        """Channels of group `group` (0-based): n_hid * 1, 2, 4, 8, ..."""
        return self.n_hid * 2**group

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> DalleTokenizerConfig:
        names = {field.name for field in fields(cls)}
        if set(values) != names or not all(isinstance(v, int) for v in values.values()):
            raise InputError(f"{source}: expected integer config keys {sorted(names)}, got {values}")
        return cls(**values)


class EncoderBlock(nn.Module):
    """OpenAI's residual block: id_path + post_gain * (relu-conv-relu-conv-relu-conv-relu-conv), with
    kernel sizes 3, 3, 3, 1 in the encoder (1, 3, 3, 3 in the decoder) and n_out // 4 hidden channels."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernel_sizes: tuple[int, ...] = (3, 3, 3, 1)) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = make_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kernel in enumerate(kernel_sizes, start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = make_conv(widths[i - 1], widths[i], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n_in, h, w) -> (B, n_out, h, w)."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _encoder_group(config: DalleTokenizerConfig, group: int) -> nn.Sequential:
    n_layers = config.group_count * config.n_blk_per_group
    width = config.group_width(group)
    n_in = config.group_width(group - 1) if group > 0 else config.n_hid
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(config.n_blk_per_group):
        layers[f"block_{i + 1}"] = EncoderBlock(n_in if i == 0 else width, width, n_layers)
    if group < config.group_count - 1:
        layers["pool"] = nn.MaxPool2d(kernel_size=2)
    return nn.Sequential(layers)


class DalleTokenizer(nn.Module):
    """DALL-E dVAE encoder: images in [0, 1] -> logits over `vocab_size` codes on a grid 2^(G-1) coarser.

    `logits(x: (B, 3, h, w)) -> (B, vocab_size, h / ds, w / ds)` (fp32, differentiable);
    `forward(x) -> (B, (h / ds) * (w / ds))` int64 argmax tokens in raster order, without gradients.
    """

    def __init__(
        self, vocab_size: int = 8192, n_hid: int = 256, group_count: int = 4, n_blk_per_group: int = 2
    ) -> None:
        super().__init__()
        self.config = config = DalleTokenizerConfig(vocab_size, n_hid, group_count, n_blk_per_group)
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=make_conv(3, n_hid, 7))
        for group in range(group_count):
            layers[f"group_{group + 1}"] = _encoder_group(config, group)
        last_width = config.group_width(group_count - 1)
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=make_conv(last_width, vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, h, w) in [0, 1] -> (B, vocab_size, h / ds, w / ds) float32 code logits."""
        self._check_images(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.blocks(map_pixels(x.float()))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, h, w) in [0, 1] -> (B, (h / ds) * (w / ds)) int64 tokens, raster order."""
        return self.logits(x).argmax(dim=1).flatten(1)

    def _check_images(self, x: torch.Tensor) -> None:
        ds = self.downsample
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise InputError(
                f"DalleTokenizer images: expected a float (B, 3, h, w) tensor, got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[-2] % ds or x.shape[-1] % ds:
            raise InputError(f"DalleTokenizer images: h, w {tuple(x.shape[-2:])} must be multiples of {ds}")
        if x.numel() == 0:
            return
        # Resampling may overshoot [0, 1] slightly; far outside means a normalised or 0-255 image.
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < -0.5 or high > 1.5:
            raise InputError(f"DalleTokenizer images: expected pixels in [0, 1], got range [{low:.3g}, {high:.3g}]")

    # ------------------------------------------------------------------------------------ state dicts

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> DalleTokenizer:
        """Build from OpenAI's `Encoder.state_dict()` (`blocks.input.w`, ...) or our own (`...weight`).

        The configuration is inferred from the tensor shapes; loading is strict and any missing,
        unexpected or mis-shaped key raises a one-line InputError naming it.
        """
        ours, names = _to_our_keys(state_dict, source)
        with torch.device("meta"):  # every parameter is assigned below: skip the random init
            tokenizer = cls(**asdict(_infer_config(ours, names, source)))
        _check_keys_and_shapes(tokenizer.state_dict(), ours, names, source)
        tokenizer.load_state_dict(ours, strict=True, assign=True)
        return tokenizer

    def save_safetensors(self, path: str | os.PathLike[str]) -> None:
        """Write weights + config (in the metadata) to `path` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        metadata = {"format": FILE_FORMAT, "config": json.dumps(asdict(self.config))}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DalleTokenizer:
        """Read a file written by `save_safetensors`; its metadata config must match the tensors."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"tokenizer file {path} does not exist")
        try:
            state_dict = load_file(str(path))
            metadata = _read_metadata(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
        tokenizer = cls.from_state_dict(state_dict, source=str(path))
        if "config" in metadata:
            stored = DalleTokenizerConfig.from_dict(_parse_json(metadata["config"], path), f"{path} metadata")
            if stored != tokenizer.config:
                raise InputError(f"{path}: metadata config {stored} does not match the tensors ({tokenizer.config})")
        return tokenizer


# ---------------------------------------------------------------------------------- state dict helpers

_GROUP_KEY = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")


def _to_our_keys(state_dict: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename OpenAI's `.w`/`.b` to `.weight`/`.bias`. Returns (ours, our key -> key as given)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError(f"{source}: expected a non-empty state dict of tensors, got {type(state_dict).__name__}")
    ours: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{source}: key {key!r} is a {kind}, expected a floating-point tensor")
        new_key = re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", str(key)))
        if new_key in ours:
            raise InputError(f"{source}: key {key!r} duplicates {names[new_key]!r}")
        # Own fp32 copies: the tokenizer takes these tensors over (no aliasing of the caller's dict).
        ours[new_key], names[new_key] = value.detach().to(torch.float32, copy=True), str(key)
    return ours, names


def _infer_config(state_dict: dict[str, torch.Tensor], names: dict[str, str], source: str) -> DalleTokenizerConfig:
    for key in ("blocks.input.weight", "blocks.output.conv.weight"):
        if key not in state_dict:
            raise InputError(f"{source}: missing key {_both_names(key)} (DALL-E encoder expected)")
    input_weight = state_dict["blocks.input.weight"]
    if input_weight.ndim != 4 or input_weight.shape[1:] != (3, 7, 7):
        raise InputError(
            f"{source}: key {names['blocks.input.weight']!r} has shape {tuple(input_weight.shape)}, "
            "expected (n_hid, 3, 7, 7)"
        )
    blocks = {tuple(int(n) for n in m.groups()) for key in state_dict if (m := _GROUP_KEY.match(key))}
    group_count = max((group for group, _ in blocks), default=0)
    n_blk_per_group = max((block for group, block in blocks if group == 1), default=0)
    if group_count < 1 or n_blk_per_group < 1:
        raise InputError(f"{source}: no keys 'blocks.group_<g>.block_<i>.*' found (DALL-E encoder expected)")
    return DalleTokenizerConfig(
        vocab_size=state_dict["blocks.output.conv.weight"].shape[0],
        n_hid=input_weight.shape[0],
        group_count=group_count,
        n_blk_per_group=n_blk_per_group,
    )


def _check_keys_and_shapes(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], names: dict[str, str], source: str
) -> None:
    for key, value in expected.items():
        if key not in given:
            raise InputError(f"{source}: missing key {_both_names(key)}")
        if given[key].shape != value.shape:
            raise InputError(
                f"{source}: key {names[key]!r} has shape {tuple(given[key].shape)}, expected {tuple(value.shape)}"
            )
    for key in given:
        if key not in expected:
            raise InputError(f"{source}: unexpected key {names[key]!r} for {DalleTokenizer.__name__}")


def _both_names(key: str) -> str:
    """Our key and OpenAI's name for it, for messages about either kind of state dict."""
    openai_key = re.sub(r"\.weight$", ".w", re.sub(r"\.bias$", ".b", key))
    return f"{key!r} (OpenAI name {openai_key!r})"


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _parse_json(text: str, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: metadata 'config' is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: metadata 'config' must be a JSON object")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ------------------------------------------------------------------------------- OpenAI pickle import


class _PickledDalleModule(nn.Module):
    """Stand-in for every `dall_e.*` class in a pickle: keeps the module tree and its parameters only.

    Unpickling restores an nn.Module from its `__dict__` (`nn.Module.__setstate__`), which is all
    `state_dict()` needs, so the `dall_e` package never has to be importable and none of its code runs.
    """

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("a stand-in for a pickled dall_e module holds weights only")


# Globals a pickled nn.Module tree refers to; everything else is refused instead of imported.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 pickles (torch.save's default) use Python 2 names
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _PickledDalleModule
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module.startswith("torch.nn.modules."):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")


# torch.load subclasses `pickle_module.Unpickler` and calls `pickle_module.load` for legacy headers.
_restricted_pickle = SimpleNamespace(
    __name__="semanticmim_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_openai_pickle(pkl_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Unpickle OpenAI's `encoder.pkl` (a `torch.save` of the whole Encoder) -> its state dict.

    This is the one `torch.load(weights_only=False)` of the project. The unpickler maps `dall_e.*`
    classes to a weights-only stand-in and refuses any global outside a short allowlist (torch module
    classes and tensor rebuilders), so neither `dall_e` nor arbitrary code is imported. A file that
    holds a plain state dict is accepted too.
    """
    path = Path(pkl_path)
    if not path.is_file():
        raise InputError(f"encoder pickle {path} does not exist")
    if _is_torchscript(path):  # torch.load would hand it to torch.jit.load: not what this import is for
        raise InputError(f"{path} is a TorchScript archive, expected a torch.save pickle of the DALL-E encoder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy files warn that the stand-in's source differs
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as error:  # any unpickling failure means "not the expected file"
        raise InputError(
            f"{path} is not a readable torch pickle of the DALL-E encoder ({_first_line(error)})"
        ) from None
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, dict):
        return loaded
    raise InputError(f"{path}: expected a pickled DALL-E Encoder module or state dict, got {type(loaded).__name__}")


def import_openai_pickle(pkl_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> DalleTokenizer:
    """OpenAI `encoder.pkl` -> `DalleTokenizer` written to `out_path` (safetensors). Returns it."""
    tokenizer = DalleTokenizer.from_state_dict(read_openai_pickle(pkl_path), source=str(pkl_path))
    tokenizer.save_safetensors(out_path)
    return tokenizer
