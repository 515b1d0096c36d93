"""Forward Triton kernels of the chunkwise fast-weight scans, and their launcher.

The update rule (state S in R^{dk x dv}, fp32, per sequence n of N = batch*heads)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + k_t v_t^T     (delta family; without beta: a_t S_{t-1} + k_t v_t^T)
    o_t = S_t^T q_t  ("after")   or   S_{t-1}^T q_t  ("before"),   a_t = exp(g_t)  (scalar or per key channel)

Chunk form (C tokens per chunk, chunk i entered with state H_i, G = inclusive
cumsum of g inside the chunk, G_L its value at the last row, Gq = G or G - g)::

    delta:  Akk = tril(diag(b) K K^T * e^{G_r - G_s}, -1),  Tm = (I + Akk)^{-1}
            W = Tm diag(b e^G) K,  U = Tm V,  V' = U - W H_i          (otherwise V' = V)
    H_{i+1} = e^{G_L} H_i + (K e^{G_L - G})^T V'
    O_i     = (Q e^{Gq}) H_i + A V',  A_rs = sum_c q_rc k_sc e^{Gq_rc - G_sc}  (s <= r, or s < r "before")

Three kernels: ``_prepare_kernel`` (delta only, parallel over chunks: W and U),
``_states_kernel`` (sequential over chunks, parallel over sequences and value
blocks: stores H_i and overwrites U with V') and ``_output_kernel`` (parallel
over chunks: O).  Positions t >= T are masked to k = v = q = 0, b = 0, g = 0,
which makes them neutral steps; nothing is padded in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import unit_lower_inverse

__all__ = ["chunk_forward"]

CHUNKS = (16, 32, 64)
MAX_DIM = 256
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- in-kernel helpers


@triton.jit
def _load_tile(base, t0, rows_total, width, col0, C: tl.constexpr, B: tl.constexpr):
    """Rows t0 .. t0+C-1, columns col0 .. col0+B-1 of a row-major [rows_total, width] matrix, as fp32.

    Rows >= rows_total and columns >= width read as 0 (the masked tail of the sequence).
    """
    rows = t0 + tl.arange(0, C)
    cols = col0 + tl.arange(0, B)
    mask = (rows[:, None] < rows_total) & (cols[None, :] < width)
    x = tl.load(base + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_tile(base, x, t0, rows_total, width, col0, C: tl.constexpr, B: tl.constexpr):
    """Store a [C, B] tile at rows t0.., columns col0.. of a row-major [rows_total, width] matrix (masked)."""
    rows = t0 + tl.arange(0, C)
    cols = col0 + tl.arange(0, B)
    mask = (rows[:, None] < rows_total) & (cols[None, :] < width)
    tl.store(base + rows[:, None] * width + cols[None, :], x, mask=mask)


@triton.jit
def _load_steps(base, t0, T, C: tl.constexpr):
    """A per-step scalar (beta, scalar log-gate) for the C rows of a chunk, fp32 [C], 0 beyond T."""
    rows = t0 + tl.arange(0, C)
    return tl.load(base + rows, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def _last_row(x, C: tl.constexpr):
    """Row C-1 of a [C, B] tile -> [B] (G_L, the chunk's total log-decay per channel)."""
    rows = tl.arange(0, C)
    return tl.sum(tl.where(rows[:, None] == C - 1, x, 0.0), 0)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _prepare_kernel(
    k_ptr, v_ptr, beta_ptr, g_ptr, w_ptr, u_ptr,
    T, L, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
):
    """Delta family, one chunk per program (grid (nc, N)): the WY/UT factors W [C, dk] and U [C, dv].

    Akk_rs = b_r (k_r . k_s) e^{G_r - G_s} for s < r; Tm = (I + Akk)^{-1};
    W = Tm diag(b e^G) K and U = Tm V.  Written to rows i*C .. i*C+C-1 of the
    padded [N, L = nc*C, .] buffers (U into the V' buffer, which the states
    kernel then corrects in place).  GATE: 0 none, 1 scalar (per channel is unsupported).
    """
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t0 = i * C
    rows = tl.arange(0, C)
    K = _load_tile(k_ptr + n * T * dk, t0, T, dk, 0, C, BK)
    V = _load_tile(v_ptr + n * T * dv, t0, T, dv, 0, C, BV)
    b = _load_steps(beta_ptr + n * T, t0, T, C)
    kk = tl.dot(K, tl.trans(K), input_precision="ieee")
    lower = rows[:, None] > rows[None, :]
    if GATE == 1:
        G = tl.cumsum(_load_steps(g_ptr + n * T, t0, T, C), 0)
        decay = tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf")))
        akk = b[:, None] * kk * decay
        kb = K * (b * tl.exp(G))[:, None]
    else:
        akk = tl.where(lower, b[:, None] * kk, 0.0)
        kb = K * b[:, None]
    tm = unit_lower_inverse(akk, C)
    W = tl.dot(tm, kb, input_precision="ieee")
    U = tl.dot(tm, V, input_precision="ieee")
    _store_tile(w_ptr + n * L * dk, W, t0, L, dk, 0, C, BK)
    _store_tile(u_ptr + n * L * dv, U, t0, L, dv, 0, C, BV)


@triton.jit
def _states_kernel(
    k_ptr, src_ptr, g_ptr, w_ptr, vp_ptr, h0_ptr, H_ptr, hT_ptr,
    T, src_rows, nc, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_BETA: tl.constexpr,
):
    """The inter-chunk recurrence for one sequence and one block of value columns (grid (N, cdiv(dv, BV))).

    Sequential over chunks: stores H_i (the state entering chunk i), then
    H_{i+1} = e^{G_L} H_i + (K e^{G_L - G})^T V'.  The values come from
    ``src`` ([N, src_rows, dv]: v itself, or U from the prepare kernel for the
    delta family, where V' = U - W H_i is computed here and written over U in
    ``vp``; columns are independent, so each program owns its block).
    GATE: 0 none, 1 scalar [N, T], 2 per key channel [N, T, dk].
    """
    n = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BV
    rows = tl.arange(0, C)
    h = _load_tile(h0_ptr + n * dk * dv, 0, dk, dv, col0, BK, BV)
    for i in range(nc):
        t0 = i * C
        _store_tile(H_ptr + (n * nc + i) * dk * dv, h, 0, dk, dv, col0, BK, BV)
        K = _load_tile(k_ptr + n * T * dk, t0, T, dk, 0, C, BK)
        vals = _load_tile(src_ptr + n * src_rows * dv, t0, src_rows, dv, col0, C, BV)
        if HAS_BETA:
            W = _load_tile(w_ptr + n * src_rows * dk, t0, src_rows, dk, 0, C, BK)
            vals = vals - tl.dot(W, h, input_precision="ieee")
            _store_tile(vp_ptr + n * src_rows * dv, vals, t0, src_rows, dv, col0, C, BV)
        if GATE == 0:
            h = h + tl.dot(tl.trans(K), vals, input_precision="ieee")
        elif GATE == 1:
            G = tl.cumsum(_load_steps(g_ptr + n * T, t0, T, C), 0)
            G_L = tl.sum(tl.where(rows == C - 1, G, 0.0), 0)
            Kt = K * tl.exp(G_L - G)[:, None]
            h = tl.exp(G_L) * h + tl.dot(tl.trans(Kt), vals, input_precision="ieee")
        else:
            G = tl.cumsum(_load_tile(g_ptr + n * T * dk, t0, T, dk, 0, C, BK), 0)
            G_L = _last_row(G, C)
            Kt = K * tl.exp(G_L[None, :] - G)
            h = tl.exp(G_L)[:, None] * h + tl.dot(tl.trans(Kt), vals, input_precision="ieee")
    _store_tile(hT_ptr + n * dk * dv, h, 0, dk, dv, col0, BK, BV)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, vals_ptr, g_ptr, H_ptr, o_ptr,
    T, vals_rows, nc, dk, dv,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr,
    GATE: tl.constexpr, BEFORE: tl.constexpr,
):
    """Readout of one chunk for one block of value columns (grid (nc, N, cdiv(dv, BV))).

    O = (Q e^{Gq}) H_i + A V' with the intra-chunk scores A masked to s <= r
    ("after") or s < r ("before"); the mask is applied in the exponent (-inf)
    so no masked entry can overflow.  ``vals`` is V' ([N, nc*C, dv], delta) or v.
    A per-channel gate builds A from [C, C, BKC] products, BKC channels at a time.
    """
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    col0 = tl.program_id(2) * BV
    t0 = i * C
    rows = tl.arange(0, C)
    if BEFORE:
        causal = rows[:, None] > rows[None, :]
    else:
        causal = rows[:, None] >= rows[None, :]
    Q = _load_tile(q_ptr + n * T * dk, t0, T, dk, 0, C, BK)
    h = _load_tile(H_ptr + (n * nc + i) * dk * dv, 0, dk, dv, col0, BK, BV)
    vals = _load_tile(vals_ptr + n * vals_rows * dv, t0, vals_rows, dv, col0, C, BV)
    if GATE == 0:
        K = _load_tile(k_ptr + n * T * dk, t0, T, dk, 0, C, BK)
        A = tl.where(causal, tl.dot(Q, tl.trans(K), input_precision="ieee"), 0.0)
        Qt = Q
    elif GATE == 1:
        K = _load_tile(k_ptr + n * T * dk, t0, T, dk, 0, C, BK)
        g = _load_steps(g_ptr + n * T, t0, T, C)
        G = tl.cumsum(g, 0)
        Gq = G
        if BEFORE:
            Gq = G - g
        A = tl.dot(Q, tl.trans(K), input_precision="ieee")
        A = A * tl.exp(tl.where(causal, Gq[:, None] - G[None, :], float("-inf")))
        Qt = Q * tl.exp(Gq)[:, None]
    else:
        g = _load_tile(g_ptr + n * T * dk, t0, T, dk, 0, C, BK)
        G = tl.cumsum(g, 0)
        Gq = G
        if BEFORE:
            Gq = G - g
        Qt = Q * tl.exp(Gq)
        A = tl.zeros((C, C), dtype=tl.float32)
        for c0 in tl.static_range(0, BK, BKC):
            q_c = _load_tile(q_ptr + n * T * dk, t0, T, dk, c0, C, BKC)
            k_c = _load_tile(k_ptr + n * T * dk, t0, T, dk, c0, C, BKC)
            g_c = _load_tile(g_ptr + n * T * dk, t0, T, dk, c0, C, BKC)
            G_c = tl.cumsum(g_c, 0)
            Gq_c = G_c
            if BEFORE:
                Gq_c = G_c - g_c
            expo = tl.where(causal[:, :, None], Gq_c[:, None, :] - G_c[None, :, :], float("-inf"))
            A += tl.sum(q_c[:, None, :] * k_c[None, :, :] * tl.exp(expo), 2)
    O = tl.dot(Qt, h, input_precision="ieee") + tl.dot(A, vals, input_precision="ieee")
    _store_tile(o_ptr + n * T * dv, O, t0, T, dv, col0, C, BV)


# --------------------------------------------------------------------------- launcher


def _block(d: int) -> int:
    """Register block for a dimension of size d: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def _block_v(dv: int, bk: int) -> int:
    """Value columns per program of the states and output kernels (bounds the [BK, BV] state tile)."""
    return min(_block(dv), 64 if bk <= 128 else 32)


def _block_channels(c: int, bk: int) -> int:
    """Key channels per step of the per-channel scores, so a [C, C, BKC] product stays <= 8192 elements."""
    return min(bk, max(1, 8192 // (c * c)))


def _check(name: str, x: Optional[Tensor], shapes: list[tuple[int, ...]], dtypes, device) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of k)")


def chunk_forward(
    k: Tensor,
    v: Tensor,
    q: Optional[Tensor],
    beta: Optional[Tensor],
    g: Optional[Tensor],
    h0: Optional[Tensor],
    chunk: int,
    before: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the chunkwise scan forward.

    k [N,T,dk], v [N,T,dv], q [N,T,dk] or None (fp32 / bf16 / fp16, computed in fp32),
    beta [N,T] or None (delta family; v is already scaled by the write coefficient),
    g [N,T] or [N,T,dk] fp32 log-gate or None, h0 [N,dk,dv] fp32 (None means zeros),
    chunk in {16, 32, 64}, before: readout S_{t-1}^T q_t instead of S_t^T q_t.

    Returns (o [N,T,dv] fp32 or torch.empty(0) without q, h_final [N,dk,dv],
    H [N,nc,dk,dv] (the state entering each chunk), Vp [N,nc*C,dv] (V', delta
    only) and W [N,nc*C,dk] (delta only); Vp and W are torch.empty(0) otherwise).
    """
    if not isinstance(k, Tensor) or k.dim() != 3:
        raise ValueError(f"k must be a [N,T,dk] tensor, got {getattr(k, 'shape', type(k).__name__)}")
    n, t, dk = k.shape
    if not isinstance(v, Tensor) or v.dim() != 3 or tuple(v.shape[:2]) != (n, t):
        raise ValueError(f"v must have shape ({n}, {t}, dv), got {tuple(getattr(v, 'shape', ()))}")
    dv = v.shape[2]
    if chunk not in CHUNKS:
        raise ValueError(f"chunk must be one of {CHUNKS}, got {chunk!r}")
    if not 1 <= dk <= MAX_DIM:
        raise ValueError(f"k: dk must be in 1..{MAX_DIM}, got {dk}")
    if not 1 <= dv <= MAX_DIM:
        raise ValueError(f"v: dv must be in 1..{MAX_DIM}, got {dv}")
    dev = k.device
    _check("k", k, [(n, t, dk)], _FLOAT_INPUTS, dev)
    _check("v", v, [(n, t, dv)], _FLOAT_INPUTS, dev)
    _check("q", q, [(n, t, dk)], _FLOAT_INPUTS, dev)
    _check("beta", beta, [(n, t)], _FLOAT_INPUTS, dev)
    _check("g", g, [(n, t), (n, t, dk)], (torch.float32,), dev)
    _check("h0", h0, [(n, dk, dv)], (torch.float32,), dev)
    gate = 0 if g is None else (1 if g.dim() == 2 else 2)
    if gate == 2 and beta is not None:
        raise NotImplementedError(
            "chunk_forward: a per-key-channel gate g [N,T,dk] together with beta has no exact WY form; "
            "use a scalar gate g [N,T]"
        )

    c = chunk
    nc = triton.cdiv(t, c)
    L = nc * c
    f32 = dict(device=dev, dtype=torch.float32)
    k, v = k.contiguous(), v.contiguous()
    q = None if q is None else q.contiguous()
    beta = None if beta is None else beta.contiguous()
    g = None if g is None else g.contiguous()
    h0 = torch.zeros(n, dk, dv, **f32) if h0 is None else h0.contiguous()
    delta = beta is not None

    o = torch.empty(n, t, dv, **f32) if q is not None else torch.empty(0, **f32)
    H = torch.empty(n, nc, dk, dv, **f32)
    h_final = torch.empty(n, dk, dv, **f32)
    Vp = torch.empty(n, L, dv, **f32) if delta else torch.empty(0, **f32)
    W = torch.empty(n, L, dk, **f32) if delta else torch.empty(0, **f32)
    if t == 0 or n == 0:
        h_final.copy_(h0)
        return o, h_final, H, Vp, W

    bk = _block(dk)
    bv = _block_v(dv, bk)
    g_arg = g if g is not None else k  # dummy pointer, never read when GATE == 0
    if delta:
        _prepare_kernel[(nc, n)](k, v, beta, g_arg, W, Vp, t, L, dk, dv, C=c, BK=bk, BV=_block(dv), GATE=gate)
    src, src_rows = (Vp, L) if delta else (v, t)
    _states_kernel[(n, triton.cdiv(dv, bv))](
        k, src, g_arg, W if delta else k, Vp if delta else k, h0, H, h_final,
        t, src_rows, nc, dk, dv, C=c, BK=bk, BV=bv, GATE=gate, HAS_BETA=delta,
    )
    if q is not None:
        _output_kernel[(nc, n, triton.cdiv(dv, bv))](
            q, k, src, g_arg, H, o, t, src_rows, nc, dk, dv,
            C=c, BK=bk, BV=bv, BKC=_block_channels(c, bk), GATE=gate, BEFORE=bool(before),
        )
    return o, h_final, H, Vp, W
