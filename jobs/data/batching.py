"""Batch assembly in a loader worker, one class per data.decode choice.

A batcher takes good samples one at a time (`add`, which raises for an image it cannot use: the
stream counts it as bad_image) and hands out a batch as a dict (`emit`), which crosses to the
rank's process through the DataLoader, its arrays as `WorkerArray`s (through the worker's pipe,
or in shared memory from 1 MiB; pinned by the DataLoader for a GPU run; `received` unwraps them):

- `PixelBatcher` (data.decode "cpu"): decodes, crops, resizes and flips each image
  (image_decode.py) and emits the uint8 pixels [n, S, S] or planar [n, 3, S, S] (`pixels`)
  and int64 labels (`labels`). The rank's process normalises them: on the host with
  `normalise_pixels` for a CPU run, or on the GPU (`PixelBatch.decode`, after the copy) for a
  GPU run. Pixels are a quarter of the bytes of float32 images to send, pin and copy;
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


SHARED_MEMORY_BYTES = 1 << 20
"""From this size a worker's array crosses to the rank's process in shared memory."""


@dataclass(slots=True)
class WorkerArray:
    """An array on its way from a loader worker to the rank's process (`received` unwraps it).

    From SHARED_MEMORY_BYTES it crosses as a tensor in shared memory, below that pickled
    through the worker's pipe; the rank's main thread pays for the crossing, and per batch of
    128 it measured (a 1-worker loader over bench_data.py's shards, 2-core machine) 0.8 ms
    through the pipe against 2.2 ms in shared memory at 128 KB (32 px greyscale), and 42 ms
    against 6 ms at 19 MB (224 px RGB). A pinning DataLoader's pin thread calls `pin_memory`:
    the pixels and labels of a GPU run (`pin`) come out pinned for an asynchronous copy, JPEG
    bytes (which the decoder reads from ordinary memory) as they are.
    """

    data: np.ndarray | torch.Tensor
    pin: bool

    @classmethod
    def of(cls, array: np.ndarray, *, pin: bool) -> WorkerArray:
        big = array.nbytes >= SHARED_MEMORY_BYTES
        return cls(torch.from_numpy(array) if big else array, pin)

    def tensor(self) -> torch.Tensor:
        data = self.data
        return data if isinstance(data, torch.Tensor) else torch.from_numpy(data)

    def pin_memory(self) -> torch.Tensor:
        tensor = self.tensor()
        return tensor.pin_memory() if self.pin else tensor


def received(value: WorkerArray | torch.Tensor) -> torch.Tensor:
    """The tensor of a value a worker sent (a WorkerArray, or what the pin thread made of it)."""
    return value.tensor() if isinstance(value, WorkerArray) else value


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

    def emit(self, pin: bool) -> dict[str, Any]:
        """The batch so far (then empty): uint8 `pixels` and int64 `labels` as WorkerArrays,
        pinned by the DataLoader when `pin` (a GPU run). The arrays are handed over, not
        copied (a copy of a batch of 128 x 224 px RGB took 9 ms): the next batch fills new
        ones."""
        pixels, labels = self._images[: self.count], self._labels[: self.count]
        self._new_arrays()
        return {
            "pixels": WorkerArray.of(pixels, pin=pin),
            "labels": WorkerArray.of(labels, pin=pin),
        }


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

    def emit(self, pin: bool) -> dict[str, Any]:
        """The batch so far (then empty); only the labels are pinned when `pin` (the decoder
        reads the bytes from ordinary memory)."""
        count = self.count
        batch = {
            # writable (a bytearray), so the receiver wraps it in a tensor without a copy
            "jpeg": WorkerArray.of(
                np.frombuffer(bytearray().join(self._parts), dtype=np.uint8), pin=False
            ),
            "lengths": np.fromiter(map(len, self._parts), dtype=np.int64, count=count),
            "boxes": self._boxes[:count].copy(),
            "flips": self._flips[:count].copy(),
            "keys": self._keys,
            "labels": WorkerArray.of(self._labels[:count].copy(), pin=pin),
        }
        self._parts, self._keys, self.count = [], [], 0
        return batch
