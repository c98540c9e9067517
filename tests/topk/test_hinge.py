"""The top-K hinge losses against slow float64 references written from the math."""

from __future__ import annotations

import pytest
import torch

from topk.losses.hinge import NoisedTopKImbalancedLoss, NoisedTopKLoss, TopKHingeLoss


def reference_hinge(scores, labels, k, epsilon, noise, margins=None, scale=1.0):
    """mean_b scale * (m_{y_b} + mean_draws sorted(s_b + eps z_b)[k] - s_{b,y_b})_+ by loops.

    scores: [batch, classes] float64; noise: [n_samples, batch, classes] (None: no noise);
    margins: per-class list (None: all 1). Position k of the descending sort is top_{k+1}.
    """
    batch, classes = scores.shape
    total = 0.0
    for b in range(batch):
        draws = noise[:, b] if noise is not None else torch.zeros(1, classes)
        kth = 0.0
        for z in draws:
            noised = sorted(
                (float(scores[b, c]) + epsilon * float(z[c]) for c in range(classes)),
                reverse=True,
            )
            kth += noised[k] / len(draws)
        label = int(labels[b])
        margin = 1.0 if margins is None else margins[label]
        total += scale * max(0.0, margin + kth - float(scores[b, label]))
    return total / batch


def reference_ldam_margins(counts, max_m):
    n_min = min(n for n in counts if n > 0)
    return [max_m if n == 0 else max_m * (n_min / n) ** 0.25 for n in counts]


def loss_value_and_grad(loss, scores, labels, generator=None):
    scores = scores.detach().clone().requires_grad_()
    value = loss(scores, labels, generator)
    (grad,) = torch.autograd.grad(value, scores)
    return value, grad


def reference_grad(fn, scores, step=1e-6):
    """Central finite differences of a float64 reference (the hinge is piecewise linear)."""
    grad = torch.zeros_like(scores)
    for index in range(scores.numel()):
        up, down = scores.clone(), scores.clone()
        up.view(-1)[index] += step
        down.view(-1)[index] -= step
        grad.view(-1)[index] = (fn(up) - fn(down)) / (2 * step)
    return grad


def make_batch(batch=6, classes=9, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    scores = spread * torch.randn(batch, classes, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return scores, labels


def test_noised_topk_matches_reference_with_the_same_noise():
    scores, labels = make_batch()
    loss = NoisedTopKLoss(k=2, epsilon=0.5, n_samples=4)
    value, grad = loss_value_and_grad(loss, scores, labels, torch.Generator().manual_seed(9))
    # For small inputs the loss draws torch.randn(n_samples, batch, classes) from the generator.
    noise = torch.randn(
        4, *scores.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    assert value.item() == pytest.approx(reference_hinge(scores, labels, 2, 0.5, noise), abs=1e-12)
    expected_grad = reference_grad(lambda s: reference_hinge(s, labels, 2, 0.5, noise), scores)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


def test_imbalanced_matches_reference_with_the_same_noise():
    scores, labels = make_batch(classes=6, seed=1)
    scores = torch.tanh(scores)  # cosine-like scores in [-1, 1]
    counts = [500, 40, 7, 0, 1, 90]
    loss = NoisedTopKImbalancedLoss(k=3, epsilon=0.05, n_samples=3, class_counts=counts)
    value, grad = loss_value_and_grad(loss, scores, labels, torch.Generator().manual_seed(2))
    noise = torch.randn(
        3, *scores.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    margins = reference_ldam_margins(counts, 0.2)

    def reference(s):
        return reference_hinge(s, labels, 3, 0.05, noise, margins=margins, scale=60.0)

    assert value.item() == pytest.approx(reference(scores), rel=1e-12)
    torch.testing.assert_close(grad, reference_grad(reference, scores), rtol=0, atol=1e-5)


def test_ldam_margins_zero_count_gets_max_margin():
    counts = [100, 10, 1, 0]
    loss = NoisedTopKImbalancedLoss(k=1, max_m=0.3, class_counts=counts)
    expected = torch.tensor([0.3 * 0.01**0.25, 0.3 * 0.1**0.25, 0.3, 0.3], dtype=torch.float64)
    torch.testing.assert_close(loss.margins, expected)
    assert torch.isfinite(loss.margins).all()


def test_hard_hinge_matches_reference():
    scores, labels = make_batch(seed=3)
    loss = TopKHingeLoss(k=3)
    value, grad = loss_value_and_grad(loss, scores, labels)
    assert value.item() == pytest.approx(reference_hinge(scores, labels, 3, 0.0, None), abs=1e-12)
    expected_grad = reference_grad(lambda s: reference_hinge(s, labels, 3, 0.0, None), scores)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)


def test_hard_hinge_is_zero_when_label_leads_by_the_margin():
    scores = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.2, 0.1]])
    value = TopKHingeLoss(k=1)(scores, torch.tensor([0, 1]))
    # row 0: 1 + 0 - 5 < 0; row 1: (1 + top_2 = 0.2 - 0.5)_+ = 0.7
    assert value.item() == pytest.approx(0.35)


def test_tiny_epsilon_gives_the_hard_hinge():
    scores, labels = make_batch(seed=4, spread=3.0)
    hard_value, hard_grad = loss_value_and_grad(TopKHingeLoss(k=2), scores, labels)
    soft = NoisedTopKLoss(k=2, epsilon=1e-10, n_samples=3)
    soft_value, soft_grad = loss_value_and_grad(soft, scores, labels, torch.Generator())
    assert soft_value.item() == pytest.approx(hard_value.item(), abs=1e-8)
    torch.testing.assert_close(soft_grad, hard_grad, rtol=0, atol=1e-12)


def test_imbalanced_with_zero_margin_and_unit_scale_matches_tiny_epsilon_hinge_shift():
    """max_m = 0 removes the margins: the loss is (top_{k+1} - s_y)_+ times scale."""
    scores, labels = make_batch(seed=5)
    counts = [10] * 9
    loss = NoisedTopKImbalancedLoss(k=2, epsilon=1e-10, max_m=0.0, scale=2.0, class_counts=counts)
    value = loss(scores, labels, torch.Generator())
    expected = 2.0 * torch.relu(
        torch.topk(scores, 3, dim=1).values[:, 2] - scores[range(6), labels]
    )
    assert value.item() == pytest.approx(expected.mean().item(), abs=1e-8)


def cosine_scores(features, weight):
    return (
        torch.nn.functional.normalize(features, dim=1)
        @ torch.nn.functional.normalize(weight, dim=1).T
    )


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: TopKHingeLoss(k=1),
        lambda: NoisedTopKLoss(k=1, epsilon=0.2, n_samples=5),
        lambda: NoisedTopKLoss(k=1, epsilon=0.2, n_samples=5, sampler="lazy"),
        lambda: NoisedTopKImbalancedLoss(k=1, class_counts=[30, 10, 5, 1]),
    ],
    ids=["topk_hinge", "noised_topk", "noised_topk_lazy", "noised_topk_imbalanced"],
)
def test_loss_decreases_on_a_linearly_separable_problem(make_loss):
    gen = torch.Generator().manual_seed(0)
    classes, dim = 4, 8
    centers = 3.0 * torch.randn(classes, dim, generator=gen)
    labels = torch.arange(classes).repeat(16)
    features = centers[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=gen)
    loss = make_loss()
    # A cosine head's gradient scales with 1 / |w|: give it unit-size weights.
    init_scale = 1.0 if loss.needs_cosine_head else 0.01
    weight = (init_scale * torch.randn(classes, dim, generator=gen)).requires_grad_()

    def forward():
        scores = cosine_scores(features, weight) if loss.needs_cosine_head else features @ weight.T
        return loss(scores, labels, gen)

    with torch.no_grad():
        initial = forward().item()
    for _ in range(30):  # plain SGD, lr 0.05
        (grad,) = torch.autograd.grad(forward(), weight)
        with torch.no_grad():
            weight -= 0.05 * grad
    with torch.no_grad():
        final = forward().item()
    assert final < 0.5 * initial, (initial, final)


ALL_LOSSES = [
    lambda: TopKHingeLoss(k=2),
    lambda: NoisedTopKLoss(k=2),
    lambda: NoisedTopKLoss(k=2, sampler="lazy"),
    lambda: NoisedTopKImbalancedLoss(k=2, class_counts=[5, 4, 3, 2, 1, 0]),
]
LOSS_IDS = ["topk_hinge", "noised_topk", "noised_topk_lazy", "noised_topk_imbalanced"]


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
def test_batch_size_one(make_loss):
    scores = torch.tanh(torch.randn(1, 6)).requires_grad_()
    value = make_loss()(scores, torch.tensor([3]))
    assert value.shape == ()
    value.backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype_close_to_float32(make_loss, dtype):
    scores = torch.tanh(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)))
    labels = torch.arange(8) % 6
    loss = make_loss()
    half_scores = scores.to(dtype).requires_grad_()
    half = loss(half_scores, labels, torch.Generator().manual_seed(3))
    full = loss(half_scores.detach().float(), labels, torch.Generator().manual_seed(3))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full.to(dtype).float(), rtol=0, atol=0)
    half.backward()
    assert half_scores.grad.dtype == dtype and torch.isfinite(half_scores.grad).all()


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
def test_autocast(make_loss):
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(5, 6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = torch.tanh(layer(torch.randn(4, 5, generator=gen)))
        value = make_loss()(scores, torch.tensor([0, 1, 2, 5]), gen)
    value.float().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make_loss", ALL_LOSSES[1:], ids=LOSS_IDS[1:])
def test_generator_reproducibility(make_loss):
    scores = torch.tanh(torch.randn(16, 6, generator=torch.Generator().manual_seed(3)))
    labels = torch.arange(16) % 6
    loss = make_loss()
    first = loss(scores, labels, torch.Generator().manual_seed(1))
    again = loss(scores, labels, torch.Generator().manual_seed(1))
    other = loss(scores, labels, torch.Generator().manual_seed(2))
    assert first.item() == again.item()
    assert first.item() != other.item()


@pytest.mark.parametrize("cls", [TopKHingeLoss, NoisedTopKLoss, NoisedTopKImbalancedLoss])
def test_class_attributes(cls):
    imbalanced = cls is NoisedTopKImbalancedLoss
    assert cls.needs_cosine_head is imbalanced
    assert cls.needs_class_counts is imbalanced


def test_published_defaults():
    balanced = NoisedTopKLoss()
    assert (balanced.k, balanced.epsilon, balanced.n_samples, balanced.sampler) == (
        5,
        1.0,
        5,
        "full",
    )
    imbalanced = NoisedTopKImbalancedLoss(class_counts=[1] * 10)
    assert (imbalanced.k, imbalanced.epsilon, imbalanced.n_samples) == (5, 0.01, 5)
    assert (imbalanced.max_m, imbalanced.scale, imbalanced.sampler) == (0.2, 60.0, "full")
    assert TopKHingeLoss().k == 5


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (torch.zeros(6), torch.tensor([0]), r"shape \[batch, num_classes\]"),
        (torch.zeros(2, 6), torch.tensor([0]), "labels must have shape"),
        (torch.zeros(2, 6), torch.tensor([0.0, 1.0]), "labels must be an integer tensor"),
        (torch.zeros(2, 6), torch.tensor([0, 6]), "label 6 is out of range"),
        (torch.zeros(2, 6), torch.tensor([-1, 0]), "label -1 is out of range"),
        (
            torch.zeros(2, 2),
            torch.tensor([0, 1]),
            # the imbalanced loss knows its width: it reports the mismatch first
            "k \\+ 1 = 3 exceeds the number of classes|scores have 2 classes but the loss was built",
        ),
        (torch.tensor([[0.0] * 5 + [float("nan")]] * 2), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.tensor([[0.0] * 5 + [float("inf")]] * 2), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.zeros(2, 6, dtype=torch.long), torch.tensor([0, 1]), "floating-point"),
        (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), "empty batch"),
    ],
)
def test_bad_input_raises_value_error(make_loss, scores, labels, message):
    with pytest.raises(ValueError, match=message):
        make_loss()(scores, labels)


def test_imbalanced_rejects_scores_of_the_wrong_width():
    loss = NoisedTopKImbalancedLoss(k=1, class_counts=[3, 2, 1])
    with pytest.raises(ValueError, match="scores have 4 classes but the loss was built for 3"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("make_loss", "message"),
    [
        (lambda: TopKHingeLoss(k=0), "k must be a positive integer"),
        (lambda: NoisedTopKLoss(k=-1), "k must be a positive integer"),
        (lambda: NoisedTopKLoss(epsilon=0.0), "epsilon must be finite and > 0"),
        (lambda: NoisedTopKLoss(epsilon=float("inf")), "epsilon must be finite"),
        (lambda: NoisedTopKLoss(n_samples=0), "n_samples must be a positive integer"),
        (lambda: NoisedTopKLoss(sampler="approx"), "sampler must be one of"),
        (lambda: NoisedTopKImbalancedLoss(), "class_counts is required"),
        (lambda: NoisedTopKImbalancedLoss(class_counts=[1, -1, 2]), "non-negative"),
        (lambda: NoisedTopKImbalancedLoss(class_counts=[0, 0, 0]), "at least one positive"),
        (lambda: NoisedTopKImbalancedLoss(k=3, class_counts=[1, 2, 3]), "k \\+ 1 = 4 exceeds"),
        (lambda: NoisedTopKImbalancedLoss(k=1, max_m=-0.1, class_counts=[1, 2]), "max_m"),
        (lambda: NoisedTopKImbalancedLoss(k=1, scale=0, class_counts=[1, 2]), "scale"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(make_loss, message):
    with pytest.raises(ValueError, match=message):
        make_loss()
