"""The loss registry: a plain dict and two verbs, no import-time registration."""

from __future__ import annotations

from torch import nn

from topk.losses.baselines import CrossEntropyLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss
from topk.losses.hinge import NoisedTopKImbalancedLoss, NoisedTopKLoss, TopKHingeLoss
from topk.losses.svm import SmoothTopKSVMLoss

LOSSES: dict[str, type[nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "focal": FocalLoss,
    "ldam": LDAMLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "noised_topk": NoisedTopKLoss,
    "noised_topk_imbalanced": NoisedTopKImbalancedLoss,
    "smooth_topk_svm": SmoothTopKSVMLoss,
    "topk_hinge": TopKHingeLoss,
}


def list_losses() -> list[str]:
    """The registered loss names, sorted."""
    return sorted(LOSSES)


def get_loss_class(name: str) -> type[nn.Module]:
    """The class registered under `name`; raises ValueError listing the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; valid choices: {', '.join(list_losses())}"
        ) from None


def create_loss(name: str, **params: object) -> nn.Module:
    """Build the loss registered under `name` from flat keyword arguments.

    Raises ValueError for an unknown name, an unknown parameter, or a bad value.
    """
    cls = get_loss_class(name)
    try:
        return cls(**params)
    except TypeError as exc:  # unexpected keyword: turn it into the layer's error type
        raise ValueError(f"loss {name!r}: {exc}") from None
