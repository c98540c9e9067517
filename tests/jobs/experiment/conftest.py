"""Hand-made grids for the protocol's rules: a plan over datasets that exist only as a
dataset.json with a class count, and run records written to order (no training)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.experiment.config import ExperimentConfig, load_config
from jobs.experiment.plan import Plan, PlannedRun

TRAINING = {
    "model": {"arch": "convnet_small"},
    "epochs": 10,
    "optim": {"name": "sgd", "lr": 0.05},
    "data": {"channels": 1},
}


def _dataset_entry(name: str, study: str = "long_tail", k: int = 5, **extra: Any) -> dict:
    return {
        "name": name,
        "study": study,
        "source": "unused.zip",
        "k": k,
        "val_fraction": 0.15,
        "test_fraction": 0.25,
        **extra,
    }


@pytest.fixture
def make_plan(tmp_path: Path) -> Callable[..., tuple[ExperimentConfig, Plan]]:
    """make_plan(config dict, num_classes=100) -> (config, plan) over fake datasets."""

    def make(config: dict, num_classes: int = 100) -> tuple[ExperimentConfig, Plan]:
        config = {"name": "rules", "training": TRAINING, **config}
        path = tmp_path / "experiment.yaml"
        path.write_text(yaml.safe_dump(config))
        loaded = load_config(path)
        datasets = {}
        for dataset in loaded.datasets:
            info = tmp_path / "data" / dataset.name / "dataset.json"
            info.parent.mkdir(parents=True, exist_ok=True)
            info.write_text(json.dumps({"num_classes": num_classes}))
            datasets[dataset.name] = info
        return loaded, Plan(loaded, datasets)

    return make


def _make_record(
    run: PlannedRun,
    k: int,
    *,
    test: float = 0.5,
    top1: float | None = None,
    val: float = 0.5,
    share: float = 0.05,
    status: str = "succeeded",
    epochs: int = 10,
    best_epoch: int = 6,
) -> dict[str, Any]:
    """A finished run's record: validation `val` at every epoch (top-K and macro), test
    top-K and macro top-K `test`, test top-1 `top1` (default test / 2), collapse share."""
    top1 = test / 2 if top1 is None else top1
    history = [
        {"epoch": e, f"val_top{k}": val, f"val_macro_top{k}": val, "val_collapse_share": share}
        for e in range(1, epochs + 1)
    ]
    metrics = {"top1": top1, f"top{k}": test, f"macro_top{k}": test, "collapse_share": share}
    return {
        "run_id": run.run_id,
        "dataset": run.dataset,
        "arm": run.arm,
        "loss": run.loss,
        "params": run.params,
        "lr": run.lr,
        "seed": run.seed,
        "roles": sorted(run.roles),
        "status": status,
        "error": None if status == "succeeded" else "boom",
        "history": history,
        "val_samples": 400,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "val_best": {f"val_top{k}": val, f"val_macro_top{k}": val},
        "test_best": metrics,
        "test_final": metrics,
        "seconds_per_epoch": 1.0,
        "wall_seconds": 10.0,
    }


def _finals(plan: Plan, dataset: str, arm: str) -> dict[int, PlannedRun]:
    """seed -> the planned final run of one dataset and arm."""
    return {
        run.seed: run
        for run in plan.runs.values()
        if run.dataset == dataset and run.arm == arm and "final" in run.roles
    }


@pytest.fixture
def dataset_entry() -> Callable[..., dict]:
    """dataset_entry(name, study="long_tail", k=5, **extra): a dataset of the config."""
    return _dataset_entry


@pytest.fixture
def make_record() -> Callable[..., dict[str, Any]]:
    """make_record(run, k, test=, top1=, val=, share=, status=, ...): a finished run's record."""
    return _make_record


@pytest.fixture
def finals() -> Callable[[Plan, str, str], dict[int, PlannedRun]]:
    """finals(plan, dataset, arm) -> {seed: planned final run}."""
    return _finals
