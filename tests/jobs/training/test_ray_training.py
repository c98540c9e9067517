"""Training on a real local Ray cluster (2 CPU workers, gloo DDP) with real Omniglot shards:
a short run learns, writes metrics and checkpoints, resumes when relaunched, and survives a
killed worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.contract.run_files import read_metrics
from jobs.contract.spec_files import parse_train_spec
from jobs.training.checkpoint import load_training_state
from jobs.training.run import run_training
from jobs.training.worker import FAULT_INJECTION_ENV

SUBSET_CLASSES = 30  # conftest's Omniglot subset

pytestmark = pytest.mark.slow


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def learned_run(ray_cluster, omniglot_dataset, omniglot_spec, tmp_path_factory):
    """A 5-epoch, 2-worker run of the stochastic top-5 loss: (storage root, result)."""
    root = tmp_path_factory.mktemp("runs")
    spec = parse_train_spec(omniglot_spec(omniglot_dataset, epochs=5))
    result = run_training(spec, "learn", storage=str(root))
    return root, result


def test_a_short_run_learns_far_above_chance(learned_run):
    root, result = learned_run
    assert result["status"] == "succeeded" and result["error"] is None
    assert result["epochs"] == 5
    chance = 5 / SUBSET_CLASSES
    best = result["best"]
    assert best["val_top5"] >= 2 * chance, best
    assert best["val_top1"] <= best["val_top5"]
    assert result["best_epoch"] == best["epoch"]
    assert json.loads((root / "learn" / "result.json").read_text()) == result


def test_metrics_and_checkpoints_are_on_storage(learned_run):
    root, _ = learned_run
    run_dir = root / "learn"
    history = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    for record in history:
        for key in ("train_loss", "skipped", "samples_per_second", "time"):
            assert key in record
        for k in (1, 5):
            assert 0.0 <= record[f"val_top{k}"] <= 1.0
            assert 0.0 <= record[f"val_macro_top{k}"] <= 1.0
        assert record["skipped"] == 0
        # every rank runs the same number of full batches: 450 samples // (32 x 2) = 7 steps
        assert record["samples"] == 7 * 32 * 2
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert (run_dir / "spec.json").is_file()
    # keep_best=1: the best epoch's checkpoint and the latest one (the same when it is best)
    checkpoints = _checkpoint_dirs(run_dir)
    best_epoch = max(history, key=lambda r: r["val_top5"])["epoch"]
    names = {p.name for p in checkpoints}
    assert names == {f"checkpoint_epoch_{best_epoch:04d}", "checkpoint_epoch_0005"}
    latest = run_dir / "checkpoints" / "checkpoint_epoch_0005"
    assert {"state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in latest.iterdir()}


def test_a_relaunch_with_the_same_name_continues_from_the_checkpoint(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path
):
    """Its own run (the learned run's assertions do not see this one's extra epoch)."""
    from jobs.models import build_model

    root = tmp_path / "runs"
    spec = parse_train_spec(omniglot_spec(omniglot_dataset, epochs=1))
    assert run_training(spec, "relaunch", storage=str(root))["epochs"] == 1
    run_dir = root / "relaunch"
    written = parse_train_spec(json.loads((run_dir / "spec.json").read_text()))
    longer = written.model_copy(update={"epochs": 2})
    result = run_training(longer, "relaunch", storage=str(root))
    assert result["epochs"] == 2
    history = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["resumed_from_epoch"] is None and history[1]["resumed_from_epoch"] == 1
    model = build_model("cifar_resnet20", SUBSET_CLASSES, in_channels=1)
    state = load_training_state(run_dir / "checkpoints" / "checkpoint_epoch_0002", model=model)
    assert state.epoch == 2


def test_a_killed_worker_resumes_from_its_checkpoint(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path, monkeypatch
):
    marker = tmp_path / "kill-rank1-once"
    marker.touch()
    monkeypatch.setenv(FAULT_INJECTION_ENV, f"1:2:{marker}")
    spec = parse_train_spec(omniglot_spec(omniglot_dataset, epochs=3, max_failures=1))
    result = run_training(spec, "fault", storage=str(tmp_path / "runs"))
    assert not marker.exists(), "the worker was never killed"
    assert result["status"] == "succeeded" and result["epochs"] == 3
    history = read_metrics(str(tmp_path / "runs" / "fault" / "metrics.jsonl"))
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[0]["resumed_from_epoch"] is None
    assert history[1]["resumed_from_epoch"] == 1 and history[2]["resumed_from_epoch"] == 1


def test_a_run_without_failure_budget_fails_with_the_cause(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path, monkeypatch
):
    marker = tmp_path / "kill-rank1-once"
    marker.touch()
    monkeypatch.setenv(FAULT_INJECTION_ENV, f"1:2:{marker}")
    spec = parse_train_spec(omniglot_spec(omniglot_dataset, epochs=2, max_failures=0))
    with pytest.raises(RuntimeError):
        run_training(spec, "nobudget", storage=str(tmp_path / "runs"))
    result = json.loads((tmp_path / "runs" / "nobudget" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]
    assert result["epochs"] == 1


def test_a_data_error_fails_the_run_with_a_one_line_cause(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path
):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(Path(omniglot_dataset).parent, broken)
    (broken / "train-000001.tar").unlink()
    spec = parse_train_spec(
        omniglot_spec(str(broken / "dataset.json"), epochs=1, scaling={"num_workers": 1})
    )
    with pytest.raises(RuntimeError) as failure:
        run_training(spec, "broken", storage=str(tmp_path / "runs"))
    message = str(failure.value)
    assert "\n" not in message and "train-000001.tar" in message, message
    result = json.loads((tmp_path / "runs" / "broken" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == message
