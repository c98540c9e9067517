"""The streaming reader: DDP batch counts, exact evaluation, seeding, decoding, augmentation.

Ranks are simulated in-process by building the loader of each rank; DataLoader workers are real
processes.
"""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from reference_data import ID_CLASSES, ID_IMAGE_SIZE, ids_from_batch

from jobs.contract.data import AugmentSpec, DataSpec
from jobs.contract.dataset_info import read_dataset_info
from jobs.data.image_decode import decode_image
from jobs.data.pipeline import DataPipelineError, build_eval_loader, build_train_loader
from jobs.data.shards import plan_readers
from jobs.training.loop import DevicePrefetcher

IDENTITY = {"random_resized_crop": False, "hflip": False, "mean": [0.0], "std": [1.0]}


def id_spec(dataset, **overrides) -> DataSpec:
    fields = {
        "train": str(dataset),
        "val": str(dataset),
        "num_classes": ID_CLASSES,
        "image_size": ID_IMAGE_SIZE,
        "channels": 1,
        "augment": IDENTITY,
        "loader_workers": 0,
        "shuffle_buffer": 16,
    }
    return DataSpec(**{**fields, **overrides})


def val_ids(dataset) -> list[int]:
    """The ids of the val split, read straight from the shards (not through the pipeline)."""
    from jobs.data.shard_reader import read_shard_records

    info = read_dataset_info(str(dataset))
    ids = []
    for url in info.shard_urls("val"):
        with open(url, "rb") as stream:
            for record in read_shard_records(stream, num_classes=ID_CLASSES):
                pixels = np.asarray(Image.open(io.BytesIO(record.image)))
                ids.append(int(pixels[0, 0]) + 256 * int(pixels[0, 1]))
                assert record.label == ids[-1] % ID_CLASSES
    return ids


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_counts_every_sample_exactly_once(id_dataset, world_size, workers):
    spec = id_spec(id_dataset, loader_workers=workers)
    seen = []
    for rank in range(world_size):
        loader = build_eval_loader(spec, batch_size=8, rank=rank, world_size=world_size)
        rank_ids = []
        for images, labels in loader:
            ids = ids_from_batch(images)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]
            rank_ids += ids
        assert loader.stats.samples == len(rank_ids) > 0
        seen += rank_ids
    expected = val_ids(id_dataset)
    assert len(expected) == 150
    assert Counter(seen) == Counter(expected)


def test_eval_is_exact_with_fewer_shards_than_readers(tmp_path):
    """2 val shards, 3 ranks x 2 workers = 6 readers: shards are split by sample index."""
    from reference_data import id_image

    from jobs.data.sources import ImageSource
    from jobs.data.writer import build_shards

    labels = np.arange(40) % ID_CLASSES
    source = ImageSource("ids", [f"c{i}" for i in range(5)], labels, ["x"] * 40, id_image)
    build_shards(source, str(tmp_path), val_fraction=0.5, shard_max_samples=13, progress=None)
    assert len(read_dataset_info(str(tmp_path)).shards["val"]) == 2
    spec = id_spec(tmp_path, loader_workers=2)
    seen = []
    for rank in range(3):
        for images, _ in build_eval_loader(spec, batch_size=4, rank=rank, world_size=3):
            seen += ids_from_batch(images)
    assert Counter(seen) == Counter(val_ids(tmp_path))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_train_ranks_yield_the_same_batch_count(fashion_dataset, world_size, workers):
    """Uneven shards (37 per shard, long-tailed counts): every rank yields len(loader) batches."""
    spec = DataSpec(
        train=str(fashion_dataset),
        num_classes=10,
        image_size=24,
        channels=3,
        loader_workers=workers,
        shuffle_buffer=50,
    )
    total = read_dataset_info(str(fashion_dataset)).num_samples["train"]
    counts = []
    for rank in range(world_size):
        loader = build_train_loader(
            spec, batch_size=16, rank=rank, world_size=world_size, epoch=2, seed=5
        )
        batches = 0
        for images, labels in loader:
            assert images.shape == (16, 3, 24, 24) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10
            assert images.min() >= -1.0 and images.max() <= 1.0  # (x - 0.5) / 0.5
            batches += 1
        assert batches == len(loader) and loader.stats.samples == 16 * batches
        counts.append(batches)
    assert counts == [total // (16 * world_size)] * world_size


def test_train_epoch_covers_the_data_without_duplication(id_dataset):
    """Across 2 ranks x 2 workers an epoch's samples are (nearly) distinct: a rank cycles only
    what it lacks to fill the last batches."""
    spec = id_spec(id_dataset, loader_workers=2)
    seen = []
    for rank in range(2):
        for images, labels in build_train_loader(
            spec, batch_size=5, rank=rank, world_size=2, epoch=0, seed=0
        ):
            ids = ids_from_batch(images)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]
            seen += ids
    assert len(seen) == 150  # 150 train samples / (5 x 2) = 15 batches per rank
    assert len(set(seen)) >= 0.85 * 150


def test_samples_per_epoch_sets_the_step_count(id_dataset):
    spec = id_spec(id_dataset, samples_per_epoch=400)
    loaders = [
        build_train_loader(spec, batch_size=10, rank=r, world_size=2, epoch=0, seed=0)
        for r in range(2)
    ]
    assert [len(loader) for loader in loaders] == [20, 20]
    assert sum(1 for _ in loaders[1]) == 20  # more than one pass over this rank's shards


def test_shard_lists_need_samples_per_epoch(id_dataset):
    shards = [str(p) for p in sorted(id_dataset.glob("train-*.tar"))]
    with pytest.raises(ValueError, match="data.samples_per_epoch"):
        build_train_loader(
            id_spec(id_dataset, train=shards), batch_size=4, rank=0, world_size=1, epoch=0, seed=0
        )
    pattern = str(id_dataset / f"train-{{000000..{len(shards) - 1:06d}}}.tar")
    loader = build_train_loader(
        id_spec(id_dataset, train=pattern, samples_per_epoch=40),
        batch_size=4,
        rank=0,
        world_size=1,
        epoch=0,
        seed=0,
    )
    assert sum(1 for _ in loader) == len(loader) == 10


def test_epochs_are_seeded(id_dataset):
    def order(epoch, seed, workers=0):
        spec = id_spec(id_dataset, loader_workers=workers)
        loader = build_train_loader(
            spec, batch_size=10, rank=0, world_size=1, epoch=epoch, seed=seed
        )
        return [i for images, _ in loader for i in ids_from_batch(images)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0, workers=2) == order(1, 0, workers=2)  # worker processes too
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != order(1, 1)
    assert sorted(order(1, 0)) != order(1, 0)  # shuffled


def test_dataset_json_split_selection_and_class_check(fashion_dataset):
    spec = DataSpec(
        train=f"{fashion_dataset}/dataset.json#test",
        num_classes=10,
        image_size=28,
        channels=1,
        loader_workers=0,
    )
    loader = build_train_loader(spec, batch_size=10, rank=0, world_size=1, epoch=0, seed=0)
    assert len(loader) == 6  # the test split holds 60
    with pytest.raises(ValueError, match="data.train: .*has 10 classes but data.num_classes is 7"):
        build_train_loader(
            spec.model_copy(update={"num_classes": 7}),
            batch_size=10,
            rank=0,
            world_size=1,
            epoch=0,
            seed=0,
        )
    with pytest.raises(ValueError, match="data.val: .*no split 'nope'"):
        build_eval_loader(
            spec.model_copy(update={"val": f"{fashion_dataset}#nope"}),
            batch_size=10,
            rank=0,
            world_size=1,
        )
    with pytest.raises(ValueError, match="rank 2 is not in"):
        build_eval_loader(spec, batch_size=10, rank=2, world_size=2)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    num_slots=st.integers(1, 16),
    seed=st.integers(0, 1000),
)
def test_plan_readers_assigns_each_sample_once(sizes, num_slots, seed):
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    plan = plan_readers(order, sizes, num_slots)
    assert len(plan) == num_slots and all(plan)  # every slot reads something
    owners = Counter()
    for tasks in plan:
        for task in tasks:
            for index in range(task.offset, sizes[task.shard], task.stride):
                owners[(task.shard, index)] += 1
    assert owners == Counter({(s, i): 1 for s, n in enumerate(sizes) for i in range(n)})


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decode_formats_channels_and_eval_center_crop(fmt):
    # a 60x40 image: left half red, right half blue; eval keeps the central 40x40 square
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 40))
    rng = random.Random(0)
    augment = AugmentSpec()
    rgb = decode_image(
        encoded(image, fmt), size=20, channels=3, train=False, augment=augment, rng=rng
    )
    assert rgb.shape == (3, 20, 20) and rgb.dtype == np.uint8  # planar
    assert rgb[0, :, :8].mean() > 200 and rgb[2, :, -8:].mean() > 200
    grey = decode_image(
        encoded(image, fmt), size=16, channels=1, train=True, augment=augment, rng=rng
    )
    assert grey.shape == (16, 16)


def test_train_augmentation_crops_and_flips():
    image = Image.new("L", (64, 64), 0)
    image.paste(255, (0, 0, 32, 64))  # left half white
    data = encoded(image, "PNG")
    rng = random.Random(1)
    flip_only = AugmentSpec(random_resized_crop=False, hflip=True)
    lefts = {
        int(decode_image(data, size=8, channels=1, train=True, augment=flip_only, rng=rng)[0, 0])
        for _ in range(40)
    }
    assert lefts == {0, 255}  # flipped about half the time
    crop = AugmentSpec(random_resized_crop=True, crop_scale_min=0.1, hflip=False)
    means = {
        float(decode_image(data, size=8, channels=1, train=True, augment=crop, rng=rng).mean())
        for _ in range(40)
    }
    assert len(means) > 10  # different crops see different parts
    eval_out = decode_image(data, size=8, channels=1, train=False, augment=crop, rng=rng)
    assert eval_out[:, :3].min() == 255 and eval_out[:, 5:].max() == 0  # no augmentation


def test_omniglot_through_the_pipeline(omniglot_dataset):
    spec = DataSpec(
        train=str(omniglot_dataset),
        val=str(omniglot_dataset),
        num_classes=136,
        image_size=32,
        channels=1,
        loader_workers=2,
    )
    loader = build_eval_loader(spec, batch_size=64, rank=0, world_size=1)
    labels = torch.cat([y for _, y in loader])
    assert loader.stats.samples == 544 and loader.stats.skipped_total == 0
    assert torch.bincount(labels, minlength=136).tolist() == [4] * 136


def test_missing_shard_fails_at_once_naming_it(id_dataset, tmp_path):
    shards = sorted(str(p) for p in id_dataset.glob("val-*.tar"))
    missing = str(tmp_path / "val-999999.tar")
    spec = id_spec(id_dataset, val=[*shards, missing])
    with pytest.raises(DataPipelineError, match=f"data.val: shard {missing} does not exist"):
        build_eval_loader(spec, batch_size=4, rank=0, world_size=1)


@pytest.mark.parametrize("pin", [False, True])
def test_one_loader_for_the_run_gives_each_epoch_what_a_fresh_loader_gives(id_dataset, pin):
    """The trainer keeps one loader for the run (workers persist, set_epoch moves it on): each
    epoch's batches are exactly those of a loader built for that epoch, and the worker
    processes are the same ones from epoch to epoch."""
    spec = id_spec(id_dataset, loader_workers=2)
    kept = build_train_loader(
        spec, batch_size=5, rank=0, world_size=2, epoch=1, seed=3, pin_memory=pin
    )
    worker_pids = []
    for epoch in (1, 2, 3):
        kept.set_epoch(epoch)
        # pinned (a GPU run's loader): uint8 pixels that the loop normalises where it places them
        got = [ids_from_batch(images) for images, _ in DevicePrefetcher(kept, "cpu")]
        worker_pids.append(sorted(w.pid for w in kept._data_loader()._iterator._workers))
        fresh = build_train_loader(spec, batch_size=5, rank=0, world_size=2, epoch=epoch, seed=3)
        assert got == [ids_from_batch(images) for images, _ in fresh], epoch
    assert worker_pids[0] == worker_pids[1] == worker_pids[2]
    assert len(worker_pids[0]) == 2
    kept.set_epoch(1)
    again = [ids_from_batch(images) for images, _ in DevicePrefetcher(kept, "cpu")]
    first = build_train_loader(spec, batch_size=5, rank=0, world_size=2, epoch=1, seed=3)
    assert again == [ids_from_batch(images) for images, _ in first]


def test_an_eval_loader_reads_another_held_out_split_when_given_its_source(id_dataset):
    """The test split is evaluated through `source`, not by posing as data.val."""
    info = read_dataset_info(str(id_dataset))
    spec = id_spec(id_dataset, val=None)  # no validation split at all
    train_ids = []
    with pytest.raises(ValueError, match="data.val: not set"):
        build_eval_loader(spec, batch_size=8, rank=0, world_size=1)
    loader = build_eval_loader(
        spec, batch_size=8, rank=0, world_size=1, source=f"{id_dataset}#train"
    )
    for images, _ in loader:
        train_ids += ids_from_batch(images)
    assert len(train_ids) == info.num_samples["train"] == len(set(train_ids))
    assert not set(train_ids) & set(val_ids(id_dataset))
    with pytest.raises(ValueError, match="^test split: "):
        build_eval_loader(
            spec, batch_size=8, rank=0, world_size=1, source=f"{id_dataset}#nope",
            source_field="test split",
        )  # fmt: skip
