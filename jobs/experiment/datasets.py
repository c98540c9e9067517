"""The experiment's datasets: shards and dataset.json under OUT/data/<dataset>/, built once from
each dataset's local source with its split, long tail and label noise, and reused while the
dataset's build settings (OUT/data/<dataset>/build.json) are unchanged. Datasets whose build
settings are the same (the same data scored at several K) share the first one's folder.

Label noise touches the training split only (validation and test keep the true labels), drawn
from its own random stream, so a noisy dataset has the same splits as its clean twin:
- `block` (the paper's model): each training label is redrawn with probability p uniformly in
  its block of b consecutive classes, the true label included; the shard writer is asked for a
  share p (b-1)/b of wrong labels, each another class of the block, chosen uniformly
  (`writer_noise_rate`, `block_groups`);
- `class_prefix`: a share p of the labels becomes another class of the same alphabet.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.experiment.config import DatasetConfig, ExperimentConfig

Log = Callable[[str], None]

OFFICIAL_TEST_FOLDER = "official-test"
"""Where a `test_from` dataset's test shards go, inside its folder."""
_IDX_IMAGES = re.compile(r"^(?P<stem>.*)images[-.]idx3-ubyte(\.gz)?$")
_TEST_ALL = 1.0 - 1e-9
"""A test fraction that puts every item of a class (fewer than 10^8) in the test split."""


def log_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def block_groups(num_classes: int, block: int) -> list[int]:
    """The noise block of each class: classes [b*i, b*i + b) form block i; a last block smaller
    than `block` (136 = 27 x 5 + 1) joins the one before, so no class is alone."""
    full = max(num_classes // block, 1)
    return [min(c // block, full - 1) for c in range(num_classes)]


def writer_noise_rate(dataset: DatasetConfig) -> float:
    """The share of wrong training labels to ask the shard writer for: p (b-1)/b for the block
    model (a redraw keeps the true label with probability 1/b), p otherwise."""
    if dataset.noise_groups == "block":
        return dataset.label_noise * (dataset.noise_block - 1) / dataset.noise_block
    return dataset.label_noise


def noise_groups(dataset: DatasetConfig, class_names: list[str]) -> list[int] | None:
    """The label-noise group of each class (None: every class in one group)."""
    if dataset.noise_groups == "block":
        return block_groups(len(class_names), dataset.noise_block)
    if dataset.noise_groups == "class_prefix":
        prefixes = [name.split("/", 1)[0] for name in class_names]
        index = {prefix: i for i, prefix in enumerate(dict.fromkeys(prefixes))}
        return [index[p] for p in prefixes]
    return None


def build_settings(config: ExperimentConfig, dataset: DatasetConfig) -> dict[str, Any]:
    """What the shards of `dataset` depend on (not its name, K, arms or training)."""
    exclude = {"name", "title", "study", "k", "training", "clean", "losses"}
    settings = dataset.model_dump(exclude=exclude)
    settings["source"] = str(config.source_path(dataset))
    return settings


def dataset_folders(config: ExperimentConfig) -> dict[str, str]:
    """Dataset name -> the name of the folder holding its shards: the first dataset (in the
    config's order) with the same build settings."""
    owners: dict[str, str] = {}
    folders = {}
    for dataset in config.datasets:
        key = json.dumps(build_settings(config, dataset), sort_keys=True)
        folders[dataset.name] = owners.setdefault(key, dataset.name)
    return folders


def build_datasets(config: ExperimentConfig, out: Path, log: Log = log_stderr) -> dict[str, Path]:
    """Build (or reuse) every dataset's shards; returns name -> path of its dataset.json."""
    folders = dataset_folders(config)
    by_name = {d.name: d for d in config.datasets}
    built: dict[str, Path] = {}
    for name, owner in folders.items():
        if owner not in built:
            built[owner] = _build_one(config, by_name[owner], out / "data" / owner, log)
        built[name] = built[owner]
    return built


def _build_one(config: ExperimentConfig, dataset: DatasetConfig, folder: Path, log: Log) -> Path:
    from jobs.data.sources import open_source
    from jobs.data.writer import build_shards

    settings = build_settings(config, dataset)
    stamp, info = folder / "build.json", folder / "dataset.json"
    if info.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return info
    source_path = Path(settings["source"])
    if not source_path.exists():
        raise ValueError(f"dataset {dataset.name}: source {source_path} does not exist")
    log(f"building dataset {dataset.name} from {source_path}")
    if dataset.test_from is not None:
        source, test_source = idx_sources(source_path, dataset.test_from)
    else:
        source, test_source = open_source(str(source_path)), None
    summary = build_shards(
        source,
        str(folder),
        seed=dataset.seed,
        val_fraction=dataset.val_fraction,
        test_fraction=dataset.test_fraction,
        max_per_class=dataset.max_per_class,
        imbalance_ratio=dataset.imbalance_ratio,
        imbalance_profile=dataset.imbalance_profile,
        image_format=dataset.image_format,
        max_size=dataset.max_size,
        train_label_noise=writer_noise_rate(dataset),
        label_noise_groups=noise_groups(dataset, source.class_names),
        progress=None,
    )
    log(summary.format())
    if test_source is not None:
        _add_official_test(dataset, test_source, folder, log)
    stamp.write_text(json.dumps(settings, indent=1))
    return info


def idx_sources(folder: Path, test_stem: str) -> tuple[Any, Any]:
    """(the training IDX files, the test IDX files `<test_stem>images-idx3-ubyte[.gz]`) of an
    IDX folder, as two image sources with the same classes. Raises ValueError."""
    import numpy as np

    from jobs.data.sources import ImageSource, read_idx

    parts: dict[bool, list[tuple[Any, Any]]] = {True: [], False: []}
    for name in sorted(p.name for p in folder.iterdir()):
        match = _IDX_IMAGES.match(name)
        if match is None:
            continue
        stem = match.group("stem")
        labels = [folder / f"{stem}labels-idx1-ubyte{ext}" for ext in (".gz", "")]
        label_path = next((p for p in labels if p.is_file()), None)
        if label_path is None:
            raise ValueError(f"{folder}: {name} has no matching {stem}labels-idx1-ubyte[.gz]")
        parts[stem == test_stem].append((read_idx(str(folder / name)), read_idx(str(label_path))))
    if not parts[True] or not parts[False]:
        raise ValueError(f"{folder}: test_from {test_stem!r} needs its IDX files and others")
    num_classes = 1 + max(int(labels.max()) for _, labels in parts[True] + parts[False])
    names = [str(c) for c in range(num_classes)]

    def source(pieces: list[tuple[Any, Any]], kind: str) -> Any:
        images = np.concatenate([images for images, _ in pieces])
        labels = np.concatenate([labels for _, labels in pieces]).astype(np.int64)
        items = [f"{kind}[{i}]" for i in range(len(labels))]
        return ImageSource(kind, names, labels, items, lambda i: images[i])

    return source(parts[False], "idx"), source(parts[True], f"idx:{test_stem}")


def _add_official_test(dataset: DatasetConfig, source: Any, folder: Path, log: Log) -> None:
    """Write every item of `source` as the test split of the dataset in `folder`."""
    from jobs.contract.dataset_info import ShardEntry, read_dataset_info, write_dataset_info
    from jobs.data.writer import build_shards

    summary = build_shards(
        source,
        str(folder / OFFICIAL_TEST_FOLDER),
        seed=dataset.seed,
        val_fraction=0.0,
        test_fraction=_TEST_ALL,
        image_format=dataset.image_format,
        max_size=dataset.max_size,
        progress=None,
    )
    log(summary.format())
    info = read_dataset_info(str(folder / "dataset.json"))
    test = read_dataset_info(str(folder / OFFICIAL_TEST_FOLDER / "dataset.json"))
    info.shards["test"] = [
        ShardEntry(f"{OFFICIAL_TEST_FOLDER}/{e.path}", e.samples, e.bytes)
        for e in test.shards["test"]
    ]
    info.class_counts["test"] = test.class_counts["test"]
    info.num_samples["test"] = test.num_samples["test"]
    info.source["test_from"] = dataset.test_from
    write_dataset_info(info, str(folder))
