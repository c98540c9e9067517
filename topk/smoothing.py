"""The smoothed k-th largest operator (perturbed optimizers, Berthet et al. 2020).

    top_{k,eps}(s) = E[top_k(s + eps * Z)],  Z ~ N(0, I_C),

estimated by the mean over `n_samples` draws. Its gradient estimate is the mean over draws of the
one-hot vector at the index holding the k-th largest noised value, so each row of the gradient
sums to 1. eps = 0 gives back the hard k-th largest entry and its one-hot gradient.

The functional core is a sampling strategy (topk.sampling: "full" or the exact "lazy"): it
takes the noise or a generator and returns, for every row and draw, the k-th largest noised value
and its index; `smoothed_kth_largest` wraps it in a custom autograd function. Memory stays
O(rows * classes), never a (rows, classes, n_samples) tensor.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

from topk.fused_selection import noised_kth_largest, uses_triton
from topk.sampling import (
    check_generator,
    check_sampler,
    draw_counts,
    sample_kth_largest,
    working_dtype,
)
from topk.validation import check_positive_float, check_positive_int, host_reads_allowed


class _SelectionContext(FunctionCtx):
    """What _MeanOneHotSelection's forward leaves for its backward (declared for the type
    checker: autograd passes its own context object)."""

    saved_tensors: tuple[torch.Tensor, ...]
    scores_shape: torch.Size
    scores_dtype: torch.dtype


class _MeanOneHotSelection(torch.autograd.Function):
    """Forward: the mean of the sampled values. Backward: the mean one-hot at the sampled indices.

    scores: [rows, classes]; sampled_values, sampled_indices: [rows, n_samples] (no gradient).
    """

    @staticmethod
    def forward(
        ctx: _SelectionContext,
        scores: torch.Tensor,
        sampled_values: torch.Tensor,
        sampled_indices: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sampled_indices)
        ctx.scores_shape = scores.shape
        ctx.scores_dtype = scores.dtype
        return sampled_values.mean(dim=-1).to(scores.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: _SelectionContext, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        (sampled_indices,) = ctx.saved_tensors
        n_samples = sampled_indices.shape[1]
        # Count how often each class was drawn, exactly (float32 holds every integer below
        # 2**24; float64 beyond, and for float64 scores), then scale once: adding grad / n once
        # per draw rounds at every draw and drifts as n grows, and in half precision the rows
        # would not sum to 1.
        wide = ctx.scores_dtype == torch.float64 or n_samples >= (1 << 24)
        count_dtype = torch.float64 if wide else torch.float32
        counts = draw_counts(ctx.scores_shape, sampled_indices, count_dtype)
        weight = grad_output.to(count_dtype) / n_samples
        return counts.mul_(weight[:, None]).to(ctx.scores_dtype), None, None


def smoothed_kth_largest(
    scores: torch.Tensor,
    k: int,
    *,
    epsilon: float,
    n_samples: int = 5,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    dim: int = -1,
    sampler: str = "full",
) -> torch.Tensor:
    """Monte-Carlo estimate of E[top_k(scores + epsilon * Z)] along `dim`, differentiable.

    scores: any shape [..., classes, ...] with `classes` along `dim`; any floating dtype. The noise
    is drawn and the selection made in float32 (float64 for float64 scores), the result is in the
    scores' dtype with `dim` removed. Autocast-safe (autocast is off inside).
    k: 1-based rank (k=1 is the maximum), 1 <= k <= classes. epsilon >= 0 (0: the hard k-th
    largest). noise: optional [n_samples, *scores.shape] standard normals used instead of drawing
    (for tests and common random numbers). generator: a torch.Generator on the scores' device;
    None draws from the device's default generator. sampler: "full" draws noise for every class;
    "lazy" draws it exactly in distribution for only the classes that can reach the top k (see
    topk.lazy_sampling); both give the same distribution.
    The gradient is the mean over draws of the one-hot at the sampled index (rows sum to 1).
    Raises ValueError for a bad k, epsilon, n_samples, sampler, noise shape, generator device,
    or (on a CPU) non-finite scores or noise; on a GPU nothing is read on the host, and a row with
    a non-finite score comes back NaN. On CUDA with Triton, sampler "full" runs in one kernel
    (topk.fused_selection): same distribution, not the same draws as the CPU path.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor")
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension (the classes)")
    dim = dim if dim >= 0 else dim + scores.ndim
    if not 0 <= dim < scores.ndim:
        raise ValueError(f"dim {dim} is out of range for scores of shape {tuple(scores.shape)}")
    classes = scores.shape[dim]
    k = check_positive_int("k", k)
    if k > classes:
        raise ValueError(f"k = {k} exceeds the number of classes ({classes}) along dim {dim}")
    epsilon = check_positive_float("epsilon", epsilon, allow_zero=True)
    n_samples = check_positive_int("n_samples", n_samples)
    sampler = check_sampler(sampler)
    check_generator(generator, scores.device)
    if scores.numel() == 0:
        raise ValueError(f"scores of shape {tuple(scores.shape)} are empty")
    if noise is not None:
        _check_noise(noise, scores, n_samples, sampler)

    rows_view = scores.movedim(dim, -1)
    leading_shape = rows_view.shape[:-1]
    rows_view = rows_view.reshape(-1, classes)
    # A CPU has nothing to synchronise: a non-finite score is a ValueError at once. On a GPU the
    # check stays on the device: the rows holding one come back NaN.
    check_on_host = scores.device.type == "cpu" and host_reads_allowed(scores)
    if check_on_host and not torch.isfinite(rows_view).all():
        raise ValueError("scores contain NaN or infinite values")
    if noise is not None:
        noise = noise.movedim(dim + 1, -1).reshape(n_samples, -1, classes)
    result = smoothed_kth_largest_rows(
        rows_view,
        k,
        epsilon=epsilon,
        n_samples=n_samples,
        generator=generator,
        noise=noise,
        sampler=sampler,
    )
    if not check_on_host:
        nonfinite_rows = ~torch.isfinite(rows_view.detach()).all(dim=1)
        result = torch.where(nonfinite_rows, torch.full_like(result, float("nan")), result)
    return result.reshape(leading_shape)


def smoothed_kth_largest_rows(
    scores: torch.Tensor,
    k: int,
    *,
    epsilon: float,
    n_samples: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    sampler: str = "full",
) -> torch.Tensor:
    """smoothed_kth_largest for callers that have validated their input: scores [rows, classes]
    (on the Triton path a row with a non-finite score gives a meaningless value: check first),
    1 <= k <= classes, epsilon >= 0, n_samples >= 1, sampler valid, the generator on the scores'
    device, noise None or [n_samples, rows, classes] (sampler "full"). Returns
    [rows] in the scores' dtype. The losses call this after their own checks, so that a batch
    is not scanned twice (and a GPU not synchronised twice) for non-finite values.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        if sampler == "full" and epsilon > 0.0 and uses_triton(scores):
            # One kernel draws, noises and selects (topk.fused_selection); it reads the scores
            # in their own dtype.
            value, _ = noised_kth_largest(
                scores, k, epsilon, n_samples, generator=generator, noise=noise
            )
            return value.to(scores.dtype)
        work = scores.detach().to(working_dtype(scores.dtype))
        values, indices = sample_kth_largest(
            work, k, epsilon, n_samples, sampler=sampler, generator=generator, noise=noise
        )
        result: torch.Tensor = _MeanOneHotSelection.apply(scores, values, indices)
        return result


def _check_noise(noise: object, scores: torch.Tensor, n_samples: int, sampler: str) -> None:
    """ValueError unless `noise` is [n_samples, *scores.shape] (finite, where the scores are on
    a CPU) and the sampler is "full"."""
    expected = (n_samples, *scores.shape)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise)
        raise ValueError(f"noise must have shape {expected}, got {got}")
    if scores.device.type == "cpu" and not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or infinite values")
    if sampler != "full":
        raise ValueError("explicit noise is only supported with sampler='full'")
