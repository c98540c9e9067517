"""The experiment report: CSV tables, PNG plots and a Markdown page, all from the run records.

`write_report(config, plan, records, path, out)` writes `path` (Markdown) and, in the folder
`<path's folder>/<path's stem>/`, `runs.csv` (one row per run), `summary.csv` (mean and
standard deviation over seeds per dataset and loss) and the plots. Every figure in the page
comes from the records; the statements about the paper's claims are computed from the same
numbers by fixed rules, written next to them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from jobs.experiment.config import DatasetConfig, ExperimentConfig
from jobs.experiment.runner import Plan

LONG_TAIL_BASELINES = ("cross_entropy", "focal", "ldam", "logit_adjusted", "smooth_topk_svm")


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(params.items()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def rank1_collapsed(record: dict[str, Any]) -> bool:
    """The model puts one class at rank 1 for (nearly) every test image: that class's top-1
    recall is at least 0.9 and every other class's at most 0.1. A top-K hinge loss allows this:
    it only asks the true class to beat the (K+1)-th score, so one class can hold a top slot for
    free."""
    recalls = record.get("test_best", {}).get("class_recall_top1")
    if not recalls:
        return False
    ranked = sorted(recalls, reverse=True)
    return ranked[0] >= 0.9 and ranked[1] <= 0.1


def final_records(
    plan: Plan, records: dict[str, dict[str, Any]], dataset: str, loss: str
) -> list[dict[str, Any]]:
    """The succeeded final-role records of one dataset and loss, one per seed."""
    return [
        records[run.run_id]
        for run in plan.runs.values()
        if run.dataset == dataset
        and run.loss == loss
        and "final" in run.roles
        and records.get(run.run_id, {}).get("status") == "succeeded"
    ]


def summarize(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per dataset and loss: mean and std over seeds of the test metrics of the
    best-validation checkpoint, and the training seconds per epoch."""
    rows = []
    for dataset in config.datasets:
        k = dataset.k
        for loss in config.losses:
            runs = final_records(plan, records, dataset.name, loss)
            row: dict[str, Any] = {"dataset": dataset.name, "loss": loss, "seeds": len(runs)}
            for key in ("top1", f"top{k}", f"macro_top{k}"):
                mean, std = _mean_std([r["test_best"][key] for r in runs])
                row[f"test_{key}_mean"], row[f"test_{key}_std"] = mean, std
            row["rank1_collapsed"] = sum(rank1_collapsed(r) for r in runs)
            mean, std = _mean_std([r["seconds_per_epoch"] for r in runs])
            row["seconds_per_epoch_mean"], row["seconds_per_epoch_std"] = mean, std
            row["params"] = runs[0]["params"] if runs else config.losses[loss]
            rows.append(row)
    for row in rows:  # cost relative to cross-entropy on the same dataset
        reference = next(
            (r for r in rows if r["dataset"] == row["dataset"] and r["loss"] == "cross_entropy"),
            None,
        )
        base = reference["seconds_per_epoch_mean"] if reference else math.nan
        row["time_vs_cross_entropy"] = row["seconds_per_epoch_mean"] / base if base else math.nan
    return rows


def _row(rows: list[dict[str, Any]], dataset: str, loss: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["dataset"] == dataset and r["loss"] == loss), None)


# -- claims --------------------------------------------------------------------------------------


def balanced_claim(dataset: DatasetConfig, rows: list[dict[str, Any]]) -> tuple[bool | None, str]:
    """Claim 1 on a label-noise dataset: noised_topk's mean test top-K is within one standard
    deviation over seeds (the larger of the two) of the best other loss's, or above it. Its
    imbalanced sibling is left out of "other": the claim is about the balanced loss against the
    losses people use instead. The text adds the narrower comparison with the best earlier
    top-K loss (smooth_topk_svm) and the epoch time against it."""
    k = dataset.k
    key = f"test_top{k}"
    mine = _row(rows, dataset.name, "noised_topk")
    others = [
        r
        for r in rows
        if r["dataset"] == dataset.name
        and r["loss"] not in ("noised_topk", "noised_topk_imbalanced")
        and not math.isnan(r[f"{key}_mean"])
    ]
    if mine is None or math.isnan(mine[f"{key}_mean"]) or not others:
        return None, "not enough finished runs"
    best = max(others, key=lambda r: r[f"{key}_mean"])
    gap = best[f"{key}_mean"] - mine[f"{key}_mean"]
    tolerance = max(best[f"{key}_std"], mine[f"{key}_std"])
    held = gap <= tolerance
    text = (
        f"noised_topk top-{k} {mine[f'{key}_mean'] * 100:.1f}%; best other loss "
        f"{best['loss']} {best[f'{key}_mean'] * 100:.1f}% "
        f"({-gap * 100:+.1f} points, tolerance {tolerance * 100:.1f})"
    )
    svm = _row(rows, dataset.name, "smooth_topk_svm")
    if svm and not math.isnan(svm[f"{key}_mean"]):
        text += (
            f"; against smooth_topk_svm {(mine[f'{key}_mean'] - svm[f'{key}_mean']) * 100:+.1f}"
            " points"
        )
        if svm["seconds_per_epoch_mean"]:
            ratio = mine["seconds_per_epoch_mean"] / svm["seconds_per_epoch_mean"]
            text += f", epoch time {ratio:.2f}x its"
    return held, text


def long_tail_claim(dataset: DatasetConfig, rows: list[dict[str, Any]]) -> tuple[bool | None, str]:
    """Claim 2 on a long-tailed dataset: noised_topk_imbalanced has a higher mean test macro
    top-K than every baseline of the Pl@ntNet comparison."""
    k = dataset.k
    key = f"test_macro_top{k}_mean"
    mine = _row(rows, dataset.name, "noised_topk_imbalanced")
    if mine is None or math.isnan(mine[key]):
        return None, "not enough finished runs"
    baselines = [
        r
        for r in (_row(rows, dataset.name, name) for name in LONG_TAIL_BASELINES)
        if r is not None and not math.isnan(r[key])
    ]
    beaten_by = [r for r in baselines if r[key] >= mine[key]]
    best_other = max(baselines, key=lambda r: r[key]) if baselines else None
    std = f"test_macro_top{k}_std"
    text = (
        f"noised_topk_imbalanced macro top-{k} {mine[key] * 100:.1f}% (std {mine[std] * 100:.1f})"
    )
    if best_other is not None:
        text += (
            f"; best baseline {best_other['loss']} {best_other[key] * 100:.1f}% "
            f"(std {best_other[std] * 100:.1f}), a margin of "
            f"{(mine[key] - best_other[key]) * 100:+.1f} points"
        )
    if beaten_by:
        names = ", ".join(f"{r['loss']} ({r[key] * 100:.1f}%)" for r in beaten_by)
        text += f"; as good or better: {names}"
    return (not beaten_by) if baselines else None, text


# -- plots ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_curves(
    dataset: DatasetConfig,
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    path: Path,
) -> None:
    """Validation top-K and macro top-K per epoch, mean over seeds, one line per loss."""
    plt = _plt()
    k = dataset.k
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for loss in config.losses:
        runs = final_records(plan, records, dataset.name, loss)
        if not runs:
            continue
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
    count pooled), mean over seeds, one line per loss."""
    plt = _plt()
    k = dataset.k
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for loss in config.losses:
        runs = final_records(plan, records, dataset.name, loss)
        if not runs:
            continue
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


# -- the page ------------------------------------------------------------------------------------


def _machine(records: dict[str, dict[str, Any]]) -> str:
    """The machine's CPUs, memory and GPUs, where the runs trained, and the library versions."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    gpus = torch.cuda.device_count()
    gpu_text = "no GPU"
    if gpus:
        names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(gpus)}))
        gpu_text = f"{gpus} GPU{'s' if gpus > 1 else ''} ({names})"
    # a record without "device" predates the GPU path: it trained on the CPU
    devices = {r.get("device", "cpu") for r in records.values() if r.get("status") == "succeeded"}
    where = " and ".join({"cpu": "the CPU", "cuda": "the GPU"}.get(d, d) for d in sorted(devices))
    return (
        f"{os.cpu_count()} CPU cores ({model}){memory}, {gpu_text}"
        f"{f' (runs trained on {where})' if where else ''}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def run_rows(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    by_name = {d.name: d for d in config.datasets}
    rows = []
    for run in plan.runs.values():
        record = records.get(run.run_id)
        k = by_name[run.dataset].k
        row: dict[str, Any] = {
            "run_id": run.run_id,
            "dataset": run.dataset,
            "loss": run.loss,
            "seed": run.seed,
            "roles": "+".join(sorted(run.roles)),
            "params": _params_text(run.params),
            "status": record.get("status") if record else "not run",
        }
        if record and record.get("status") == "succeeded":
            row["best_epoch"] = record["best_epoch"]
            row["epochs"] = record["epochs"]
            for key in ("top1", f"top{k}", f"macro_top{k}"):
                row[f"val_best_{key}"] = record["val_best"].get(f"val_{key}")
                row[f"test_best_{key}"] = record["test_best"][key]
                row[f"test_final_{key}"] = record["test_final"][key]
            row["seconds_per_epoch"] = record["seconds_per_epoch"]
            row["wall_seconds"] = record["wall_seconds"]
        elif record:
            row["error"] = record.get("error")
        rows.append(row)
    return rows


def write_report(
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    path: Path,
    out: Path,
    *,
    command: str | None = None,
) -> Path:
    """Write the Markdown report at `path` and its assets under `<path stem>/`; returns path."""
    assets = path.parent / path.stem
    assets.mkdir(parents=True, exist_ok=True)
    rows = summarize(config, plan, records)
    _write_csv(assets / "runs.csv", run_rows(config, plan, records))
    _write_csv(assets / "summary.csv", rows)
    timing = _read_timing(out)
    lines = [
        f"# {config.title}",
        "",
        "Generated by `topk experiment` from the run records; do not edit by hand.",
        "",
        "Regenerate (trains every run without a record, then rewrites this page):",
        "",
        "```",
        command or f"topk experiment <config> --report {path}",
        "```",
        "",
        f"- Machine: {_machine(records)}.",
        f"- Generated: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    if timing:
        lines.append(
            f"- Training wall time of the grid: {timing / 60:.0f} min in all "
            f"(datasets, sweeps, {len(plan.runs)} runs and their test-split evaluations; "
            f"{config.concurrency} runs at a time)."
        )
    done = sum(1 for r in plan.runs if records.get(r, {}).get("status") == "succeeded")
    failed = sum(1 for r in plan.runs if records.get(r, {}).get("status") == "failed")
    lines.append(
        f"- Runs: {done} succeeded, {failed} failed, {len(plan.runs) - done - failed} not run."
    )
    lines += _setup_section(config)
    lines += _claims_section(config, rows)
    for dataset in config.datasets:
        lines += _dataset_section(dataset, config, plan, records, rows, assets, path.parent)
    lines += _sweep_section(config, plan, records)
    lines += [
        "## Files",
        "",
        f"- [`{assets.name}/runs.csv`]({assets.name}/runs.csv): one row per run (validation and "
        "test metrics of the best-validation and the last epoch, seconds per epoch).",
        f"- [`{assets.name}/summary.csv`]({assets.name}/summary.csv): the tables above.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def _read_timing(out: Path) -> float:
    """The wall time of every invocation of the grid so far (runner.py's timing.json)."""
    timing = out / "timing.json"
    if not timing.is_file():
        return 0.0
    return float(sum(entry["seconds"] for entry in json.loads(timing.read_text())))


def _setup_section(config: ExperimentConfig) -> list[str]:
    training = config.training
    lines = [
        "",
        "## Setup",
        "",
        f"- Losses: {', '.join(f'`{name}`' for name in config.losses)}; seeds {config.seeds}.",
        f"- Model `{training.get('model', {}).get('arch', '?')}`, trained from scratch; "
        f"optimiser {training.get('optim', {})}; schedule {training.get('schedule', {})}.",
        "- Each run keeps the checkpoint of its best epoch on the validation split (by "
        "validation macro-average top-K) and is tested there: every test figure below is that "
        "checkpoint's. The test split is read only for these figures; sweeps select on the "
        "validation split.",
        "- The held-out splits (validation, test) are balanced and keep their true labels.",
        "- Seconds per epoch are training time only, measured with "
        f"{config.concurrency} runs sharing the machine, so compare them within a dataset.",
        "",
        "| dataset | study | K | epochs | published hyperparameters changed by the sweep |",
        "|---|---|---|---|---|",
    ]
    swept = set(config.sweep.datasets) if config.sweep else set()
    for dataset in config.datasets:
        epochs = config.training_for(dataset).get("epochs", "?")
        sweep = "yes (see Sweeps)" if dataset.name in swept else "no"
        lines.append(
            f"| {dataset.title or dataset.name} | {dataset.study} | {dataset.k} | {epochs} | {sweep} |"
        )
    return lines + [""]


def _claims_section(config: ExperimentConfig, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The paper's claims on these data",
        "",
        "Rules, fixed before looking at the numbers: (1) on balanced training with label noise, "
        "`noised_topk` *matches the best loss* when its mean test top-K accuracy is within one "
        "standard deviation over seeds of the best other loss's (its imbalanced variant left "
        "out); (2) on long-tailed training, "
        "`noised_topk_imbalanced` *beats the usual baselines* when its mean test macro-average "
        f"top-K accuracy is above that of each of {', '.join(LONG_TAIL_BASELINES)}.",
        "",
        "| claim | dataset | held? | figures |",
        "|---|---|---|---|",
    ]
    verdicts = {True: "**held**", False: "**did not hold**", None: "not measured"}
    tally: dict[str, list[bool]] = {"1": [], "2": []}
    for dataset in config.datasets:
        short = [
            r["loss"]
            for r in rows
            if r["dataset"] == dataset.name and r["seeds"] < len(config.seeds)
        ]
        if short:
            lines.append(
                f"| - | {dataset.name} | not measured | runs missing for: {', '.join(short)} |"
            )
            continue
        if dataset.study == "label_noise":
            held, text = balanced_claim(dataset, rows)
            claim = "1: noised top-K matches the best other loss"
        else:
            held, text = long_tail_claim(dataset, rows)
            claim = "2: imbalanced noised top-K beats the baselines on macro top-K"
        lines.append(f"| {claim} | {dataset.name} | {verdicts[held]} | {text} |")
        if held is not None:
            tally[claim[0]].append(held)
    summary = [
        f"claim {number} held on {sum(results)} of {len(results)} datasets"
        for number, results in tally.items()
        if results
    ]
    if summary:
        lines += ["", "In short: " + "; ".join(summary) + "."]
    collapsed = [
        f"`{r['loss']}` on {r['dataset']} ({r['rank1_collapsed']}/{r['seeds']})"
        for r in rows
        if r["rank1_collapsed"]
    ]
    if collapsed:
        lines += [
            "",
            "Rank-1 collapse (one class ranked first for nearly every test image, so top-1 "
            "accuracy is about 1/C while top-K can stay high): " + ", ".join(collapsed) + ".",
        ]
    costs = {}
    for loss in config.losses:
        ratios = [
            r["time_vs_cross_entropy"]
            for r in rows
            if r["loss"] == loss and not math.isnan(r["time_vs_cross_entropy"])
        ]
        if ratios:
            costs[loss] = statistics.fmean(ratios)
    if costs:
        lines += [
            "",
            "Cost (claim 3): training seconds per epoch relative to cross-entropy, mean over "
            "datasets: "
            + ", ".join(f"`{loss}` {ratio:.2f}x" for loss, ratio in costs.items())
            + f". These are wall-clock epochs of {config.concurrency} runs sharing "
            f"{os.cpu_count()} CPU cores, so their spread is large (see the s/epoch columns); `benchmarks/bench_train.py` "
            "measures step time per loss in one quiet process.",
        ]
    return lines + [""]


def _dataset_section(
    dataset: DatasetConfig,
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
    assets: Path,
    page_dir: Path,
) -> list[str]:
    k = dataset.k
    lines = [
        f"## {dataset.title or dataset.name}",
        "",
        f"Test accuracy in % (mean ± std over seeds) of the best-validation checkpoint; "
        f"`{dataset.name}`. *Rank-1 collapse*: seeds whose model ranks one class first for "
        "(nearly) every test image (that class's top-1 recall >= 0.9, every other's <= 0.1).",
        "",
        f"| loss | hyperparameters | seeds | top-1 | top-{k} | macro top-{k} | s/epoch | vs CE "
        "| rank-1 collapse |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in rows if r["dataset"] == dataset.name):
        params = _params_text(row["params"])
        ratio = row["time_vs_cross_entropy"]
        lines.append(
            f"| `{row['loss']}` | {params or '-'} | {row['seeds']} | "
            f"{_fmt(row['test_top1_mean'], row['test_top1_std'])} | "
            f"{_fmt(row[f'test_top{k}_mean'], row[f'test_top{k}_std'])} | "
            f"{_fmt(row[f'test_macro_top{k}_mean'], row[f'test_macro_top{k}_std'])} | "
            f"{_fmt(row['seconds_per_epoch_mean'], row['seconds_per_epoch_std'], 1.0, 2)} | "
            f"{'n/a' if math.isnan(ratio) else f'{ratio:.2f}x'} | "
            f"{row['rank1_collapsed']}/{row['seeds']} |"
        )
    curves = assets / f"curves-{dataset.name}.png"
    plot_curves(dataset, config, plan, records, curves)
    lines += ["", f"![validation curves, {dataset.name}]({curves.relative_to(page_dir)})", ""]
    if dataset.study == "long_tail":
        recall = assets / f"class-recall-{dataset.name}.png"
        plot_class_recall(dataset, config, plan, records, recall)
        lines += [f"![per-class recall, {dataset.name}]({recall.relative_to(page_dir)})", ""]
    return lines


def _sweep_section(
    config: ExperimentConfig, plan: Plan, records: dict[str, dict[str, Any]]
) -> list[str]:
    if config.sweep is None:
        return []
    lines = [
        "## Sweeps",
        "",
        f"Seed {config.sweep.seed}; validation macro-average top-K accuracy (%) at the best "
        "epoch; the chosen values are in bold and are the ones in the tables above.",
        "",
        "| dataset | loss | hyperparameters | val macro top-K |",
        "|---|---|---|---|",
    ]
    by_name = {d.name: d for d in config.datasets}
    finals = {r.run_id for r in plan.runs.values() if "final" in r.roles}
    for (dataset_name, loss), run_ids in plan.sweeps.items():
        metric = by_name[dataset_name].select_metric
        for run_id in run_ids:
            run, record = plan.runs[run_id], records.get(run_id, {})
            value = (record.get("val_best") or {}).get(metric)
            params = _params_text(run.params)
            shown = "n/a" if value is None else f"{value * 100:.1f}"
            if run_id in finals:
                params, shown = f"**{params}**", f"**{shown}**"
            lines.append(f"| {dataset_name} | `{loss}` | {params} | {shown} |")
    return lines + [""]
