"""Rank-1 collapse in the runtime: the remedies as loss options (`loss.ce_warmup_epochs`,
`loss.ce_weight`), checked against their definition and in short in-process runs on real
Omniglot shards, and the live collapse metric with its warning in the log, metrics.jsonl and
result.json."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from jobs.contract.loss import NoisedTopKImbalancedLossSpec, NoisedTopKLossSpec
from jobs.contract.run_files import read_metrics
from jobs.contract.train import TrainSpec
from jobs.training.objective import build_objective
from jobs.training.run import run_training_in_process
from topk import create_loss


def _spec(omniglot_spec, dataset_url, loss: dict, **overrides) -> TrainSpec:
    spec = omniglot_spec(
        dataset_url,
        scaling={"num_workers": 1},
        model={"arch": "convnet_small"},
        optim={"name": "sgd", "lr": 0.05},
        **overrides,
    )
    return TrainSpec.model_validate({**spec, "loss": loss})  # the whole loss part, unmerged


def test_ce_weight_adds_that_much_cross_entropy_on_the_scaled_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 12, (16,), generator=gen)
    spec = NoisedTopKLossSpec(k=3, epsilon=0.5, n_samples=4, ce_weight=0.3)
    objective = build_objective(spec)
    bare = create_loss("noised_topk", k=3, epsilon=0.5, n_samples=4)
    expected = bare(scores, labels, generator=torch.Generator().manual_seed(1))
    expected = expected + 0.3 * torch.nn.functional.cross_entropy(scores, labels)
    got = objective(scores, labels, generator=torch.Generator().manual_seed(1))
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)

    # a cosine-head loss: the cross-entropy of scale x cosines
    cosines = scores.tanh()
    counts = [3] * 12
    spec = NoisedTopKImbalancedLossSpec(k=3, scale=20.0, class_counts=counts, ce_weight=0.5)
    bare = create_loss("noised_topk_imbalanced", k=3, scale=20.0, class_counts=counts)
    expected = bare(cosines, labels, generator=torch.Generator().manual_seed(2))
    expected = expected + 0.5 * torch.nn.functional.cross_entropy(20.0 * cosines, labels)
    got = build_objective(spec)(cosines, labels, generator=torch.Generator().manual_seed(2))
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_warmup_epochs_train_with_cross_entropy_alone():
    objective = build_objective(NoisedTopKLossSpec(k=2, ce_warmup_epochs=2))
    scores, labels = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for epoch in (1, 2):
        ce = objective.for_epoch(epoch)(scores, labels)
        assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(scores, labels).item())
    assert objective.for_epoch(3) is objective
    assert build_objective(NoisedTopKLossSpec()).for_epoch(1) is not None


@pytest.mark.parametrize(
    ("loss", "extra", "field"),
    [
        ({"name": "noised_topk", "ce_warmup_epochs": 3}, {}, "loss.ce_warmup_epochs"),
        ({"name": "noised_topk", "ce_weight": -0.1}, {}, "ce_weight"),
        ({"name": "cross_entropy", "ce_weight": 0.1}, {}, "ce_weight"),
        ({"name": "noised_topk"}, {"metrics": {"collapse_share": 0.0}}, "collapse_share"),
        ({"name": "noised_topk"}, {"metrics": {"collapse_share": 1.5}}, "collapse_share"),
    ],
)
def test_bad_remedy_and_collapse_settings_are_refused(loss, extra, field):
    spec = {"data": {"train": "/data/d.json", "num_classes": 10}, "epochs": 3, "loss": loss}
    with pytest.raises(ValidationError, match=field):
        TrainSpec.model_validate({**spec, **extra})


def test_a_warmup_epoch_is_a_cross_entropy_epoch(omniglot_dataset, omniglot_spec, tmp_path):
    """Same seed, same data order, same initial weights: the first epoch of noised_topk with
    one warm-up epoch is the first epoch of cross-entropy; the second is not."""
    torch.set_num_threads(1)
    warmup = {"name": "noised_topk", "k": 5, "epsilon": 1.0, "n_samples": 2, "ce_warmup_epochs": 1}
    runs = {}
    for name, loss in (("warmup", warmup), ("ce", {"name": "cross_entropy"})):
        spec = _spec(omniglot_spec, omniglot_dataset, epochs=2, loss=loss)
        run_training_in_process(spec, name, storage=str(tmp_path), device="cpu")
        runs[name] = read_metrics(str(tmp_path / name / "metrics.jsonl"))
    first, ce_first = runs["warmup"][0], runs["ce"][0]
    for key in ("train_loss", "val_top1", "val_top5", "val_collapse_share"):
        assert first[key] == pytest.approx(ce_first[key], rel=1e-6), key
    assert runs["warmup"][1]["train_loss"] != pytest.approx(runs["ce"][1]["train_loss"], rel=1e-3)


def test_the_collapse_share_is_reported_and_warned_about(
    omniglot_dataset, omniglot_spec, tmp_path, capfd
):
    """With a threshold below 1/C every epoch is flagged: the log, metrics.jsonl and
    result.json say so; the share is the one the saved model gives on the validation split."""
    from jobs.experiment.train_and_test import evaluate_checkpoint
    from jobs.training.session import local_checkpoints

    torch.set_num_threads(1)
    loss = {"name": "noised_topk", "k": 5, "epsilon": 1.0, "n_samples": 2, "ce_weight": 0.5}
    metrics = {"ks": [1, 5], "select": "val_top5", "collapse_share": 0.02}  # 1/30 > 0.02
    spec = _spec(omniglot_spec, omniglot_dataset, epochs=2, loss=loss, metrics=metrics)
    result = run_training_in_process(spec, "flagged", storage=str(tmp_path), device="cpu")
    history = read_metrics(str(tmp_path / "flagged" / "metrics.jsonl"))
    for epoch in history:
        assert 1 / 30 <= epoch["val_collapse_share"] <= 1
        assert 0 <= epoch["val_collapse_class"] < 30 and epoch["collapse_warning"] is True
    log = capfd.readouterr().err
    assert log.count("warning: rank-1 collapse at epoch") == 2
    assert "above metrics.collapse_share 0.02" in log
    written = json.loads((tmp_path / "flagged" / "result.json").read_text())
    assert written["warnings"] == result["warnings"]
    assert written["warnings"][0].startswith("rank-1 collapse warning in epoch(s) 1, 2")

    last = local_checkpoints(tmp_path / "flagged" / "checkpoints")[2]
    again = evaluate_checkpoint(spec, last, spec.data.val)  # type: ignore[arg-type]
    assert again["collapse_share"] == pytest.approx(history[-1]["val_collapse_share"])
    assert again["collapse_class"] == history[-1]["val_collapse_class"]


def test_no_warning_below_the_default_share(omniglot_dataset, omniglot_spec, tmp_path):
    spec = _spec(omniglot_spec, omniglot_dataset, epochs=1, loss={"name": "cross_entropy"})
    result = run_training_in_process(spec, "quiet", storage=str(tmp_path), device="cpu")
    (epoch,) = read_metrics(str(tmp_path / "quiet" / "metrics.jsonl"))
    assert epoch["collapse_warning"] == (epoch["val_collapse_share"] > 0.5)
    assert ("warnings" in result) == epoch["collapse_warning"]
