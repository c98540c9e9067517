"""The report's plots (PNG, matplotlib's Agg backend): validation curves per loss, and per-class
test recall against the class's training count on long-tailed datasets."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.experiment.config import DatasetConfig, ExperimentConfig
from jobs.experiment.plan import Plan
from jobs.experiment.summary import final_records


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _final_runs_by_loss(
    dataset: DatasetConfig,
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(arm, its usable final records on `dataset`) for each arm that has some."""
    for arm in config.arms_for(dataset):
        runs = final_records(plan, records, dataset.name, arm)
        if runs:
            yield arm, runs


def plot_curves(
    dataset: DatasetConfig,
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    path: Path,
) -> None:
    """Validation top-K and macro top-K per epoch, mean over seeds, one line per arm."""
    plt = _plt()
    k = dataset.k
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for loss, runs in _final_runs_by_loss(dataset, config, plan, records):
        for axis, key in zip(axes, (f"val_top{k}", f"val_macro_top{k}"), strict=True):
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                for entry in run["history"]:
                    if isinstance(entry.get(key), float):
                        by_epoch.setdefault(entry["epoch"], []).append(entry[key])
            epochs = sorted(by_epoch)
            axis.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], label=loss)
    for axis, title in zip(axes, (f"validation top-{k}", f"validation macro top-{k}"), strict=True):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over seeds)")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(dataset.title or dataset.name, fontsize=10)
    _save(plt, figure, path)


def plot_class_recall(
    dataset: DatasetConfig,
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    path: Path,
) -> None:
    """Per-class test top-K recall against the class's training count (classes with the same
    count pooled), mean over seeds, one line per arm."""
    plt = _plt()
    k = dataset.k
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for loss, runs in _final_runs_by_loss(dataset, config, plan, records):
        pooled: dict[int, list[float]] = {}
        for run in runs:
            recalls = run["test_best"][f"class_recall_top{k}"]
            for count, recall in zip(run["train_class_counts"], recalls, strict=True):
                pooled.setdefault(int(count), []).append(recall)
        counts = sorted(pooled)
        axis.plot(
            counts,
            [statistics.fmean(pooled[c]) for c in counts],
            marker="o",
            markersize=3,
            label=loss,
        )
    if not axis.lines:
        axis.text(0.5, 0.5, "no finished runs", ha="center", transform=axis.transAxes)
    else:
        axis.legend(fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("training images of the class (log scale)")
    axis.set_ylabel(f"test top-{k} recall of the class")
    axis.set_title(dataset.title or dataset.name, fontsize=10)
    axis.grid(alpha=0.3)
    _save(plt, figure, path)
