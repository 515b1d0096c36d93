"""Backward Triton kernels of the chunkwise fast-weight scans, and their launcher.

Forward, per chunk i (see ``forward``): G = cumsum(g) in the chunk, Gq = G (readout
"after") or G - g ("before"), G_L = G at the last row, D = exp(G_L), Kt = K e^{G_L-G},
Qt = Q e^{Gq}, A the masked, decayed scores of Q against K, and for the delta family
Akk = tril_{-1}(b_r k_r.k_s e^{G_r-G_s}), Tm = (I + Akk)^{-1}, W = Tm diag(b e^G) K,
U = Tm V, V' = U - W H_i (else V' = V)::

    H_{i+1} = D H_i + Kt^T V'        O_i = Qt H_i + A V'

Backward, in two kernels:

``_states_bwd_kernel`` (grid (N, dv blocks), sequential from the last chunk to the first)
carries dHn = dL/dH_{i+1}, starting at dH_final::

    dV'_i = A^T dO_i + Kt dHn
    dH_i  = D dHn + Qt^T dO_i - [delta] W^T dV'_i        (the next dHn; dh0 = dH_0)

storing dHn for every chunk and dV' (for the delta family into a scratch buffer, else
straight into dv, since then V' = V).

``_grads_kernel`` (grid (chunks, N), all chunks in parallel) gets the rest from
H_i, dHn_i, V', dV': sums over dv (in blocks) of dQt = dO H^T, dA = dO V'^T,
dKt = V' dHn^T, dD = rowsum(dHn * H), dW = -dV' H^T and dTm's U-part dV' V^T;
then, for the delta family, back through the WY form (Tm recomputed, not stored):
dV = Tm^T dV', dKb = Tm^T dW, dTm = dV' V^T + dW Kb^T, dAkk = -tril_{-1}(Tm^T dTm Tm^T),
and finally through Kt, Qt, A, Akk, Kb into dk, dq, dbeta and the log-decays G, whose
gradient becomes dg by a reverse cumsum within the chunk (G = cumsum(g)); the
readout "before" adds -dGq to dg (Gq = G - g).
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

from .common import reverse_cumsum, unit_lower_inverse

__all__ = ["chunk_backward"]

MAX_HEAD_DIM = 256
MAX_VALUE_BLOCK = 64  # dv columns per program (states) / per loop step (grads)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _mm(a, b):
    """fp32-exact matmul (the compiler checks kernels against eager at 1e-4)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, row_stride):
    """[len(rows), len(cols)] fp32 tile of a row-major matrix; zeros outside n_rows x n_cols."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, x, rows, cols, n_rows, n_cols, row_stride):
    """Store the part of ``x`` inside n_rows x n_cols (padding rows/columns are never written)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], x, mask=mask)


@triton.jit
def _chunk_gates(g_seq, rows, T, dk, C: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
                 BEFORE: tl.constexpr):
    """Log-decays of one chunk: (g, G = cumsum(g), Gq (readout rows), G_L (last row)).

    Per-channel gate: [C,BK], [C,BK], [C,BK], [1,BK]; scalar gate (or none: zeros):
    [C,1], [C,1], [C,1], [1,1], so both broadcast against [C,BK] tiles. Rows t >= T have
    g = 0, hence G_L equals G at the chunk's last real row.
    """
    if GATE == 2:
        g = _load_tile(g_seq, rows, tl.arange(0, BK), T, dk, dk)
    elif GATE == 1:
        g = tl.load(g_seq + rows, mask=rows < T, other=0.0).to(tl.float32)[:, None]
    else:
        g = tl.zeros([C, 1], dtype=tl.float32)
    G = tl.cumsum(g, 0)
    if BEFORE:
        Gq = G - g
    else:
        Gq = G
    last = tl.arange(0, C)[:, None] == C - 1
    GL = tl.sum(tl.where(last, G, 0.0), 0, keep_dims=True)
    return g, G, Gq, GL


@triton.jit
def _readout_mask(C: tl.constexpr, BEFORE: tl.constexpr):
    """Which (r, s) pairs of a chunk the readout sees: s <= r ("after") or s < r ("before")."""
    r = tl.arange(0, C)
    if BEFORE:
        return r[:, None] > r[None, :]
    else:
        return r[:, None] >= r[None, :]


@triton.jit
def _pair_decay(Gr, Gs, mask):
    """[C,C] exp(Gr_r - Gs_s) where ``mask``, else 0 (scalar gate: Gr, Gs [C,1]). Masked before exp."""
    return tl.exp(tl.where(mask, Gr - tl.trans(Gs), float("-inf")))


@triton.jit
def _channel_decay(Gq, G, mask):
    """[C,C,BK] exp(Gq_rc - G_sc) where ``mask[r, s]``, else 0 (per-channel gate)."""
    return tl.exp(tl.where(mask[:, :, None], Gq[:, None, :] - G[None, :, :], float("-inf")))


@triton.jit
def _scores(q, k, G, Gq, C: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr):
    """Intra-chunk readout scores A [C,C] (masked, decayed)."""
    mask = _readout_mask(C, BEFORE)
    if GATE == 2:
        return tl.sum(q[:, None, :] * k[None, :, :] * _channel_decay(Gq, G, mask), 2)
    else:
        return _mm(q, tl.trans(k)) * _pair_decay(Gq, G, mask)


@triton.jit
def _per_gate(x, GATE: tl.constexpr):
    """A per-channel gate gradient [C,BK] as it reaches the gate: itself, or summed over
    channels ([C,1]) for a scalar gate."""
    if GATE == 2:
        return x
    else:
        return tl.sum(x, 1, keep_dims=True)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _states_bwd_kernel(
    k_ptr, q_ptr, g_ptr, w_ptr, do_ptr, dhf_ptr,      # inputs
    dhn_ptr, dvp_ptr, dh0_ptr,                        # outputs
    T, NC, dk, dv, dvp_rows,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_Q: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr,
):
    """Reverse inter-chunk recurrence for one sequence and one block of dv columns.

    Carries dHn = dL/dH_{i+1} from dH_final back to dh0 = dL/dH_0 and stores, per chunk,
    dHn_i [N,NC,dk,dv] and dV'_i (rows of ``dvp_ptr``: [N,dvp_rows,dv], dvp_rows = NC*C
    for the delta scratch buffer or T when it is dv itself).
    """
    n = tl.program_id(0).to(tl.int64)
    cols_v = tl.program_id(1) * BV + tl.arange(0, BV)
    cols_k = tl.arange(0, BK)
    r = tl.arange(0, C)
    k_seq = k_ptr + n * T * dk
    q_seq = q_ptr + n * T * dk
    g_seq = g_ptr + n * T * (dk if GATE == 2 else 1)
    w_seq = w_ptr + n * NC * C * dk
    do_seq = do_ptr + n * T * dv
    dvp_seq = dvp_ptr + n * dvp_rows * dv
    dh = _load_tile(dhf_ptr + n * dk * dv, cols_k, cols_v, dk, dv, dv)   # dL/dH_NC
    for j in range(0, NC):
        i = NC - 1 - j
        rows = i * C + r
        k = _load_tile(k_seq, rows, cols_k, T, dk, dk)
        g, G, Gq, GL = _chunk_gates(g_seq, rows, T, dk, C, BK, GATE, BEFORE)
        dvp = _mm(k * tl.exp(GL - G), dh)                                 # Kt dHn
        dh_prev = tl.exp(tl.trans(GL)) * dh                               # D dHn
        if HAS_Q:
            q = _load_tile(q_seq, rows, cols_k, T, dk, dk)
            do = _load_tile(do_seq, rows, cols_v, T, dv, dv)
            dvp += _mm(tl.trans(_scores(q, k, G, Gq, C, GATE, BEFORE)), do)
            dh_prev += _mm(tl.trans(q * tl.exp(Gq)), do)                  # Qt^T dO
        if DELTA:
            w = _load_tile(w_seq, rows, cols_k, T, dk, dk)
            dh_prev -= _mm(tl.trans(w), dvp)                              # W^T dV'
        _store_tile(dhn_ptr + (n * NC + i) * dk * dv, dh, cols_k, cols_v, dk, dv, dv)
        _store_tile(dvp_seq, dvp, rows, cols_v, T, dv, dv)
        dh = dh_prev
    _store_tile(dh0_ptr + n * dk * dv, dh, cols_k, cols_v, dk, dv, dv)


@triton.jit
def _grads_kernel(
    k_ptr, v_ptr, q_ptr, b_ptr, g_ptr, h_ptr, vp_ptr, dvp_ptr, do_ptr, dhn_ptr,   # inputs
    dk_ptr, dv_ptr, dq_ptr, db_ptr, dg_ptr,                                       # outputs
    T, NC, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_Q: tl.constexpr, DELTA: tl.constexpr, GATE: tl.constexpr, BEFORE: tl.constexpr,
):
    """Gradients of one chunk of one sequence w.r.t. k, q, beta, g (and v for the delta
    family; otherwise dv = dV' was written by the states kernel)."""
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, C)
    rows = i * C + r
    cols_k = tl.arange(0, BK)
    k_seq = k_ptr + n * T * dk
    q_seq = q_ptr + n * T * dk
    v_seq = v_ptr + n * T * dv
    do_seq = do_ptr + n * T * dv
    g_seq = g_ptr + n * T * (dk if GATE == 2 else 1)
    vp_seq = vp_ptr + n * NC * C * dv
    dvp_seq = dvp_ptr + n * NC * C * dv
    state = (n * NC + i) * dk * dv
    k = _load_tile(k_seq, rows, cols_k, T, dk, dk)
    g, G, Gq, GL = _chunk_gates(g_seq, rows, T, dk, C, BK, GATE, BEFORE)

    if DELTA:  # the WY form, needed inside the dv loop (dV = Tm^T dV')
        b = tl.load(b_ptr + n * T + rows, mask=rows < T, other=0.0).to(tl.float32)
        strict = r[:, None] > r[None, :]
        kk = _mm(k, tl.trans(k))
        E = _pair_decay(G, G, strict)
        Akk = b[:, None] * kk * E
        Tm = unit_lower_inverse(Akk, C)
        eb = b[:, None] * tl.exp(G)                                       # [C,1]
        kb = k * eb

    # Sums over dv, one block of BV value columns at a time.
    dKt = tl.zeros([C, BK], dtype=tl.float32)
    dD = tl.zeros([BK], dtype=tl.float32)
    dQt = tl.zeros([C, BK], dtype=tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dW = tl.zeros([C, BK], dtype=tl.float32)
    dTm = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, dv, BV):
        cols_v = v0 + tl.arange(0, BV)
        h = _load_tile(h_ptr + state, cols_k, cols_v, dk, dv, dv)
        dhn = _load_tile(dhn_ptr + state, cols_k, cols_v, dk, dv, dv)
        if DELTA:
            vp = _load_tile(vp_seq, rows, cols_v, T, dv, dv)
        else:
            vp = _load_tile(v_seq, rows, cols_v, T, dv, dv)
        dKt += _mm(vp, tl.trans(dhn))
        dD += tl.sum(dhn * h, 1)
        if HAS_Q:
            do = _load_tile(do_seq, rows, cols_v, T, dv, dv)
            dQt += _mm(do, tl.trans(h))
            dA += _mm(do, tl.trans(vp))
        if DELTA:
            dvp = _load_tile(dvp_seq, rows, cols_v, T, dv, dv)
            v = _load_tile(v_seq, rows, cols_v, T, dv, dv)
            dW -= _mm(dvp, tl.trans(h))
            dTm += _mm(dvp, tl.trans(v))                                  # U = Tm V
            _store_tile(dv_ptr + n * T * dv, _mm(tl.trans(Tm), dvp), rows, cols_v, T, dv, dv)

    # Kt = K e^{G_L - G} and D = e^{G_L}.
    eKt = tl.exp(GL - G)
    dK = dKt * eKt
    dG = -_per_gate(dKt * k * eKt, GATE)
    dGL = -tl.sum(dG, 0, keep_dims=True) + _per_gate(dD[None, :], GATE) * tl.exp(GL)

    if HAS_Q:
        q = _load_tile(q_seq, rows, cols_k, T, dk, dk)
        eQ = tl.exp(Gq)
        dQ = dQt * eQ                                                     # Qt = Q e^{Gq}
        dGq = _per_gate(dQt * q * eQ, GATE)
        mask = _readout_mask(C, BEFORE)
        if GATE == 2:  # A_rs = sum_c q_rc k_sc e^{Gq_rc - G_sc}
            E3 = _channel_decay(Gq, G, mask)
            dQA = tl.sum(dA[:, :, None] * k[None, :, :] * E3, 1)
            dKA = tl.sum(dA[:, :, None] * q[:, None, :] * E3, 0)
            dQ += dQA
            dK += dKA
            dGq += q * dQA
            dG -= k * dKA
        else:          # A = (Q K^T) * e^{Gq_r - G_s}
            dAg = dA * _pair_decay(Gq, G, mask)
            dQ += _mm(dAg, k)
            dK += _mm(tl.trans(dAg), q)
            if GATE == 1:
                dAA = dAg * _mm(q, tl.trans(k))
                dGq += tl.sum(dAA, 1, keep_dims=True)
                dG -= tl.trans(tl.sum(dAA, 0, keep_dims=True))
        dG += dGq
        _store_tile(dq_ptr + n * T * dk, dQ, rows, cols_k, T, dk, dk)

    if DELTA:  # back through W = Tm Kb, U = Tm V, Tm = (I + Akk)^{-1}
        dKb = _mm(tl.trans(Tm), dW)
        dTm += _mm(dW, tl.trans(kb))
        dAkk = -_mm(tl.trans(Tm), _mm(dTm, tl.trans(Tm)))
        dAE = tl.where(strict, dAkk, 0.0) * E                             # dAkk_rs e^{G_r - G_s}
        dK += b[:, None] * _mm(dAE, k) + _mm(tl.trans(dAE * b[:, None]), k) + dKb * eb
        db = tl.sum(dAE * kk, 1) + tl.sum(dKb * k * tl.exp(G), 1)
        tl.store(db_ptr + n * T + rows, db, mask=rows < T)
        if GATE == 1:
            M = dAE * b[:, None] * kk                                    # dAkk * Akk
            dG += tl.sum(M, 1, keep_dims=True) - tl.trans(tl.sum(M, 0, keep_dims=True))
            dG += tl.sum(dKb * kb, 1, keep_dims=True)

    _store_tile(dk_ptr + n * T * dk, dK, rows, cols_k, T, dk, dk)

    if GATE > 0:  # G_L is G's last row; G = cumsum(g); before: Gq = G - g
        dG += tl.where(r[:, None] == C - 1, dGL, 0.0)
        dg = reverse_cumsum(dG, 0)
        if HAS_Q:
            if BEFORE:
                dg -= dGq
        if GATE == 2:
            _store_tile(dg_ptr + n * T * dk, dg, rows, cols_k, T, dk, dk)
        else:
            tl.store(dg_ptr + n * T + rows, tl.sum(dg, 1), mask=rows < T)


# ----------------------------------------------------------------------------- launcher


def _block(d: int) -> int:
    """Register block for a head dim: the next power of two >= 16 (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(d))


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
    do: Optional[Tensor],
    dh_final: Optional[Tensor],
    chunk: int,
    before: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients (dk, dv, dq, dbeta, dg, dh0) of the chunkwise scan, given the forward's
    intermediates H [N,nc,dk,dv] (state entering each chunk), Vp [N,nc*C,dv] and
    W [N,nc*C,dk] (delta family only; ignored otherwise), the output gradient ``do``
    [N,T,dv] (None: zero, or no q) and ``dh_final`` [N,dk,dv] (None: zero).

    All fp32, shaped like the inputs; None where the input was None (dh0: where h0 was).
    """
    n, t, key_dim = k.shape
    value_dim = v.shape[-1]
    delta = beta is not None
    gate = 0 if g is None else (2 if g.dim() == 3 else 1)
    if gate == 2 and delta:
        raise NotImplementedError("a per-key-channel gate with a delta rule has no WY chunk form here")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if max(key_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got dk={key_dim}, dv={value_dim}")
    f32 = dict(dtype=torch.float32, device=k.device)
    if dh_final is None:
        dh_final = torch.zeros(n, key_dim, value_dim, **f32)
    if q is not None and do is None:
        do = torch.zeros(n, t, value_dim, **f32)
    if t == 0 or n == 0:  # nothing to scan: the state passes through
        zero = lambda x: None if x is None else torch.zeros(x.shape, **f32)  # noqa: E731
        dh0 = dh_final.float().clone() if h0 is not None else None
        return zero(k), zero(v), zero(q), zero(beta), zero(g), dh0
    like = lambda x: None if x is None else torch.empty(x.shape, **f32)  # noqa: E731
    dk, dv, dq, dbeta, dg = like(k), like(v), like(q), like(beta), like(g)
    dh0 = torch.empty(n, key_dim, value_dim, **f32)
    nc = triton.cdiv(t, chunk)

    c = lambda x: x.contiguous()  # noqa: E731
    k, v, H, dh_final = c(k), c(v), c(H.float()), c(dh_final.float())
    dummy = k
    q_ = c(q) if q is not None else dummy
    do_ = c(do) if q is not None else dummy
    beta_ = c(beta) if delta else dummy
    g_ = c(g.float()) if g is not None else dummy
    Vp_ = c(Vp.float()) if delta else dummy
    W_ = c(W.float()) if delta else dummy
    dhn = torch.empty(n, nc, key_dim, value_dim, **f32)
    dvp = torch.empty(n, nc * chunk, value_dim, **f32) if delta else dv
    BK, BV = _block(key_dim), min(_block(value_dim), MAX_VALUE_BLOCK)
    flags = dict(C=chunk, BK=BK, BV=BV, HAS_Q=q is not None, DELTA=delta, GATE=gate, BEFORE=bool(before))
    _states_bwd_kernel[(n, triton.cdiv(value_dim, BV))](
        k, q_, g_, W_, do_, dh_final, dhn, dvp, dh0,
        t, nc, key_dim, value_dim, dvp.shape[1], **flags)
    _grads_kernel[(nc, n)](
        k, v, q_, beta_, g_, H, Vp_, dvp, do_, dhn,
        dk, dv, dq if q is not None else dummy, dbeta if delta else dummy, dg if g is not None else dummy,
        t, nc, key_dim, value_dim, **flags)
    return dk, dv, dq, dbeta, dg, (dh0 if h0 is not None else None)
