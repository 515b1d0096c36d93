"""The delta family's WY inverse Tm = (I + Akk)^{-1} of each chunk in blocks of 16 rows, for the
scans with no gate or a scalar one.

Akk = tril(diag(b) K K^T * e^{G_r - G_s}, -1) is formed as its blocks of 16 x 16 on and below the
diagonal, each a tile of its own (the ten of chunk 64); the diagonal blocks are inverted by
substitution, all four in one loop, and the blocks below by block forward substitution,
X_ij = -X_ii sum_{j <= m < i} A_im X_mj, in fp32-accurate products of [16, 16] tiles (tf32x3:
three tf32 tensor-core products each), as flash-linear-attention's fused ``kkt_solve`` kernel works
(its products are fp32 FMAs, which spilled 450-630 B at one warp here).  Why not the whole [C, C]
tile (``common.unit_lower_inverse``, still the per-channel gate's, in the prepare kernel): there the
inverse was about two thirds of the prepare kernel's work at chunk 64 (four [64, 64] products in
tf32x3, mostly on zero blocks, at 4 warps); here the products touch only the nonzero blocks, and
the [16, 16] tiles let the kernel run at one warp, eight programs to a multiprocessor.  Static
sm_90 (Triton 3.9, d = 128, bf16 dots, T = 2048, B = 8, H = 16; ``benchmarks/sm90_vs_fla.py``):
inverse and prepare kernels together 85 K (DeltaNet) and 94 K (Gated DeltaNet) warp-instructions
per SM scheduler, against 150 K and 157 K for the fused prepare kernel, and 172 K and 105 K for
fla's kernels doing the same.  Tm goes to its buffer (the blocks above the diagonal as zeros), in
the dots' operand dtype; the prepare kernel reads it for W and U, the backward as before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, Blocks, block_gates, load_operand, load_steps, mm, scores, seq_start, store_tile


def inverse_key_block(blocks: Blocks, device: torch.device | str) -> int:
    """Key channels per step of the kernel's Gram blocks: up to 64 on CUDA (static sm_90, d = 128,
    bf16 dots, one warp: no spill at one to three pipeline stages with Triton 3.6 or 3.9, where 16
    or 32 spill 32 B at two or three stages with 3.9; instructions within 3%), all of them on the
    CPU interpreter (fewer steps to interpret)."""
    return min(blocks.BK, 64) if torch.device(device).type == "cuda" else blocks.BK


@triton.jit
def _block_gates(g_seq, rows, before, T, HEADS, GATE: tl.constexpr):
    """(G, total): G, the chunk's inclusive cumsum of the log-gate, at ``rows`` (a block of 16) as
    [16, 1], given ``before`` [1, 1], the sum of the chunk's log-gates before them; total = before +
    their sum (zeros without a gate)."""
    _, G, _, G_last = block_gates(g_seq, rows, rows, T, 1, HEADS, 16, GATE, False)
    return G + before, before + G_last


@triton.jit
def _akk_block(kk, b, Gi, Gj, GATE: tl.constexpr, DIAGONAL: tl.constexpr):
    """Block (i, j) of Akk from kk = K_i K_j^T [16, 16], b_i [16] and G_i, G_j [16, 1]: strictly
    lower on the diagonal (DIAGONAL), whole below it (every row there comes after every column)."""
    r = tl.arange(0, 16)
    if DIAGONAL:
        mask = r[:, None] > r[None, :]
    else:
        mask = r[:, None] >= 0
    return b[:, None] * scores(kk, Gj, Gi, mask, GATE)


@triton.jit
def _substitution_step(x, a, j, r):
    """Step j of the substitution: column j of ``a`` times row j of the inverse ``x``, off ``x``."""
    col = tl.sum(tl.where((r == j)[None, :], a, 0.0), 1)
    row = tl.sum(tl.where((r == j)[:, None], x, 0.0), 0)
    return x - col[:, None] * row[None, :]


@triton.jit
def _diagonal_inverses(a0, a1, a2, a3, NB: tl.constexpr):
    """(I + tril(a, -1))^{-1} of the first NB of four [16, 16] fp32 blocks by right-looking
    substitution, all in one loop (independent chains to interleave): step j subtracts column j of
    ``a`` times row j of the inverse from the rows below (15 steps)."""
    r = tl.arange(0, 16)
    x0 = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    x1 = x0
    x2 = x0
    x3 = x0
    for j in range(0, 15):
        x0 = _substitution_step(x0, a0, j, r)
        if NB > 1:
            x1 = _substitution_step(x1, a1, j, r)
            if NB > 2:
                x2 = _substitution_step(x2, a2, j, r)
                x3 = _substitution_step(x3, a3, j, r)
    return x0, x1, x2, x3


# fp32-accurate products of [16, 16] tiles (``common.mm``): the inverse carries no tf32/bf16 rounding
_EXACT = tl.constexpr("tf32x3-interpreted" if INTERPRETED.value else "tf32x3")


@triton.jit
def _store_block(tm, x, start, bi: tl.constexpr, bj: tl.constexpr, L, C: tl.constexpr):
    """Block (bi, bj) of the chunk's Tm into rows start.. of the [L, C] buffer ``tm``."""
    r = tl.arange(0, 16)
    store_tile(tm, x, start + bi * 16 + r, bj * 16 + r, L, C, C)


@triton.jit(do_not_specialize=["N"])
def _wy_inverse_kernel(
    k_ptr, beta_ptr, g_ptr, tm_ptr,
    T, N, L, HEADS: tl.constexpr, dk: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk per program (grid (nc, N)): its Tm = (I + Akk)^{-1} into rows i*C .. i*C+C-1 of
    the [N, L, C] buffer (module docstring), in the buffer's dtype.  C in {16, 32, 64}; GATE 0 or 1.
    The Gram blocks K_i K_j^T are products at the kernel's dot precision, BKD key channels at a time."""
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    NB: tl.constexpr = C // 16
    start = i * C
    r = tl.arange(0, 16)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    b_seq = seq_start(beta_ptr, n, T, HEADS, 1)
    g_seq = seq_start(g_ptr, n, T, HEADS, 1)
    tm = tm_ptr + n * L * C

    # Gram blocks K_i K_j^T (j <= i), BKD channels at a time, each key block loaded once a step (a
    # loop, not unrolled: unrolled, fp32 "ieee" dots at chunk 32 spilled 4.4 KB at one warp on sm_90)
    z = tl.zeros([16, 16], tl.float32)
    kk00 = z
    kk10 = z
    kk11 = z
    kk20 = z
    kk21 = z
    kk22 = z
    kk30 = z
    kk31 = z
    kk32 = z
    kk33 = z
    for c0 in range(0, BK, BKD):
        cols = c0 + tl.arange(0, BKD)
        k0 = load_operand(k_seq, start + r, cols, T, dk, HEADS * dk)
        kk00 += mm(k0, tl.trans(k0), PREC)
        if NB > 1:
            k1 = load_operand(k_seq, start + 16 + r, cols, T, dk, HEADS * dk)
            kk10 += mm(k1, tl.trans(k0), PREC)
            kk11 += mm(k1, tl.trans(k1), PREC)
            if NB > 2:
                k2 = load_operand(k_seq, start + 32 + r, cols, T, dk, HEADS * dk)
                k3 = load_operand(k_seq, start + 48 + r, cols, T, dk, HEADS * dk)
                kk20 += mm(k2, tl.trans(k0), PREC)
                kk21 += mm(k2, tl.trans(k1), PREC)
                kk22 += mm(k2, tl.trans(k2), PREC)
                kk30 += mm(k3, tl.trans(k0), PREC)
                kk31 += mm(k3, tl.trans(k1), PREC)
                kk32 += mm(k3, tl.trans(k2), PREC)
                kk33 += mm(k3, tl.trans(k3), PREC)

    # per block of rows: beta, G and the diagonal block's inverse (the four substitutions in one loop)
    b0 = load_steps(b_seq, start + r, T, HEADS)
    G0, gsum = _block_gates(g_seq, start + r, tl.zeros([1, 1], tl.float32), T, HEADS, GATE)
    a0 = _akk_block(kk00, b0, G0, G0, GATE, True)
    b1 = b0
    b2 = b0
    b3 = b0
    G1 = G0
    G2 = G0
    G3 = G0
    a1 = z
    a2 = z
    a3 = z
    if NB > 1:
        b1 = load_steps(b_seq, start + 16 + r, T, HEADS)
        G1, gsum = _block_gates(g_seq, start + 16 + r, gsum, T, HEADS, GATE)
        a1 = _akk_block(kk11, b1, G1, G1, GATE, True)
        if NB > 2:
            b2 = load_steps(b_seq, start + 32 + r, T, HEADS)
            b3 = load_steps(b_seq, start + 48 + r, T, HEADS)
            G2, gsum = _block_gates(g_seq, start + 32 + r, gsum, T, HEADS, GATE)
            G3, gsum = _block_gates(g_seq, start + 48 + r, gsum, T, HEADS, GATE)
            a2 = _akk_block(kk22, b2, G2, G2, GATE, True)
            a3 = _akk_block(kk33, b3, G3, G3, GATE, True)
    X00, X11, X22, X33 = _diagonal_inverses(a0, a1, a2, a3, NB)

    # the blocks below, row by row: X_ij = -X_ii sum_{j <= m < i} A_im X_mj
    _store_block(tm, X00, start, 0, 0, L, C)
    if NB > 1:
        A10 = _akk_block(kk10, b1, G1, G0, GATE, False)
        X10 = -mm(X11, mm(A10, X00, _EXACT), _EXACT)
        _store_block(tm, z, start, 0, 1, L, C)
        _store_block(tm, X10, start, 1, 0, L, C)
        _store_block(tm, X11, start, 1, 1, L, C)
        if NB > 2:
            A20 = _akk_block(kk20, b2, G2, G0, GATE, False)
            A21 = _akk_block(kk21, b2, G2, G1, GATE, False)
            X21 = -mm(X22, mm(A21, X11, _EXACT), _EXACT)
            X20 = -mm(X22, mm(A20, X00, _EXACT) + mm(A21, X10, _EXACT), _EXACT)
            A30 = _akk_block(kk30, b3, G3, G0, GATE, False)
            A31 = _akk_block(kk31, b3, G3, G1, GATE, False)
            A32 = _akk_block(kk32, b3, G3, G2, GATE, False)
            X32 = -mm(X33, mm(A32, X22, _EXACT), _EXACT)
            X31 = -mm(X33, mm(A31, X11, _EXACT) + mm(A32, X21, _EXACT), _EXACT)
            X30 = -mm(X33, mm(A30, X00, _EXACT) + mm(A31, X10, _EXACT) + mm(A32, X20, _EXACT), _EXACT)
            for bj in tl.static_range(0, 4):
                _store_block(tm, z, start, 0 + (bj >= 2), 2 + bj % 2, L, C)
            _store_block(tm, X20, start, 2, 0, L, C)
            _store_block(tm, X21, start, 2, 1, L, C)
            _store_block(tm, X22, start, 2, 2, L, C)
            _store_block(tm, z, start, 2, 3, L, C)
            _store_block(tm, X30, start, 3, 0, L, C)
            _store_block(tm, X31, start, 3, 1, L, C)
            _store_block(tm, X32, start, 3, 2, L, C)
            _store_block(tm, X33, start, 3, 3, L, C)
