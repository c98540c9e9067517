"""Step 1 of exact lazy sampling (topk.lazy_sampling): the candidate classes of each row.

The candidates of a row are its classes with a score above a threshold tau <= s_(k) - delta;
every other class (a non-candidate) can only enter the top k through a proposal, and is named
by its position among the row's non-candidates.
"""

from __future__ import annotations

import math

import torch

# Classes per block in the candidate search (one maximum per block in the first pass).
BLOCK = 32


def find_candidates(
    scores: torch.Tensor, k: int, delta: float, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class with s_j > tau, per row, where tau <= s_(k) - delta.

    Returns (tau [rows], searched [rows] bool, row_of [m], column [m], candidate scores [m]) with
    the m candidates grouped by row, columns ascending within a row. One pass over the scores
    (the maximum of each block of BLOCK classes) finds the blocks that can hold a candidate;
    only those are read again, and only in rows with at most `max_blocks` of them (`searched`;
    the other rows have more than max_blocks candidates and get none listed), so the work and
    memory stay small where candidates are few. tau comes from the k-th largest block maximum,
    a lower bound of s_(k) (equal unless two of the top k share a block): a lower tau only adds
    candidates.
    """
    rows, classes = scores.shape
    whole = classes // BLOCK
    tail = scores[:, whole * BLOCK :]  # the last classes % BLOCK classes
    if whole < k:  # fewer blocks than k: take s_(k) itself and read every class
        tau = torch.topk(scores, k, dim=1).values[:, k - 1] - delta
        above = scores > tau.unsqueeze(1)
        searched = above.sum(dim=1) <= max_blocks * BLOCK
        row_of, column = (above & searched.unsqueeze(1)).nonzero(as_tuple=True)
        return tau, searched, row_of, column, scores[row_of, column]

    blocks = torch.unflatten(scores[:, : whole * BLOCK], 1, (whole, BLOCK))  # a view
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
    windows = scores.reshape(-1).unfold(0, BLOCK, 1)  # window i: flat scores i .. i + BLOCK
    hit_scores = windows.index_select(0, hit_row * classes + hit_index * BLOCK)
    hit, offset = (hit_scores > tau[hit_row].unsqueeze(1)).nonzero(as_tuple=True)
    row_of = hit_row[hit]
    column = hit_index[hit] * BLOCK + offset
    candidate_score = hit_scores[hit, offset]
    if tail.shape[1]:
        tail_row, tail_offset = tail_above.nonzero(as_tuple=True)
        if tail_row.numel():
            # Tail classes come last in a row: merge by (row, column) order.
            row_of = torch.cat([row_of, tail_row])
            column = torch.cat([column, tail_offset + whole * BLOCK])
            candidate_score = torch.cat([candidate_score, tail[tail_row, tail_offset]])
            order = torch.argsort(row_of * classes + column)
            row_of, column, candidate_score = row_of[order], column[order], candidate_score[order]
    return tau, searched, row_of, column, candidate_score


def candidate_sets(
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


def non_candidate_columns(
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
