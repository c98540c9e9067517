"""The input pipeline every training worker runs: shards -> samples -> batches, per rank.

`build_train_loader` / `build_eval_loader` put the stages together:

1. `resolve_shards` (shards.py)    the spec's URLs (brace pattern, list, or dataset.json) ->
                                   checked shard URLs, once per run
2. `plan_readers` (shards.py)      shards -> (rank x DataLoader worker) slots; fewer shards than
                                   slots are split by sample index, so evaluation reads every
                                   sample exactly once
3. `ShardStream` (shard_stream.py) in each worker: read the slot's shards with webdataset
                                   (shard_reader.py), count bad samples by reason, shuffle
                                   (train), and batch: decoded uint8 pixels (data.decode "cpu",
                                   image_decode.py) or JPEG bytes with each image's crop and
                                   flip (data.decode "device"), batching.py
4. `ShardLoader` (here)            the DataLoader in the rank's process (persistent workers,
                                   pinned batches for a GPU): sums the workers' counters into
                                   `.stats`, turns a worker's error into a DataPipelineError,
                                   and yields (images, labels), where images is a normalised
                                   float tensor or, for a GPU run, a `PixelBatch` (uint8, a
                                   quarter of the bytes to pin and copy), or with data.decode
                                   "device" a `JpegBatch`, that the training loop normalises or
                                   decodes on its device (batching.py, device_decode.py)

Training: every rank yields exactly `steps_per_epoch` batches (from `samples_per_epoch` or the
dataset.json count), each worker cycling its shards if it runs short, so no rank waits at the
end of an epoch. A brace pattern of shards with `samples_per_epoch` needs no dataset.json, so
shards made by other WebDataset tools train as they are (labels from `.cls`, or from the
`data.label_key` field of `.json`). Evaluation: each validation sample is yielded once across
all ranks; ranks may yield different batch counts, so sum metric counts after the loop, not per
batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from jobs.contract.data import DataSpec, ShardSource
from jobs.contract.urls import ALLOWED_PROTOCOLS
from jobs.data.batching import PixelBatch, normalisation, normalise_pixels, received
from jobs.data.device_decode import JpegBatch
from jobs.data.shard_format import SKIP_REASONS
from jobs.data.shard_stream import ShardStream
from jobs.data.shards import DataPipelineError, ShardSet, resolve_shards, steps_per_epoch

__all__ = [
    "DataPipelineError",
    "LoaderStats",
    "ShardLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "resolve_shards",
]


@dataclass
class LoaderStats:
    """Good samples yielded and samples skipped per reason (SKIP_REASONS) in one pass.

    With data.decode "device", an image that fails to decode on the device is moved from
    `samples` to skipped["bad_image"] when its batch is decoded (`device_failures` counts them).
    """

    samples: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    device_failures: int = 0
    first_device_failure: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add_counters(self, counters: np.ndarray) -> None:
        for reason, count in zip(SKIP_REASONS, counters.tolist(), strict=True):
            self.skipped[reason] += int(count)

    def add_device_failures(self, count: int, first: str) -> None:
        self.samples -= count
        self.skipped["bad_image"] += count
        self.device_failures += count
        self.first_device_failure = self.first_device_failure or first

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": dict(self.skipped)}


def _keep_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate_fn: batches arrive built; leave their arrays as they are."""
    return batch


class ShardLoader:
    """Iterate (images, labels long [B]) for one rank; images are float [B, channels, S, S]
    normalised, or, for the training loop to decode on its device (`DevicePrefetcher`): with
    `pin_memory` (a GPU run) a PixelBatch of pinned uint8 pixels, and with data.decode "device"
    a JpegBatch.

    `stats` (LoaderStats) holds the counts of the current or last pass. Raises
    DataPipelineError (naming the spec field and shard) when a shard is missing or unreadable,
    or a shard's bad-sample fraction passes data.max_bad_fraction.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool = False):
        self._stream, self.num_workers = stream, num_workers
        self.pin_memory = pin_memory
        stream.pin = pin_memory
        self.stats = LoaderStats()
        self._loader: DataLoader | None = None
        data = stream.data
        self._scale, self._shift = normalisation(data.augment, data.channels)
        # As Python numbers for the batches normalised on the device (no host-to-device copy)
        self._factors = {"scale": self._scale.tolist(), "shift": self._shift.tolist()}
        self._jpeg_options = {"size": data.image_size, "channels": data.channels, **self._factors}

    def _data_loader(self) -> DataLoader:
        """One DataLoader for the loader's life: its workers persist across passes (epochs),
        and with `pin_memory` its pinning thread pins each batch for an asynchronous copy to
        the GPU."""
        if self._loader is None:
            self._loader = DataLoader(
                self._stream,
                batch_size=None,
                collate_fn=_keep_batch,
                num_workers=self.num_workers,
                prefetch_factor=4 if self.num_workers else None,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.pin_memory,
            )
        return self._loader

    def _images(self, batch: dict[str, Any]) -> torch.Tensor | PixelBatch | JpegBatch:
        if "pixels" in batch:
            pixels = received(batch["pixels"])
            if not self.pin_memory:  # a CPU run: normalised here, on the host
                scale, shift = self._scale, self._shift
                return torch.from_numpy(normalise_pixels(pixels.numpy(), scale, shift))
            return PixelBatch(pixels, **self._factors)
        return JpegBatch(
            data=received(batch["jpeg"]),
            lengths=batch["lengths"].tolist(),
            boxes=batch["boxes"].tolist(),
            flips=batch["flips"].tolist(),
            keys=batch["keys"],
            report_bad=self.stats.add_device_failures,
            **self._jpeg_options,
        )

    def _check_device_failures(self) -> None:
        stats, limit = self.stats, self._stream.max_bad_fraction
        seen = stats.samples + stats.device_failures
        if stats.device_failures > limit * max(seen, 1):
            raise DataPipelineError(
                f"{self._stream.field}: {stats.device_failures} of {seen} JPEG images failed "
                f"to decode on the device (first: {stats.first_device_failure}), more than "
                f"data.max_bad_fraction={limit}"
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor | PixelBatch | JpegBatch, torch.Tensor]]:
        self.stats = LoaderStats()
        for batch in self._data_loader():
            if "error" in batch:
                raise DataPipelineError(batch["error"])
            self.stats.add_counters(batch["skipped"])
            labels = received(batch["labels"])
            if labels.numel() == 0:
                continue
            self.stats.samples += labels.numel()
            yield self._images(batch), labels
        # With data.decode "device" the loop has decoded every batch by now (it asks for the
        # next batch after decoding the one before).
        self._check_device_failures()


class TrainLoader(ShardLoader):
    """A ShardLoader whose every pass yields exactly `steps_per_epoch` batches on every rank."""

    def __init__(self, stream: ShardStream, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        assert stream.steps is not None
        self.steps_per_epoch = stream.steps

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (its shard order and shuffling), reusing the
        loader and its workers."""
        self._stream.epoch = epoch


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _check_decode(data: DataSpec, shards: ShardSet) -> None:
    """data.decode "device" on shards that dataset.json says hold no JPEG: a spec error now,
    rather than in the first batch."""
    if data.decode == "device" and shards.image_format not in (None, "jpeg"):
        raise ValueError(
            f"data.decode: 'device' decodes JPEG images only, and the shards of {shards.field} "
            f"hold {shards.image_format} images (dataset.json); set data.decode: cpu, or write "
            f"JPEG shards (topk shards build --format jpeg)"
        )


def _resolve(
    data: DataSpec,
    split: str,
    allowed_protocols: frozenset[str],
    allowed_roots: list[str] | None,
    source: ShardSource | None = None,
    source_field: str | None = None,
) -> ShardSet:
    """The checked shards of `data.train` or `data.val` (`split`), or of `source` (named
    `source_field` in errors) when given."""
    if source is None:
        source = data.train if split == "train" else data.val
    if source is None:
        raise ValueError("data.val: not set, so there is nothing to evaluate on")
    shards = resolve_shards(
        source,
        field=source_field or f"data.{split}",
        split=split,
        num_classes=data.num_classes,
        allowed_protocols=allowed_protocols,
        allowed_roots=allowed_roots,
    )
    _check_decode(data, shards)
    return shards


def build_train_loader(
    data: DataSpec,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    allowed_protocols: frozenset[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The training input of one rank, starting at `epoch` (shard order and shuffling seeded
    by seed and epoch); `set_epoch` moves it on, reusing the resolved shards and the loader's
    workers. `pin_memory` for a GPU run. Raises ValueError naming the spec field,
    DataPipelineError for a missing shard; iteration raises DataPipelineError for unreadable or
    too-bad shards."""
    _check_rank(batch_size, rank, world_size)
    shards = _resolve(data, "train", allowed_protocols, allowed_roots)
    steps = steps_per_epoch(data, shards, batch_size=batch_size, world_size=world_size)
    stream = ShardStream(
        shards,
        data,
        train=True,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        steps=steps,
    )
    return TrainLoader(stream, num_workers=data.loader_workers, pin_memory=pin_memory)


def build_eval_loader(
    data: DataSpec,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    allowed_protocols: frozenset[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
    pin_memory: bool = False,
    source: ShardSource | None = None,
    source_field: str = "data.val",
) -> ShardLoader:
    """The evaluation input of one rank: across ranks every sample of data.val (or of `source`,
    another held-out split such as `dataset.json#test`, named `source_field` in errors) is yielded
    exactly once, without augmentation (central square resized). Raises ValueError when there
    is nothing to evaluate or a bad URL, DataPipelineError for a missing shard."""
    _check_rank(batch_size, rank, world_size)
    shards = _resolve(data, "val", allowed_protocols, allowed_roots, source, source_field)
    stream = ShardStream(
        shards,
        data,
        train=False,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        epoch=0,
        seed=0,
        steps=None,
    )
    return ShardLoader(stream, num_workers=data.loader_workers, pin_memory=pin_memory)
