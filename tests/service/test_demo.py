"""`topk demo` runs the settings of the evidence report's long-tail arm: its data, K, training
block and loss hyperparameters are those of experiments/paper-cpu.yaml's Fashion-MNIST-LT
dataset (so what the demo shows is what docs/results.md measured), each learning rate is one of
the study's candidates, and every job spec it submits is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.contract.spec_files import parse_spec, resolve_class_counts
from jobs.experiment.config import load_config
from jobs.experiment.plan import make_spec
from service import demo

ROOT = Path(__file__).resolve().parents[2]
# The study's arm behind each demo job.
ARMS = {"cross_entropy": "cross_entropy", "noised_topk_imbalanced": "noised_topk_imbalanced_warmup"}


@pytest.fixture(scope="module")
def study():
    config = load_config(ROOT / "experiments" / "paper-cpu.yaml")
    dataset = next(d for d in config.datasets if d.name == "fashion-lt100-k2")
    return config, dataset


@pytest.fixture
def dataset_json(tmp_path) -> Path:
    """A dataset.json of 10 long-tailed classes, for the class counts of the imbalanced loss."""
    counts = [1800, 1080, 650, 390, 234, 140, 84, 50, 30, 18]
    splits = {
        split: {"num_samples": sum(c), "class_counts": c, "shards": []}
        for split, c in (("train", counts), ("val", [200] * 10))
    }
    info = {"format": "topk-webdataset", "format_version": 1, "num_classes": 10, "splits": splits}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(info))
    return path


def test_the_demo_data_is_the_studys_long_tail(study):
    _, dataset = study
    assert dataset.source == "/usr/share/datasets/fashion-mnist"
    assert dataset.k == demo.K
    assert dataset.imbalance_ratio == demo.IMBALANCE_RATIO
    assert dataset.max_per_class == demo.MAX_PER_CLASS
    assert dataset.val_fraction == demo.VAL_FRACTION
    assert dataset.training["epochs"] == demo.EPOCHS


@pytest.mark.parametrize("label", [label for label, _, _ in demo.LOSSES])
def test_each_demo_job_trains_as_its_arm_of_the_study(study, dataset_json, label):
    config, dataset = study
    _, loss, lr = next(entry for entry in demo.LOSSES if entry[0] == label)
    arm = ARMS[label]
    assert lr in config.lr_selection.grid_for(arm)  # a rate the study tried (and selected)
    studied = make_spec(
        config, dataset, dataset_json, 10, config.loss_of(arm), config.params_of(arm), 0, lr
    )
    ours = demo.demo_spec(dataset_json, f"demo-{label}", loss, lr, demo.EPOCHS)
    for part in ("model", "optim", "schedule", "epochs", "batch_size", "loss"):
        assert ours[part] == studied[part], part
    for field in ("image_size", "channels", "shuffle_buffer", "augment"):
        assert ours["data"][field] == studied["data"][field], field
    assert ours["metrics"]["select"] == studied["metrics"]["select"]
    spec = resolve_class_counts(parse_spec(ours))
    assert spec.loss.name == loss["name"] and spec.epochs == demo.EPOCHS


def test_too_few_epochs_for_the_warm_up_are_refused_before_anything_starts(tmp_path, capsys):
    from service.cli import main as topk_main

    with pytest.raises(SystemExit) as exit_info:
        topk_main(["demo", "--epochs", "2", "--data-dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "expected a whole number from 3 to 200, got '2'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing written, no service started
