"""The experiment's datasets on real data: the paper's block-of-5 label noise (every changed
label stays in its block, the share of wrong labels is p (b-1)/b, validation and test are
untouched and the same as the clean twin's), the within-alphabet contrast, shared shards for
the same data at several K, and Fashion-MNIST's official test set."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import yaml

from jobs.experiment.config import load_config
from jobs.experiment.datasets import block_groups, build_datasets, writer_noise_rate

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _labels(dataset_json: Path, split: str) -> list[tuple[str, int, bytes]]:
    """(key, label, image bytes) of every sample of a split, in shard order."""
    info = json.loads(dataset_json.read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(dataset_json.parent / shard["path"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return [
        (key, int(parts["cls"]), next(v for e, v in parts.items() if e != "cls"))
        for key, parts in samples.items()
    ]


def _config(tmp_path: Path, datasets: list[dict]) -> Path:
    config = {
        "name": "noise",
        "seeds": [0],
        "losses": {"cross_entropy": {}},
        "training": {"model": {"arch": "convnet_small"}, "data": {"channels": 1}},
        "datasets": datasets,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_blocks_are_consecutive_classes_and_a_short_last_block_joins_the_one_before():
    groups = block_groups(136, 5)
    assert groups[:10] == [0] * 5 + [1] * 5
    assert [c for c, g in enumerate(groups) if g == 26] == list(range(130, 136))  # 6 classes
    assert max(groups) == 26 and all(groups.count(g) == 5 for g in range(26))
    assert block_groups(100, 5) == [c // 5 for c in range(100)]
    assert block_groups(3, 5) == [0, 0, 0]


def test_the_writer_is_asked_for_the_share_of_labels_that_end_up_wrong(tmp_path):
    omniglot = {
        "study": "label_noise",
        "source": "x.zip",
        "k": 5,
        "val_fraction": 0.15,
        "test_fraction": 0.25,
    }
    datasets = [
        {**omniglot, "name": "b", "label_noise": 0.5, "noise_groups": "block"},
        {**omniglot, "name": "a", "label_noise": 0.4, "noise_groups": "class_prefix"},
    ]
    block, alphabet = load_config(_config(tmp_path, datasets)).datasets
    assert writer_noise_rate(block) == pytest.approx(0.4)  # a redraw keeps 1 label in 5
    assert writer_noise_rate(alphabet) == pytest.approx(0.4)


def test_block_noise_on_omniglot(tmp_path, omniglot_zip):
    common = {
        "study": "label_noise",
        "source": str(omniglot_zip),
        "k": 5,
        "val_fraction": 0.15,
        "test_fraction": 0.25,
        "max_size": 28,
        "image_format": "png",
        "noise_groups": "block",
    }
    datasets = [
        {**common, "name": "clean", "label_noise": 0.0},
        {**common, "name": "block50", "label_noise": 0.5, "clean": "clean"},
        {**common, "name": "alphabet40", "label_noise": 0.4, "noise_groups": "class_prefix"},
        {**common, "name": "clean-k1", "label_noise": 0.0, "k": 1},  # same data, another K
    ]
    config = load_config(_config(tmp_path, datasets))
    built = build_datasets(config, tmp_path / "out", log=lambda _: None)
    assert built["clean-k1"] == built["clean"]  # one set of shards for both
    assert not (tmp_path / "out" / "data" / "clean-k1").exists()

    clean, noisy = _labels(built["clean"], "train"), _labels(built["block50"], "train")
    names = json.loads(built["clean"].read_text())["class_names"]
    groups = block_groups(len(names), 5)
    assert [key for key, _, _ in clean] == [key for key, _, _ in noisy]
    changed = [
        (true, new) for (_, true, a), (_, new, b) in zip(clean, noisy, strict=True) if true != new
    ]
    assert all(a == b for (_, _, a), (_, _, b) in zip(clean, noisy, strict=True))  # the same images
    assert len(changed) == round(0.5 * 4 / 5 * len(clean))  # the paper's p = 0.5
    assert all(groups[true] == groups[new] for true, new in changed)
    assert {groups[true] for true, _ in changed} >= set(range(27))  # every block is touched
    assert any(true == 135 for true, _ in changed)  # the 6-class last block too
    for split in ("val", "test"):  # untouched: the clean twin's samples, labels and order
        assert _labels(built["block50"], split) == _labels(built["clean"], split)

    contrast = _labels(built["alphabet40"], "train")
    moved = [
        (true, new)
        for (_, true, _), (_, new, _) in zip(clean, contrast, strict=True)
        if true != new
    ]
    assert len(moved) == round(0.4 * len(clean))
    assert all(names[t].split("/")[0] == names[n].split("/")[0] for t, n in moved)
    assert any(groups[t] != groups[n] for t, n in moved)  # alphabets are wider than blocks


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST is not at {FASHION}")
def test_the_official_test_set_is_the_test_split(tmp_path):
    dataset = {
        "name": "fashion",
        "study": "long_tail",
        "source": str(FASHION),
        "test_from": "t10k-",
        "k": 2,
        "max_per_class": 50,
        "val_fraction": 0.2,
        "test_fraction": 0,
        "imbalance_ratio": 10,
    }
    config = load_config(_config(tmp_path, [dataset]))
    info_path = build_datasets(config, tmp_path / "out", log=lambda _: None)["fashion"]
    splits = json.loads(info_path.read_text())["splits"]
    assert splits["test"]["class_counts"] == [1000] * 10  # t10k: balanced, all of it
    assert splits["val"]["class_counts"] == [10] * 10
    assert splits["train"]["class_counts"][0] == 40 and splits["train"]["class_counts"][-1] == 4
    assert len(_labels(info_path, "test")) == 10_000
    images = {image for _, _, image in _labels(info_path, "test")}
    assert not images & {image for _, _, image in _labels(info_path, "val")}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test_fraction": 0.0}, "test_fraction must be above 0"),
        ({"test_from": "t10k-"}, "set test_fraction to 0"),
        ({"noise_groups": "blocks"}, "noise_groups"),
        ({"noise_block": 1}, "noise_block"),
        ({"clean": "nowhere"}, "clean names unknown datasets: nowhere"),
        ({"clean": "d", "label_noise": 0.2}, "d must be a label_noise dataset without label noise"),
        ({"losses": ["softmax"]}, "losses names unknown arms"),
    ],
)
def test_bad_dataset_settings_are_refused(tmp_path, change, message):
    dataset = {
        "name": "d",
        "study": "label_noise",
        "source": "x.zip",
        "k": 5,
        "val_fraction": 0.15,
        "test_fraction": 0.25,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        load_config(_config(tmp_path, [dataset]))
