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

import torch

from topk.smoothing import sample_kth_largest_full

# Expected proposals per draw that the candidate threshold aims for (at T_c ~ s_(k)).
_TARGET_PROPOSALS = 0.25
# A draw whose expected proposals exceed this is sampled in full instead (bounded work).
DEFAULT_MAX_EXPECTED_PROPOSALS = 16.0
# Below this many classes full sampling is as cheap as the bookkeeping.
_MIN_CLASSES = 256
# Classes per block in the candidate search (one maximum per block in the first pass).
_BLOCK = 32


def _std_normal_sf_inverse(probability: float) -> float:
    """z with P(Z > z) = probability, for 0 < probability < 1."""
    return -float(torch.special.ndtri(torch.tensor(probability, dtype=torch.float64)))


def _find_candidates(
    scores: torch.Tensor, k: int, delta: float, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class with s_j > tau, per row, where tau <= s_(k) - delta.

    Returns (tau [rows], searched [rows] bool, row_of [m], column [m], candidate scores [m]) with
    the m candidates grouped by row, columns ascending within a row. One pass over the scores
    (the maximum of each block of _BLOCK classes) finds the blocks that can hold a candidate;
    only those are read again, and only in rows with at most `max_blocks` of them (`searched`;
    the other rows have more than max_blocks candidates and get none listed), so the work and
    memory stay small where candidates are few. tau comes from the k-th largest block maximum,
    a lower bound of s_(k) (equal unless two of the top k share a block): a lower tau only adds
    candidates.
    """
    rows, classes = scores.shape
    whole = classes // _BLOCK
    tail = scores[:, whole * _BLOCK :]  # the last classes % _BLOCK classes
    if whole < k:  # fewer blocks than k: take s_(k) itself and read every class
        tau = torch.topk(scores, k, dim=1).values[:, k - 1] - delta
        above = scores > tau.unsqueeze(1)
        searched = above.sum(dim=1) <= max_blocks * _BLOCK
        row_of, column = (above & searched.unsqueeze(1)).nonzero(as_tuple=True)
        return tau, searched, row_of, column, scores[row_of, column]

    blocks = scores[:, : whole * _BLOCK].unflatten(1, (whole, _BLOCK))  # a view
    block_max = blocks.amax(dim=2)  # [rows, whole]
    tau = torch.topk(block_max, k, dim=1).values[:, k - 1] - delta
    hit_block = block_max > tau.unsqueeze(1)
    tail_above = tail > tau.unsqueeze(1)
    searched = hit_block.sum(dim=1) + tail_above.any(dim=1) <= max_blocks
    hit_block &= searched.unsqueeze(1)
    tail_above &= searched.unsqueeze(1)

    hit_row, hit_index = hit_block.nonzero(as_tuple=True)
    # Copy each hit block with index_select over overlapping windows of the flat scores:
    # tens of times faster than advanced indexing, which gathers element by element.
    windows = scores.reshape(-1).unfold(0, _BLOCK, 1)  # window i: flat scores i .. i + _BLOCK
    hit_scores = windows.index_select(0, hit_row * classes + hit_index * _BLOCK)
    hit, offset = (hit_scores > tau[hit_row].unsqueeze(1)).nonzero(as_tuple=True)
    row_of = hit_row[hit]
    column = hit_index[hit] * _BLOCK + offset
    candidate_score = hit_scores[hit, offset]
    if tail.shape[1]:
        tail_row, tail_offset = tail_above.nonzero(as_tuple=True)
        if tail_row.numel():
            # Tail classes come last in a row: merge by (row, column) order.
            row_of = torch.cat([row_of, tail_row])
            column = torch.cat([column, tail_offset + whole * _BLOCK])
            candidate_score = torch.cat([candidate_score, tail[tail_row, tail_offset]])
            order = torch.argsort(row_of * classes + column)
            row_of, column, candidate_score = row_of[order], column[order], candidate_score[order]
    return tau, searched, row_of, column, candidate_score


def _candidate_sets(
    rows: int,
    classes: int,
    row_of: torch.Tensor,
    column: torch.Tensor,
    candidate_score: torch.Tensor,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the candidates (grouped by row, ascending columns; counts [rows] per row, >= 1) to
    (columns [rows, width] padded with `classes`, scores [rows, width] padded with -inf)."""
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row_of.numel(), device=row_of.device) - starts[row_of]
    columns = torch.full((rows, width), classes, dtype=torch.long, device=row_of.device)
    columns[row_of, slot] = column
    candidate_scores = torch.full(
        (rows, width), -math.inf, dtype=candidate_score.dtype, device=row_of.device
    )
    candidate_scores[row_of, slot] = candidate_score
    return columns, candidate_scores


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


def _non_candidate_columns(
    positions: torch.Tensor, columns: torch.Tensor, classes: int
) -> torch.Tensor:
    """Map positions among a row's non-candidates to class indices.

    positions: [draws, m] (>= 0); columns: [draws, width] the candidate columns, ascending,
    padded with `classes`. The p-th non-candidate is p + #{i : columns_i - i <= p}.
    """
    # Padding (`classes`) must stay at the top for `shifted` to ascend.
    shifted = columns - torch.arange(columns.shape[1], device=columns.device)
    shifted = torch.where(columns == classes, classes, shifted)
    return positions + torch.searchsorted(shifted.contiguous(), positions.contiguous(), right=True)


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

    Same contract and same output distribution as topk.smoothing.sample_kth_largest_full:
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
    tau, searched, row_of, column, candidate_score = _find_candidates(scores, k, delta, max_blocks)
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
    [rows], at least k per row, given as (row_of, column, score, counts) as _find_candidates
    and bincount make them. Returns (values, indices) [rows, n_samples] as the caller's."""
    rows, classes = scores.shape
    device = scores.device
    row_of, column, candidate_score, candidate_counts = candidates
    # Step 1-2: candidates and their noise; T_c per draw. Shapes [rows, n_samples, width].
    columns, candidate_scores = _candidate_sets(
        rows, classes, row_of, column, candidate_score, candidate_counts
    )
    width = columns.shape[1]
    candidate_noise = torch.randn(
        rows, n_samples, width, dtype=scores.dtype, device=device, generator=generator
    )
    noised = candidate_scores.unsqueeze(1) + epsilon * candidate_noise
    top = torch.topk(noised, k, dim=2)
    draw_values = top.values[..., k - 1].reshape(-1)  # T_c, [lazy * n_samples]
    draw_slot = top.indices[..., k - 1].reshape(-1)
    draw_row = torch.arange(rows, device=device).repeat_interleave(n_samples)
    noised = noised.reshape(-1, width)  # [draws, width]

    # Step 3: proposals among the other classes, per draw.
    others = (classes - candidate_counts)[draw_row]  # [draws]
    threshold_draw = threshold[draw_row].double()
    t_c = draw_values.double()
    log_p_max = torch.special.log_ndtr((threshold_draw - t_c) / epsilon)
    expected = others.double() * log_p_max.exp()
    in_full = expected > max_expected_proposals
    proposal_counts = torch.binomial(
        others.double(), log_p_max.exp().clamp(max=1.0), generator=generator
    ).long()
    proposal_counts = torch.where(in_full, 0, torch.minimum(proposal_counts, others))

    proposing = (proposal_counts > 0).nonzero().squeeze(1)
    if proposing.numel():
        prop_rows = draw_row[proposing]
        positions = _choose_without_replacement(
            proposal_counts[proposing], others[proposing], generator
        )
        valid = positions >= 0
        prop_columns = _non_candidate_columns(positions.clamp(min=0), columns[prop_rows], classes)
        prop_columns = torch.where(valid, prop_columns, 0)
        prop_scores = scores[prop_rows.unsqueeze(1), prop_columns].double()
        a = (t_c[proposing].unsqueeze(1) - prop_scores) / epsilon  # cross iff Z > a
        log_p = torch.special.log_ndtr(-a)
        accept = torch.rand(a.shape, dtype=torch.float64, device=device, generator=generator)
        keep = valid & (accept.log() < log_p - log_p_max[proposing].unsqueeze(1))
        # Z | Z > a by the inverse CDF of the upper tail; clamp against rounding below a.
        tail = torch.rand(a.shape, dtype=torch.float64, device=device, generator=generator)
        z = (-torch.special.ndtri(tail * log_p.exp())).maximum(a)
        prop_values = torch.where(keep, prop_scores + epsilon * z, -math.inf).to(scores.dtype)
        merged = torch.cat([noised[proposing], prop_values], dim=1)
        merged_columns = torch.cat([columns[prop_rows], prop_columns], dim=1)
        best = torch.topk(merged, k, dim=1)
        draw_values[proposing] = best.values[:, k - 1]
        draw_slot_columns = merged_columns.gather(1, best.indices[:, k - 1 : k]).squeeze(1)
    draw_columns = columns[draw_row, draw_slot]
    if proposing.numel():
        draw_columns[proposing] = draw_slot_columns

    # Fallback draws: keep the candidates' noise, draw every other class's noise in full,
    # a block of at most `rows` draws at a time (memory O(rows * classes)).
    fallback = in_full.nonzero().squeeze(1)
    for start in range(0, fallback.numel(), rows):
        block = fallback[start : start + rows]
        block_rows = draw_row[block]
        full = torch.randn(
            block.numel(), classes + 1, dtype=scores.dtype, device=device, generator=generator
        )
        full[:, :classes].mul_(epsilon).add_(scores[block_rows])
        # Candidate columns (padding points at the spare last column) get their drawn values.
        full.scatter_(1, columns[draw_row[block]], noised[block])
        best = torch.topk(full[:, :classes], k, dim=1)
        draw_values[block] = best.values[:, k - 1]
        draw_columns[block] = best.indices[:, k - 1]

    return draw_values.reshape(rows, n_samples), draw_columns.reshape(rows, n_samples)
