"""`topk experiment`: config validation, the plan (sweeps, reuse, release of final runs), and a
real grid on Omniglot run twice through the command line (the second run trains nothing) with
its report: learning rates selected on seed 0's validation split and reused, verdicts with
paired intervals, the collapse share of every epoch and run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.experiment.config import load_config
from jobs.experiment.plan import Plan, run_id_for, select_sweep_winner, sweep_grid

REPO = Path(__file__).resolve().parents[3]
TOPK = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]


def _config(source: str = "omniglot.zip", **overrides) -> dict:
    """A tiny grid on one Omniglot dataset; `source` matters only where the grid is built."""
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
                "source": source,
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


def test_run_ids_did_not_change_with_the_keep_best_rename():
    """The id hashes `checkpoint.keep_best` under its former name: the runs made before the
    rename keep their ids, so a grid run again does not train them again."""
    legacy = {"checkpoint": {"keep_last": 1}, "seed": 3}
    text = json.dumps(legacy, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    spec = {"checkpoint": {"keep_best": 1}, "seed": 3}
    assert run_id_for("omni", "focal", spec, 3) == f"omni--focal--{digest}--s3"


def test_sweep_winner_ignores_failed_runs_and_keeps_the_first_on_a_tie():
    first = {"status": "succeeded", "val_best": {"m": 0.5}, "params": {"x": 1}}
    second = {"status": "succeeded", "val_best": {"m": 0.5}, "params": {"x": 2}}
    failed = {"status": "failed", "val_best": {"m": 0.9}}
    assert select_sweep_winner([failed, first, second], "m") is first
    assert select_sweep_winner([failed], "m") is None


def test_a_grid_runs_resumes_and_reports(tmp_path, omniglot_zip):
    """Cross-entropy's learning rate is selected from 2 values on seed 0; noised_topk's from
    2 epsilons x 2 learning rates: 2 + 4 selection runs, then one final run each (seed 1)."""
    config = _config(
        source=str(omniglot_zip),
        lr_selection={"grid": [0.05, 0.2], "seed": 0},
        claims={"long_tail": {"methods": ["noised_topk"], "baselines": ["cross_entropy"]}},
    )
    # Enough to train above chance (the report counts a run at chance as failed): every
    # drawing of the 136 characters (12 for training down to 6), 3 epochs.
    config["training"]["epochs"] = 3
    config["datasets"][0].update(max_per_class=None, imbalance_ratio=2)
    config_path = _write(tmp_path, config)
    out, report = tmp_path / "out", tmp_path / "docs" / "results.md"
    command = [*TOPK, "experiment", str(config_path), "--out", str(out), "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "8 of 8 runs have records, 0 failed" in first.stdout

    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/record.json")]
    assert len(records) == 8
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
        assert record["best_epoch"] in (1, 2, 3) and record["epochs"] == 3
        assert record["val_best"]["val_macro_top3"] == pytest.approx(
            record["history"][record["best_epoch"] - 1]["val_macro_top3"]
        )
        for epoch in record["history"]:  # the live collapse metric of every epoch
            assert 1 / 20 <= epoch["val_collapse_share"] <= 1  # 20 classes
            assert epoch["collapse_warning"] == (epoch["val_collapse_share"] > 0.5)
        assert 1 / 20 <= test["collapse_share"] <= 1

    text = report.read_text()
    assert "- Grid: **the full protocol**" in text and "cannot support" in text  # 2 seeds
    assert "## Rules, fixed before the results" in text
    assert text.index("## Rules, fixed") < text.index("## The paper's claims on these data")
    assert "| 2 | omni | `noised_topk` |" in text and "CI" in text
    assert "| `noised_topk` |" in text and "## Selection" in text and "**lr " in text
    assert "## Rank-1 collapse and failed runs" in text
    for png in ("curves-omni.png", "class-recall-omni.png"):
        assert (report.parent / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (report.parent / "results" / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {row["status"] for row in rows} == {"succeeded"}
    _check_selection(records, rows)
    assert {row["outcome"] for row in rows} <= {"trained", "collapsed", "never trained"}

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


def _check_selection(records: list[dict], rows: list[dict]) -> None:
    """Each arm's seed-1 run uses the learning rate (and epsilon) of its seed-0 candidate with
    the best validation macro top-3, whose own run is the seed-0 final run (runs.csv gives the
    roles the plan settled on; a record keeps those it was started with)."""
    roles = {row["run_id"]: row["roles"] for row in rows}
    order = [row["run_id"] for row in rows]  # the plan's order: candidates in grid order
    for arm in ("cross_entropy", "noised_topk"):
        mine = sorted(
            (r for r in records if r["arm"] == arm), key=lambda r: order.index(r["run_id"])
        )
        candidates = [r for r in mine if "sweep" in roles[r["run_id"]]]
        assert {r["seed"] for r in candidates} == {0}
        assert len(candidates) == (2 if arm == "cross_entropy" else 4)
        assert len({r["lr"] for r in candidates}) == 2
        best = max(candidates, key=lambda r: r["val_best"]["val_macro_top3"])  # first on a tie
        assert roles[best["run_id"]] == "final+sweep"
        (other,) = [r for r in mine if r["seed"] == 1]
        assert roles[other["run_id"]] == "final"
        assert (other["lr"], other["params"]) == (best["lr"], best["params"])
