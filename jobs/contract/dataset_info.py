"""`dataset.json`: the index a shard writer leaves next to its shards (no torch import).

Layout (format_version 1):

    {"format": "topk-webdataset", "format_version": 1,
     "num_classes": C, "class_names": [C names],
     "splits": {"train": {"num_samples": n, "class_counts": [C ints],
                          "shards": [{"path": "train-000000.tar", "samples": n0, "bytes": b0}]},
                "val": {...}, "test": {...}},
     "source": {...how it was made...}}

Shard paths are relative to the folder holding dataset.json (absolute URLs are allowed too).
Readers do without it when the spec names the shards by a brace pattern or a list and gives
data.samples_per_epoch; then per-shard counts are unknown, so a shard cut at a member boundary
is caught by its missing end-of-archive block only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jobs.contract.urls import (
    ALLOWED_PROTOCOLS,
    DATASET_FILENAME,
    check_url,
    join_url,
    open_url,
    parent_url,
)

DATASET_FORMAT = "topk-webdataset"
DATASET_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: its path (relative to dataset.json), sample count and size."""

    path: str
    samples: int
    bytes: int = 0


@dataclass
class DatasetInfo:
    """What dataset.json says: classes, per-split counts and shards, and where it lives (`url`)."""

    num_classes: int
    class_names: list[str]
    class_counts: dict[str, list[int]]
    num_samples: dict[str, int]
    shards: dict[str, list[ShardEntry]]
    url: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = DATASET_FORMAT_VERSION

    @property
    def splits(self) -> list[str]:
        return list(self.shards)

    def shard_urls(self, split: str) -> list[str]:
        """Full URLs of the shards of `split`. Raises ValueError for an unknown split."""
        if split not in self.shards:
            raise ValueError(
                f"dataset {self.url or '(unsaved)'} has no split {split!r} "
                f"(splits: {', '.join(self.splits) or 'none'})"
            )
        base = parent_url(self.url)
        return [join_url(base, entry.path) for entry in self.shards[split]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DATASET_FORMAT,
            "format_version": self.format_version,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "splits": {
                split: {
                    "num_samples": self.num_samples[split],
                    "class_counts": self.class_counts[split],
                    "shards": [
                        {"path": e.path, "samples": e.samples, "bytes": e.bytes} for e in entries
                    ],
                }
                for split, entries in self.shards.items()
            },
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, raw: Any, url: str = "") -> DatasetInfo:
        """Parse and check a dataset.json document. Raises ValueError naming the bad field."""
        where = url or "dataset.json"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object")
        version = raw.get("format_version")
        if version != DATASET_FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {version!r} is not supported "
                f"(this reader knows {DATASET_FORMAT_VERSION})"
            )
        num_classes = raw.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"{where}: num_classes must be a positive integer, got {num_classes!r}"
            )
        names = raw.get("class_names") or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{where}: {len(names)} class_names for {num_classes} classes")
        splits = raw.get("splits")
        if not isinstance(splits, dict) or not splits:
            raise ValueError(f"{where}: 'splits' must be a non-empty object")
        counts: dict[str, list[int]] = {}
        samples: dict[str, int] = {}
        shards: dict[str, list[ShardEntry]] = {}
        for split, body in splits.items():
            try:
                entries = [
                    ShardEntry(str(e["path"]), int(e["samples"]), int(e.get("bytes", 0)))
                    for e in body["shards"]
                ]
                split_counts = [int(c) for c in body["class_counts"]]
                split_samples = int(body["num_samples"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: splits.{split} is malformed ({exc!r})") from None
            if len(split_counts) != num_classes:
                raise ValueError(
                    f"{where}: splits.{split}.class_counts has {len(split_counts)} entries "
                    f"for {num_classes} classes"
                )
            shards[split], counts[split], samples[split] = entries, split_counts, split_samples
        return cls(
            num_classes=num_classes,
            class_names=[str(n) for n in names],
            class_counts=counts,
            num_samples=samples,
            shards=shards,
            url=url,
            source=dict(raw.get("source") or {}),
            format_version=version,
        )


def dataset_json_url(url: str) -> str:
    """The dataset.json URL for a dataset folder/prefix or a dataset.json URL."""
    return url if url.rstrip("/").endswith(".json") else join_url(url, DATASET_FILENAME)


def read_dataset_info(
    url: str,
    allowed_protocols: frozenset[str] | set[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
) -> DatasetInfo:
    """Read the dataset.json at `url` (a dataset.json URL or the folder/prefix holding one).

    Raises ValueError for a refused URL or a malformed file, FileNotFoundError when absent.
    """
    json_url = dataset_json_url(check_url(url, allowed_protocols, allowed_roots))
    try:
        with open_url(json_url) as handle:
            raw = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no dataset.json at {json_url}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_url}: not valid JSON ({exc})") from None
    return DatasetInfo.from_dict(raw, url=json_url)


def write_dataset_info(info: DatasetInfo, folder_url: str) -> str:
    """Write `info` as dataset.json into `folder_url`; returns the file's URL."""
    json_url = join_url(folder_url, DATASET_FILENAME)
    with open_url(json_url, "wb") as handle:
        handle.write(json.dumps(info.to_dict(), indent=1).encode("utf-8"))
    info.url = json_url
    return json_url
