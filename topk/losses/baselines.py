"""Softmax-family baselines: cross-entropy, focal, LDAM and logit-adjusted cross-entropy.

Every loss takes scores [batch, num_classes] and integer labels [batch] and returns the scalar mean
over the batch (topk.validation.CheckedLoss.forward). Half-precision and bfloat16 scores are
computed in float32 and the result is returned in the input's dtype; float64 stays float64. The
losses are deterministic: `generator` is accepted for a uniform call signature across the
registry and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from topk.losses.imbalance import ldam_margins, log_class_prior
from topk.validation import CheckedLoss, check_class_counts, check_positive_float


def _upcast(scores: torch.Tensor) -> torch.Tensor:
    """Half-precision scores in float32; float32 and float64 unchanged."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


class CrossEntropyLoss(CheckedLoss):
    """Softmax cross-entropy, mean over the batch."""

    needs_cosine_head = False
    needs_class_counts = False
    # The scores are not scanned on the device: a NaN or +inf score already makes the
    # cross-entropy non-finite (a -inf one is a class of probability 0).
    scan_scores = False

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return F.cross_entropy(_upcast(scores), labels)


class FocalLoss(CheckedLoss):
    """Focal loss (Lin et al. 2017): mean of -(1 - p_y)^gamma * log p_y; gamma=0 is cross-entropy.

    Raises ValueError for a negative or non-finite gamma.
    """

    needs_cosine_head = False
    needs_class_counts = False
    repr_fields = ("gamma",)

    def __init__(self, *, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = check_positive_float("gamma", gamma, allow_zero=True)

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        log_p_true = F.log_softmax(_upcast(scores), dim=1).gather(1, labels[:, None]).squeeze(1)
        # 1 - p_y through expm1 keeps precision when p_y is close to 1; the floor keeps the
        # gradient of x^gamma finite (it is inf at x = 0 for gamma < 1) where p_y rounds to 1.
        miss = (-torch.expm1(log_p_true)).clamp(min=torch.finfo(log_p_true.dtype).tiny)
        loss = -(miss**self.gamma) * log_p_true
        return loss.mean()


class LDAMLoss(CheckedLoss):
    """Label-distribution-aware margin loss (Cao et al. 2019) on cosine scores.

    scores: cosine similarities in [-1, 1] (a CosineHead); the true class's score is lowered by its
    margin m_y = max_m * (n_min / n_y)^(1/4), everything is multiplied by `scale`, then softmax
    cross-entropy. class_counts: training samples per class (length num_classes, required).
    max_m = 0 (no margins) is softmax cross-entropy on `scale` times the cosine scores: the
    cosine-head control of the experiments. Raises ValueError for missing/bad counts, a
    negative max_m or a non-positive scale.
    """

    needs_cosine_head = True
    needs_class_counts = True
    repr_fields = ("max_m", "scale", "num_classes")

    margins: torch.Tensor

    def __init__(
        self,
        *,
        max_m: float = 0.2,
        scale: float = 40.0,
        class_counts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.max_m = check_positive_float("max_m", max_m, allow_zero=True)
        self.scale = check_positive_float("scale", scale)
        counts = check_class_counts("class_counts", class_counts)
        self.num_classes = counts.numel()
        # Not persistent: the margins are derived from the constructor arguments.
        self.register_buffer("margins", ldam_margins(counts, self.max_m), persistent=False)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return None, self.num_classes

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        scores32 = _upcast(scores)
        margins = self.margins.to(scores.device, scores32.dtype)[labels]
        # Lower only the true class's score: a scatter, not a [B, C] one-hot mask.
        shifted = scores32.scatter_add(1, labels[:, None], -margins[:, None])
        return F.cross_entropy(self.scale * shifted, labels)


class LogitAdjustedLoss(CheckedLoss):
    """Logit-adjusted softmax cross-entropy (Menon et al. 2021): CE on scores + tau * log(prior).

    prior: the training class frequencies from class_counts (required, length num_classes); a
    zero-count class gets a finite floor (see log_class_prior). Raises ValueError for bad counts or
    a negative tau (tau=0 is plain cross-entropy).
    """

    needs_cosine_head = False
    needs_class_counts = True
    repr_fields = ("tau", "num_classes")

    log_prior: torch.Tensor

    def __init__(self, *, tau: float = 1.0, class_counts: list[int] | None = None) -> None:
        super().__init__()
        self.tau = check_positive_float("tau", tau, allow_zero=True)
        counts = check_class_counts("class_counts", class_counts)
        self.num_classes = counts.numel()
        self.register_buffer("log_prior", log_class_prior(counts), persistent=False)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return None, self.num_classes

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        upcast = _upcast(scores)
        return F.cross_entropy(
            upcast + self.tau * self.log_prior.to(scores.device, upcast.dtype), labels
        )
