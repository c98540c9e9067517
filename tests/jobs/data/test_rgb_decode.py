"""data.decode "cpu" for RGB: images are resized by torch (`jobs.data.image_decode.
_resized_view`), JPEGs and PNGs decoded by torchvision (`_torchvision_rgb`), the rest and
reduced-scale JPEGs by PIL; these tests hold that path to the formula of an antialiased
bilinear resize and to PIL's decoding, mode by mode."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.contract.data import AugmentSpec
from jobs.data.image_decode import _torchvision_rgb, choose_view, decode_image


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def triangle_weights(length: int, size: int) -> np.ndarray:
    """[size, length]: output pixel i of a segment of `length` pixels resized to `size`, as a
    weighted mean of the input pixels: the tent of half-width max(scale, 1) (scale =
    length / size) centred on (i + 0.5) * scale, pixel j sampled at its centre j + 0.5."""
    scale = length / size
    support = max(scale, 1.0)
    centres = (np.arange(size) + 0.5) * scale
    positions = np.arange(length) + 0.5
    weights = np.clip(1 - np.abs(positions[None, :] - centres[:, None]) / support, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def reference_view(pixels: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    """uint8 [3, size, size] from HWC pixels: the box cropped, resized along each axis by
    `triangle_weights` in float64, rounded, flipped."""
    left, top, right, bottom = box
    crop = pixels[top:bottom, left:right].astype(np.float64)
    rows = triangle_weights(bottom - top, size)
    columns = triangle_weights(right - left, size)
    resized = np.einsum("ih,hwc,jw->cij", rows, crop, columns)
    out = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return out[:, :, ::-1] if flip else out


def test_rgb_views_are_the_antialiased_bilinear_resize_of_the_crop():
    """Random resized crops (down- and upscaled) and flips of a lossless RGB image, against the
    formula in float64: within 2 of 255 (torch rounds to uint8 between its two passes)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(pixels), "PNG")
    augment = AugmentSpec(random_resized_crop=True, crop_scale_min=0.1, hflip=True)
    flips, scales = set(), set()
    for seed in range(40):
        size = (16, 24, 40)[seed % 3]
        box, flip = choose_view(64, 48, train=True, augment=augment, rng=random.Random(seed))
        got = decode_image(
            data, size=size, channels=3, train=True, augment=augment, rng=random.Random(seed)
        )
        assert got.shape == (3, size, size) and got.dtype == np.uint8
        expected = reference_view(pixels, box, flip, size)
        assert np.abs(got.astype(int) - expected).max() <= 2, (seed, box, flip, size)
        flips.add(flip)
        scales.add((box[2] - box[0]) > size)
    assert flips == {True, False} and scales == {True, False}  # both flips, down and up


@pytest.mark.parametrize(
    ("name", "make", "fmt"),
    [
        ("RGB JPEG", lambda image: image, "JPEG"),
        ("greyscale JPEG", lambda image: image.convert("L"), "JPEG"),
        ("CMYK JPEG", lambda image: image.convert("CMYK"), "JPEG"),
        ("RGBA PNG", lambda image: image.convert("RGBA"), "PNG"),
        ("palette PNG", lambda image: image.convert("P"), "PNG"),
        ("greyscale+alpha PNG", lambda image: image.convert("LA"), "PNG"),
        ("bilevel PNG", lambda image: image.convert("1"), "PNG"),
        # torchvision gives 16 bits a channel: PIL decodes it instead
        (
            "16-bit PNG",
            lambda image: Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257),
            "PNG",
        ),
        ("WebP (PIL)", lambda image: image, "WEBP"),
    ],
)
def test_rgb_pixels_are_those_pil_decodes(name, make, fmt):
    """Every colour mode comes out as PIL's conversion to RGB, value for value (evaluation's
    central square at the stored size: no resize)."""
    rng = np.random.default_rng(1)
    image = make(Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)))
    data = encoded(image, fmt)
    got = decode_image(
        data, size=40, channels=3, train=False, augment=AugmentSpec(), rng=random.Random(0)
    )
    decoded = Image.open(io.BytesIO(data)).convert("RGB").crop((8, 0, 48, 40))
    assert got.shape == (3, 40, 40)
    assert np.array_equal(got, np.asarray(decoded).transpose(2, 0, 1)), name


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_cut_rgb_image_raises_for_the_bad_image_count(fmt):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), np.uint8))
    data = encoded(image, fmt)
    with pytest.raises(OSError, match="truncated"):
        decode_image(
            data[: len(data) // 2],
            size=32,
            channels=3,
            train=False,
            augment=AugmentSpec(),
            rng=random.Random(0),
        )


def test_decoding_leaves_torch_threads_as_they_were():
    """The resize runs on one thread (a loader with 0 workers decodes in the training
    process, whose thread count must not change)."""
    image = Image.fromarray(np.full((30, 30, 3), 90, np.uint8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = decode_image(
            encoded(image, "JPEG"),
            size=64,
            channels=3,
            train=True,
            augment=AugmentSpec(),
            rng=random.Random(0),
        )
        assert torch.get_num_threads() == 2
        assert out.shape == (3, 64, 64) and abs(int(out.mean()) - 90) <= 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_torchvision_decodes_rgb_jpegs_and_pngs(fmt):
    """The fast decoders are in use: torchvision's image library and its ops are there (a
    torchvision that moved them would fall back to PIL, silently slower)."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 32, 3), np.uint8))
    data = encoded(image, fmt)
    pixels = _torchvision_rgb(data, fmt)
    assert pixels is not None and pixels.shape == (3, 24, 32)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(pixels.numpy(), expected.transpose(2, 0, 1))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_resized_by_the_formula():
    """Evaluation's central 384 px square of a 512 x 384 JPEG at 64 px: decoded at 1/4 scale
    (128 x 96, PIL), the box (16, 0, 112, 96) of that resized as the formula says."""
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((512, 384))
    data = encoded(image, "JPEG")
    got = decode_image(
        data, size=64, channels=3, train=False, augment=AugmentSpec(), rng=random.Random(0)
    )
    reduced = Image.open(io.BytesIO(data))
    reduced.draft("RGB", (128, 96))
    assert reduced.size == (128, 96)
    expected = reference_view(np.asarray(reduced), (16, 0, 112, 96), False, 64)
    assert got.shape == (3, 64, 64) and np.abs(got.astype(int) - expected).max() <= 2
    augment = AugmentSpec(random_resized_crop=True, hflip=True)
    for seed in range(10):  # random crops, whose boxes at the reduced scale are rounded
        view = decode_image(
            data, size=64, channels=3, train=True, augment=augment, rng=random.Random(seed)
        )
        assert view.shape == (3, 64, 64) and view.dtype == np.uint8
