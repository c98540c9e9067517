"""Which shards a rank reads: the spec's URLs resolved and checked once per run
(`resolve_shards`), split among (rank x DataLoader worker) reader slots (`plan_readers`), and
the batch count of a training epoch (`steps_per_epoch`)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.contract.data import DataSpec, ShardSource
from jobs.contract.dataset_info import read_dataset_info
from jobs.contract.urls import (
    ALLOWED_PROTOCOLS,
    SHARD_SUFFIXES,
    check_url,
    expand_braces,
    missing_urls,
)


class DataPipelineError(RuntimeError):
    """The data cannot be read as the spec asks: missing shard, too many bad samples, ..."""


@dataclass(frozen=True)
class ShardSet:
    """Checked shard URLs of one spec field, with per-shard sample counts when known, and the
    image format when dataset.json says the writer encoded every image as one ("png", "jpeg",
    "webp"; None when unknown or kept as the source had it)."""

    field: str
    urls: list[str]
    samples: list[int] | None = None
    image_format: str | None = None

    @property
    def total_samples(self) -> int | None:
        return sum(self.samples) if self.samples is not None else None


def resolve_shards(
    source: ShardSource,
    *,
    field: str,
    split: str,
    num_classes: int,
    allowed_protocols: frozenset[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
) -> ShardSet:
    """The shards that `source` (the value of spec field `field`) names.

    A string ending in .tar/.tar.gz/.tgz is a brace pattern of shards; any other string is a
    dataset.json URL or the folder holding one, with `#name` selecting a split (default `split`).
    Every URL, including those read from dataset.json, passes `check_url`. Raises ValueError
    naming `field` (refused URL, unknown split, class count mismatch) and DataPipelineError
    naming the missing shards.
    """
    try:
        if isinstance(source, list):
            urls = [check_url(u, allowed_protocols, allowed_roots) for u in source]
            shards = ShardSet(field, urls)
        elif source.rstrip("/").endswith(SHARD_SUFFIXES):
            urls = [check_url(u, allowed_protocols, allowed_roots) for u in expand_braces(source)]
            shards = ShardSet(field, urls)
        else:
            location, _, split_name = source.partition("#")
            info = read_dataset_info(location, allowed_protocols, allowed_roots)
            if info.num_classes != num_classes:
                raise ValueError(
                    f"dataset {info.url} has {info.num_classes} classes "
                    f"but data.num_classes is {num_classes}"
                )
            split_name = split_name or split
            urls = [
                check_url(u, allowed_protocols, allowed_roots) for u in info.shard_urls(split_name)
            ]
            image_format = info.source.get("image_format")
            shards = ShardSet(
                field,
                urls,
                [e.samples for e in info.shards[split_name]],
                image_format if image_format in ("png", "jpeg", "webp") else None,
            )
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"{field}: {exc}") from None
    if not shards.urls:
        raise ValueError(f"{field}: no shards")
    try:
        missing = missing_urls(shards.urls)
    except ValueError as exc:  # no fsspec driver for the protocol
        raise ValueError(f"{field}: {exc}") from None
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataPipelineError(f"{field}: shard {missing[0]} does not exist{more}")
    return shards


@dataclass(frozen=True, slots=True)
class ReaderTask:
    """Read shard `shard` keeping sample groups with index % stride == offset."""

    shard: int
    stride: int = 1
    offset: int = 0


def plan_readers(
    order: list[int], sizes: list[int] | None, num_slots: int
) -> list[list[ReaderTask]]:
    """Assign shards (in `order`) to `num_slots` readers; every sample goes to exactly one slot.

    With at least as many shards as slots, whole shards go greedily to the least-loaded slot
    (by `sizes`, else by count). With fewer, shard order[p] is read by slots s with
    s % len(order) == p, each keeping every r-th sample (r = number of such slots).
    """
    plan: list[list[ReaderTask]] = [[] for _ in range(num_slots)]
    if len(order) >= num_slots:
        loads = [0] * num_slots
        for shard in order:
            slot = min(range(num_slots), key=lambda s: (loads[s], len(plan[s]), s))
            plan[slot].append(ReaderTask(shard))
            loads[slot] += sizes[shard] if sizes is not None else 1
        return plan
    for slot in range(num_slots):
        position = slot % len(order)
        readers = len(range(position, num_slots, len(order)))
        plan[slot].append(ReaderTask(order[position], readers, slot // len(order)))
    return plan


def steps_per_epoch(data: DataSpec, shards: ShardSet, *, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per training epoch: floor(samples / (batch_size * world_size)),
    at least 1, where samples = data.samples_per_epoch or the dataset.json train count."""
    samples = data.samples_per_epoch or shards.total_samples
    if samples is None:
        raise ValueError(
            "data.samples_per_epoch: required when data.train lists shards instead of a "
            "dataset.json (the sample count is unknown)"
        )
    return max(1, samples // (batch_size * world_size))
