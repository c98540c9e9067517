"""One rule picks every best record (a run's best epoch, the checkpoints it keeps, a sweep's
best trial, an experiment's sweep winner): finite scores only, ties to the earlier record."""

from __future__ import annotations

import math

import pytest

from jobs.contract.selection import best_by_metric, is_score, rank_by_metric

HISTORY = [
    {"epoch": 1, "val_top5": 0.2, "train_loss": 2.0},
    {"epoch": 2, "val_top5": 0.5, "train_loss": 1.0},
    {"epoch": 3, "val_top5": 0.5, "train_loss": 1.0},
    {"epoch": 4, "val_top5": 0.4, "train_loss": 0.5},
]


def test_max_and_min_rank_best_first_and_ties_go_to_the_earliest():
    ranked = rank_by_metric(HISTORY, "val_top5", "max")
    assert [r["epoch"] for r in ranked] == [2, 3, 4, 1]
    assert [r["epoch"] for r in rank_by_metric(HISTORY, "train_loss", "min")] == [4, 2, 3, 1]
    assert best_by_metric(HISTORY, "val_top5", "max")["epoch"] == 2


def test_records_without_a_finite_score_are_left_out():
    records = [
        {"epoch": 1},
        {"epoch": 2, "m": None},
        {"epoch": 3, "m": math.nan},
        {"epoch": 4, "m": math.inf},
        {"epoch": 5, "m": True},
        {"epoch": 6, "m": "0.9"},
        {"epoch": 7, "m": 3},
    ]
    assert [r["epoch"] for r in rank_by_metric(records, "m", "max")] == [7]
    assert best_by_metric(records[:6], "m", "max") is None
    assert [is_score(v) for v in (1, 0.5, -2.0, math.nan, False, None)] == [
        True, True, True, False, False, False
    ]  # fmt: skip


def test_metrics_can_live_inside_the_record():
    trials = [
        {"trial_id": "a", "metrics": {"val_top5": 0.3}},
        {"trial_id": "b", "metrics": {}},
        {"trial_id": "c", "metrics": {"val_top5": 0.7}},
    ]
    best = best_by_metric(trials, "val_top5", "max", metrics_of=lambda t: t["metrics"])
    assert best["trial_id"] == "c"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'best'"):
        rank_by_metric(HISTORY, "val_top5", "best")  # type: ignore[arg-type]
