"""Launching the fused selection kernels (topk.selection_kernels): buffers, grid, block sizes.

topk.fused_selection describes the kernels and wraps these launches in autograd functions. The
kernels are imported on first use, so importing this module does not import triton. Above
_BWD_MAX_DRAWS draws per row the backward counts with PyTorch instead (exact too).
"""

from __future__ import annotations

from typing import Any

import torch

from topk.sampling import draw_counts

DRAWS_PER_PROGRAM = 4  # one Philox call gives four normals: one per draw of a program
_MAX_BLOCK = 512  # classes per block of a forward program (best of 256..2048 on an H200)
_FWD_WARPS = 4  # warps of a forward program with a full block
_BWD_BLOCK = 1024
_BWD_MAX_DRAWS = 64  # above this the backward counts with PyTorch (index_put_, exact too)

# (select_forward, select_backward), set on first use. A plain global rather than
# functools.cache, which torch.compile would not trace through. Any: triton has no type stubs.
_KERNELS: tuple[Any, Any] | None = None


def _kernels() -> tuple[Any, Any]:
    global _KERNELS
    if _KERNELS is None:
        from topk.selection_kernels import select_backward, select_forward  # imports triton

        _KERNELS = (select_forward, select_backward)
    return _KERNELS


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """One 62-bit Philox key, drawn on the device from `generator` (or the device's default).

    It stays a device tensor the kernel reads: no host synchronisation, and CUDA-graph capture
    records the draw with the rest (the default CUDA generator is graph-safe).
    """
    return torch.randint(0, 1 << 62, (1,), device=device, dtype=torch.int64, generator=generator)


def launch_forward(
    scores: torch.Tensor,
    rank: int,
    epsilon: float,
    n_draws: int,
    seed: torch.Tensor | None,
    noise: torch.Tensor | None,
    labels: torch.Tensor | None,
    hinge: tuple[torch.Tensor | None, float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    values, indices, label_scores, bad, _ = launch_forward(
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
