"""The smooth top-k SVM loss of Berrada, Zisserman and Kumar (ICLR 2018), in log-space.

With Y_k the k-subsets of the classes and S(A) the sum of the scores in A,

    L = tau * log sum_{A in Y_k} exp((alpha * [y not in A] + S(A) / k) / tau)
        - tau * log sum_{A in Y_k, y in A} exp(S(A) / (k * tau)).

Splitting the first sum on whether y is in A and writing x = s / (k * tau), e_j for the j-th
elementary symmetric polynomial of exp(x) over the classes other than y, this is exactly

    L = tau * softplus(alpha / tau + log e_k - log e_{k-1} - x_y),

and log e_j (j = 0..k) comes from the product over classes of (1 + exp(x_i) t), truncated at
degree k, multiplied pairwise in a balanced tree in log-space: O(k C) work per row (the first
levels have low degree, the last ones few polynomials), every step a logsumexp, so the value and
its autograd gradient stay finite for any spread of the scores.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from topk.fused_polynomial import MAX_DEGREE, log_polynomial_product
from topk.fused_selection import uses_triton
from topk.validation import CheckedLoss, check_positive_float, check_positive_int

# log(0) kept finite: a logsumexp over entries that are all -inf has a NaN gradient, one over
# entries of -1e30 has a zero one. Sums of up to a few hundred of these stay far from float32's
# range, and no real term comes anywhere near.
_LOG_ZERO = -1e30

# A chunk of rows is processed at once when its tree intermediates hold at most this many
# float32 elements; larger batches are split (and, under autograd, recomputed in backward) so
# peak memory stays bounded at large C and k.
_CHUNK_ELEMENTS = 1 << 25


def _tree_levels(num_classes: int, k: int) -> list[tuple[int, int, int]]:
    """(groups after the merge, new degree, old degree) for each level of the product tree."""
    levels = []
    groups, degree = num_classes, 1
    while groups > 1:
        groups = (groups + 1) // 2
        new_degree = min(2 * degree, k)
        levels.append((groups, new_degree, degree))
        degree = new_degree
    return levels


def _logsumexp_finite(terms: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of finite terms, consuming `terms` (a fresh temporary).

    Fewer passes and temporaries than torch.logsumexp, which guards against infinities that
    cannot occur here: shift and exp run in place (large fresh tensors cost page faults here).
    The shift is detached: the value does not depend on it, so neither does the gradient.
    """
    shift = terms.detach().amax(dim=-1, keepdim=True)
    return terms.sub_(shift).exp_().sum(dim=-1).log_() + shift.squeeze(-1)


def _merge(poly: torch.Tensor, new_degree: int) -> torch.Tensor:
    """Multiply neighbouring polynomials pairwise, truncated at new_degree, in log-space.

    poly: [N, G, d + 1] log-coefficients, G even -> [N, G / 2, new_degree + 1].
    """
    rows, groups, width = poly.shape
    degree = width - 1
    left, right = poly[:, 0::2], poly[:, 1::2]
    # coefficient j of the product is logsumexp_a (left_a + right_{j-a}); with right padded by
    # `degree` log-zeros in front, right_{j-a} = padded[j + (degree - a)]: a sliding window
    # over `padded` against the reversed left (a view, no gather).
    pad_front = poly.new_full((rows, groups // 2, degree), _LOG_ZERO)
    pad_back = poly.new_full((rows, groups // 2, new_degree - degree), _LOG_ZERO)
    padded = torch.cat([pad_front, right, pad_back], dim=-1)
    windows = padded.unfold(-1, degree + 1, 1)  # [N, G/2, new_degree + 1, degree + 1]
    return _logsumexp_finite(windows + left.flip(-1)[..., None, :])


def log_elementary_symmetric(x: torch.Tensor, k: int) -> torch.Tensor:
    """log e_j(exp(x_1), ..., exp(x_C)) for j = 0..k of each row: x [N, C] -> [N, k + 1].

    Entries of x equal to a very negative number (e.g. -1e30) act as absent classes. Where fewer
    than j classes are present the result is about -1e30 (log 0), never -inf or NaN.
    """
    rows, num_classes = x.shape
    fused = _uses_fused_tree(x, k)
    # Absent classes as padding make the early, widest levels even without per-level copies
    # (the fused tree pairs an odd last polynomial with 1 itself: only C needs to be even).
    padded_classes = -(-num_classes // (2 if fused else 16)) * (2 if fused else 16)
    if padded_classes != num_classes:
        x = torch.cat([x, x.new_full((rows, padded_classes - num_classes), _LOG_ZERO)], dim=1)
    # First level in closed form: (1 + a t)(1 + b t) = 1 + (a + b) t + a b t^2.
    a, b = x[:, 0::2], x[:, 1::2]
    poly = torch.stack([torch.zeros_like(a), torch.logaddexp(a, b), a + b], dim=-1)
    if k == 1:
        poly = poly[..., :2]
    if fused:
        log_esp = log_polynomial_product(poly, k)
    else:
        while poly.shape[1] > 1:
            degree = poly.shape[-1] - 1
            if poly.shape[1] % 2:  # odd count: pad with the unit polynomial 1
                unit = poly.new_full((rows, 1, degree + 1), _LOG_ZERO)
                unit[..., 0] = 0.0
                poly = torch.cat([poly, unit], dim=1)
            poly = _merge(poly, min(2 * degree, k))
        log_esp = poly[:, 0]
    if log_esp.shape[1] < k + 1:  # fewer than k classes: the higher polynomials are 0
        missing = log_esp.new_full((rows, k + 1 - log_esp.shape[1]), _LOG_ZERO)
        log_esp = torch.cat([log_esp, missing], dim=1)
    return log_esp


def _uses_fused_tree(x: torch.Tensor, k: int) -> bool:
    """The Triton product tree (topk.fused_polynomial) for float32 on a GPU, k <= 16."""
    return x.dtype == torch.float32 and k <= MAX_DEGREE and uses_triton(x)


def _log_esp_ratio(x_others: torch.Tensor, k: int) -> torch.Tensor:
    """log e_k - log e_{k-1} of each row: [N, C] -> [N]."""
    log_esp = log_elementary_symmetric(x_others, k)
    return log_esp[:, k] - log_esp[:, k - 1]


def _elements_per_row(num_classes: int, k: int) -> int:
    return sum(g * (n + 1) * (d + 2) for g, n, d in _tree_levels(num_classes, k)) + 2 * num_classes


def smooth_topk_svm(
    scores: torch.Tensor, labels: torch.Tensor, *, k: int, tau: float, alpha: float
) -> torch.Tensor:
    """Per-row smooth top-k SVM loss: scores [B, C] (float32 or float64), labels [B] -> [B].

    Where log e_k and log e_{k-1} are each dominated by one subset to the resolution eps of the
    scores' dtype (the gaps around the k-th largest other score exceed k * tau * log(k C / eps),
    which bounds the other subsets' share by eps), log e_k - log e_{k-1} is replaced by its hard
    limit, the k-th largest other x, as Berrada et al.'s implementation falls back to the hard
    top-k SVM; so is any non-finite smooth value. No input checks: see SmoothTopKSVMLoss.
    """
    batch, num_classes = scores.shape
    # x = s / (k tau), shifted by the row maximum: the shift cancels in the loss, and it keeps
    # every x <= 0 whatever the scores' offset.
    x = (scores - scores.detach().amax(dim=1, keepdim=True)) / (k * tau)
    x_true = x.gather(1, labels[:, None]).squeeze(1)
    x_others = x.scatter(1, labels[:, None], _LOG_ZERO)

    rows_per_chunk = max(1, _CHUNK_ELEMENTS // _elements_per_row(num_classes, k))
    # The fused tree keeps only the level inputs (about 4 C floats per row), no [k + 1, k + 1]
    # term temporaries: no chunks, no recomputation.
    if rows_per_chunk >= batch or _uses_fused_tree(x_others, k):
        ratio = _log_esp_ratio(x_others, k)
    else:
        recompute = torch.is_grad_enabled() and x_others.requires_grad
        parts = []
        for chunk in torch.split(x_others, rows_per_chunk):
            if recompute:
                parts.append(checkpoint(_log_esp_ratio, chunk, k, use_reentrant=False))
            else:
                parts.append(_log_esp_ratio(chunk, k))
        ratio = torch.cat(parts)

    # The hard limit: log e_k - log e_{k-1} -> the k-th largest x among the other classes.
    top_others = x_others.topk(min(k + 1, num_classes), dim=1).values
    hard_ratio = top_others[:, k - 1]
    log_inv_eps = -math.log(torch.finfo(scores.dtype).eps)
    gap_scale = math.log(k * num_classes) + log_inv_eps
    dominated = torch.ones(batch, dtype=torch.bool, device=scores.device)
    if top_others.shape[1] > k:
        dominated &= (top_others[:, k - 1] - top_others[:, k]).detach() >= gap_scale
    if k >= 2:
        gap_scale_prev = math.log((k - 1) * num_classes) + log_inv_eps
        dominated &= (top_others[:, k - 2] - top_others[:, k - 1]).detach() >= gap_scale_prev
    use_hard = dominated | ~torch.isfinite(ratio)
    ratio = torch.where(use_hard, hard_ratio, ratio)
    margin = alpha / tau + ratio - x_true
    # softplus as logaddexp(z, 0): F.softplus turns linear above z = 20, off by up to 2e-9.
    return tau * torch.logaddexp(margin, torch.zeros_like(margin))


class SmoothTopKSVMLoss(CheckedLoss):
    """Smooth top-k SVM (Berrada et al. 2018), mean over the batch; the module docstring has the
    formula. tau > 0 is the smoothing temperature, alpha > 0 the margin; k + 1 <= num_classes.

    Computed in float32 for float32/float16/bfloat16 scores (float64 stays float64), returned in
    the input's dtype; finite in value and gradient for any finite scores. Deterministic:
    `generator` is accepted and ignored. Raises ValueError for bad arguments or inputs.
    """

    needs_cosine_head = False
    needs_class_counts = False
    repr_fields = ("k", "tau", "alpha")

    def __init__(self, *, k: int = 5, tau: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__()
        self.k = check_positive_int("k", k)
        self.tau = check_positive_float("tau", tau)
        self.alpha = check_positive_float("alpha", alpha)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return self.k, None

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        per_row = smooth_topk_svm(
            scores.to(compute_dtype), labels, k=self.k, tau=self.tau, alpha=self.alpha
        )
        return per_row.mean()
