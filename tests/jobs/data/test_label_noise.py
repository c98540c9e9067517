"""Label noise in the shard writer: a share of the training labels moved to another class of
the same group, held-out splits untouched. Checked with Python's tarfile, not our reader."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from reference_data import require_omniglot

from jobs.data.writer import build_shards, corrupt_labels


def _read_split(folder: Path, split: str) -> dict[str, tuple[bytes, int]]:
    """key -> (image bytes, label) of every sample of a split, read with tarfile."""
    info = json.loads((folder / "dataset.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(folder / shard["path"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (parts["png"], int(parts["cls"])) for key, parts in samples.items()}


def test_corrupt_labels_moves_an_exact_share_within_groups():
    labels = np.repeat(np.arange(12), 50)  # 12 classes x 50 items
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    chosen = np.arange(0, 600, 2)  # only even items may change
    noisy = corrupt_labels(labels, chosen, 0.3, groups=groups, seed=5)

    changed = np.flatnonzero(noisy != labels)
    assert len(changed) == round(0.3 * len(chosen))
    assert set(changed) <= set(chosen)
    for item in changed:
        assert groups[noisy[item]] == groups[labels[item]]
    # every other class of a group is reachable
    reached = {(int(labels[i]), int(noisy[i])) for i in changed}
    assert {(0, 1), (0, 2)} <= reached
    # reproducible per seed, different across seeds
    assert np.array_equal(noisy, corrupt_labels(labels, chosen, 0.3, groups=groups, seed=5))
    assert not np.array_equal(noisy, corrupt_labels(labels, chosen, 0.3, groups=groups, seed=6))
    assert np.array_equal(corrupt_labels(labels, chosen, 0.0, groups=groups), labels)


def test_corrupt_labels_refuses_what_it_cannot_do():
    labels = np.array([0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt_labels(labels, np.arange(4), 1.0)
    with pytest.raises(ValueError, match="alone in its label-noise group"):
        corrupt_labels(labels, np.arange(4), 0.5, groups=[0, 1, 2])


def test_omniglot_noise_stays_in_the_alphabet_and_spares_held_out_splits(tmp_path):
    from jobs.data.sources import zip_source

    source = zip_source(str(require_omniglot()))
    alphabets = [name.split("/")[0] for name in source.class_names]
    groups = [sorted(set(alphabets)).index(a) for a in alphabets]
    options = dict(seed=2, val_fraction=0.15, test_fraction=0.25, progress=None)
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    build_shards(source, str(clean), **options)
    build_shards(source, str(noisy), train_label_noise=0.4, label_noise_groups=groups, **options)

    for split in ("val", "test"):
        assert _read_split(clean, split) == _read_split(noisy, split)
    clean_train, noisy_train = _read_split(clean, "train"), _read_split(noisy, "train")
    assert clean_train.keys() == noisy_train.keys()
    moved = [key for key in clean_train if clean_train[key][1] != noisy_train[key][1]]
    assert len(moved) == round(0.4 * len(clean_train))
    for key in clean_train:
        assert clean_train[key][0] == noisy_train[key][0]  # same image, maybe another label
    for key in moved:
        assert alphabets[clean_train[key][1]] == alphabets[noisy_train[key][1]]
    info = json.loads((noisy / "dataset.json").read_text())
    assert info["source"]["train_labels_changed"] == len(moved)
    counts = np.bincount([label for _, label in noisy_train.values()], minlength=136)
    assert info["splits"]["train"]["class_counts"] == counts.tolist()
