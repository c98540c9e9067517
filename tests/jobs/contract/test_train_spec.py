"""Training spec: defaults, cross-field rules with field paths, URL allow-list, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.contract.spec_files import format_validation_error, parse_train_spec
from jobs.contract.train import (
    ARCHITECTURES,
    SpecError,
    TrainSpec,
    format_path,
    reported_metrics,
)

DATA = {"train": "/data/omniglot/dataset.json", "val": "/data/omniglot/dataset.json"}


def spec_dict(num_classes: int = 136, **fields: object) -> dict:
    return {"data": {**DATA, "num_classes": num_classes}, **fields}


def problems_of(raw: dict, context: dict | None = None) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_train_spec(raw, context=context)
    return format_validation_error(info.value)


def test_defaults_give_a_complete_valid_spec():
    spec = parse_train_spec(spec_dict())
    assert spec.loss.name == "noised_topk" and spec.loss.k == 5
    assert spec.model.cosine_head is False
    assert spec.metrics.ks == [1, 5] and spec.metrics.select == "val_top5"
    assert spec.scaling.num_workers == 1 and spec.max_failures == 0 and spec.amp is True
    # The dump is itself a valid spec (what the service stores and the workers re-validate).
    again = TrainSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec


def test_k_plus_one_must_not_exceed_num_classes():
    assert problems_of(spec_dict(loss={"name": "noised_topk", "k": 136})) == [
        "loss.k: k + 1 = 137 exceeds data.num_classes = 136"
    ]
    assert parse_train_spec(spec_dict(loss={"name": "noised_topk", "k": 135})).loss.k == 135


def test_every_cross_field_problem_is_reported_at_once():
    raw = spec_dict(
        num_classes=4,
        loss={"name": "ldam", "class_counts": [1, 2, 3]},
        model={"cosine_head": False},
        metrics={"ks": [1, 5, 3], "select": "val_macro_top3"},
        optim={"name": "adamw", "nesterov": True},
        schedule={"warmup_epochs": 2},
        epochs=2,
    )
    assert problems_of(raw) == [
        "loss.class_counts: has 3 counts but data.num_classes = 4",
        "model.cosine_head: loss 'ldam' applies its margins and scale to cosine scores: "
        "it needs cosine_head true (or unset)",
        "metrics.ks[1]: top-5 accuracy needs k <= data.num_classes = 4",
        "schedule.warmup_epochs: 2 warmup epochs leave no epoch to train (epochs = 2)",
        "optim.nesterov: only SGD has Nesterov momentum, not adamw",
    ]


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ({"name": "noised_topk_imbalanced"}, True),
        ({"name": "ldam"}, True),
        ({"name": "noised_topk"}, False),
        ({"name": "logit_adjusted"}, False),
        ({"name": "cross_entropy"}, False),
    ],
)
def test_cosine_head_follows_the_loss_when_unset(loss, expected):
    assert parse_train_spec(spec_dict(loss=loss)).model.cosine_head is expected
    assert parse_train_spec(spec_dict(loss=loss, model={"cosine_head": expected}))


def test_cosine_head_with_a_loss_without_scale_is_an_error():
    raw = spec_dict(loss={"name": "cross_entropy"}, model={"cosine_head": True})
    [line] = problems_of(raw)
    assert line.startswith("model.cosine_head: a cosine head gives scores in [-1, 1]")


def test_metric_selection_must_be_a_reported_metric():
    [line] = problems_of(spec_dict(metrics={"ks": [1, 3], "select": "val_top5"}))
    assert line == (
        "metrics.select: 'val_top5' is not reported; choose one of: train_loss, val_top1, "
        "val_macro_top1, val_top3, val_macro_top3"
    )
    no_val = {"data": {"train": DATA["train"], "num_classes": 10}}
    [line] = problems_of(no_val)
    assert line == (
        "metrics.select: 'val_top5' needs a validation split (data.val is not set); "
        "set data.val, or select train_loss with mode 'min'"
    )
    assert parse_train_spec({**no_val, "metrics": {"select": "train_loss", "mode": "min"}})
    [line] = problems_of({**no_val, "metrics": {"select": "train_loss"}})
    assert line == "metrics.select: train_loss is minimised: set mode to 'min'"


def test_reported_metrics_names_match_the_metrics_file_contract():
    assert reported_metrics([1, 5], has_val=True) == [
        "train_loss",
        "val_top1",
        "val_macro_top1",
        "val_top5",
        "val_macro_top5",
    ]


def test_field_errors_name_the_path_and_the_value():
    raw = spec_dict(loss={"name": "noised_topk", "k": 0, "epsilon": -1}, epochs=0)
    assert problems_of(raw) == [
        "loss.k: Input should be greater than or equal to 1 (got 0)",
        "loss.epsilon: Input should be greater than 0 (got -1)",
        "epochs: Input should be greater than or equal to 1 (got 0)",
    ]


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        (
            {"data": {**DATA, "num_classes": 136, "augment": {"mean": [float("nan")]}}},
            "data.augment.mean[0]",
        ),
        (
            {"data": {**DATA, "num_classes": 136, "augment": {"std": [float("inf")]}}},
            "data.augment.std[0]",
        ),
        ({"seed": 2**70}, "seed"),
        ({"checkpoint": {"keep_last": 2**62}}, "checkpoint.keep_last"),
        ({"max_failures": 2**40}, "max_failures"),
        ({"scaling": {"cpus_per_worker": 1e308}}, "scaling.cpus_per_worker"),
        ({"scaling": {"use_gpu": True, "gpus_per_worker": 10_000.0}}, "scaling.gpus_per_worker"),
    ],
)
def test_values_that_only_the_worker_would_refuse_are_refused_here(fields, path):
    """NaN normalisation trained to an infinite loss that "succeeded"; a 2**70 seed and the like
    failed in the worker, after the job was accepted."""
    problems = problems_of(spec_dict(**fields))
    assert any(problem.startswith(f"{path}:") for problem in problems), problems


def test_unknown_fields_suggest_the_right_one():
    [line] = problems_of(spec_dict(optim={"learning_rate": 0.1}))
    assert line == (
        "optim.learning_rate: unknown field; did you mean 'lr'? "
        "valid fields: name, lr, momentum, weight_decay, nesterov"
    )
    [line] = problems_of(spec_dict(loss={"name": "noised_topk", "eps": 0.1}))
    assert line.startswith("loss.eps: unknown field; did you mean 'epsilon'?")
    [line] = problems_of(spec_dict(epoch=3))
    assert line.startswith("epoch: unknown field; did you mean 'epochs'?")


def test_unknown_loss_names_list_the_valid_ones():
    [line] = problems_of(spec_dict(loss={"name": "hinge"}))
    assert line == (
        "loss.name: unknown loss 'hinge'; valid choices: cross_entropy, focal, ldam, "
        "logit_adjusted, noised_topk, noised_topk_imbalanced, smooth_topk_svm, topk_hinge"
    )


def test_unknown_architecture_is_refused():
    [line] = problems_of(spec_dict(model={"arch": "vit_h14"}))
    assert line.startswith("model.arch: Input should be 'cifar_resnet20'")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_run_names_cannot_walk_the_storage_tree(name):
    [line] = problems_of(spec_dict(name=name))
    assert line.startswith("name: String should match pattern")


def test_pipe_and_unlisted_protocols_are_refused_with_their_field_path():
    raw = spec_dict()
    raw["data"]["train"] = ["shards/a.tar", "pipe:cat /etc/passwd"]
    [line] = problems_of(raw)
    assert line.startswith("data.train: refused URL 'pipe:cat /etc/passwd'")
    raw = spec_dict(storage="ftp://host/runs", model={"pretrained": "pipe:curl x"})
    lines = problems_of(raw)
    assert [line.split(":")[0] for line in lines] == ["model.pretrained", "storage"]
    assert "'pipe:' URLs run shell commands" in lines[0]
    assert "protocol 'ftp' is not allowed" in lines[1]


def test_the_service_narrows_protocols_and_roots_through_the_context(tmp_path):
    raw = spec_dict(storage="s3://bucket/runs")
    raw["data"]["train"] = str(tmp_path / "inside" / "dataset.json")
    raw["data"]["val"] = "/elsewhere/dataset.json"
    context = {"allowed_protocols": ["file"], "allowed_roots": [str(tmp_path)]}
    lines = problems_of(raw, context)
    assert [line.split(":")[0] for line in lines] == ["data.val", "storage"]
    assert parse_train_spec(raw)  # the default allow-list takes both


def test_spec_error_carries_paths_and_reads_as_lines():
    err = SpecError([("loss.k", "too big"), ("storage", "refused")])
    assert str(err) == "loss.k: too big\nstorage: refused"
    assert format_validation_error(err) == ["loss.k: too big", "storage: refused"]
    assert format_path(("data", "train", 2, "x")) == "data.train[2].x"


def test_spec_error_survives_pickling_and_copying():
    """Ray pickles a sweep trial's error and Tune copies it: the problems must come back."""
    import copy
    import pickle

    err = SpecError([("loss.class_counts", "needs counts")])
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert isinstance(again, SpecError) and again.problems == err.problems
        assert str(again) == "loss.class_counts: needs counts"


def test_importing_the_spec_modules_does_not_import_torch_or_ray():
    code = (
        "import sys\n"
        "import jobs.contract.train, jobs.contract.sweep, jobs.contract.spec_files, jobs.contract.cli, jobs.contract.loss\n"
        "from jobs.contract.spec_files import parse_train_spec\n"
        "parse_train_spec({'data': {'train': 'a/dataset.json', 'val': 'a/dataset.json',"
        " 'num_classes': 10}})\n"
        "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


def test_integers_are_not_guessed_from_booleans_strings_or_reals():
    lines = problems_of(
        spec_dict(epochs=True, batch_size="64", seed=1.5, loss={"name": "noised_topk", "k": 2.0})
    )
    assert [line.split(":")[0] for line in lines] == ["loss.k", "epochs", "batch_size", "seed"]
    assert all("Input should be a valid integer" in line for line in lines)
    # Reals stay lenient: YAML 1.1 reads `1e-3` (no dot) as a string, and people write it.
    assert parse_train_spec(spec_dict(optim={"lr": "1e-3"})).optim.lr == 0.001


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(2, 5000),
    k=st.integers(1, 6000),
    name=st.sampled_from(
        ["noised_topk", "noised_topk_imbalanced", "topk_hinge", "smooth_topk_svm"]
    ),
)
def test_the_k_rule_holds_for_every_loss_with_k(num_classes, k, name):
    raw = spec_dict(
        num_classes=num_classes,
        loss={"name": name, "k": k},
        metrics={"ks": [1], "select": "val_top1"},
    )
    if k + 1 <= num_classes:
        assert parse_train_spec(raw).loss.k == k
    else:
        assert problems_of(raw) == [
            f"loss.k: k + 1 = {k + 1} exceeds data.num_classes = {num_classes}"
        ]


def test_the_spec_offers_exactly_the_architectures_the_runtime_builds():
    from jobs.models import list_archs  # imports torch: fine in a test, never in jobs/contract

    assert sorted(ARCHITECTURES) == list_archs()
