"""The shard writer on real data: round trips, splits, long tail, re-encoding, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from reference_data import (
    FASHION_MNIST_DIR,
    read_idx_reference,
    require_fashion_mnist,
    require_omniglot,
)

from jobs.contract.dataset_info import read_dataset_info
from jobs.data.shard_format import RawSample
from jobs.data.shard_reader import read_shard_records
from jobs.data.sources import ImageSource
from jobs.data.writer import build_shards, long_tail_counts
from service.cli import main as topk_main


def read_split(dataset, split: str) -> list[RawSample]:
    info = read_dataset_info(str(dataset))
    samples = []
    for url in info.shard_urls(split):
        with open(url, "rb") as stream:
            records = list(read_shard_records(stream, num_classes=info.num_classes))
        assert all(isinstance(r, RawSample) for r in records), records
        samples += records
    return samples


def test_omniglot_round_trip_keeps_every_image_and_its_class(omniglot_dataset):
    info = read_dataset_info(str(omniglot_dataset))
    assert info.num_classes == 136
    assert "Latin/character01" in info.class_names  # nested class folders, common root stripped
    with zipfile.ZipFile(require_omniglot()) as archive:
        expected = Counter(
            (
                hashlib.sha1(archive.read(name)).hexdigest(),
                name.split("/")[-3] + "/" + name.split("/")[-2],
            )
            for name in archive.namelist()
            if name.endswith(".png")
        )
    written = Counter()
    for split in ("train", "val"):
        samples = read_split(omniglot_dataset, split)
        assert len(samples) == info.num_samples[split]
        assert Counter(s.label for s in samples) == Counter(
            {c: n for c, n in enumerate(info.class_counts[split]) if n}
        )
        written.update(
            (hashlib.sha1(s.image).hexdigest(), info.class_names[s.label]) for s in samples
        )
    assert written == expected  # every image, original bytes, under its own class
    # 20 per class, val 0.2 -> 4 per class: balanced held-out split
    assert info.class_counts["val"] == [4] * 136 and info.class_counts["train"] == [16] * 136
    sizes = [e.samples for e in info.shards["train"]]
    assert sizes[:-1] == [300] * (len(sizes) - 1) and sum(sizes) == 2176


def test_fashion_mnist_round_trip_long_tail_and_balanced_holdout(fashion_dataset):
    folder = require_fashion_mnist()
    images = np.concatenate(
        [read_idx_reference(folder / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")]
    )
    labels = np.concatenate(
        [read_idx_reference(folder / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]
    )
    source_labels = {images[i].tobytes(): int(labels[i]) for i in range(len(labels))}
    info = read_dataset_info(str(fashion_dataset))
    assert info.num_classes == 10 and set(info.shards) == {"train", "val", "test"}
    # CIFAR-LT profile from the 60 - 12 - 6 = 42 left for training: int(42 * 10 ** (-i / 9))
    assert info.class_counts["train"] == [max(1, int(42 * 10 ** (-i / 9))) for i in range(10)]
    assert info.class_counts["val"] == [12] * 10
    assert info.class_counts["test"] == [6] * 10
    seen = set()
    for split in ("train", "val", "test"):
        samples = read_split(fashion_dataset, split)
        counts = [0] * 10
        for sample in samples:
            pixels = np.asarray(Image.open(io.BytesIO(sample.image)))
            assert pixels.shape == (28, 28) and sample.image_ext == "png"
            assert source_labels[pixels.tobytes()] == sample.label  # lossless, right label
            seen.add(pixels.tobytes())
            counts[sample.label] += 1
        assert counts == info.class_counts[split]
    assert len(seen) == sum(info.num_samples.values())  # no sample in two splits


def test_long_tail_profiles():
    assert long_tail_counts([100] * 5, 100.0, "exp") == [100, 31, 10, 3, 1]
    assert long_tail_counts([100] * 4, 10.0, "step") == [100, 100, 10, 10]
    assert long_tail_counts([5, 100, 100], 1.0) == [5, 100, 100]  # capped by what a class has
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tail_counts([10, 10], 0.5)
    with pytest.raises(ValueError, match="profile"):
        long_tail_counts([10, 10], 2.0, "linear")


def arrays_source(count_per_class: int, classes: int) -> ImageSource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count_per_class * classes, 12, 12), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), count_per_class)
    return ImageSource(
        "arrays", [str(c) for c in range(classes)], labels, ["x"] * len(labels), lambda i: images[i]
    )


def test_step_profile_and_max_per_class(tmp_path):
    summary = build_shards(
        arrays_source(30, 6),
        str(tmp_path),
        max_per_class=20,
        val_fraction=0.25,
        imbalance_ratio=5.0,
        imbalance_profile="step",
        progress=None,
    )
    info = read_dataset_info(summary.dataset_url)
    assert info.class_counts["train"] == [15, 15, 15, 3, 3, 3]
    assert info.class_counts["val"] == [5] * 6
    assert summary.splits["train"].samples == 54 and summary.splits["val"].classes == 6


def test_writes_are_deterministic_and_seeded(tmp_path):
    def build(seed, out):
        build_shards(
            arrays_source(10, 3), str(tmp_path / out), seed=seed, shard_max_samples=8, progress=None
        )
        return [p.read_bytes() for p in sorted((tmp_path / out).iterdir())]

    assert build(7, "a") == build(7, "b")
    assert build(7, "a") != build(8, "c")


def test_reencode_and_max_size(tmp_path):
    omniglot = str(require_omniglot())
    for image_format, ext in (("jpeg", "jpg"), ("webp", "webp")):
        out = tmp_path / image_format
        build_shards(
            omniglot,
            str(out),
            max_per_class=1,
            val_fraction=0.0,
            image_format=image_format,
            max_size=40,
            progress=None,
        )
        samples = read_split(out, "train")
        assert len(samples) == 136
        for sample in samples:
            assert sample.image_ext == ext
            with Image.open(io.BytesIO(sample.image)) as image:
                assert image.format == {"jpg": "JPEG", "webp": "WEBP"}[ext]
                assert max(image.size) == 40  # 105x105 shrunk to at most 40
    # keep + a max_size larger than the images keeps the original bytes
    out = tmp_path / "keep"
    build_shards(omniglot, str(out), max_per_class=1, val_fraction=0.0, max_size=500, progress=None)
    with zipfile.ZipFile(omniglot) as archive:
        originals = {archive.read(n) for n in archive.namelist() if n.endswith(".png")}
    assert all(s.image in originals for s in read_split(out, "train"))


def test_nested_image_folder_source(tmp_path):
    root = tmp_path / "root"
    for name in ("A/x", "A/y", "B/z"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 10), (i, 0, 0)).save(root / name / f"{i}.jpg")
    (root / "A" / "x" / "notes.txt").write_text("not an image")
    summary = build_shards(str(root), str(tmp_path / "out"), val_fraction=0.0, progress=None)
    info = read_dataset_info(summary.dataset_url)
    assert info.class_names == ["A/x", "A/y", "B/z"] and info.class_counts["train"] == [3, 3, 3]


def test_build_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        (tmp_path / "one" / "cls").mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "one" / "cls" / "a.png")
        build_shards(str(tmp_path / "one"), str(tmp_path / "o"), progress=None)
    with pytest.raises(ValueError, match="pipe:"):
        build_shards(arrays_source(2, 2), "pipe:cat > x", progress=None)
    with pytest.raises(ValueError, match="fraction"):
        build_shards(
            arrays_source(2, 2),
            str(tmp_path / "o"),
            val_fraction=0.7,
            test_fraction=0.5,
            progress=None,
        )


def test_cli_build_and_inspect(tmp_path, capsys):
    out = tmp_path / "fm"
    code = topk_main(
        [
            "shards",
            "build",
            str(FASHION_MNIST_DIR),
            str(out),
            "--max-per-class",
            "8",
            "--shard-samples",
            "20",
            "--class-names",
            ",".join(f"k{i}" for i in range(10)),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "train" in captured.err  # progress
    assert "60 samples" in captured.out and "3 shards" in captured.out  # 8 - round(1.6)
    assert json.loads((out / "dataset.json").read_text())["class_names"][3] == "k3"

    assert topk_main(["shards", "inspect", str(out)]) == 0
    assert "ok" in capsys.readouterr().out

    # a bad label inside a shard: listed with shard and key, exit 1
    shard = out / "train-000000.tar"
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard, "w") as archive:
        for member, data in members:
            if member.name == "00000003.cls":
                data = b"99"
                member.size = 2
            archive.addfile(member, io.BytesIO(data))
    assert topk_main(["shards", "inspect", str(out / "dataset.json"), "--quiet"]) == 1
    report = capsys.readouterr().out
    assert f"{shard} 00000003: label_out_of_range" in report

    assert topk_main(["shards", "inspect", "pipe:cat x"]) == 2
    assert "pipe:" in capsys.readouterr().err
    assert topk_main(["shards", "build", str(tmp_path / "nothing"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
