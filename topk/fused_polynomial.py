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

The kernels are in topk.polynomial_kernels; this module launches them and holds the autograd
function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import FunctionCtx

from topk.selection_launch import next_power_of_two

MAX_DEGREE = 16  # above this the [k + 1, k + 1] term tile per polynomial gets too large
_TILE = 4096  # terms per program

# (merge_forward, merge_backward), set on first use (topk.polynomial_kernels imports triton).
# A plain global, as in topk.selection_launch. Any: triton has no type stubs.
_KERNELS: tuple[Any, Any] | None = None


def _kernels() -> tuple[Any, Any]:
    global _KERNELS
    if _KERNELS is None:
        from topk.polynomial_kernels import merge_backward, merge_forward  # imports triton

        _KERNELS = (merge_forward, merge_backward)
    return _KERNELS


def _launch(
    kernel: Any, n_out: int, degree: int, new_degree: int, *tensors_and_sizes: torch.Tensor | int
) -> None:
    """Run one level's kernel over n_out outputs; the arguments before the constexprs follow."""
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


class _TreeContext(FunctionCtx):
    """Declared for the type checker: autograd passes its own context object."""

    saved_tensors: tuple[torch.Tensor, ...]


class _LogPolynomialTree(torch.autograd.Function):
    """[rows, groups, d + 1] log-coefficients -> [rows, k' + 1] of their product, truncated at
    degree k' = min(k, degree reached)."""

    @staticmethod
    def forward(ctx: _TreeContext, poly: torch.Tensor, k: int) -> torch.Tensor:
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
    def backward(ctx: _TreeContext, grad_result: torch.Tensor) -> tuple[torch.Tensor, None]:
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
    product: torch.Tensor = _LogPolynomialTree.apply(poly, k)
    return product
