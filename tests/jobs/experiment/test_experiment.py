"""`topk experiment`: config validation, the plan (sweeps, reuse, release of final runs), the
claim rules, and a real grid on Omniglot run twice through the command line (the second run
trains nothing) with its report."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.experiment.config import load_config
from jobs.experiment.report import balanced_claim, long_tail_claim
from jobs.experiment.runner import Plan, select_sweep_winner, sweep_grid

REPO = Path(__file__).resolve().parents[3]
OMNIGLOT_ZIP = Path("/work/shared/data/omniglot/images_background_small1.zip")
TOPK = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]


def _config(**overrides) -> dict:
    config = {
        "name": "tiny",
        "title": "Tiny grid",
        "seeds": [0, 1],
        "concurrency": 2,
        "losses": {"cross_entropy": {}, "noised_topk": {"epsilon": 1.0, "n_samples": 2}},
        "training": {
            "model": {"arch": "convnet_small"},
            "epochs": 2,
            "batch_size": 32,
            "optim": {"name": "sgd", "lr": 0.05},
            "schedule": {"name": "constant"},
            "data": {
                "image_size": 16,
                "channels": 1,
                "loader_workers": 0,
                "augment": {"random_resized_crop": False, "hflip": False},
            },
        },
        "datasets": [
            {
                "name": "omni",
                "study": "long_tail",
                "source": str(OMNIGLOT_ZIP),
                "k": 3,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                "max_per_class": 10,
                "imbalance_ratio": 6,
                "max_size": 16,
                "image_format": "png",
            }
        ],
        "sweep": {
            "datasets": ["omni"],
            "seed": 0,
            "space": {"noised_topk": {"epsilon": [1.0, 0.2]}},
        },
    }
    config.update(overrides)
    return config


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"losses": {"softmax": {}}}, "unknown loss"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        (
            {"sweep": {"datasets": ["nope"], "space": {"noised_topk": {"epsilon": [1]}}}},
            "unknown datasets",
        ),
        ({"sweep": {"datasets": ["omni"], "space": {"focal": {"gamma": [1]}}}}, "not in `losses`"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_configs_are_refused_with_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, _config(**change)))


def test_relative_sources_start_at_the_config_folder(tmp_path):
    config = _config()
    config["datasets"][0]["source"] = "data/omniglot.zip"
    loaded = load_config(_write(tmp_path, config))
    assert loaded.source_path(loaded.datasets[0]) == tmp_path / "data" / "omniglot.zip"


def test_sweep_grid_is_the_product_in_order():
    assert sweep_grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


def _fake_dataset(tmp_path: Path) -> Path:
    info = tmp_path / "dataset.json"
    info.write_text(json.dumps({"num_classes": 136}))
    return info


def test_plan_waits_for_the_sweep_and_reuses_its_seed_run(tmp_path):
    config = load_config(_write(tmp_path, _config()))
    plan = Plan(config, {"omni": _fake_dataset(tmp_path)})
    sweep_ids = plan.sweeps[("omni", "noised_topk")]
    assert len(sweep_ids) == 2
    finals = {r.run_id for r in plan.runs.values() if "final" in r.roles}
    assert {plan.runs[r].loss for r in finals} == {"cross_entropy"}  # swept loss waits
    assert plan.release_finals({}) == []

    winner = {"status": "succeeded", "val_best": {"val_macro_top3": 0.5}}
    loser = {"status": "succeeded", "val_best": {"val_macro_top3": 0.4}}
    records = {
        sweep_ids[0]: loser,
        sweep_ids[1]: winner | {"params": plan.runs[sweep_ids[1]].params},
    }
    added = plan.release_finals(records)
    assert len(added) == 2  # seeds 0 and 1, with the winner's epsilon
    assert {plan.runs[r].params["epsilon"] for r in added} == {0.2}
    assert sweep_ids[1] in added  # seed 0 with the chosen values is the sweep's own run
    assert plan.runs[sweep_ids[1]].roles == {"sweep", "final"}
    assert plan.release_finals(records) == []  # only once


def test_sweep_winner_ignores_failed_runs_and_keeps_the_first_on_a_tie():
    first = {"status": "succeeded", "val_best": {"m": 0.5}, "params": {"x": 1}}
    second = {"status": "succeeded", "val_best": {"m": 0.5}, "params": {"x": 2}}
    failed = {"status": "failed", "val_best": {"m": 0.9}}
    assert select_sweep_winner([failed, first, second], "m") is first
    assert select_sweep_winner([failed], "m") is None


def _row(dataset, loss, topk, std=0.01, macro=None, seconds=1.0):
    return {
        "dataset": dataset,
        "loss": loss,
        "test_top5_mean": topk,
        "test_top5_std": std,
        "test_macro_top5_mean": topk if macro is None else macro,
        "test_macro_top5_std": std,
        "seconds_per_epoch_mean": seconds,
        "time_vs_cross_entropy": math.nan,
    }


def test_claim_rules(tmp_path):
    config = load_config(_write(tmp_path, _config()))
    dataset = config.datasets[0].model_copy(update={"k": 5, "name": "d"})
    within = [_row("d", "smooth_topk_svm", 0.80, seconds=4.0), _row("d", "noised_topk", 0.795)]
    held, text = balanced_claim(dataset, within)
    assert held is True and "-0.5 points" in text and "epoch time 0.25x" in text
    beyond = [_row("d", "cross_entropy", 0.80), _row("d", "noised_topk", 0.70)]
    assert balanced_claim(dataset, beyond)[0] is False
    # its imbalanced sibling is not a competitor in claim 1
    sibling = [*within, _row("d", "noised_topk_imbalanced", 0.95)]
    assert balanced_claim(dataset, sibling)[0] is True

    rows = [_row("d", name, 0.5, macro=0.5) for name in ("cross_entropy", "focal", "ldam")]
    assert long_tail_claim(dataset, rows + [_row("d", "noised_topk_imbalanced", 0, macro=0.6)])[0]
    held, text = long_tail_claim(
        dataset, rows + [_row("d", "noised_topk_imbalanced", 0, macro=0.5)]
    )
    assert held is False and "cross_entropy (50.0%)" in text
    assert long_tail_claim(dataset, rows)[0] is None


@pytest.mark.skipif(not OMNIGLOT_ZIP.is_file(), reason="Omniglot is not on this machine")
def test_a_grid_runs_resumes_and_reports(tmp_path):
    config_path = _write(tmp_path, _config())
    out, report = tmp_path / "out", tmp_path / "docs" / "results.md"
    command = [*TOPK, "experiment", str(config_path), "--out", str(out), "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "5 of 5 runs have records, 0 failed" in first.stdout

    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/record.json")]
    assert len(records) == 5
    test_split = json.loads((out / "data" / "omni" / "dataset.json").read_text())["splits"]["test"]
    for record in records:
        assert record["status"] == "succeeded", record.get("error")
        test = record["test_best"]
        assert test["samples"] == test_split["num_samples"]
        assert test["class_support"] == test_split["class_counts"]
        # macro top-3 is the mean of the per-class recalls the report plots
        recalls = test["class_recall_top3"]
        assert test["macro_top3"] == pytest.approx(sum(recalls) / len(recalls))
        assert 0 <= test["top1"] <= test["top3"] <= 1
        assert record["best_epoch"] in (1, 2) and record["epochs"] == 2
        assert record["val_best"]["val_macro_top3"] == pytest.approx(
            record["history"][record["best_epoch"] - 1]["val_macro_top3"]
        )

    text = report.read_text()
    assert "## The paper's claims on these data" in text and "| 2: imbalanced" in text
    assert "| `noised_topk` |" in text and "## Sweeps" in text
    for png in ("curves-omni.png", "class-recall-omni.png"):
        assert (report.parent / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (report.parent / "results" / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and {row["status"] for row in rows} == {"succeeded"}

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/record.json")}
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to train" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(json.loads((out / "timing.json").read_text())) == 2


def test_a_missing_source_is_a_clear_error(tmp_path):
    config = _config()
    config["datasets"][0]["source"] = str(tmp_path / "nowhere.zip")
    command = [*TOPK, "experiment", str(_write(tmp_path, config)), "--out", str(tmp_path / "o")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "nowhere.zip does not exist" in done.stderr and "Traceback" not in done.stderr


def test_rank1_collapse_is_one_class_first_for_everything():
    from jobs.experiment.report import rank1_collapsed

    assert rank1_collapsed({"test_best": {"class_recall_top1": [1.0, 0.0, 0.05, 0.0]}})
    assert not rank1_collapsed({"test_best": {"class_recall_top1": [1.0, 0.3, 0.0, 0.0]}})
    assert not rank1_collapsed({"test_best": {"class_recall_top1": [0.8, 0.0, 0.0, 0.0]}})
    assert not rank1_collapsed({"status": "failed"})
