"""Augmentation recipes of the paper (docs/recipes.md), each sized by `img_size` (the paper uses 224).

Every image transform takes a decoded RGB `PIL.Image` or an `EncodedImage`. Given an `EncodedImage`,
a transform samples its crop box on the file's size first and then decodes the JPEG at the strongest
DCT reduction (1/2, 1/4, 1/8) that still leaves the crop at least its output size, so large files
decode several times faster with the same crop region and no loss of resolution.

Pretraining and classification views are uint8 (3, S, S) pixels, as timm's loader ships them with
its prefetcher: the consumer moves the batch to its device and calls `normalize` (ImageNet mean/std) or
`unit_range` ([0, 1]) there. That keeps the float conversion out of the data workers (≈9% of a MaskFeat
worker's time on ImageNet-sized JPEGs) and makes the host→device copy 4× smaller. Segmentation
pipelines return float32 views already normalised: mmseg pads the ADE20K crop *after* normalising (with
0, the mean colour), which uint8 cannot express; their datasets are 10–20k images. Segmentation labels
are int64 (H, W) with 255 = ignore.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import timm.data
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from semanticmim.data.decode import EncodedImage
from semanticmim.data.layouts import IGNORE_INDEX
from semanticmim.errors import InputError

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AdeTrain",
    "BeitTwoView",
    "ClassifierEval",
    "CropBox",
    "CropFlip",
    "FinetuneTrain",
    "MocoTwoView",
    "PhotoMetricDistortion",
    "SegmentationEval",
    "VocLinearTrain",
    "build_mixup",
    "decode_for_crops",
    "decode_tensor_for_crops",
    "linear_probe_transform",
    "maskfeat_transform",
    "normalize",
    "resized_crop",
    "sample_crop_box",
    "unit_range",
]

IMAGENET_MEAN = timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = timm.data.IMAGENET_DEFAULT_STD
ASPECT_RATIO = (3 / 4, 4 / 3)

ImageSource = Image.Image | EncodedImage
LabelMap = Image.Image | np.ndarray | torch.Tensor  # class ids, (H, W); 255 = ignore
BICUBIC = v2.InterpolationMode.BICUBIC
BILINEAR = v2.InterpolationMode.BILINEAR
NEAREST = v2.InterpolationMode.NEAREST

# x / 255 normalised in one affine map: x·scale + shift
_NORM_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# --------------------------------------------------------------------------------------------------
# crop boxes and crop-aware decoding


class CropBox(NamedTuple):
    """A crop in pixels of some image: rows [top, top+height), columns [left, left+width)."""

    top: float
    left: float
    height: float
    width: float

    def scaled(self, factor: float) -> "CropBox":
        return CropBox(self.top * factor, self.left * factor, self.height * factor, self.width * factor)

    def mirrored(self, image_width: int) -> "CropBox":
        return self._replace(left=image_width - self.left - self.width)

    def pixels(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) rounded to whole pixels inside an image of `size` (w, h)."""
        top, left = min(round(self.top), size[1] - 1), min(round(self.left), size[0] - 1)
        bottom = min(max(round(self.top + self.height), top + 1), size[1])
        right = min(max(round(self.left + self.width), left + 1), size[0])
        return top, left, bottom - top, right - left

    def pil_box(self) -> tuple[float, float, float, float]:
        return self.left, self.top, self.left + self.width, self.top + self.height


def sample_crop_box(
    size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float] = ASPECT_RATIO
) -> CropBox:
    """A random-resized-crop box for an image of `size` (w, h).

    torchvision's `RandomResizedCrop.get_params` algorithm (10 tries, then the central crop of the
    clamped ratio), taking a size so that the image need not be decoded yet; uses torch's RNG.
    """
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = torch.randint(0, height - crop_h + 1, size=(1,)).item()
            left = torch.randint(0, width - crop_w + 1, size=(1,)).item()
            return CropBox(top, left, crop_h, crop_w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def decode_for_crops(source: ImageSource, boxes: Sequence[CropBox], out_size: int) -> tuple[Image.Image, list[CropBox]]:
    """Decode `source` just finely enough for every box to keep ≥ out_size pixels a side.

    boxes are in the source's pixels; returns the RGB image and the boxes in its pixels.
    """
    if isinstance(source, Image.Image):
        return source, list(boxes)
    image, reduction = source.decode(_max_reduction(boxes, out_size))
    return image, [box.scaled(1 / reduction) for box in boxes]


def decode_tensor_for_crops(
    source: ImageSource, boxes: Sequence[CropBox], out_size: int
) -> tuple[torch.Tensor, list[CropBox]]:
    """`decode_for_crops` as a uint8 (3, H, W) tensor, kept in HWC memory order: torch's antialiased
    uint8 resize is ~2× faster on that layout than on contiguous CHW."""
    if isinstance(source, Image.Image):
        return F.pil_to_tensor(source), list(boxes)
    pixels, reduction = source.decode_tensor(_max_reduction(boxes, out_size))
    return pixels, [box.scaled(1 / reduction) for box in boxes]


def resized_crop(pixels: torch.Tensor, box: CropBox, size: int, interpolation) -> torch.Tensor:
    """uint8 (3, H, W) → the box (whole pixels) resized to (3, size, size), antialiased.

    The crop is copied into HWC order first: torch's uint8 resize works on that layout, and handed a
    strided view torchvision makes a CHW copy that torch converts again — 1.4× slower in all."""
    top, left, height, width = box.pixels(_size(pixels))
    crop = pixels[:, top : top + height, left : left + width].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return F.resize(crop, [size, size], interpolation, antialias=True)


def _max_reduction(boxes: Sequence[CropBox], out_size: int) -> float:
    return min(min(box.width, box.height) for box in boxes) / out_size


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) → float32 (..., 3, H, W), ImageNet-normalised, on the pixels' device."""
    _check_pixels(pixels)
    scale, shift = _norm_constants(pixels.device)
    return pixels.float().mul_(scale).add_(shift)  # in place: 2× faster than addcmul on CPU


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) → float32 in [0, 1] (the dVAE/DALL-E tokenizer's input range)."""
    _check_pixels(pixels)
    return pixels.float().div_(255)


def _check_pixels(pixels: torch.Tensor) -> None:
    # a float input here means the image was already converted once: normalising twice is silent
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels (a transform's output), got {pixels.dtype}")


@functools.cache
def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _NORM_SCALE.to(device), _NORM_SHIFT.to(device)


def _size(pixels: torch.Tensor) -> tuple[int, int]:
    """(width, height) of a (C, H, W) tensor, PIL's order."""
    return pixels.shape[-1], pixels.shape[-2]


def _flip_now(p: float) -> bool:
    return p > 0 and torch.rand(1).item() < p


# --------------------------------------------------------------------------------------------------
# pretraining views


class CropFlip:
    """Random-resized-crop (bicubic, antialiased) + horizontal flip → uint8 (3, S, S).

    MaskFeat pretraining (crop (0.5, 1)) and the linear probe (crop (0.08, 1)) use it.
    """

    def __init__(self, img_size: int, scale: tuple[float, float], flip: float = 0.5, interpolation=BICUBIC):
        self.img_size, self.scale, self.flip, self.interpolation = img_size, scale, flip, interpolation

    def __call__(self, source: ImageSource) -> torch.Tensor:
        box = sample_crop_box(source.size, self.scale)
        pixels, (box,) = decode_tensor_for_crops(source, [box], self.img_size)
        view = resized_crop(pixels, box, self.img_size, self.interpolation)
        if _flip_now(self.flip):
            view = view.flip(-1)
        return view


def maskfeat_transform(img_size: int) -> CropFlip:
    """MaskFeat pretraining [Table 2]: crop (0.5, 1) bicubic, flip 0.5, no colour jitter; the HOG
    target is computed on the normalised image, on the training device."""
    return CropFlip(img_size, scale=(0.5, 1.0))


def linear_probe_transform(img_size: int) -> CropFlip:
    """IN-1K linear probe training [Table 5]: crop (0.08, 1) bicubic, flip 0.5."""
    return CropFlip(img_size, scale=(0.08, 1.0))


class BeitTwoView:
    """BEiT pretraining [Table 2, BEiT code]: colour jitter 0.4 and flip on the whole image, then one
    crop box (0.08, 1) resized twice.

    Returns uint8 (model_view (3, S, S) bicubic — normalise it —, tokenizer_view (3, S/2, S/2) Lanczos —
    take it to [0, 1] with `unit_range`; the tokenizer maps 0.8·x + 0.1 itself).
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.4, flip: float = 0.5):
        if img_size % 2:
            raise InputError(f"img_size={img_size}: BEiT's tokenizer view is img_size/2, expected an even size")
        self.img_size, self.scale, self.flip = img_size, scale, flip
        self.jitter = v2.ColorJitter(jitter, jitter, jitter)

    def __call__(self, source: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
        # the box distribution is mirror-symmetric, so sampling it before the flip changes nothing
        box = sample_crop_box(source.size, self.scale)
        image, (box,) = decode_for_crops(source, [box], self.img_size)
        image = self.jitter(image)
        if _flip_now(self.flip):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = box.mirrored(image.width)
        size, half = (self.img_size, self.img_size), (self.img_size // 2, self.img_size // 2)
        model_view = image.resize(size, Image.Resampling.BICUBIC, box=box.pil_box())
        tokenizer_view = image.resize(half, Image.Resampling.LANCZOS, box=box.pil_box())
        return F.pil_to_tensor(model_view), F.pil_to_tensor(tokenizer_view)


class MocoTwoView:
    """MoCo v3's asymmetric views [MoCo v3 code]: crop (0.08, 1) bilinear, colour jitter
    (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur σ∈(0.1, 2)·S/224 p=1.0 / 0.1,
    solarize p=0 / 0.2, flip 0.5. Returns two uint8 (3, S, S) views.

    The photometric steps run on PIL images as in MoCo v3's code: PIL's Gaussian blur is ~20× faster
    than torchvision's convolution on CPU."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0)):
        self.img_size, self.scale = img_size, scale
        sigma = (0.1 * img_size / 224, 2.0 * img_size / 224)
        self.views = [self._view(sigma, blur, solarize) for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]

    @staticmethod
    def _view(sigma: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([_PilGaussianBlur(sigma)], p=blur),
                v2.RandomSolarize(threshold=128, p=solarize),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, source: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = [sample_crop_box(source.size, self.scale) for _ in self.views]
        pixels, boxes = decode_tensor_for_crops(source, boxes, self.img_size)
        out = []
        for view, box in zip(self.views, boxes, strict=True):
            crop = resized_crop(pixels, box, self.img_size, BILINEAR)
            out.append(F.pil_to_tensor(view(F.to_pil_image(crop))))
        return out[0], out[1]


class _PilGaussianBlur:
    """PIL Gaussian blur with σ ~ U(sigma) (PIL's `radius` is the standard deviation), as in MoCo v3."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=_uniform(*self.sigma)))


# --------------------------------------------------------------------------------------------------
# classification fine-tuning and evaluation


class FinetuneTrain:
    """IN-1K fine-tuning [Table 3, BEiT/MAE code]: bicubic crop (0.08, 1) + flip, then timm's
    RandAugment `rand-m9-mstd0.5-inc1`. Returns uint8 (3, S, S). Random erasing (it draws normalised
    pixels) and Mixup/CutMix act on the normalised batch on the device: see `eval.finetune.FinetuneTask`."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.08, 1.0), flip: float = 0.5):
        self.img_size, self.scale, self.flip = img_size, scale, flip
        # timm's crop+flip stage is replaced by the crop-aware one below (same box algorithm); RandAugment
        # is timm's own
        _, self.augment, _ = timm.data.create_transform(
            img_size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            separate=True,
        )
        _allow_zero_bit_posterize(self.augment)

    def __call__(self, source: ImageSource) -> torch.Tensor:
        box = sample_crop_box(source.size, self.scale)
        pixels, (box,) = decode_tensor_for_crops(source, [box], self.img_size)
        crop = resized_crop(pixels, box, self.img_size, BICUBIC)
        if _flip_now(self.flip):
            crop = crop.flip(-1)
        return F.pil_to_tensor(self.augment(F.to_pil_image(crop)))


def _allow_zero_bit_posterize(augment: v2.Compose) -> None:
    """timm's `PosterizeIncreasing` asks for 0 bits at magnitude 10 (reached by m9 + mstd0.5 noise);
    Pillow 13 rejects that where older Pillow returned black: restore the black image the recipe had."""
    for transform in augment.transforms:
        for op in getattr(transform, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize


def _posterize(image: Image.Image, bits: int, **_) -> Image.Image:
    if bits >= 8:
        return image
    return Image.new(image.mode, image.size) if bits <= 0 else ImageOps.posterize(image, bits)


def build_mixup(
    num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, label_smoothing: float = 0.1
) -> timm.data.Mixup:
    """timm's batch Mixup/CutMix [Table 3 code]: images (B, 3, S, S), labels (B,) → soft labels (B, C).

    The batch size must be even (timm mixes each sample with its mirror in the batch)."""
    return timm.data.Mixup(
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes
    )


class ClassifierEval:
    """Evaluation [Table 3]: resize the shorter side to ⌊S·256/224⌋ bicubic (antialiased), centre-crop
    S — timm's eval transform, on uint8 tensors. Returns uint8 (3, S, S)."""

    def __init__(self, img_size: int):
        self.img_size, self.resize_to = img_size, math.floor(img_size * 256 / 224)

    def __call__(self, source: ImageSource) -> torch.Tensor:
        if isinstance(source, EncodedImage):
            pixels, _ = source.decode_tensor(max_reduction=min(source.size) / self.resize_to)
        else:
            pixels = F.pil_to_tensor(source)
        resized = F.resize(pixels, self.resize_to, BICUBIC, antialias=True)
        return F.center_crop(resized, self.img_size)


# --------------------------------------------------------------------------------------------------
# segmentation: joint (image, label) transforms


def _label_tensor(label: LabelMap, image_size: tuple[int, int]) -> torch.Tensor:
    """A label map (P/L PIL image, array or tensor of class ids) → int64 (H, W); checks it fits the image."""
    values = torch.as_tensor(np.array(label) if isinstance(label, Image.Image) else label).long()
    if values.ndim != 2 or tuple(values.shape[::-1]) != tuple(image_size):
        raise InputError(f"label of shape {tuple(values.shape)}: expected (H, W) = {image_size[::-1]} like its image")
    return values


def _decoded(source: ImageSource) -> Image.Image:
    return source.decode()[0] if isinstance(source, EncodedImage) else source


class VocLinearTrain:
    """PascalVOC linear probe training [Table 6]: random-resized crop + flip applied identically to
    image (bilinear) and label (nearest). Returns (float32 (3, S, S) normalised, int64 (S, S)).

    The paper does not give the crop range; (0.08, 1) like its other tables is a guess, so it is a
    parameter."""

    def __init__(self, img_size: int = 448, scale: tuple[float, float] = (0.08, 1.0)):
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(img_size, scale=scale, interpolation=BILINEAR, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, source: ImageSource, label: LabelMap) -> tuple[torch.Tensor, torch.Tensor]:
        image = _decoded(source)
        mask = tv_tensors.Mask(_label_tensor(label, image.size))
        pixels, mask = self.transform(tv_tensors.Image(F.pil_to_tensor(image)), mask)
        return normalize(pixels.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on uint8 (3, H, W): each step with p=0.5 — brightness +U(-32, 32),
    contrast ×U(0.5, 1.5) (first or last, at random), saturation ×U(0.5, 1.5) in HSV, hue ±18 of
    OpenCV's 180 — each step clipped to [0, 255] and truncated to uint8 as mmseg does."""

    def __init__(
        self,
        brightness: float = 32,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: int = 18,
    ):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float()
        if _flip_now(0.5):
            image = _clip(image + _uniform(-self.brightness, self.brightness))
        contrast_first = _flip_now(0.5)
        if contrast_first and _flip_now(0.5):
            image = _clip(image * _uniform(*self.contrast))
        if _flip_now(0.5):
            image = _clip(_scale_saturation(image, _uniform(*self.saturation)))
        if _flip_now(0.5):
            shift = torch.randint(-self.hue, self.hue + 1, (1,)).item() / 180
            image = F.adjust_hue(image.to(torch.uint8), shift).float()
        if not contrast_first and _flip_now(0.5):
            image = _clip(image * _uniform(*self.contrast))
        return image.to(torch.uint8)


def _uniform(low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high).item()


def _clip(image: torch.Tensor) -> torch.Tensor:
    return image.clamp_(0, 255).floor_()


def _scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply HSV saturation by `factor` (clipped at 1), hue and value kept: c ← V − k·(V − c)."""
    value = image.amax(0, keepdim=True)
    spread = value - image.amin(0, keepdim=True)
    # S·factor ≤ 1 ⇔ factor·(V − min) ≤ V
    factor = torch.minimum(torch.full_like(value, factor), value / spread.clamp(min=1e-6))
    return value - factor * (value - image)


class AdeTrain:
    """ADE20K UperNet training [Table 4, mmseg config]: random resize (ratio 0.5–2 of the base scale
    (4·crop, crop), keep ratio), random crop with cat_max_ratio 0.75, flip, PhotoMetricDistortion,
    normalise, pad to the crop (image 0 after normalisation, label 255).
    Returns (float32 (3, C, C), int64 (C, C))."""

    def __init__(
        self, crop_size: int = 640, ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75
    ):
        self.crop_size, self.ratio_range, self.cat_max_ratio = crop_size, ratio_range, cat_max_ratio
        self.base_scale = (4 * crop_size, crop_size)
        self.distort = PhotoMetricDistortion()

    def __call__(self, source: ImageSource, label: LabelMap) -> tuple[torch.Tensor, torch.Tensor]:
        image = _decoded(source)
        mask = _label_tensor(label, image.size)[None]
        ratio = _uniform(*self.ratio_range)
        size = _keep_ratio_size(image.size, (self.base_scale[0] * ratio, self.base_scale[1] * ratio))
        pixels = F.resize(F.pil_to_tensor(image), size, BILINEAR, antialias=True)
        mask = F.resize(mask, size, NEAREST)
        top, left = self._crop_offset(mask[0])
        pixels = pixels[:, top : top + self.crop_size, left : left + self.crop_size]
        mask = mask[:, top : top + self.crop_size, left : left + self.crop_size]
        if _flip_now(0.5):
            pixels, mask = pixels.flip(-1), mask.flip(-1)
        pixels = normalize(self.distort(pixels))
        pad = [0, 0, self.crop_size - pixels.shape[-1], self.crop_size - pixels.shape[-2]]
        return F.pad(pixels, pad, fill=0), F.pad(mask, pad, fill=IGNORE_INDEX)[0]

    def _crop_offset(self, label: torch.Tensor) -> tuple[int, int]:
        """mmseg RandomCrop: up to 10 draws until no class (255 ignored) covers ≥ cat_max_ratio of the crop."""
        margin_h, margin_w = max(label.shape[0] - self.crop_size, 0), max(label.shape[1] - self.crop_size, 0)
        for _ in range(10):
            top = torch.randint(0, margin_h + 1, (1,)).item()
            left = torch.randint(0, margin_w + 1, (1,)).item()
            crop = label[top : top + self.crop_size, left : left + self.crop_size]
            _, counts = crop[crop != IGNORE_INDEX].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left


class SegmentationEval:
    """Segmentation evaluation [mmseg test pipeline]: resize the image keeping its ratio into
    (4·size, size) bilinear and normalise; the label stays at its own resolution (predictions are
    resized back to it). Returns (float32 (3, h, w), int64 (H, W))."""

    def __init__(self, size: int = 640):
        self.scale = (4 * size, size)

    def __call__(self, source: ImageSource, label: LabelMap) -> tuple[torch.Tensor, torch.Tensor]:
        image = _decoded(source)
        mask = _label_tensor(label, image.size)
        size = _keep_ratio_size(image.size, self.scale)
        return normalize(F.resize(F.pil_to_tensor(image), size, BILINEAR, antialias=True)), mask


def _keep_ratio_size(size: tuple[int, int], scale: tuple[float, float]) -> list[int]:
    """mmcv `rescale` with keep_ratio: the largest (h, w) of the same ratio fitting long/short edges of scale."""
    width, height = size
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return [int(height * factor + 0.5), int(width * factor + 0.5)]


class TokenizerView:
    """dVAE training/evaluation view: random-resized crop (Lanczos) + flip, uint8 (3, S, S); the consumer
    takes it to [0, 1] with `unit_range` (the tokenizer applies OpenAI's 0.8·x + 0.1 itself)."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.5, 1.0), flip: float = 0.5):
        scale = tuple(scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:  # else crops are silently wrong or crash later
            raise InputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.img_size, self.scale, self.flip = img_size, scale, flip

    def __call__(self, source: ImageSource) -> torch.Tensor:
        width, height = source.size
        box = sample_crop_box(source.size, self.scale) if self.scale != (1.0, 1.0) else CropBox(0, 0, height, width)
        image, (box,) = decode_for_crops(source, [box], self.img_size)
        if _flip_now(self.flip):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = box.mirrored(image.width)
        view = image.resize((self.img_size, self.img_size), Image.Resampling.LANCZOS, box=box.pil_box())
        return F.pil_to_tensor(view)
