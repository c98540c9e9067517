"""Read every sample of a dataset and report totals and bad samples (`topk shards inspect`)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.contract.dataset_info import read_dataset_info
from jobs.contract.urls import ALLOWED_PROTOCOLS, open_url
from jobs.data.shard_format import DEFAULT_LABEL_KEY, BadRecord, ShardReadError
from jobs.data.shard_reader import read_shard_records


@dataclass(frozen=True)
class BadSample:
    split: str
    shard: str
    key: str
    reason: str
    detail: str


@dataclass
class SplitReport:
    samples: int = 0  # good samples read
    listed: int = 0  # samples dataset.json lists
    shards: int = 0
    class_counts: list[int] = field(default_factory=list)


@dataclass
class InspectReport:
    """Totals per split, the bad samples, and mismatches between shards and dataset.json."""

    url: str
    num_classes: int
    splits: dict[str, SplitReport] = field(default_factory=dict)
    bad: list[BadSample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems

    def format(self) -> str:
        lines = [f"{self.url}: {self.num_classes} classes"]
        for name, split in self.splits.items():
            lines.append(
                f"  {name:<5} {split.samples:>8} good samples of {split.listed} listed, "
                f"{split.shards} shards"
            )
        lines += [f"  bad: {b.shard} {b.key or '-'}: {b.reason} ({b.detail})" for b in self.bad]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append(
            "ok" if self.ok else f"{len(self.bad)} bad samples, {len(self.problems)} problems"
        )
        return "\n".join(lines)


def _image_decodes(data: bytes) -> str:
    """'' when PIL decodes `data` fully, else the error text."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        return f"{type(exc).__name__}: {exc}"
    return ""


def inspect_dataset(
    url: str,
    *,
    allowed_protocols: frozenset[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    label_key: str = DEFAULT_LABEL_KEY,
) -> InspectReport:
    """Read and decode every sample of the dataset at `url` (folder, prefix or dataset.json);
    `label_key` is the `.json` label field of samples without a `.cls` member.

    Raises ValueError for a refused URL or malformed dataset.json, FileNotFoundError when there
    is no dataset.json; unreadable shards are reported as problems, not raised.
    """
    info = read_dataset_info(url, allowed_protocols, allowed_roots)
    report = InspectReport(url=info.url, num_classes=info.num_classes)
    for split in info.splits:
        split_report = SplitReport(
            listed=info.num_samples[split],
            shards=len(info.shards[split]),
            class_counts=[0] * info.num_classes,
        )
        report.splits[split] = split_report
        bad_before = len(report.bad)
        for entry, shard_url in zip(info.shards[split], info.shard_urls(split), strict=True):
            if progress is not None:
                progress(f"{split}: reading {shard_url}")
            try:
                with open_url(shard_url) as stream:
                    for record in read_shard_records(
                        stream,
                        num_classes=info.num_classes,
                        label_key=label_key,
                        expected_samples=entry.samples,
                        url=shard_url,
                    ):
                        if isinstance(record, BadRecord):
                            report.bad.append(
                                BadSample(
                                    split, shard_url, record.key, record.reason, record.detail
                                )
                            )
                            continue
                        error = _image_decodes(record.image)
                        if error:
                            report.bad.append(
                                BadSample(split, shard_url, record.key, "bad_image", error)
                            )
                            continue
                        split_report.samples += 1
                        split_report.class_counts[record.label] += 1
            except (FileNotFoundError, ShardReadError, OSError) as exc:
                report.problems.append(f"{split}: cannot read shard {shard_url}: {exc}")
        clean = len(report.bad) == bad_before  # with bad samples the counts differ anyway
        if clean and split_report.class_counts != info.class_counts[split]:
            report.problems.append(
                f"{split}: per-class counts in the shards differ from dataset.json"
            )
    return report
