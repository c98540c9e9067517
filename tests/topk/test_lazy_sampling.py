"""Exact lazy sampling: the same distribution as full sampling, checked statistically.

Every comparison draws tens of thousands of (value, index) pairs from both samplers with fixed
seeds (so the p-values are deterministic) and runs a two-sample Kolmogorov-Smirnov test on the
sampled k-th largest values and a chi-square test plus a total-variation bound on the sampled
indices. A deliberately biased sampler is rejected by the same tests, so they have power.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare, ks_2samp

from topk.full_sampling import sample_kth_largest_full
from topk.lazy_candidates import BLOCK, find_candidates, non_candidate_columns
from topk.lazy_sampling import _choose_without_replacement, sample_kth_largest_lazy
from topk.smoothing import smoothed_kth_largest

P_MIN = 1e-3


def distribution_gap(values_a, indices_a, values_b, indices_b, classes):
    """(KS p-value on values, chi-square p-value on indices, total variation of indices, and
    the total variation two samples of the same distribution would reach: about
    sqrt(support / draws), generously bounded)."""
    ks = ks_2samp(values_a.numpy().ravel(), values_b.numpy().ravel()).pvalue
    counts_a = np.bincount(indices_a.numpy().ravel(), minlength=classes)
    counts_b = np.bincount(indices_b.numpy().ravel(), minlength=classes)
    seen = (counts_a + counts_b) > 0
    chi = chi2_contingency(np.stack([counts_a[seen], counts_b[seen]])).pvalue
    tv = 0.5 * np.abs(counts_a / counts_a.sum() - counts_b / counts_b.sum()).sum()
    tv_limit = 1.5 * math.sqrt(seen.sum() / counts_a.sum())
    return ks, chi, tv, tv_limit


def row_types(classes, seed):
    """Three kinds of rows: spread (trained-like), close scores, and a tie-heavy plateau."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.sort(3.0 * torch.randn(classes, generator=gen), descending=True).values
    close = 0.3 * torch.randn(classes, generator=gen)
    plateau = torch.zeros(classes)
    plateau[:4] = 1.0
    plateau[4:20] = 0.8
    return [spread, close, plateau]


def interleaved(rows, repeats):
    """[len(rows) * repeats, classes] with the row kinds interleaved (row r is kind r % kinds)."""
    return torch.stack(rows).repeat(repeats, 1)


@pytest.mark.parametrize(
    ("delta", "max_expected_proposals"),
    [
        (0.4, math.inf),  # small candidate sets, many crossings, never a fallback
        (0.4, 0.0),  # every draw falls back to full sampling of the other classes
        (1.5, 3.0),  # a mixture of lazy draws and fallbacks
    ],
    ids=["proposals", "fallback", "mixed"],
)
def test_lazy_matches_full_sampling_in_distribution(delta, max_expected_proposals):
    classes, k, epsilon, n_samples, repeats = 150, 3, 0.5, 5, 2000
    kinds = row_types(classes, seed=0)
    scores = interleaved(kinds, repeats)
    lazy_values, lazy_indices = sample_kth_largest_lazy(
        scores,
        k,
        epsilon,
        n_samples,
        generator=torch.Generator().manual_seed(1),
        delta=delta,
        max_expected_proposals=max_expected_proposals,
    )
    full_values, full_indices = sample_kth_largest_full(
        scores, k, epsilon, n_samples, generator=torch.Generator().manual_seed(2)
    )
    # The value is the noised score of the index it reports.
    noise = (lazy_values - scores.gather(1, lazy_indices)) / epsilon
    assert noise.abs().max() < 8.0
    for kind in range(len(kinds)):
        ks, chi, tv, tv_limit = distribution_gap(
            lazy_values[kind :: len(kinds)],
            lazy_indices[kind :: len(kinds)],
            full_values[kind :: len(kinds)],
            full_indices[kind :: len(kinds)],
            classes,
        )
        assert ks > P_MIN and chi > P_MIN and tv < tv_limit, (kind, ks, chi, tv)


def test_automatic_settings_on_trained_like_logits_match_full_sampling():
    """C above the small-class cutoff: lazy rows, full rows and fallbacks mixed automatically."""
    classes, k, epsilon, n_samples = 400, 6, 1.0, 5
    gen = torch.Generator().manual_seed(3)
    spread_row = 5.0 * torch.randn(classes, generator=gen)
    flat_row = 0.2 * torch.randn(classes, generator=gen)  # candidates too many: sampled in full
    scores = torch.cat([spread_row.repeat(2000, 1), flat_row.repeat(1000, 1)])
    lazy_values, lazy_indices = sample_kth_largest_lazy(
        scores, k, epsilon, n_samples, generator=torch.Generator().manual_seed(4)
    )
    full_values, full_indices = sample_kth_largest_full(
        scores, k, epsilon, n_samples, generator=torch.Generator().manual_seed(5)
    )
    for part in (slice(0, 2000), slice(2000, 3000)):
        ks, chi, tv, tv_limit = distribution_gap(
            lazy_values[part], lazy_indices[part], full_values[part], full_indices[part], classes
        )
        assert ks > P_MIN and chi > P_MIN and tv < tv_limit, (part, ks, chi, tv)


def test_the_statistical_check_rejects_a_biased_sampler():
    """Ignoring the classes outside the candidate set (no proposals) is detectably wrong."""
    classes, k, epsilon, n_samples, repeats = 50, 3, 0.5, 5, 4000
    close = row_types(classes, seed=0)[1]
    scores = close.repeat(repeats, 1)
    threshold = torch.topk(close, k).values[-1] - 0.4
    candidates = (close > threshold).nonzero().squeeze(1)
    biased_values, biased_slots = sample_kth_largest_full(
        scores[:, candidates], k, epsilon, n_samples, generator=torch.Generator().manual_seed(1)
    )
    full_values, full_indices = sample_kth_largest_full(
        scores, k, epsilon, n_samples, generator=torch.Generator().manual_seed(2)
    )
    ks, chi, _, _ = distribution_gap(
        biased_values, candidates[biased_slots], full_values, full_indices, classes
    )
    assert ks < 1e-6 and chi < 1e-6


@pytest.mark.parametrize("classes", [7, BLOCK * 4, BLOCK * 9 + 5])
def test_find_candidates_returns_every_class_above_a_low_enough_threshold(classes):
    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(40, classes, generator=gen)
    scores[:5] = torch.round(scores[:5])  # ties
    scores[5, :4] = 10.0  # the top k share a block
    k, delta = 4, 0.7
    tau, searched, row_of, column, candidate_score = find_candidates(scores, k, delta, classes)
    kth = torch.topk(scores, k, dim=1).values[:, k - 1]
    assert (tau <= kth - delta).all() and searched.all()
    expected = [
        (row, col) for row in range(40) for col in range(classes) if scores[row, col] > tau[row]
    ]
    assert list(zip(row_of.tolist(), column.tolist(), strict=True)) == expected
    torch.testing.assert_close(candidate_score, scores[row_of, column], rtol=0, atol=0)
    assert (torch.bincount(row_of, minlength=40) >= k).all()

    # With a small block budget the rows with many hit blocks are left out, and only those.
    _, searched, row_of, _, _ = find_candidates(scores, k, delta, 1)
    if classes >= k * BLOCK:  # (fewer classes: every class is read, up to one block's worth)
        assert not searched.all()
    assert set(row_of.tolist()) <= set(searched.nonzero().squeeze(1).tolist())


def test_floyd_subsets_are_uniform_and_distinct():
    draws, pool, size = 30000, 6, 3
    counts = torch.full((draws,), size)
    chosen = _choose_without_replacement(
        counts, torch.full((draws,), pool), torch.Generator().manual_seed(6)
    )
    assert chosen.shape == (draws, size)
    assert ((chosen >= 0) & (chosen < pool)).all()
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(pool), size))}
    observed = np.zeros(len(subsets))
    for row in chosen.tolist():
        assert len(set(row)) == size
        observed[subsets[tuple(sorted(row))]] += 1
    assert chisquare(observed).pvalue > P_MIN


def test_floyd_with_ragged_counts_pads_with_minus_one():
    chosen = _choose_without_replacement(
        torch.tensor([0, 2, 4]), torch.tensor([5, 2, 10]), torch.Generator().manual_seed(0)
    )
    assert chosen.shape == (3, 4)
    assert (chosen[0] == -1).all()
    assert sorted(chosen[1, :2].tolist()) == [0, 1] and (chosen[1, 2:] == -1).all()
    assert len(set(chosen[2].tolist())) == 4 and (chosen[2] >= 0).all()


def test_non_candidate_positions_map_to_the_other_classes_in_order():
    classes = 12
    candidate_lists = [[0, 3, 4, 11], [5, 6], [1, 2, 7, 8, 9]]
    width = max(map(len, candidate_lists))
    columns = torch.tensor([c + [classes] * (width - len(c)) for c in candidate_lists])
    for row, candidates in enumerate(candidate_lists):
        others = [c for c in range(classes) if c not in candidates]
        positions = torch.arange(len(others)).unsqueeze(0)
        mapped = non_candidate_columns(positions, columns[row : row + 1], classes)
        assert mapped.squeeze(0).tolist() == others


def test_generator_reproducibility_and_default_generator():
    scores = 5.0 * torch.randn(64, 1000, generator=torch.Generator().manual_seed(7))

    def draw(seed):
        return sample_kth_largest_lazy(
            scores, 6, 1.0, 5, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(0)
    values, indices = sample_kth_largest_lazy(scores, 6, 1.0, 5)
    assert values.shape == indices.shape == (64, 5)


def test_operator_with_lazy_sampler_has_unit_gradient_rows():
    scores = (
        5.0 * torch.randn(32, 600, generator=torch.Generator().manual_seed(8))
    ).requires_grad_()
    value = smoothed_kth_largest(
        scores, 6, epsilon=1.0, n_samples=5, sampler="lazy", generator=torch.Generator()
    )
    (grad,) = torch.autograd.grad(value.sum(), scores)
    torch.testing.assert_close(grad.sum(dim=1), torch.ones(32))
    with pytest.raises(ValueError, match="only supported with sampler='full'"):
        smoothed_kth_largest(
            scores, 2, epsilon=1.0, n_samples=1, sampler="lazy", noise=torch.zeros(1, 32, 600)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lazy_matches_full_sampling_in_distribution():
    classes, k, epsilon, n_samples, repeats = 50, 3, 0.5, 5, 2000
    kinds = row_types(classes, seed=0)
    scores = interleaved(kinds, repeats).cuda()
    lazy_values, lazy_indices = sample_kth_largest_lazy(
        scores,
        k,
        epsilon,
        n_samples,
        generator=torch.Generator(device="cuda").manual_seed(1),
        delta=1.5,
        max_expected_proposals=3.0,
    )
    full_values, full_indices = sample_kth_largest_full(
        scores, k, epsilon, n_samples, generator=torch.Generator(device="cuda").manual_seed(2)
    )
    for kind in range(len(kinds)):
        ks, chi, tv, tv_limit = distribution_gap(
            lazy_values[kind :: len(kinds)].cpu(),
            lazy_indices[kind :: len(kinds)].cpu(),
            full_values[kind :: len(kinds)].cpu(),
            full_indices[kind :: len(kinds)].cpu(),
            classes,
        )
        assert ks > P_MIN and chi > P_MIN and tv < tv_limit, (kind, ks, chi, tv)
