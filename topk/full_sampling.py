"""Full sampling: noise for every class, then the k-th largest of each noised row.

The reference strategy of topk.sampling, and the fallback of topk.lazy_sampling. Memory stays
O(rows * classes): the draws are made one slice at a time into a single reusable buffer, never as
a (rows, classes, n_samples) tensor.
"""

from __future__ import annotations

import torch

# Draw several samples per buffer only while the buffer stays this small (elements): it saves
# per-call overhead on small inputs without growing the O(rows * classes) memory on large ones.
_SMALL_BUFFER_ELEMENTS = 1 << 16


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
