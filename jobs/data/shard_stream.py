"""The per-rank sample stream that each DataLoader worker runs (`ShardStream`).

Stages, in order:
1. the slot's shards (`plan_readers`: shard order permuted per epoch when training);
2. `_read_tasks`: each shard opened with `open_url` and read by `read_shard_records`
   (webdataset's tar iteration and grouping), bad samples counted per reason in a `ShardTally`
   and checked against data.max_bad_fraction;
3. `_cycled` (train): passes over the slot's shards through an epoch-seeded shuffle buffer
   (`_shuffled`), repeated until the slot's batch quota is met;
4. `_batches`: a batcher per data.decode (jobs/data/batching.py) decodes (CPU) or inspects
   (device) each sample and emits fixed-size batches, each carrying the skip counters since
   the previous one (how workers report back).
A DataPipelineError in a worker is sent as a batch {"error": message}.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from jobs.contract.data import DataSpec
from jobs.contract.urls import open_url
from jobs.data.batching import JpegBatcher, NotJpegError, PixelBatcher
from jobs.data.shard_format import SKIP_REASONS, BadRecord, RawSample, ShardReadError
from jobs.data.shard_reader import read_shard_records
from jobs.data.shards import DataPipelineError, ReaderTask, ShardSet, plan_readers

_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


class ShardTally:
    """Bad-sample bookkeeping of one read of one shard, for the max_bad_fraction check."""

    __slots__ = ("url", "expected", "seen", "bad", "finished", "first_bad")

    def __init__(self, url: str, expected: int | None) -> None:
        self.url, self.expected = url, expected
        self.seen = 0
        self.bad: dict[str, int] = {}
        self.finished = False
        self.first_bad = ""


class ShardStream(IterableDataset):
    """Yields dict batches for one rank; each DataLoader worker takes its own slot.

    `steps` (train) is the number of batches per epoch of this rank; eval (`steps` None) reads
    the rank's share of every shard once.
    """

    def __init__(
        self,
        shards: ShardSet,
        data: DataSpec,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        steps: int | None,
    ) -> None:
        super().__init__()
        self.shards, self.data, self.train = shards, data, train
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        # Shared memory: a loader's persistent workers read the epoch the trainer sets.
        self._epoch = multiprocessing.RawValue("q", epoch)
        self.seed, self.steps = seed, steps
        self.pin = False  # a pinning DataLoader (GPU run) pins the batches' pixels and labels
        self.field = shards.field
        self.max_bad_fraction = data.max_bad_fraction
        self._counters = np.zeros(len(SKIP_REASONS), dtype=np.int64)
        self._decoded = 0

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = int(value)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        slot, num_slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        order = list(range(len(self.shards.urls)))
        if self.train:  # the same shard order on every rank and worker: a permutation per epoch
            random.Random(f"order:{self.seed}:{self.epoch}").shuffle(order)
        tasks = plan_readers(order, self.shards.samples, num_slots)[slot]
        rng = random.Random(f"sample:{self.seed}:{self.epoch}:{slot}")
        self._counters[:] = 0
        self._decoded = 0
        try:
            if self.train:
                assert self.steps is not None
                quota = self.steps // num_workers + (worker_id < self.steps % num_workers)
                yield from self._batches(self._cycled(tasks, rng), rng, quota)
            else:
                yield from self._batches(self._read_tasks(tasks), rng, None)
        except DataPipelineError as exc:
            yield {"error": str(exc)}

    def _count_bad(
        self, tally: ShardTally, reason: str, key: str, detail: str, count: int = 1
    ) -> None:
        self._counters[_REASON_INDEX[reason]] += count
        tally.bad[reason] = tally.bad.get(reason, 0) + count
        if not tally.first_bad:
            tally.first_bad = f"{key or '?'}: {detail}" if detail else key
        self._check_tally(tally)

    def _check_tally(self, tally: ShardTally) -> None:
        # Before a shard ends only the dataset.json count is a fair denominator.
        if not tally.finished and not tally.expected:
            return
        denominator = max(tally.seen, tally.expected or 0)
        bad = sum(tally.bad.values())
        if bad and bad > self.max_bad_fraction * max(denominator, 1):
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(tally.bad.items()))
            raise DataPipelineError(
                f"{self.field}: shard {tally.url}: {bad} of {max(denominator, bad)} "
                f"samples are bad ({reasons}; first: {tally.first_bad}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}"
            )

    def _read_tasks(self, tasks: list[ReaderTask]) -> Iterator[tuple[RawSample, ShardTally]]:
        for task in tasks:
            url = self.shards.urls[task.shard]
            expected = None
            if self.shards.samples is not None:
                total = self.shards.samples[task.shard]
                expected = len(range(task.offset, total, task.stride))
            tally = ShardTally(url, expected)
            try:
                stream = open_url(url)
            except Exception as exc:  # missing object, no driver, storage credentials, network
                reason = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                raise DataPipelineError(
                    f"{self.field}: cannot open shard {url}: {reason}"
                ) from None
            with stream:
                try:
                    for record in read_shard_records(
                        stream,
                        num_classes=self.data.num_classes,
                        label_key=self.data.label_key,
                        url=url,
                        expected_samples=self.shards.samples[task.shard]
                        if self.shards.samples is not None
                        else None,
                        stride=task.stride,
                        offset=task.offset,
                    ):
                        if isinstance(record, BadRecord):
                            lost = 1
                            if record.reason != "truncated_tar":
                                tally.seen += 1
                            elif expected is not None:  # count the samples the shard lost
                                lost = max(1, expected - tally.seen)
                            self._count_bad(tally, record.reason, record.key, record.detail, lost)
                        else:
                            tally.seen += 1
                            yield record, tally
                except ShardReadError as exc:
                    raise DataPipelineError(f"{self.field}: shard {url}: {exc}") from None
            tally.finished = True
            self._check_tally(tally)

    def _cycled(
        self, tasks: list[ReaderTask], rng: random.Random
    ) -> Iterator[tuple[RawSample, ShardTally]]:
        """This slot's shards, shuffled, over and over (shard order reshuffled after the first
        pass) for training. The shuffle buffer empties at the end of each pass, so a pass never
        holds a sample twice however small the data."""
        if not tasks:
            return
        while True:
            # _batches decodes each item before asking for the next, so at the end of a pass
            # self._decoded counts this pass's decodable samples too.
            decoded_before = self._decoded
            yield from self._shuffled(self._read_tasks(tasks), rng)
            if self._decoded == decoded_before:
                urls = ", ".join(self.shards.urls[t.shard] for t in tasks)
                raise DataPipelineError(f"{self.field}: no readable samples in {urls}")
            tasks = tasks[:]
            rng.shuffle(tasks)

    def _shuffled(
        self, items: Iterator[tuple[RawSample, ShardTally]], rng: random.Random
    ) -> Iterator[tuple[RawSample, ShardTally]]:
        if self.data.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list[tuple[RawSample, ShardTally]] = []
        for item in items:
            if len(buffer) < self.data.shuffle_buffer:
                buffer.append(item)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], item = item, buffer[pick]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _batcher(self) -> PixelBatcher | JpegBatcher:
        data = self.data
        if data.decode == "device":
            return JpegBatcher(batch_size=self.batch_size, train=self.train, augment=data.augment)
        return PixelBatcher(
            batch_size=self.batch_size,
            size=data.image_size,
            channels=data.channels,
            train=self.train,
            augment=data.augment,
        )

    def _batches(
        self,
        items: Iterator[tuple[RawSample, ShardTally]],
        rng: random.Random,
        quota: int | None,
    ) -> Iterator[dict[str, Any]]:
        if quota == 0:
            return
        batcher = self._batcher()
        for sample, tally in items:
            try:
                batcher.add(sample, rng)
            except NotJpegError as exc:
                raise DataPipelineError(
                    f"data.decode: 'device' decodes JPEG images only, and {self.field} shard "
                    f"{tally.url} holds other images ({exc}); set data.decode: cpu, or write "
                    f"JPEG shards (topk shards build --format jpeg)"
                ) from None
            except (
                Exception
            ) as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
                self._count_bad(tally, "bad_image", sample.key, f"{type(exc).__name__}: {exc}")
                continue
            self._decoded += 1
            if batcher.count == self.batch_size:
                yield self._emit(batcher)
                if quota is not None:
                    quota -= 1
                    if quota == 0:
                        return
        if quota is not None:
            raise DataPipelineError(f"{self.field}: no shards assigned to this reader")
        if batcher.count or self._counters.any():
            yield self._emit(batcher)

    def _emit(self, batcher: PixelBatcher | JpegBatcher) -> dict[str, Any]:
        batch = batcher.emit(self.pin)
        batch["skipped"] = self._counters.copy()
        self._counters[:] = 0
        return batch
