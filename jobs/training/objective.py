"""What the loop minimises: the spec's loss, with the cross-entropy remedies against rank-1
collapse that the top-K hinge losses take (`loss.ce_warmup_epochs`, `loss.ce_weight`; see
jobs/contract/loss.py).

The losses themselves stay pure topk/ modules; the combination happens here, where the runtime
builds the loss. The cross-entropy is taken on the scores the loss gets, times the loss's
`scale` for the cosine-head losses (cosines in [-1, 1] are no logits).
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.contract.loss import LossSpecBase
from topk import create_loss


class ScaledCrossEntropy(nn.Module):
    """Softmax cross-entropy of `scale` x scores: scores [batch, C], labels [batch]; the
    `generator` is accepted (and unused) like the stochastic losses'."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.cross_entropy = create_loss("cross_entropy")

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.cross_entropy(scores * self.scale if self.scale != 1.0 else scores, labels)


class Objective(nn.Module):
    """`loss + ce_weight * cross-entropy` (just `loss` when ce_weight is 0), called like a topk/
    loss: `objective(scores, labels, generator=...)`. `for_epoch(epoch)` is the module to train
    epoch `epoch` (counted from 1) with: cross-entropy alone in the first `ce_warmup_epochs`
    epochs, this objective afterwards."""

    def __init__(
        self,
        loss: nn.Module,
        *,
        ce_weight: float = 0.0,
        ce_warmup_epochs: int = 0,
        ce_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.ce_weight = ce_weight
        self.ce_warmup_epochs = ce_warmup_epochs
        self.cross_entropy = ScaledCrossEntropy(ce_scale)

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        value: torch.Tensor = self.loss(scores, labels, generator=generator)
        if self.ce_weight > 0:
            value = value + self.ce_weight * self.cross_entropy(scores, labels)
        return value

    def for_epoch(self, epoch: int) -> nn.Module:
        return self.cross_entropy if epoch <= self.ce_warmup_epochs else self


def build_objective(spec: LossSpecBase) -> Objective:
    """The objective of a validated loss spec (`TrainSpec.loss`), on the CPU."""
    loss = create_loss(spec.name, **spec.to_kwargs())  # type: ignore[attr-defined]
    scale = float(getattr(spec, "scale", 1.0)) if type(spec).needs_cosine_head else 1.0
    return Objective(
        loss,
        ce_weight=float(getattr(spec, "ce_weight", 0.0)),
        ce_warmup_epochs=int(getattr(spec, "ce_warmup_epochs", 0)),
        ce_scale=scale,
    )
