"""Exact lazy sampling of the k-th largest of `scores + epsilon * Z`, Z ~ N(0, I).

Full sampling draws rows * classes * n_samples normals, so on a CPU the smoothed loss is bound by
random-number generation. Only the classes whose noised score can reach the top k matter, and
they can be found without changing the distribution. Per row, with s_(k) its k-th largest score:

1. candidates: the classes with s_j > tau, tau <= s_(k) - delta, where delta makes the expected
   number of other classes crossing s_(k) small; every other class has s_j <= tau (found with
   one pass over the scores: block maxima, then only the blocks above tau are read);
2. draw noise for the candidates only; T_c = the k-th largest noised candidate, a lower bound of
   the true k-th largest noised value;
3. given the candidates' noise, each other class j crosses T_c independently with probability
   p_j = P(Z > a_j), a_j = (T_c - s_j) / eps, and p_j <= p_max = P(Z > (T_c - tau) / eps). Draw
   the proposals exactly: a Binomial(n_other, p_max) count of classes chosen uniformly without
   replacement among the others (Floyd's algorithm), each kept with probability p_j / p_max, and
   give each kept class a normal draw truncated to exceed a_j (inverse CDF);
4. the k-th largest of the candidates and the kept classes is then exactly distributed as under
   full sampling, and so is its index (the gradient's one-hot).

Fallbacks keep it exact and bounded: a row whose candidate set would be large (close scores,
large eps; a decision made from the scores alone) is sampled in full; a draw whose expected
number of proposals is large (a decision from the candidates' noise alone) keeps that noise and
draws the other classes' noise in full. Neither depends on the other classes' noise, so the
output distribution is unchanged.

This is a CPU optimisation: on a GPU (measured on an H200) random numbers are cheap and the
bookkeeping's host synchronisations cost more than they save, so there the automatic settings
sample in full (passing `delta` forces the lazy path on any device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from topk.full_sampling import sample_kth_largest_full
from topk.lazy_candidates import candidate_sets, find_candidates, non_candidate_columns

# Expected proposals per draw that the candidate threshold aims for (at T_c ~ s_(k)).
_TARGET_PROPOSALS = 0.25
# A draw whose expected proposals exceed this is sampled in full instead (bounded work).
DEFAULT_MAX_EXPECTED_PROPOSALS = 16.0
# Below this many classes full sampling is as cheap as the bookkeeping.
_MIN_CLASSES = 256


def _std_normal_sf_inverse(probability: float) -> float:
    """z with P(Z > z) = probability, for 0 < probability < 1."""
    return -float(torch.special.ndtri(torch.tensor(probability, dtype=torch.float64)))


def _choose_without_replacement(
    counts: torch.Tensor, pool_sizes: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform random subsets by Floyd's algorithm, one per draw: [draws, max(counts)] positions
    in [0, pool_size), -1 past each draw's count. counts <= pool_sizes (int64 [draws])."""
    width = int(counts.max())
    chosen = torch.full((counts.numel(), width), -1, dtype=torch.long, device=counts.device)
    uniforms = torch.rand(
        counts.numel(), width, dtype=torch.float64, device=counts.device, generator=generator
    )
    for step in range(width):
        active = step < counts
        upper = pool_sizes - counts + step  # inclusive: pick uniformly in [0, upper]
        pick = torch.floor(uniforms[:, step] * (upper + 1).double()).long()
        pick = torch.minimum(pick, upper)  # guard against rounding at the top
        taken = (chosen[:, :step] == pick.unsqueeze(1)).any(dim=1)
        pick = torch.where(taken, upper, pick)
        chosen[:, step] = torch.where(active, pick, -1)
    return chosen


@torch.no_grad()
def sample_kth_largest_lazy(
    scores: torch.Tensor,
    k: int,
    epsilon: float,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    delta: float | None = None,
    max_expected_proposals: float = DEFAULT_MAX_EXPECTED_PROPOSALS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw k-th largest of `scores + epsilon * Z`, drawing noise only where it can matter.

    Same contract and same output distribution as topk.full_sampling.sample_kth_largest_full:
    scores [rows, classes] float32/float64, epsilon > 0; returns (values [rows, n_samples] in
    the scores' dtype, indices [rows, n_samples] int64). Draws come from `generator` (on the
    scores' device) or the device's default generator; the stream differs from full sampling.
    delta: the candidate margin below s_(k) (None: chosen so that few other classes are
    expected to cross; setting it also turns off the whole-batch shortcuts, for tests).
    max_expected_proposals: draws expecting more proposals are sampled in full.
    """
    rows, classes = scores.shape
    device = scores.device
    scores = scores.contiguous()  # the candidate search reads the flat storage
    automatic = delta is None
    # On a GPU the random numbers are cheap and every host synchronisation costs more than
    # they do: full sampling measured faster there at every size (see the module docstring).
    if automatic and (classes < _MIN_CLASSES or device.type != "cpu"):
        return sample_kth_largest_full(scores, k, epsilon, n_samples, generator=generator)
    if delta is None:
        delta = epsilon * _std_normal_sf_inverse(_TARGET_PROPOSALS / classes)

    # Candidate noise is [rows, n_samples, candidates]: keep it within O(rows * classes).
    max_candidates = max(k, classes // (2 * n_samples)) if automatic else classes
    # Each hit block holds a candidate; few blocks also bound the search's memory.
    max_blocks = max(1, max_candidates // 4) if automatic else classes
    tau, searched, row_of, column, candidate_score = find_candidates(scores, k, delta, max_blocks)
    counts = torch.bincount(row_of, minlength=rows)
    lazy_row = searched & (counts <= max_candidates)
    n_lazy = int(lazy_row.sum())
    if automatic and n_lazy * 2 < rows:
        return sample_kth_largest_full(scores, k, epsilon, n_samples, generator=generator)
    if n_lazy == rows:
        return _sample_lazy_rows(
            scores,
            (row_of, column, candidate_score, counts),
            tau,
            k,
            epsilon,
            n_samples,
            generator,
            max_expected_proposals,
        )

    values = scores.new_empty(rows, n_samples)
    indices = torch.empty(rows, n_samples, dtype=torch.long, device=device)
    full_rows = (~lazy_row).nonzero().squeeze(1)
    full_values, full_indices = sample_kth_largest_full(
        scores[full_rows], k, epsilon, n_samples, generator=generator
    )
    values[full_rows] = full_values
    indices[full_rows] = full_indices
    lazy_rows = lazy_row.nonzero().squeeze(1)
    new_row = torch.cumsum(lazy_row, 0) - 1  # row -> its index among the lazy rows
    keep = lazy_row[row_of]
    lazy_values, lazy_indices = _sample_lazy_rows(
        scores[lazy_rows],
        (new_row[row_of[keep]], column[keep], candidate_score[keep], counts[lazy_rows]),
        tau[lazy_rows],
        k,
        epsilon,
        n_samples,
        generator,
        max_expected_proposals,
    )
    values[lazy_rows] = lazy_values
    indices[lazy_rows] = lazy_indices
    return values, indices


@dataclass
class _Draws:
    """The draws of the lazy rows, row-major: draw d belongs to row d // n_samples."""

    row: torch.Tensor  # [draws] int64
    noised: torch.Tensor  # [draws, width]: the candidates' noised scores, in their sets' order
    values: torch.Tensor  # [draws]: T_c, then the k-th largest noised value
    columns: torch.Tensor  # [draws] int64: the class holding it


def _sample_lazy_rows(
    scores: torch.Tensor,
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    threshold: torch.Tensor,
    k: int,
    epsilon: float,
    n_samples: int,
    generator: torch.Generator | None,
    max_expected_proposals: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 for rows whose candidates are every class with a score above `threshold`
    [rows], at least k per row, given as (row_of, column, score, counts) as find_candidates
    and bincount make them. Returns (values, indices) [rows, n_samples] as the caller's."""
    rows, classes = scores.shape
    row_of, column, candidate_score, candidate_counts = candidates
    columns, candidate_scores = candidate_sets(
        rows, classes, row_of, column, candidate_score, candidate_counts
    )
    draws = _noise_candidates(columns, candidate_scores, k, epsilon, n_samples, generator)

    # Step 3: how many of the other classes each draw proposes (a draw expecting too many is
    # sampled in full instead), then which ones, and which of those cross T_c.
    others = (classes - candidate_counts)[draws.row]  # [draws]
    t_c = draws.values.double()
    log_p_max = torch.special.log_ndtr((threshold[draws.row].double() - t_c) / epsilon)
    in_full = others.double() * log_p_max.exp() > max_expected_proposals
    proposal_counts = torch.binomial(
        others.double(), log_p_max.exp().clamp(max=1.0), generator=generator
    ).long()
    proposal_counts = torch.where(in_full, 0, torch.minimum(proposal_counts, others))
    proposing = (proposal_counts > 0).nonzero().squeeze(1)
    if proposing.numel():
        positions = _choose_without_replacement(
            proposal_counts[proposing], others[proposing], generator
        )
        _merge_crossings(
            scores,
            columns,
            draws,
            proposing,
            positions,
            (t_c[proposing], log_p_max[proposing]),
            k,
            epsilon,
            generator,
        )
    _sample_in_full(scores, columns, draws, in_full.nonzero().squeeze(1), k, epsilon, generator)
    return draws.values.reshape(rows, n_samples), draws.columns.reshape(rows, n_samples)


def _noise_candidates(
    columns: torch.Tensor,
    candidate_scores: torch.Tensor,
    k: int,
    epsilon: float,
    n_samples: int,
    generator: torch.Generator | None,
) -> _Draws:
    """Steps 1-2: noise for the candidates only (columns, candidate_scores [rows, width] from
    candidate_sets), n_samples draws per row; T_c, the k-th largest noised candidate, per draw."""
    rows, width = candidate_scores.shape
    device = candidate_scores.device
    candidate_noise = torch.randn(
        rows, n_samples, width, dtype=candidate_scores.dtype, device=device, generator=generator
    )
    noised = candidate_scores.unsqueeze(1) + epsilon * candidate_noise
    top = torch.topk(noised, k, dim=2)
    row = torch.arange(rows, device=device).repeat_interleave(n_samples)
    return _Draws(
        row=row,
        noised=noised.reshape(-1, width),
        values=top.values[..., k - 1].reshape(-1),
        columns=columns[row, top.indices[..., k - 1].reshape(-1)],
    )


def _merge_crossings(
    scores: torch.Tensor,
    columns: torch.Tensor,
    draws: _Draws,
    proposing: torch.Tensor,
    positions: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    k: int,
    epsilon: float,
    generator: torch.Generator | None,
) -> None:
    """Step 3 for the draws `proposing` [m]: the proposed classes (positions [m, width] among the
    row's non-candidates, -1 past each draw's count) cross T_c with probability p_j / p_max,
    with a normal truncated to exceed a_j; then each draw's k-th largest of its candidates and
    its crossing classes replaces T_c in `draws`. bounds: (T_c, log p_max) [m] float64."""
    t_c, log_p_max = bounds
    classes = scores.shape[1]
    rows = draws.row[proposing]
    valid = positions >= 0
    proposed = non_candidate_columns(positions.clamp(min=0), columns[rows], classes)
    proposed = torch.where(valid, proposed, 0)
    proposed_scores = scores[rows.unsqueeze(1), proposed].double()
    a = (t_c.unsqueeze(1) - proposed_scores) / epsilon  # cross iff Z > a
    log_p = torch.special.log_ndtr(-a)
    accept = torch.rand(a.shape, dtype=torch.float64, device=a.device, generator=generator)
    keep = valid & (accept.log() < log_p - log_p_max.unsqueeze(1))
    # Z | Z > a by the inverse CDF of the upper tail; clamp against rounding below a.
    tail = torch.rand(a.shape, dtype=torch.float64, device=a.device, generator=generator)
    z = (-torch.special.ndtri(tail * log_p.exp())).maximum(a)
    crossing = torch.where(keep, proposed_scores + epsilon * z, -math.inf).to(scores.dtype)
    merged = torch.cat([draws.noised[proposing], crossing], dim=1)
    merged_columns = torch.cat([columns[rows], proposed], dim=1)
    best = torch.topk(merged, k, dim=1)
    draws.values[proposing] = best.values[:, k - 1]
    draws.columns[proposing] = merged_columns.gather(1, best.indices[:, k - 1 : k]).squeeze(1)


def _sample_in_full(
    scores: torch.Tensor,
    columns: torch.Tensor,
    draws: _Draws,
    fallback: torch.Tensor,
    k: int,
    epsilon: float,
    generator: torch.Generator | None,
) -> None:
    """The fallback draws [m]: keep the candidates' noise, draw every other class's noise in
    full, a block of at most `rows` draws at a time (memory O(rows * classes)); their k-th
    largest replaces T_c in `draws`."""
    rows, classes = scores.shape
    for start in range(0, fallback.numel(), rows):
        block = fallback[start : start + rows]
        block_rows = draws.row[block]
        full = torch.randn(
            block.numel(),
            classes + 1,
            dtype=scores.dtype,
            device=scores.device,
            generator=generator,
        )
        full[:, :classes].mul_(epsilon).add_(scores[block_rows])
        # Candidate columns (padding points at the spare last column) get their drawn values.
        full.scatter_(1, columns[block_rows], draws.noised[block])
        best = torch.topk(full[:, :classes], k, dim=1)
        draws.values[block] = best.values[:, k - 1]
        draws.columns[block] = best.indices[:, k - 1]
