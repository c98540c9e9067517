"""Softmax-family baselines: cross-entropy, focal, LDAM and logit-adjusted cross-entropy.

Every loss takes scores [batch, num_classes] and integer labels [batch] and returns the scalar mean
over the batch. Half-precision and bfloat16 scores are computed in float32 and the result is
returned in the input's dtype. float64 stays float64. The losses are deterministic: `generator` is accepted for a uniform
call signature across the registry and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from topk.validation import (
    CheckedLoss,
    check_class_counts,
    check_positive_float,
    checked_labels,
    poison,
)


def _upcast(scores: torch.Tensor) -> torch.Tensor:
    """Half-precision scores in float32; float32 and float64 unchanged."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def ldam_margins(class_counts: torch.Tensor, max_m: float) -> torch.Tensor:
    """Per-class LDAM margins m_j = max_m * (n_min / n_j)^(1/4) (Cao et al. 2019), float64 [C].

    n_min is the smallest positive count, so the rarest seen class gets max_m. A class with zero
    training samples is rarer than any seen one and also gets max_m (never inf or NaN).
    """
    counts = class_counts.to(torch.float64)
    positive = counts > 0
    n_min = counts[positive].min()
    margins = torch.full_like(counts, max_m)
    margins[positive] = max_m * (n_min / counts[positive]) ** 0.25
    return margins


def log_class_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """log of the training class prior, float64 [C], finite even for zero-count classes.

    A zero count is floored at half the smallest positive count: such a class gets the most
    negative adjustment, without the -inf that log(0) would put into the logits.
    """
    counts = class_counts.to(torch.float64)
    floor = 0.5 * counts[counts > 0].min()
    floored = counts.clamp(min=floor)
    return (floored / floored.sum()).log()


class CrossEntropyLoss(CheckedLoss):
    """Softmax cross-entropy, mean over the batch."""

    needs_cosine_head = False
    needs_class_counts = False

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        # The scores are not scanned on the device: a NaN or +inf score already makes the
        # cross-entropy non-finite (a -inf one is a class of probability 0).
        labels, bad = checked_labels(self._checks, scores, labels, scan_scores=False)
        return poison(F.cross_entropy(_upcast(scores), labels), bad).to(scores.dtype)


class FocalLoss(CheckedLoss):
    """Focal loss (Lin et al. 2017): mean of -(1 - p_y)^gamma * log p_y; gamma=0 is cross-entropy.

    Raises ValueError for a negative or non-finite gamma.
    """

    needs_cosine_head = False
    needs_class_counts = False

    def __init__(self, *, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = check_positive_float("gamma", gamma, allow_zero=True)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        labels, bad = checked_labels(self._checks, scores, labels)
        log_p_true = F.log_softmax(_upcast(scores), dim=1).gather(1, labels[:, None]).squeeze(1)
        # 1 - p_y through expm1 keeps precision when p_y is close to 1; the floor keeps the
        # gradient of x^gamma finite (it is inf at x = 0 for gamma < 1) where p_y rounds to 1.
        miss = (-torch.expm1(log_p_true)).clamp(min=torch.finfo(log_p_true.dtype).tiny)
        loss = -(miss**self.gamma) * log_p_true
        return poison(loss.mean(), bad).to(scores.dtype)


class LDAMLoss(CheckedLoss):
    """Label-distribution-aware margin loss (Cao et al. 2019) on cosine scores.

    scores: cosine similarities in [-1, 1] (a CosineHead); the true class's score is lowered by its
    margin m_y = max_m * (n_min / n_y)^(1/4), everything is multiplied by `scale`, then softmax
    cross-entropy. class_counts: training samples per class (length num_classes, required).
    Raises ValueError for missing/bad counts, non-positive max_m or scale.
    """

    needs_cosine_head = True
    needs_class_counts = True

    def __init__(
        self,
        *,
        max_m: float = 0.2,
        scale: float = 40.0,
        class_counts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.max_m = check_positive_float("max_m", max_m)
        self.scale = check_positive_float("scale", scale)
        counts = check_class_counts("class_counts", class_counts)
        self.num_classes = counts.numel()
        # Not persistent: the margins are derived from the constructor arguments.
        self.register_buffer("margins", ldam_margins(counts, self.max_m), persistent=False)

    def extra_repr(self) -> str:
        return f"max_m={self.max_m}, scale={self.scale}, num_classes={self.num_classes}"

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        labels, bad = checked_labels(self._checks, scores, labels, num_classes=self.num_classes)
        scores32 = _upcast(scores)
        margins = self.margins.to(scores.device, scores32.dtype)[labels]
        # Lower only the true class's score: a scatter, not a [B, C] one-hot mask.
        shifted = scores32.scatter_add(1, labels[:, None], -margins[:, None])
        return poison(F.cross_entropy(self.scale * shifted, labels), bad).to(scores.dtype)


class LogitAdjustedLoss(CheckedLoss):
    """Logit-adjusted softmax cross-entropy (Menon et al. 2021): CE on scores + tau * log(prior).

    prior: the training class frequencies from class_counts (required, length num_classes); a
    zero-count class gets a finite floor (see log_class_prior). Raises ValueError for bad counts or
    a negative tau (tau=0 is plain cross-entropy).
    """

    needs_cosine_head = False
    needs_class_counts = True

    def __init__(self, *, tau: float = 1.0, class_counts: list[int] | None = None) -> None:
        super().__init__()
        self.tau = check_positive_float("tau", tau, allow_zero=True)
        counts = check_class_counts("class_counts", class_counts)
        self.num_classes = counts.numel()
        self.register_buffer("log_prior", log_class_prior(counts), persistent=False)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, num_classes={self.num_classes}"

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        labels, bad = checked_labels(self._checks, scores, labels, num_classes=self.num_classes)
        upcast = _upcast(scores)
        adjusted = upcast + self.tau * self.log_prior.to(scores.device, upcast.dtype)
        return poison(F.cross_entropy(adjusted, labels), bad).to(scores.dtype)
