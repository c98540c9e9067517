"""A cosine ("normalized") classification head for the margin losses (LDAM, noised_topk_imbalanced).

The margin losses compare a true-class score against a margin measured in cosine units and apply
their own `scale`, so the head must output cosines: normalized features times normalized
class weights, never a raw logit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from topk.validation import check_positive_int


class CosineHead(nn.Module):
    """features [batch, in_features] -> cosine scores [batch, num_classes] in [-1, 1].

    The L2 normalisation runs in float32 (a float16 epsilon would underflow and turn a zero
    feature vector into NaN); a zero feature vector scores 0 for every class. Under autocast the
    product runs in the autocast dtype; otherwise the output has the features' dtype.
    Raises ValueError for non-positive sizes or features of the wrong shape.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Only the direction of each class weight matters; any isotropic init is fine.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape [batch, {self.in_features}], got {tuple(features.shape)}"
            )
        unit_features = F.normalize(features.float(), dim=1).to(features.dtype)
        unit_weight = F.normalize(self.weight.float(), dim=1).to(features.dtype)
        # Rounding can push a product of unit vectors a hair past 1; the losses assume [-1, 1].
        return F.linear(unit_features, unit_weight).clamp(-1.0, 1.0)
