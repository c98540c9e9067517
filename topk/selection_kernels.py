"""The Triton kernels of the fused noised selection (topk.fused_selection describes them).

Importing this module imports triton: topk.selection_launch imports it on first use only.
Kernel parameters carry only Triton's own annotations (tl.constexpr): Triton reads annotations
to specialise a kernel, so the pointers and scalars stay unannotated, and pyproject.toml lets
this module's functions go untyped. The @triton.jit helpers are inlined into the kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def select_forward(
    scores_ptr,
    labels_ptr,
    noise_ptr,
    seed_ptr,
    values_ptr,
    indices_ptr,
    label_scores_ptr,
    bad_ptr,
    margins_ptr,
    arrivals_ptr,
    hinge_ptr,
    margin,
    scale,
    classes,
    row_stride,
    noise_draw_stride,
    noise_row_stride,
    n_draws,
    epsilon,
    RANK: tl.constexpr,  # j: keep the j-th largest (1-based)
    RANK_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HINGE: tl.constexpr,  # finish the hinge of the row: needs HAS_LABELS
    HAS_MARGINS: tl.constexpr,  # per-class margins (else the scalar `margin`)
    DRAWS_PAD: tl.constexpr,
):
    """One program: one row, four draws. Streams the row in blocks and keeps each draw's RANK
    largest noised values in registers; writes the RANK-th largest and its index per draw."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    # Float arguments in float32 whoever launches: under torch.compile, Inductor passes Python
    # floats as float64, which would turn the loop-carried selection state into float64.
    epsilon = tl.cast(epsilon, tl.float32)
    draw = group * 4 + tl.arange(0, 4)
    live = draw < n_draws
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, RANK_PAD)
    inf = float("inf")
    # Each draw's j largest so far, unordered; padding slots hold +inf and are never replaced.
    kept = tl.zeros([4, RANK_PAD], tl.float32) + tl.where(slots < RANK, -inf, inf)[None, :]
    kept_index = tl.zeros([4, RANK_PAD], tl.int32)
    floor = tl.full([4], -inf, tl.float32)  # the smallest kept value: what a new one must beat
    nonfinite = tl.zeros([BLOCK], tl.int32)
    row_start = row.to(tl.int64) * row_stride
    seed = tl.load(seed_ptr)
    for start in range(0, classes, BLOCK):
        c = start + cols
        inside = c < classes
        x = tl.load(scores_ptr + row_start + c, mask=inside, other=0.0).to(tl.float32)
        finite = (x == x) & (tl.abs(x) < inf)
        nonfinite = nonfinite | (inside & ~finite).to(tl.int32)
        x = tl.where(finite, x, 0.0)  # keeps the selection defined; the row is flagged
        z = _block_noise(
            noise_ptr, seed, row, group, draw, c, classes, live, inside,
            noise_draw_stride, noise_row_stride, HAS_NOISE,
        )  # fmt: skip
        noised = tl.where(live[:, None] & inside[None, :], x[None, :] + epsilon * z, -inf)
        kept, kept_index, floor = _keep_largest(noised, start, cols, slots, kept, kept_index, floor)
    lowest = tl.argmin(kept, axis=1)
    chosen_index = tl.sum(tl.where(slots[None, :] == lowest[:, None], kept_index, 0), axis=1)
    out = row.to(tl.int64) * n_draws + draw
    tl.store(values_ptr + out, floor, mask=live)
    tl.store(indices_ptr + out, chosen_index.to(tl.int64), mask=live)
    if HINGE:
        _finish_hinge(
            scores_ptr, labels_ptr, values_ptr, margins_ptr, arrivals_ptr, hinge_ptr, bad_ptr,
            row, row_start, classes, n_draws, margin, scale, nonfinite, HAS_MARGINS, DRAWS_PAD,
        )  # fmt: skip
    elif group == 0:  # every program read the whole row; one of them writes the row's flags
        _write_row_flags(
            scores_ptr, labels_ptr, label_scores_ptr, bad_ptr,
            row, row_start, classes, nonfinite, HAS_LABELS,
        )  # fmt: skip


@triton.jit
def _block_noise(
    noise_ptr,
    seed,
    row,
    group,
    draw,
    c,
    classes,
    live,
    inside,
    noise_draw_stride,
    noise_row_stride,
    HAS_NOISE: tl.constexpr,
):
    """The standard normals of one block, [4 draws, BLOCK classes]: read from the noise tensor,
    or made by Philox from the seed (one randn4x call gives the four draws)."""
    if HAS_NOISE:
        offsets = (
            draw[:, None].to(tl.int64) * noise_draw_stride
            + row.to(tl.int64) * noise_row_stride
            + c[None, :]
        )
        z = tl.load(noise_ptr + offsets, mask=live[:, None] & inside[None, :], other=0.0)
        z = z.to(tl.float32)
    else:
        counter = (row.to(tl.int64) * tl.num_programs(1) + group) * classes + c
        z0, z1, z2, z3 = tl.randn4x(seed, counter)
        d = tl.arange(0, 4)[:, None]
        z = tl.where(
            d == 0,
            z0[None, :],
            tl.where(d == 1, z1[None, :], tl.where(d == 2, z2[None, :], z3[None, :])),
        )
    return z


@triton.jit
def _keep_largest(noised, start, cols, slots, kept, kept_index, floor):
    """Move a block's noised values [4, BLOCK] that beat each draw's floor into its kept set,
    one at a time; after the first blocks most blocks hold none, and the loop body never runs.
    Returns the new (kept, kept_index, floor)."""
    inf = float("inf")
    block_max = tl.max(noised, axis=1)
    while tl.max((block_max > floor).to(tl.int32), axis=0) > 0:
        where_max = tl.argmax(noised, axis=1)
        accept = block_max > floor
        lowest = tl.argmin(kept, axis=1)
        replace = (slots[None, :] == lowest[:, None]) & accept[:, None]
        kept = tl.where(replace, block_max[:, None], kept)
        kept_index = tl.where(replace, (start + where_max)[:, None], kept_index)
        floor = tl.min(kept, axis=1)
        noised = tl.where(cols[None, :] == where_max[:, None], -inf, noised)
        block_max = tl.max(noised, axis=1)
    return kept, kept_index, floor


@triton.jit
def _finish_hinge(
    scores_ptr,
    labels_ptr,
    values_ptr,
    margins_ptr,
    arrivals_ptr,
    hinge_ptr,
    bad_ptr,
    row,
    row_start,
    classes,
    n_draws,
    margin,
    scale,
    nonfinite,
    HAS_MARGINS: tl.constexpr,
    DRAWS_PAD: tl.constexpr,
):
    """The last of the row's programs to arrive finishes the row: the mean over draws (read back
    in draw order, so the sum is the same on every run), the label score, the margin, the hinge
    and the row's flag. acq_rel orders every program's stores before its arrival."""
    margin = tl.cast(margin, tl.float32)  # float32 whoever launches, as epsilon
    scale = tl.cast(scale, tl.float32)
    arrived = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        d = tl.arange(0, DRAWS_PAD)
        row_values = tl.load(
            values_ptr + row.to(tl.int64) * n_draws + d,
            mask=d < n_draws,
            other=0.0,
            cache_modifier=".cg",
        )
        mean = tl.sum(row_values, axis=0) / n_draws
        label = tl.load(labels_ptr + row).to(tl.int64)
        label_ok = (label >= 0) & (label < classes)
        safe = tl.where(label_ok, label, 0)
        label_score = tl.load(scores_ptr + row_start + safe).to(tl.float32)
        if HAS_MARGINS:  # noqa: SIM108 - a compile-time branch in Triton
            row_margin = tl.load(margins_ptr + safe)
        else:
            row_margin = margin
        hinge = scale * tl.maximum(row_margin + mean - label_score, 0.0)
        tl.store(hinge_ptr + row, hinge)
        bad = tl.max(nonfinite, axis=0) | (~label_ok).to(tl.int32)
        tl.store(bad_ptr + row, bad.to(tl.int8))


@triton.jit
def _write_row_flags(
    scores_ptr,
    labels_ptr,
    label_scores_ptr,
    bad_ptr,
    row,
    row_start,
    classes,
    nonfinite,
    HAS_LABELS: tl.constexpr,
):
    """The row's flag (a non-finite score, or a label out of range) and, with labels, its label
    score."""
    bad = tl.max(nonfinite, axis=0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        label_ok = (label >= 0) & (label < classes)
        label_score = tl.load(scores_ptr + row_start + tl.where(label_ok, label, 0))
        tl.store(label_scores_ptr + row, label_score.to(tl.float32))
        bad = bad | (~label_ok).to(tl.int32)
    tl.store(bad_ptr + row, bad.to(tl.int8))


@triton.jit
def select_backward(
    grad_ptr,
    indices_ptr,
    labels_ptr,
    row_grad_ptr,  # the gradient of each row's value (its hinge, or its k-th largest)
    hinge_ptr,
    scale,
    classes,
    grad_row_stride,
    n_draws,
    DRAWS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    HINGE: tl.constexpr,
):
    """grad[r, c] = w_r * (count_r(c) / n - [c == y_r]) for the hinge, with w_r the row's
    gradient times scale where the hinge is active (else 0); g_r * count_r(c) / n for the
    k-th largest. count_r(c), the draws of row r that selected class c, is exact."""
    row = tl.program_id(0)
    scale = tl.cast(scale, tl.float32)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DRAWS_PAD)
    chosen = tl.load(indices_ptr + row.to(tl.int64) * n_draws + d, mask=d < n_draws, other=-1)
    count = tl.sum((chosen[:, None] == c[None, :]).to(tl.int32), axis=0)
    weight = tl.load(row_grad_ptr + row).to(tl.float32)
    if HINGE:
        active = tl.load(hinge_ptr + row) > 0.0
        weight = tl.where(active, weight * scale, 0.0)
    grad = count.to(tl.float32) * (weight / n_draws)
    if HINGE:
        label = tl.load(labels_ptr + row).to(tl.int64)
        grad = grad - tl.where(c == label, weight, 0.0)
    target = grad_ptr + row.to(tl.int64) * grad_row_stride + c
    tl.store(target, grad.to(grad_ptr.dtype.element_ty), mask=c < classes)
