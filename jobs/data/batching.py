"""Batch assembly in a loader worker, one class per data.decode choice.

A batcher takes good samples one at a time (`add`, which raises for an image it cannot use: the
stream counts it as bad_image) and hands out a batch as a dict of arrays (`emit`), which crosses
to the rank's process through the DataLoader:

- `PixelBatcher` (data.decode "cpu"): decodes, crops, resizes and flips each image with PIL
  and emits the uint8 pixels [n, S, S] or planar [n, 3, S, S] (`pixels`) and int64 labels
  (`labels`).
  The rank's process normalises them: on the host with `normalise_pixels` for a CPU run, or on
  the GPU (`PixelBatch.decode`, after the copy) for a GPU run. Pixels are a quarter of the
  bytes of float32 images through the worker's pipe or shared memory, the pinned buffer and
  the host-to-device copy;
- `JpegBatcher` (data.decode "device"): reads each JPEG's header only, picks the same view as
  the CPU path, and emits the bytes back to back (`jpeg`, `lengths`), the views (`boxes`,
  `flips`), the sample keys and the labels; `jobs.data.device_decode.JpegBatch` decodes them on
  the training device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs.contract.data import AugmentSpec
from jobs.data.image_decode import JPEG_EXTENSIONS, choose_view, decode_image, jpeg_geometry
from jobs.data.shard_format import RawSample


class NotJpegError(ValueError):
    """data.decode "device" met an image that is not a JPEG: the shards do not suit it."""


def normalisation(augment: AugmentSpec, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel, float32 [channels]: (x / 255 - mean) / std == x * scale -
    shift for uint8 pixels x."""
    mean = np.broadcast_to(np.asarray(augment.mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(augment.std, np.float32), (channels,))
    return (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)


def normalise_pixels(pixels: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """uint8 pixels [n, S, S] or [n, 3, S, S] -> float32 images [n, C, S, S] (contiguous),
    x * scale - shift per channel (`normalisation`), on the host, as `PixelBatch.decode` does
    on a device."""
    # NumPy, in place after the product: no intra-op thread pool (torch's spins for
    # milliseconds per op on a busy machine). Planar pixels: the inner loop runs a whole plane.
    if pixels.ndim == 3:
        images = np.multiply(pixels, scale[0], dtype=np.float32)
        images -= shift[0]
        return images.reshape(pixels.shape[0], 1, *pixels.shape[1:])
    images = np.multiply(pixels, scale[:, None, None], dtype=np.float32)
    images -= shift[:, None, None]
    return images


@dataclass
class PixelBatch:
    """A batch of uint8 pixels (a pinned tensor [n, S, S] or [n, 3, S, S]) for a GPU run: the
    training loop copies the pixels to its device and normalises them there (`decode`), so a
    quarter of the bytes of float32 images are pinned and copied."""

    pixels: torch.Tensor
    scale: Sequence[float]
    shift: Sequence[float]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def decode(
        self, device: torch.device | str, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [n, C, S, S] normalised, labels [n]), both on `device`, with the
        same values as `normalise_pixels` (the same float32 products and differences); no
        read back to the host."""
        pixels = self.pixels.to(device, non_blocking=True)
        images = (pixels.unsqueeze(1) if pixels.ndim == 3 else pixels).float()
        normalise_in_place(images, self.scale, self.shift)
        return images, labels.to(device, non_blocking=True)


def normalise_in_place(
    images: torch.Tensor, scale: Sequence[float], shift: Sequence[float]
) -> torch.Tensor:
    """float32 images [n, C, S, S] in 0..255 -> x * scale - shift per channel, in place, on
    whatever device they are. The factors are Python numbers: no host-to-device copy, no
    sync."""
    if len(set(scale)) == 1 and len(set(shift)) == 1:
        return images.mul_(scale[0]).sub_(shift[0])
    for channel, (factor, offset) in enumerate(zip(scale, shift, strict=True)):
        images[:, channel].mul_(factor).sub_(offset)
    return images


class PixelBatcher:
    """Decoded images: uint8 pixels gathered in place, a batch at a time."""

    def __init__(
        self, *, batch_size: int, size: int, channels: int, train: bool, augment: AugmentSpec
    ) -> None:
        self.batch_size, self.size, self.channels = batch_size, size, channels
        self.train, self.augment = train, augment
        self._shape = (batch_size, size, size) if channels == 1 else (batch_size, 3, size, size)
        self._new_arrays()

    def _new_arrays(self) -> None:
        self._images = np.empty(self._shape, dtype=np.uint8)
        self._labels = np.empty(self.batch_size, dtype=np.int64)
        self.count = 0

    def add(self, sample: RawSample, rng: random.Random) -> None:
        self._images[self.count] = decode_image(
            sample.image,
            image_ext=sample.image_ext,
            size=self.size,
            channels=self.channels,
            train=self.train,
            augment=self.augment,
            rng=rng,
        )
        self._labels[self.count] = sample.label
        self.count += 1

    def emit(self, tensors: bool) -> dict[str, Any]:
        """The batch so far (then empty): uint8 `pixels` and int64 `labels`, as arrays, or as
        tensors when `tensors` (a GPU run's DataLoader pins them). The arrays are handed over,
        not copied (a copy of a batch of 128 x 224 px RGB took 9 ms): the next batch fills new
        ones."""
        pixels, labels = self._images[: self.count], self._labels[: self.count]
        self._new_arrays()
        # NumPy arrays, not tensors, for a CPU run: they cross to the main process pickled
        # through the worker's pipe, which for batches this size is cheaper than a new
        # shared-memory segment per tensor (measured: 1 worker went from ~0.77 to ~0.9 of the
        # in-process rate). The main process wraps them without a copy. A GPU run pins them:
        # shared-memory tensors then.
        if tensors:
            return {"pixels": torch.from_numpy(pixels), "labels": torch.from_numpy(labels)}
        return {"pixels": pixels, "labels": labels}


class JpegBatcher:
    """JPEG bytes and the view of each image, for decoding on the device in one call."""

    def __init__(self, *, batch_size: int, train: bool, augment: AugmentSpec) -> None:
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self._parts: list[bytes] = []
        self._keys: list[str] = []
        self._boxes = np.empty((batch_size, 4), dtype=np.int32)
        self._flips = np.empty(batch_size, dtype=np.bool_)
        self._labels = np.empty(batch_size, dtype=np.int64)
        self.count = 0

    def add(self, sample: RawSample, rng: random.Random) -> None:
        if sample.image_ext not in JPEG_EXTENSIONS:
            raise NotJpegError(f"sample {sample.key} is a .{sample.image_ext} image")
        width, height = jpeg_geometry(sample.image)
        box, flip = choose_view(width, height, train=self.train, augment=self.augment, rng=rng)
        self._parts.append(sample.image)
        self._keys.append(sample.key)
        self._boxes[self.count] = box
        self._flips[self.count] = flip
        self._labels[self.count] = sample.label
        self.count += 1

    def emit(self, tensors: bool) -> dict[str, Any]:
        """The batch so far (then empty). Only the labels become a tensor when `tensors`: the
        decoder reads the bytes from ordinary memory, so pinning them would be wasted."""
        count = self.count
        labels = self._labels[:count].copy()
        batch = {
            # A writable NumPy array: the receiving process wraps it in a tensor without a copy,
            # and a pinning DataLoader leaves it alone (it would rebuild a bytearray byte by
            # byte, as a sequence).
            "jpeg": np.frombuffer(bytearray(b"".join(self._parts)), dtype=np.uint8),
            "lengths": np.fromiter(map(len, self._parts), dtype=np.int64, count=count),
            "boxes": self._boxes[:count].copy(),
            "flips": self._flips[:count].copy(),
            "keys": self._keys,
            "labels": torch.from_numpy(labels) if tensors else labels,
        }
        self._parts, self._keys, self.count = [], [], 0
        return batch
