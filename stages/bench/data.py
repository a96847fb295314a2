"""Single-core decode + augmentation throughput of every pretraining/evaluation pipeline.

`maskfeat-reference` is the baseline the MaskFeat pipeline is compared with in the same run: the
textbook torchvision pipeline of MAE's and timm's training scripts (PIL decode, RandomResizedCrop
bicubic, flip, ToTensor, Normalize → float32), on the same crop distribution.

`img_per_s_per_core` divides images by the *CPU time* this process spent (torch limited to one thread
for the measurement), so that other load on the machine does not halve it; `wall_seconds` is given
too. This is what one DataLoader worker delivers; N workers on N free cores deliver about N times it.
"""

import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import cycle, islice
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from semanticmim.data.decode import EncodedImage, UnreadableImage
from semanticmim.data.shards import ShardDataset, write_shards
from semanticmim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BeitTwoView,
    ClassifierEval,
    FinetuneTrain,
    MocoTwoView,
    linear_probe_transform,
    maskfeat_transform,
)
from semanticmim.errors import InputError

__all__ = ["PIPELINES", "collect_images", "measure_pipelines"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def maskfeat_reference(img_size: int) -> Callable[[EncodedImage], torch.Tensor]:
    """MaskFeat's augmentation as MAE's/timm's scripts write it, from the file bytes: float32 (3, S, S)."""
    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return lambda image: transform(Image.open(io.BytesIO(image.data)).convert("RGB"))


# name → transform factory taking img_size; "decode" is the floor: file read + full decode, no augmentation
PIPELINES: dict[str, Callable[[int], Callable]] = {
    "decode": lambda img_size: lambda image: image.decode_tensor()[0],
    "maskfeat": maskfeat_transform,
    "maskfeat-reference": maskfeat_reference,
    "beit": BeitTwoView,
    "mocov3": MocoTwoView,
    "finetune": FinetuneTrain,
    "linear": linear_probe_transform,
    "eval": ClassifierEval,
}


def measure_pipelines(
    samples: Sequence[Path],
    img_size: int = 224,
    *,
    seconds: float = 2.0,
    max_images: int | None = None,
    pipelines: Sequence[str] = tuple(PIPELINES),
    shards: Sequence[str] = ("maskfeat",),
    shard_max_side: int = 320,
    seed: int = 0,
) -> tuple[list[dict], list[str]]:
    """Time each pipeline on `samples` (cycled), from file bytes to augmented tensors.

    Each pipeline runs for `seconds` of CPU time or `max_images` images, whichever comes first. The
    pipelines named in `shards` are also timed reading the same images from WebDataset shards
    written (into a temporary directory) with longer side ≤ shard_max_side.
    Returns one record per run: {pipeline, source ("folder" | "shards"), img_size, images, seconds
    (CPU), wall_seconds, img_per_s_per_core, bits_per_pixel (of the files read: decode time grows
    with it), skipped_files}; when `maskfeat-reference` ran, the MaskFeat records add vs_reference = their
    img/s over its. -> (records, the unreadable files skipped)."""
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise InputError(f"pipelines {unknown}: expected some of {sorted(PIPELINES)}")
    if not samples:
        raise InputError("samples: expected at least one image file")
    readable = [path for path in samples if _readable(path)]
    if not readable:
        raise InputError(f"samples: none of the {len(samples)} files is a readable image, e.g. {samples[0]}")
    skipped = [str(path) for path in samples if path not in set(readable)]
    records = []
    bits = _bits_per_pixel(EncodedImage.from_file(path) for path in readable)
    with _one_thread():
        torch.manual_seed(seed)
        for name in pipelines:
            transform = PIPELINES[name](img_size)
            sources = (EncodedImage.from_file(path) for path in cycle(readable))
            records.append(_measure(name, "folder", img_size, transform, sources, seconds, max_images) | bits)
        if shards:
            records += _measure_shards(readable, img_size, shards, shard_max_side, seconds, max_images)
    return [{**record, "skipped_files": len(skipped)} for record in _with_ratios(records)], skipped


def _with_ratios(records: list[dict]) -> list[dict]:
    reference = next((r for r in records if r["pipeline"] == "maskfeat-reference"), None)
    if reference is None:
        return records
    for record in records:
        if record["pipeline"] == "maskfeat":
            record["vs_reference"] = round(record["img_per_s_per_core"] / reference["img_per_s_per_core"], 3)
    return records


def _bits_per_pixel(images: Iterable[EncodedImage]) -> dict[str, float]:
    """{"bits_per_pixel": encoded bits / pixels, over all `images`}."""
    bits = pixels = 0
    for image in images:
        bits, pixels = bits + 8 * len(image.data), pixels + image.size[0] * image.size[1]
    return {"bits_per_pixel": round(bits / max(pixels, 1), 3)}


def collect_images(root: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under `root` (recursively, sorted), at most `limit`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; expected a folder of images")
    files = (path for path in sorted(root.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    found = list(islice(files, limit))
    if not found:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return found


def _measure(
    name: str,
    source: str,
    img_size: int,
    transform: Callable,
    images: Iterator,
    seconds: float,
    max_images: int | None,
) -> dict:
    for image in islice(images, 3):  # warm-up: first-call allocations and lazy imports
        transform(image)
    count, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu_start < seconds and (max_images is None or count < max_images):
        transform(next(images))
        count += 1
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    return {
        "pipeline": name,
        "source": source,
        "img_size": img_size,
        "images": count,
        "seconds": round(cpu, 6),
        "wall_seconds": round(wall, 6),
        "img_per_s_per_core": round(count / max(cpu, 1e-9), 1),
    }


def _measure_shards(
    samples: Sequence[Path],
    img_size: int,
    names: Iterable[str],
    max_side: int,
    seconds: float,
    max_images: int | None,
) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="semanticmim-bench-") as folder:
        write_shards([(path, 0) for path in samples], folder, max_side=max_side, shard_size=256)
        bits = _bits_per_pixel(image for image, _ in ShardDataset(folder).encoded())
        records = []
        for name in names:
            transform = PIPELINES[name](img_size)
            dataset = ShardDataset(folder)
            record = _measure(name, "shards", img_size, transform, _endless(dataset), seconds, max_images)
            records.append(record | bits)
        return records


def _endless(dataset: ShardDataset) -> Iterator[EncodedImage]:
    """Encoded images read from the shards over and over; the tar reading is inside the timing."""
    while True:
        yield from (image for image, _ in dataset.encoded())


def _readable(path: Path) -> bool:
    """Whether the whole file decodes (a header that parses is not enough: truncated pixels fail later)."""
    try:
        EncodedImage.from_file(path).decode()
    except UnreadableImage:
        return False
    return True


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
