"""The bad-input corpus (issue 10, DESIGN.md §8): every CLI command driven through typer's CliRunner against
corrupt, truncated, empty and non-image files; gray, RGBA, CMYK, palette and 16-bit images; out-of-range and
missing labels; wrong folder layouts; typo'd, wrongly typed and out-of-range params; truncated, foreign and
wrong-variant checkpoints and encoder folders; and pickles that would run code.

Each case is one test id (`test_bad_input[<case>]`). A case ends one of three ways:
- `error`: exit code 2 (1 where the command's documented contract says so: `data inspect` on a dataset it
  reads but finds unusable), exactly one `error:` line on stderr naming the file or key (other stderr lines
  may only be one-line `note:`/`warning:`s), no traceback, and no new, changed or half-written output
  (`*.tmp*`, model.safetensors, metrics.json, config.json, ...) in the output folder;
- `skip`: exit 0 with each unreadable image counted where the command records skips (skipped.jsonl, the
  shards' index.json, `data inspect --json`), and nothing else skipped;
- `accept`: exit 0, the image modes the decoder converts (gray, RGBA, CMYK, palette, 16-bit) read as RGB
  and never skipped.
Pickle cases also check that the code the pickle would run did not run (its marker file does not exist).

`test_zz_count` prints the figure (`N cases, N one-line errors/skips, 0 tracebacks`) and writes it, with
one line per case, to `bad_inputs.txt` in pytest's base temporary folder.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.data.embedded import generate_embedded
from semanticmim.serialization import save_model
from semanticmim.targets.dalle import DalleTokenizer
from stages.cli import app

runner = CliRunner()

# Outputs a failed command must not have written, changed or left half-done.
FINAL_OUTPUTS = {"model.safetensors", "metrics.json", "tokenizer.safetensors", "config.json", "maps.safetensors",
                 "index.json", "meta.json", "README.md", "optimizer.safetensors", "state.json"}
SKIPPED_KINDS = ("corrupt", "truncated", "truncated-jpeg", "empty", "not-an-image")
ACCEPTED_KINDS = ("gray", "rgba", "cmyk", "palette", "16-bit")
IMAGE_KINDS = SKIPPED_KINDS + ACCEPTED_KINDS
DROP = object()  # a params value that removes the key

RESULTS: list[dict] = []  # one entry per case that ran, for test_zz_count


# ------------------------------------------------------------------------------------------ images


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_kind(stem: Path, kind: str, data_files: dict, seed: int = 0) -> Path:
    """A 32x32 image file of `kind` at `stem` + the kind's suffix (an existing file of that stem is removed)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for old in stem.parent.glob(stem.name + ".*"):
        old.unlink()
    rgb = _pixels(seed)
    if kind == "corrupt":  # a PNG whose compressed data is zeroed in the middle
        data = bytearray(_png(Image.fromarray(rgb)))
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        path = stem.with_suffix(".png")
        path.write_bytes(bytes(data))
        return path
    if kind == "truncated":
        return data_files["truncate"](data_files["image"](stem.with_suffix(".png"), (32, 32), seed))
    if kind == "truncated-jpeg":
        return data_files["truncate"](data_files["image"](stem.with_suffix(".jpg"), (32, 32), seed))
    if kind == "empty":
        path = stem.with_suffix(".png")
        path.write_bytes(b"")
        return path
    if kind == "not-an-image":
        return data_files["corrupt"](stem.with_suffix(".jpg"))  # text bytes in a .jpg
    image = {
        "gray": lambda: Image.fromarray(rgb[..., 0]),
        "rgba": lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "cmyk": lambda: Image.fromarray(rgb).convert("CMYK"),
        "palette": lambda: Image.fromarray(rgb).convert("P"),
        "16-bit": lambda: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }[kind]()
    path = stem.with_suffix(".jpg" if kind == "cmyk" else ".png")
    path.write_bytes(_png(image, "JPEG" if kind == "cmyk" else "PNG"))
    assert Image.open(path).mode == {"gray": "L", "rgba": "RGBA", "cmyk": "CMYK", "palette": "P",
                                     "16-bit": "I;16"}[kind]
    return path


# --------------------------------------------------------------------------------------- fixtures


@dataclass
class Base:
    """What the cases share (module scope): a 32-px embedded dataset, a tiny timm-format encoder, a tiny
    DALL-E tokenizer, and the params sections that run every command in seconds on them."""

    root: Path
    classification: Path
    segmentation: Path
    encoder: Path
    tokenizer: Path

    def sections(self) -> dict:
        cls_data = {"root": str(self.classification), "format": "imagefolder"}
        seg_data = {"root": str(self.segmentation), "format": "voc"}
        fast_run = {"checkpoint_every": 1, "log_every": 1, "keep_checkpoints": 1}
        return {
            "data": {"kind": "embedded", "out": str(self.root / "unused"), "image_size": 32, "train": 4, "val": 2},
            "dvae": {"vocab_size": 16, "n_hid": 8, "group_count": 2, "n_blk_per_group": 1, "image_size": 8,
                     "epochs": 1, "batch_size": 8, "lr": 2.0e-3,
                     "data": {"root": str(self.classification), "num_workers": 0}, "run": fast_run},
            "pretrain": {"model": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
                         "data": {"root": str(self.classification), "num_workers": 0}, "run": fast_run,
                         "tokenizer": str(self.tokenizer),
                         "recipe": {"epochs": 1, "batch_size": 8, "lr": 1.0e-3, "lr_batch": 8,
                                    "warmup_epochs": 0, "mlp_dim": 16, "out_dim": 8}},
            "eval": {
                "encoders": ["maskfeat"], "protocols": ["linear_cls"],
                "linear_cls": {"data": cls_data, "mode": "cached", "epochs": 1, "batch_size": 8, "lr_batch": 8,
                               "num_workers": 0, "run": fast_run},
                "finetune_cls": {"data": cls_data, "heads": ["cls"], "epochs": 1, "batch_size": 8, "lr_batch": 8,
                                 "mixup": 0.0, "cutmix": 0.0, "num_workers": 0, "run": fast_run},
                "linear_seg": {"data": seg_data, "img_size": 32, "epochs": 1, "batch_size": 8, "eval_every": 1,
                               "num_workers": 0, "run": fast_run},
                "finetune_seg": {"data": seg_data, "crop_size": 32, "steps": 4, "batch_size": 4, "warmup_steps": 0,
                                 "eval_interval": 4, "eval_batch_size": 2, "decoder_channels": 16, "aux_channels": 8,
                                 "num_workers": 0, "run": fast_run},
            },
            "report": {"profile": "bad-inputs", "attention": {"data_root": str(self.segmentation), "data_format": "voc",
                                                              "images": 2, "heatmap_images": 4, "queries": 2},
                       "floors": {"like": "maskfeat-semanticmim", "pixels_img_size": 8}},
        }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("bad-inputs-base")
    generate_embedded(root / "embedded", image_size=32, train=16, val=8, seed=0, workers=1)
    encoder = export_tiny_encoder(root / "encoder", "maskfeat-semanticmim", depth=4, num_proxy=2)
    torch.manual_seed(0)
    tokenizer = root / "tokenizer.safetensors"
    DalleTokenizer(vocab_size=16, n_hid=8, group_count=3, n_blk_per_group=1).save_safetensors(tokenizer)
    return Base(root, root / "embedded" / "classification", root / "embedded" / "segmentation", encoder, tokenizer)


@pytest.fixture(scope="module")
def maskfeat_run(base, tmp_path_factory) -> Path:
    """A finished tiny maskfeat pretraining run: model.safetensors, encoder/, checkpoints/step_*/."""
    root = tmp_path_factory.mktemp("maskfeat-run")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(base.sections()))
    result = runner.invoke(app, ["pretrain", "maskfeat", "--params", str(params), "--out", str(root / "run"),
                                 "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "run"


@dataclass
class Ctx:
    tmp: Path
    base: Base
    data_files: dict
    request: Any

    def params(self, changes: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
        """The base params with `changes` ({"dotted.key": value or DROP}) written to tmp/name."""
        sections = copy.deepcopy(self.base.sections())
        for dotted, value in (changes or {}).items():
            *parents, last = dotted.split(".")
            node = sections
            for key in parents:
                node = node.setdefault(key, {})
            if value is DROP:
                node.pop(last, None)
            else:
                node[last] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    def copy(self, source: Path, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(source, target)
        return target

    def classification(self) -> Path:
        return self.copy(self.base.classification, "classification")

    def segmentation(self) -> Path:
        return self.copy(self.base.segmentation, "segmentation")

    def encoder(self) -> Path:
        return self.copy(self.base.encoder, "encoder")

    def maskfeat_run(self) -> Path:
        return self.copy(self.request.getfixturevalue("maskfeat_run"), "run")

    def image(self, stem: Path, kind: str, seed: int = 0) -> Path:
        return write_kind(stem, kind, self.data_files, seed)

    def bad_images(self, folder: Path, kinds=IMAGE_KINDS, batch: int = 8) -> dict[str, Path]:
        """One image of every kind in `folder` (a class folder of a split); -> {kind: path}. Good images of
        the split are removed until it holds a multiple of `batch` files, so that an epoch (which drops the
        last incomplete batch) reads every one of them."""
        bad = {kind: self.image(folder / f"zz-{kind}", kind, seed=i) for i, kind in enumerate(kinds)}
        files = sorted(p for p in folder.parent.rglob("*") if p.is_file())
        good = [p for p in files if not p.name.startswith("zz-")]
        for path in good[: len(files) % batch]:
            path.unlink()
        return bad


@pytest.fixture
def ctx(tmp_path, base, data_files, request) -> Ctx:
    return Ctx(tmp_path, base, data_files, request)


# ----------------------------------------------------------------------------------------- expect


@dataclass
class Expect:
    """What a case runs and how it must end (see the module docstring)."""

    args: list
    what: str  # the bad input, for the report
    needle: str | None = None  # error: the one stderr line must contain this (the file or key)
    code: int = 2
    out: Path | None = None  # the folder (or file) the command writes into
    skipped: set[str] | None = None  # skip/accept: the file names that must be counted as skipped (exactly)
    marker: Path | None = None  # a file the bad input would create if its code ran
    check: Callable[[Any], None] | None = None  # more checks on the result
    gap: str | None = None  # a known shortfall of this outcome, and the file that would need the change
    kind: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.args = [str(arg) for arg in self.args]
        self.kind = "error" if self.code else ("skip" if self.skipped else "accept")


def snapshot(path: Path | None) -> dict[str, tuple[int, int]]:
    if path is None or not path.exists():
        return {}
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def recorded_skips(out: Path) -> set[str]:
    """The files listed in every skipped.jsonl under `out` and in a shard index there."""
    paths = set()
    for report in out.rglob("skipped.jsonl"):
        paths |= {json.loads(line)["path"] for line in report.read_text().splitlines() if line.strip()}
    index = out / "index.json"
    if index.is_file():
        paths |= {entry.split(": ", 1)[0] for entry in json.loads(index.read_text())["skipped"]}
    return paths


def run_case(expect: Expect) -> dict:
    before = snapshot(expect.out)
    result = runner.invoke(app, expect.args)
    after = snapshot(expect.out)
    shown = f"$ semanticmim {' '.join(expect.args)}\n--- output ---\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"uncaught {type(result.exception).__name__} (a traceback for the user):\n{trace}\n{shown}")
    assert "Traceback" not in result.output, shown
    assert result.exit_code == expect.code, f"exit code {result.exit_code}, expected {expect.code}\n{shown}"
    half_done = [p for p in after if ".tmp" in Path(p).name]
    assert not half_done, f"temporary files left behind: {half_done}\n{shown}"
    lines = stderr_lines(result)
    if expect.code:
        errors = [line for line in lines if line.startswith("error:")]
        others = [line for line in lines if not line.startswith(("error:", "note:", "warning:"))]
        assert len(errors) == 1 and not others, f"expected one `error:` line on stderr, got {lines}\n{shown}"
        if expect.needle is not None:
            assert expect.needle in errors[0], f"{expect.needle!r} not named in {errors[0]!r}"
        changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p)
                   and (Path(p).name in FINAL_OUTPUTS or (expect.out is not None and Path(p) == expect.out))
                   and "checkpoints" not in Path(p).parts]  # complete checkpoints are resume points, kept
        assert not changed, f"a failed command wrote, changed or removed outputs: {changed}\n{shown}"
        outcome = errors[0]
    else:
        if expect.out is not None:
            skips = recorded_skips(expect.out) if expect.out.is_dir() else set()
            if expect.check is None or expect.skipped is not None:
                assert skips == (expect.skipped or set()), f"skipped {sorted(skips)}, expected " \
                                                            f"{sorted(expect.skipped or set())}\n{shown}"
        outcome = (f"exit 0, {len(expect.skipped)} counted skip(s): "
                   f"{', '.join(sorted(Path(p).name for p in expect.skipped))}"
                   if expect.skipped else "exit 0, accepted")
    if expect.marker is not None:
        assert not expect.marker.exists(), f"the pickle's code ran: {expect.marker} exists\n{shown}"
    if expect.check is not None:
        expect.check(result)
    if expect.gap:
        outcome += f" [gap: {expect.gap}]"
    return {"kind": expect.kind, "command": " ".join(a for a in expect.args[:3] if not a.startswith(("/", "-"))),
            "what": expect.what, "outcome": outcome, "gap": expect.gap}


CASES: dict[str, Callable[[Ctx], Expect]] = {}


def case(name: str, **bound):
    def register(builder: Callable[..., Expect]) -> Callable[..., Expect]:
        assert name not in CASES, name
        CASES[name] = (lambda c: builder(c, **bound)) if bound else builder
        return builder

    return register


# ------------------------------------------------------------------------------------ data prepare


def _prepare(root, kind: str, out: Path, *extra) -> list:
    return ["data", "prepare", kind, root, "--out", out, *extra]


@case("prepare-flat-folder-as-imagefolder")
def _(c: Ctx) -> Expect:
    flat = c.tmp / "flat"
    for i in range(3):
        c.image(flat / f"{i}", "gray", seed=i)
    return Expect(_prepare(flat, "imagefolder", c.tmp / "out" / "m.json"), "a flat folder of images as imagefolder",
                  str(flat), out=c.tmp / "out")


@case("prepare-flat-split-as-imagefolder")
def _(c: Ctx) -> Expect:
    flat = c.tmp / "flat"
    for i in range(3):
        c.image(flat / "train" / f"{i}", "gray", seed=i)
    return Expect(_prepare(flat, "imagefolder", c.tmp / "out" / "m.json", "--split", "train"),
                  "imagefolder split with images but no class folders", str(flat / "train"), out=c.tmp / "out")


@case("prepare-missing-split")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    return Expect(_prepare(root, "imagefolder", c.tmp / "out" / "m.json", "--split", "test"),
                  "--split test that the folder does not have", "test/", out=c.tmp / "out")


@case("prepare-missing-root")
def _(c: Ctx) -> Expect:
    return Expect(_prepare(c.tmp / "nowhere", "imagenet", c.tmp / "out" / "m.json"), "a dataset root that does "
                  "not exist", str(c.tmp / "nowhere"), out=c.tmp / "out")


@case("prepare-root-with-brackets")
def _(c: Ctx) -> Expect:
    root = c.tmp / "[v2]" / "data"  # rich markup must not eat "[v2]" out of the message
    return Expect(_prepare(root, "imagefolder", c.tmp / "out" / "m.json"), "a missing root whose path has "
                  "[brackets]", str(root), out=c.tmp / "out")


@case("prepare-unknown-kind")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    return Expect(_prepare(root, "imagefolders", c.tmp / "out" / "m.json"), "unknown dataset kind",
                  "imagefolders", out=c.tmp / "out")


@case("prepare-voc-without-imagesets")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    shutil.rmtree(root / "VOCdevkit" / "VOC2012" / "ImageSets")
    return Expect(_prepare(root, "voc", c.tmp / "out" / "m.json"), "VOC without ImageSets/", str(root),
                  out=c.tmp / "out")


@case("prepare-voc-without-imagesets-split")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    shutil.rmtree(root / "VOCdevkit" / "VOC2012" / "ImageSets")
    return Expect(_prepare(root, "voc", c.tmp / "out" / "m.json", "--split", "train"), "VOC without ImageSets/, "
                  "--split train", "ImageSets/Segmentation/train.txt", out=c.tmp / "out")


@case("prepare-voc-missing-label")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    (root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "b.png").unlink()
    return Expect(_prepare(root, "voc", c.tmp / "out" / "m.json"), "VOC id listed in train.txt without its label",
                  "SegmentationClass", out=c.tmp / "out")


def _data_params(c: Ctx, **changes) -> Path:
    return c.params({"data.out": str(c.tmp / "out" / "embedded"), **{f"data.{k}": v for k, v in changes.items()}})


@case("prepare-params-unknown-key")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", _data_params(c, image_sise=32)], "data.image_sise (typo)",
                  "data.image_sise", out=c.tmp / "out")


@case("prepare-params-string-for-number")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", _data_params(c, image_size="big")], "data.image_size: 'big'",
                  "data.image_size", out=c.tmp / "out")


@case("prepare-params-out-of-range")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", _data_params(c, train=-5)], "data.train: -5", "data.train",
                  out=c.tmp / "out")


@case("prepare-params-unknown-kind")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", _data_params(c, kind="imagefolderz")], "data.kind: imagefolderz",
                  "data.kind", out=c.tmp / "out")


@case("prepare-params-kind-without-root")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", _data_params(c, kind="voc")], "data.kind voc without data.root",
                  "root", out=c.tmp / "out")


@case("prepare-params-not-yaml")
def _(c: Ctx) -> Expect:
    params = c.tmp / "params.yaml"
    params.write_text("data: {kind: embedded, out: [unclosed\n")
    return Expect(["data", "prepare", "--params", params], "params file that is not YAML", str(params),
                  out=c.tmp / "out")


@case("prepare-params-missing-file")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", c.tmp / "nope.yaml"], "params file that does not exist",
                  "nope.yaml", out=c.tmp / "out")


@case("prepare-params-no-data-section")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "--params", c.params({"data": DROP})], "params file without `data`",
                  "'data'", out=c.tmp / "out")


@case("prepare-embedded-image-size-out-of-range")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "embedded", "--out", c.tmp / "out" / "emb", "--image-size", "8"],
                  "--image-size 8", "image_size", out=c.tmp / "out")


@case("prepare-embedded-negative-count")
def _(c: Ctx) -> Expect:
    return Expect(["data", "prepare", "embedded", "--out", c.tmp / "out" / "emb", "--train", "-1"], "--train -1",
                  "train", out=c.tmp / "out")


@case("prepare-embedded-over-foreign-folder")
def _(c: Ctx) -> Expect:
    out = c.tmp / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "README.md").write_text("not an embedded dataset\n")
    return Expect(["data", "prepare", "embedded", "--out", out / "mine", "--image-size", "32", "--train", "2",
                   "--val", "1"], "--out a folder that is not an embedded dataset", str(out / "mine"), out=out)


@case("prepare-shards-of-voc")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    return Expect(_prepare(root, "voc", c.tmp / "out", "--shards"), "--shards of a segmentation dataset", "voc",
                  out=c.tmp / "out")


@case("prepare-shards-max-side-zero")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    return Expect(_prepare(root, "imagefolder", c.tmp / "out", "--shards", "--max-side", "0"), "--max-side 0",
                  "max_side", out=c.tmp / "out")


def _shards_with(c: Ctx, kind: str) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    bad = c.image(root / "train" / "cat" / "zz-bad", kind)
    out = c.tmp / "out"

    def check(result) -> None:
        index = json.loads((out / "index.json").read_text())
        assert index["num_samples"] == 9 - (kind in SKIPPED_KINDS) + 1, index

    return Expect(_prepare(root, "imagefolder", out, "--shards"), f"{kind} image in a good imagefolder", code=0,
                  out=out, skipped={str(bad)} if kind in SKIPPED_KINDS else None, check=check)


for _kind in IMAGE_KINDS:
    case(f"prepare-shards-image-{_kind}", kind=_kind)(_shards_with)


# ------------------------------------------------------------------------------------ data inspect


def _inspect(root, layout: str, *extra) -> list:
    return ["data", "inspect", root, "--format", layout, "--workers", "1", *extra]


def _inspect_with(c: Ctx, kind: str) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    bad = c.image(root / "val" / "dog" / "zz-bad", kind)

    def check(result) -> None:
        report = json.loads(result.stdout)
        skipped = {Path(entry["path"]).name for entry in report["skipped"]}
        assert skipped == ({bad.name} if kind in SKIPPED_KINDS else set()), report["skipped"]
        assert report["splits"]["val"]["listed"] == 5 and report["usable"], report
        if kind in SKIPPED_KINDS:
            assert report["splits"]["val"]["skipped"] == 1 and bad.name in report["skipped"][0]["path"]

    return Expect(_inspect(root, "imagefolder", "--json"), f"{kind} image in a good imagefolder", code=0,
                  skipped={str(bad)} if kind in SKIPPED_KINDS else None, check=check)


for _kind in IMAGE_KINDS:
    case(f"inspect-image-{_kind}", kind=_kind)(_inspect_with)


def _voc_label(root: Path, name: str, values: np.ndarray | None = None, mode: str = "L", data_files=None) -> Path:
    path = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{name}.png"
    data_files["label"](path, values if values is not None else np.zeros((6, 8), np.uint8), mode)
    return path


@case("inspect-voc-label-out-of-range")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    label = _voc_label(root, "b", np.full((6, 8), 50, np.uint8), data_files=c.data_files)
    return Expect(_inspect(root, "voc"), "label value 50 of 21 VOC classes (exit 1: inspect's `not usable`)",
                  str(label), code=1)


@case("inspect-voc-label-rgb")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    label = _voc_label(root, "a", mode="RGB", data_files=c.data_files)
    return Expect(_inspect(root, "voc"), "colour (RGB) label (exit 1: inspect's `not usable`)", str(label), code=1)


@case("inspect-voc-label-size-mismatch")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    label = _voc_label(root, "c", np.zeros((5, 5), np.uint8), data_files=c.data_files)
    return Expect(_inspect(root, "voc"), "label 5x5 for an 8x6 image (exit 1: inspect's `not usable`)",
                  str(label), code=1)


@case("inspect-voc-label-missing")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    (root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "d.png").unlink()
    return Expect(_inspect(root, "voc"), "VOC id without its label file", "'d'")


@case("inspect-voc-label-corrupt")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    label = c.data_files["corrupt"](root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "a.png")

    def check(result) -> None:
        report = json.loads(result.stdout)
        assert [Path(entry["path"]) for entry in report["skipped"]] == [label], report

    return Expect(_inspect(root, "voc", "--split", "train", "--json"), "unreadable label PNG in a good VOC", code=0,
                  skipped={str(label)}, check=check)


@case("inspect-voc-without-imagesets")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_voc")
    shutil.rmtree(root / "VOCdevkit" / "VOC2012" / "ImageSets")
    return Expect(_inspect(root, "voc"), "VOC without ImageSets/", str(root))


@case("inspect-flat-folder-as-imagefolder")
def _(c: Ctx) -> Expect:
    for i in range(2):
        c.image(c.tmp / "flat" / f"{i}", "rgba", seed=i)
    return Expect(_inspect(c.tmp / "flat", "imagefolder"), "flat folder as imagefolder", str(c.tmp / "flat"))


@case("inspect-unknown-format")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_imagefolder")
    return Expect(_inspect(root, "cocoa"), "--format cocoa", "cocoa")


@case("inspect-void-label-out-of-range")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_pairs")
    return Expect(_inspect(root, "pairs", "--void-label", "300"), "--void-label 300", "void_label")


@case("inspect-pairs-without-classes")
def _(c: Ctx) -> Expect:
    root = c.request.getfixturevalue("data_pairs")
    (root / "classes.txt").unlink()
    return Expect(_inspect(root, "pairs"), "pairs layout without classes.txt", "classes.txt")


# ---------------------------------------------------------------------------------------- targets


class _RunsCode:
    """Unpickling this calls `function(*args)`: what a malicious encoder.pkl would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _evil_pickles(marker: Path) -> dict[str, Callable[[Path], None]]:
    shell = f"touch {marker}"
    return {
        "os-system": lambda path: path.write_bytes(pickle.dumps(_RunsCode(os.system, shell), protocol=2)),
        "builtins-exec": lambda path: path.write_bytes(pickle.dumps(
            _RunsCode(exec, f"open({str(marker)!r}, 'w').write('ran')"), protocol=4)),
        "torch-save-zip": lambda path: torch.save({"blocks.input.w": _RunsCode(os.system, shell)}, path),
        "subprocess-in-module-tree": lambda path: torch.save(
            torch.nn.Sequential(torch.nn.Linear(2, 2), _Module(_RunsCode(os.system, shell))), path),
    }


class _Module(torch.nn.Module):
    """A module holding a payload in its __dict__, as a tampered pickled Encoder could."""

    def __init__(self, payload):
        super().__init__()
        self.payload = payload


def _import_dalle(pkl: Path, out: Path) -> list:
    return ["targets", "import-dalle", pkl, out / "tokenizer.safetensors"]


def _evil_import(c: Ctx, how: str) -> Expect:
    marker = c.tmp / "PWNED"
    pkl = c.tmp / "encoder.pkl"
    _evil_pickles(marker)[how](pkl)
    assert not marker.exists()
    return Expect(_import_dalle(pkl, c.tmp / "out"), f"pickle whose unpickling would run code ({how})", str(pkl),
                  out=c.tmp / "out", marker=marker)


for _how in ("os-system", "builtins-exec", "torch-save-zip", "subprocess-in-module-tree"):
    case(f"import-dalle-pickle-runs-code-{_how}", how=_how)(_evil_import)


def _tokenizer_state(n_hid: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = DalleTokenizer(vocab_size=16, n_hid=n_hid, group_count=2, n_blk_per_group=1).state_dict()
    return {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in state.items()}


@case("import-dalle-text-file")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    pkl.write_text("this is not a pickle\n")
    return Expect(_import_dalle(pkl, c.tmp / "out"), "text file as encoder.pkl", str(pkl), out=c.tmp / "out")


@case("import-dalle-empty-file")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    pkl.write_bytes(b"")
    return Expect(_import_dalle(pkl, c.tmp / "out"), "empty encoder.pkl", str(pkl), out=c.tmp / "out")


@case("import-dalle-missing-file")
def _(c: Ctx) -> Expect:
    return Expect(_import_dalle(c.tmp / "encoder.pkl", c.tmp / "out"), "encoder.pkl that does not exist",
                  "encoder.pkl", out=c.tmp / "out")


@case("import-dalle-truncated")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    torch.save(_tokenizer_state(), pkl)
    data = pkl.read_bytes()
    pkl.write_bytes(data[: len(data) // 2])
    return Expect(_import_dalle(pkl, c.tmp / "out"), "truncated encoder.pkl", str(pkl), out=c.tmp / "out")


@case("import-dalle-foreign-state-dict")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    torch.save({**_tokenizer_state(), "decoder.extra.w": torch.zeros(2)}, pkl)
    return Expect(_import_dalle(pkl, c.tmp / "out"), "state dict with a key the DALL-E encoder lacks",
                  "decoder.extra.w", out=c.tmp / "out")


@case("import-dalle-not-a-state-dict")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    torch.save([1, 2, 3], pkl)
    return Expect(_import_dalle(pkl, c.tmp / "out"), "pickle of a list", str(pkl), out=c.tmp / "out")


@case("import-dalle-torchscript")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; such archives exist
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(pkl))
    return Expect(_import_dalle(pkl, c.tmp / "out"), "TorchScript archive as encoder.pkl", str(pkl),
                  out=c.tmp / "out")


def _dvae(c: Ctx, changes: dict, what: str, needle: str) -> Expect:
    params = c.params({f"dvae.{k}": v for k, v in changes.items()})
    return Expect(["targets", "train-dvae", "--params", params, "--out", c.tmp / "out", "--device", "cpu",
                   "--quiet"], what, needle, out=c.tmp / "out")


@case("train-dvae-unknown-key")
def _(c: Ctx) -> Expect:
    return _dvae(c, {"epoch": 1}, "dvae.epoch (typo)", "dvae.epoch")


@case("train-dvae-string-for-number")
def _(c: Ctx) -> Expect:
    return _dvae(c, {"lr": "fast"}, "dvae.lr: 'fast'", "dvae.lr")


@case("train-dvae-negative-epochs")
def _(c: Ctx) -> Expect:
    return _dvae(c, {"epochs": -1}, "dvae.epochs: -1", "dvae.epochs")


@case("train-dvae-bad-crop-scale")
def _(c: Ctx) -> Expect:
    return _dvae(c, {"crop_scale": [0.9, 0.2]}, "dvae.crop_scale: [0.9, 0.2]", "crop_scale")


@case("train-dvae-missing-data-root")
def _(c: Ctx) -> Expect:
    return _dvae(c, {"data": {"root": str(c.tmp / "nowhere"), "num_workers": 0}}, "dvae.data.root missing",
                 str(c.tmp / "nowhere"))


@case("train-dvae-dalle-weights-runs-code")
def _(c: Ctx) -> Expect:
    marker, pkl = c.tmp / "PWNED", c.tmp / "encoder.pkl"
    _evil_pickles(marker)["os-system"](pkl)
    expect = _dvae(c, {"dalle_weights": str(pkl)}, "dvae.dalle_weights: a pickle that would run code", str(pkl))
    expect.marker = marker
    return expect


@case("train-dvae-dalle-weights-refused-keeps-outputs")
def _(c: Ctx) -> Expect:
    pkl = c.tmp / "encoder.pkl"
    pkl.write_text("not a pickle\n")
    out = c.tmp / "out"
    out.mkdir()
    save_model(torch.nn.Linear(2, 2), out / "model.safetensors")  # an earlier run's outputs
    shutil.copy(c.base.tokenizer, out / "tokenizer.safetensors")
    expect = _dvae(c, {"dalle_weights": str(pkl)}, "dvae.dalle_weights: a text file, over an earlier run's outputs",
                   str(pkl))
    return expect


@case("train-dvae-bad-images")
def _(c: Ctx) -> Expect:
    data = c.classification()
    bad = c.bad_images(data / "train" / "ball")
    params = c.params({"dvae.data.root": str(data)})
    return Expect(["targets", "train-dvae", "--params", params, "--out", c.tmp / "out", "--device", "cpu", "--quiet"],
                  "every kind of bad image in the training split", code=0, out=c.tmp / "out",
                  skipped={str(bad[k]) for k in SKIPPED_KINDS})


# --------------------------------------------------------------------------------------- pretrain


def _pretrain(c: Ctx, variant: str, params: Path, out: Path | None = None) -> list:
    return ["pretrain", variant, "--params", params, "--out", out or c.tmp / "out", "--device", "cpu", "--quiet"]


def _pretrain_params(c: Ctx, changes: dict, what: str, needle: str, variant: str = "maskfeat") -> Expect:
    return Expect(_pretrain(c, variant, c.params(changes)), what, needle, out=c.tmp / "out")


@case("pretrain-unknown-variant")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {}, "variant beitt", "beitt", variant="beitt")


@case("pretrain-recipe-unknown-key")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.recipe.epoch": 1}, "pretrain.recipe.epoch (typo)", "pretrain.recipe.epoch")


@case("pretrain-recipe-string-for-number")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.recipe.lr": "fast"}, "pretrain.recipe.lr: 'fast'", "pretrain.recipe.lr")


@case("pretrain-recipe-negative-epochs")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.recipe.epochs": -2}, "pretrain.recipe.epochs: -2",
                            "pretrain.recipe.epochs")


@case("pretrain-recipe-bad-crop-scale")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.recipe.crop_scale": [0.9, 0.1]}, "pretrain.recipe.crop_scale: [0.9, 0.1]",
                            "crop_scale")


@case("pretrain-variant-override-out-of-range")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.variants": {"maskfeat": {"mask_ratio": 1.5}}},
                            "pretrain.variants.maskfeat.mask_ratio: 1.5", "pretrain.variants.maskfeat.mask_ratio")


@case("pretrain-variants-unknown-name")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.variants": {"beitt": {}}}, "pretrain.variants.beitt", "beitt")


@case("pretrain-model-unknown-key")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.model.heads": 2}, "pretrain.model.heads (typo)", "pretrain.model.heads")


@case("pretrain-model-heads-do-not-divide")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.model.num_heads": 3}, "num_heads 3 with embed_dim 32", "num_heads")


@case("pretrain-model-patch-does-not-divide")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.model.patch_size": 5}, "patch_size 5 with img_size 32", "patch_size")


@case("pretrain-missing-data-root")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.data.root": str(c.tmp / "nowhere")}, "pretrain.data.root missing",
                            str(c.tmp / "nowhere"))


@case("pretrain-shards-without-index")
def _(c: Ctx) -> Expect:
    (c.tmp / "shards").mkdir()
    return _pretrain_params(c, {"pretrain.data.root": str(c.tmp / "shards"), "pretrain.data.format": "shards"},
                            "pretrain.data.format shards on a folder without index.json", "index.json")


@case("pretrain-beit-tokenizer-text-file")
def _(c: Ctx) -> Expect:
    (c.tmp / "tokenizer.safetensors").write_text("not weights\n")
    return _pretrain_params(c, {"pretrain.tokenizer": str(c.tmp / "tokenizer.safetensors")},
                            "pretrain.tokenizer: a text file", str(c.tmp / "tokenizer.safetensors"), variant="beit")


@case("pretrain-beit-tokenizer-missing")
def _(c: Ctx) -> Expect:
    return _pretrain_params(c, {"pretrain.tokenizer": str(c.tmp / "none.safetensors")},
                            "pretrain.tokenizer that does not exist", str(c.tmp / "none.safetensors"), variant="beit")


@case("pretrain-bad-images")
def _(c: Ctx) -> Expect:
    data = c.classification()
    bad = c.bad_images(data / "train" / "boat")
    return Expect(_pretrain(c, "mocov3", c.params({"pretrain.data.root": str(data)})),
                  "every kind of bad image in the training split", code=0, out=c.tmp / "out",
                  skipped={str(bad[k]) for k in SKIPPED_KINDS})


def _checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


@case("pretrain-resume-wrong-variant")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    return Expect(_pretrain(c, "beit", c.params(), run), "a maskfeat checkpoint resumed as beit", "variant='maskfeat'",
                  out=run)


@case("pretrain-resume-truncated-model")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    c.data_files["truncate"](_checkpoint(run) / "model.safetensors")
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint with a truncated model.safetensors",
                  str(_checkpoint(run)), out=run)


@case("pretrain-resume-truncated-optimizer")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    c.data_files["truncate"](_checkpoint(run) / "optimizer.safetensors")
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint with a truncated optimizer.safetensors",
                  "optimizer.safetensors", out=run)


@case("pretrain-resume-truncated-state")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    c.data_files["truncate"](_checkpoint(run) / "state.json")
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint with a truncated state.json",
                  "state.json", out=run)


@case("pretrain-resume-state-not-an-object")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    (_checkpoint(run) / "state.json").write_text("[1, 2]\n")
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint whose state.json is a JSON list",
                  "state.json", out=run)


@case("pretrain-resume-state-of-another-optimizer")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    state = json.loads((_checkpoint(run) / "state.json").read_text())
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]  # one group of two
    (_checkpoint(run) / "state.json").write_text(json.dumps(state))
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint whose optimizer state has other param "
                  "groups", "optimizer state", out=run)


@case("pretrain-resume-foreign-model")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    save_file({"weight": torch.zeros(3, 3)}, str(_checkpoint(run) / "model.safetensors"))
    return Expect(_pretrain(c, "maskfeat", c.params(), run), "checkpoint whose model.safetensors is a foreign "
                  "safetensors file", str(_checkpoint(run)), out=run)


@case("pretrain-resume-other-architecture")
def _(c: Ctx) -> Expect:
    run = c.maskfeat_run()
    return Expect(_pretrain(c, "maskfeat", c.params({"pretrain.model.embed_dim": 16}), run),
                  "maskfeat checkpoint resumed with another embed_dim", str(_checkpoint(run)), out=run)


# ----------------------------------------------------------------------------------------- export


def _export(checkpoint: Path, out: Path, *extra) -> list:
    return ["export", checkpoint, out, *extra]


@case("export-missing-checkpoint")
def _(c: Ctx) -> Expect:
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "checkpoint that does not exist",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-text-file-named-model-safetensors")
def _(c: Ctx) -> Expect:
    (c.tmp / "model.safetensors").write_text("not weights\n")
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "text file named model.safetensors",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-foreign-safetensors")
def _(c: Ctx) -> Expect:
    save_file({"layer.weight": torch.randn(4, 4)}, str(c.tmp / "model.safetensors"))
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "random safetensors without our metadata",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-truncated-checkpoint")
def _(c: Ctx) -> Expect:
    path = c.data_files["truncate"](Path(shutil.copy(c.base.encoder.parent / "model.safetensors", c.tmp)))
    return Expect(_export(path, c.tmp / "out"), "truncated model.safetensors", str(path), out=c.tmp / "out")


@case("export-metadata-not-json")
def _(c: Ctx) -> Expect:
    save_file({"w": torch.zeros(2)}, str(c.tmp / "model.safetensors"), metadata={"semanticmim": "{kind: mim"})
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "our metadata key holding broken JSON",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-metadata-bad-config")
def _(c: Ctx) -> Expect:
    header = json.dumps({"kind": "mim", "config": {"encoder": {"depth": 2}, "semantic": "yes", "flavour": 1}})
    save_file({"w": torch.zeros(2)}, str(c.tmp / "model.safetensors"), metadata={"semanticmim": header})
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "our metadata with a config of unknown keys",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-metadata-without-kind")
def _(c: Ctx) -> Expect:
    save_file({"w": torch.zeros(2)}, str(c.tmp / "model.safetensors"), metadata={"semanticmim": '["mim"]'})
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "our metadata key holding a JSON list",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-weights-disagree-with-metadata")
def _(c: Ctx) -> Expect:
    path = Path(shutil.copy(c.base.encoder.parent / "model.safetensors", c.tmp / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    header = json.loads(metadata["semanticmim"])
    header["config"]["encoder"]["depth"] = 2  # the weights hold 4 blocks
    save_file(state, str(path), metadata={"semanticmim": json.dumps(header)})
    return Expect(_export(path, c.tmp / "out"), "weights of 4 blocks under a config of 2", str(path),
                  out=c.tmp / "out")


@case("export-dvae-model")
def _(c: Ctx) -> Expect:
    from semanticmim.targets.dvae import DiscreteVAE

    save_model(DiscreteVAE(16, 8, 2, 1, 8), c.tmp / "model.safetensors")
    return Expect(_export(c.tmp / "model.safetensors", c.tmp / "out"), "a dVAE model.safetensors (no ViT encoder)",
                  str(c.tmp / "model.safetensors"), out=c.tmp / "out")


@case("export-unknown-target-format")
def _(c: Ctx) -> Expect:
    return Expect(_export(c.base.encoder.parent / "model.safetensors", c.tmp / "out", "--to", "onnx"), "--to onnx",
                  "onnx", out=c.tmp / "out")


# ------------------------------------------------------------------------------------------- eval

PROTOCOLS = ("linear-cls", "linear-seg", "finetune-cls", "finetune-seg")


def _key(protocol: str) -> str:
    return protocol.replace("-", "_")


def _eval(c: Ctx, protocol: str, params: Path, encoder: Path | None = None, *extra) -> list:
    return ["eval", protocol, "--encoder", encoder or c.base.encoder, "--params", params, "--out", c.tmp / "out",
            "--device", "cpu", "--quiet", *extra]


def _eval_params(c: Ctx, protocol: str, changes: dict, what: str, needle: str) -> Expect:
    params = c.params({f"eval.{_key(protocol)}.{k}": v for k, v in changes.items()})
    return Expect(_eval(c, protocol, params), what, needle, out=c.tmp / "out")


def _edit_config(encoder: Path, **kwargs) -> None:
    config = json.loads((encoder / "config.json").read_text())
    config["kwargs"].update(kwargs)
    (encoder / "config.json").write_text(json.dumps(config))


ENCODER_FOLDERS: dict[str, tuple[str, Callable[[Path], str]]] = {
    "missing-config": ("encoder folder without config.json",
                       lambda enc: (enc / "config.json").unlink() or str(enc)),
    "config-not-json": ("config.json that is not JSON",
                        lambda enc: _write(enc / "config.json", "{architecture: vit")),
    "embed-dim-disagrees": ("weights of embed_dim 32 under a config.json of 64",
                            lambda enc: _edit_config(enc, embed_dim=64) or str(enc / "model.safetensors")),
    "reg-tokens-disagree": ("weights of 1 register token under a config.json of 3",
                            lambda enc: _edit_config(enc, reg_tokens=3) or str(enc / "model.safetensors")),
    "img-size-disagrees": ("pos-embed of a 4x4 grid under a config.json img_size of 64",
                           lambda enc: _edit_config(enc, img_size=64) or str(enc / "model.safetensors")),
    "weights-text-file": ("text file named model.safetensors",
                          lambda enc: _write(enc / "model.safetensors", "not weights\n")),
    "weights-truncated": ("model.safetensors cut after 999 bytes",
                          lambda enc: _write(enc / "model.safetensors",
                                             (enc / "model.safetensors").read_bytes()[:999])),
}


def _write(path: Path, data: str | bytes) -> str:
    """Write `data` to `path`; -> the path, as the needle of an error naming it."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def _eval_encoder(c: Ctx, protocol: str, folder: str) -> Expect:
    encoder = c.encoder()
    what, make = ENCODER_FOLDERS[folder]
    needle = make(encoder)
    return Expect(_eval(c, protocol, c.params(), encoder), what, needle, out=c.tmp / "out")


def _eval_bad_images(c: Ctx, protocol: str) -> Expect:
    if protocol.endswith("cls"):
        data = c.classification()
        bad = [*c.bad_images(data / "train" / "car").items(), *c.bad_images(data / "val" / "car").items()]
        changes = {f"eval.{_key(protocol)}.data.root": str(data)}
        skipped = {str(path) for kind, path in bad if kind in SKIPPED_KINDS}
        what = "every kind of bad image in the train and val splits"
    else:
        data = c.segmentation()
        images = data / "JPEGImages"
        ids = [line for line in (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split() if line]
        bad = {kind: c.image(images / ids[i], kind, seed=i) for i, kind in enumerate(IMAGE_KINDS)}
        changes = {f"eval.{_key(protocol)}.data.root": str(data)}
        skipped = {str(path) for kind, path in bad.items() if kind in SKIPPED_KINDS}
        what = "every kind of bad image in the train split"
    return Expect(_eval(c, protocol, c.params(changes)), what, code=0, out=c.tmp / "out", skipped=skipped)


def _seg_label(c: Ctx, protocol: str, how: str) -> Expect:
    data = c.segmentation()
    ids = [line for line in (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split() if line]
    label = data / "SegmentationClass" / f"{ids[1]}.png"
    if how == "out-of-range":
        c.data_files["label"](label, np.full((32, 32), 200, np.uint8), "L")
        what, needle = "label value 200 of 16 classes", str(label)
    elif how == "missing":
        label.unlink()
        what, needle = "training id without its label PNG", repr(ids[1])
    else:
        c.data_files["corrupt"](label)
        changes = {f"eval.{_key(protocol)}.data.root": str(data)}
        return Expect(_eval(c, protocol, c.params(changes)), "unreadable label PNG in the train split", code=0,
                      out=c.tmp / "out", skipped={str(label)})
    return Expect(_eval(c, protocol, c.params({f"eval.{_key(protocol)}.data.root": str(data)})), what, needle,
                  out=c.tmp / "out")


def _eval_layout(c: Ctx, protocol: str) -> Expect:
    if protocol.endswith("cls"):
        for i in range(4):
            c.image(c.tmp / "flat" / "train" / f"{i}", "gray", seed=i)
            c.image(c.tmp / "flat" / "val" / f"{i}", "gray", seed=i)
        root, what, needle = c.tmp / "flat", "train/ and val/ with images but no class folders", "flat"
    else:
        root = c.segmentation()
        shutil.rmtree(root / "ImageSets")
        what, needle = "VOC without ImageSets/", str(root)
    return Expect(_eval(c, protocol, c.params({f"eval.{_key(protocol)}.data.root": str(root)})), what, needle,
                  out=c.tmp / "out")


def _eval_wrong_format(c: Ctx, protocol: str) -> Expect:
    layout, root = ("voc", c.base.segmentation) if protocol.endswith("cls") else ("imagefolder", c.base.classification)
    return Expect(_eval(c, protocol, c.params(), None, "--data", root, "--format", layout),
                  f"--format {layout} for a {protocol.split('-')[1]} protocol", layout, out=c.tmp / "out")


for _protocol in PROTOCOLS:
    _k = _key(_protocol)
    _length = {"epochs": -1} if _protocol != "finetune-seg" else {"steps": -1}
    _crop = ({"crop_scale": [0.9, 0.2]}, "crop_scale") if _protocol != "finetune-seg" else (
        {"ratio_range": [2.0, 0.5]}, "ratio_range")
    _size = "crop_size" if _protocol == "finetune-seg" else "img_size"
    _params_cases = {
        "unknown-key": ({"epoch" if _protocol != "finetune-seg" else "step": 1}, f"eval.{_k}.epoch(s) typo",
                        f"eval.{_k}.ep" if _protocol != "finetune-seg" else f"eval.{_k}.step"),
        "string-for-number": ({"lr": "fast"}, f"eval.{_k}.lr: 'fast'", f"eval.{_k}.lr"),
        "negative-length": (_length, f"eval.{_k}.{next(iter(_length))}: -1", f"eval.{_k}.{next(iter(_length))}"),
        "bad-crop": (_crop[0], f"eval.{_k}.{_crop[1]}: {next(iter(_crop[0].values()))}", _crop[1]),
        "missing-split": ({"val_split": "nope"}, f"eval.{_k}.val_split: nope (not on disk)", "nope"),
        "size-not-patch-multiple": ({_size: 36}, f"eval.{_k}.{_size}: 36 (patch 8)", f"{_size}=36"),
        "unknown-setting-value": ({"run": {"amp": "fp8"}}, f"eval.{_k}.run.amp: fp8", f"eval.{_k}.run.amp"),
        "no-data-section": ({"data": DROP}, f"eval.{_k} without data:", f"eval.{_k}"),
    }
    for _name, (_changes, _what, _needle) in _params_cases.items():
        case(f"eval-{_protocol}-{_name}", protocol=_protocol, changes=_changes, what=_what, needle=_needle)(
            _eval_params)
    for _folder in ENCODER_FOLDERS:
        case(f"eval-{_protocol}-encoder-{_folder}", protocol=_protocol, folder=_folder)(_eval_encoder)
    case(f"eval-{_protocol}-wrong-layout", protocol=_protocol)(_eval_layout)
    case(f"eval-{_protocol}-wrong-format", protocol=_protocol)(_eval_wrong_format)
    case(f"eval-{_protocol}-bad-images", protocol=_protocol)(_eval_bad_images)
    if _protocol.endswith("seg"):
        for _how in ("out-of-range", "missing", "corrupt"):
            case(f"eval-{_protocol}-label-{_how}", protocol=_protocol, how=_how)(_seg_label)


@case("eval-unknown-protocol")
def _(c: Ctx) -> Expect:
    return Expect(_eval(c, "linear-det", c.params()), "protocol linear-det", "linear-det", out=c.tmp / "out")


@case("eval-unknown-format-option")
def _(c: Ctx) -> Expect:
    return Expect(_eval(c, "linear-cls", c.params(), None, "--data", c.base.classification, "--format", "coco"),
                  "--format coco", "coco", out=c.tmp / "out")


@case("eval-linear-seg-label-out-of-range-in-workers")
def _(c: Ctx) -> Expect:
    expect = _seg_label(c, "linear-seg", "out-of-range")
    params = Path(expect.args[expect.args.index("--params") + 1])
    values = yaml.safe_load(params.read_text())
    values["eval"]["linear_seg"]["num_workers"] = 1  # the error crosses a DataLoader worker process
    params.write_text(yaml.safe_dump(values))
    expect.what += " (read in a DataLoader worker)"
    return expect


@case("eval-finetune-cls-pooling-without-prefix")
def _(c: Ctx) -> Expect:
    encoder = c.encoder()
    from safetensors.torch import load_file

    state = load_file(str(encoder / "model.safetensors"))
    state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()
             if k not in ("cls_token", "reg_token")}  # global_pool="avg": timm's final norm is fc_norm
    state["pos_embed"] = state["pos_embed"][:, 2:]
    save_file(state, str(encoder / "model.safetensors"))
    _edit_config(encoder, class_token=False, reg_tokens=0, global_pool="avg")
    return Expect(_eval(c, "finetune-cls", c.params(), encoder), "heads: [cls] on an encoder without prefix tokens",
                  "class_token=False", out=c.tmp / "out")


# -------------------------------------------------------------------------------------- attention


def _attention(c: Ctx, params: Path, encoder: Path | None = None) -> list:
    return ["attention", "--encoder", encoder or c.base.encoder, "--params", params, "--out", c.tmp / "out",
            "--device", "cpu"]


def _attention_params(c: Ctx, changes: dict, what: str, needle: str) -> Expect:
    params = c.params({f"report.attention.{k}": v for k, v in changes.items()})
    return Expect(_attention(c, params), what, needle, out=c.tmp / "out")


@case("attention-unknown-key")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"image": 2}, "report.attention.image (typo)", "report.attention.image")


@case("attention-string-for-number")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"queries": "two"}, "report.attention.queries: 'two'", "report.attention.queries")


@case("attention-unknown-format")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"data_format": "imagefolder"}, "report.attention.data_format: imagefolder",
                             "report.attention.data_format")


@case("attention-out-of-range-fraction")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"min_label_fraction": 1.5}, "report.attention.min_label_fraction: 1.5",
                             "report.attention.min_label_fraction")


@case("attention-missing-split")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"split": "nope"}, "report.attention.split: nope", "nope.txt")


@case("attention-img-size-not-patch-multiple")
def _(c: Ctx) -> Expect:
    return _attention_params(c, {"img_size": 30}, "report.attention.img_size: 30", "report.attention.img_size")


@case("attention-encoder-missing-config")
def _(c: Ctx) -> Expect:
    encoder = c.encoder()
    (encoder / "config.json").unlink()
    return Expect(_attention(c, c.params(), encoder), "encoder folder without config.json", str(encoder),
                  out=c.tmp / "out")


@case("attention-encoder-shapes-disagree")
def _(c: Ctx) -> Expect:
    encoder = c.encoder()
    _edit_config(encoder, depth=6)
    return Expect(_attention(c, c.params(), encoder), "weights of 4 blocks under a config.json of 6",
                  str(encoder / "model.safetensors"), out=c.tmp / "out")


def _attention_data(c: Ctx, how: str) -> Expect:
    data = c.segmentation()
    ids = [line for line in (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split() if line]
    if how == "label-out-of-range":
        path = data / "SegmentationClass" / f"{ids[0]}.png"
        c.data_files["label"](path, np.full((32, 32), 77, np.uint8), "L")
        what = "label value 77 in the val split"
    else:
        path = c.image(data / "JPEGImages" / ids[0], how)
        what = f"{how} image in the val split"
    params = c.params({"report.attention.data_root": str(data), "report.attention.heatmap_images": len(ids)})
    if how.startswith("label"):
        return Expect(_attention(c, params), what, str(path), out=c.tmp / "out")
    return Expect(_attention(c, params), what, code=0, out=c.tmp / "out", skipped={str(path)})


for _how in ("label-out-of-range", "truncated", "not-an-image"):
    case(f"attention-{_how}", how=_how)(_attention_data)


# ----------------------------------------------------------------------------------------- floors


def _random_init(c: Ctx, params: Path) -> list:
    return ["floor", "random-init", "--params", params, "--out", c.tmp / "out"]


def _raw_pixels(c: Ctx, params: Path) -> list:
    return ["floor", "raw-pixels", "--params", params, "--out", c.tmp / "out", "--quiet"]


@case("floor-random-init-unknown-variant")
def _(c: Ctx) -> Expect:
    return Expect(_random_init(c, c.params({"report.floors.like": "beitt"})), "report.floors.like: beitt",
                  "report.floors.like", out=c.tmp / "out")


@case("floor-random-init-unknown-key")
def _(c: Ctx) -> Expect:
    return Expect(_random_init(c, c.params({"report.floors.seeds": 1})), "report.floors.seeds (typo)",
                  "report.floors.seeds", out=c.tmp / "out")


@case("floor-random-init-string-for-number")
def _(c: Ctx) -> Expect:
    return Expect(_random_init(c, c.params({"report.floors.seed": "zero"})), "report.floors.seed: 'zero'",
                  "report.floors.seed", out=c.tmp / "out")


@case("floor-random-init-no-report-section")
def _(c: Ctx) -> Expect:
    return Expect(_random_init(c, c.params({"report": DROP})), "params without `report`", "'report'",
                  out=c.tmp / "out")


@case("floor-random-init-bad-model")
def _(c: Ctx) -> Expect:
    return Expect(_random_init(c, c.params({"pretrain.model.depth": 0})), "pretrain.model.depth: 0",
                  "pretrain.model.depth", out=c.tmp / "out")


@case("floor-raw-pixels-string-for-number")
def _(c: Ctx) -> Expect:
    return Expect(_raw_pixels(c, c.params({"eval.linear_cls.epochs": "two"})), "eval.linear_cls.epochs: 'two'",
                  "eval.linear_cls.epochs", out=c.tmp / "out")


@case("floor-raw-pixels-unknown-key")
def _(c: Ctx) -> Expect:
    return Expect(_raw_pixels(c, c.params({"eval.linear_cls.batchsize": 4})), "eval.linear_cls.batchsize (typo)",
                  "eval.linear_cls.batchsize", out=c.tmp / "out")


@case("floor-raw-pixels-negative-size")
def _(c: Ctx) -> Expect:
    return Expect(_raw_pixels(c, c.params({"report.floors.pixels_img_size": -4})),
                  "report.floors.pixels_img_size: -4", "report.floors.pixels_img_size", out=c.tmp / "out")


@case("floor-raw-pixels-flat-folder")
def _(c: Ctx) -> Expect:
    for i in range(2):
        c.image(c.tmp / "flat" / "train" / f"{i}", "palette", seed=i)
    return Expect(_raw_pixels(c, c.params({"eval.linear_cls.data.root": str(c.tmp / "flat")})),
                  "eval.linear_cls.data.root: images without class folders", "flat", out=c.tmp / "out")


@case("floor-raw-pixels-bad-images")
def _(c: Ctx) -> Expect:
    data = c.classification()
    bad = c.bad_images(data / "train" / "star")
    return Expect(_raw_pixels(c, c.params({"eval.linear_cls.data.root": str(data)})),
                  "every kind of bad image in the train split", code=0, out=c.tmp / "out",
                  skipped={str(bad[k]) for k in SKIPPED_KINDS})


# ----------------------------------------------------------------------------------------- report


def _report(c: Ctx, params: Path) -> list:
    return ["report", "--params", params, "--out", c.tmp / "out"]


@case("report-unknown-key")
def _(c: Ctx) -> Expect:
    return Expect(_report(c, c.params({"report.profil": "x"})), "report.profil (typo)", "report.profil",
                  out=c.tmp / "out")


@case("report-string-for-bool")
def _(c: Ctx) -> Expect:
    return Expect(_report(c, c.params({"report.paper_scale": "maybe"})), "report.paper_scale: 'maybe'",
                  "report.paper_scale", out=c.tmp / "out")


@case("report-no-eval-section")
def _(c: Ctx) -> Expect:
    return Expect(_report(c, c.params({"eval": DROP})), "params without `eval`", "'eval'", out=c.tmp / "out")


def _report_maps(c: Ctx, how: str) -> Expect:
    maps = c.tmp / "runs" / "attention" / "beit" / "maps.safetensors"
    maps.parent.mkdir(parents=True)
    if how == "text":
        maps.write_text("not maps\n")
    else:
        save_file({"images": torch.zeros(1, 4, 4, 3, dtype=torch.uint8)}, str(maps))
    return Expect(_report(c, c.params()), f"runs/attention/beit/maps.safetensors: {how}", str(maps),
                  out=c.tmp / "out")


for _how in ("text", "no-metadata"):
    case(f"report-attention-maps-{_how}", how=_how)(_report_maps)


# ------------------------------------------------------------------------------------------ bench


def _bench(folder: Path, *extra) -> list:
    return ["bench", "--data", folder, "--img-size", "16", "--seconds", "0.01", "--limit", "20", *extra]


@case("bench-data-missing-folder")
def _(c: Ctx) -> Expect:
    return Expect(_bench(c.tmp / "nowhere"), "--data a folder that does not exist", str(c.tmp / "nowhere"))


@case("bench-data-no-images")
def _(c: Ctx) -> Expect:
    (c.tmp / "docs").mkdir()
    (c.tmp / "docs" / "notes.txt").write_text("no images here\n")
    return Expect(_bench(c.tmp / "docs"), "--data a folder without image files", str(c.tmp / "docs"))


@case("bench-data-only-unreadable")
def _(c: Ctx) -> Expect:
    for kind in ("empty", "not-an-image"):
        c.image(c.tmp / "bad" / kind, kind)
    return Expect(_bench(c.tmp / "bad"), "--data a folder of unreadable files only", "none of the 2 files")


@case("bench-data-with-sample-photos")
def _(c: Ctx) -> Expect:
    return Expect(_bench(c.base.classification, "--sample-photos", "2"), "--data with --sample-photos",
                  "--sample-photos")


def _bench_with(c: Ctx, kind: str) -> Expect:
    folder = c.tmp / "images"
    for i in range(3):
        c.image(folder / f"good{i}", "rgba" if i else "gray", seed=i)
    bad = c.image(folder / "zz-bad", kind)
    what = f"{kind} image among good ones"
    unreadable = kind in SKIPPED_KINDS

    def check(result) -> None:
        records = json.loads(result.stdout)
        assert {r["pipeline"] for r in records} >= {"decode", "maskfeat"}, records
        assert all(r["skipped_files"] == int(unreadable) for r in records), records
        assert (f"skipped: {bad}" in result.stderr) == unreadable, result.stderr  # counted and named

    return Expect([*_bench(folder), "--json"], what, code=0, check=check)


for _kind in IMAGE_KINDS:
    case(f"bench-data-image-{_kind}", kind=_kind)(_bench_with)


# ------------------------------------------------------------------------------------------ tests


# Cases that still end in a traceback or a silent accept because the code to change is outside the files this
# corpus' fixes could touch; strict, so that the fix turns them into failures that ask to drop the mark.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
                                  if name in KNOWN_FAILURES else name for name in CASES])
def test_bad_input(name: str, ctx: Ctx) -> None:
    expect = CASES[name](ctx)
    RESULTS.append({"name": name, **run_case(expect)})


def test_zz_count(tmp_path_factory, capsys) -> None:
    """The closing figure: N cases, N one-line errors/skips, 0 tracebacks, over the cases that ran and passed
    (a traceback fails its case); the known failures are counted apart."""
    if not RESULTS:
        pytest.skip("no case ran (selected out)")
    errors = sum(r["kind"] == "error" for r in RESULTS)
    skips = sum(r["kind"] == "skip" for r in RESULTS)
    accepted = sum(r["kind"] == "accept" for r in RESULTS)
    gaps = [r for r in RESULTS if r["gap"]]
    line = (f"{len(RESULTS)} cases, {errors + skips} one-line errors/skips ({errors} errors, {skips} counted skips), "
            f"{accepted} accepted (converted image modes or good input), 0 tracebacks; {len(gaps)} with a known gap; "
            f"{len(KNOWN_FAILURES)} known failures (xfail) outside the files the fixes could change")
    table = "\n".join(f"{r['name']}: {r['command']} | {r['what']} | {r['outcome']}" for r in RESULTS)
    known = "\n".join(f"{name}: XFAIL | {reason}" for name, reason in KNOWN_FAILURES.items())
    report = tmp_path_factory.getbasetemp() / "bad_inputs.txt"
    report.write_text(f"{line}\n\n{table}\n{known}\n")
    with capsys.disabled():
        print(f"\nbad-input corpus: {line}\n(one line per case: {report})")
    if len(RESULTS) == len(CASES) - len(KNOWN_FAILURES):
        assert errors + skips + accepted == len(RESULTS)
