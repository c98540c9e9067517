"""A Ray Tune sweep on the local cluster: 4 ASHA trials, each a TorchTrainer run."""

from __future__ import annotations

import json

import pytest

from jobs.spec.io import parse_sweep_spec, parse_train_spec
from jobs.sweep import format_trial_table, run_sweep
from jobs.training.storage import read_metrics

pytestmark = pytest.mark.slow


def test_a_four_trial_asha_sweep_returns_a_valid_best_config(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path
):
    train = omniglot_spec(omniglot_dataset, epochs=2, scaling={"num_workers": 1})
    train["data"]["samples_per_epoch"] = 128  # 4 steps: the test is about Tune, not learning
    sweep = parse_sweep_spec(
        {
            "train": train,
            "search": {
                "loss.epsilon": {"grid": [0.05, 1.0]},
                "optim.lr": {"grid": [0.003, 0.0003]},
            },
            "metric": "val_top5",
            "mode": "max",
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        }
    )
    summary = run_sweep(sweep, "sweep", storage=str(tmp_path))

    trials = summary["trials"]
    assert len(trials) == 4
    assert sorted((t["params"]["loss.epsilon"], t["params"]["optim.lr"]) for t in trials) == [
        (0.05, 0.0003),
        (0.05, 0.003),
        (1.0, 0.0003),
        (1.0, 0.003),
    ]
    assert all(t["status"] in {"completed", "stopped"} for t in trials), trials
    assert any(t["status"] == "completed" for t in trials)
    for trial in trials:
        assert 1 <= trial["metrics"]["epoch"] <= 2
        assert 0.0 <= trial["metrics"]["val_top5"] <= 1.0
    best = max(trials, key=lambda t: t["metrics"]["val_top5"])
    assert summary["best_params"] == best["params"]

    best_config = parse_train_spec(summary["best_config"])  # a valid training spec
    assert best_config.loss.epsilon == best["params"]["loss.epsilon"]
    assert best_config.optim.lr == best["params"]["optim.lr"]
    on_disk = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert on_disk["best_config"] == summary["best_config"]

    # each trial ran as its own named run with per-epoch metrics on storage
    trial_dirs = sorted((tmp_path / "sweep" / "trials").iterdir())
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:
        epochs = [r["epoch"] for r in read_metrics(str(trial_dir / "metrics.jsonl"))]
        assert epochs in ([1], [1, 2])

    table = format_trial_table(summary)
    assert "loss.epsilon" in table and "optim.lr" in table and "val_top5" in table
    assert len(table.splitlines()) == 1 + 4 + 1
