"""The experiment's figures, from the run records: what became of each run (`run_outcome`), per
dataset and arm the mean and standard deviation over seeds of the test metrics of the
best-validation checkpoint (`summarize`), each seed's value for paired comparisons
(`seed_values`), and one row per run (`run_rows`). The report's tables, claims and CSV files
read these.

Outcomes, defined before looking at the results:
- failed: the run produced no trained model. Either it *crashed* (its record says failed: an
  error, a non-finite loss, its process died) or it *never trained*: at no epoch was its
  validation top-K accuracy above chance, K/C plus two binomial standard errors of chance on the
  validation split (sqrt((K/C)(1 - K/C)/n_val)). Failed runs are counted apart and left out of
  the means and of the paired differences.
- collapsed (rank-1 collapse): a run that trained, whose best-validation checkpoint gives one
  class the top-1 prediction for at least COLLAPSE_SHARE of the test images (the collapse share
  of topk.metrics). A top-K hinge loss allows this: it only asks the true class to beat the
  (K+1)-th score, so one class can hold a top slot for free. Collapsed runs are results of the
  method: they stay in the means, and are counted.
- trained: the others.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from jobs.experiment.config import ExperimentConfig
from jobs.experiment.plan import Plan

COLLAPSE_SHARE = 0.5
"""A run is collapsed when one class takes at least this share of its test top-1 predictions
(the default of the live warning, `metrics.collapse_share`)."""
CHANCE_STANDARD_ERRORS = 2.0
LATE_EPOCHS = 3
"""A best epoch among the last LATE_EPOCHS suggests the validation curve was still rising."""


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(params.items()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def chance_level(k: int, num_classes: int, val_samples: int) -> float:
    """The top-K accuracy a model that never trained stays under: K/C plus
    CHANCE_STANDARD_ERRORS binomial standard errors of chance on `val_samples` images."""
    chance = min(k / num_classes, 1.0)
    if val_samples <= 0:
        return chance
    return chance + CHANCE_STANDARD_ERRORS * math.sqrt(chance * (1 - chance) / val_samples)


def never_trained(record: dict[str, Any], k: int, num_classes: int) -> bool:
    """No epoch's validation top-K accuracy is above `chance_level` (False without any)."""
    values = [e[f"val_top{k}"] for e in record.get("history", []) if f"val_top{k}" in e]
    values = [v for v in values if isinstance(v, float) and not math.isnan(v)]
    if not values:
        return False
    return max(values) <= chance_level(k, num_classes, int(record.get("val_samples") or 0))


def rank1_collapsed(record: dict[str, Any]) -> bool:
    """The best-validation checkpoint gives one class the top-1 prediction for at least
    COLLAPSE_SHARE of the test images. (Records written before the collapse share was measured:
    that class's top-1 recall is at least 0.9 and every other class's at most 0.1.)"""
    test = record.get("test_best") or {}
    share = test.get("collapse_share")
    if isinstance(share, float) and not math.isnan(share):
        return share >= COLLAPSE_SHARE
    recalls = test.get("class_recall_top1")
    if not recalls:
        return False
    ranked = sorted(recalls, reverse=True)
    return ranked[0] >= 0.9 and ranked[1] <= 0.1


def run_outcome(record: dict[str, Any] | None, k: int, num_classes: int) -> str:
    """ "not run", "crashed", "never trained" (both failed), "collapsed" or "trained"."""
    if record is None:
        return "not run"
    if record.get("status") != "succeeded":
        return "crashed"
    if never_trained(record, k, num_classes):
        return "never trained"
    return "collapsed" if rank1_collapsed(record) else "trained"


FAILED = ("crashed", "never trained")


def final_runs(plan: Plan, dataset: str, arm: str) -> list[Any]:
    """The planned final runs of one dataset and arm (one per seed, once released)."""
    return [
        run
        for run in plan.runs.values()
        if run.dataset == dataset and run.arm == arm and "final" in run.roles
    ]


def final_records(
    plan: Plan, records: dict[str, dict[str, Any]], dataset: str, arm: str
) -> list[dict[str, Any]]:
    """The usable final records of one dataset and arm (trained or collapsed, not failed)."""
    k = plan.by_name[dataset].k
    num_classes = plan.num_classes[dataset]
    usable = []
    for run in final_runs(plan, dataset, arm):
        record = records.get(run.run_id)
        if run_outcome(record, k, num_classes) in ("trained", "collapsed"):
            usable.append(record)
    return usable  # type: ignore[return-value]


def seed_values(
    plan: Plan, records: dict[str, dict[str, Any]], dataset: str, arm: str, key: str
) -> dict[int, float]:
    """seed -> the test metric `key` (e.g. "top5") of the arm's usable final run."""
    return {
        r["seed"]: float(r["test_best"][key]) for r in final_records(plan, records, dataset, arm)
    }


def in_warmup(params: dict[str, Any], best_epoch: int | None) -> bool:
    """Whether a run of a loss with a cross-entropy warm-up (`ce_warmup_epochs` in its params)
    had its best epoch within the warm-up: a cross-entropy model at that checkpoint, whose
    figures say nothing of the loss. False without a warm-up or a best epoch."""
    warmup = int(params.get("ce_warmup_epochs") or 0)
    return best_epoch is not None and best_epoch <= warmup


def summarize(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per dataset and arm: outcomes, the chosen learning rate, mean and std over the
    usable seeds of the test metrics of the best-validation checkpoint, best epochs, and the
    training seconds per epoch (relative to cross-entropy on the same dataset too)."""
    rows = []
    for dataset in config.datasets:
        k, num_classes = dataset.k, plan.num_classes[dataset.name]
        epochs = int(config.training_for(dataset).get("epochs", 10))
        for arm in config.arms_for(dataset):
            planned = final_runs(plan, dataset.name, arm)
            outcomes = [run_outcome(records.get(r.run_id), k, num_classes) for r in planned]
            runs = final_records(plan, records, dataset.name, arm)
            row: dict[str, Any] = {
                "dataset": dataset.name,
                "arm": arm,
                "loss": config.loss_of(arm),
                "seeds": len(runs),
                "planned": len(planned) or len(config.seeds),
                "failed": sum(o in FAILED for o in outcomes),
                "collapsed": outcomes.count("collapsed"),
                "params": planned[0].params if planned else config.params_of(arm),
                "lr": planned[0].lr if planned else math.nan,
            }
            for key in ("top1", f"top{k}", f"macro_top{k}"):
                mean, std = _mean_std([r["test_best"][key] for r in runs])
                row[f"test_{key}_mean"], row[f"test_{key}_std"] = mean, std
            best_epochs = [r["best_epoch"] for r in runs]
            row["best_epoch_median"] = statistics.median(best_epochs) if best_epochs else math.nan
            row["best_epoch_late"] = sum(e > epochs - LATE_EPOCHS for e in best_epochs)
            row["best_epoch_in_warmup"] = sum(in_warmup(row["params"], e) for e in best_epochs)
            mean, std = _mean_std([r["seconds_per_epoch"] for r in runs])
            row["seconds_per_epoch_mean"], row["seconds_per_epoch_std"] = mean, std
            rows.append(row)
    for row in rows:
        reference = row_of(rows, row["dataset"], "cross_entropy")
        base = reference["seconds_per_epoch_mean"] if reference else math.nan
        row["time_vs_cross_entropy"] = row["seconds_per_epoch_mean"] / base if base else math.nan
    return rows


def row_of(rows: list[dict[str, Any]], dataset: str, arm: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["dataset"] == dataset and r["arm"] == arm), None)


def run_rows(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per planned run: what it is, its outcome, and its figures."""
    rows = []
    for run in plan.runs.values():
        record = records.get(run.run_id)
        k, num_classes = plan.by_name[run.dataset].k, plan.num_classes[run.dataset]
        row: dict[str, Any] = {
            "run_id": run.run_id,
            "dataset": run.dataset,
            "arm": run.arm,
            "loss": run.loss,
            "seed": run.seed,
            "lr": run.lr,
            "roles": "+".join(sorted(run.roles)),
            "params": params_text(run.params),
            "status": record.get("status") if record else "not run",
            "outcome": run_outcome(record, k, num_classes),
        }
        if record and record.get("status") == "succeeded":
            row["best_epoch"] = record["best_epoch"]
            row["epochs"] = record["epochs"]
            for key in ("top1", f"top{k}", f"macro_top{k}"):
                row[f"val_best_{key}"] = record["val_best"].get(f"val_{key}")
                row[f"test_best_{key}"] = record["test_best"][key]
                row[f"test_final_{key}"] = record["test_final"][key]
            row["test_collapse_share"] = record["test_best"].get("collapse_share")
            row["seconds_per_epoch"] = record["seconds_per_epoch"]
            row["wall_seconds"] = record["wall_seconds"]
        elif record:
            row["error"] = record.get("error")
        rows.append(row)
    return rows
