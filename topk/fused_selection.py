"""The noised top-j selection in one Triton kernel, and the noised hinge built on it (the GPU path).

For each row of scores [rows, classes] and each of n draws, the forward kernel makes the Gaussian
noise from a counter-based generator (Philox, keyed by one 62-bit seed drawn from the caller's
torch.Generator), adds it to the scores and keeps the j-th largest noised value and its index.
Nothing of size [rows, classes, n] or even [rows, classes] is written: one program handles one row
and four draws (a Philox call gives four normals), streams the row through in blocks, and keeps
the four draws' j largest in registers. The backward writes the whole gradient in one pass from
the [rows, n] selected indices: an exact integer count per class times g / n (one rounding), minus
the label's one-hot for the hinge.

Same distribution as the pure-PyTorch reference (topk.full_sampling.sample_kth_largest_full), and
the same values and indices when both are given the same noise tensor; the tests check both, on a
CPU through Triton's interpreter (TRITON_INTERPRET=1).

This module holds the backend choice and the autograd functions; the kernels are in
topk.selection_kernels and their launches in topk.selection_launch.

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
from torch.autograd.function import FunctionCtx

from topk.selection_launch import (
    draw_seed,
    hinge_gradient,
    launch_forward,
    select_noised,
    selection_gradient,
)

BACKEND = "auto"
BACKENDS = ("auto", "triton", "torch")

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


class _KernelContext(FunctionCtx):
    """What the autograd functions' forward leaves for their backward (declared for the type
    checker: autograd passes its own context object)."""

    saved_tensors: tuple[torch.Tensor, ...]
    shape: torch.Size
    dtype: torch.dtype
    scale: float


class _NoisedKth(torch.autograd.Function):
    """Forward: mean over draws of the rank-th largest noised score, [rows] float32, and the
    rows' non-finite flags. Backward: the mean one-hot at the selected indices."""

    @staticmethod
    def forward(
        ctx: _KernelContext,
        scores: torch.Tensor,
        rank: int,
        epsilon: float,
        n_draws: int,
        seed: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices, _, bad = select_noised(
            scores.detach(), rank, epsilon, n_draws, seed=seed, noise=noise
        )
        ctx.save_for_backward(indices)
        ctx.shape, ctx.dtype = scores.shape, scores.dtype
        ctx.mark_non_differentiable(bad)
        return values.mean(dim=1), bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: _KernelContext, grad_value: torch.Tensor, _grad_bad: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
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
    value: torch.Tensor
    bad: torch.Tensor
    value, bad = _NoisedKth.apply(scores, rank, epsilon, n_draws, seed, noise)
    return value, bad


class _NoisedHinge(torch.autograd.Function):
    """Forward: per row scale * (m_y + mean_draws top_{rank,eps}(s) - s_y)_+ in float32, all in
    the kernel, and the rows' flags (non-finite score or label out of range). Backward: one
    kernel writes w * (counts / n - onehot(y)) on the rows where the hinge is active."""

    @staticmethod
    def forward(
        ctx: _KernelContext,
        scores: torch.Tensor,
        labels: torch.Tensor,
        margins: torch.Tensor | None,
        margin: float,
        scale: float,
        rank: int,
        epsilon: float,
        n_draws: int,
        seed: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, indices, _, bad, hinge = launch_forward(
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
    def backward(
        ctx: _KernelContext, grad_hinge: torch.Tensor, _grad_bad: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None, None, None, None, None, None]:
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
    margins: torch.Tensor | None = None
    if isinstance(margin, torch.Tensor):
        margins, margin = margin.to(device=scores.device, dtype=torch.float32).contiguous(), 0.0
    hinge: torch.Tensor
    bad_rows: torch.Tensor
    hinge, bad_rows = _NoisedHinge.apply(
        scores, labels, margins, margin, scale, rank, epsilon, n_draws, seed, noise
    )
    return hinge, bad_rows.any()
