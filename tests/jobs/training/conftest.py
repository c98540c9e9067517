"""Shared fixtures for the Ray training tests: one local Ray cluster for the whole session, and
real Omniglot shards (a 30-class subset at 28x28) written once with the shard writer."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

SUBSET_CLASSES = 30
IMAGE_SIZE = 28


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 6 logical CPUs (2-worker runs plus Tune trial drivers fit on a
    2-core machine). Started with address="local" so it never attaches to another engineer's
    cluster; shut down at the end (never `ray stop`)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def _omniglot_subset(omniglot_zip: Path):
    """Omniglot's first SUBSET_CLASSES characters as 28x28 grey arrays (antialiased)."""
    from PIL import Image

    from jobs.data.sources import ImageSource, zip_source

    full = zip_source(str(omniglot_zip))
    keep = np.flatnonzero(full.labels < SUBSET_CLASSES)
    archive = zipfile.ZipFile(omniglot_zip)

    def load(i: int) -> np.ndarray:
        data = archive.read(full.names[keep[i]])
        image = Image.open(io.BytesIO(data)).convert("L")
        return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))

    return ImageSource(
        "omniglot-subset",
        full.class_names[:SUBSET_CLASSES],
        full.labels[keep],
        [full.names[j] for j in keep],
        load,
    )


@pytest.fixture(scope="session")
def omniglot_dataset(tmp_path_factory, omniglot_zip) -> str:
    """URL of dataset.json for 30 Omniglot classes: 15 train and 5 val images per class."""
    from jobs.data.writer import build_shards

    out = tmp_path_factory.mktemp("omniglot-shards")
    summary = build_shards(
        _omniglot_subset(omniglot_zip),
        str(out),
        seed=0,
        val_fraction=0.25,
        image_format="png",
        shard_max_samples=128,
        progress=None,
    )
    return summary.dataset_url


@pytest.fixture(scope="session")
def omniglot_spec():
    """A factory of small, fast training specs (dicts, as a user would write them) on the
    Omniglot subset: omniglot_spec(dataset_url, epochs=2, scaling={...})."""
    return make_omniglot_spec


def make_omniglot_spec(dataset_url: str, **overrides) -> dict:
    spec = {
        "data": {
            "train": dataset_url,
            "val": dataset_url,
            "num_classes": SUBSET_CLASSES,
            "image_size": 16,  # the pipeline resizes the 28x28 shards: 3x less compute
            "channels": 1,
            "augment": {"random_resized_crop": False, "hflip": False},
            "shuffle_buffer": 500,
            "loader_workers": 0,
        },
        "model": {"arch": "cifar_resnet20"},
        "loss": {"name": "noised_topk", "k": 5, "epsilon": 1.0, "n_samples": 5},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0001},
        "schedule": {"name": "constant"},
        "epochs": 3,
        "batch_size": 32,
        "metrics": {"ks": [1, 5], "select": "val_top5", "mode": "max"},
        "scaling": {"num_workers": 2},
        "checkpoint": {"keep_best": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
