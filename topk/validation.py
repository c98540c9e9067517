"""Input checks shared by every loss: clear ValueErrors instead of index errors or silent NaN."""

from __future__ import annotations

import torch


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_class_counts(name: str, counts: object) -> torch.Tensor:
    """A 1-D float64 tensor of non-negative, finite per-class training counts."""
    if counts is None:
        raise ValueError(f"{name} is required (the per-class training counts)")
    t = torch.as_tensor(counts, dtype=torch.float64)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(
            f"{name} must be a list of at least 2 per-class counts, got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative counts")
    if (t == 0).all():
        raise ValueError(f"{name} must hold at least one positive count")
    return t


def check_scores_labels(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | None = None,
    num_classes: int | None = None,
) -> None:
    """Check scores [batch, num_classes] and labels [batch] before any loss math.

    `k` (when given) requires k + 1 <= num_classes; `num_classes` (when given, e.g. the length of
    class_counts) must match the scores. Non-finite scores are an error, not a silent NaN loss.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor of shape [batch, num_classes]")
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [batch, num_classes], got {tuple(scores.shape)}")
    batch, classes = scores.shape
    if batch == 0:
        raise ValueError("scores has an empty batch")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype == torch.bool
    ):
        raise ValueError("labels must be an integer tensor of shape [batch]")
    if labels.shape != (batch,):
        raise ValueError(
            f"labels must have shape [{batch}] to match scores, got {tuple(labels.shape)}"
        )
    if num_classes is not None and classes != num_classes:
        raise ValueError(f"scores have {classes} classes but the loss was built for {num_classes}")
    if k is not None and k + 1 > classes:
        raise ValueError(f"k + 1 = {k + 1} exceeds the number of classes ({classes})")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is out of range [0, {classes - 1}]")
    # One reduction first: any NaN or infinity makes the sum non-finite, and the sum costs a
    # fraction of an elementwise isfinite over [batch, classes]. Only a non-finite sum (which can
    # also be a harmless overflow of large finite scores) pays for the exact check.
    if not torch.isfinite(scores.detach().sum()) and not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
