"""Smooth top-k SVM against brute-force enumeration of all k-subsets, in float64."""

import itertools

import pytest
import torch

from topk.losses import svm
from topk.losses.svm import SmoothTopKSVMLoss, log_elementary_symmetric


def brute_force_svm(scores: torch.Tensor, labels: torch.Tensor, k, tau, alpha) -> torch.Tensor:
    """Berrada et al.'s formula summed over every k-subset (differentiable, per row)."""
    losses = []
    for row, y in zip(scores, labels.tolist(), strict=True):
        all_terms, with_label = [], []
        for subset in itertools.combinations(range(row.numel()), k):
            subset_sum = row[list(subset)].sum()
            all_terms.append((alpha * (y not in subset) + subset_sum / k) / tau)
            if y in subset:
                with_label.append(subset_sum / (k * tau))
        losses.append(
            tau * torch.logsumexp(torch.stack(all_terms), 0)
            - tau * torch.logsumexp(torch.stack(with_label), 0)
        )
    return torch.stack(losses)


def hard_topk_svm(scores: torch.Tensor, labels: torch.Tensor, k, alpha) -> torch.Tensor:
    """tau -> 0: max_A (alpha [y not in A] + S(A)/k) - max_{A containing y} S(A)/k."""
    losses = []
    for row, y in zip(scores.tolist(), labels.tolist(), strict=True):
        subsets = list(itertools.combinations(range(len(row)), k))
        best = max(alpha * (y not in a) + sum(row[i] for i in a) / k for a in subsets)
        best_with_y = max(sum(row[i] for i in a) / k for a in subsets if y in a)
        losses.append(best - best_with_y)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize(("num_classes", "k"), [(2, 1), (5, 1), (6, 2), (7, 3), (9, 4), (8, 7)])
@pytest.mark.parametrize(("tau", "alpha"), [(0.1, 1.0), (1.0, 0.5)])
def test_matches_brute_force_value_and_gradient(num_classes, k, tau, alpha):
    gen = torch.Generator().manual_seed(num_classes * 10 + k)
    scores = (torch.randn(5, num_classes, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, num_classes, (5,), generator=gen)
    ours = svm.smooth_topk_svm(scores, labels, k=k, tau=tau, alpha=alpha)
    reference = brute_force_svm(scores, labels, k, tau, alpha)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    (grad_ours,) = torch.autograd.grad(ours.sum(), scores)
    (grad_reference,) = torch.autograd.grad(reference.sum(), scores)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-9, atol=1e-12)


def test_log_elementary_symmetric_matches_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    ours = log_elementary_symmetric(x, 4)
    for row, got in zip(x, ours, strict=True):
        for j in range(5):
            terms = [row[list(s)].sum() for s in itertools.combinations(range(11), j)]
            assert got[j].item() == pytest.approx(torch.stack(terms).logsumexp(0).item(), rel=1e-12)


def test_widely_spread_rows_use_the_hard_terms_exactly():
    # Gaps of hundreds of k * tau: the smooth terms equal their hard limit to float64 precision.
    scores = torch.tensor(
        [[300.0, 0.0, -250.0, -600.0, 40.0], [900.0, 300.0, 301.9, 100.0, -900.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    labels = torch.tensor([2, 2])
    ours = svm.smooth_topk_svm(scores, labels, k=2, tau=0.1, alpha=1.0)
    torch.testing.assert_close(ours, brute_force_svm(scores, labels, 2, 0.1, 1.0))
    # The hard terms: log e_k - log e_{k-1} -> the k-th largest other score / (k tau).
    kth_other = torch.tensor([40.0, 300.0], dtype=torch.float64)
    true_score = torch.tensor([-250.0, 301.9], dtype=torch.float64)
    margin = 1.0 / 0.1 + (kth_other - true_score) / (2 * 0.1)
    torch.testing.assert_close(ours.detach(), 0.1 * torch.nn.functional.softplus(margin))
    (grad,) = torch.autograd.grad(ours.sum(), scores)
    assert torch.isfinite(grad).all()


def test_small_tau_approaches_hard_svm():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (6,), generator=gen)
    smooth = svm.smooth_topk_svm(scores, labels, k=3, tau=1e-4, alpha=1.0)
    # tau * log(number of subsets) bounds the smoothing error.
    torch.testing.assert_close(smooth, hard_topk_svm(scores, labels, 3, 1.0), atol=5e-3, rtol=0)


def test_chunked_rows_match_one_pass(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(9, 40, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 40, (9,), generator=gen)
    whole = svm.smooth_topk_svm(scores, labels, k=5, tau=0.2, alpha=1.0)
    (grad_whole,) = torch.autograd.grad(whole.sum(), scores)
    monkeypatch.setattr(svm, "_CHUNK_ELEMENTS", 1)  # one row per chunk, recomputed in backward
    chunked = svm.smooth_topk_svm(scores, labels, k=5, tau=0.2, alpha=1.0)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), scores)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_finite_for_widely_spread_scores(dtype, spread):
    gen = torch.Generator().manual_seed(2)
    scores = (torch.randn(16, 3000, generator=gen) * spread).clamp(-6e4, 6e4)
    scores = scores.to(dtype).requires_grad_()
    labels = torch.randint(0, 3000, (16,), generator=gen)
    loss = SmoothTopKSVMLoss(k=20, tau=0.1)(scores, labels)
    loss.backward()
    assert loss.dtype == dtype
    assert torch.isfinite(loss)
    assert torch.isfinite(scores.grad).all()
    reference = SmoothTopKSVMLoss(k=20, tau=0.1)(scores.detach().double(), labels)
    assert loss.double().item() == pytest.approx(reference.item(), rel=1e-2)


def test_module_mean_and_batch_of_one():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1])
    loss = SmoothTopKSVMLoss(k=2, tau=0.5, alpha=1.0)(scores, labels)
    assert loss.item() == pytest.approx(brute_force_svm(scores, labels, 2, 0.5, 1.0).item())


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"k": 0}, "k"), ({"tau": 0.0}, "tau"), ({"alpha": -1.0}, "alpha")]
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SmoothTopKSVMLoss(**kwargs)


def test_k_too_large_for_classes():
    with pytest.raises(ValueError, match="exceeds the number of classes"):
        SmoothTopKSVMLoss(k=5)(torch.zeros(2, 5), torch.tensor([0, 1]))
