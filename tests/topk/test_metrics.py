"""Top-K counts against a plain loop, and summing counts the way DDP ranks do."""

import math

import pytest
import torch

from topk.metrics import TopKCounts, topk_counts


def loop_counts(scores: torch.Tensor, labels: torch.Tensor, ks):
    """hits[k][c], support[c] by looping: a hit when fewer than k other classes score >= label."""
    num_classes = scores.shape[1]
    hits = {k: [0] * num_classes for k in ks}
    support = [0] * num_classes
    for row, y in zip(scores.tolist(), labels.tolist(), strict=True):
        support[y] += 1
        at_least_as_high = sum(1 for j, v in enumerate(row) if j != y and v >= row[y])
        for k in ks:
            hits[k][y] += at_least_as_high < k
    return hits, support


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(200, 9, generator=gen)
    labels = torch.randint(0, 8, (200,), generator=gen)  # class 8 never appears
    return scores, labels


def test_counts_and_rates_match_loop(batch):
    scores, labels = batch
    ks = [1, 3, 5]
    counts = topk_counts(scores, labels, ks)
    hits, support = loop_counts(scores, labels, ks)
    assert counts.support.tolist() == support
    for i, k in enumerate(ks):
        assert counts.hits[i].tolist() == hits[k]
        assert counts.accuracy(k) == pytest.approx(sum(hits[k]) / len(labels))
        recalls = [h / s for h, s in zip(hits[k], support, strict=True) if s > 0]
        assert counts.macro_accuracy(k) == pytest.approx(sum(recalls) / len(recalls))
    assert counts.to_metrics("val_") == {
        f"val_{kind}{k}": value
        for k in ks
        for kind, value in (("top", counts.accuracy(k)), ("macro_top", counts.macro_accuracy(k)))
    }


def test_ties_count_against_the_model():
    scores = torch.zeros(4, 5)
    counts = topk_counts(scores, torch.tensor([0, 1, 2, 3]), [1, 4, 5])
    assert counts.accuracy(1) == 0.0
    assert counts.accuracy(4) == 0.0  # 4 other classes tie with the label
    assert counts.accuracy(5) == 1.0  # k >= num_classes: always a hit


def test_sum_of_shards_equals_whole(batch):
    scores, labels = batch
    whole = topk_counts(scores, labels, [1, 5])
    shards = [
        topk_counts(s, y, [1, 5]) for s, y in zip(scores.split(64), labels.split(64), strict=True)
    ]
    summed = TopKCounts.zeros(9, [1, 5])
    for shard in shards:
        summed = summed + shard
    assert torch.equal(summed.hits, whole.hits) and torch.equal(summed.support, whole.support)
    # The all-reduce path: sum the flat tensors, rebuild.
    reduced = torch.stack([shard.to_tensor() for shard in shards]).sum(0)
    rebuilt = TopKCounts.from_tensor(reduced, [1, 5])
    assert rebuilt.to_tensor().dtype == torch.int64
    assert rebuilt.to_metrics() == whole.to_metrics()


def test_macro_differs_from_micro_on_imbalance():
    # Class 0: 9 samples all right; class 1: 1 sample wrong -> micro 0.9, macro 0.5.
    scores = torch.tensor([[1.0, 0.0]] * 10)
    labels = torch.tensor([0] * 9 + [1])
    counts = topk_counts(scores, labels, [1])
    assert counts.accuracy(1) == pytest.approx(0.9)
    assert counts.macro_accuracy(1) == pytest.approx(0.5)


def test_empty_counts_are_nan():
    empty = TopKCounts.zeros(3, [1])
    assert math.isnan(empty.accuracy(1)) and math.isnan(empty.macro_accuracy(1))


@pytest.mark.parametrize("ks", [[], [0], [1, 1], 5])
def test_bad_ks(ks):
    with pytest.raises(ValueError, match="k"):
        topk_counts(torch.zeros(2, 3), torch.tensor([0, 1]), ks)


def test_bad_inputs_and_mismatches():
    with pytest.raises(ValueError, match="NaN"):
        topk_counts(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), [1])
    with pytest.raises(ValueError, match="out of range"):
        topk_counts(torch.zeros(1, 3), torch.tensor([3]), [1])
    with pytest.raises(ValueError, match="not counted"):
        TopKCounts.zeros(3, [1]).accuracy(5)
    with pytest.raises(ValueError, match="cannot add"):
        TopKCounts.zeros(3, [1]) + TopKCounts.zeros(4, [1])
    with pytest.raises(ValueError, match="shape"):
        TopKCounts.from_tensor(torch.zeros(2, 3), [1, 5])
