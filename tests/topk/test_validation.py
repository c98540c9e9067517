"""The shared input checks: every non-finite score is caught, large finite scores are not."""

import pytest
import torch

from topk.validation import check_scores_labels


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_non_finite_score_is_an_error(bad, dtype):
    scores = torch.zeros(3, 7, dtype=dtype)
    scores[2, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_scores_labels(scores, torch.zeros(3, dtype=torch.long))


def test_nan_hidden_among_opposite_infinities_is_an_error():
    scores = torch.zeros(2, 4)
    scores[0, 0], scores[0, 1] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_scores_labels(scores, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("value", "dtype"), [(3e38, torch.float32), (6e4, torch.float16), (3e38, torch.bfloat16)]
)
def test_large_finite_scores_whose_sum_overflows_pass(value, dtype):
    scores = torch.full((4, 9), value, dtype=dtype)
    assert torch.isfinite(scores).all() and not torch.isfinite(scores.sum())
    check_scores_labels(scores, torch.zeros(4, dtype=torch.long))


def test_labels_and_k_are_checked():
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="label 5 is out of range"):
        check_scores_labels(scores, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="k \\+ 1 = 6 exceeds"):
        check_scores_labels(scores, torch.tensor([0, 1]), k=5)
    with pytest.raises(ValueError, match="shape"):
        check_scores_labels(scores, torch.tensor([0]))
