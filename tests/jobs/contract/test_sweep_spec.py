"""Sweep spec: searched paths exist, every value gives a valid training spec, trials apply."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.contract.spec_files import format_validation_error, parse_sweep_spec
from jobs.contract.sweep import Domain, SweepSpec, apply_params
from jobs.contract.train import SpecError, TrainSpec

TRAIN = {
    "data": {
        "train": "/data/omniglot/dataset.json",
        "val": "/data/omniglot/dataset.json",
        "num_classes": 136,
    },
    "loss": {"name": "noised_topk", "k": 5, "epsilon": 1.0},
    "epochs": 4,
}


def sweep_dict(search: dict, **fields: object) -> dict:
    return {"train": TRAIN, "search": search, **fields}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_sweep_spec(raw)
    return format_validation_error(info.value)


def test_a_valid_sweep_keeps_its_domains():
    sweep = parse_sweep_spec(
        sweep_dict(
            {
                "loss.epsilon": {"loguniform": [0.01, 1.0]},
                "loss.k": {"grid": [1, 3, 5]},
                "optim.lr": {"uniform": [0.01, 0.1]},
                "loss.n_samples": {"choice": [1, 5, 10]},
            },
            num_samples=2,
            scheduler={"name": "asha", "grace_period": 2},
        )
    )
    assert [d.kind for d in sweep.search.values()] == ["loguniform", "grid", "uniform", "choice"]
    assert sweep.metric == "val_top5" and sweep.mode == "max"
    assert sweep.scheduler.grace_period == 2
    assert SweepSpec.model_validate(sweep.model_dump(mode="json")) == sweep


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({}, "give exactly one of grid, choice, uniform, loguniform; got none"),
        (
            {"grid": [1], "choice": [2]},
            "give exactly one of grid, choice, uniform, loguniform; got grid, choice",
        ),
        ({"uniform": [1.0, 0.5]}, "uniform needs lo < hi, got [1.0, 0.5]"),
        ({"loguniform": [0.0, 1.0]}, "loguniform needs lo > 0, got 0.0"),
        ({"grid": []}, "List should have at least 1 item"),
        ({"random": [1, 2]}, "unknown field"),
    ],
)
def test_malformed_domains_name_the_searched_path(domain, message):
    [line] = problems_of(sweep_dict({"loss.epsilon": domain}))
    assert line.startswith("search.loss.epsilon")
    assert message in line


def test_searched_paths_must_exist_in_the_training_spec():
    lines = problems_of(
        sweep_dict(
            {
                "optim.learning_rate": {"grid": [0.1]},
                "loss.max_m": {"grid": [0.1]},
                "epochs.x": {"grid": [1]},
            }
        )
    )
    assert lines == [
        "search.optim.learning_rate: not a field of the training spec "
        "(optim has: name, lr, momentum, weight_decay, nesterov)",
        "search.loss.max_m: not a field of the training spec "
        "(loss 'noised_topk' has: name, k, epsilon, n_samples, sampler, ce_warmup_epochs, "
        "ce_weight)",
        "search.epochs.x: not a field of the training spec (epochs has no fields)",
    ]


def test_every_value_and_bound_must_give_a_valid_training_spec():
    lines = problems_of(
        sweep_dict(
            {
                "loss.k": {"grid": [5, 136, 0]},
                "loss.epsilon": {"uniform": [-1.0, 1.0]},
                "loss.n_samples": {"uniform": [1, 10]},
            }
        )
    )
    assert lines == [
        "search.loss.k.grid[1]: loss.k: k + 1 = 137 exceeds data.num_classes = 136",
        "search.loss.k.grid[2]: loss.k: Input should be greater than or equal to 1 (got 0)",
        "search.loss.epsilon.uniform[0]: loss.epsilon: Input should be greater than 0 (got -1.0)",
        "search.loss.n_samples: uniform draws real numbers (like 3.86479) that loss.n_samples "
        "does not take; for an integer field use grid or choice",
    ]


def test_the_sweep_metric_and_scheduler_fit_the_training_spec():
    lines = problems_of(
        sweep_dict(
            {"loss.epsilon": {"grid": [0.1]}},
            metric="val_top3",
            scheduler={"grace_period": 5},
        )
    )
    assert lines == [
        "metric: 'val_top3' is not reported; choose one of: train_loss, val_top1, "
        "val_macro_top1, val_top5, val_macro_top5",
        "scheduler.grace_period: 5 exceeds train.epochs = 4",
    ]
    lines = problems_of(sweep_dict({"loss.epsilon": {"grid": [0.1]}}, metric="train_loss"))
    assert lines == ["metric: train_loss is minimised: set mode to 'min'"]


def test_errors_inside_the_base_spec_carry_the_train_prefix():
    raw = sweep_dict({"loss.epsilon": {"grid": [0.1]}})
    raw["train"] = {**TRAIN, "loss": {"name": "noised_topk", "k": 200}}
    assert problems_of(raw) == ["train.loss.k: k + 1 = 201 exceeds data.num_classes = 136"]
    raw["train"] = {**TRAIN, "optim": {"lr": 0}}
    assert problems_of(raw) == [
        "train.optim.lr: Input should be greater than 0 (got 0)",
    ]


def test_apply_params_sets_dotted_paths_and_revalidates():
    base = TrainSpec.model_validate(TRAIN)
    trial = apply_params(base, {"loss.epsilon": 0.05, "optim.lr": 0.02, "loss.k": 3})
    assert (trial.loss.epsilon, trial.optim.lr, trial.loss.k) == (0.05, 0.02, 3)
    assert base.loss.epsilon == 1.0  # the base spec is untouched
    with pytest.raises(ValidationError):
        apply_params(base, {"loss.k": 500})
    with pytest.raises(SpecError, match="optim.beta: not a field"):
        apply_params(base, {"optim.beta": 0.9})


def test_switching_the_loss_drops_its_foreign_fields_and_resets_the_head():
    base = TrainSpec.model_validate(
        {**TRAIN, "loss": {"name": "noised_topk_imbalanced", "class_counts": [3] * 136}}
    )
    assert base.model.cosine_head is True
    to_ce = apply_params(base, {"loss.name": "cross_entropy", "loss.epsilon": 0.3})
    assert to_ce.loss.name == "cross_entropy" and to_ce.model.cosine_head is False
    to_ldam = apply_params(base, {"loss.name": "ldam"})
    assert to_ldam.loss.class_counts == [3] * 136 and to_ldam.loss.max_m == 0.2
    assert to_ldam.model.cosine_head is True


def test_a_trial_built_from_the_base_specs_dict_matches_the_one_from_the_model():
    base = TrainSpec.model_validate(
        {**TRAIN, "loss": {"name": "noised_topk_imbalanced", "class_counts": [3] * 136}}
    )
    raw = base.model_dump(mode="json")
    before = json.dumps(raw, sort_keys=True)
    for params in (
        {"loss.epsilon": 0.05, "optim.lr": 0.02},
        {"loss.name": "cross_entropy", "loss.epsilon": 0.3},
        {"loss.name": "ldam"},
    ):
        assert apply_params(raw, params) == apply_params(base, params), params
    assert json.dumps(raw, sort_keys=True) == before  # the base dict is untouched


def test_a_loss_name_choice_is_checked_value_by_value():
    raw = sweep_dict({"loss.name": {"choice": ["noised_topk", "ldam", "hinge", ["ldam"]]}})
    lines = problems_of(raw)
    assert lines[0].startswith("search.loss.name.choice[2]: loss.name: unknown loss 'hinge'")
    assert lines[1].startswith("search.loss.name.choice[3]: loss.name:")
    assert len(lines) == 2


def test_domains_become_tune_search_spaces():
    from ray import tune

    assert Domain(grid=[1, 2]).to_tune() == tune.grid_search([1, 2])
    assert isinstance(Domain(choice=["a", "b"]).to_tune(), tune.search.sample.Categorical)
    space = Domain(loguniform=(0.01, 1.0)).to_tune()
    assert (space.lower, space.upper) == (0.01, 1.0)
    assert isinstance(space.sampler, tune.search.sample.LogUniform)
    assert isinstance(Domain(uniform=(0.0, 1.0)).to_tune().sampler, tune.search.sample.Uniform)


def test_a_dumped_domain_holds_only_its_kind():
    sweep = parse_sweep_spec(sweep_dict({"loss.epsilon": {"uniform": [0.1, 1.0]}}))
    assert sweep.model_dump(mode="json")["search"] == {"loss.epsilon": {"uniform": [0.1, 1.0]}}
