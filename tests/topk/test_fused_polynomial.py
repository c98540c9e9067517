"""The Triton product tree of the smooth top-k SVM against a float64 reference from the math.

On a CPU the kernels run in Triton's interpreter (tests/topk/conftest.py sets TRITON_INTERPRET).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import topk
from topk import fused_selection
from topk.fused_polynomial import log_polynomial_product
from topk.losses.svm import log_elementary_symmetric

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_log_esp(x: torch.Tensor, k: int) -> torch.Tensor:
    """log e_j(exp(x)) for j = 0..k by the textbook recursion e_j += a_i e_{j-1}, in float64
    after shifting each row by its maximum (so nothing overflows): [rows, C] -> [rows, k + 1]."""
    x = x.double()
    shift = x.max(dim=1, keepdim=True).values
    a = (x - shift).exp()
    rows, classes = a.shape
    e = torch.zeros(rows, k + 1, dtype=torch.float64)
    e[:, 0] = 1.0
    for i in range(classes):
        e[:, 1:] = e[:, 1:] + a[:, i : i + 1] * e[:, :-1].clone()
    j = torch.arange(k + 1, dtype=torch.float64)
    return e.log() + j * shift


def first_level(x: torch.Tensor, k: int) -> torch.Tensor:
    """Pairs of classes as degree-2 polynomials, the input the fused tree takes."""
    if x.shape[1] % 2:
        x = torch.cat([x, x.new_full((x.shape[0], 1), -1e30)], dim=1)
    a, b = x[:, 0::2], x[:, 1::2]
    poly = torch.stack([torch.zeros_like(a), torch.logaddexp(a, b), a + b], dim=-1)
    return poly[..., :2] if k == 1 else poly


@pytest.mark.parametrize(
    ("classes", "k"), [(2, 1), (5, 1), (9, 3), (10, 5), (37, 5), (64, 5), (301, 5), (40, 16)]
)
def test_tree_matches_the_recursion_in_value_and_gradient(classes, k):
    gen = torch.Generator().manual_seed(classes * 100 + k)
    x = (2.0 * torch.randn(3, classes, generator=gen)).to(DEVICE)
    x32 = x.detach().clone().requires_grad_()
    got = log_polynomial_product(first_level(x32, k), k)
    degree = got.shape[1] - 1
    assert degree == min(k, classes)
    want = reference_log_esp(x.cpu(), degree)
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=2e-6, atol=2e-5)

    weights = torch.randn(3, degree + 1, generator=gen, dtype=torch.float64)
    (got.double() * weights.to(DEVICE)).sum().backward()
    x64 = x.detach().cpu().double().requires_grad_()
    (reference_log_esp(x64, degree) * weights).sum().backward()
    torch.testing.assert_close(x32.grad.cpu().double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_absent_classes_and_wide_spreads_stay_finite():
    x = torch.tensor([[0.0, -1e30, -200.0, -200.0, -200.0, -200.0, -200.0, 3.0]], device=DEVICE)
    x = x.requires_grad_()
    got = log_polynomial_product(first_level(x, 5), 5)
    got[:, 5].sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()
    # e_5 of {e^0, e^3, five e^-200}: three of the five small ones with both large ones.
    assert got[0, 5].item() == pytest.approx(math.log(10) + 3.0 - 600.0, rel=1e-6)
    assert x.grad[0, 1].item() == 0.0  # an absent class has no gradient


def test_matches_the_pytorch_tree_used_on_the_cpu(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x = (3.0 * torch.randn(4, 123, generator=gen)).to(DEVICE)
    monkeypatch.setattr(fused_selection, "BACKEND", "torch")
    reference = log_elementary_symmetric(x, 5)
    monkeypatch.setattr(fused_selection, "BACKEND", "triton")
    fused = log_elementary_symmetric(x, 5)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("spread", "k"), itertools.product([0.3, 3.0, 300.0], [1, 5]))
def test_smooth_svm_loss_is_the_same_on_both_paths(spread, k, monkeypatch):
    gen = torch.Generator().manual_seed(int(spread * 10) + k)
    scores = (spread * torch.randn(6, 77, generator=gen)).to(DEVICE)
    labels = torch.randint(0, 77, (6,), generator=gen).to(DEVICE)
    loss_fn = topk.create_loss("smooth_topk_svm", k=k)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setattr(fused_selection, "BACKEND", backend)
        leaf = scores.clone().requires_grad_()
        value = loss_fn(leaf, labels)
        value.backward()
        results.append((value.detach(), leaf.grad))
    (value_t, grad_t), (value_f, grad_f) = results
    torch.testing.assert_close(value_f, value_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_f, grad_t, rtol=1e-4, atol=1e-5)  # grads are ~1/6
