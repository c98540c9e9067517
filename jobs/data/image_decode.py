"""Turning one image's bytes into what a batch holds: the crop and flip of a sample
(`choose_view`, shared by both decode paths so they pick the same view), the CPU decode of
data.decode "cpu" (`decode_image`, in a loader worker: PIL, or torchvision for RGB JPEGs and
PNGs; RGB resized by torch), and the header check of data.decode
"device" (`jpeg_geometry`: the worker reads only a JPEG's header; jobs/data/device_decode.py
decodes the batch on the training device)."""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.contract.data import AugmentSpec

# Telling PIL the format skips probing every plugin; a wrong extension still fails cleanly.
_PIL_FORMATS = {"jpg": ("JPEG",), "jpeg": ("JPEG",), "png": ("PNG",), "webp": ("WEBP",)}
JPEG_EXTENSIONS = ("jpg", "jpeg")


@functools.cache
def _torchvision_rgb_decoders() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{PIL format: encoded bytes (uint8 tensor) -> uint8 [3, H, W]}: torchvision's JPEG and
    PNG decoders, called as the ops of its image library. Its Python wrappers (deprecated
    since torchvision 0.29 in favour of TorchCodec) cost ~50 us a call in a deprecation
    warning and usage logging, as much as decoding a small image. {} without the library:
    PIL decodes everything then (tests/jobs/data/test_rgb_decode.py checks they are in use).
    Looked up on the first RGB image, not at import (torchvision takes seconds to import)."""
    try:
        from torchvision.io import ImageReadMode  # loads the image library

        rgb = ImageReadMode.RGB.value
        jpeg, png = torch.ops.image.decode_jpeg, torch.ops.image.decode_png
    except (ImportError, AttributeError, RuntimeError):
        return {}
    return {
        "JPEG": lambda data: jpeg(data, rgb, False),
        "PNG": lambda data: png(data, rgb, False),
    }


Box = tuple[int, int, int, int]
"""(left, top, right, bottom) in pixels, right and bottom exclusive."""


def random_resized_crop_box(
    width: int, height: int, scale_min: float, rng: random.Random
) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box as torchvision's RandomResizedCrop picks it: area
    fraction uniform in [scale_min, 1], log aspect ratio uniform in [log 3/4, log 4/3]; after
    10 misses, the central crop with the aspect ratio clamped to that range."""
    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def choose_view(
    width: int, height: int, *, train: bool, augment: AugmentSpec, rng: random.Random
) -> tuple[Box, bool]:
    """The crop box and whether to flip it horizontally, for an image of width x height.

    Train: a random resized crop if enabled, else the central square (= resize the shorter side
    + center crop); then a flip with probability 1/2 if enabled. Eval: the central square, no
    flip. Draws from `rng` in that order.
    """
    if train and augment.random_resized_crop:
        box = random_resized_crop_box(width, height, augment.crop_scale_min, rng)
    else:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    flip = train and augment.hflip and rng.random() < 0.5
    return box, flip


def decode_image(
    data: bytes,
    *,
    image_ext: str | None = None,
    size: int,
    channels: int,
    train: bool,
    augment: AugmentSpec,
    rng: random.Random,
) -> np.ndarray:
    """Image bytes -> uint8 [size, size] (channels 1) or planar [3, size, size] (channels 3).

    The view of `choose_view` (picked on the stored image's size), cropped and resized to
    `size` by antialiased bilinear interpolation, then flipped. A JPEG whose crop is at least
    twice `size` is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps the crop at
    least `size` pixels wide. Greyscale goes through PIL (crop and resize in one call). RGB is
    resized by torch (`_resized_view`), the device decoder's filter, at half PIL's CPU time at
    224 px: decoded by torchvision (JPEG, PNG) or, at a reduced scale or in WebP, by PIL (the
    box then rounded to whole pixels of the reduced image). Raises whatever the decoders raise
    for undecodable bytes.
    """
    image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(image_ext))
    mode = "L" if channels == 1 else "RGB"
    width, height = image.size
    box, flip = choose_view(width, height, train=train, augment=augment, rng=rng)
    reduced = False
    if image.format == "JPEG":
        crop = max(min(box[2] - box[0], box[3] - box[1]), 1)
        drafted = image.draft(mode, (-(-width * size // crop), -(-height * size // crop)))
        if drafted is not None and image.size != (width, height):
            scale = width / drafted[1][2]  # the DCT scale: 2, 4 or 8
            box = tuple(edge / scale for edge in box)  # type: ignore[assignment]
            reduced = True
    if channels == 3:
        pixels = None if reduced else _torchvision_rgb(data, image.format)
        if pixels is None:  # PIL decodes
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            pixels = pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1)
            box = tuple(round(edge) for edge in box)  # type: ignore[assignment]
        return _resized_view(pixels, box, flip, size)
    if image.mode != mode:
        image = image.convert(mode)
    if box != (0, 0, size, size) or image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # tobytes + frombuffer: a third of the cost of np.asarray(image) for small images
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size, size)


def _torchvision_rgb(data: bytes, image_format: str | None) -> torch.Tensor | None:
    """uint8 [3, H, W] decoded by torchvision, or None for a format it is not used for and
    for bytes it cannot decode to 8-bit RGB (16-bit PNG, a JPEG it refuses): PIL then decodes
    them, or raises the error that counts the sample as bad."""
    decoder = _torchvision_rgb_decoders().get(image_format or "")
    if decoder is None:
        return None
    try:
        pixels = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError:
        return None
    return pixels if pixels.dtype == torch.uint8 else None


def _resized_view(pixels: torch.Tensor, box: Box, flip: bool, size: int) -> np.ndarray:
    """uint8 [3, size, size]: the box of RGB pixels [3, H, W], resized by torch's antialiased
    bilinear interpolation (crop first, so unlike PIL's no pixel outside the box weighs in:
    the device decoder's filter), then flipped."""
    left, top, right, bottom = box
    view = pixels[:, top:bottom, left:right]
    # One image is too little work for torch's thread pool: in a loader worker torch runs one
    # thread already; in the rank's own process (loader_workers 0) its threads would spin
    # (measured at 224 px: twice the CPU time, no gain in wall time).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if view.shape[1:] != (size, size):
            view = F.interpolate(view[None], size=(size, size), mode="bilinear", antialias=True)[0]
        if flip:
            view = view.flip(-1)
    finally:
        torch.set_num_threads(threads)
    return view.numpy()


def jpeg_geometry(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG from its header, without decoding it; for data.decode "device".

    Raises ValueError (a bad_image) for bytes that are not a JPEG, a JPEG cut short (no
    end-of-image marker after the start of its scan), and colour spaces the batched decoder
    does not take (CMYK, ...): what would fail on the device is caught here, per sample.
    """
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG (no start-of-image marker)")
    image = Image.open(io.BytesIO(data), formats=("JPEG",))
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"a {image.mode} JPEG: data.decode device takes greyscale and RGB only")
    scan_start = image.tile[0][2] if image.tile else 0
    if data.rfind(b"\xff\xd9", scan_start) < 0:
        raise ValueError("the JPEG is cut short (no end-of-image marker)")
    return image.size
