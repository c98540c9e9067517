"""Failed runs apart from collapsed ones: a run that crashed or never rose above chance is
failed (counted apart, out of the means), a trained run whose checkpoint gives one class half
of the test top-1 predictions is collapsed (in the means, counted)."""

from __future__ import annotations

import math

import pytest

from jobs.experiment.summary import (
    chance_level,
    never_trained,
    rank1_collapsed,
    run_outcome,
    summarize,
)


def _history(k: int, values: list[float]) -> list[dict]:
    return [{"epoch": e, f"val_top{k}": v} for e, v in enumerate(values, start=1)]


def test_chance_is_k_over_c_plus_two_standard_errors():
    assert chance_level(5, 100, 400) == pytest.approx(0.05 + 2 * math.sqrt(0.05 * 0.95 / 400))
    assert chance_level(2, 10, 0) == 0.2


def test_a_run_whose_best_epoch_is_the_first_at_chance_never_trained():
    # 10 classes, K = 2, 2,000 validation images: chance 0.2, threshold about 0.218
    at_chance = {"val_samples": 2000, "history": _history(2, [0.21, 0.2, 0.19, 0.2])}
    assert never_trained(at_chance, 2, 10)
    learning = {"val_samples": 2000, "history": _history(2, [0.21, 0.35, 0.6])}
    assert not never_trained(learning, 2, 10)
    # a collapsed model keeps its top-2 above chance: one slot is free, the other learned
    collapsed = {"val_samples": 2000, "history": _history(2, [0.4, 0.55])}
    assert not never_trained(collapsed, 2, 10)
    assert not never_trained({"history": []}, 2, 10)  # nothing measured: not this rule


def test_collapse_is_one_class_taking_half_of_the_test_top1_predictions():
    assert rank1_collapsed({"test_best": {"collapse_share": 0.5}})
    assert rank1_collapsed({"test_best": {"collapse_share": 0.93}})
    assert not rank1_collapsed({"test_best": {"collapse_share": 0.49}})
    # records from before the share was measured: the per-class recall rule
    assert rank1_collapsed({"test_best": {"class_recall_top1": [1.0, 0.0, 0.05, 0.0]}})
    assert not rank1_collapsed({"test_best": {"class_recall_top1": [1.0, 0.3, 0.0, 0.0]}})
    assert not rank1_collapsed({"test_best": {"class_recall_top1": [0.8, 0.0, 0.0, 0.0]}})
    assert not rank1_collapsed({"status": "failed"})


def test_outcomes():
    trained = {
        "status": "succeeded",
        "val_samples": 2000,
        "history": _history(2, [0.3, 0.7]),
        "test_best": {"collapse_share": 0.12},
    }
    assert run_outcome(None, 2, 10) == "not run"
    assert run_outcome({"status": "failed", "error": "nan"}, 2, 10) == "crashed"
    assert run_outcome(trained, 2, 10) == "trained"
    collapsed = {**trained, "test_best": {"collapse_share": 0.9}}
    assert run_outcome(collapsed, 2, 10) == "collapsed"
    # a model that puts one class first and never learned the rest is failed, not collapsed
    at_chance = {**collapsed, "history": _history(2, [0.2, 0.19])}
    assert run_outcome(at_chance, 2, 10) == "never trained"


def test_failed_runs_leave_the_means_and_collapsed_ones_stay(
    make_plan, dataset_entry, make_record, finals
):
    config, plan = make_plan(
        {"seeds": [0, 1, 2, 3], "losses": {"noised_topk": {}}, "datasets": [dataset_entry("d")]},
        num_classes=10,
    )
    runs = finals(plan, "d", "noised_topk")
    records = {
        runs[0].run_id: make_record(runs[0], 5, test=0.9, val=0.8),
        runs[1].run_id: make_record(runs[1], 5, test=0.7, val=0.8, share=0.8),  # collapsed
        runs[2].run_id: make_record(runs[2], 5, test=0.5, val=0.5),  # chance: 5 of 10
        runs[3].run_id: make_record(runs[3], 5, status="failed"),
    }
    (row,) = summarize(config, plan, records)
    assert (row["seeds"], row["planned"], row["failed"], row["collapsed"]) == (2, 4, 2, 1)
    assert row["test_top5_mean"] == pytest.approx(0.8)  # seeds 0 and 1


def test_seeds_whose_best_epoch_is_in_the_cross_entropy_warm_up_are_counted(
    make_plan, dataset_entry, make_record, finals
):
    """A loss trained after a cross-entropy warm-up whose best checkpoint falls within the
    warm-up was a cross-entropy model there: the row counts those seeds (the report says so)."""
    arm = {"loss": "noised_topk", "ce_warmup_epochs": 2}
    config, plan = make_plan(
        {"seeds": [0, 1, 2], "losses": {"warm": arm, "noised_topk": {}},
         "datasets": [dataset_entry("d")]},
        num_classes=10,
    )  # fmt: skip
    records = {}
    for arm_name in ("warm", "noised_topk"):
        for seed, run in finals(plan, "d", arm_name).items():
            records[run.run_id] = make_record(run, 5, test=0.8, val=0.7, best_epoch=[2, 1, 3][seed])
    rows = {row["arm"]: row for row in summarize(config, plan, records)}
    assert rows["warm"]["best_epoch_in_warmup"] == 2  # epochs 2 and 1; epoch 3 is the loss's
    assert rows["noised_topk"]["best_epoch_in_warmup"] == 0  # no warm-up: nothing to count
