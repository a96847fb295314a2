"""HOGTarget: exact against a loop-by-loop NumPy transcription of mmpretrain's algorithm, close to
scikit-image's HOG on real CIFAR-10 images, and the behaviour MaskFeat relies on."""

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semanticmim.errors import InputError
from semanticmim.targets import HOGTarget

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def reference_hog(image: np.ndarray, nbins: int, cell: int, patch: int, window: int | None) -> np.ndarray:
    """(3, H, W) -> (N, 3 * nbins * (patch // cell) ** 2), one pixel at a time in float64."""
    channels, height, width = image.shape
    padded = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    kernel_x = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernel_y = kernel_x.T
    if window:
        n = (np.arange(window) - (window - 1) / 2) / (window // 2)
        weights = np.outer(np.exp(-0.5 * n**2), np.exp(-0.5 * n**2))
        weights /= weights.sum()
    hist = np.zeros((channels, height // cell, width // cell, nbins))
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                region = padded[c, i : i + 3, j : j + 3]
                gx, gy = (region * kernel_x).sum(), (region * kernel_y).sum()
                magnitude = math.hypot(gx, gy)
                if window:
                    magnitude *= weights[i % window, j % window]
                hist[c, i // cell, j // cell, math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins] += magnitude
    hist /= np.maximum(np.linalg.norm(hist, axis=-1, keepdims=True), 1e-12)
    per_patch = patch // cell
    rows = []
    for patch_row in range(height // patch):
        for patch_col in range(width // patch):
            cells = hist[:, patch_row * per_patch : (patch_row + 1) * per_patch]
            cells = cells[:, :, patch_col * per_patch : (patch_col + 1) * per_patch]
            rows.append(cells.transpose(0, 3, 1, 2).reshape(-1))  # (channel, bin, cell_row, cell_col)
    return np.stack(rows)


@pytest.mark.parametrize(
    ("nbins", "cell", "patch", "window", "height", "width"),
    [(9, 8, 16, 16, 32, 48), (9, 4, 8, 8, 16, 24), (7, 4, 12, None, 24, 12), (9, 8, 8, 0, 16, 16)],
)
def test_matches_numpy_reference(nbins, cell, patch, window, height, width):
    """Integer pixel values keep the gradients exact in fp32, so no pixel sits on a bin edge by rounding
    alone (a derivative that is exactly 0 in float64 can be +-1 ulp after an fp32 convolution, which
    moves an angle of exactly 0 or 180 degrees between the first and last bin)."""
    generator = torch.Generator().manual_seed(nbins + cell + height)
    images = torch.randint(0, 16, (2, 3, height, width), generator=generator).float() - 8
    hog = HOGTarget(nbins=nbins, cell_size=cell, patch_size=patch, window_size=window)
    out = hog(images)
    assert out.shape == (2, (height // patch) * (width // patch), 3 * nbins * (patch // cell) ** 2)
    assert out.dtype == torch.float32
    for b in range(2):
        expected = reference_hog(images[b].numpy(), nbins, cell, patch, window)
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-5)


def test_default_shape_is_maskfeat_108():
    hog = HOGTarget()
    assert hog.out_dim == 108
    assert hog(torch.randn(1, 3, 224, 224)).shape == (1, 196, 108)
    assert not list(hog.parameters()) and hog.state_dict() == {}


# --------------------------------------------------------------------------------- vs scikit-image


def _cifar_images(count: int) -> torch.Tensor:
    """(count, 3, 32, 32) in [0, 1]: the first JPEGs of the CIFAR-10 test archive, read in place."""
    from PIL import Image

    archive = CIFAR10 / "test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not available")
    images = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255)
            if len(images) == count:
                break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity over cells where both histograms are non-empty."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    keep = norms > 1e-6
    return (a * b).sum(-1)[keep] / norms[keep]


def test_close_to_skimage_hog_on_cifar10():
    """Same cell histograms as skimage's HOG up to the documented differences.

    skimage runs per channel as a grayscale image with one-cell L2 blocks. Our bins are edged at
    multiples of 20 degrees in atan2(gx, gy) = 90 degrees - skimage's atan2(g_row, g_col) (mod 180), half a
    bin from skimage's edges, so skimage is run with 18 bins of 10 degrees and pairs are summed into our
    9 bins: bin k = skimage's (70 - 20k, 90 - 20k] degrees. What remains: Sobel smoothing vs the
    [-1, 0, 1] difference, reflect-pad vs zero border gradients, and normalisation eps. Measured on the
    first 16 test images upsampled to 64 px: mean cosine 0.97, against 0.43 with bins paired naively
    (k <-> k) and 0.49 with cells shuffled, so the threshold separates right from wrong.
    """
    from skimage.feature import hog as skimage_hog

    images = F.interpolate(_cifar_images(16), size=64, mode="bilinear", align_corners=False)
    target = HOGTarget(nbins=9, cell_size=8, patch_size=16, window_size=None)
    ours = F.normalize(target.cell_histograms(*target.gradients(images)), dim=-1).numpy()  # (B, 3, 8, 8, 9)
    k = np.arange(9)
    theirs = np.empty_like(ours)
    for b in range(len(images)):
        for c in range(3):
            fine = skimage_hog(
                images[b, c].numpy(),
                orientations=18,
                pixels_per_cell=(8, 8),
                cells_per_block=(1, 1),
                block_norm="L2",
                feature_vector=False,
            )[:, :, 0, 0, :]
            theirs[b, c] = fine[..., (7 - 2 * k) % 18] + fine[..., (8 - 2 * k) % 18]
    aligned = _cosine(ours.reshape(-1, 9), theirs.reshape(-1, 9))
    naive = _cosine(ours.reshape(-1, 9), theirs[..., k[::-1]].reshape(-1, 9))
    assert aligned.size > 0.9 * ours.size / 9
    assert aligned.mean() > 0.94, aligned.mean()
    assert np.median(aligned) > 0.97
    assert naive.mean() < aligned.mean() - 0.3


# ------------------------------------------------------------------------------------------ behaviour


def _edge_image(vertical: bool, size: int = 32) -> torch.Tensor:
    ramp = (torch.arange(size) >= size // 2).float()
    image = ramp.view(1, size) if vertical else ramp.view(size, 1)
    return image.expand(size, size).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(("vertical", "expected_bin"), [(True, 4), (False, 0)])
def test_edges_land_in_their_bin(vertical, expected_bin):
    """atan2(gx, gy): a vertical edge (gx != 0, gy = 0) is +-90 degrees -> bin 4; a horizontal one -> bin 0."""
    hog = HOGTarget(window_size=None)
    images = _edge_image(vertical)
    for flipped in (images, 1 - images):  # the gradient's sign does not matter (unsigned orientation)
        histograms = hog.cell_histograms(*hog.gradients(flipped))  # (1, 3, 4, 4, 9)
        energy = histograms.sum(dim=(0, 1, 2, 3))
        assert energy.argmax() == expected_bin
        assert energy[expected_bin] == pytest.approx(energy.sum().item())


def test_invariant_to_brightness_offset():
    """The kernels sum to zero. Integer images keep the arithmetic exact, so the offset cannot even move
    the rounding at bin edges (see the reference test), and the result must be identical."""
    images = torch.randint(-8, 8, (2, 3, 32, 32)).float()
    hog = HOGTarget()
    torch.testing.assert_close(hog(images + 3.0), hog(images), atol=1e-6, rtol=0)


def test_cells_are_l2_normalised_and_zero_images_are_zero():
    hog = HOGTarget()
    out = hog(torch.randn(2, 3, 32, 32)).view(2, 4, 3, 9, 2, 2)  # (B, N, channel, bin, cell_row, cell_col)
    torch.testing.assert_close(out.norm(dim=3), torch.ones(2, 4, 3, 2, 2))
    # Exactly zero gradients give empty cells (a flat non-zero image may not: see the module docstring).
    assert hog(torch.zeros(1, 3, 32, 32)).abs().max() == 0


def test_window_is_tiled_per_patch():
    """With window = patch, identical patches get identical HOG wherever they sit; one big window does not.

    The patch has a zero frame 2 px wide, so its gradients do not depend on its neighbours (or on the
    reflect pad): any difference between the four copies can only come from the window weights.
    """
    patch = torch.zeros(1, 3, 16, 16)
    patch[..., 2:14, 2:14] = torch.randint(-8, 8, (1, 3, 12, 12)).float()  # exact gradients everywhere
    image = patch.repeat(1, 1, 2, 2)
    tiled = HOGTarget(window_size=16)(image)[0]
    for index in range(1, 4):
        torch.testing.assert_close(tiled[index], tiled[0])
    untiled = HOGTarget(window_size=32)(image)[0]
    assert not torch.allclose(untiled[3], untiled[0], atol=1e-3)
    assert not torch.allclose(tiled[0], HOGTarget(window_size=None)(image)[0, 0], atol=1e-3)


def test_window_changes_the_histograms():
    images = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(HOGTarget(window_size=16)(images), HOGTarget(window_size=None)(images))


def test_fp32_under_bf16_autocast():
    images = torch.randn(2, 3, 32, 32)
    hog = HOGTarget()
    expected = hog(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hog(images.bfloat16())
    assert out.dtype == torch.float32
    # bf16 input loses precision, but the computation itself ran in fp32 on that input.
    torch.testing.assert_close(out, hog(images.bfloat16().float()))
    assert (out - expected).abs().mean() < 0.05
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({}, (1, 3, 30, 32), "height 30 is not divisible by patch_size 16"),
        ({}, (1, 3, 32, 40), "width 40 is not divisible by patch_size 16"),
        ({"patch_size": 8, "window_size": 16}, (1, 3, 24, 32), "height 24 is not divisible by window_size 16"),
        ({}, (1, 1, 32, 32), r"expected shape \(B, 3, H, W\)"),
        ({}, (3, 32, 32), r"expected shape \(B, 3, H, W\)"),
    ],
)
def test_bad_image_sizes_raise_one_line_input_error(kwargs, shape, match):
    with pytest.raises(InputError, match=match) as error:
        HOGTarget(**kwargs)(torch.zeros(shape))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 12, "cell_size": 8}, "patch_size 12 is not divisible by cell_size 8"),
        ({"nbins": 0}, "nbins"),
        ({"window_size": 1}, "window_size"),
    ],
)
def test_bad_config_raises_one_line_input_error(kwargs, match):
    with pytest.raises(InputError, match=match) as error:
        HOGTarget(**kwargs)
    assert "\n" not in str(error.value)


def test_integer_images_raise():
    with pytest.raises(InputError, match="float"):
        HOGTarget()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
