"""The noised top-j selection in one Triton kernel, and the noised hinge built on it (the GPU path).

For each row of scores [rows, classes] and each of n draws, the forward kernel makes the Gaussian
noise from a counter-based generator (Philox, keyed by one 62-bit seed drawn from the caller's
torch.Generator), adds it to the scores and keeps the j-th largest noised value and its index.
Nothing of size [rows, classes, n] or even [rows, classes] is written: one program handles one row
and four draws (a Philox call gives four normals), streams the row through in blocks, and keeps
the four draws' j largest in registers. The backward writes the whole gradient in one pass from
the [rows, n] selected indices: an exact integer count per class times g / n (one rounding), minus
the label's one-hot for the hinge.

Same distribution as the pure-PyTorch reference (topk.smoothing.sample_kth_largest_full), and the
same values and indices when both are given the same noise tensor; the tests check both, on a
CPU through Triton's interpreter (TRITON_INTERPRET=1).

No host synchronisation anywhere: the seed stays on the device, non-finite scores and labels out
of range are flagged per row on the device (the caller turns the loss into NaN), and every shape
is known before launch. Works under CUDA-graph capture.

`BACKEND` picks the path of the losses and of topk.smoothing: "auto" (Triton for float32 and
half-precision CUDA tensors when Triton imports, PyTorch otherwise), "triton" (also on a CPU,
which needs TRITON_INTERPRET=1 set before the first call; for tests) or "torch".
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKEND = "auto"
BACKENDS = ("auto", "triton", "torch")

DRAWS_PER_PROGRAM = 4  # one Philox call gives four normals: one per draw of a program
_MAX_BLOCK = 512  # classes per block of a forward program (best of 256..2048 on an H200)
_FWD_WARPS = 4  # warps of a forward program with a full block
_BWD_BLOCK = 1024
_BWD_MAX_DRAWS = 64  # above this the backward counts with PyTorch (index_put_, exact too)
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Looked up once, without importing triton; a plain constant is what torch.compile can trace.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def uses_triton(scores: torch.Tensor) -> bool:
    """Whether the noised selection of these scores runs in the Triton kernel (see BACKEND)."""
    if BACKEND not in BACKENDS:
        raise ValueError(f"topk.fused_selection.BACKEND must be one of {BACKENDS}, got {BACKEND!r}")
    if (
        BACKEND == "torch"
        or not isinstance(scores, torch.Tensor)  # the caller's checks name what is wrong
        or scores.dtype not in _FUSED_DTYPES
    ):
        return False
    if BACKEND == "triton":
        if not triton_importable():
            raise ValueError("BACKEND is 'triton' but triton is not installed")
        if scores.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the Triton kernels run on a CPU only with TRITON_INTERPRET=1")
        return True
    return scores.device.type == "cuda" and triton_importable()


_KERNELS: tuple | None = None


def _kernels() -> tuple:
    """The two kernels, defined on first use: importing this module does not import triton.
    A plain global rather than functools.cache, which torch.compile would not trace through."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _define_kernels()
    return _KERNELS


def _define_kernels():  # noqa: C901 - the two kernels live together
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
        row = tl.program_id(0)
        group = tl.program_id(1)
        # Float arguments in float32 whoever launches: under torch.compile, Inductor passes Python
        # floats as float64, which would turn the loop-carried selection state into float64.
        epsilon = tl.cast(epsilon, tl.float32)
        margin = tl.cast(margin, tl.float32)
        scale = tl.cast(scale, tl.float32)
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
            noised = tl.where(live[:, None] & inside[None, :], x[None, :] + epsilon * z, -inf)
            block_max = tl.max(noised, axis=1)
            # Move this block's winners into the kept set one at a time; after the first blocks
            # most blocks hold none, and the loop body never runs.
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
        lowest = tl.argmin(kept, axis=1)
        chosen_index = tl.sum(tl.where(slots[None, :] == lowest[:, None], kept_index, 0), axis=1)
        out = row.to(tl.int64) * n_draws + draw
        tl.store(values_ptr + out, floor, mask=live)
        tl.store(indices_ptr + out, chosen_index.to(tl.int64), mask=live)
        if HINGE:
            # The last of the row's programs to arrive finishes the row: the mean over draws
            # (read back in draw order, so the sum is the same on every run), the label score,
            # the margin and the hinge. acq_rel orders every program's stores before its arrival.
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
        elif group == 0:  # every program read the whole row; one of them writes the row's flags
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
        # grad[r, c] = w_r * (count_r(c) / n - [c == y_r]) for the hinge, with w_r the row's
        # gradient times scale where the hinge is active (else 0); g_r * count_r(c) / n for the
        # k-th largest. count_r(c), the draws of row r that selected class c, is exact.
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

    return select_forward, select_backward


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def draw_counts(shape: torch.Size, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """counts[r, c]: how many of row r's draws selected class c, exactly. indices [rows, n] int64;
    dtype float32 (exact below 2**24 draws) or float64.

    The 1.0s are added by an accumulating index_put_: integers add up exactly in any order, so
    the counts are the same on every run, and torch allows it under
    torch.use_deterministic_algorithms (scatter_add_ on CUDA it refuses).
    """
    rows, n_draws = indices.shape
    counts = torch.zeros(shape, dtype=dtype, device=indices.device)
    row_ids = torch.arange(rows, device=indices.device)[:, None].expand(rows, n_draws)
    ones = torch.ones((), dtype=dtype, device=indices.device).expand(rows, n_draws)
    return counts.index_put_((row_ids, indices), ones, accumulate=True)


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """One 62-bit Philox key, drawn on the device from `generator` (or the device's default).

    It stays a device tensor the kernel reads: no host synchronisation, and CUDA-graph capture
    records the draw with the rest (the default CUDA generator is graph-safe).
    """
    return torch.randint(0, 1 << 62, (1,), device=device, dtype=torch.int64, generator=generator)


def _launch_forward(
    scores: torch.Tensor,
    rank: int,
    epsilon: float,
    n_draws: int,
    seed: torch.Tensor | None,
    noise: torch.Tensor | None,
    labels: torch.Tensor | None,
    hinge: tuple[torch.Tensor | None, float, float] | None,
) -> tuple[torch.Tensor, ...]:
    """Run the forward kernel; hinge = (per-class margins or None, scalar margin, scale) makes
    the row's last program finish the hinge. Returns (values, indices, label_scores, bad,
    hinge_rows)."""
    select_forward, _ = _kernels()
    rows, classes = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    if labels is not None:
        labels = labels.contiguous()  # the kernel reads labels[row] at offset row
    device = scores.device
    values = torch.empty(rows, n_draws, dtype=torch.float32, device=device)
    indices = torch.empty(rows, n_draws, dtype=torch.int64, device=device)
    label_scores = torch.empty(
        rows if labels is not None else 0, dtype=torch.float32, device=device
    )
    bad = torch.empty(rows, dtype=torch.int8, device=device)
    if hinge is not None:
        margins, margin, scale = hinge
        arrivals = torch.zeros(rows, dtype=torch.int32, device=device)
        hinge_rows = torch.empty(rows, dtype=torch.float32, device=device)
    else:
        margins, margin, scale = None, 0.0, 1.0
        arrivals = hinge_rows = bad  # unread
    if noise is not None:
        if noise.stride(2) != 1:
            noise = noise.contiguous()
        noise_strides = (noise.stride(0), noise.stride(1))
        seed = indices  # unread
    else:
        assert seed is not None
        noise, noise_strides = scores, (0, 0)  # unread
    block = min(_MAX_BLOCK, next_power_of_two(classes))
    grid = (rows, -(-n_draws // DRAWS_PER_PROGRAM))
    select_forward[grid](
        scores,
        labels if labels is not None else indices,
        noise,
        seed,
        values,
        indices,
        label_scores,
        bad,
        margins if margins is not None else values,
        arrivals,
        hinge_rows,
        float(margin),
        float(scale),
        classes,
        scores.stride(0),
        noise_strides[0],
        noise_strides[1],
        n_draws,
        float(epsilon),
        RANK=rank,
        RANK_PAD=next_power_of_two(rank),
        BLOCK=block,
        HAS_NOISE=noise is not scores,
        HAS_LABELS=labels is not None,
        HINGE=hinge is not None,
        HAS_MARGINS=margins is not None,
        DRAWS_PAD=max(2, next_power_of_two(n_draws)),
        num_warps=_FWD_WARPS,
    )
    return values, indices, label_scores, bad, hinge_rows


def select_noised(
    scores: torch.Tensor,
    rank: int,
    epsilon: float,
    n_draws: int,
    *,
    seed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel: per row and draw, the rank-th largest of scores + epsilon * noise.

    scores: [rows, classes] float32/float16/bfloat16 (read as float32). Exactly one of seed (a
    [1] int64 device tensor, see draw_seed) or noise ([n_draws, rows, classes], any float dtype)
    gives the noise. labels: optional [rows] integers, to read the label scores in the same pass.
    Returns (values [rows, n_draws] float32, indices [rows, n_draws] int64, label scores [rows]
    float32 (empty without labels), bad [rows] bool: a non-finite score, or a label out of
    range). Checks no value; the caller has checked shapes and arguments.
    """
    values, indices, label_scores, bad, _ = _launch_forward(
        scores, rank, epsilon, n_draws, seed, noise, labels, None
    )
    return values, indices, label_scores, bad.bool()


def _launch_backward(
    shape: torch.Size,
    dtype: torch.dtype,
    indices: torch.Tensor,
    row_grad: torch.Tensor,
    hinge: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    rows, classes = shape
    n_draws = indices.shape[1]
    indices = indices.contiguous()  # the kernel reads row r's draws at r * n_draws
    if n_draws > _BWD_MAX_DRAWS:  # PyTorch counts instead, exactly as well
        weight = row_grad.float()
        if hinge is not None:
            labels, hinge_rows, scale = hinge
            weight = torch.where(hinge_rows > 0, weight * scale, 0.0)
        count_dtype = torch.float32 if n_draws < (1 << 24) else torch.float64
        counts = draw_counts(shape, indices, count_dtype)
        grad = counts.mul_((weight.to(count_dtype) / n_draws)[:, None])
        if hinge is not None:
            inside = (labels >= 0) & (labels < classes)
            label_weight = (weight * inside).to(count_dtype)
            grad.scatter_add_(1, labels.clamp(0, classes - 1)[:, None], -label_weight[:, None])
        return grad.to(dtype)
    _, select_backward = _kernels()
    grad = torch.empty(rows, classes, dtype=dtype, device=indices.device)
    block = min(_BWD_BLOCK, next_power_of_two(classes))
    labels, hinge_rows, scale = hinge if hinge is not None else (indices, indices, 1.0)
    labels, hinge_rows = labels.contiguous(), hinge_rows.contiguous()
    select_backward[(rows, -(-classes // block))](
        grad,
        indices,
        labels,
        row_grad.contiguous(),
        hinge_rows,
        float(scale),
        classes,
        grad.stride(0),
        n_draws,
        DRAWS_PAD=max(2, next_power_of_two(n_draws)),
        BLOCK=block,
        HINGE=hinge is not None,
        num_warps=4,
    )
    return grad


def selection_gradient(
    shape: torch.Size, dtype: torch.dtype, indices: torch.Tensor, row_grad: torch.Tensor
) -> torch.Tensor:
    """grad[r, c] = row_grad[r] * count_r(c) / n: the gradient of the mean over draws of the
    selected values. count_r(c): how many of row r's n draws selected class c (exact).
    indices [rows, n] int64, row_grad [rows]. Writes every entry once; [rows, classes] in dtype.
    """
    return _launch_backward(shape, dtype, indices, row_grad, None)


def hinge_gradient(
    shape: torch.Size,
    dtype: torch.dtype,
    indices: torch.Tensor,
    labels: torch.Tensor,
    hinge_rows: torch.Tensor,
    row_grad: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """grad[r, c] = w_r * (count_r(c) / n - [c == labels[r]]), w_r = scale * row_grad[r] where
    hinge_rows[r] > 0, else 0: the gradient of scale * (m + mean selected value - s_y)_+."""
    return _launch_backward(shape, dtype, indices, row_grad, (labels, hinge_rows, scale))


class _NoisedKth(torch.autograd.Function):
    """Forward: mean over draws of the rank-th largest noised score, [rows] float32, and the
    rows' non-finite flags. Backward: the mean one-hot at the selected indices."""

    @staticmethod
    def forward(ctx, scores, rank, epsilon, n_draws, seed, noise):  # type: ignore[override]
        values, indices, _, bad = select_noised(
            scores.detach(), rank, epsilon, n_draws, seed=seed, noise=noise
        )
        ctx.save_for_backward(indices)
        ctx.shape, ctx.dtype = scores.shape, scores.dtype
        ctx.mark_non_differentiable(bad)
        return values.mean(dim=1), bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, _grad_bad):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        grad = selection_gradient(ctx.shape, ctx.dtype, indices, grad_value)
        return grad, None, None, None, None, None


def noised_kth_largest(
    scores: torch.Tensor,
    rank: int,
    epsilon: float,
    n_draws: int,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable smoothed rank-th largest of each row through the kernels.

    scores [rows, classes] (checked by the caller). Returns (value [rows] float32, bad [rows]
    bool). noise: [n_draws, rows, classes] to use instead of drawing.
    """
    seed = None if noise is not None else draw_seed(scores.device, generator)
    return _NoisedKth.apply(scores, rank, epsilon, n_draws, seed, noise)


class _NoisedHinge(torch.autograd.Function):
    """Forward: per row scale * (m_y + mean_draws top_{rank,eps}(s) - s_y)_+ in float32, all in
    the kernel, and the rows' flags (non-finite score or label out of range). Backward: one
    kernel writes w * (counts / n - onehot(y)) on the rows where the hinge is active."""

    @staticmethod
    def forward(ctx, scores, labels, margins, margin, scale, rank, epsilon, n_draws, seed, noise):  # type: ignore[override]
        _, indices, _, bad, hinge = _launch_forward(
            scores.detach(),
            rank,
            epsilon,
            n_draws,
            seed,
            noise,
            labels,
            (margins, margin, scale),
        )
        ctx.save_for_backward(indices, labels, hinge)
        ctx.shape, ctx.dtype, ctx.scale = scores.shape, scores.dtype, scale
        ctx.mark_non_differentiable(bad)
        return hinge, bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hinge, _grad_bad):  # type: ignore[override]
        indices, labels, hinge = ctx.saved_tensors
        grad = hinge_gradient(ctx.shape, ctx.dtype, indices, labels, hinge, grad_hinge, ctx.scale)
        return grad, None, None, None, None, None, None, None, None, None


def noised_hinge_rows(
    scores: torch.Tensor,
    labels: torch.Tensor,
    margin: torch.Tensor | float,
    rank: int,
    epsilon: float,
    n_draws: int,
    *,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row noised hinge scale * (m + top_{rank,eps}(s) - s_y)_+ through the kernels.

    scores [rows, classes] float32/half (shapes checked by the caller); labels [rows] integers,
    any value (out of range is flagged, never read); margin: a float, or per-class margins
    [classes] float32 (row r uses margin[labels[r]]). Returns (hinge [rows] float32, bad []
    bool: some row had a non-finite score or a label out of range).
    """
    seed = None if noise is not None else draw_seed(scores.device, generator)
    if isinstance(margin, torch.Tensor):
        margins, margin = margin.to(device=scores.device, dtype=torch.float32).contiguous(), 0.0
    else:
        margins = None
    hinge, bad_rows = _NoisedHinge.apply(
        scores, labels, margins, margin, scale, rank, epsilon, n_draws, seed, noise
    )
    return hinge, bad_rows.any()
