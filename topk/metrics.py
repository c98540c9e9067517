"""Top-K accuracy and macro-average top-K accuracy from per-class counts.

Counts (not rates) are what DDP ranks exchange: sum `TopKCounts.to_tensor()` with an all-reduce,
rebuild with `TopKCounts.from_tensor`, then read the rates. Ties are counted against the model: a
sample is a top-k hit when fewer than k other classes score at least as high as its label, so
constant scores never look accurate.

The counts also hold how often each class is the top-1 prediction, for the collapse share: the
share of samples whose top-1 prediction is the most-predicted class (1.0 when one class is
ranked first for every sample: a "rank-1 collapse").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from topk.validation import check_positive_int, check_scores_labels, check_shapes


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    checked = tuple(check_positive_int("k in ks", k) for k in ks)
    if len(set(checked)) != len(checked):
        raise ValueError(f"ks must not repeat a value, got {list(ks)}")
    return checked


@dataclass(frozen=True)
class TopKCounts:
    """Per-class top-k hit counts for several k, per-class support and top-1 predictions.

    ks: the k values; hits: int64 [len(ks), num_classes], hits[i, c] = samples of class c whose
    label is in the top ks[i]; support: int64 [num_classes], samples of each class; predicted:
    int64 [num_classes], samples whose top-1 prediction is class c (the highest score, the
    lowest index on a tie; a sample with a non-finite score is not counted).
    """

    ks: tuple[int, ...]
    hits: torch.Tensor
    support: torch.Tensor
    predicted: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int, ks: Sequence[int]) -> TopKCounts:
        """Empty counts to accumulate into with `+`."""
        ks = _check_ks(ks)
        num_classes = check_positive_int("num_classes", num_classes)
        return cls(
            ks,
            torch.zeros(len(ks), num_classes, dtype=torch.int64),
            torch.zeros(num_classes, dtype=torch.int64),
            torch.zeros(num_classes, dtype=torch.int64),
        )

    @property
    def num_classes(self) -> int:
        return self.support.numel()

    def __add__(self, other: TopKCounts) -> TopKCounts:
        if not isinstance(other, TopKCounts):
            return NotImplemented
        if other.ks != self.ks or other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot add counts for ks={list(other.ks)}, {other.num_classes} classes to "
                f"counts for ks={list(self.ks)}, {self.num_classes} classes"
            )
        device = self.hits.device
        return TopKCounts(
            self.ks,
            self.hits + other.hits.to(device),
            self.support + other.support.to(device),
            self.predicted + other.predicted.to(device),
        )

    def to(self, device: torch.device | str) -> TopKCounts:
        return TopKCounts(
            self.ks, self.hits.to(device), self.support.to(device), self.predicted.to(device)
        )

    def to_tensor(self) -> torch.Tensor:
        """int64 [len(ks) + 2, num_classes]: support in row 0, top-1 predictions in row 1, then
        hits; sum it across ranks."""
        return torch.cat([self.support[None], self.predicted[None], self.hits])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, ks: Sequence[int]) -> TopKCounts:
        """Inverse of to_tensor (e.g. after an all-reduce sum)."""
        ks = _check_ks(ks)
        if tensor.ndim != 2 or tensor.shape[0] != len(ks) + 2:
            raise ValueError(
                f"expected a tensor of shape [{len(ks) + 2}, num_classes], got {tuple(tensor.shape)}"
            )
        tensor = tensor.to(torch.int64)
        return cls(ks, tensor[2:].clone(), tensor[0].clone(), tensor[1].clone())

    def _row(self, k: int) -> int:
        try:
            return self.ks.index(k)
        except ValueError:
            raise ValueError(f"k={k} was not counted; counted ks: {list(self.ks)}") from None

    def accuracy(self, k: int) -> float:
        """Fraction of all samples whose label is in the top k; NaN when there are none."""
        row = self._row(k)
        total = int(self.support.sum())
        if total == 0:
            return float("nan")
        return int(self.hits[row].sum()) / total

    def macro_accuracy(self, k: int) -> float:
        """Mean over classes with support > 0 of the per-class top-k recall; NaN if none."""
        row = self._row(k)
        present = self.support > 0
        if not bool(present.any()):
            return float("nan")
        recall = self.hits[row][present].double() / self.support[present].double()
        return float(recall.mean())

    def collapse_share(self) -> float:
        """The share of counted samples whose top-1 prediction is the most-predicted class:
        about 1/num_classes for a model that predicts every class equally often, 1.0 when one
        class is ranked first for every sample. NaN when no sample was counted."""
        total = int(self.predicted.sum())
        if total == 0:
            return float("nan")
        return int(self.predicted.max()) / total

    def most_predicted(self) -> int:
        """The class that is the top-1 prediction most often (the lowest index on a tie)."""
        return int(self.predicted.argmax())

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """{prefix + "top{k}": accuracy, prefix + "macro_top{k}": macro accuracy} for every k."""
        metrics = {}
        for k in self.ks:
            metrics[f"{prefix}top{k}"] = self.accuracy(k)
            metrics[f"{prefix}macro_top{k}"] = self.macro_accuracy(k)
        return metrics


def topk_counts(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], *, check_values: bool = True
) -> TopKCounts:
    """Count top-k hits per class: scores [batch, num_classes], labels [batch] int.

    A k at least num_classes counts every sample as a hit. The counts live on the scores' device.
    Raises ValueError for bad shapes, out-of-range labels, non-finite scores or bad ks.

    `check_values=False` (labels known to be in range, e.g. from the data pipeline) reads no
    tensor value, so counting on a GPU never synchronises with the host; a row with a
    non-finite score then counts as a miss for every k (never as a hit) and as no top-1
    prediction. The counts use `index_add_`, not `bincount`, which reads its input's maximum
    back to the host on CUDA.
    """
    ks = _check_ks(ks)
    if check_values:
        check_scores_labels(scores, labels)
    else:
        labels = check_shapes(scores, labels)
    num_classes = scores.shape[1]
    with torch.no_grad():
        true_scores = scores.gather(1, labels[:, None])
        # Other classes at least as high as the label (ties count against the model).
        rank = (scores >= true_scores).sum(dim=1) - 1
        k_column = torch.tensor(ks, device=scores.device)[:, None]
        is_hit = rank[None, :] < k_column  # [len(ks), batch]
        finite = torch.isfinite(scores).all(dim=1)
        if not check_values:  # NaN compares false: without this a NaN row would be a hit
            is_hit = is_hit & finite[None, :]
        is_hit = is_hit.to(torch.int64)
        hits = torch.zeros(len(ks), num_classes, dtype=torch.int64, device=scores.device)
        hits.index_add_(1, labels, is_hit)
        support = torch.zeros(num_classes, dtype=torch.int64, device=scores.device)
        support.index_add_(0, labels, torch.ones_like(labels, dtype=torch.int64))
        predicted = torch.zeros(num_classes, dtype=torch.int64, device=scores.device)
        predicted.index_add_(0, scores.argmax(dim=1), finite.to(torch.int64))
    return TopKCounts(ks, hits, support, predicted)
