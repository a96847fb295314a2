import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from semanticmim.data.decode import EncodedImage
from semanticmim.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdeTrain,
    BeitTwoView,
    ClassifierEval,
    CropBox,
    FinetuneTrain,
    MocoTwoView,
    PhotoMetricDistortion,
    SegmentationEval,
    VocLinearTrain,
    build_mixup,
    linear_probe_transform,
    maskfeat_transform,
    normalize,
    resized_crop,
    sample_crop_box,
    unit_range,
)
from semanticmim.errors import InputError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _unnormalize(view: torch.Tensor) -> torch.Tensor:
    """A normalised float view (segmentation pipelines) → [0, 1]."""
    return view * STD + MEAN


def _unit(view: torch.Tensor) -> torch.Tensor:
    """A uint8 view (pretraining and classification pipelines) → [0, 1]."""
    assert view.dtype == torch.uint8
    return view.float() / 255


def _smooth_image(width: int = 400, height: int = 300) -> Image.Image:
    """Smooth but position-revealing content: red grows with x, green with y, blue is a slow wave."""
    y, x = np.mgrid[0:height, 0:width].astype(float)
    rgb = np.stack([x / width * 255, y / height * 255, 127 + 100 * np.sin(x / 37 + y / 23)], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def _encoded(image: Image.Image, tmp_path, name="a.jpg") -> EncodedImage:
    image.save(tmp_path / name, quality=95)
    return EncodedImage.from_file(tmp_path / name)


# ---------------------------------------------------------------------------- crop boxes


@pytest.mark.parametrize("size", [(500, 375), (40, 400), (1000, 10)])
def test_sample_crop_box_inside_image_and_in_scale(size):
    torch.manual_seed(0)
    for _ in range(200):
        box = sample_crop_box(size, (0.3, 1.0))
        assert box.top >= 0 and box.left >= 0 and box.height >= 1 and box.width >= 1
        assert box.top + box.height <= size[1] and box.left + box.width <= size[0]
        if size == (500, 375):
            assert 0.29 <= box.width * box.height / (size[0] * size[1]) <= 1.0


def test_sample_crop_box_is_torchvisions_algorithm():
    image = Image.new("RGB", (500, 375))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert sample_crop_box(image.size, (0.08, 1.0)).pixels(image.size) == expected


def test_crop_box_pixels_clamped():
    assert CropBox(10.4, 20.6, 5.2, 100.0).pixels((50, 30)) == (10, 21, 6, 29)


# ---------------------------------------------------------------------------- pretraining views


@pytest.mark.parametrize("make", [maskfeat_transform, linear_probe_transform])
def test_crop_flip_gives_uint8_pixels_of_the_crop(make):
    torch.manual_seed(2)
    image = _smooth_image()
    view = make(32)(image)
    assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
    torch.manual_seed(2)
    box = sample_crop_box(image.size, make(32).scale)
    flipped = _unit(view)[0, :, 0].mean() > _unit(view)[0, :, -1].mean()  # red grows with x
    left_edge = _unit(view)[0, :, -1 if flipped else 0].mean().item() * 400
    assert abs(left_edge - box.left) < 12


def test_normalize_and_unit_range_on_batches():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels.float() / 255)
    assert torch.allclose(normalize(pixels), expected, atol=1e-5)
    assert torch.allclose(normalize(pixels[0]), expected[0], atol=1e-5)
    assert torch.equal(unit_range(pixels), pixels.float() / 255)
    assert pixels.dtype == torch.uint8  # the input is not changed in place


def test_draft_decoding_keeps_the_crop_region(tmp_path):
    """A large JPEG decoded at reduced DCT scale must give the same crop as a full decode."""
    image = _smooth_image(1600, 1200)
    encoded = _encoded(image, tmp_path)
    transform = maskfeat_transform(64)
    torch.manual_seed(3)
    fast = torch.stack([transform(encoded) for _ in range(8)])
    torch.manual_seed(3)
    full = torch.stack([transform(encoded.decode()[0]) for _ in range(8)])
    assert encoded.decode(max_reduction=1200 * 0.7 / 64)[1] == 8  # smallest crop side ≥ 0.7·1200 → 1/8 allowed
    assert (_unit(fast) - _unit(full)).abs().mean() < 0.01


def test_beit_views_cover_the_same_box(tmp_path):
    torch.manual_seed(0)
    transform = BeitTwoView(64)
    for source in [_smooth_image(), _encoded(_smooth_image(1200, 900), tmp_path)]:
        for _ in range(10):
            model_view, tokenizer_view = transform(source)
            assert model_view.shape == (3, 64, 64) and tokenizer_view.shape == (3, 32, 32)
            pooled = nnf.avg_pool2d(_unit(model_view)[None], 2)[0]
            assert (pooled - _unit(tokenizer_view)).abs().mean() < 0.02


def test_beit_view_is_the_sampled_box_without_jitter():
    """Red encodes x and green y: with jitter off and no flip, the view's corners give the box back."""
    torch.manual_seed(1)
    transform = BeitTwoView(64, jitter=0.0, flip=0.0)
    image = _smooth_image()
    model_view, _ = transform(image)
    torch.manual_seed(1)
    box = sample_crop_box(image.size, (0.08, 1.0))
    pixels = _unit(model_view)
    assert abs(pixels[0, :, 0].mean().item() * 400 - box.left) < 6
    assert abs(pixels[1, 0, :].mean().item() * 300 - box.top) < 6
    assert abs(pixels[0, :, -1].mean().item() * 400 - (box.left + box.width)) < 6


def test_beit_rejects_odd_size():
    with pytest.raises(InputError, match="img_size=33"):
        BeitTwoView(33)


def test_moco_views_differ(tmp_path):
    torch.manual_seed(0)
    transform = MocoTwoView(32)
    first, second = transform(_encoded(_smooth_image(), tmp_path))
    assert first.shape == second.shape == (3, 32, 32) and first.dtype == second.dtype == torch.uint8
    assert not torch.equal(first, second)


# ---------------------------------------------------------------------------- classification


def test_finetune_train_and_mixup(tmp_path):
    torch.manual_seed(0)
    transform = FinetuneTrain(32)
    views = torch.stack(
        [transform(_smooth_image()) for _ in range(3)] + [transform(_encoded(_smooth_image(), tmp_path))]
    )
    assert views.shape == (4, 3, 32, 32) and views.dtype == torch.uint8
    images, targets = build_mixup(num_classes=10)(normalize(views), torch.tensor([0, 1, 2, 3]))
    assert images.shape == views.shape and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / 10 - 1e-6  # label smoothing 0.1 spreads to every class


def test_finetune_survives_zero_bit_posterize():
    transform = FinetuneTrain(32)
    ops = [op for op in transform.augment.transforms[0].ops if op.name == "PosterizeIncreasing"]
    assert ops
    image = _smooth_image(32, 32)
    assert not np.asarray(ops[0].aug_fn(image, 0)).any()  # magnitude 10 → keep 0 bits → black
    assert np.array_equal(np.asarray(ops[0].aug_fn(image, 4)), np.asarray(image) & 0xF0)


def test_classifier_eval_is_resize_then_centre_crop(tmp_path):
    image = _smooth_image(400, 300)
    view = ClassifierEval(224)(image)
    assert view.shape == (3, 224, 224)
    # shorter side 300 → 256, so the centre crop spans x ∈ [(341-224)/2, …] of 341 → red ≈ x/400
    red = _unit(view)[0, 112, :]
    assert abs(red[0].item() - (341 - 224) / 2 / 341) < 0.02
    big = _encoded(_smooth_image(1600, 1200), tmp_path)
    assert (
        _unit(ClassifierEval(64)(big)) - _unit(ClassifierEval(64)(big.decode()[0]))
    ).abs().mean() < 0.01


# ---------------------------------------------------------------------------- segmentation

PALETTE = {c: (c * 40 % 256, 255 - c * 30, c * 97 % 256) for c in range(6)}


def _encoded_pair(width=160, height=120, classes=(0, 1, 2, 3, 5)):
    """Blocks of classes (and a strip of 255) with the image coloured by its label."""
    rng = np.random.default_rng(0)
    blocks = rng.choice(classes, size=(height // 20, width // 20))
    label = np.kron(blocks, np.ones((20, 20), dtype=np.int64))
    label[:, :10] = IGNORE_INDEX
    rgb = np.zeros((height, width, 3), np.uint8)
    for c, colour in PALETTE.items():
        rgb[label == c] = colour
    return Image.fromarray(rgb), Image.fromarray(label.astype(np.uint8))


def _assert_aligned(image: torch.Tensor, label: torch.Tensor, classes):
    assert label.dtype == torch.int64
    assert set(label.unique().tolist()) <= set(classes) | {IGNORE_INDEX}
    pixels = (_unnormalize(image) * 255).round()
    # only where the whole 5×5 neighbourhood has one label (resampling blurs block edges, and crop
    # borders mix in pixels from outside the crop)
    padded = nnf.pad(label[None, None].float(), (2, 2, 2, 2), value=-1)
    uniform = (nnf.max_pool2d(padded, 5, 1) == -nnf.max_pool2d(-padded, 5, 1))[0, 0]
    for c in set(classes):
        inside = uniform & (label == c)
        if inside.any():
            expected = torch.tensor(PALETTE[c], dtype=torch.float32)[:, None]
            assert (pixels[:, inside] - expected).abs().max() <= 3, c


def test_voc_linear_keeps_image_and_label_aligned():
    torch.manual_seed(0)
    image, label = _encoded_pair()
    transform = VocLinearTrain(64)
    for _ in range(10):
        view, target = transform(image, label)
        assert view.shape == (3, 64, 64) and target.shape == (64, 64)
        _assert_aligned(view, target, (0, 1, 2, 3, 5))


def test_ade_train_geometry_aligned_and_padded():
    torch.manual_seed(0)
    image, label = _encoded_pair()
    transform = AdeTrain(crop_size=96)
    transform.distort = lambda pixels: pixels  # geometry only; distortion is tested on its own
    saw_padding = False
    for _ in range(10):
        view, target = transform(image, label)
        assert view.shape == (3, 96, 96) and target.shape == (96, 96)
        real = target != IGNORE_INDEX
        _assert_aligned(view, target, (0, 1, 2, 3, 5))
        padded_rows = (target == IGNORE_INDEX).all(1)
        if padded_rows.any():
            saw_padding = True
            assert (view[:, padded_rows] == 0).all()
        assert real.any()
    assert saw_padding  # base scale (384, 96) shrinks 160×120 to ≤ 128×96·2 ⇒ some draws are smaller


def test_ade_train_labels_stay_in_input_set_with_distortion():
    torch.manual_seed(1)
    image, label = _encoded_pair(classes=(1, 4))
    for _ in range(5):
        _, target = AdeTrain(crop_size=64)(image, label)
        assert set(target.unique().tolist()) <= {1, 4, IGNORE_INDEX}


def test_ade_crop_avoids_dominant_class():
    torch.manual_seed(0)
    label = np.zeros((64, 128), np.int64)  # left half one class, right half stripes of 1 and 2
    label[:, 64:] = 1 + (np.arange(64)[None, :] // 4) % 2
    transform = AdeTrain(crop_size=64, ratio_range=(1.0, 1.0))  # base (256, 64): no resize for 128×64
    image = Image.new("RGB", (128, 64))
    for _ in range(30):
        _, target = transform(image, label)
        counts = target[target != IGNORE_INDEX].bincount()
        assert counts.max() / counts.sum() < 0.75


def test_photometric_distortion_is_pointwise_and_uint8():
    torch.manual_seed(0)
    image = torch.tensor(PALETTE[3], dtype=torch.uint8)[:, None, None].repeat(1, 8, 8)
    image[:, :, 4:] = torch.tensor(PALETTE[1], dtype=torch.uint8)[:, None, None]
    distort = PhotoMetricDistortion()
    changed = 0
    for _ in range(20):
        out = distort(image)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert (out[:, :, :4] == out[:, :1, :1]).all() and (out[:, :, 4:] == out[:, :1, 4:5]).all()
        changed += int(not torch.equal(out, image))
    assert changed > 10


def test_segmentation_eval_keeps_ratio_and_label():
    image, label = _encoded_pair(160, 120)
    view, target = SegmentationEval(64)(image, label)
    assert view.shape == (3, 64, 85)  # shorter side 120 → 64, 160 → 85.3
    assert torch.equal(target, torch.from_numpy(np.array(label)).long())


def test_label_shape_mismatch_is_input_error():
    image, _ = _encoded_pair(160, 120)
    with pytest.raises(InputError, match=r"expected \(H, W\) = \(120, 160\)"):
        VocLinearTrain(32)(image, np.zeros((100, 160), np.uint8))


def test_normalize_refuses_an_already_converted_view():
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        normalize(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        unit_range(torch.zeros(3, 4, 4))


@pytest.mark.parametrize("interpolation", [T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR])
def test_resized_crop_equals_torchvisions(interpolation, tmp_path):
    pixels, _ = _encoded(_smooth_image(), tmp_path).decode_tensor()
    box = CropBox(20.4, 60.0, 300.0, 251.6)
    top, left, height, width = box.pixels((pixels.shape[2], pixels.shape[1]))
    expected = TF.resized_crop(pixels, top, left, height, width, [48, 48], interpolation, antialias=True)
    assert torch.equal(resized_crop(pixels, box, 48, interpolation), expected)
