"""Cross-entropy, focal, LDAM and logit-adjusted losses against direct float64 formulas."""

import math

import pytest
import torch

from topk.losses.baselines import CrossEntropyLoss, FocalLoss, LDAMLoss, LogitAdjustedLoss
from topk.losses.imbalance import ldam_margins, log_class_prior


def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _mean_nll(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(_softmax_row(r)[y]) for r, y in zip(rows, labels, strict=True)) / len(rows)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    return scores, labels


def test_cross_entropy_matches_formula(batch):
    scores, labels = batch
    expected = _mean_nll(scores.tolist(), labels.tolist())
    assert CrossEntropyLoss()(scores, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_matches_formula(batch, gamma):
    scores, labels = batch
    terms = []
    for row, y in zip(scores.tolist(), labels.tolist(), strict=True):
        p = _softmax_row(row)[y]
        terms.append(-((1 - p) ** gamma) * math.log(p))
    assert FocalLoss(gamma=gamma)(scores, labels).item() == pytest.approx(
        sum(terms) / len(terms), rel=1e-6
    )


def test_focal_gradient_finite_when_confident():
    scores = torch.tensor([[200.0, 0.0, -200.0]], requires_grad=True)
    loss = FocalLoss(gamma=0.5)(scores, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(scores.grad).all()


def test_ldam_margins_formula_and_zero_count():
    counts = [100, 25, 1, 0]
    margins = ldam_margins(torch.tensor(counts, dtype=torch.float64), 0.5)
    expected = [0.5 * (1 / 100) ** 0.25, 0.5 * (1 / 25) ** 0.25, 0.5, 0.5]
    assert margins.tolist() == pytest.approx(expected, rel=1e-6)


def test_ldam_matches_formula(batch):
    cosines = batch[0].tanh()
    labels = batch[1]
    counts = [50, 10, 0, 7, 3]
    max_m, scale = 0.3, 20.0
    n_min = 3
    rows = []
    for row, y in zip(cosines.tolist(), labels.tolist(), strict=True):
        margin = max_m * (n_min / counts[y]) ** 0.25 if counts[y] > 0 else max_m
        rows.append([scale * (v - margin if j == y else v) for j, v in enumerate(row)])
    loss = LDAMLoss(max_m=max_m, scale=scale, class_counts=counts)(cosines, labels)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(_mean_nll(rows, labels.tolist()), rel=1e-6)


def test_ldam_without_margins_is_cross_entropy_on_scaled_cosines(batch):
    """max_m = 0: the cosine-head control of the experiments (cross-entropy, cosine head)."""
    cosines, labels = batch[0].tanh(), batch[1]
    loss = LDAMLoss(max_m=0.0, scale=30.0, class_counts=[4, 1, 0, 2, 9])(cosines, labels)
    expected = CrossEntropyLoss()(30.0 * cosines, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_adjusted_matches_formula(batch):
    scores, labels = batch
    counts = [40, 0, 10, 5, 45]
    tau = 1.5
    floored = [c if c > 0 else 2.5 for c in counts]  # half the smallest positive count
    total = sum(floored)
    rows = [
        [v + tau * math.log(floored[j] / total) for j, v in enumerate(row)]
        for row in scores.tolist()
    ]
    loss = LogitAdjustedLoss(tau=tau, class_counts=counts)(scores, labels)
    assert loss.item() == pytest.approx(_mean_nll(rows, labels.tolist()), rel=1e-6)
    assert torch.isfinite(log_class_prior(torch.tensor(counts))).all()


def test_logit_adjusted_tau_zero_is_cross_entropy(batch):
    scores, labels = batch
    adjusted = LogitAdjustedLoss(tau=0.0, class_counts=[1, 2, 3, 4, 5])(scores, labels)
    assert adjusted.item() == pytest.approx(CrossEntropyLoss()(scores, labels).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (FocalLoss, {"gamma": -1.0}, "gamma"),
        (LDAMLoss, {"class_counts": None}, "class_counts"),
        (LDAMLoss, {"class_counts": [3, -1]}, "class_counts"),
        (LDAMLoss, {"class_counts": [2, 3], "max_m": -0.1}, "max_m"),
        (LDAMLoss, {"class_counts": [2, 3], "scale": float("nan")}, "scale"),
        (LogitAdjustedLoss, {"class_counts": [0, 0]}, "class_counts"),
        (LogitAdjustedLoss, {"class_counts": [1, 2], "tau": -0.5}, "tau"),
    ],
)
def test_bad_arguments_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_class_counts_length_must_match_scores():
    loss = LDAMLoss(class_counts=[1, 2, 3])
    with pytest.raises(ValueError, match="3"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(batch, dtype):
    scores, labels = batch
    low = scores.to(dtype)
    for loss in (
        CrossEntropyLoss(),
        FocalLoss(),
        LDAMLoss(class_counts=[5, 4, 3, 2, 1]),
        LogitAdjustedLoss(class_counts=[5, 4, 3, 2, 1]),
    ):
        value = loss(low, labels)
        reference = loss(low.double(), labels)
        assert value.dtype == dtype
        assert value.float().item() == pytest.approx(reference.item(), rel=1e-2)
