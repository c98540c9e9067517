"""The plan of an experiment: every run of the grid (datasets x arms x seeds) as a training spec
with a stable id, the selection runs first, and the final runs of an arm released once its
selection on that dataset has finished (with the winning learning rate and hyperparameters).

Selection: for each dataset and arm, the candidates are the product of the arm's swept loss
hyperparameters (`sweep`, on its datasets) and the learning rate grid (`lr_selection`); each
candidate trains with the selection seed, and the one with the best validation
`val_macro_top{K}` at its best epoch wins (the first on a tie; the test split is never read).
The other seeds run with the winner's values, and the selection seed's final run is the
winner's own run. An arm with a single candidate has no selection.

A run id is `<dataset>--<arm>--<hash of the training spec>--s<seed>`, so a run is redone only
when its spec changes, and a selection run and a final run with the same spec are one run.
No torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.contract.loss import LOSS_SPECS
from jobs.contract.selection import best_by_metric
from jobs.contract.train import OptimSpec
from jobs.experiment.config import DatasetConfig, ExperimentConfig, deep_merge


def _digest(value: Any, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class PlannedRun:
    run_id: str
    dataset: str
    arm: str
    """The arm's name in the config's `losses`."""
    loss: str
    """The registry name of the arm's loss."""
    params: dict[str, Any]
    """The loss hyperparameters as configured (without `k` and `class_counts`)."""
    lr: float
    """The run's optim.lr."""
    seed: int
    spec: dict[str, Any]
    roles: set[str] = field(default_factory=set)
    """"sweep" (a selection candidate) and/or "final"."""


@dataclass(frozen=True)
class Candidate:
    """One selection candidate: loss hyperparameters and a learning rate (None: the
    training settings' optim.lr)."""

    params: dict[str, Any]
    lr: float | None


def make_spec(
    config: ExperimentConfig,
    dataset: DatasetConfig,
    dataset_json: Path,
    num_classes: int,
    loss: str,
    params: dict[str, Any],
    seed: int,
    lr: float | None = None,
) -> dict[str, Any]:
    """The training spec (as JSON) of one run; validated here, so a bad config fails early."""
    from jobs.contract.train import TrainSpec

    loss_part = {"name": loss, **params}
    if "k" in LOSS_SPECS[loss].model_fields:
        loss_part["k"] = dataset.k
    ks = sorted({1, dataset.k})
    fixed: dict[str, Any] = {
        "data": {
            "train": str(dataset_json),
            "val": f"{dataset_json}#val",
            "num_classes": num_classes,
        },
        "loss": loss_part,
        "seed": seed,
        "metrics": {"ks": ks, "select": dataset.select_metric, "mode": "max"},
        "checkpoint": {"keep_best": 1},
        "scaling": {"num_workers": 1, "use_gpu": False},
    }
    if lr is not None:
        fixed["optim"] = {"lr": lr}
    spec = deep_merge(config.training_for(dataset), fixed)
    spec["loss"] = loss_part  # the loss part is the run's, never merged with a default
    TrainSpec.model_validate(spec)
    return spec


def run_id_for(dataset: str, arm: str, spec: dict[str, Any], seed: int) -> str:
    return f"{dataset}--{arm}--{_digest(_as_hashed(spec))}--s{seed}"


def _as_hashed(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as run ids hash it: `checkpoint.keep_best` under its former name `keep_last`,
    so that the runs made before the rename keep their ids (and are not trained again)."""
    checkpoint = spec.get("checkpoint")
    if not isinstance(checkpoint, dict) or "keep_best" not in checkpoint:
        return spec
    renamed = {("keep_last" if key == "keep_best" else key): v for key, v in checkpoint.items()}
    return {**spec, "checkpoint": renamed}


def sweep_grid(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values, in the order given."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def candidates(config: ExperimentConfig, dataset: str, arm: str) -> list[Candidate]:
    """The selection candidates of `arm` on `dataset`: swept hyperparameters x learning rates
    (one candidate, the configured values, when neither applies)."""
    params = config.params_of(arm)
    combos = [params]
    sweep = config.sweep
    if sweep is not None and dataset in sweep.datasets and arm in sweep.space:
        combos = [deep_merge(params, combo) for combo in sweep_grid(sweep.space[arm])]
    grid: list[float | None] = [None]
    if config.lr_selection is not None:
        grid = list(config.lr_selection.grid_for(arm))
    return [Candidate(combo, lr) for combo in combos for lr in grid]


def selection_seed(config: ExperimentConfig) -> int:
    """The seed the selections run with (lr_selection's, else the sweep's, else 0)."""
    if config.lr_selection is not None:
        return config.lr_selection.seed
    return config.sweep.seed if config.sweep is not None else 0


class Plan:
    """The runs of a config: selection runs first, final runs as soon as their values are
    known (an arm with a selection on a dataset waits for it)."""

    def __init__(self, config: ExperimentConfig, datasets: dict[str, Path]):
        self.config = config
        self.datasets = datasets
        self.num_classes = {
            name: int(json.loads(path.read_text())["num_classes"])
            for name, path in datasets.items()
        }
        self.by_name = {d.name: d for d in config.datasets}
        self.runs: dict[str, PlannedRun] = {}
        self.sweeps: dict[tuple[str, str], list[str]] = {}  # (dataset, arm) -> selection runs
        self.chosen: dict[tuple[str, str], str] = {}  # (dataset, arm) -> the winner's run id
        seed = selection_seed(config)
        for dataset in config.datasets:
            for arm in config.arms_for(dataset):
                options = candidates(config, dataset.name, arm)
                if len(options) > 1:
                    self.sweeps[(dataset.name, arm)] = [
                        self._add(dataset.name, arm, c.params, c.lr, seed, "sweep") for c in options
                    ]
                    continue
                for final_seed in config.seeds:
                    self._add(dataset.name, arm, options[0].params, options[0].lr, final_seed)

    def _add(
        self,
        dataset_name: str,
        arm: str,
        params: dict[str, Any],
        lr: float | None,
        seed: int,
        role: str = "final",
    ) -> str:
        dataset = self.by_name[dataset_name]
        loss = self.config.loss_of(arm)
        spec = make_spec(
            self.config,
            dataset,
            self.datasets[dataset_name],
            self.num_classes[dataset_name],
            loss,
            params,
            seed,
            lr,
        )
        run_id = run_id_for(dataset_name, arm, spec, seed)
        chosen_lr = float(spec.get("optim", {}).get("lr", OptimSpec.model_fields["lr"].default))
        run = self.runs.setdefault(
            run_id,
            PlannedRun(run_id, dataset_name, arm, loss, dict(params), chosen_lr, seed, spec),
        )
        run.roles.add(role)
        return run_id

    def release_finals(self, records: dict[str, dict[str, Any]]) -> list[str]:
        """Add the final runs of every selection whose runs all have records; returns the new
        run ids."""
        added = []
        for (dataset_name, arm), ids in list(self.sweeps.items()):
            if any(run_id not in records for run_id in ids) or self._has_finals(dataset_name, arm):
                continue
            metric = self.by_name[dataset_name].select_metric
            winner = select_sweep_winner([records[r] for r in ids], metric)
            # No candidate succeeded: the finals run with the configured values.
            chosen = next((self.runs[r] for r in ids if records[r] is winner), None)
            if chosen is not None:
                self.chosen[(dataset_name, arm)] = chosen.run_id
            params = chosen.params if chosen else self.config.params_of(arm)
            lr = chosen.lr if chosen else None
            for seed in self.config.seeds:
                added.append(self._add(dataset_name, arm, params, lr, seed))
        return added

    def _has_finals(self, dataset_name: str, arm: str) -> bool:
        return any(
            r.dataset == dataset_name and r.arm == arm and "final" in r.roles
            for r in self.runs.values()
        )

    def winner(self, dataset_name: str, arm: str) -> PlannedRun | None:
        """The selection winner of `arm` on `dataset_name` (None: no selection, not finished,
        or no candidate succeeded)."""
        run_id = self.chosen.get((dataset_name, arm))
        return self.runs[run_id] if run_id else None


def select_sweep_winner(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The succeeded selection record with the highest best-epoch validation `metric` (the
    first one on a tie); None when none succeeded."""
    succeeded = [r for r in records if r.get("status") == "succeeded"]
    return best_by_metric(succeeded, metric, "max", metrics_of=lambda r: r.get("val_best") or {})
