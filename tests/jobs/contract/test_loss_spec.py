"""The spec's loss models stay in sync with topk's registry: names, arguments, defaults, bounds."""

from __future__ import annotations

import inspect
import typing

import pytest
from pydantic import TypeAdapter, ValidationError
from torch import nn

from jobs.contract.loss import LOSS_SPECS, LossSpec
from topk.registry import create_loss, get_loss_class, list_losses

LOSS_ADAPTER = TypeAdapter(LossSpec)
COUNTS = [5, 3, 1, 0, 8, 2, 7]  # a zero-count class included: it must stay valid


def constructor_kwargs(name: str) -> dict[str, object]:
    """Keyword-only constructor arguments of the topk class -> defaults."""
    init = get_loss_class(name).__init__
    if init is nn.Module.__init__:  # no constructor of its own: no arguments
        return {}
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
    return {p.name: p.default for p in params}


def spec_fields(name: str) -> dict[str, object]:
    """The spec's fields that are constructor arguments (not `name`, not the runtime's)."""
    model = LOSS_SPECS[name]
    return {
        f: info.default
        for f, info in model.model_fields.items()
        if f != "name" and f not in model.runtime_fields
    }


def with_counts(name: str, params: dict[str, object]) -> dict[str, object]:
    return {**params, "class_counts": COUNTS} if "class_counts" in spec_fields(name) else params


def test_same_names_as_the_registry():
    assert sorted(LOSS_SPECS) == list_losses()


@pytest.mark.parametrize("name", sorted(LOSS_SPECS))
def test_fields_are_the_constructor_arguments_with_the_same_defaults(name):
    assert spec_fields(name) == constructor_kwargs(name)


@pytest.mark.parametrize("name", sorted(LOSS_SPECS))
def test_flags_agree_with_the_loss_class(name):
    cls, spec = get_loss_class(name), LOSS_SPECS[name]
    assert spec.needs_cosine_head is cls.needs_cosine_head
    assert spec.needs_class_counts is cls.needs_class_counts
    assert ("class_counts" in spec.model_fields) is spec.needs_class_counts


@pytest.mark.parametrize("name", sorted(LOSS_SPECS))
def test_a_default_spec_builds_its_loss_in_one_call(name):
    spec = LOSS_ADAPTER.validate_python(with_counts(name, {"name": name}))
    loss = create_loss(spec.name, **spec.to_kwargs())
    assert isinstance(loss, get_loss_class(name))


def _numeric_probes(annotation: object) -> list[object]:
    if annotation is int:
        return [-1, 0, 1, 2]
    if annotation is float:
        return [-1.0, 0.0, 1e-6, 0.5, 3.0]
    return []


@pytest.mark.parametrize("name", sorted(LOSS_SPECS))
def test_spec_bounds_accept_exactly_what_the_constructor_accepts(name):
    """A value the spec accepts must build the loss, and a value the loss refuses must be
    refused at validation time, not later on a Ray worker."""
    for field, info in LOSS_SPECS[name].model_fields.items():
        if field in LOSS_SPECS[name].runtime_fields:
            continue  # applied by the runtime around the loss (tests/jobs/training)
        for value in _numeric_probes(info.annotation):
            params = with_counts(name, {"name": name, field: value})
            try:
                spec = LOSS_ADAPTER.validate_python(params)
            except ValidationError:
                spec_ok = False
            else:
                spec_ok = True
            kwargs = {k: v for k, v in params.items() if k != "name"}
            try:
                create_loss(name, **kwargs)
            except ValueError:
                loss_ok = False
            else:
                loss_ok = True
            assert spec_ok == loss_ok, f"{name}.{field}={value}: spec {spec_ok}, loss {loss_ok}"
            if spec_ok:
                built = spec.to_kwargs()
                assert {k: built[k] for k in kwargs} == kwargs


@pytest.mark.parametrize("name", ["ldam", "logit_adjusted", "noised_topk_imbalanced"])
@pytest.mark.parametrize(
    ("counts", "message"),
    [([4], "at least 2"), ([0, 0, 0], "positive count"), ([3, -1, 2], "greater than or equal")],
)
def test_bad_class_counts_are_refused(name, counts, message):
    with pytest.raises(ValidationError, match=message):
        LOSS_ADAPTER.validate_python({"name": name, "class_counts": counts})


def test_unknown_arguments_are_refused():
    with pytest.raises(ValidationError, match="Extra inputs"):
        LOSS_ADAPTER.validate_python({"name": "cross_entropy", "k": 5})
    with pytest.raises(ValidationError):
        LOSS_ADAPTER.validate_python({"name": "noised_topk", "sampler": "fast"})


def test_non_finite_numbers_are_refused():
    with pytest.raises(ValidationError):
        LOSS_ADAPTER.validate_python({"name": "noised_topk", "epsilon": float("inf")})
    with pytest.raises(ValidationError):
        LOSS_ADAPTER.validate_python({"name": "focal", "gamma": float("nan")})


def test_loss_spec_is_a_union_discriminated_on_name():
    members = typing.get_args(typing.get_args(LossSpec)[0])
    assert {m.model_fields["name"].default for m in members} == set(LOSS_SPECS)
