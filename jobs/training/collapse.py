"""Rank-1 collapse, detected live: a top-K hinge loss only asks the true class to beat the
(K+1)-th score, so a model trained from scratch on long-tailed data can rank one head class
first for every input (top-1 accuracy about 1/C while top-K stays high).

Each epoch's evaluation counts the top-1 predictions per class on the device with the hit
counts (topk.metrics.TopKCounts, read once per evaluation: no host sync per step), and the
epoch's metrics get:
- `val_collapse_share`: the share of validation images whose top-1 prediction is the
  most-predicted class (near 1/C for a healthy model on balanced data, 1.0 in a full collapse);
- `val_collapse_class`: that class;
- `collapse_warning`: whether the share exceeds `metrics.collapse_share`; rank 0 then prints a
  warning line to the job's log, and result.json lists the flagged epochs under `warnings`
  (`jobs.contract.run_files.collapse_warnings`, which the service also shows live).
"""

from __future__ import annotations

import sys
from typing import Any

from topk.metrics import TopKCounts


def collapse_metrics(counts: TopKCounts, threshold: float) -> dict[str, Any]:
    """The epoch's collapse entries from its validation counts; `threshold` is
    `metrics.collapse_share`."""
    share = counts.collapse_share()
    return {
        "val_collapse_share": share,
        "val_collapse_class": counts.most_predicted(),
        "collapse_warning": bool(share > threshold),  # False for NaN (no validation sample)
    }


def warning_text(metrics: dict[str, Any], threshold: float) -> str:
    return (
        f"warning: rank-1 collapse at epoch {metrics['epoch']}: class "
        f"{metrics['val_collapse_class']} is the top-1 prediction for "
        f"{metrics['val_collapse_share']:.0%} of the validation images "
        f"(above metrics.collapse_share {threshold:g})"
    )


def print_warning(metrics: dict[str, Any], threshold: float) -> None:
    """Write the epoch's warning line to the log (stderr), when the epoch is flagged."""
    if metrics.get("collapse_warning"):
        print(warning_text(metrics, threshold), file=sys.stderr, flush=True)
