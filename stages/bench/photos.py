"""ImageNet-like JPEGs made from scikit-image's bundled colour photographs, for reproducible data benchmarks.

Decode cost depends on the content, not only the pixel count: entropy (Huffman) decoding takes time in
proportion to the compressed bits, and smooth synthetic images compress to a fraction of a photo's bits,
so they make decoding look faster than it is. ImageNet train JPEGs average ≈ 469 × 387 px and ≈ 115 kB
(138 GB / 1.28 M files), ≈ 5 bits per pixel. `write_photo_jpegs` gives that pixel count (500 × 375 by
default) with real photographic content — crops of the colour photographs that ship inside scikit-image,
so nothing is downloaded — saved as baseline JPEGs with PIL's 4:2:0 chroma subsampling.

The photographs hold less fine detail than the average ImageNet photo (some are upsampled, the rocket and
the retina have large smooth areas): at quality 90 they average only 2.26 bits per pixel, at 97 4.12.
The default quality 98 gives 4.69 bits per pixel (≈ 110 kB a file), the nearest to ImageNet's figure.
`semanticmim bench --data` reports the bits per pixel of whatever it measures.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from semanticmim.errors import InputError

__all__ = ["PHOTO_NAMES", "write_photo_jpegs"]

# the colour natural photographs whose files are inside the skimage package (no pooch download)
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)

CROP_AREA = (0.5, 1.0)  # fraction of the photo's area kept by a crop
CROP_ASPECT = 4 / 3  # crop aspect is the output's aspect times a log-uniform factor in [1/this, this]


def write_photo_jpegs(
    folder: str | Path,
    count: int = 200,
    size: tuple[int, int] = (500, 375),
    quality: int = 98,
    seed: int = 0,
) -> list[Path]:
    """Write `count` JPEGs `0000.jpg`, `0001.jpg`, … of exactly `size` (width, height) px into `folder`.

    Each is a random crop (area fraction CROP_AREA, aspect jitter CROP_ASPECT) of a randomly chosen
    bundled photograph, resized with Lanczos to `size`, flipped left-right half of the time, and saved by
    PIL at `quality` with its default 4:2:0 subsampling. The bytes depend only on the arguments (and the
    PIL/libjpeg build); image i is the same whatever `count`. Each file is written under a temporary
    name and renamed, so an interrupted run leaves no partial `.jpg`. Returns the paths, in order.
    """
    folder = _checked(folder, count, size, quality)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    width = max(4, len(str(count - 1)))
    paths = []
    for index in range(count):
        image = _random_view(rng, photos[rng.integers(len(photos))], size)
        path = folder / f"{index:0{width}d}.jpg"
        _save_atomically(image, path, quality)
        paths.append(path)
    return paths


def _checked(folder: str | Path, count: int, size: Sequence[int], quality: int) -> Path:
    folder = Path(folder)
    if count < 1:
        raise InputError(f"count: expected at least 1 image, got {count}")
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"size: expected (width, height) with both ≥ 1, got {tuple(size)}")
    if not 1 <= quality <= 100:
        raise InputError(f"quality: expected 1..100, got {quality}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"folder: {folder} is an existing file, expected a directory")
    return folder


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The PHOTO_NAMES photographs, uint8 [H, W, 3], H and W from 300 to 1411 px."""
    return tuple(np.ascontiguousarray(_load_photo(name)) for name in PHOTO_NAMES)


def _load_photo(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):  # shipped as the stereo pair (left, right, disparity)
        left, right, _ = data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(data, name)()


def _random_view(rng: np.random.Generator, photo: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A random crop of `photo` (uint8 [H, W, 3]) resized to `size` (width, height), maybe mirrored."""
    height, width = photo.shape[:2]
    area = rng.uniform(*CROP_AREA) * height * width
    aspect = size[0] / size[1] * math.exp(rng.uniform(-math.log(CROP_ASPECT), math.log(CROP_ASPECT)))
    crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
    crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    image = crop.resize(tuple(size), Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _save_atomically(image: Image.Image, path: Path, quality: int) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        image.save(partial, format="JPEG", quality=quality)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
