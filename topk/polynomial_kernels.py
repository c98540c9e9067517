"""The Triton kernels of the fused product tree (topk.fused_polynomial describes them).

Importing this module imports triton: topk.fused_polynomial imports it on first use only.
Kernel parameters carry only Triton's own annotations (tl.constexpr): Triton reads annotations
to specialise a kernel, so the pointers and sizes stay unannotated, and pyproject.toml lets this
module's functions go untyped. The @triton.jit helpers are inlined into the kernels.

Literals, because compiled Triton reads no module globals: -1e30 is log-zero, and -3.0e38 marks a
term that does not exist: exp(-3.0e38 - anything real) is 0, and unlike -inf it never meets
another -inf in a subtraction (padding lanes would compute NaN, harmlessly but noisily).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _output_pairs(n_out, groups_in, groups_out, DEGREE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK outputs o (row-major over [rows, groups_out]): (o, whether o exists,
    the offset of its left input polynomial, whether it has a right one)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = o < n_out
    row = o // groups_out
    group = o % groups_out
    left = (row.to(tl.int64) * groups_in + 2 * group) * (DEGREE + 1)
    has_right = 2 * group + 1 < groups_in
    return o, valid, left, has_right


@triton.jit
def _right_or_unit(right, has_right, index):
    """The right polynomial's log-coefficient `index`, or without a right neighbour the unit
    polynomial's: log-coefficients (0, log 0, log 0, ...)."""
    return tl.where(has_right, right, tl.where(index == 0, 0.0, -1e30))


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
    """out_j = logsumexp_a (left_a + right_{j-a}), j <= NEW_DEGREE, for BLOCK outputs."""
    o, valid, left, has_right = _output_pairs(n_out, groups_in, groups_out, DEGREE, BLOCK)
    j = tl.arange(0, NEW_DEGREE_PAD)[None, :, None]
    a = tl.arange(0, DEGREE_PAD)[None, None, :]
    b = j - a
    term = (a <= DEGREE) & (b >= 0) & (b <= DEGREE) & (j <= NEW_DEGREE)
    v3 = valid[:, None, None]
    lhs = tl.load(poly_ptr + left[:, None, None] + a, mask=v3 & (a <= DEGREE), other=0.0)
    rhs_mask = v3 & term & has_right[:, None, None]
    rhs = tl.load(poly_ptr + left[:, None, None] + DEGREE + 1 + b, mask=rhs_mask, other=0.0)
    rhs = _right_or_unit(rhs, has_right[:, None, None], b)
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
    """The gradients of both input polynomials of BLOCK outputs, from the saved level input and
    output: d out_j / d left_i = exp(left_i + right_{j-i} - out_j), and the same for right."""
    o, valid, left, has_right = _output_pairs(n_out, groups_in, groups_out, DEGREE, BLOCK)
    right = left + DEGREE + 1
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
    lhs_i = tl.load(poly_ptr + left[:, None, None] + i, mask=v3 & (i <= DEGREE), other=0.0)
    rhs_o = tl.load(poly_ptr + right[:, None, None] + other, mask=term & hr3, other=0.0)
    rhs_o = _right_or_unit(rhs_o, hr3, other)
    weight = tl.exp(tl.where(term, lhs_i + rhs_o - out, -3.0e38)) * grad_out
    grad_left = tl.sum(weight, axis=1)
    lhs_o = tl.load(poly_ptr + left[:, None, None] + other, mask=term, other=0.0)
    rhs_i = tl.load(poly_ptr + right[:, None, None] + i, mask=v3 & hr3 & (i <= DEGREE), other=0.0)
    weight = tl.exp(tl.where(term & hr3, lhs_o + rhs_i - out, -3.0e38)) * grad_out
    grad_right = tl.sum(weight, axis=1)
    ii = tl.arange(0, DEGREE_PAD)[None, :]
    in_range = valid[:, None] & (ii <= DEGREE)
    tl.store(grad_poly_ptr + left[:, None] + ii, grad_left, mask=in_range)
    tl.store(grad_poly_ptr + right[:, None] + ii, grad_right, mask=in_range & has_right[:, None])
