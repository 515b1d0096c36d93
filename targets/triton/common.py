"""In-kernel building blocks shared by the forward and backward chunk kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unit_lower_inverse(a, C: tl.constexpr):
    """``(I + tril(a, -1))^{-1}`` of a [C, C] fp32 block; the diagonal and upper part of ``a`` are ignored.

    Forward substitution, one row per step: row i of the inverse is
    ``e_i - sum_{j<i} a_ij row_j``.  O(C^3) register work, no memory traffic.
    """
    rows = tl.arange(0, C)
    a = tl.where(rows[:, None] > rows[None, :], a, 0.0)
    inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)          # row i of a, [C]
        row = tl.sum(a_i[:, None] * inv, 0)                            # sum_j a_ij inv_j
        inv = tl.where(rows[:, None] == i, inv - row[None, :], inv)
    return inv


@triton.jit
def reverse_cumsum(x, axis: tl.constexpr):
    """Inclusive cumulative sum from the end along ``axis``: out_i = sum_{j >= i} x_j."""
    return tl.sum(x, axis, keep_dims=True) - tl.cumsum(x, axis) + x
