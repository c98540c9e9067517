"""A Ray Tune sweep on the local cluster: 4 ASHA trials, each a TorchTrainer run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from jobs.contract.run_files import read_metrics
from jobs.contract.spec_files import parse_sweep_spec, parse_train_spec
from jobs.sweep import format_trial_table, run_sweep

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
    with SweepFileWatcher(tmp_path / "sweep" / "sweep.json") as watcher:
        summary = run_sweep(sweep, "sweep", storage=str(tmp_path))

    # while it ran, sweep.json held the live trial table: trials running, with their last epoch
    live = [table for table in watcher.seen if table.get("complete") is False]
    assert live, f"no live trial table among {len(watcher.seen)} versions of sweep.json"
    assert all(table["best_params"] is None for table in live)
    running = [t for table in live for t in table["trials"] if t["status"] == "running"]
    assert any(t["metrics"].get("epoch", 0) >= 1 for t in running), live[-1]
    final_ids = {t["trial_id"] for t in summary["trials"]}
    assert all({t["trial_id"] for t in table["trials"]} <= final_ids for table in live)

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
    assert on_disk["best_config"] == summary["best_config"] and on_disk["complete"] is True

    # each trial ran as its own named run with per-epoch metrics on storage
    trial_dirs = sorted((tmp_path / "sweep" / "trials").iterdir())
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:
        epochs = [r["epoch"] for r in read_metrics(str(trial_dir / "metrics.jsonl"))]
        assert epochs in ([1], [1, 2])

    table = format_trial_table(summary)
    assert "loss.epsilon" in table and "optim.lr" in table and "val_top5" in table
    assert len(table.splitlines()) == 1 + 4 + 1
    # the best trial as one readable line, not a dict
    epsilon, lr = best["params"]["loss.epsilon"], best["params"]["optim.lr"]
    assert table.splitlines()[-1] == (
        f"best: loss.epsilon={epsilon:.4g}, optim.lr={lr:.4g} "
        f"(val_top5 {best['metrics']['val_top5']:.4f}, trial {best['trial_id']})"
    )
    assert not re.search(r"[{}]", table.splitlines()[-1])


class SweepFileWatcher:
    """Reads sweep.json every 50 ms in a thread while the sweep runs; `seen` holds each
    distinct version."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        last = None
        while not self._stop.wait(0.05):
            try:
                text = self.path.read_text()
                table = json.loads(text)
            except (OSError, ValueError):  # not there yet, or being replaced
                continue
            if text != last:
                self.seen.append(table)
                last = text

    def __enter__(self) -> SweepFileWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_sweep_whose_trials_all_fail_for_the_spec_records_a_failed_result(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path
):
    """Each trial switches to a loss that needs class counts, which the shards' folder (no
    dataset.json) cannot give: a user error in every trial, so result.json says "failed" (the
    service then fails the job instead of relaunching it as an infrastructure failure)."""
    dataset_json = Path(omniglot_dataset)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in json.loads(dataset_json.read_text())["splits"]["train"]["shards"]:
        (shards / shard["path"]).write_bytes((dataset_json.parent / shard["path"]).read_bytes())
    train = omniglot_spec(omniglot_dataset, epochs=1, scaling={"num_workers": 1})
    train["data"]["train"] = [str(path) for path in sorted(shards.iterdir())]
    train["loss"] = {"name": "cross_entropy"}
    sweep = parse_sweep_spec(
        {
            "train": train,
            "search": {"loss.name": {"grid": ["ldam", "logit_adjusted"]}},
            "scheduler": {"name": "fifo"},
        }
    )
    with pytest.raises(RuntimeError, match="loss.class_counts") as caught:
        run_sweep(sweep, "sweep", storage=str(tmp_path / "runs"))
    result = json.loads((tmp_path / "runs" / "sweep" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == str(caught.value)
    summary = json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["error", "error"]


def test_a_sweep_whose_trial_lost_its_worker_is_left_to_be_retried(
    omniglot_dataset, omniglot_spec, tmp_path
):
    """A worker killed mid-epoch (no failure budget) is the cluster's failure, not the spec's:
    `python -m jobs sweep` exits 1 without result.json, so the service relaunches it."""
    marker = tmp_path / "kill-once"
    marker.write_text("")
    train = omniglot_spec(omniglot_dataset, epochs=1, scaling={"num_workers": 1})
    sweep = {
        "train": train,
        "search": {"optim.lr": {"grid": [0.01]}},
        "scheduler": {"name": "fifo"},
    }
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(sweep))
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "sweep", "--spec", str(spec_file), "--run-name", "sweep",
         "--storage", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "TOPK_TEST_KILL_WORKER": f"0:1:{marker}"},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert not marker.exists()  # the worker was killed
    assert (tmp_path / "runs" / "sweep" / "sweep.json").exists()
    assert not (tmp_path / "runs" / "sweep" / "result.json").exists()
