import io

import numpy as np
import pytest
import simplejpeg
import skimage.data
import torch
from PIL import Image, ImageFile

from semanticmim.data.decode import EncodedImage, UnreadableImage, load_rgb


def _gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 with distinct, smooth content per channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1
    ).astype(np.uint8)


def _save(array_or_image, path, **kwargs):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path, **kwargs)
    return path


def _assert_rgb8(image: Image.Image, size: tuple[int, int]):
    assert image.mode == "RGB"
    assert image.size == size
    assert np.asarray(image).dtype == np.uint8


def test_rgb_jpeg_round_trip(tmp_path):
    array = _gradient()
    image = load_rgb(_save(array, tmp_path / "a.jpg", quality=95))
    _assert_rgb8(image, (64, 48))
    assert np.abs(np.asarray(image).astype(int) - array).mean() < 3


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path):
    gray = _gradient()[:, :, 0]
    rgb = np.asarray(load_rgb(_save(gray, tmp_path / "g.jpg", quality=95)))
    assert rgb.shape == (48, 64, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - gray).mean() < 3


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    path = _save(cmyk, tmp_path / "c.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_rgb(path)
    _assert_rgb8(image, (64, 48))
    assert np.abs(np.asarray(image).astype(int) - _gradient()).mean() < 4


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.concatenate([_gradient(), np.zeros((48, 64, 1), np.uint8)], axis=2)  # fully transparent
    image = load_rgb(_save(rgba, tmp_path / "a.png"))
    assert np.array_equal(np.asarray(image), _gradient())


def test_la_png_drops_alpha(tmp_path):
    la = Image.fromarray(_gradient()[:, :, 0]).convert("LA")
    rgb = np.asarray(load_rgb(_save(la, tmp_path / "la.png")))
    assert np.array_equal(rgb[..., 2], _gradient()[:, :, 0])


def test_palette_png_with_transparency(tmp_path):
    palette_image = Image.fromarray(_gradient()).quantize(16)
    path = _save(palette_image, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P"
    image = load_rgb(path)
    assert np.array_equal(np.asarray(image), np.asarray(palette_image.convert("RGB")))


@pytest.mark.parametrize("value", [0, 257, 32896, 65535])
def test_16bit_png_scaled_not_clipped(tmp_path, value):
    path = _save(np.full((8, 8), value, np.uint16), tmp_path / "16.png")
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert (rgb == round(value * 255 / 65535)).all()


def test_16bit_png_keeps_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    rgb = np.asarray(load_rgb(_save(ramp, tmp_path / "ramp.png")))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert len(np.unique(rgb[..., 0])) == 256


@pytest.mark.parametrize(("values", "expected"), [(0.5, 128), (1.0, 255), (200.0, 200), (300.0, 255)])
def test_float_image(tmp_path, values, expected):
    path = _save(Image.fromarray(np.full((4, 4), values, np.float32), mode="F"), tmp_path / "f.tiff")
    assert (np.asarray(load_rgb(path)) == expected).all()


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableImage, match="no such file") as info:
        load_rgb(tmp_path / "nope.jpg")
    assert info.value.path == tmp_path / "nope.jpg"
    assert str(info.value).startswith(str(tmp_path / "nope.jpg") + ": ")


def test_directory(tmp_path):
    with pytest.raises(UnreadableImage, match="directory"):
        load_rgb(tmp_path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UnreadableImage) as info:
        load_rgb(path)
    assert "\n" not in str(info.value)
    assert info.value.reason


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file_raises(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = _save(noise, tmp_path / f"full.{suffix}").read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match=r"(?i)truncated|broken|EOF"):
        load_rgb(path)


def test_refuses_when_pil_ignores_truncation(tmp_path, monkeypatch):
    path = _save(_gradient(), tmp_path / "a.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnreadableImage, match="LOAD_TRUNCATED_IMAGES"):
        load_rgb(path)


def test_unsupported_mode(tmp_path):
    path = _save(Image.new("LAB", (4, 4)), tmp_path / "lab.tiff")
    with pytest.raises(UnreadableImage, match="unsupported image mode"):
        load_rgb(path)


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path):
    path = _save(np.repeat(np.repeat(_gradient(), 8, 0), 8, 1), tmp_path / "big.jpg", quality=95)  # 512×384
    assert load_rgb(path).size == (512, 384)
    assert load_rgb(path, draft_size=100).size == (256, 192)  # 1/4 would give a shorter side of 96 < 100
    assert load_rgb(path, draft_size=(64, 48)).size == (64, 48)
    assert load_rgb(path, draft_size=(65, 48)).size == (128, 96)
    small = np.asarray(load_rgb(path, draft_size=(64, 48))).astype(int)
    assert np.abs(small - _gradient()).mean() < 4


def test_encoded_image_reports_size_before_decoding(tmp_path):
    path = _save(np.zeros((375, 500, 3), np.uint8), tmp_path / "in.jpg")
    encoded = EncodedImage.from_file(path)
    assert encoded.size == (500, 375) and encoded.format == "JPEG"


@pytest.mark.parametrize(
    ("max_reduction", "reduction"), [(1, 1), (1.9, 1), (2, 2), (3.5, 2), (4, 4), (7.9, 4), (8, 8), (50, 8)]
)
def test_encoded_image_decode_reduction(tmp_path, max_reduction, reduction):
    array = np.repeat(np.repeat(_gradient(), 8, 0), 8, 1)[:375, :500]
    encoded = EncodedImage.from_file(_save(array, tmp_path / "in.jpg", quality=95))
    image, got = encoded.decode(max_reduction)
    assert got == reduction
    assert image.size == (-(-500 // reduction), -(-375 // reduction))
    # decoded pixel x covers file pixels [x·s, (x+1)·s): compare block means away from the ragged edge
    blocks = array[: 368 // reduction * reduction, : 496 // reduction * reduction].astype(float)
    blocks = blocks.reshape(368 // reduction, reduction, 496 // reduction, reduction, 3).mean((1, 3))
    decoded = np.asarray(image)[: blocks.shape[0], : blocks.shape[1]].astype(float)
    assert np.abs(decoded - blocks).mean() < 3


def test_png_ignores_reduction(tmp_path):
    encoded = EncodedImage.from_file(_save(_gradient(), tmp_path / "a.png"))
    image, reduction = encoded.decode(8)
    assert reduction == 1 and image.size == (64, 48)


def test_encoded_image_from_corrupt_bytes():
    with pytest.raises(UnreadableImage, match=r"member\.jpg"):
        EncodedImage(b"not an image", "shard.tar/member.jpg")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_tensor_matches_decode(tmp_path, mode):
    image = Image.fromarray(np.repeat(np.repeat(_gradient(), 4, 0), 4, 1)).convert(mode)
    encoded = EncodedImage.from_file(_save(image, tmp_path / "a.jpg", quality=90))
    for max_reduction in (1, 2):
        pixels, reduction = encoded.decode_tensor(max_reduction)
        decoded, expected_reduction = encoded.decode(max_reduction)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, decoded.height, decoded.width)
        assert reduction == expected_reduction
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(decoded)))
    assert np.array_equal(encoded.decode_tensor()[0].permute(1, 2, 0).numpy(), _pil_pixels(encoded.data))


def test_decode_tensor_truncated_raises(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(noise, tmp_path / "full.jpg").read_bytes()
    with pytest.raises(UnreadableImage, match=r"cut\.jpg"):
        EncodedImage(data[: len(data) // 2], tmp_path / "cut.jpg").decode_tensor()


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}), ("RGB", {"exif": b"Exif\0\0" + b"x" * 300})],
)
def test_fast_jpeg_header_agrees_with_pil(tmp_path, mode, options):
    path = _save(Image.fromarray(_gradient()).convert(mode), tmp_path / "h.jpg", **options)
    encoded = EncodedImage.from_file(path)
    with Image.open(path) as image:
        assert (encoded.size, encoded.format, encoded.mode) == (image.size, "JPEG", image.mode)
    assert encoded.decode()[0].size == (64, 48)


def test_valid_header_with_cut_body_fails_at_decode(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(noise, tmp_path / "a.jpg").read_bytes()
    encoded = EncodedImage(data[: len(data) // 2], "cut.jpg")  # the header is intact: only decoding can tell
    assert encoded.size == (64, 64)
    with pytest.raises(UnreadableImage, match=r"cut\.jpg"):
        encoded.decode()
    with pytest.raises(UnreadableImage, match=r"cut\.jpg"):
        encoded.decode_tensor()


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    path = _save(_gradient(), tmp_path / "a.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnreadableImage, match="safety limit"):
        EncodedImage.from_file(path)


def test_decoders_give_pils_pixels_exactly_on_a_photograph():
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG", quality=90)
    encoded = EncodedImage(buffer.getvalue(), "astronaut.jpg")
    pixels, _ = encoded.decode_tensor()
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(_pil_pixels(encoded.data)))
    assert np.array_equal(np.array(encoded.decode()[0]), _pil_pixels(encoded.data))


def test_decode_tensor_hands_a_jpeg_with_libjpeg_warnings_to_pil(tmp_path):
    """Extra bytes before the end marker: libjpeg warns, strict simplejpeg refuses, PIL (like timm's and
    torchvision's loaders) decodes the image; so must we, to the same pixels."""
    data = _save(Image.fromarray(_gradient()), tmp_path / "a.jpg", quality=90).read_bytes()
    odd = data[:-2] + b"\x00" * 10 + data[-2:]
    with pytest.raises(ValueError, match="extraneous bytes"):
        simplejpeg.decode_jpeg(odd, "RGB", strict=True)
    encoded = EncodedImage(odd, "odd.jpg")
    pixels, _ = encoded.decode_tensor()
    assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(_pil_pixels(odd)))


def _pil_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))
