"""Backward Triton kernels of the chunkwise fast-weight scans, and their launcher.

Forward, per chunk i (see ``forward``): G = cumsum(g) in the chunk, Gq = G (readout
"after") or G - g ("before"), G_L = G at the last row, D = exp(G_L), Kt = K e^{G_L-G},
Qt = Q e^{Gq}, A the masked, decayed scores of Q against K, and for the delta family
Akk = tril_{-1}(b_r k_r.k_s e^{G_r-G_s}), Tm = (I + Akk)^{-1}, W = Tm diag(b e^G) K,
U = Tm V, V' = U - W H_i (else V' = V); with a per-channel gate (the gate-first order)
Akk_rs = b_r sum_c k_rc k_sc e^{G_rc-G_sc} and e^G is per channel in W::

    H_{i+1} = D H_i + Kt^T V'        O_i = Qt H_i + A V'

Backward, in four kernels:

``_readout_dv_kernel`` (grid (chunks, N, dv blocks), with q only) computes the part of dV'
that needs no state, A^T dO_i, for all chunks in parallel, into the dV' buffer (for the delta
family a scratch buffer, else dv itself, since then V' = V).  dO enters every kernel times the
queries' ``scale`` (O = scale (Qt H + A V')); the formulas below leave it out.

``_states_bwd_kernel`` (grid (N, dv blocks), sequential from the last chunk to the first)
carries dHn = dL/dH_{i+1}, starting at dH_final::

    dV'_i = A^T dO_i + Kt dHn
    dH_i  = D dHn + Qt^T dO_i - [delta] W^T dV'_i        (the next dHn; dh0 = dH_0)

adding Kt dHn to the dV' buffer in place and storing dHn for every chunk.  The scores A stay
out of this sequential loop (they are the largest part of a chunk's work for a per-channel gate).

``_grads_kernel`` (grid (chunks, N), all chunks in parallel) gets the gradients through
the state and the readout from H_i, dHn_i, V', dV': sums over dv (in blocks) of dQt = dO H^T,
dA = dO V'^T, dKt = V' dHn^T, dD = rowsum(dHn * H) and, for the delta family, dW = -dV' H^T
(stored for the next kernel); then through Kt, Qt, A into dq, dk and the log-decays G, whose
gradient becomes dg by a reverse cumsum within the chunk (G = cumsum(g)); the readout
"before" adds -dGq to dg (Gq = G - g).  Every one of these but dA is per key channel (a scalar
gate's dg a sum over them), and the kernel may do it all for a block of channels at a time, dA
formed again for each (``_grads_key_block``: BKC with a per-channel gate, half of BK at d = 256
without the delta rule under bf16 dots, else all of dk).

``_wy_grads_kernel`` (delta family; grid (chunks, N)) goes back through the WY form, with the
Tm the forward stored: dV = Tm^T dV', dKb = Tm^T dW, dTm = dV' V^T + dW Kb^T,
dAkk = -tril_{-1}(Tm^T dTm Tm^T), then through Akk and Kb into dbeta and its parts of dk and
dg, which it adds.  (One kernel for both held every accumulator at once and spilled 1.8-7 KB
per thread on sm_90.)

Sums of a score gradient against the scores' own Gram matrix (dbeta and dg need
sum_s dAkk_rs (k_r . k_s), the scalar gate's dg sum_s dA_rs (q_r . k_s)) are read off the
products the key and query gradients already form, sum_s dX_rs (a_r . b_s) = a_r . (dX B)_r,
instead of forming K K^T or Q K^T again (the readout_dv kernel still forms the scores, as A^T);
both the grads and the WY kernel may work through the key channels a block at a time, as only
dA and dAkk [C, C] need all of them (see each).  Tiles are
loaded where they are first needed, after the dv loops, not held through them.  Measured
statically on sm_90 (d = 128, bf16 dots, 8 warps, ``python tests/test_triton_sm90.py --space``),
against recomputing Tm and the Gram matrices: wy_grads at chunk 32 ~2.1-2.6 K instructions a
program -> ~1.4-1.8 K, at chunk 64 ~5.7-6.4 K -> ~2.1-2.3 K and no spills (were 344-416 B per
thread); Gated DeltaNet's grads kernel at chunk 32 no spills (were 96-104 B).
No product's result goes transposed into another product: the readout_dv kernel forms A^T as
such, and the grads and WY kernels transpose dA and dAkk's [C, C] score gradients through a
scratch tile of their own in global memory (``common.transposed``), a round trip like the one
proposed in fla's PR 826 after Triton 3.4-3.7.0 miscompiled ``tl.trans`` of such a result on Hopper
(fla itself refuses those Tritons there; the lent GPU machines run Triton 3.6).  Static sm_90
(Triton 3.6, d = 128, bf16 dots, 8 warps, BV = 32, 2 stages as the tuning space's): grads
DeltaNet / Gated DeltaNet 776 / 1616 -> 832 / 1680 instructions, WY 1768 / 2160 -> 1840 / 2208
(2-5% of a program's dynamic count; forming dA^T beside dA instead cost ~10%, and dAkk^T ~40%).
Every exponent is masked (to -inf) before exp and is <= 0 for gates in (0, 1], so
nothing overflows. Positions t >= T load as zeros (neutral steps), give zero
gradients and are never stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    MAX_HEAD_DIM, Blocks, block_gates, cdiv, channel_decay, channel_scores, chunk_gates, decayed, dot_precision,
    gradient_dtype, gram, kernel_dtype, kernel_blocks, load_operand, load_steps, load_tile, mm, operand_dtype,
    pair_decay, readout_mask, reverse_cumsum, scores, seq_start, sequences, store_steps, store_tile, transposed,
)
from .tuning import ChunkKernel, Space

__all__ = ["chunk_backward"]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _per_gate(x, GATE: tl.constexpr):
    """A per-channel gate gradient [C,BK] as it reaches the gate: itself, or summed over
    channels ([C,1]) for a scalar gate."""
    if GATE == 2:
        return x
    else:
        return tl.sum(x, 1, keep_dims=True)


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _readout_dv_kernel(
    k_ptr, q_ptr, g_ptr, do_ptr,                      # inputs
    dvp_ptr,                                          # output
    T, N, dvp_rows, scale, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr, dvp_heads: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr, BKD: tl.constexpr,
    GATE: tl.constexpr, BEFORE: tl.constexpr, PREC: tl.constexpr,
):
    """scale A^T dO of one chunk for one block of dv columns (grid (chunks, N, dv blocks)): the
    readout's intra-chunk part of dV' (``scale``: the queries' factor), into rows of ``dvp_ptr``
    ([N,dvp_rows,dv] scratch, dvp_heads = 1; or dv itself, in the inputs' layout: dvp_heads =
    HEADS).  A per-channel gate builds the scores A BKC channels at a time."""
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cols_v = tl.program_id(2) * BV + tl.arange(0, BV)
    rows = i * C + tl.arange(0, C)
    q_seq = seq_start(q_ptr, n, T, HEADS, dk)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    mask = readout_mask(C, BEFORE)
    if GATE == 2:
        At = tl.trans(channel_scores(q_seq, k_seq, g_seq, rows, T, dk, HEADS, mask, C, BK, BKC, BEFORE))
    else:  # A^T formed as such, K Q^T * e^{Gq_r - G_s} at [s, r] (scores' decay of -Gq against -G), rather
        # than a product's result transposed into another product (fla found Hopper compilers getting that wrong)
        _, G, Gq, _ = chunk_gates(g_seq, rows, T, dk, HEADS, C, BK, GATE, BEFORE)
        At = scores(gram(k_seq, q_seq, rows, T, dk, HEADS, C, BK, BKD, PREC), -Gq, -G, tl.trans(mask), GATE)
    do = load_operand(seq_start(do_ptr, n, T, HEADS, dv), rows, cols_v, T, dv, HEADS * dv)
    store_tile(seq_start(dvp_ptr, n, dvp_rows, dvp_heads, dv), mm(At, do, PREC) * scale, rows, cols_v,
               T, dv, dvp_heads * dv)


@triton.jit(do_not_specialize=["N"])
def _states_bwd_kernel(
    k_ptr, q_ptr, g_ptr, w_ptr, do_ptr, dhf_ptr,      # inputs
    dhn_ptr, dvp_ptr, dh0_ptr,                        # outputs (dvp: A^T dO in, dV' out)
    T, N, NC, dvp_rows, scale, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr, dvp_heads: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_Q: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse inter-chunk recurrence for one sequence and one block of dv columns.

    Carries dHn = dL/dH_{i+1} from dH_final back to dh0 = dL/dH_0 and stores, per chunk,
    dHn_i [N,NC,dk,dv] and dV'_i (rows of ``dvp_ptr``: [N,dvp_rows,dv], dvp_rows = NC*C
    for the delta scratch buffer, or dv itself: T rows in the inputs' layout, dvp_heads = HEADS),
    which with q holds A^T dO (``_readout_dv_kernel``) on entry.
    """
    n = tl.program_id(0).to(tl.int64)
    cols_v = tl.program_id(1) * BV + tl.arange(0, BV)
    cols_k = tl.arange(0, BK)
    r = tl.arange(0, C)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    q_seq = seq_start(q_ptr, n, T, HEADS, dk)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    w_seq = w_ptr + n * NC * C * dk
    do_seq = seq_start(do_ptr, n, T, HEADS, dv)
    dvp_seq = seq_start(dvp_ptr, n, dvp_rows, dvp_heads, dv)
    dh = load_tile(dhf_ptr + n * dk * dv, cols_k, cols_v, dk, dv, dv)   # dL/dH_NC
    for j in range(0, NC):
        i = NC - 1 - j
        rows = i * C + r
        k = load_operand(k_seq, rows, cols_k, T, dk, HEADS * dk)
        g, G, Gq, GL = chunk_gates(g_seq, rows, T, dk, HEADS, C, BK, GATE, BEFORE)
        # Kt dHn and Qt^T dO; a scalar gate's row decays scale the [C, BV] side, not k's or q's dk columns
        if GATE == 1:
            dvp = mm(k, dh, PREC) * tl.exp(GL - G)
        else:
            dvp = mm(decayed(k, GL - G, GATE), dh, PREC)
        dh_prev = decayed(dh, tl.trans(GL), GATE)                         # D dHn
        if HAS_Q:
            q = load_operand(q_seq, rows, cols_k, T, dk, HEADS * dk)
            do = load_operand(do_seq, rows, cols_v, T, dv, HEADS * dv)
            dvp += load_tile(dvp_seq, rows, cols_v, T, dv, dvp_heads * dv)   # A^T dO
            if GATE == 1:
                dh_prev += mm(tl.trans(q), do * tl.exp(Gq), PREC) * scale
            else:
                dh_prev += mm(tl.trans(decayed(q, Gq, GATE)), do, PREC) * scale
        if DELTA:
            w = load_operand(w_seq, rows, cols_k, T, dk, dk)
            dh_prev -= mm(tl.trans(w), dvp, PREC)                        # W^T dV'
        store_tile(dhn_ptr + (n * NC + i) * dk * dv, dh, cols_k, cols_v, dk, dv, dv)
        store_tile(dvp_seq, dvp, rows, cols_v, T, dv, dvp_heads * dv)
        dh = dh_prev
    store_tile(dh0_ptr + n * dk * dv, dh, cols_k, cols_v, dk, dv, dv)


@triton.jit
def _chunk_grads(k_seq, q_seq, do_seq, g_seq, vals_seq, dvp_seq, h_state, dhn_state, dw_seq, dk_seq, dq_seq, dg_seq,
                 tr_seq, rows, cols_k, T, scale, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr,
                 C: tl.constexpr, BV: tl.constexpr, HAS_Q: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr,
                 BEFORE: tl.constexpr, PREC: tl.constexpr):
    """``_grads_kernel``'s work for the key channels ``cols_k`` (all of them, or a block of them:
    every gradient but dA is per channel; a scalar gate's dg, a sum over channels, is returned).
    ``vals_seq``: V' (delta family, [N, NC*C, dv]) or v in the inputs' layout."""
    r = tl.arange(0, C)
    dg_rows = tl.zeros([C], dtype=tl.float32)   # a scalar gate's dg from these channels (returned)
    g, G, Gq, GL = block_gates(g_seq, rows, cols_k, T, dk, HEADS, C, GATE, BEFORE)
    vals_stride = dv if DELTA else HEADS * dv

    # Sums over dv, one block of BV value columns at a time.
    dKt = tl.zeros([C, cols_k.shape[0]], dtype=tl.float32)
    dD = tl.zeros([cols_k.shape[0]], dtype=tl.float32)
    dQt = tl.zeros([C, cols_k.shape[0]], dtype=tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dW = tl.zeros([C, cols_k.shape[0]], dtype=tl.float32)
    for v0 in range(0, dv, BV):
        cols_v = v0 + tl.arange(0, BV)
        h = load_operand(h_state, cols_k, cols_v, dk, dv, dv)
        dhn = load_operand(dhn_state, cols_k, cols_v, dk, dv, dv)
        vp = load_operand(vals_seq, rows, cols_v, T, dv, vals_stride)
        dKt += mm(vp, tl.trans(dhn), PREC)
        if GATE > 0:   # only the gates' gradient needs it
            dD += tl.sum(dhn.to(tl.float32) * h.to(tl.float32), 1)
        if HAS_Q:
            do = load_operand(do_seq, rows, cols_v, T, dv, HEADS * dv)
            dQt += mm(do, tl.trans(h), PREC)
            dA += mm(do, tl.trans(vp), PREC)
        if DELTA:
            dW -= mm(load_operand(dvp_seq, rows, cols_v, T, dv, dv), tl.trans(h), PREC)
    if DELTA:      # stored now: not held through the rest
        store_tile(dw_seq, dW, rows, cols_k, T, dk, dk)
    dQt *= scale   # the readout is S^T (scale q): dO enters scaled
    dA *= scale

    # Kt = K e^{G_L - G} and D = e^{G_L}.
    k = load_operand(k_seq, rows, cols_k, T, dk, HEADS * dk)   # loaded here: not held through the loop
    dK = decayed(dKt, GL - G, GATE)
    if GATE > 0:   # G_L's gradient through Kt (summed over the chunk's rows) and D
        dGL = tl.sum(_per_gate(dK * k, GATE), 0, keep_dims=True) + _per_gate(dD[None, :], GATE) * tl.exp(GL)

    if HAS_Q:
        q = load_operand(q_seq, rows, cols_k, T, dk, HEADS * dk)
        dQ = decayed(dQt, Gq, GATE)                                       # Qt = Q e^{Gq}
        mask = readout_mask(C, BEFORE)
        if GATE == 2:  # A_rs = sum_c q_rc k_sc e^{Gq_rc - G_sc}
            E3 = channel_decay(Gq, G, mask)
            dQ += tl.sum(dA[:, :, None] * k[None, :, :] * E3, 1)
            dK += tl.sum(dA[:, :, None] * q[:, None, :] * E3, 0)
        else:          # A = (Q K^T) * e^{Gq_r - G_s}
            dAg = dA * pair_decay(Gq, G, mask, GATE)
            dQ += mm(dAg, k, PREC)                                        # row r: sum_s dAg_rs k_s
            dK += mm(transposed(dAg, tr_seq, C), q, PREC)                # row s: sum_r dAg_rs q_r
        store_tile(dq_seq, dQ, rows, cols_k, T, dk, HEADS * dk)

    store_tile(dk_seq, dK, rows, cols_k, T, dk, HEADS * dk)

    if GATE > 0:
        # The log-decays' gradient, read off the finished dQ and dK: G enters as e^{-G} with every
        # key (in Kt and, s-side, in A) and Gq as e^{Gq} with every query (in Qt and, r-side, in A),
        # so dL/dGq = q . dQ and dL/dG = -k . dK per row (and channel), with dA * A summed over s
        # and over r not formed again: for a scalar gate one reduction over the channels here, one for
        # G_L's above.  Then G_L is G's last row, G = cumsum(g), and "before" has Gq = G - g.
        if HAS_Q:
            dG = _per_gate(q * dQ - k * dK, GATE)
        else:
            dG = -_per_gate(k * dK, GATE)
        dG += tl.where(r[:, None] == C - 1, dGL, 0.0)
        if GATE == 2:
            dg = reverse_cumsum(dG, 0)
            if HAS_Q:
                if BEFORE:
                    dg -= q * dQ
            store_tile(dg_seq, dg, rows, cols_k, T, dk, HEADS * dk)
        else:  # summed to a vector before the scan (see ``chunk_gates``)
            dg_rows = reverse_cumsum(tl.sum(dG, 1), 0)
            if HAS_Q:
                if BEFORE:
                    dg_rows -= tl.sum(q * dQ, 1)
    return dg_rows


@triton.jit(do_not_specialize=["N"])
def _grads_kernel(
    k_ptr, v_ptr, q_ptr, g_ptr, h_ptr, vp_ptr, dvp_ptr, do_ptr, dhn_ptr,   # inputs
    dk_ptr, dq_ptr, dg_ptr, dw_ptr, tr_ptr,                                # outputs, scratch
    T, N, NC, scale, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKG: tl.constexpr,
    HAS_Q: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of one chunk of one sequence through the state and the readout: dq, and dk and
    dg without the delta family's WY part (``_wy_grads_kernel`` adds it); for the delta family
    also dW = -dV' H^T into the scratch ``dw_ptr`` ([N,NC*C,dk]).  Without beta, dv = dV' was
    written by the states kernel.  BKG key channels at a time (``_grads_key_block``), dA formed
    again for each."""
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rows = i * C + tl.arange(0, C)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    q_seq = seq_start(q_ptr, n, T, HEADS, dk)
    do_seq = seq_start(do_ptr, n, T, HEADS, dv)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    if DELTA:
        vals_seq = vp_ptr + n * NC * C * dv
    else:
        vals_seq = seq_start(v_ptr, n, T, HEADS, dv)
    dvp_seq = dvp_ptr + n * NC * C * dv
    h = h_ptr + (n * NC + i) * dk * dv
    dhn = dhn_ptr + (n * NC + i) * dk * dv
    dw_seq = dw_ptr + n * NC * C * dk
    dk_seq = seq_start(dk_ptr, n, T, HEADS, dk)
    dq_seq = seq_start(dq_ptr, n, T, HEADS, dk)
    dg_seq = seq_start(dg_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    dg = tl.zeros([C], dtype=tl.float32)
    for c0 in tl.static_range(0, BK, BKG):
        dg += _chunk_grads(k_seq, q_seq, do_seq, g_seq, vals_seq, dvp_seq, h, dhn, dw_seq, dk_seq, dq_seq, dg_seq,
                           tr_ptr + (n * NC + i) * C * C, rows, c0 + tl.arange(0, BKG), T, scale, HEADS, dk, dv, C,
                           BV, HAS_Q, DELTA, GATE, BEFORE, PREC)
    if GATE == 1:
        store_steps(dg_seq, dg, rows, T, HEADS)


@triton.jit(do_not_specialize=["N"])
def _wy_grads_kernel(
    k_ptr, v_ptr, b_ptr, coef_ptr, g_ptr, tm_ptr, dvp_ptr, dw_ptr,     # inputs
    dk_ptr, dv_ptr, db_ptr, dcoef_ptr, dg_ptr, tr_ptr,         # outputs (dk, dg: added to), scratch
    T, N, NC, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr, BKD: tl.constexpr,
    GATE: tl.constexpr, HAS_COEF: tl.constexpr, PREC: tl.constexpr,
):
    """The delta family's gradients of one chunk through its WY form (Tm as the forward stored it),
    from dV' and dW: dv = Tm^T dV' and dbeta, and their parts of dk and dg, added to what
    ``_grads_kernel`` stored.  W = Tm Kb (Kb = diag(b e^G) K), U = Tm V, Tm = (I + Akk)^{-1}:
    dKb = Tm^T dW, dTm = dV' V^T + dW Kb^T, dAkk = -tril_{-1}(Tm^T dTm Tm^T).  HAS_COEF: the forward
    scaled v by the write coefficient c in its prepare kernel (V = diag(c) v), so dv = c Tm^T dV'
    and dc = rowsum(Tm^T dV' * v), into ``dcoef_ptr``."""
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, C)
    rows = i * C + r
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    v_seq = seq_start(v_ptr, n, T, HEADS, dv)
    dv_seq = seq_start(dv_ptr, n, T, HEADS, dv)
    dvp_seq = dvp_ptr + n * NC * C * dv
    b = load_steps(seq_start(b_ptr, n, T, HEADS, 1), rows, T, HEADS)
    Tm = load_operand(tm_ptr + n * NC * C * C, rows, r, NC * C, C, C)

    dTm = tl.zeros([C, C], dtype=tl.float32)
    if HAS_COEF:
        c = load_steps(seq_start(coef_ptr, n, T, HEADS, 1), rows, T, HEADS)[:, None]
        dc = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, dv, BV):                                       # U = Tm V
        cols_v = v0 + tl.arange(0, BV)
        dvp = load_operand(dvp_seq, rows, cols_v, T, dv, dv)
        v = load_operand(v_seq, rows, cols_v, T, dv, HEADS * dv)
        dV = mm(tl.trans(Tm), dvp, PREC)
        if HAS_COEF:
            dTm += mm(dvp, tl.trans(v * c), PREC)
            dc += tl.sum(dV * v, 1)
            dV = dV * c
        else:
            dTm += mm(dvp, tl.trans(v), PREC)
        store_tile(dv_seq, dV, rows, cols_v, T, dv, HEADS * dv)
    if HAS_COEF:
        store_steps(seq_start(dcoef_ptr, n, T, HEADS, 1), dc, rows, T, HEADS)

    # The key side, a block of channels at a time: BKC with a per-channel gate, whose Akk sums
    # [C, C, BKC] channel products; BKD with fp32 ("ieee") dots, FMA products that hold their
    # operands in registers (static sm_90, d = 128, chunk 32: spills 520 B / 1.8 KB -> 240 / 72 B,
    # DeltaNet / Gated DeltaNet); else all of dk at once (with bf16 dots blocks only added
    # instructions: Gated DeltaNet, d = 128, 2.2 K -> 2.5 K, d = 256 1.9 K -> 4.9 K).
    if GATE == 2:
        BKW: tl.constexpr = BKC
    elif PREC == "ieee":
        BKW: tl.constexpr = BKD
    else:
        BKW: tl.constexpr = BK
    _wy_key_grads(k_seq, g_seq, dw_ptr + n * NC * C * dk, seq_start(dk_ptr, n, T, HEADS, dk),
                  seq_start(dg_ptr, n, T, HEADS, dk if GATE == 2 else 1), seq_start(db_ptr, n, T, HEADS, 1), Tm, dTm,
                  tr_ptr + (n * NC + i) * C * C, b, rows, T, HEADS, dk, C, BK, BKW, GATE, PREC)


@triton.jit
def _wy_key_grads(k_seq, g_seq, dw_seq, dk_seq, dg_seq, db_seq, Tm, dTm, tr_seq, b, rows, T, HEADS: tl.constexpr,
                  dk: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BKW: tl.constexpr, GATE: tl.constexpr,
                  PREC: tl.constexpr):
    """``_wy_grads_kernel``'s work after its dv loop, BKW key channels at a time: dKb = Tm^T dW and
    the gradients through Akk = diag(b) (K K^T * E) and Kb = diag(b e^G) K into dk, db and dg, with
    E_rs = e^{G_r - G_s} (s < r), or with a per-channel gate (the gate-first order)
    Akk_rs = b_r sum_c k_rc k_sc E_rsc, E_rsc = e^{G_rc - G_sc}, and e^G per channel in Kb.  Only
    dTm (its dW Kb^T part) and dAkk need all channels: a first pass sums dTm, a second forms every
    other gradient block by block (over all channels at once, [C, C, dk] per-channel products
    spilled 1.3-3.3 KB per thread on sm_90 at d = 128-256, and fp32 dots at d = 128 up to 1.8 KB).
    db's sum_s dAkk_rs kk_rs (kk = K K^T * E, or its per-channel sum) is read off the products dK
    already forms, sum_s dX_rs (k_r . k_s) = k_r . (dX K)_r, not from kk formed again."""
    strict = tl.arange(0, C)[:, None] > tl.arange(0, C)[None, :]
    if GATE != 2:  # one gate per row: G [C, 1] is the same for every block of channels
        _, G, _, _ = block_gates(g_seq, rows, tl.arange(0, BKW), T, dk, HEADS, C, GATE, False)
    for c0 in tl.static_range(0, BK, BKW):                          # dTm += dW Kb^T
        cols = c0 + tl.arange(0, BKW)
        if GATE == 2:
            _, G, _, _ = block_gates(g_seq, rows, cols, T, dk, HEADS, C, GATE, False)
        k = load_operand(k_seq, rows, cols, T, dk, HEADS * dk)
        dTm += mm(load_operand(dw_seq, rows, cols, T, dk, dk), tl.trans(k * decayed(b[:, None], G, GATE)), PREC)
    dAkk = tl.where(strict, -mm(tl.trans(Tm), mm(dTm, tl.trans(Tm), PREC), PREC), 0.0)
    if GATE == 2:
        dAb = dAkk * b[:, None]
    else:          # the decayed score gradients are the same for every block too
        dAE = dAkk * pair_decay(G, G, strict, GATE)                   # dAkk_rs e^{G_r - G_s}
    db = tl.zeros([C], dtype=tl.float32)
    dg_rows = tl.zeros([C], dtype=tl.float32)   # a scalar gate's dG, summed over the channels
    for c0 in tl.static_range(0, BK, BKW):
        cols = c0 + tl.arange(0, BKW)
        if GATE == 2:
            _, G, _, _ = block_gates(g_seq, rows, cols, T, dk, HEADS, C, GATE, False)
        k = load_operand(k_seq, rows, cols, T, dk, HEADS * dk)
        eb = decayed(b[:, None], G, GATE)                             # b e^G: [C,1], or [C,BKW] per channel
        dKb = mm(tl.trans(Tm), load_operand(dw_seq, rows, cols, T, dk, dk), PREC)
        if GATE == 2:
            E3 = channel_decay(G, G, strict)
            dKr = tl.sum(dAkk[:, :, None] * k[None, :, :] * E3, 1)     # sum_s dAkk_rs k_sc E_rsc
            dKs = tl.sum(dAb[:, :, None] * k[:, None, :] * E3, 0)      # sum_r b_r dAkk_rs k_rc E_rsc
        else:
            dKr = mm(dAE, k, PREC)                                    # row r: sum_s dAE_rs k_s
            dKs = mm(transposed(dAE * b[:, None], tr_seq, C), k, PREC)  # row s: sum_r dAE_rs b_r k_r
        kdKr = k * dKr
        dKbk = dKb * decayed(k, G, GATE)                              # dKb k e^G
        db += tl.sum(kdKr + dKbk, 1)
        dK = dKb * eb + b[:, None] * dKr + dKs
        if GATE == 2:
            dG = b[:, None] * (dKbk + kdKr) - k * dKs
            store_tile(dg_seq, load_tile(dg_seq, rows, cols, T, dk, HEADS * dk) + reverse_cumsum(dG, 0), rows, cols,
                       T, dk, HEADS * dk)   # G = cumsum(g) within the chunk
        elif GATE == 1:
            dg_rows += tl.sum(b[:, None] * (dKbk + kdKr) - k * dKs, 1)
        store_tile(dk_seq, load_tile(dk_seq, rows, cols, T, dk, HEADS * dk) + dK, rows, cols, T, dk, HEADS * dk)
    store_steps(db_seq, db, rows, T, HEADS)
    if GATE == 1:  # dG_r = sum_s M_rs - sum_s M_sr (M = dAkk * Akk) + the Kb part; G = cumsum(g)
        store_steps(dg_seq, load_steps(dg_seq, rows, T, HEADS) + reverse_cumsum(dg_rows, 0), rows, T, HEADS)


# The tuning spaces (``tuning``).  The kernels that spill are capped at 255 registers on CUDA:
# left to itself at 8 warps, ptxas gave the (then single) grads kernel 32 registers and 6 KB of
# spills per thread (DeltaNet, d = 128, sm_90; 255 and 1.9 KB with the cap), and states_bwd 32
# registers and 1.6-2.8 KB of spills (Gated DeltaNet d = 256, KDA d = 128).  states_bwd adds to the
# dV' buffer in place, the WY kernel to dk and dg.
READOUT_DV = ChunkKernel(_readout_dv_kernel, Space(value_blocks=(32, 64, 128), stages=(2,)))
STATES_BWD = ChunkKernel(_states_bwd_kernel, Space(value_blocks=(32, 64), stages=(1, 2), maxnreg=255),
                         restore=("dvp_ptr",))
GRADS = ChunkKernel(_grads_kernel, Space(value_blocks=(32, 64), stages=(2,), maxnreg=255))
WY_GRADS = ChunkKernel(_wy_grads_kernel, Space(value_blocks=(32, 64), stages=(2,), maxnreg=255),
                       restore=("dk_ptr", "dg_ptr"))
KERNELS = (READOUT_DV, STATES_BWD, GRADS, WY_GRADS)


# ----------------------------------------------------------------------------- launcher


def _grads_key_block(blocks: Blocks, gate: int, delta: bool, prec: str) -> int:
    """Key channels per step of the grads kernel: BKC with a per-channel gate (the [C, C, channels]
    products over all of dk at once spilled KBs on sm_90); half of BK above 128 without the delta
    rule under bf16 dots (static sm_90, d = 256: spills 904 / 280 B -> 72 B / 0 for a scalar decay /
    none, instructions 3-5% fewer); else all of dk (blocks only added instructions there: with the
    delta rule, DeltaNet 0.7 K -> 2.4 K and Gated DeltaNet 1.7 K -> 2.2 K a program, and under
    fp32 dots 13-26%)."""
    if gate == 2:
        return blocks.BKC
    return blocks.BK // 2 if blocks.BK > 128 and not delta and prec.startswith("bf16") else blocks.BK


def chunk_backward(
    k: Tensor,
    v: Tensor,
    q: Optional[Tensor],
    beta: Optional[Tensor],
    g: Optional[Tensor],
    h0: Optional[Tensor],
    H: Tensor,
    Vp: Tensor,
    W: Tensor,
    Tm: Tensor,
    do: Optional[Tensor],
    dh_final: Optional[Tensor],
    chunk: int,
    before: bool,
    coef: Optional[Tensor] = None,
    scale: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients (dk, dv, dq, dbeta, dg, dh0, dcoef) of the chunkwise scan, given the forward's
    intermediates H [N,nc,dk,dv] (state entering each chunk), Vp [N,nc*C,dv],
    W [N,nc*C,dk] and Tm [N,nc*C,C] (the chunks' WY inverses; these three for the delta family
    only, ignored otherwise), the output gradient ``do``
    [N,T,dv] (None: zero, or no q) and ``dh_final`` [N,dk,dv] (None: zero).  The per-step
    inputs and ``do`` may also be in flash-linear-attention's [B,T,H,.] layout
    (``common.sequences``), read and written in place.  ``coef``: the write coefficient the
    forward multiplied into v, ``scale``: the queries' factor it applied to o, ``compute_dtype``:
    the dtype the loop computes in (``forward.chunk_forward``).

    (dk, dv, dq, dbeta, dg, dh0, dcoef), shaped like the inputs, None where the input was None
    (dh0: where h0 was); dk, dv, dq in the dtypes of k, v, q (a bf16 input's gradient is written
    once in bf16, as autograd would cast it anyway: half the bytes; partial sums that one kernel
    stores and another adds to, dk with beta and dv without, are rounded there too, as fla's dk
    is), or fp32 where the kernels compute in another dtype (``common.gradient_dtype``), the others
    fp32.
    """
    n, t, heads, prefix = sequences(k)
    key_dim, value_dim = k.shape[-1], v.shape[-1]
    delta = beta is not None
    as_dtype = kernel_dtype(k, q, compute_dtype)
    if coef is not None and not delta:
        raise ValueError("coef: only the delta family (beta given) scales v in the kernels")
    gate = 0 if g is None else (1 if g.dim() == len(prefix) else 2)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if max(key_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got dk={key_dim}, dv={value_dim}")
    prec = dot_precision(k, q, backward=True, compute_dtype=compute_dtype)
    # the chunk is the forward's (its buffers' layout): checked against both precisions, as ops chose it
    fwd = dot_precision(k, q, compute_dtype=compute_dtype)
    blocks = kernel_blocks(k.device, key_dim, value_dim, chunk, (fwd, prec))
    f32 = dict(dtype=torch.float32, device=k.device)
    if dh_final is None:
        dh_final = torch.zeros(n, key_dim, value_dim, **f32)
    if q is not None and do is None:
        do = torch.zeros(*prefix, value_dim, **f32)
    if t == 0 or n == 0:  # nothing to scan: the state passes through
        zero = lambda x: None if x is None else torch.zeros(x.shape, **f32)  # noqa: E731
        dh0 = dh_final.float().clone() if h0 is not None else None
        own = lambda x: (None if x is None  # noqa: E731
                         else torch.zeros(x.shape, dtype=gradient_dtype(x, as_dtype), device=x.device))
        return own(k), own(v), own(q), zero(beta), zero(g), dh0, zero(coef)
    like = lambda x: None if x is None else torch.empty(x.shape, **f32)  # noqa: E731
    own = lambda x: (None if x is None  # noqa: E731
                     else torch.empty(x.shape, dtype=gradient_dtype(x, as_dtype), device=x.device))
    dk, dv, dq, dbeta, dg, dcoef = own(k), own(v), own(q), like(beta), like(g), like(coef)
    dh0 = torch.empty(n, key_dim, value_dim, **f32)
    nc = cdiv(t, chunk)

    c = lambda x: x.contiguous()  # noqa: E731
    k, v, H, dh_final = c(k), c(v), c(H), c(dh_final.float())  # H, W: fp32 or bf16 (``operand_dtype``)
    dummy = k
    q_ = c(q) if q is not None else dummy
    do_ = c(do) if q is not None else dummy
    beta_ = c(beta) if delta else dummy
    g_ = c(g.float()) if g is not None else dummy
    Vp_ = c(Vp) if delta else dummy
    W_ = c(W) if delta else dummy
    operands = dict(dtype=operand_dtype(prec), device=k.device)   # bf16 with bf16 dots: only dot operands
    dhn = torch.empty(n, nc, key_dim, value_dim, **operands)
    # dV': a scratch buffer for the delta family (read by the later kernels only as a dot operand),
    # else dv itself (in the inputs' layout)
    if delta:
        dvp, dvp_rows, dvp_heads = torch.empty(n, nc * chunk, value_dim, **operands), nc * chunk, 1
    else:
        dvp, dvp_rows, dvp_heads = dv, t, heads
    flags = dict(C=chunk, BK=blocks.BK, GATE=gate, BEFORE=bool(before), PREC=prec)
    dev = k.device
    if q is not None:
        READOUT_DV.launch(lambda m: (nc, n, cdiv(value_dim, m["BV"])),
                          (k, q_, g_, do_, dvp, t, n, dvp_rows, float(scale), heads, key_dim, value_dim, dvp_heads),
                          dict(flags, BKC=blocks.BKC, BKD=blocks.BKD), blocks, dev)
    flags.update(HAS_Q=q is not None, DELTA=delta)
    STATES_BWD.launch(lambda m: (n, cdiv(value_dim, m["BV"])),
                      (k, q_, g_, W_, do_, dh_final, dhn, dvp, dh0, t, n, nc, dvp_rows, float(scale), heads, key_dim,
                       value_dim, dvp_heads),
                      flags, blocks, dev)
    unused = torch.empty(1, **f32)   # for outputs a kernel does not write here (never the caller's
    # tensors: the WY kernel's tuning restores dk and dg with copy_, which bumps autograd versions)
    dg_ = dg if g is not None else unused
    dw = torch.empty(n, nc * chunk, key_dim, **operands) if delta else unused   # dL/dW, a dot operand of the WY kernel
    # [C, C] per chunk for ``common.transposed`` (the readout's and WY form's score gradients; not with
    # a per-channel gate, whose kernels form no such product)
    tr = torch.empty(n * nc * chunk * chunk, **operands) if gate != 2 and (q is not None or delta) else unused
    GRADS.launch(lambda m: (nc, n),
                 (k, v, q_, g_, H, Vp_, dvp, do_, dhn, dk, dq if q is not None else unused, dg_, dw, tr,
                  t, n, nc, float(scale), heads, key_dim, value_dim),
                 dict(flags, BKG=_grads_key_block(blocks, gate, delta, prec)), blocks, dev)
    if delta:
        WY_GRADS.launch(lambda m: (nc, n),
                        (k, v, beta_, beta_ if coef is None else c(coef), g_, c(Tm), dvp, dw, dk, dv, dbeta,
                         unused if coef is None else dcoef, dg_, tr, t, n, nc, heads, key_dim, value_dim),
                        dict(C=chunk, BK=blocks.BK, BKC=blocks.BKC, BKD=blocks.BKD, GATE=gate,
                             HAS_COEF=coef is not None, PREC=prec),
                        blocks, dev)
    return dk, dv, dq, dbeta, dg, (dh0 if h0 is not None else None), dcoef
