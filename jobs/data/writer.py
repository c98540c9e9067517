"""The shard writer: a source (folder, zip, arrays) -> seeded splits -> tar shards + dataset.json.

Splitting, per class, in this order: shuffle the class's items with the seed, keep at most
`max_per_class`, take `round(val_fraction * n)` for val and `round(test_fraction * n)` for
test (so held-out splits are balanced whenever the source is), and give the rest to train,
where a long-tail profile may then cut class i down to `n_max * ratio ** (-i / (C - 1))`
("exp", as CIFAR-LT) or to `n_max / ratio` for the second half of the classes ("step").
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import numpy as np

from jobs.contract.dataset_info import DatasetInfo, ShardEntry, write_dataset_info
from jobs.contract.urls import ALLOWED_PROTOCOLS, check_url
from jobs.data.shard_writer import ShardWriter
from jobs.data.sources import ImageSource, open_source

ImageFormat = Literal["keep", "png", "jpeg", "webp"]
ImbalanceProfile = Literal["exp", "step"]

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_FORMAT_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass
class SplitSummary:
    samples: int = 0
    classes: int = 0
    bytes: int = 0
    shards: int = 0


@dataclass
class WriteSummary:
    """What a build wrote: per split totals, the class count and where dataset.json is."""

    dataset_url: str
    num_classes: int
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"wrote {self.dataset_url} ({self.num_classes} classes, {self.seconds:.1f} s)"]
        for name, split in self.splits.items():
            lines.append(
                f"  {name:<5} {split.samples:>8} samples  {split.classes:>5} classes  "
                f"{split.bytes / 1e6:>9.2f} MB  {split.shards:>4} shards"
            )
        return "\n".join(lines)


def long_tail_counts(
    available: list[int], imbalance_ratio: float, profile: ImbalanceProfile = "exp"
) -> list[int]:
    """Per-class training counts for a long-tailed split; class 0 is the head.

    `n_max` is the largest available count; "exp" gives class i `int(n_max * ratio**(-i/(C-1)))`,
    "step" gives the first C//2 classes n_max and the rest `int(n_max / ratio)`; each at least 1
    and at most what the class has. Raises ValueError for a ratio below 1 or an unknown profile.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    num_classes, n_max = len(available), max(available, default=0)
    targets = []
    for i in range(num_classes):
        if profile == "exp":
            fraction = imbalance_ratio ** (-i / (num_classes - 1)) if num_classes > 1 else 1.0
        elif profile == "step":
            fraction = 1.0 if i < num_classes // 2 else 1.0 / imbalance_ratio
        else:
            raise ValueError(f"imbalance_profile must be 'exp' or 'step', got {profile!r}")
        targets.append(int(n_max * fraction + 1e-9))
    return [min(have, max(1, want)) for have, want in zip(available, targets, strict=True)]


def split_indices(
    labels: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_per_class: int | None,
    imbalance_ratio: float,
    imbalance_profile: ImbalanceProfile,
) -> dict[str, np.ndarray]:
    """Item indices per split ("train", "val", "test"), each in a seeded shuffled order."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if max_per_class is not None:
            members = members[:max_per_class]
        n_val = round(val_fraction * len(members))
        n_test = round(test_fraction * len(members))
        pools["val"].append(members[:n_val])
        pools["test"].append(members[n_val : n_val + n_test])
        pools["train"].append(members[n_val + n_test :])
    if imbalance_ratio > 1:
        keep = long_tail_counts(
            [len(p) for p in pools["train"]], imbalance_ratio, imbalance_profile
        )
        pools["train"] = [p[:n] for p, n in zip(pools["train"], keep, strict=True)]
    # Mixed classes inside each shard, so a reader's shuffle buffer has little left to do.
    return {
        name: rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        for name, parts in pools.items()
    }


def corrupt_labels(
    labels: np.ndarray,
    indices: np.ndarray,
    rate: float,
    *,
    groups: Sequence[int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A copy of `labels` where `round(rate * len(indices))` of the items at `indices`, chosen
    uniformly, carry another class of the same group instead of their own.

    `groups[c]` is the group of class c (Omniglot: the alphabet; CIFAR-100: the superclass);
    None puts every class in one group. Every changed label differs from the true one, so
    `rate` is the share of wrong labels. Raises ValueError for a rate outside [0, 1) or a
    changed item whose group has a single class.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"label noise must be in [0, 1), got {rate}")
    noisy = labels.copy()
    count = round(rate * len(indices))
    if count == 0:
        return noisy
    num_classes = int(labels.max()) + 1 if groups is None else len(groups)
    group_of = np.zeros(num_classes, np.int64) if groups is None else np.asarray(groups)
    members = {int(g): np.flatnonzero(group_of == g) for g in np.unique(group_of)}
    rng = np.random.default_rng([seed, 0x6E6F697365])  # its own stream: splits stay unchanged
    for item in rng.choice(indices, size=count, replace=False):
        true = int(labels[item])
        others = members[int(group_of[true])]
        others = others[others != true]
        if len(others) == 0:
            raise ValueError(f"class {true} is alone in its label-noise group: no other label")
        noisy[item] = int(rng.choice(others))
    return noisy


def encode_item(
    item: tuple[bytes, str] | np.ndarray,
    *,
    image_format: ImageFormat,
    max_size: int | None,
    quality: int,
) -> tuple[bytes, str]:
    """An item's bytes in the shard format: kept as is when allowed, else (re-)encoded."""
    from PIL import Image

    if isinstance(item, tuple):
        data, ext = item
        keepable = image_format == "keep" and ext in _PIL_FORMAT
        if keepable and max_size is None:
            return data, ext
        image = Image.open(io.BytesIO(data))
        if keepable and max(image.size) <= (max_size or 0):
            return data, ext
        target_ext = ext if keepable else _FORMAT_EXT.get(image_format, "png")
    else:
        image = Image.fromarray(item)
        target_ext = _FORMAT_EXT.get(image_format, "png")
    if max_size is not None and max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    pil_format = _PIL_FORMAT[target_ext]
    storable = ("L", "RGB") if pil_format == "JPEG" else ("L", "RGB", "RGBA", "LA", "1")
    if image.mode not in storable:
        image = image.convert("RGB")
    out = io.BytesIO()
    options = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    image.save(out, format=pil_format, **options)
    return out.getvalue(), target_ext


class _Progress:
    """Progress lines on a stream, at most one every `interval` seconds."""

    def __init__(self, stream: IO[str] | None, interval: float = 2.0) -> None:
        self.stream, self.interval, self.last = stream, interval, 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is not None and (force or now - self.last >= self.interval):
            self.last = now
            print(text, file=self.stream, flush=True)


def _class_names(
    items: ImageSource, class_names: list[str] | None, label_noise_groups: Sequence[int] | None
) -> list[str]:
    """The class names to record (`class_names` if given), checked against the source's
    classes and the label-noise groups."""
    names = class_names or items.class_names
    if len(names) != len(items.class_names):
        raise ValueError(
            f"{len(names)} class names given for {len(items.class_names)} classes in the source"
        )
    if label_noise_groups is not None and len(label_noise_groups) != len(names):
        raise ValueError(
            f"{len(label_noise_groups)} label-noise groups given for {len(names)} classes"
        )
    return list(names)


def _check_options(*, max_per_class: int | None, max_size: int | None, image_format: str) -> None:
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if image_format not in ("keep", "png", "jpeg", "webp"):
        raise ValueError(f"image_format must be keep, png, jpeg or webp, got {image_format!r}")


def _write_split(
    items: ImageSource,
    order: np.ndarray,
    labels: np.ndarray,
    writer: ShardWriter,
    encoding: dict[str, Any],
    report: _Progress,
    num_classes: int,
) -> tuple[list[int], SplitSummary]:
    """Write the items `order` of one split (named by the writer's prefix) with their
    `labels`, encoded by `encode_item(..., **encoding)`; returns the per-class counts and the
    split's summary. Raises ValueError for an unreadable item."""
    split = writer.prefix
    counts = [0] * num_classes
    with writer:
        for n, item_index in enumerate(order):
            label = int(labels[item_index])
            try:
                data, ext = encode_item(items.load(int(item_index)), **encoding)
            except OSError as exc:  # PIL's error for undecodable input
                raise ValueError(f"cannot read {items.names[item_index]}: {exc}") from None
            writer.write(f"{n:08d}", data, ext, label)
            counts[label] += 1
            report(f"{split}: {n + 1}/{len(order)} samples, {len(writer.shards)} shards")
    report(f"{split}: {len(order)}/{len(order)} samples, {len(writer.shards)} shards", True)
    written = SplitSummary(
        samples=len(order),
        classes=sum(1 for c in counts if c),
        bytes=sum(b for _, _, b in writer.shards),
        shards=len(writer.shards),
    )
    return counts, written


def build_shards(
    source: str | ImageSource,
    out: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    max_per_class: int | None = None,
    imbalance_ratio: float = 1.0,
    imbalance_profile: ImbalanceProfile = "exp",
    image_format: ImageFormat = "keep",
    max_size: int | None = None,
    quality: int = 90,
    shard_max_samples: int = 10_000,
    shard_max_bytes: int = 256 << 20,
    class_names: list[str] | None = None,
    train_label_noise: float = 0.0,
    label_noise_groups: Sequence[int] | None = None,
    progress: IO[str] | None = sys.stderr,
    allowed_protocols: frozenset[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | None = None,
) -> WriteSummary:
    """Write `source` (a local folder/zip/.npz/IDX folder path, or an ImageSource) as shards and
    dataset.json under the fsspec URL `out`; returns the summary. `train_label_noise` gives that
    share of the training split another class of the same group (`label_noise_groups[c]`, see
    `corrupt_labels`); val and test keep the true labels. Deterministic for a given source and
    seed. Raises ValueError for a bad source, option or refused `out` URL."""
    started = time.monotonic()
    out_url = check_url(out, allowed_protocols, allowed_roots)
    _check_options(max_per_class=max_per_class, max_size=max_size, image_format=image_format)
    items = open_source(source) if isinstance(source, str) else source
    names = _class_names(items, class_names, label_noise_groups)
    splits = split_indices(
        items.labels,
        len(names),
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_class=max_per_class,
        imbalance_ratio=imbalance_ratio,
        imbalance_profile=imbalance_profile,
    )
    train_labels = corrupt_labels(
        items.labels, splits["train"], train_label_noise, groups=label_noise_groups, seed=seed
    )
    report = _Progress(progress)
    encoding = {"image_format": image_format, "max_size": max_size, "quality": quality}
    summary = WriteSummary(dataset_url="", num_classes=len(names))
    shard_entries: dict[str, list[ShardEntry]] = {}
    class_counts: dict[str, list[int]] = {}
    for split, order in splits.items():
        if len(order):
            labels = train_labels if split == "train" else items.labels
            writer = ShardWriter(
                out_url, split, max_samples=shard_max_samples, max_bytes=shard_max_bytes
            )
            class_counts[split], summary.splits[split] = _write_split(
                items, order, labels, writer, encoding, report, len(names)
            )
            shard_entries[split] = [ShardEntry(*shard) for shard in writer.shards]
    made_with = {
        "kind": items.kind,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_per_class": max_per_class,
        "imbalance_ratio": imbalance_ratio,
        "imbalance_profile": imbalance_profile,
        "image_format": image_format,
        "max_size": max_size,
        "train_label_noise": train_label_noise,
        "train_labels_changed": int((train_labels != items.labels).sum()),
    }
    num_samples = {split: written.samples for split, written in summary.splits.items()}
    info = DatasetInfo(len(names), names, class_counts, num_samples, shard_entries)
    info.source = made_with
    summary.dataset_url = write_dataset_info(info, out_url)
    summary.seconds = time.monotonic() - started
    return summary
