"""The sweep spec: a training spec plus a search space over dotted spec paths.

A trial's spec is `apply_params(sweep.train, params)`: the base spec with each dotted path
(`loss.epsilon`, `optim.lr`, ...) set to the trial's value, validated again as a TrainSpec. The
sweep is checked up front: every searched path exists in the base spec, and every grid/choice
value and range bound gives a valid training spec.

This module must not import torch or ray at import time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from jobs.contract.loss import LOSS_SPECS
from jobs.contract.spec_errors import validation_problems
from jobs.contract.train import SpecError, TrainSpec, check_metric_choice

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")


class Domain(BaseModel):
    """Exactly one of: `grid: [values]` (every value, crossed with the other grids),
    `choice: [values]` (one drawn per trial), `uniform: [lo, hi]`, `loguniform: [lo, hi]`
    (real numbers; loguniform needs lo > 0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(DOMAIN_KINDS)}; got "
                + (", ".join(given) if given else "none")
            )
        bounds = self.uniform or self.loguniform
        if bounds is not None:
            lo, hi = bounds
            if not lo < hi:
                raise ValueError(f"{self.kind} needs lo < hi, got [{lo}, {hi}]")
            if self.loguniform is not None and lo <= 0:
                raise ValueError(f"loguniform needs lo > 0, got {lo}")
        return self

    @model_serializer(mode="wrap")
    def _only_the_given_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # {"grid": [...]} as the user wrote it, not three more keys set to null
        return {key: value for key, value in handler(self).items() if value is not None}

    @property
    def kind(self) -> str:
        return next(kind for kind in DOMAIN_KINDS if getattr(self, kind) is not None)

    def to_tune(self) -> Any:
        """The matching Ray Tune search-space object (imports ray.tune)."""
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        assert self.loguniform is not None  # exactly one kind is set (validated)
        return tune.loguniform(*self.loguniform)


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["asha", "fifo"] = "asha"
    grace_period: StrictInt = Field(1, ge=1)
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepSpec(BaseModel):
    """A Ray Tune search over a training spec. `num_samples` trials are drawn per grid point."""

    model_config = ConfigDict(extra="forbid")

    train: TrainSpec
    search: dict[str, Domain] = Field(min_length=1)
    metric: str = "val_top5"
    mode: Literal["max", "min"] = "max"
    num_samples: StrictInt = Field(1, ge=1, le=10_000)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: StrictInt | None = Field(None, ge=1)
    """None -> as many as the cluster's resources fit."""

    @model_validator(mode="after")
    def _check_search(self, info: ValidationInfo) -> SweepSpec:
        problems = check_metric_choice(
            self.metric,
            self.mode,
            ks=self.train.metrics.ks,
            has_val=self.train.data.val is not None,
            metric_path="metric",
        )
        if self.scheduler.name == "asha" and self.scheduler.grace_period > self.train.epochs:
            problems.append(
                (
                    "scheduler.grace_period",
                    f"{self.scheduler.grace_period} exceeds train.epochs = {self.train.epochs}",
                )
            )
        for path, domain in self.search.items():
            problems += _domain_problems(self.train, path, domain, info.context)
        if problems:
            raise SpecError(problems)
        return self


def apply_params(
    train: TrainSpec | Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    context: dict[str, Any] | None = None,
) -> TrainSpec:
    """The training spec of one trial: `train` with each dotted path set to its value.

    Setting `loss.name` switches the loss: the fields the new loss does not have are dropped and
    `model.cosine_head` is left to the new loss. Raises pydantic.ValidationError (or SpecError for
    a path that is not in the spec) when the result is not a valid training spec. `train` may be
    the spec's JSON dict (a trial's process then validates the trial's spec once, not the base
    spec first).
    """
    spec = copy.deepcopy(dict(train)) if isinstance(train, Mapping) else train.model_dump()
    loss = spec.get("loss")
    old_name = loss.get("name") if isinstance(loss, dict) else None
    for path, value in params.items():
        parent, key = _parent_of(spec, path)
        if parent is None:
            raise SpecError([(path, _missing_path_message(spec, path))])
        parent[key] = value
    if "loss.name" in params and params["loss.name"] != old_name:
        name = params["loss.name"]
        new_loss = LOSS_SPECS.get(name) if isinstance(name, str) else None
        if new_loss is not None:  # an unknown name is left for validation to report
            spec["loss"] = {k: v for k, v in spec["loss"].items() if k in new_loss.model_fields}
        spec["model"]["cosine_head"] = None
    return TrainSpec.model_validate(spec, context=context)


def describe_best(
    params: Mapping[str, Any], *, metric: str, value: Any = None, trial: Any = None
) -> str:
    """A sweep's best trial as one line: `optim.lr=0.01, loss.epsilon=0.5 (val_top5 0.8100,
    trial t3)`; the parenthesis holds what is known of the metric's value and the trial id."""
    text = ", ".join(f"{path}={_param_text(v)}" for path, v in params.items()) or "(no params)"
    details = []
    if isinstance(value, int | float) and not isinstance(value, bool):
        details.append(f"{metric} {value:.4f}")
    if trial is not None:
        details.append(f"trial {trial}")
    return f"{text} ({', '.join(details)})" if details else text


def _param_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _parent_of(spec: dict[str, Any], path: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding the last key of `path` in a dumped spec, or None where it isn't there."""
    *parents, key = path.split(".")
    node: Any = spec
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            return None, key
        node = node[part]
    if not isinstance(node, dict) or key not in node:
        return None, key
    return node, key


def _missing_path_message(spec: dict[str, Any], path: str) -> str:
    parts = path.split(".")
    node: Any = spec
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the training spec"
        if not isinstance(node, dict):
            return f"not a field of the training spec ({where} has no fields)"
        if part not in node:
            if parts[:depth] == ["loss"]:
                where = f"loss {spec['loss']['name']!r}"
            return f"not a field of the training spec ({where} has: {', '.join(node)})"
        node = node[part]
    return "not a field of the training spec"


def _domain_problems(
    train: TrainSpec, path: str, domain: Domain, context: dict[str, Any] | None
) -> list[tuple[str, str]]:
    """Problems with searching `path` over `domain`, named `search.<path>...`."""
    where = f"search.{path}"
    spec = train.model_dump()
    parent, key = _parent_of(spec, path)
    if parent is None:
        return [(where, _missing_path_message(spec, path))]
    if domain.grid is not None or domain.choice is not None:
        values = domain.grid if domain.grid is not None else domain.choice or []
        problems = []
        for i, value in enumerate(values):
            problems += _value_problems(train, path, value, f"{where}.{domain.kind}[{i}]", context)
        return problems
    bounds = domain.uniform or domain.loguniform
    assert bounds is not None  # exactly one kind is set (validated)
    lo, hi = bounds
    # Tune draws real numbers in the range: probe one that is not an integer, besides the bounds.
    probe = lo + (hi - lo) / math.pi
    current = parent[key]
    takes_reals = not isinstance(current, int) or isinstance(current, bool)
    problems = []
    if takes_reals:
        for i, bound in enumerate((lo, hi)):
            problems += _value_problems(train, path, bound, f"{where}.{domain.kind}[{i}]", context)
        if problems or not _value_problems(train, path, probe, where, context):
            return problems
    return [
        (
            where,
            f"{domain.kind} draws real numbers (like {probe:g}) that {path} does not take; "
            "for an integer field use grid or choice",
        )
    ]


def _value_problems(
    train: TrainSpec, path: str, value: Any, where: str, context: dict[str, Any] | None
) -> list[tuple[str, str]]:
    try:
        apply_params(train, {path: value}, context=context)
    except ValidationError as exc:
        return [(where, f"{inner}: {message}") for inner, message in validation_problems(exc)]
    except SpecError as exc:
        return [(where, f"{inner}: {message}") for inner, message in exc.problems]
    return []
