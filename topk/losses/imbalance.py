"""What the long-tail losses derive from the per-class training counts (float64 [C] in, out).

Both stay finite for a class with zero training samples: the counts come from
topk.validation.check_class_counts (non-negative, at least one positive).
"""

from __future__ import annotations

import torch


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
