"""The loss part of a training spec: one model per topk/ loss, discriminated on `name`.

Each model's fields (besides `name`) are exactly the keyword arguments of the topk/ class
registered under the same name, with the same defaults, so building the loss is one call:
`topk.create_loss(spec.name, **spec.to_kwargs())`. A test keeps the two in sync. The top-K hinge
losses have two more fields, which the runtime applies around the loss (jobs/training/
objective.py) and `to_kwargs` leaves out (`runtime_fields`): `ce_warmup_epochs` and `ce_weight`,
the cross-entropy remedies against rank-1 collapse.

This module must not import torch: the service validates specs without it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

ClassCounts = list[Annotated[StrictInt, Field(ge=0)]]
"""Per-class training sample counts, indexed by label."""


class LossSpecBase(BaseModel):
    """Common behaviour of every loss model; the class variables mirror the topk/ classes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    needs_cosine_head: ClassVar[bool] = False
    """The loss takes cosine scores in [-1, 1] and applies its own `scale`."""
    needs_class_counts: ClassVar[bool] = False
    """The loss needs the per-class training counts (`class_counts`)."""
    runtime_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields the training runtime applies around the loss, not arguments of the topk/ class."""

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `topk.create_loss(self.name, **kwargs)`."""
        return self.model_dump(exclude={"name", *self.runtime_fields})


class ClassCountsMixin(BaseModel):
    """`class_counts`: given explicitly, or filled from dataset.json by `resolve_class_counts`."""

    class_counts: ClassCounts | None = None

    @field_validator("class_counts")
    @classmethod
    def _check_class_counts(cls, counts: list[int] | None) -> list[int] | None:
        return None if counts is None else check_class_counts(counts)


def check_class_counts(counts: list[int]) -> list[int]:
    """The rule for `class_counts` beyond its type (non-negative ints): one count per class, at
    least 2 classes, at least one positive. Raises ValueError."""
    if len(counts) < 2:
        raise ValueError(f"needs one count per class (at least 2), got {len(counts)}")
    if any(count < 0 for count in counts):
        raise ValueError("counts cannot be negative")
    if not any(counts):
        raise ValueError("needs at least one class with a positive count")
    return counts


CeWarmupEpochs = Annotated[StrictInt, Field(ge=0)]
"""`ce_warmup_epochs`: train with cross-entropy alone for this many first epochs, then with the
loss."""
CeWeight = Annotated[float, Field(ge=0.0)]
"""`ce_weight`: add ce_weight x cross-entropy to the loss at every step (0: none)."""


class CrossEntropyRemedyMixin:
    """The top-K hinge losses take the cross-entropy remedies against rank-1 collapse (such a
    loss can rank one head class first for every input: it only asks the true class to beat
    the (K+1)-th score): fields `ce_warmup_epochs: CeWarmupEpochs = 0` and
    `ce_weight: CeWeight = 0.0`, declared last in each model. The cross-entropy is taken on
    the scores, times the loss's `scale` for the cosine-head losses."""

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"ce_warmup_epochs", "ce_weight"})


class CrossEntropyLossSpec(LossSpecBase):
    name: Literal["cross_entropy"] = "cross_entropy"


class FocalLossSpec(LossSpecBase):
    name: Literal["focal"] = "focal"
    gamma: float = Field(2.0, ge=0.0)


class LDAMLossSpec(ClassCountsMixin, LossSpecBase):
    needs_cosine_head: ClassVar[bool] = True
    needs_class_counts: ClassVar[bool] = True

    name: Literal["ldam"] = "ldam"
    max_m: float = Field(0.2, ge=0.0)
    """0: no margins, cross-entropy on `scale` x cosine scores (the cosine-head control)."""
    scale: float = Field(40.0, gt=0.0)


class LogitAdjustedLossSpec(ClassCountsMixin, LossSpecBase):
    needs_class_counts: ClassVar[bool] = True

    name: Literal["logit_adjusted"] = "logit_adjusted"
    tau: float = Field(1.0, ge=0.0)


class NoisedTopKLossSpec(CrossEntropyRemedyMixin, LossSpecBase):
    name: Literal["noised_topk"] = "noised_topk"
    k: StrictInt = Field(5, ge=1)
    epsilon: float = Field(1.0, gt=0.0)
    n_samples: StrictInt = Field(5, ge=1)
    sampler: Literal["full", "lazy"] = "full"
    ce_warmup_epochs: CeWarmupEpochs = 0
    ce_weight: CeWeight = 0.0


class NoisedTopKImbalancedLossSpec(CrossEntropyRemedyMixin, ClassCountsMixin, LossSpecBase):
    needs_cosine_head: ClassVar[bool] = True
    needs_class_counts: ClassVar[bool] = True

    name: Literal["noised_topk_imbalanced"] = "noised_topk_imbalanced"
    k: StrictInt = Field(5, ge=1)
    epsilon: float = Field(0.01, gt=0.0)
    n_samples: StrictInt = Field(5, ge=1)
    max_m: float = Field(0.2, ge=0.0)
    scale: float = Field(60.0, gt=0.0)
    sampler: Literal["full", "lazy"] = "full"
    ce_warmup_epochs: CeWarmupEpochs = 0
    ce_weight: CeWeight = 0.0


class TopKHingeLossSpec(CrossEntropyRemedyMixin, LossSpecBase):
    name: Literal["topk_hinge"] = "topk_hinge"
    k: StrictInt = Field(5, ge=1)
    ce_warmup_epochs: CeWarmupEpochs = 0
    ce_weight: CeWeight = 0.0


class SmoothTopKSVMLossSpec(CrossEntropyRemedyMixin, LossSpecBase):
    name: Literal["smooth_topk_svm"] = "smooth_topk_svm"
    k: StrictInt = Field(5, ge=1)
    tau: float = Field(0.1, gt=0.0)
    alpha: float = Field(1.0, gt=0.0)
    ce_warmup_epochs: CeWarmupEpochs = 0
    ce_weight: CeWeight = 0.0


LOSS_SPECS: dict[str, type[LossSpecBase]] = {
    spec.model_fields["name"].default: spec
    for spec in (
        CrossEntropyLossSpec,
        FocalLossSpec,
        LDAMLossSpec,
        LogitAdjustedLossSpec,
        NoisedTopKLossSpec,
        NoisedTopKImbalancedLossSpec,
        TopKHingeLossSpec,
        SmoothTopKSVMLossSpec,
    )
}
"""Loss name -> spec model; the same names as topk's registry."""

LossSpec = Annotated[
    CrossEntropyLossSpec
    | FocalLossSpec
    | LDAMLossSpec
    | LogitAdjustedLossSpec
    | NoisedTopKLossSpec
    | NoisedTopKImbalancedLossSpec
    | TopKHingeLossSpec
    | SmoothTopKSVMLossSpec,
    Field(discriminator="name"),
]
