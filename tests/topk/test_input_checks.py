"""Input checks (topk.validation: check_inputs first/always/never), label dtypes, the exact draw
counts of the smoothed top-k gradient, and the noised losses on the fused kernels
(topk.fused_selection, BACKEND "triton") against the PyTorch path.

The fused tests run on CUDA when there is one, else through Triton's interpreter on the CPU
(tests/topk/conftest.py), with small shapes there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_fused_selection import exact_second_moment_kth_largest
from test_smoothing import exact_expected_kth_largest

import topk
import topk.fused_selection
from topk.fused_selection import noised_hinge_rows
from topk.smoothing import smoothed_kth_largest

CUDA = torch.cuda.is_available()
NUM_CLASSES = 10
CLASS_COUNTS = [50, 30, 20, 10, 8, 5, 3, 2, 1, 0]
ALL_LOSSES = topk.list_losses()
NOISED = ["noised_topk", "noised_topk_imbalanced"]


def make_loss(name: str, **params):
    if topk.get_loss_class(name).needs_class_counts:
        params.setdefault("class_counts", CLASS_COUNTS)
    return topk.create_loss(name, **params)


def make_scores(name: str, batch: int = 6, seed: int = 0, device="cpu") -> torch.Tensor:
    scores = torch.randn(batch, NUM_CLASSES, generator=torch.Generator().manual_seed(seed))
    if topk.get_loss_class(name).needs_cosine_head:
        scores = scores.tanh()  # cosine scores in [-1, 1]
    return scores.to(device)


def make_labels(batch: int = 6, seed: int = 0, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)


def value_and_grad(loss, scores, labels, seed=0):
    """The loss and its gradient, with a seeded generator on the scores' device."""
    scores = scores.detach().clone().requires_grad_()
    generator = torch.Generator(device=scores.device).manual_seed(seed)
    value = loss(scores, labels, generator)
    (grad,) = torch.autograd.grad(value, scores)
    return value.detach(), grad


# ---------------------------------------------------------------------------------------------
# The smoothed k-th largest counts its draws exactly
# ---------------------------------------------------------------------------------------------


def test_many_draws_do_not_drift():
    """200000 draws that all select the same class: its gradient is exactly 1 per row (1/4 of
    the mean over 4 rows); adding 1/n per draw drifted to 0.25029."""
    scores = (torch.arange(50.0) * 10).repeat(4, 1).requires_grad_()
    value = smoothed_kth_largest(
        scores, 3, epsilon=1e-3, n_samples=200_000, generator=torch.Generator().manual_seed(0)
    )
    value.mean().backward()
    grad = scores.grad
    assert (grad[:, 47] - 0.25).abs().max().item() <= 1e-6  # 470 is the third largest
    assert (4 * grad.sum(dim=1) - 1).abs().max().item() <= 1e-6  # each row's gradient sums to 1
    assert (grad[:, :47] == 0).all() and (grad[:, 48:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_rows_sum_to_one(dtype):
    """Each entry count / n is rounded once to the scores' dtype: a row sums to 1 within the
    dtype's unit roundoff (eps / 2, summing positive entries); bfloat16 once summed to 0.5."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(8, 50, generator=gen).to(dtype).requires_grad_()
    value = smoothed_kth_largest(scores, 3, epsilon=1.0, n_samples=1000, generator=gen)
    assert value.dtype == dtype
    value.sum().backward()
    assert scores.grad.dtype == dtype
    row_sums = scores.grad.double().sum(dim=1)
    assert (row_sums - 1).abs().max().item() <= torch.finfo(dtype).eps / 2
    assert (scores.grad >= 0).all()


@pytest.mark.parametrize("n_samples", [64, 65])  # counted in the kernel / with PyTorch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_rows_sum_to_one_on_the_kernels(triton_backend, dtype, n_samples):
    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    scores = scores.to(dtype).to(triton_backend).requires_grad_()
    generator = torch.Generator(device=triton_backend).manual_seed(0)
    value = smoothed_kth_largest(scores, 3, epsilon=1.0, n_samples=n_samples, generator=generator)
    assert value.dtype == dtype
    value.sum().backward()
    row_sums = scores.grad.double().sum(dim=1)
    # Triton's interpreter casts float32 to bfloat16 toward zero: up to a whole eps per row.
    resolution = torch.finfo(dtype).eps / (2 if CUDA or dtype == torch.float16 else 1)
    assert (row_sums - 1).abs().max().item() <= resolution


# ---------------------------------------------------------------------------------------------
# Integer label dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_integer_label_dtype_gives_the_int64_result(name):
    loss = make_loss(name)
    scores, labels = make_scores(name), make_labels()
    labels[0] = NUM_CLASSES - 1  # the largest label, which every dtype here holds
    expected_value, expected_grad = value_and_grad(loss, scores, labels)
    assert torch.isfinite(expected_value)
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        value, grad = value_and_grad(loss, scores, labels.to(dtype))
        assert torch.equal(value, expected_value), dtype
        assert torch.equal(grad, expected_grad), dtype
    for bad in (labels.bool(), labels.float(), labels.double()):
        with pytest.raises(ValueError, match="labels must be an integer tensor"):
            loss(scores, bad)


# ---------------------------------------------------------------------------------------------
# check_inputs: first (default) / always / never
# ---------------------------------------------------------------------------------------------


def bad_inputs(name):
    """(description, scores, labels) with one bad value each."""
    scores, labels = make_scores(name), make_labels()
    too_large, negative, nan_score, inf_score = (labels.clone() for _ in range(4))
    too_large[2] = NUM_CLASSES
    negative[4] = -1
    nan_scores, inf_scores = scores.clone(), scores.clone()
    nan_scores[1, 3] = float("nan")
    inf_scores[5, 0] = float("inf")
    return [
        ("label too large", scores, too_large, "label 10 is out of range"),
        ("negative label", scores, negative, "label -1 is out of range"),
        ("NaN score", nan_scores, labels, "NaN or infinite"),
        ("inf score", inf_scores, labels, "NaN or infinite"),
    ]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_check_inputs_modes_on_the_cpu(name):
    loss = make_loss(name)
    assert loss.check_inputs == "first"
    for what, scores, labels, message in bad_inputs(name):
        with pytest.raises(ValueError, match=message):
            loss(scores, labels, torch.Generator().manual_seed(0))
        loss.check_inputs = "always"
        with pytest.raises(ValueError, match=message):
            loss(scores, labels, torch.Generator().manual_seed(0))
        loss.check_inputs = "never"
        scores = scores.clone().requires_grad_()
        value = loss(scores, labels, torch.Generator().manual_seed(0))
        assert value.shape == () and torch.isnan(value), what
        value.backward()  # no crash: the poisoned loss passes no gradient to its math
        loss.check_inputs = "first"

    scores, labels = make_scores(name), make_labels()
    checked = value_and_grad(loss, scores, labels)
    loss.check_inputs = "never"
    assert loss.check_inputs == "never"
    unchecked = value_and_grad(loss, scores, labels)
    assert torch.isfinite(unchecked[0])
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    loss.check_inputs = "always"
    assert torch.equal(value_and_grad(loss, scores, labels)[0], checked[0])

    for mode in ("sometimes", "", None, "FIRST"):
        with pytest.raises(ValueError, match="check_inputs must be one of first, always, never"):
            loss.check_inputs = mode
    assert loss.check_inputs == "always"  # a refused mode leaves the old one


@pytest.mark.parametrize("name", NOISED)
def test_noised_losses_on_the_kernels_check_values_as_told(triton_backend, name):
    device = triton_backend
    loss = make_loss(name, n_samples=6)
    for what, scores, labels, message in bad_inputs(name):
        scores, labels = scores.to(device), labels.to(device)
        loss.check_inputs = "always"
        with pytest.raises(ValueError, match=message):
            loss(scores, labels)
        loss.check_inputs = "never"
        scores = scores.clone().requires_grad_()
        value = loss(scores, labels, torch.Generator(device=device).manual_seed(0))
        assert value.shape == () and torch.isnan(value), what
        value.backward()
        assert scores.grad is not None
    scores, labels = make_scores(name, device=device), make_labels(device=device)
    never = value_and_grad(loss, scores, labels)
    loss.check_inputs = "always"
    always = value_and_grad(loss, scores, labels)
    assert torch.isfinite(never[0])
    assert torch.equal(never[0], always[0]) and torch.equal(never[1], always[1])


@pytest.mark.skipif(CUDA, reason="an out-of-range index on CUDA would end the CUDA context")
@pytest.mark.parametrize("n_samples", [6, 65])  # backward counted in the kernel / with PyTorch
def test_bad_label_unchecked_on_the_kernels_gives_nan_and_a_safe_backward(
    triton_backend, n_samples
):
    """An out-of-range label checked on the device must never be used as an index, in the
    forward or the backward pass (on a GPU that is a device-side assert, not an exception)."""
    loss = make_loss("noised_topk", n_samples=n_samples)
    loss.check_inputs = "never"
    scores = make_scores("noised_topk", batch=3).requires_grad_()
    for bad_label in (NUM_CLASSES, -1):
        labels = make_labels(batch=3)
        labels[2] = bad_label
        value = loss(scores, labels, torch.Generator().manual_seed(0))
        assert torch.isnan(value)
        value.backward()  # must not raise "index 10 is out of bounds"

    # The same for the kernel-level hinge: the bad row is flagged, the others' gradient holds.
    labels = make_labels(batch=3)
    labels[2] = NUM_CLASSES
    hinge, bad = noised_hinge_rows(
        scores, labels, 1.0, 2, 1.0, n_samples, generator=torch.Generator().manual_seed(0)
    )
    assert bad
    (grad,) = torch.autograd.grad(hinge.sum(), scores)
    assert torch.isfinite(grad).all()


def test_balanced_loss_gradient_on_the_kernels(triton_backend):
    """Rows with an active hinge: (counts / n - onehot(y)) / batch, summing to 0 per row, -1/B
    plus what was drawn at the label; rows with an inactive hinge: 0."""
    device = triton_backend
    batch, n_samples = 6, 8
    loss = make_loss("noised_topk", k=2, epsilon=1.0, n_samples=n_samples)
    loss.check_inputs = "never"
    scores, labels = make_scores("noised_topk", batch), make_labels(batch)
    scores[torch.arange(batch), labels] = torch.tensor([-5.0, 30.0, -5.0, 30.0, -5.0, -5.0])
    value, grad = value_and_grad(loss, scores.to(device), labels.to(device))
    assert torch.isfinite(value) and value > 0
    grad = grad.cpu()
    active = torch.tensor([True, False, True, False, True, True])
    assert (grad[~active] == 0).all()
    row_sums = grad[active].double().sum(dim=1)
    assert row_sums.abs().max().item() <= 1e-7
    drawn = grad[active] + (torch.nn.functional.one_hot(labels[active], NUM_CLASSES) / batch)
    assert (drawn >= 0).all()
    counts = drawn * batch * n_samples  # whole draw counts
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-5)
    torch.testing.assert_close(counts.sum(dim=1), torch.full((4,), float(n_samples)))


# ---------------------------------------------------------------------------------------------
# The noised losses on the kernels and on PyTorch agree in distribution
# ---------------------------------------------------------------------------------------------

ROW = np.array([0.3, -0.2, 0.9, 0.1, 0.5, 0.7, -0.4, 0.0, 0.2, -1.0])  # label 9: always active


def loss_draws(monkeypatch, backend, device, name, seeds, **params):
    monkeypatch.setattr(topk.fused_selection, "BACKEND", backend)
    loss = make_loss(name, **params)
    values = []
    for seed, (scores, labels) in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        values.append(loss(scores.to(device), labels.to(device), generator).item())
    return np.array(values)


@pytest.mark.parametrize(
    ("name", "params", "scale"),
    [
        ("noised_topk", {"k": 2, "epsilon": 0.6}, 1.0),
        ("noised_topk_imbalanced", {"k": 3, "epsilon": 0.1, "max_m": 0.3, "scale": 20.0}, 20.0),
    ],
)
def test_always_active_loss_matches_the_exact_expectation_on_both_paths(
    monkeypatch, fused_device, name, params, scale
):
    """With the label's score far below the rest every hinge is active, and the loss is
    scale * (m_y + mean of B * n draws of top_{k+1,eps}(s) - s_y): its expectation and variance
    follow from the order statistic's distribution."""
    batch, n_samples = (512, 64) if CUDA else (8, 32)
    k, epsilon = params["k"], params["epsilon"]
    scores = torch.tensor(ROW, dtype=torch.float32).repeat(batch, 1)
    labels = torch.full((batch,), 9)
    margin = 1.0 if name == "noised_topk" else params["max_m"]  # class 9 has no sample: max_m
    mean = exact_expected_kth_largest(ROW, k + 1, epsilon)
    variance = exact_second_moment_kth_largest(ROW, k + 1, epsilon) - mean**2
    expected = scale * (margin + mean - ROW[9])
    standard_error = scale * math.sqrt(variance / (batch * n_samples))
    for backend, device in (("triton", fused_device), ("torch", "cpu")):
        (value,) = loss_draws(
            monkeypatch,
            backend,
            device,
            name,
            [(3, (scores, labels))],
            n_samples=n_samples,
            **params,
        )
        assert abs(value - expected) < 5 * standard_error, (backend, value, expected)


@pytest.mark.parametrize("name", NOISED)
def test_loss_on_the_kernels_and_on_pytorch_agree_in_distribution(monkeypatch, fused_device, name):
    """Mixed active and inactive rows: the per-seed losses of both paths have the same mean,
    within 5 standard errors of the difference (each estimated from its seeds)."""
    count = 64 if CUDA else 10
    batch, n_samples = 8, 8
    params = {"k": 2, "n_samples": n_samples}
    if name == "noised_topk_imbalanced":
        params.update(epsilon=0.2, scale=10.0)
    scores, labels = make_scores(name, batch, seed=100), make_labels(batch, seed=100)
    # Raise the label's score more and more along the batch: rows from surely active to surely
    # inactive, and some in between.
    scores[torch.arange(batch), labels] += torch.linspace(-1.0, 2.0, batch)
    if topk.get_loss_class(name).needs_cosine_head:
        scores = scores.clamp(-1.0, 1.0)
    batches = [(seed, (scores, labels)) for seed in range(count)]
    kernel = loss_draws(monkeypatch, "triton", fused_device, name, batches, **params)
    reference = loss_draws(monkeypatch, "torch", "cpu", name, batches, **params)
    assert kernel.std() > 0 and reference.std() > 0
    standard_error = math.sqrt(kernel.var(ddof=1) / count + reference.var(ddof=1) / count)
    assert abs(kernel.mean() - reference.mean()) < 5 * standard_error
