"""Per-arm learning rate selection: every learning rate of the grid runs with seed 0 only, the
one with the best validation macro top-K wins (failed candidates ignored, the first on a tie),
the other seeds run with it, and seed 0's final run is the winner's own run; the report's
Selection table shows the candidates and the choice. Arms (a named loss with its
hyperparameters) keep their own runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.experiment.report import _selection_section

GRID = [0.01, 0.03, 0.1]


def _config(dataset_entry, **extra) -> dict:
    return {
        "seeds": [0, 1, 2],
        "lr_selection": {"grid": GRID, "seed": 0},
        "losses": {
            "cross_entropy": {},
            "svm_tau1": {"loss": "smooth_topk_svm", "tau": 1.0},
        },
        "datasets": [dataset_entry("d")],
        **extra,
    }


def _candidates(plan, arm: str) -> dict[float, str]:
    return {plan.runs[r].lr: r for r in plan.sweeps[("d", arm)]}


def test_each_arm_picks_its_best_validation_lr_of_seed_0_and_reuses_it(
    make_plan, dataset_entry, make_record, finals
):
    config, plan = make_plan(_config(dataset_entry))
    assert {run.seed for run in plan.runs.values()} == {0}  # only the candidates so far
    assert len(plan.runs) == 6 and plan.release_finals({}) == []
    ce, svm = _candidates(plan, "cross_entropy"), _candidates(plan, "svm_tau1")
    assert set(ce) == set(svm) == set(GRID)
    assert plan.runs[svm[0.1]].loss == "smooth_topk_svm" and plan.runs[svm[0.1]].params == {
        "tau": 1.0
    }
    assert plan.runs[ce[0.03]].spec["optim"]["lr"] == 0.03
    validation = {  # cross-entropy does best at 0.03, the SVM at 0.1
        ce[0.01]: 0.50,
        ce[0.03]: 0.70,
        ce[0.1]: 0.60,
        svm[0.01]: 0.20,
        svm[0.03]: 0.40,
        svm[0.1]: 0.65,
    }
    records = {r: make_record(plan.runs[r], 5, val=v) for r, v in validation.items()}
    added = plan.release_finals(records)
    assert len(added) == 6  # seeds 0, 1, 2 of both arms; seed 0 is the winner's run
    ce_finals, svm_finals = finals(plan, "d", "cross_entropy"), finals(plan, "d", "svm_tau1")
    assert {run.lr for run in ce_finals.values()} == {0.03}
    assert {run.lr for run in svm_finals.values()} == {0.1}
    assert ce_finals[0].run_id == ce[0.03] and plan.runs[ce[0.03]].roles == {"sweep", "final"}
    assert all(run.roles == {"final"} for seed, run in ce_finals.items() if seed)
    assert plan.winner("d", "cross_entropy").run_id == ce[0.03]
    assert plan.release_finals(records) == []  # only once

    text = "\n".join(_selection_section(config, plan, records))
    assert (
        "| d | `cross_entropy` | lr 0.01: 50.0; **lr 0.03: 70.0**; lr 0.1: 60.0 | lr 0.03 |" in text
    )
    assert (
        "| d | `svm_tau1` | lr 0.01: 20.0; lr 0.03: 40.0; **lr 0.1: 65.0** | lr 0.1 (edge) |"
        in (text)
    )


def test_failed_candidates_lose_and_ties_go_to_the_first(
    make_plan, dataset_entry, make_record, finals
):
    _, plan = make_plan(_config(dataset_entry, losses={"cross_entropy": {}}))
    ce = _candidates(plan, "cross_entropy")
    records = {
        ce[0.01]: make_record(plan.runs[ce[0.01]], 5, val=0.6),
        ce[0.03]: make_record(plan.runs[ce[0.03]], 5, val=0.6),
        ce[0.1]: make_record(plan.runs[ce[0.1]], 5, val=0.9, status="failed"),
    }
    plan.release_finals(records)
    assert {run.lr for run in finals(plan, "d", "cross_entropy").values()} == {0.01}


def test_when_every_candidate_failed_the_configured_lr_is_used(
    make_plan, dataset_entry, make_record, finals
):
    _, plan = make_plan(_config(dataset_entry, losses={"cross_entropy": {}}))
    records = {
        r: make_record(plan.runs[r], 5, status="failed")
        for r in plan.sweeps[("d", "cross_entropy")]
    }
    plan.release_finals(records)
    assert {run.lr for run in finals(plan, "d", "cross_entropy").values()} == {0.05}
    assert plan.winner("d", "cross_entropy") is None


def test_an_arm_can_have_its_own_grid(make_plan, dataset_entry):
    config = _config(dataset_entry)
    config["lr_selection"]["grids"] = {"svm_tau1": [0.1, 0.3, 1.0]}
    _, plan = make_plan(config)
    assert [plan.runs[r].lr for r in plan.sweeps[("d", "svm_tau1")]] == [0.1, 0.3, 1.0]
    assert [plan.runs[r].lr for r in plan.sweeps[("d", "cross_entropy")]] == GRID
    config["lr_selection"]["grids"] = {"svm": [0.1, 1.0]}
    with pytest.raises(ValueError, match="lr_selection.grids names unknown arms"):
        make_plan(config)


def test_the_lr_grid_multiplies_a_sweep(make_plan, dataset_entry):
    config = _config(
        dataset_entry,
        losses={"noised_topk": {"epsilon": 1.0, "n_samples": 2}},
        sweep={"datasets": ["d"], "space": {"noised_topk": {"epsilon": [1.0, 0.2]}}},
    )
    _, plan = make_plan(config)
    candidates = [plan.runs[r] for r in plan.sweeps[("d", "noised_topk")]]
    assert [(c.params["epsilon"], c.lr) for c in candidates] == [
        (e, lr) for e in (1.0, 0.2) for lr in GRID
    ]


def test_without_lr_selection_every_seed_runs_at_once_with_the_configured_lr(
    make_plan, dataset_entry
):
    config = _config(dataset_entry)
    del config["lr_selection"]
    _, plan = make_plan(config)
    assert not plan.sweeps and len(plan.runs) == 6
    assert {run.lr for run in plan.runs.values()} == {0.05}


@pytest.mark.parametrize("name", ["paper.yaml", "paper-cpu.yaml"])
def test_the_shipped_configs_plan(make_plan, name):
    """Each shipped experiment is planned in full (every spec validated): every arm of every
    dataset has its learning rate selection, and the claims name arms that run."""
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[3] / "experiments" / name).read_text())
    for dataset in raw["datasets"]:
        dataset["source"] = "unused"
    config, plan = make_plan(raw)
    pairs = {(d.name, arm) for d in config.datasets for arm in config.arms_for(d)}
    assert set(plan.sweeps) == pairs
    grids = {pair: config.lr_selection.grid_for(pair[1]) for pair in pairs}
    assert {pair: [plan.runs[r].lr for r in ids] for pair, ids in plan.sweeps.items()} == grids
    assert all(len(grid) == 4 for grid in grids.values())
    assert len(config.seeds) == (5 if config.reduced is None else 3)
    claimed = config.claims.label_noise.methods + config.claims.long_tail.methods
    assert all(any(arm in config.arms_for(d) for d in config.datasets) for arm in claimed)
