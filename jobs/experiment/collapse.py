"""The report's rank-1 collapse section: which arms failed or collapsed on which dataset, the
live signal (each epoch's `val_collapse_share`, jobs/training/collapse.py), and the
cross-entropy remedies (`loss.ce_warmup_epochs`, `loss.ce_weight`) against the same loss
without them, paired by seed."""

from __future__ import annotations

import math
from typing import Any

from jobs.contract.loss import CrossEntropyRemedyMixin
from jobs.experiment.claims import paired
from jobs.experiment.config import ExperimentConfig
from jobs.experiment.plan import Plan
from jobs.experiment.summary import COLLAPSE_SHARE, final_runs, row_of, seed_values

REMEDY_FIELDS = CrossEntropyRemedyMixin.runtime_fields


def remedy_base(config: ExperimentConfig, arm: str) -> str | None:
    """The arm that is `arm` without its cross-entropy remedy (same loss, same other
    hyperparameters); None when `arm` has no remedy or no such arm exists."""
    params = config.params_of(arm)
    if not any(params.get(name) for name in REMEDY_FIELDS):
        return None
    bare = {k: v for k, v in params.items() if k not in REMEDY_FIELDS}
    for other in config.losses:
        other_params = config.params_of(other)
        if (
            other != arm
            and config.loss_of(other) == config.loss_of(arm)
            and not any(other_params.get(name) for name in REMEDY_FIELDS)
            and {k: v for k, v in other_params.items() if k not in REMEDY_FIELDS} == bare
        ):
            return other
    return None


def _worst_share(records: list[dict[str, Any]]) -> float:
    """The highest validation collapse share of any epoch of these runs."""
    shares = [
        e["val_collapse_share"]
        for r in records
        for e in r.get("history", [])
        if isinstance(e.get("val_collapse_share"), float)
    ]
    return max(shares, default=math.nan)


def collapse_section(
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> list[str]:
    lines = [
        "## Rank-1 collapse and failed runs",
        "",
        "Each epoch of every run reports `val_collapse_share`, the share of validation images "
        "whose top-1 prediction is the most-predicted class (near 1/C for a healthy model); a "
        "job warns in its log, metrics and result when it passes `metrics.collapse_share` "
        f"(default 0.5). A run is *collapsed* when its test share is at least {COLLAPSE_SHARE:.0%}"
        " (Rules above). Arms with a failed or collapsed seed:",
        "",
        "| dataset | arm | seeds trained | failed | collapsed | highest validation share | "
        "test top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    flagged = [r for r in rows if r["failed"] or r["collapsed"]]
    for row in flagged:
        runs = final_runs(plan, row["dataset"], row["arm"])
        share = _worst_share([records[r.run_id] for r in runs if r.run_id in records])
        lines.append(
            f"| {row['dataset']} | `{row['arm']}` | {row['seeds']}/{row['planned']} | "
            f"{row['failed']} | {row['collapsed']} | "
            f"{'n/a' if math.isnan(share) else f'{share:.2f}'} | "
            f"{_percent(row['test_top1_mean'])} |"
        )
    if not flagged:
        lines.append("| - | none | | | | | |")
    return lines + [""] + _remedy_lines(config, plan, records, rows)


def _remedy_lines(
    config: ExperimentConfig,
    plan: Plan,
    records: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> list[str]:
    pairs = [(arm, base) for arm in config.losses if (base := remedy_base(config, arm))]
    if not pairs:
        return [
            "No arm of this grid tests a remedy (`loss.ce_warmup_epochs`, `loss.ce_weight`).",
            "",
        ]
    lines = [
        "Remedies: each remedy arm against the same loss without it, paired by seed (points).",
        "",
        "| dataset | remedy | without | collapsed (with / without) | top-1 | macro top-K |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in config.datasets:
        arms = config.arms_for(dataset)
        for arm, base in pairs:
            if arm not in arms or base not in arms:
                continue
            mine, theirs = row_of(rows, dataset.name, arm), row_of(rows, dataset.name, base)
            diffs = [
                paired(
                    seed_values(plan, records, dataset.name, arm, key),
                    seed_values(plan, records, dataset.name, base, key),
                ).text()
                for key in ("top1", f"macro_top{dataset.k}")
            ]
            collapsed = (
                f"{mine['collapsed'] if mine else '?'} / {theirs['collapsed'] if theirs else '?'}"
            )
            lines.append(
                f"| {dataset.name} | `{arm}` | `{base}` | {collapsed} | {diffs[0]} | {diffs[1]} |"
            )
    return lines + [""]


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.1f}%"
