"""Building blocks shared by the forward and backward chunk kernels.

In-kernel (``@triton.jit``): tile loads and stores, the chunk's log-decays, the
readout mask, the intra-chunk scores, the WY/UT factors of the delta rule.
Python side: the head-dim limit, the register blocks, and ``kernel_blocks``,
the one place where block sizes and warps are chosen per device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from nlcompile import knobs
from nlcompile.targets.triton_target import interpreting

# --------------------------------------------------------------------------- in-kernel helpers

# Kernels run by Triton's CPU interpreter (decided, as Triton decides it, when this is imported).
INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def unit_lower_inverse(a, C: tl.constexpr):
    """``(I + tril(a, -1))^{-1}`` of a [C, C] fp32 block; the diagonal and upper part of ``a`` are ignored.
    The per-channel gate's WY inverse (``channel_wy_factors``, in the prepare kernel); without one
    the inverse is a kernel of its own in [16, 16] tiles (``wy_inverse``).

    Blocked, as flash-linear-attention inverts its chunks: the 16x16 diagonal blocks first, all at
    once as one [C/16, 16, 16] tile, by right-looking substitution (step j subtracts column j of
    each block times row j of its inverse from the rows below: 15 steps), then the blocks below the
    diagonal by Horner's rule over the block levels, with D^{-1} the block-diagonal inverse and M =
    D^{-1} tril_block(a): (I + M)^{-1} D^{-1} = D^{-1} - M (D^{-1} - M (...)), exact since M^{C/16}
    = 0: C/16 products with M's own, all fp32-accurate (``exact_mm``). Why: the sequential chain
    (a row-by-row substitution over the whole [C, C] tile, which this replaced, took 2.5-3 times
    the instructions and 9-12 times the barriers in the then fused prepare kernel, static sm_90).
    Rounding on par with the substitution (measured when this replaced it, random unit lower
    matrices up to C = 64: within 3x of its error, ~1e-6 for inverses with entries of 1e8;
    tests/test_triton_forward.py checks against float64).
    """
    NB: tl.constexpr = C // 16
    rows = tl.arange(0, C)
    lower = rows[:, None] > rows[None, :]
    blk = tl.arange(0, NB)
    on_diagonal = (blk[:, None] == blk[None, :])[:, None, :, None]                  # [NB, 1, NB, 1]
    d = tl.sum(tl.where(on_diagonal, tl.reshape(tl.where(lower, a, 0.0), [NB, 16, NB, 16]), 0.0), 2)
    r = tl.arange(0, 16)
    x = tl.where((r[:, None] == r[None, :])[None, :, :], 1.0, 0.0) + tl.zeros([NB, 16, 16], tl.float32)
    for j in range(0, 15):
        col = tl.sum(tl.where((r == j)[None, None, :], d, 0.0), 2)     # [NB, 16]: column j of each block
        row = tl.sum(tl.where((r == j)[None, :, None], x, 0.0), 1)     # [NB, 16]: row j of its inverse
        x = x - col[:, :, None] * row[:, None, :]
    inv = tl.reshape(tl.where(on_diagonal, x[:, :, None, :], 0.0), [C, C])   # D^{-1}
    if NB > 1:
        m = exact_mm(inv, tl.where(lower & ((rows[:, None] // 16) != (rows[None, :] // 16)), a, 0.0))
        dinv = inv
        for _ in tl.static_range(1, NB):
            inv = dinv - exact_mm(m, inv)
    return inv


@triton.jit
def reverse_cumsum(x, axis: tl.constexpr):
    """Inclusive cumulative sum from the end along ``axis``: out_i = sum_{j >= i} x_j."""
    return tl.sum(x, axis, keep_dims=True) - tl.cumsum(x, axis) + x


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bfloat16 value (ties to even), kept in fp32: what a GPU's
    conversion does; Triton's interpreter truncates instead, and its bf16 dots are wrong."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def truncate_to_tf32(x):
    """fp32 ``x`` with its 13 low mantissa bits cleared, kept in fp32: the operand a Hopper tensor
    core's tf32 product uses (PTX: wgmma with .tf32 "will truncate lower 13 bits of the 32-bit
    input data"); Triton's interpreter computes tf32 dots in fp32 instead."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def round_to_tf32(x):
    """fp32 ``x`` rounded to the nearest tf32 value (10 mantissa bits, ties away from zero: PTX's
    cvt.rna.tf32.f32), kept in fp32."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def tf32x3_emulated(a, b):
    """What Triton's "tf32x3" dot computes on an NVIDIA GPU, for its CPU interpreter (which would
    compute fp32 products): each operand split into a tf32 head (rounded) and the rest, the three
    products small x big, big x small, big x big summed in that order as tf32 products (operands
    truncated to tf32, exact products, fp32 accumulation); small x small is dropped."""
    a_big = round_to_tf32(a)
    b_big = round_to_tf32(b)
    a_small = truncate_to_tf32(a - a_big)
    b_small = truncate_to_tf32(b - b_big)
    acc = tl.dot(a_small, b_big, input_precision="ieee")
    acc += tl.dot(a_big, b_small, input_precision="ieee")
    return acc + tl.dot(a_big, b_big, input_precision="ieee")


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """Matmul of two blocks at the kernel's dot precision (``dot_precision``), fp32 accumulation.
    The blocks are fp32, or tiles as ``load_operand`` read them (bf16, fp16: converted here, once,
    to what the precision multiplies).

    "bf16": both operands rounded to bfloat16 (tensor cores at their bf16 rate); "bf16-interpreted"
    is the same arithmetic for Triton's CPU interpreter (rounded in fp32, exact fp32 products),
    "tf32-interpreted" that of "tf32" on an H100 (operands truncated to tf32), and
    "tf32x3-interpreted" that of "tf32x3" (``tf32x3_emulated``).
    """
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PREC == "bf16-interpreted":
        return tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)), input_precision="ieee")
    elif PREC == "tf32-interpreted":
        return tl.dot(truncate_to_tf32(a.to(tl.float32)), truncate_to_tf32(b.to(tl.float32)), input_precision="ieee")
    elif PREC == "tf32x3-interpreted":
        return tf32x3_emulated(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def exact_mm(a, b):
    """Matmul of [C, C] fp32 blocks accurate to fp32 whatever the kernel's dot precision (the WY
    inverse must not carry tf32/bf16 rounding): fp32 FMAs ("ieee") for C <= 32, three tf32
    tensor-core products ("tf32x3", fp32's rounding) above: at C = 64 fp32 FMA products spill
    (sm_90, 8 warps: 255 registers and 3 KB of stack in the prepare kernel), while at C = 32 they
    need fewer registers than tf32x3 (78 vs 104).  The interpreter emulates tf32x3
    (``tf32x3_emulated``)."""
    if a.shape[0] <= 32:
        return tl.dot(a, b, input_precision="ieee")
    elif INTERPRETED:
        return tf32x3_emulated(a, b)
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def seq_start(ptr, n, T, HEADS, width):
    """Where sequence n = b * HEADS + h starts in a [B, T, HEADS, width] tensor (flash-linear-
    attention's layout, read in place), or in an [N, T, width] one when HEADS = 1.  Its rows are
    HEADS * width apart."""
    return ptr + (n // HEADS) * T * HEADS * width + (n % HEADS) * width


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, row_stride):
    """[len(rows), len(cols)] fp32 tile of a row-major matrix; zeros outside n_rows x n_cols
    (the masked tail of the sequence, the padding of a head dim).  Row offsets in int64: in the
    [B, T, H, D] layout a sequence spans T * H * D elements, past 2^31 for long T."""
    return load_operand(ptr, rows, cols, n_rows, n_cols, row_stride).to(tl.float32)


@triton.jit
def load_operand(ptr, rows, cols, n_rows, n_cols, row_stride):
    """``load_tile`` in the buffer's own dtype, for a tile that only feeds ``mm`` or is scaled by
    an fp32 factor (which promotes it to fp32 exactly): a bf16 operand under bf16 dots then
    reaches the tensor cores as loaded, with no fp32 copy in registers and no conversion back
    (half the registers; on sm_90 the dot can take it from shared memory).  Not for products or
    sums of two such tiles, which would round in their low precision."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, x, rows, cols, n_rows, n_cols, row_stride):
    """Store the part of ``x`` inside n_rows x n_cols (padding rows/columns are never written).
    Into a bf16 buffer (the bf16 dots' operand buffers, gradients of bf16 inputs) the interpreter
    rounds to nearest even first, as a GPU's conversion does, where it would truncate."""
    if INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16(x)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], x, mask=mask)


@triton.jit
def transposed(x, scratch, C: tl.constexpr):
    """x^T of a [C, C] tile by way of ``scratch``, this program's own [C, C] tile in global memory
    (written, then read back transposed), not ``tl.trans``: a tensor-core product's result
    transposed into another product is what fla found Triton 3.4-3.7.0 miscompiling on Hopper (fla
    issue 640; the lent GPU machines run Triton 3.6).  In the scratch's dtype (the dots' operand
    dtype: what ``mm`` rounds to anyway).  The barriers make it correct whichever thread reads what
    another wrote (the layouts are the compiler's choice), so every thread of the program must
    reach the call: call it outside data-dependent branches (constexpr ones are fine)."""
    r = tl.arange(0, C)
    tl.debug_barrier()   # every thread done with the scratch's previous contents
    store_tile(scratch, x, r, r, C, C, C)
    tl.debug_barrier()
    return tl.load(scratch + r[None, :] * C + r[:, None])


@triton.jit
def decayed(x, log_decay, GATE: tl.constexpr):
    """x e^{log_decay} (fp32), or ``x`` as it is without a gate (GATE 0: every log-decay is 0, and
    an operand tile goes to ``mm`` as ``load_operand`` read it)."""
    if GATE == 0:
        return x
    else:
        return x * tl.exp(log_decay)


@triton.jit
def load_steps(ptr, rows, T, HEADS):
    """A per-step scalar (beta, scalar log-gate) at ``rows`` (HEADS apart: ``seq_start``), fp32,
    0 at rows >= T."""
    return tl.load(ptr + rows.to(tl.int64) * HEADS, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def store_steps(ptr, x, rows, T, HEADS):
    """Store a per-step scalar (its gradient) at ``rows`` < T, HEADS apart as ``load_steps`` reads it."""
    tl.store(ptr + rows.to(tl.int64) * HEADS, x, mask=rows < T)


@triton.jit
def chunk_gates(g_seq, rows, T, dk, HEADS, C: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
                BEFORE: tl.constexpr):
    """Log-decays of one chunk: (g, G = cumsum(g), Gq (readout rows), G_L (last row)).

    GATE 2 (per key channel, ``g_seq`` [T, dk]): [C,BK], [C,BK], [C,BK], [1,BK]; GATE 1
    (scalar, [T]) or 0 (none: zeros): [C,1], [C,1], [C,1], [1,1], so all broadcast against
    [C,BK] tiles.  Gq is G (readout "after") or G - g ("before").  Rows t >= T have g = 0,
    hence G_L equals G at the chunk's last real row.
    """
    return block_gates(g_seq, rows, tl.arange(0, BK), T, dk, HEADS, C, GATE, BEFORE)


@triton.jit
def block_gates(g_seq, rows, cols, T, dk, HEADS, C: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr):
    """``chunk_gates`` for the key channels ``cols`` ([C, len(cols)] tiles with a per-channel gate,
    [C, 1] otherwise)."""
    if GATE == 2:
        g = load_tile(g_seq, rows, cols, T, dk, HEADS * dk)
        G = tl.cumsum(g, 0)
    elif GATE == 1:  # scanned as a vector: Triton 3.6 fails to lower a scan over a [C, 1] block for sm_90
        g_steps = load_steps(g_seq, rows, T, HEADS)
        g = g_steps[:, None]
        G = tl.cumsum(g_steps, 0)[:, None]
    else:
        g = tl.zeros([C, 1], dtype=tl.float32)
        G = g
    if BEFORE:
        Gq = G - g
    else:
        Gq = G
    last = tl.arange(0, C)[:, None] == C - 1
    GL = tl.sum(tl.where(last, G, 0.0), 0, keep_dims=True)
    return g, G, Gq, GL


@triton.jit
def readout_mask(C: tl.constexpr, BEFORE: tl.constexpr):
    """Which (r, s) pairs of a chunk the readout sees: s <= r ("after") or s < r ("before")."""
    r = tl.arange(0, C)
    if BEFORE:
        return r[:, None] > r[None, :]
    else:
        return r[:, None] >= r[None, :]


@triton.jit
def pair_decay(Gr, Gs, mask, GATE: tl.constexpr):
    """[C,C] exp(Gr_r - Gs_s) where ``mask``, else 0 (Gr, Gs [C,1]). Masked before exp.  Without a
    gate (GATE 0: every log-decay 0) the mask itself, with no exps."""
    if GATE == 0:
        return tl.where(mask, 1.0, 0.0)
    else:
        return tl.exp(tl.where(mask, Gr - tl.trans(Gs), float("-inf")))


@triton.jit
def channel_decay(Gq, G, mask):
    """[C,C,B] exp(Gq_rc - G_sc) where ``mask[r, s]``, else 0 (per-channel gate, Gq, G [C,B])."""
    return tl.exp(tl.where(mask[:, :, None], Gq[:, None, :] - G[None, :, :], float("-inf")))


@triton.jit
def gram(a_seq, b_seq, rows, T, dk, HEADS, C: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr,
         PREC: tl.constexpr):
    """[C, C] A B^T of the chunk's ``rows`` of two [T, dk] matrices, rows HEADS * dk apart (Q K^T, K Q^T),
    BKD key channels at a time (loaded from memory: an fp32 dot holds its operands' whole
    reduction dim in registers, so BKD < BK bounds them on a GPU)."""
    acc = tl.zeros((C, C), dtype=tl.float32)
    for c0 in tl.static_range(0, BK, BKD):
        cols = c0 + tl.arange(0, BKD)
        acc += mm(load_operand(a_seq, rows, cols, T, dk, HEADS * dk),
                  tl.trans(load_operand(b_seq, rows, cols, T, dk, HEADS * dk)), PREC)
    return acc


@triton.jit
def scores(qk, G, Gq, mask, GATE: tl.constexpr):
    """Intra-chunk readout scores A [C,C] from ``qk`` = Q K^T, masked and, for a scalar gate
    (G, Gq [C,1]), decayed: A = (Q K^T) * e^{Gq_r - G_s}.  Not for GATE 2."""
    if GATE == 0:
        return tl.where(mask, qk, 0.0)
    else:
        return qk * pair_decay(Gq, G, mask, GATE)


@triton.jit
def channel_scores(q_seq, k_seq, g_seq, rows, T, dk, HEADS, mask, C: tl.constexpr, BK: tl.constexpr,
                   BKC: tl.constexpr, BEFORE: tl.constexpr):
    """Per-channel-gate scores A_rs = sum_c q_rc k_sc e^{Gq_rc - G_sc} [C,C] (masked), from
    [C,C,BKC] products, BKC channels at a time (reloaded from memory: the register block
    stays C*C*BKC however large dk is)."""
    A = tl.zeros((C, C), dtype=tl.float32)
    for c0 in tl.static_range(0, BK, BKC):
        cols = c0 + tl.arange(0, BKC)
        q_c = load_tile(q_seq, rows, cols, T, dk, HEADS * dk)
        k_c = load_tile(k_seq, rows, cols, T, dk, HEADS * dk)
        g_c = load_tile(g_seq, rows, cols, T, dk, HEADS * dk)
        G_c = tl.cumsum(g_c, 0)
        if BEFORE:
            Gq_c = G_c - g_c
        else:
            Gq_c = G_c
        A += tl.sum(q_c[:, None, :] * k_c[None, :, :] * channel_decay(Gq_c, G_c, mask), 2)
    return A


@triton.jit
def channel_wy_factors(k_seq, g_seq, b, G, rows, T, dk, HEADS, C: tl.constexpr, BK: tl.constexpr,
                       BKC: tl.constexpr):
    """The delta rule's chunk factors for a per-key-channel gate in the "gate first" order
    (S_t = (I - b_t k_t k_t^T) diag(e^{g_t}) S_{t-1} + k_t v_t^T): (Tm, eb) with
    kkg_rs = sum_c k_rc k_sc e^{G_rc - G_sc} (s < r, else 0; from [C, C, BKC] products,
    masked before exp), Akk = diag(b) kkg, Tm = (I + Akk)^{-1} and eb = b e^G [C, BK] per
    channel, so W = Tm (K * eb) and U = Tm V."""
    r = tl.arange(0, C)
    kkg = channel_scores(k_seq, k_seq, g_seq, rows, T, dk, HEADS, r[:, None] > r[None, :], C, BK, BKC, False)
    return unit_lower_inverse(b[:, None] * kkg, C), b[:, None] * tl.exp(G)


# --------------------------------------------------------------------------- launch choices

MAX_HEAD_DIM = 256
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def kernel_dtype(k: Tensor, q: Tensor | None, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The one dtype the kernels compute as: bf16, fp16 (16-bit floats, not all bf16) or fp32.
    ``compute_dtype``, the dtype the update loop computes its recurrence in
    (``passes/fx/precision.py``), decides when given, not the storage of k and q: a loop that
    upcasts bf16 keys to fp32 inside computes in fp32, and so do the kernels, reading the bf16
    keys as they are; one that rounds its state to bf16 for its products (autocast) in bf16.
    Else the dtypes of k and q: bf16 when both are.  ``kernel_dtype(k, q2, kernel_dtype(k, q, c))
    == kernel_dtype(k, q, c)`` for any q2: what the autograd formula passes on to the backward
    and to a recomputation without queries, so that all three agree."""
    dtypes = {compute_dtype} if compute_dtype is not None else {x.dtype for x in (k, q) if x is not None}
    if dtypes == {torch.bfloat16}:
        return torch.bfloat16
    if dtypes <= set(_LOW_PRECISION):
        return torch.float16
    return torch.float32


def dot_precision(k: Tensor, q: Tensor | None, backward: bool = False,
                  compute_dtype: torch.dtype | None = None) -> str:
    """``tl.dot`` precision of the forward (or ``backward``) kernels, by ``kernel_dtype``: the
    precision the model runs in (the values may arrive in fp32, or in bf16 for a loop computing
    in fp32).

    fp32: "ieee" (fp32 products: the compiler checks against eager at 1e-4).
    bf16: "bf16", forward and backward (operands rounded to bf16, fp32 accumulation and recurrence:
    flash-linear-attention's precision; outputs and gradients stay within the error of the update
    loop run in bf16, tests/test_triton_target.py).  Measured on an H100 (Triton 3.6, B=8 H=16
    D=128, DeltaNet T=2048, ``benchmarks/bench_triton.py``, one run, 2026-11-27): fwd / fwd+bwd
    1.17 / 4.44 ms with bf16 dots against 1.67 / 11.22 ms with the previous default, tf32 forward
    and fp32 ("ieee") backward.
    fp16: "tf32" in the forward (operands truncated to 10 mantissa bits, as fp16's own) and
    "ieee" in the backward (bf16 operands would round fp16 inputs more coarsely than fp16 does).
    ``NLCOMPILE_TRITON_DOT`` overrides both.  The CPU interpreter runs "bf16", "tf32" and "tf32x3"
    emulated ("bf16-interpreted", "tf32-interpreted", "tf32x3-interpreted": operands rounded or
    split as the GPU does it, products in fp32; ``mm``), "ieee" in fp32.
    """
    prec = knobs.triton_dot_precision()
    if not prec:
        prec = {torch.bfloat16: "bf16", torch.float16: "ieee" if backward else "tf32",
                torch.float32: "ieee"}[kernel_dtype(k, q, compute_dtype)]
    if prec in ("bf16", "tf32", "tf32x3") and interpreting():
        return f"{prec}-interpreted"
    return prec


def gradient_dtype(x: Tensor, as_dtype: torch.dtype) -> torch.dtype:
    """dtype of the kernels' gradient buffer for input ``x`` (dk, dv, dq), the kernels computing
    as ``as_dtype`` (``kernel_dtype``): ``x``'s own when that is it (a bf16 input's gradient
    written once in bf16, as autograd would cast it), else fp32: partial sums one kernel stores
    and another adds to then stay fp32, and the op casts once at the end, as autograd's cast of
    an upcast does."""
    return x.dtype if x.dtype == as_dtype else torch.float32


def operand_dtype(prec: str) -> torch.dtype:
    """dtype of the buffers the kernels pass each other mostly as dot operands (the state entering
    each chunk, W, U and V' = U - W H; in the backward dL/dH, dL/dV' and dL/dW): bf16 with "bf16"
    dots, whose operands are rounded to bf16 anyway (half the memory traffic, as flash-linear-
    attention stores them; the recurrence itself carries fp32; U is rounded before V' = U - W H
    is formed, as fla's is, and the readout's part of dL/dV' before the state's is added, as fla's
    dv is), fp32 otherwise."""
    return torch.bfloat16 if prec.startswith("bf16") else torch.float32


def sequences(k: Tensor) -> tuple[int, int, int, tuple[int, ...]]:
    """(N, T, heads, prefix) of the keys: [N, T, dk] (heads = 1, prefix (N, T)), or
    flash-linear-attention's [B, T, H, dk] (N = B * H sequences, sequence b * H + h; heads = H,
    prefix (B, T, H)), which the kernels read in place (``seq_start``).  Every per-step input and
    output (v, q, beta, g, o and the gradients) has the same prefix."""
    if not isinstance(k, Tensor) or k.dim() not in (3, 4):
        raise ValueError(f"k must be a [N,T,dk] or [B,T,H,dk] tensor, got {getattr(k, 'shape', type(k).__name__)}")
    if k.dim() == 3:
        return k.shape[0], k.shape[1], 1, tuple(k.shape[:2])
    return k.shape[0] * k.shape[2], k.shape[1], k.shape[2], tuple(k.shape[:3])


def block(d: int) -> int:
    """Register block for a head dim of size d: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers.  This and ``block`` are plain Python on purpose:
    ``triton.cdiv`` and ``triton.next_power_of_2`` go through Triton's constexpr wrapper, some
    3 us a call on the host, and a call of the scan asked them a dozen times before its first
    launch (the host time before a call's first launch is the GPU's idle time)."""
    return -(-a // b)


@dataclass(frozen=True)
class Blocks:
    """Block sizes and warps of the chunk kernels for one device, head dims and chunk."""

    chunk: int       # the chunk length C they are for: the one asked, or less where it would not fit
    BK: int          # key block: all of dk
    BV: int          # value columns per program (states, output, states_bwd) and per step of the grads' dv loop
    BV_prepare: int  # value columns of the prepare kernel: all of dv
    BKC: int         # key channels per step of the per-channel-gate scores ([C, C, BKC] products)
    BKD: int         # key channels per step of the [C, C] Gram products Q K^T, K Q^T (``gram``)
    num_warps: int


# CUDA (sized on the H100, sm_90: 232448 bytes of shared memory per block).  The fp32 "ieee" dots
# run on FMA units and hold their operands' whole reduction dim in registers, staged through shared
# memory, so the tiles are kept to about 4096 elements (16 a thread at 8 warps): [C, dk] and
# [C, dv] for a chunk, [BK, BV] for the state, and the Gram products reduce 32 channels at a time.
# Under bf16 dots the operands are 2-byte tiles the tensor cores read from shared memory, and a
# chunk's tiles may have 8192 elements: chunk 64 at d = 128, as flash-linear-attention's.
# Under "ieee" dots the chunk is at most 32 whatever the head dim: an FMA product's work grows with
# C^2 in the chunk-parallel kernels, C*d per chunk in the sequential ones, so a shorter chunk
# costs those nothing (static sm_90 counts at d = 64, 8 warps: states and reverse-states kernels
# 849 / 1222 instructions per chunk x 2 at chunk 32 against 1729 / 2611 at 64), halves the rest and
# cuts their spills (at chunk 64: prepare 0.8-1.0 KB, WY gradients 2.3-2.5 KB per thread; none at 32).
_CUDA_TILE = 4096
_CUDA_TILE_BF16 = 8192
_CUDA_MAX_CHUNK_IEEE = 32
_CUDA_MAX_BV = 32
_CUDA_WARPS = 8
_CUDA_BKD = 32


def kernel_blocks(device: torch.device | str, dk: int, dv: int, chunk: int, prec: str | tuple[str, ...],
                  shrink: bool = False) -> Blocks:
    """The blocks all chunk kernels (forward and backward) are launched with, per device type
    (on CUDA the value blocks and warps are those of the untuned launch: ``tuning``), for a chunk
    run at the dot precision ``prec`` (``dot_precision``), or at each of several (the forward's and
    the backward's: they share the chunk).

    ``chunk`` is the chunk length asked.  Where the device needs a shorter one, ``shrink`` gives
    it in ``Blocks.chunk`` (``ops.kernel_chunk`` picks the chunk that way); without ``shrink``
    (the launchers: the chunk fixes the layout of H, V', W) that is a ValueError, not a launch
    failure on the GPU.
    CPU (the interpreter): the chunk as asked, BV = 64 value columns (32 for dk > 128), BKC such
    that a [C, C, BKC] product stays <= 8192 elements (at least 16: the grads kernel's dots over a
    block of BKC channels), 4 warps (ignored there).
    CUDA: 8 warps (``NLCOMPILE_TRITON_WARPS`` overrides, for measuring); the chunk halved until
    [C, dk] and [C, dv] tiles have <= 4096 elements (dk = dv = 64: 64, 128: 32, 256: 16), or 8192
    under "bf16" dots (128: 64, 256: 32), and to at most 32 under "ieee" dots; BV <= 32
    with [BK, BV] <= 4096 elements, BKC as on the CPU, BKD = 32.  Every kernel then fits the
    H100's 232448 B of shared memory per block (tests/test_triton_sm90.py; ``python
    tests/test_triton_sm90.py --all`` prints every kind).  A forced ``NLCOMPILE_TRITON_CHUNK`` lifts
    the tile cap (for measuring: with fp32 "ieee" dots at chunk 64 and dk = dv = 128 the backward
    kernels spill 1.5-7 KB per thread).
    """
    precs = (prec,) if isinstance(prec, str) else tuple(prec)
    choose = _blocks.__wrapped__ if torch.compiler.is_compiling() else _blocks   # (Dynamo warns of lru_cache)
    blocks = choose(torch.device(device).type, dk, dv, chunk, precs, knobs.triton_chunk(), knobs.triton_warps())
    if blocks.chunk != chunk and not shrink:
        raise ValueError(f"chunk {chunk} is too long for dk={dk}, dv={dv} with {'/'.join(precs)} dots on "
                         f"{device}: at most {blocks.chunk} (ops.kernel_chunk picks it)")
    return blocks


@lru_cache(maxsize=256)
def _blocks(device_type: str, dk: int, dv: int, chunk: int, precs: tuple[str, ...], forced_chunk: int | None,
            forced_warps: int | None) -> Blocks:
    """``kernel_blocks``' choice, a pure function of its arguments and the two knobs (``forced_*``), kept:
    every call of the scan asks it before its first launch, which a GPU waits idle for."""
    bk = block(dk)
    if device_type == "cuda":
        tile = min(_CUDA_TILE_BF16 if p.startswith("bf16") else _CUDA_TILE for p in precs)
        longest = _CUDA_MAX_CHUNK_IEEE if "ieee" in precs else chunk
        c = chunk
        while c > 16 and (c * max(bk, block(dv)) > tile or c > longest) and not forced_chunk:
            c //= 2
        bv = min(block(dv), _CUDA_MAX_BV, max(16, _CUDA_TILE // bk))
        warps = forced_warps or _CUDA_WARPS
        bkd = min(bk, _CUDA_BKD)
    else:
        c = chunk
        bv = min(block(dv), 64 if bk <= 128 else 32)
        warps = 4
        bkd = bk
    return Blocks(chunk=c, BK=bk, BV=bv, BV_prepare=block(dv), BKC=min(bk, max(16, 8192 // (c * c))),
                  BKD=bkd, num_warps=warps)
