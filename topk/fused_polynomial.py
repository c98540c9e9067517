"""The product tree of the smooth top-k SVM in Triton: one kernel per tree level, each way.

topk.losses.svm computes log e_j (j = 0..k), the elementary symmetric polynomials of exp(x) over
the classes, as the product of the polynomials (1 + exp(x_i) t) truncated at degree k, multiplied
pairwise in a balanced tree in log-space. In PyTorch each level is a dozen kernels over a
[rows, groups, k + 1, k + 1] temporary, and the autograd graph keeps them all; at C = 100,000 the
loss took 197 ms per call on an H200. Here each level is one kernel that reads two neighbouring
polynomials and writes their truncated product (a logsumexp of at most k + 1 terms per
coefficient, all in registers), and the backward is one kernel per level too, from the saved
level inputs: d out_j / d left_a = exp(left_a + right_{j-a} - out_j), and the same for right.

An odd number of polynomials at a level pairs the last one with the unit polynomial 1, inside
the kernel. Log-zero is -1e30 (finite), as in topk.losses.svm: sums of two stay finite and
exp(-1e30 - out) is 0, so neither the value nor the gradient can turn NaN.
"""

from __future__ import annotations

import torch

from topk.fused_selection import next_power_of_two

# In the kernels (literals: compiled Triton reads no module globals), -1e30 is log-zero, and
# -3.0e38 marks a term that does not exist: exp(-3.0e38 - anything real) is 0, and unlike -inf it
# never meets another -inf in a subtraction (padding lanes would compute NaN, harmlessly but
# noisily).
MAX_DEGREE = 16  # above this the [k + 1, k + 1] term tile per polynomial gets too large
_TILE = 4096  # terms per program

_KERNELS: tuple | None = None


def _kernels() -> tuple:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _define_kernels()
    return _KERNELS


def _define_kernels():  # noqa: C901 - forward and backward live together
    import triton
    import triton.language as tl

    @triton.jit
    def merge_forward(
        poly_ptr,
        out_ptr,
        n_out,  # rows * groups_out
        groups_in,
        groups_out,
        DEGREE: tl.constexpr,
        NEW_DEGREE: tl.constexpr,
        DEGREE_PAD: tl.constexpr,
        NEW_DEGREE_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = o < n_out
        row = o // groups_out
        group = o % groups_out
        left = (row.to(tl.int64) * groups_in + 2 * group) * (DEGREE + 1)
        has_right = 2 * group + 1 < groups_in
        j = tl.arange(0, NEW_DEGREE_PAD)[None, :, None]
        a = tl.arange(0, DEGREE_PAD)[None, None, :]
        b = j - a
        term = (a <= DEGREE) & (b >= 0) & (b <= DEGREE) & (j <= NEW_DEGREE)
        v3 = valid[:, None, None]
        lhs = tl.load(poly_ptr + left[:, None, None] + a, mask=v3 & (a <= DEGREE), other=0.0)
        rhs_mask = v3 & term & has_right[:, None, None]
        rhs = tl.load(poly_ptr + left[:, None, None] + DEGREE + 1 + b, mask=rhs_mask, other=0.0)
        # No right neighbour: the unit polynomial, log-coefficients (0, log 0, log 0, ...).
        rhs = tl.where(has_right[:, None, None], rhs, tl.where(b == 0, 0.0, -1e30))
        terms = tl.where(term, lhs + rhs, -3.0e38)
        top = tl.max(terms, axis=2)
        out = top + tl.log(tl.sum(tl.exp(terms - top[:, :, None]), axis=2))
        jj = tl.arange(0, NEW_DEGREE_PAD)[None, :]
        target = out_ptr + o.to(tl.int64)[:, None] * (NEW_DEGREE + 1) + jj
        tl.store(target, out, mask=valid[:, None] & (jj <= NEW_DEGREE))

    @triton.jit
    def merge_backward(
        poly_ptr,
        out_ptr,
        grad_out_ptr,
        grad_poly_ptr,
        n_out,
        groups_in,
        groups_out,
        DEGREE: tl.constexpr,
        NEW_DEGREE: tl.constexpr,
        DEGREE_PAD: tl.constexpr,
        NEW_DEGREE_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = o < n_out
        row = o // groups_out
        group = o % groups_out
        left = (row.to(tl.int64) * groups_in + 2 * group) * (DEGREE + 1)
        right = left + DEGREE + 1
        has_right = 2 * group + 1 < groups_in
        v3 = valid[:, None, None]
        hr3 = has_right[:, None, None]
        j = tl.arange(0, NEW_DEGREE_PAD)[None, :, None]
        jmask = v3 & (j <= NEW_DEGREE)
        out_at = o.to(tl.int64)[:, None, None] * (NEW_DEGREE + 1) + j
        out = tl.load(out_ptr + out_at, mask=jmask, other=0.0)
        grad_out = tl.load(grad_out_ptr + out_at, mask=jmask, other=0.0)
        i = tl.arange(0, DEGREE_PAD)[None, None, :]  # the coefficient whose gradient we sum
        other = j - i  # the partner's coefficient in term j
        term = (i <= DEGREE) & (other >= 0) & (other <= DEGREE) & (j <= NEW_DEGREE) & v3
        # d out_j / d left_i = exp(left_i + right_{j-i} - out_j); the same with roles swapped.
        lhs_i = tl.load(poly_ptr + left[:, None, None] + i, mask=v3 & (i <= DEGREE), other=0.0)
        rhs_o = tl.load(poly_ptr + right[:, None, None] + other, mask=term & hr3, other=0.0)
        rhs_o = tl.where(hr3, rhs_o, tl.where(other == 0, 0.0, -1e30))
        weight = tl.exp(tl.where(term, lhs_i + rhs_o - out, -3.0e38)) * grad_out
        grad_left = tl.sum(weight, axis=1)
        lhs_o = tl.load(poly_ptr + left[:, None, None] + other, mask=term, other=0.0)
        rhs_i = tl.load(
            poly_ptr + right[:, None, None] + i, mask=v3 & hr3 & (i <= DEGREE), other=0.0
        )
        weight = tl.exp(tl.where(term & hr3, lhs_o + rhs_i - out, -3.0e38)) * grad_out
        grad_right = tl.sum(weight, axis=1)
        ii = tl.arange(0, DEGREE_PAD)[None, :]
        in_range = valid[:, None] & (ii <= DEGREE)
        tl.store(grad_poly_ptr + left[:, None] + ii, grad_left, mask=in_range)
        tl.store(
            grad_poly_ptr + right[:, None] + ii, grad_right, mask=in_range & has_right[:, None]
        )

    return merge_forward, merge_backward


def _launch(kernel, n_out: int, degree: int, new_degree: int, *tensors_and_sizes) -> None:
    degree_pad, new_degree_pad = next_power_of_two(degree + 1), next_power_of_two(new_degree + 1)
    block = max(1, _TILE // (degree_pad * new_degree_pad))
    kernel[(-(-n_out // block),)](
        *tensors_and_sizes,
        DEGREE=degree,
        NEW_DEGREE=new_degree,
        DEGREE_PAD=degree_pad,
        NEW_DEGREE_PAD=new_degree_pad,
        BLOCK=block,
        num_warps=4,
    )


class _LogPolynomialTree(torch.autograd.Function):
    """[rows, groups, d + 1] log-coefficients -> [rows, k' + 1] of their product, truncated at
    degree k' = min(k, degree reached)."""

    @staticmethod
    def forward(ctx, poly, k):  # type: ignore[override]
        merge_forward, _ = _kernels()
        levels = [poly.detach().contiguous()]  # each level's input, then the result
        rows = poly.shape[0]
        while levels[-1].shape[1] > 1:
            poly = levels[-1]
            groups_in, degree = poly.shape[1], poly.shape[2] - 1
            groups_out, new_degree = -(-groups_in // 2), min(2 * degree, k)
            out = poly.new_empty(rows, groups_out, new_degree + 1)
            n_out = rows * groups_out
            _launch(
                merge_forward, n_out, degree, new_degree, poly, out, n_out, groups_in, groups_out
            )
            levels.append(out)
        ctx.save_for_backward(*levels)
        return levels[-1][:, 0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_result):  # type: ignore[override]
        _, merge_backward = _kernels()
        levels = ctx.saved_tensors
        grad = grad_result.contiguous()[:, None, :]
        # Level shapes follow from the saved tensors: [rows, groups, degree + 1] in and out.
        for poly, out in reversed(list(zip(levels[:-1], levels[1:], strict=True))):
            grad_poly = torch.empty_like(poly)
            n_out = out.shape[0] * out.shape[1]
            _launch(
                merge_backward,
                n_out,
                poly.shape[2] - 1,
                out.shape[2] - 1,
                poly,
                out,
                grad.contiguous(),
                grad_poly,
                n_out,
                poly.shape[1],
                out.shape[1],
            )
            grad = grad_poly
        return grad, None


def log_polynomial_product(poly: torch.Tensor, k: int) -> torch.Tensor:
    """The product of the polynomials poly [rows, groups, d + 1] (log-coefficients, float32)
    along groups, truncated at degree k, in log-space: [rows, min(k, degree) + 1], differentiable.
    """
    if poly.shape[1] == 1:
        return poly[:, 0, : k + 1]
    return _LogPolynomialTree.apply(poly, k)
