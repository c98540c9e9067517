"""Writing and reading through fsspec: memory:// and s3:// on a real local S3 server (moto)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from reference_data import ID_CLASSES, ID_IMAGE_SIZE, id_image, ids_from_batch

from jobs.contract.data import DataSpec
from jobs.contract.dataset_info import read_dataset_info
from jobs.data.inspection import inspect_dataset
from jobs.data.pipeline import DataPipelineError, build_eval_loader, build_train_loader
from jobs.data.sources import ImageSource
from jobs.data.writer import build_shards


def id_source(count: int) -> ImageSource:
    labels = np.arange(count) % ID_CLASSES
    names = [str(i) for i in range(count)]
    return ImageSource("ids", [f"c{i}" for i in range(ID_CLASSES)], labels, names, id_image)


def id_spec(url: str, workers: int) -> DataSpec:
    return DataSpec(
        train=url,
        val=url,
        num_classes=ID_CLASSES,
        image_size=ID_IMAGE_SIZE,
        channels=1,
        augment={"random_resized_crop": False, "hflip": False, "mean": [0.0], "std": [1.0]},
        loader_workers=workers,
        shuffle_buffer=8,
    )


def check_round_trip(url: str, workers: int, world_size: int) -> None:
    info = read_dataset_info(url)
    assert info.num_samples == {"train": 60, "val": 60}
    spec = id_spec(url, workers)
    seen = []
    for rank in range(world_size):
        for images, labels in build_eval_loader(
            spec, batch_size=8, rank=rank, world_size=world_size
        ):
            ids = ids_from_batch(images)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]
            seen += ids
    assert len(seen) == 60 and len(set(seen)) == 60  # each val sample once
    counts = []
    for rank in range(world_size):
        loader = build_train_loader(
            spec, batch_size=6, rank=rank, world_size=world_size, epoch=1, seed=0
        )
        counts.append(sum(1 for _ in loader))
    assert counts == [60 // (6 * world_size)] * world_size
    report = inspect_dataset(url)
    assert report.ok and report.splits["train"].samples == 60


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_round_trip(workers):
    url = f"memory://topk-tests/ids-{workers}"
    build_shards(id_source(120), url, val_fraction=0.5, shard_max_samples=9, progress=None)
    check_round_trip(url, workers, world_size=2)


def test_s3_round_trip_on_a_local_server(s3_env):
    s3_env.mkdir("topk-data")
    url = "s3://topk-data/ids"
    summary = build_shards(
        id_source(120), url, val_fraction=0.5, shard_max_samples=9, progress=None
    )
    assert summary.dataset_url == f"{url}/dataset.json"
    assert "ids/train-000006.tar" in " ".join(s3_env.ls("topk-data/ids"))
    check_round_trip(url, workers=2, world_size=3)  # DataLoader worker processes read S3 too

    train_shards = f"{url}/train-{{000000..000006}}.tar"
    spec = id_spec(url, 0).model_copy(update={"train": train_shards, "samples_per_epoch": 30})
    assert (
        sum(
            1 for _ in build_train_loader(spec, batch_size=5, rank=0, world_size=1, epoch=0, seed=0)
        )
        == 6
    )

    missing = f"{url}/train-000099.tar"
    spec = id_spec(url, 0).model_copy(update={"val": [f"{url}/val-000000.tar", missing]})
    with pytest.raises(DataPipelineError, match=f"data.val: shard {missing} does not exist"):
        build_eval_loader(spec, batch_size=4, rank=0, world_size=1)


def test_s3_read_counts_match_local(s3_env, id_dataset):
    """The same shards, uploaded: identical samples through s3:// and the local path."""
    s3_env.mkdir("topk-mirror")
    s3_env.put(str(id_dataset) + "/", "topk-mirror/ids/", recursive=True)

    def eval_ids(url: str) -> Counter:
        loader = build_eval_loader(id_spec(url, 0), batch_size=16, rank=0, world_size=1)
        return Counter(i for images, _ in loader for i in ids_from_batch(images))

    assert eval_ids("s3://topk-mirror/ids") == eval_ids(str(id_dataset))
