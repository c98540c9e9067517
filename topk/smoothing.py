"""The smoothed k-th largest operator (perturbed optimizers, Berthet et al. 2020).

    top_{k,eps}(s) = E[top_k(s + eps * Z)],  Z ~ N(0, I_C),

estimated by the mean over `n_samples` draws. Its gradient estimate is the mean over draws of the
one-hot vector at the index holding the k-th largest noised value, so each row of the gradient
sums to 1. eps = 0 gives back the hard k-th largest entry and its one-hot gradient.

The functional core (`sample_kth_largest_full`, or topk.lazy_sampling's exact lazy sampler)
takes the noise or a generator and returns, for every row and draw, the k-th largest noised value
and its index; `smoothed_kth_largest` wraps it in a custom autograd function. Memory stays
O(rows * classes): the draws are made one slice at a time into a single reusable buffer, never as
a (rows, classes, n_samples) tensor.
"""

from __future__ import annotations

import torch

from topk.fused_selection import draw_counts, noised_kth_largest, uses_triton
from topk.validation import check_positive_float, check_positive_int, host_reads_allowed

SAMPLERS = ("full", "lazy")

# Draw several samples per buffer only while the buffer stays this small (elements): it saves
# per-call overhead on small inputs without growing the O(rows * classes) memory on large ones.
_SMALL_BUFFER_ELEMENTS = 1 << 16


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise is drawn and the selection made in: float64 stays, all else float32.

    Half precision is not good enough: bfloat16 noise moves about 11 % of the sampled indices to a
    near-tied class.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_sampler(sampler: object) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return sampler  # type: ignore[return-value]


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the scores are on {device}; "
            "create it with torch.Generator(device=scores.device)"
        )


@torch.no_grad()
def sample_kth_largest_full(
    scores: torch.Tensor,
    k: int,
    epsilon: float,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw k-th largest of `scores + epsilon * noise`, drawing noise for every class.

    scores: [rows, classes], float32 or float64 (the working dtype). noise: None (drawn from
    `generator`, or the default generator of the scores' device) or [n_samples, rows, classes].
    Returns (values [rows, n_samples] in the scores' dtype, indices [rows, n_samples] int64).
    Peak extra memory: one [rows, classes] buffer (a few more rows for tiny inputs).
    """
    rows, classes = scores.shape
    if epsilon == 0.0 and noise is None:  # the hard operator: every draw is the same
        top = torch.topk(scores, k, dim=-1)
        return (
            top.values[:, k - 1 : k].expand(rows, n_samples),
            top.indices[:, k - 1 : k].expand(rows, n_samples),
        )

    # topk writes each draw's top k straight into these (no per-draw copies); [n, rows, k].
    top_values = scores.new_empty(n_samples, rows, k)
    top_indices = torch.empty(n_samples, rows, k, dtype=torch.long, device=scores.device)
    if noise is not None:
        for draw in range(n_samples):
            noised = torch.add(scores, noise[draw].to(scores.dtype), alpha=epsilon)
            torch.topk(noised, k, dim=-1, out=(top_values[draw], top_indices[draw]))
    else:
        per_chunk = max(1, min(n_samples, _SMALL_BUFFER_ELEMENTS // max(1, rows * classes)))
        buffer = scores.new_empty(per_chunk, rows, classes)
        for start in range(0, n_samples, per_chunk):
            stop = min(start + per_chunk, n_samples)
            chunk = buffer[: stop - start]
            chunk.normal_(generator=generator)
            torch.add(scores, chunk, alpha=epsilon, out=chunk)
            torch.topk(chunk, k, dim=-1, out=(top_values[start:stop], top_indices[start:stop]))
    # Column k - 1 is the k-th largest; [n, rows] -> [rows, n].
    return top_values[..., k - 1].T, top_indices[..., k - 1].T


class _MeanOneHotSelection(torch.autograd.Function):
    """Forward: the mean of the sampled values. Backward: the mean one-hot at the sampled indices.

    scores: [rows, classes]; sampled_values, sampled_indices: [rows, n_samples] (no gradient).
    """

    @staticmethod
    def forward(ctx, scores, sampled_values, sampled_indices):  # type: ignore[override]
        ctx.save_for_backward(sampled_indices)
        ctx.scores_shape = scores.shape
        ctx.scores_dtype = scores.dtype
        return sampled_values.mean(dim=-1).to(scores.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
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
        expected = (n_samples, *scores.shape)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise)
            raise ValueError(f"noise must have shape {expected}, got {got}")
        if scores.device.type == "cpu" and not torch.isfinite(noise).all():
            raise ValueError("noise contains NaN or infinite values")
        if sampler != "full":
            raise ValueError("explicit noise is only supported with sampler='full'")

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
        if sampler == "lazy" and epsilon > 0.0:
            from topk.lazy_sampling import sample_kth_largest_lazy

            values, indices = sample_kth_largest_lazy(
                work, k, epsilon, n_samples, generator=generator
            )
        else:
            values, indices = sample_kth_largest_full(
                work, k, epsilon, n_samples, generator=generator, noise=noise
            )
        return _MeanOneHotSelection.apply(scores, values, indices)
