"""The sampling strategies of the smoothed k-th largest operator, and the choice between them.

A strategy takes scores [rows, classes] in the working dtype and returns, for every row and draw,
the k-th largest of `scores + epsilon * Z`, Z ~ N(0, I), and its index:
- "full" (topk.full_sampling) draws noise for every class;
- "lazy" (topk.lazy_sampling) draws it exactly in distribution for only the classes that can
  reach the top k.
Both give the same distribution (not the same draws). topk.smoothing turns the draws into the
differentiable operator; on CUDA with Triton, "full" runs in one kernel instead
(topk.fused_selection).
"""

from __future__ import annotations

import torch

from topk.full_sampling import sample_kth_largest_full
from topk.lazy_sampling import sample_kth_largest_lazy

SAMPLERS = ("full", "lazy")


def check_sampler(sampler: object) -> str:
    """`sampler` if it names a strategy; else ValueError listing them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return sampler


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """ValueError unless `generator` is None or a torch.Generator on `device`'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the scores are on {device}; "
            "create it with torch.Generator(device=scores.device)"
        )


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise is drawn and the selection made in: float64 stays, all else float32.

    Half precision is not good enough: bfloat16 noise moves about 11 % of the sampled indices to a
    near-tied class.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def sample_kth_largest(
    scores: torch.Tensor,
    k: int,
    epsilon: float,
    n_samples: int,
    *,
    sampler: str = "full",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw k-th largest of `scores + epsilon * Z` with the strategy `sampler` names.

    scores: [rows, classes] in the working dtype; 1 <= k <= classes, epsilon >= 0 (0: every
    draw is the hard k-th largest, whatever the sampler), n_samples >= 1; the caller has checked
    them. noise: [n_samples, rows, classes] standard normals instead of drawing (sampler "full"
    only). Returns (values [rows, n_samples] in the scores' dtype, indices [rows, n_samples]
    int64), without gradient.
    """
    if sampler == "lazy" and epsilon > 0.0:
        return sample_kth_largest_lazy(scores, k, epsilon, n_samples, generator=generator)
    return sample_kth_largest_full(scores, k, epsilon, n_samples, generator=generator, noise=noise)
