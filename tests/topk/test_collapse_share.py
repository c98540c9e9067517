"""The collapse share of topk.metrics (the share of samples whose top-1 prediction is the
most-predicted class) against a plain loop over its definition, summed across ranks, and on
the GPU path's unchecked counts."""

import math

import pytest
import torch

from topk.metrics import TopKCounts, topk_counts


def reference_share(scores: torch.Tensor) -> tuple[float, int]:
    """(share, class) by looping: each row's top-1 is its highest score, the lowest index on a
    tie; rows with a non-finite score make no prediction."""
    predicted: dict[int, int] = {}
    for row in scores.tolist():
        if not all(math.isfinite(v) for v in row):
            continue
        top = max(range(len(row)), key=lambda j: (row[j], -j))
        predicted[top] = predicted.get(top, 0) + 1
    if not predicted:
        return math.nan, 0
    most = max(sorted(predicted), key=lambda c: predicted[c])
    return predicted[most] / sum(predicted.values()), most


@pytest.mark.parametrize("bias", [0.0, 1.0, 4.0])
def test_collapse_share_matches_its_definition(bias):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(300, 7, generator=gen)
    scores[:, 2] += bias  # the larger the bias, the more rows put class 2 first
    labels = torch.randint(0, 7, (300,), generator=gen)
    counts = topk_counts(scores, labels, [1, 3])
    share, most = reference_share(scores)
    assert counts.collapse_share() == pytest.approx(share)
    assert counts.most_predicted() == most
    assert int(counts.predicted.sum()) == 300
    if bias == 4.0:
        assert counts.collapse_share() > 0.9 and most == 2


def test_ties_go_to_the_lowest_index_and_constant_scores_collapse_fully():
    counts = topk_counts(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0]), [1])
    assert counts.collapse_share() == 1.0 and counts.most_predicted() == 0
    assert counts.accuracy(1) == 0.0  # ties still count against the model


def test_summed_across_ranks_like_the_whole():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(128, 6, generator=gen)
    labels = torch.randint(0, 6, (128,), generator=gen)
    whole = topk_counts(scores, labels, [1, 2])
    parts = [
        topk_counts(s, y, [1, 2]) for s, y in zip(scores.split(50), labels.split(50), strict=True)
    ]
    reduced = TopKCounts.from_tensor(torch.stack([p.to_tensor() for p in parts]).sum(0), [1, 2])
    assert torch.equal(reduced.predicted, whole.predicted)
    assert reduced.collapse_share() == whole.collapse_share()
    summed = TopKCounts.zeros(6, [1, 2])
    for part in parts:
        summed = summed + part
    assert torch.equal(summed.predicted, whole.predicted)


def test_unchecked_counts_skip_non_finite_rows_and_empty_counts_are_nan():
    scores = torch.tensor([[0.0, 1.0, 0.0], [float("nan"), 0.0, 0.0], [2.0, 0.0, 0.0]])
    counts = topk_counts(scores, torch.tensor([1, 0, 0]), [1], check_values=False)
    assert counts.predicted.tolist() == [1, 1, 0]
    assert counts.collapse_share() == 0.5
    assert math.isnan(TopKCounts.zeros(3, [1]).collapse_share())
