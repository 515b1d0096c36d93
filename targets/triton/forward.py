"""Forward Triton kernels of the chunkwise fast-weight scans, and their launcher.

The update rule (state S in R^{dk x dv}, fp32, per sequence n of N = batch*heads)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + k_t v_t^T     (delta family; without beta: a_t S_{t-1} + k_t v_t^T)
    (per-channel gate with beta: the "gate first" order (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + k_t v_t^T)
    o_t = S_t^T q_t  ("after")   or   S_{t-1}^T q_t  ("before"),   a_t = exp(g_t)  (scalar or per key channel)

Chunk form (C tokens per chunk, chunk i entered with state H_i, G = inclusive
cumsum of g inside the chunk, G_L its value at the last row, Gq = G or G - g)::

    delta:  Akk = tril(diag(b) K K^T * e^{G_r - G_s}, -1),  Tm = (I + Akk)^{-1}
            (per-channel gate: Akk_rs = b_r sum_c k_rc k_sc e^{G_rc - G_sc}, e^G per channel in W)
            W = Tm diag(b e^G) K,  U = Tm V,  V' = U - W H_i          (otherwise V' = V)
    H_{i+1} = e^{G_L} H_i + (K e^{G_L - G})^T V'
    O_i     = (Q e^{Gq}) H_i + A V',  A_rs = sum_c q_rc k_sc e^{Gq_rc - G_sc}  (s <= r, or s < r "before")
            (times ``scale``, the queries' factor: the readout is S^T (scale q))

Four kernels: ``wy_inverse._wy_inverse_kernel`` (delta only, no gate or a scalar one, parallel over
chunks: the WY inverse Tm, which the backward reads too), ``_prepare_kernel`` (delta only, parallel over
chunks: W and U; with a per-channel gate Tm too),
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

from .common import (
    INTERPRETED, MAX_HEAD_DIM, cdiv, channel_scores, channel_wy_factors, chunk_gates, decayed, dot_precision, gram,
    kernel_blocks, load_operand, load_steps, load_tile, mm, operand_dtype, readout_mask, scores, seq_start, sequences,
    store_tile,
)
from .tuning import ChunkKernel, Space
from .wy_inverse import _wy_inverse_kernel, inverse_key_block

__all__ = ["chunk_forward"]

CHUNKS = (16, 32, 64)
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _prepare_kernel(
    k_ptr, v_ptr, beta_ptr, coef_ptr, g_ptr, w_ptr, u_ptr, tm_ptr,
    T, N, L, HEADS: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr,
    GATE: tl.constexpr, HAS_COEF: tl.constexpr, PREC: tl.constexpr,
):
    """Delta family, one chunk per program (grid (nc, N)): the WY/UT factors W [C, dk] and U [C, dv].

    Akk_rs = b_r (k_r . k_s) e^{G_r - G_s} for s < r; Tm = (I + Akk)^{-1};
    W = Tm diag(b e^G) K and U = Tm V.  Written to rows i*C .. i*C+C-1 of the
    padded [N, L = nc*C, .] buffers (U into the V' buffer, which the states
    kernel then corrects in place).  Tm ([N, L, C], in the dots' operand dtype, as every product
    here uses it; the backward's WY kernel reads it instead of inverting again) is read, as
    ``wy_inverse._wy_inverse_kernel`` wrote it, except with a per-channel gate, whose Tm is
    inverted here and written.  GATE: 0 none, 1 scalar, 2 per key channel in the "gate first" order
    S_t = (I - b_t k_t k_t^T) diag(e^{g_t}) S_{t-1} + k_t v_t^T (Kimi Delta Attention): then Akk_rs = b_r sum_c k_rc k_sc e^{G_rc - G_sc} (built like the per-channel
    readout scores, BKC channels at a time) and W = Tm (b e^G * K) with e^G per channel.
    HAS_COEF: v is scaled here by the write coefficient ``coef`` (U = Tm diag(coef) V), not before.
    """
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rows = i * C + tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = tl.arange(0, BV)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    K = load_operand(k_seq, rows, cols_k, T, dk, HEADS * dk)
    V = load_operand(seq_start(v_ptr, n, T, HEADS, dv), rows, cols_v, T, dv, HEADS * dv)
    if HAS_COEF:
        V = V * load_steps(seq_start(coef_ptr, n, T, HEADS, 1), rows, T, HEADS)[:, None]
    b = load_steps(seq_start(beta_ptr, n, T, HEADS, 1), rows, T, HEADS)
    _, G, _, _ = chunk_gates(g_seq, rows, T, dk, HEADS, C, BK, GATE, False)
    if GATE == 2:
        tm, eb = channel_wy_factors(k_seq, g_seq, b, G, rows, T, dk, HEADS, C, BK, BKC)
        store_tile(tm_ptr + n * L * C, tm, rows, tl.arange(0, C), L, C, C)
    else:
        tm = load_operand(tm_ptr + n * L * C, rows, tl.arange(0, C), L, C, C)
        eb = decayed(b[:, None], G, GATE)
    store_tile(w_ptr + n * L * dk, mm(tm, K * eb, PREC), rows, cols_k, L, dk, dk)
    store_tile(u_ptr + n * L * dv, mm(tm, V, PREC), rows, cols_v, L, dv, dv)


@triton.jit(do_not_specialize=["N"])
def _states_kernel(
    k_ptr, src_ptr, g_ptr, w_ptr, vp_ptr, h0_ptr, H_ptr, hT_ptr,
    T, N, src_rows, nc, HEADS: tl.constexpr, src_heads: tl.constexpr, dk: tl.constexpr, dv: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, HAS_BETA: tl.constexpr,
    PREC: tl.constexpr,
):
    """The inter-chunk recurrence for one sequence and one block of value columns (grid (N, cdiv(dv, BV))).

    Sequential over chunks: stores H_i (the state entering chunk i), then
    H_{i+1} = e^{G_L} H_i + (K e^{G_L - G})^T V'.  The values come from
    ``src`` (v itself, in the inputs' layout: src_heads = HEADS, or U from the prepare kernel for
    the delta family, [N, src_rows, dv] with src_heads = 1, where V' = U - W H_i is computed here
    and written over U in ``vp``; columns are independent, so each program owns its block).
    GATE: 0 none, 1 scalar ([N, T] or [B, T, H]), 2 per key channel ([N, T, dk] or [B, T, H, dk]).
    """
    n = tl.program_id(0).to(tl.int64)
    cols_v = tl.program_id(1) * BV + tl.arange(0, BV)
    cols_k = tl.arange(0, BK)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    src_seq = seq_start(src_ptr, n, src_rows, src_heads, dv)
    h = load_tile(h0_ptr + n * dk * dv, cols_k, cols_v, dk, dv, dv)
    for i in range(nc):
        rows = i * C + tl.arange(0, C)
        store_tile(H_ptr + (n * nc + i) * dk * dv, h, cols_k, cols_v, dk, dv, dv)
        K = load_operand(k_seq, rows, cols_k, T, dk, HEADS * dk)
        vals = load_operand(src_seq, rows, cols_v, src_rows, dv, src_heads * dv)
        if HAS_BETA:
            W = load_operand(w_ptr + n * src_rows * dk, rows, cols_k, src_rows, dk, dk)
            vals = vals - mm(W, h, PREC)
            store_tile(vp_ptr + n * src_rows * dv, vals, rows, cols_v, src_rows, dv, dv)
        if GATE == 0:
            h = h + mm(tl.trans(K), vals, PREC)
        else:
            _, G, _, GL = chunk_gates(g_seq, rows, T, dk, HEADS, C, BK, GATE, False)
            if GATE == 1:   # a row's decay scales V' (BV columns) rather than K (dk columns)
                h = tl.exp(tl.trans(GL)) * h + mm(tl.trans(K), vals * tl.exp(GL - G), PREC)
            else:
                h = tl.exp(tl.trans(GL)) * h + mm(tl.trans(K * tl.exp(GL - G)), vals, PREC)
    store_tile(hT_ptr + n * dk * dv, h, cols_k, cols_v, dk, dv, dv)


@triton.jit(do_not_specialize=["N"])
def _output_kernel(
    q_ptr, k_ptr, vals_ptr, g_ptr, H_ptr, o_ptr,
    T, N, vals_rows, nc, scale, HEADS: tl.constexpr, vals_heads: tl.constexpr, dk: tl.constexpr,
    dv: tl.constexpr,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKC: tl.constexpr, BKD: tl.constexpr,
    GATE: tl.constexpr, BEFORE: tl.constexpr, PREC: tl.constexpr,
):
    """Readout of one chunk for one block of value columns (grid (nc, N, cdiv(dv, BV))).

    O = scale ((Q e^{Gq}) H_i + A V') with the intra-chunk scores A masked to s <= r
    ("after") or s < r ("before"); the mask is applied in the exponent (-inf)
    so no masked entry can overflow.  ``vals`` is V' ([N, nc*C, dv], delta: vals_heads = 1) or v
    (vals_heads = HEADS); q, k, g, o are in the inputs' layout (``seq_start``).
    A per-channel gate builds A from [C, C, BKC] products, BKC channels at a time.
    """
    i = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cols_v = tl.program_id(2) * BV + tl.arange(0, BV)
    cols_k = tl.arange(0, BK)
    rows = i * C + tl.arange(0, C)
    q_seq = seq_start(q_ptr, n, T, HEADS, dk)
    k_seq = seq_start(k_ptr, n, T, HEADS, dk)
    g_seq = seq_start(g_ptr, n, T, HEADS, dk if GATE == 2 else 1)
    mask = readout_mask(C, BEFORE)
    Q = load_operand(q_seq, rows, cols_k, T, dk, HEADS * dk)
    h = load_operand(H_ptr + (n * nc + i) * dk * dv, cols_k, cols_v, dk, dv, dv)
    vals = load_operand(seq_start(vals_ptr, n, vals_rows, vals_heads, dv), rows, cols_v, vals_rows, dv,
                        vals_heads * dv)
    _, G, Gq, _ = chunk_gates(g_seq, rows, T, dk, HEADS, C, BK, GATE, BEFORE)
    if GATE == 2:
        A = channel_scores(q_seq, k_seq, g_seq, rows, T, dk, HEADS, mask, C, BK, BKC, BEFORE)
    else:
        A = scores(gram(q_seq, k_seq, rows, T, dk, HEADS, C, BK, BKD, PREC), G, Gq, mask, GATE)
    if GATE == 1:   # the row decays scale the [C, BV] product rather than Q's dk columns
        O = (mm(Q, h, PREC) * tl.exp(Gq) + mm(A, vals, PREC)) * scale
    else:
        O = (mm(decayed(Q, Gq, GATE), h, PREC) + mm(A, vals, PREC)) * scale
    store_tile(seq_start(o_ptr, n, T, HEADS, dv), O, rows, cols_v, T, dv, HEADS * dv)


# The tuning spaces (``tuning``), kept small (compiling the candidates is most of a first call's
# tuning time): the sequential states kernel tries one pipeline stage (half the shared memory, so
# more programs resident) and two, not three (more shared memory, no fewer registers on sm_90);
# it overwrites U with V' in place (``vp_ptr``, the same buffer as ``src_ptr`` for the delta family;
# without beta ``src_ptr`` is the caller's v, which must not be restored: a copy_ would bump its
# autograd version, so ``vp_ptr`` is then a scratch element).  The WY inverse's [16, 16] tiles want
# few warps: one untuned (the fewest warp-instructions; ``wy_inverse``), two and four tuned.
WY_INVERSE = ChunkKernel(_wy_inverse_kernel, Space(warps=(1, 2, 4), stages=(1, 2), fixed_warps=1))
PREPARE = ChunkKernel(_prepare_kernel, Space())
STATES = ChunkKernel(_states_kernel, Space(value_blocks=(32, 64), stages=(1, 2)), restore=("vp_ptr",))
OUTPUT = ChunkKernel(_output_kernel, Space(value_blocks=(32, 64, 128), stages=(2,)))
KERNELS = (WY_INVERSE, PREPARE, STATES, OUTPUT)


# --------------------------------------------------------------------------- launcher


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
    coef: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    scale: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the chunkwise scan forward.

    k [N,T,dk], v [N,T,dv], q [N,T,dk] or None (fp32 / bf16 / fp16, computed in fp32),
    beta [N,T] or None (delta family; v scaled by the write coefficient before, or by ``coef`` here),
    g [N,T] or [N,T,dk] fp32 log-gate or None (per channel with beta: the gate-first order
    S_t = (I - b_t k_t k_t^T) diag(e^{g_t}) S_{t-1} + k_t v_t^T), h0 [N,dk,dv] fp32 (None means zeros),
    chunk in {16, 32, 64}, before: readout S_{t-1}^T q_t instead of S_t^T q_t, coef [N,T] or None:
    the delta family's write coefficient, multiplied into v in the kernels (v then unscaled;
    saves the caller a pass over v and the kernels reading it in fp32), out_dtype: o's dtype (fp32,
    bf16 or fp16; None: fp32), rounded once as it is stored, scale: the queries' factor (the
    readout is S^T (scale q), applied to o as it is stored: no scaled copy of q), compute_dtype: the
    dtype the update loop computes in (None: k's and q's; ``common.kernel_dtype``).  Or, read in place
    without copies, flash-linear-attention's layout with the heads after time: k [B,T,H,dk],
    v [B,T,H,dv], q [B,T,H,dk], beta [B,T,H], g [B,T,H] or [B,T,H,dk], h0 [B*H,dk,dv]
    (``sequences``; N = B*H, sequence n = b*H + h).

    Returns (o [N,T,dv] (or [B,T,H,dv]) or torch.empty(0) without q, h_final [N,dk,dv],
    H [N,nc,dk,dv] (the state entering each chunk), Vp [N,nc*C,dv] (V', delta
    only), W [N,nc*C,dk] and Tm [N,nc*C,C] (delta only: rows i*C.. hold chunk i's
    (I + Akk)^{-1}); Vp, W and Tm are torch.empty(0) otherwise).  o in ``out_dtype``; the rest fp32,
    except H, Vp, W and Tm with bf16 dots: bf16 (``common.operand_dtype``).
    """
    n, t, heads, prefix = sequences(k)
    if not isinstance(v, Tensor) or v.dim() != len(prefix) + 1 or tuple(v.shape[:-1]) != prefix:
        raise ValueError(f"v must have shape {prefix + ('dv',)}, got {tuple(getattr(v, 'shape', ()))}")
    dk, dv = k.shape[-1], v.shape[-1]
    if chunk not in CHUNKS:
        raise ValueError(f"chunk must be one of {CHUNKS}, got {chunk!r}")
    if not 1 <= dk <= MAX_HEAD_DIM:
        raise ValueError(f"k: dk must be in 1..{MAX_HEAD_DIM}, got {dk}")
    if not 1 <= dv <= MAX_HEAD_DIM:
        raise ValueError(f"v: dv must be in 1..{MAX_HEAD_DIM}, got {dv}")
    dev = k.device
    if dev.type != "cuda" and not INTERPRETED.value:
        raise ValueError(f"k is on {dev}: the Triton kernels run on CUDA tensors (move the model and its inputs "
                         "to the GPU, use target='torch' on the CPU, or set TRITON_INTERPRET=1 to test the "
                         "kernels on the CPU, slowly)")
    _check("k", k, [prefix + (dk,)], _FLOAT_INPUTS, dev)
    _check("v", v, [prefix + (dv,)], _FLOAT_INPUTS, dev)
    _check("q", q, [prefix + (dk,)], _FLOAT_INPUTS, dev)
    _check("beta", beta, [prefix], _FLOAT_INPUTS, dev)
    _check("coef", coef, [prefix], _FLOAT_INPUTS, dev)
    if coef is not None and beta is None:
        raise ValueError("coef: only the delta family (beta given) scales v in the kernels; scale v before the call")
    _check("g", g, [prefix, prefix + (dk,)], (torch.float32,), dev)
    _check("h0", h0, [(n, dk, dv)], (torch.float32,), dev)
    if out_dtype not in (None, *_FLOAT_INPUTS):
        raise ValueError(f"out_dtype must be one of {[str(d) for d in _FLOAT_INPUTS]}, got {out_dtype}")
    gate = 0 if g is None else (1 if g.dim() == len(prefix) else 2)
    prec = dot_precision(k, q, compute_dtype=compute_dtype)
    blocks = kernel_blocks(dev, dk, dv, chunk, prec)

    c = chunk
    nc = cdiv(t, c)
    L = nc * c
    f32 = dict(device=dev, dtype=torch.float32)
    operands = dict(device=dev, dtype=operand_dtype(prec))
    k, v = k.contiguous(), v.contiguous()
    q = None if q is None else q.contiguous()
    beta = None if beta is None else beta.contiguous()
    coef = None if coef is None else coef.contiguous()
    g = None if g is None else g.contiguous()
    delta = beta is not None
    meta = dict(C=c, BK=blocks.BK, GATE=gate, PREC=prec)
    g_arg = g if g is not None else k  # dummy pointer, never read when GATE == 0

    # Each buffer allocated, and the zero initial state filled, just before the launch that first
    # writes (reads) it: the GPU waits idle from a call's start until its first launch.
    runs = t > 0 and n > 0
    nothing = lambda: torch.empty(0, **f32)  # noqa: E731
    Tm = torch.empty(n, L, c, **operands) if delta else nothing()
    if runs and delta and gate != 2:
        WY_INVERSE.launch(lambda m: (nc, n), (k, beta, g_arg, Tm, t, n, L, heads, dk),
                          dict(C=c, BK=blocks.BK, BKD=inverse_key_block(blocks, dev), GATE=gate, PREC=prec),
                          blocks, dev)
    Vp, W = (torch.empty(n, L, dv, **operands), torch.empty(n, L, dk, **operands)) if delta else (nothing(), nothing())
    if runs and delta:
        PREPARE.launch(lambda m: (nc, n), (k, v, beta, beta if coef is None else coef, g_arg, W, Vp, Tm, t, n, L,
                                           heads, dk, dv),
                       dict(meta, BV=blocks.BV_prepare, BKC=blocks.BKC, HAS_COEF=coef is not None),
                       blocks, dev)
    H = torch.empty(n, nc, dk, dv, **operands)
    h_final = torch.empty(n, dk, dv, **f32)
    h0 = torch.zeros(n, dk, dv, **f32) if h0 is None else h0.contiguous()
    src, src_rows, src_heads = (Vp, L, 1) if delta else (v, t, heads)   # V' in our layout, v in the inputs'
    if runs:
        # without beta W and V' are neither read nor written: a dummy element (not the caller's v: ``STATES``)
        w_arg, vp_arg = (W, Vp) if delta else (torch.empty(1, **f32),) * 2
        STATES.launch(lambda m: (n, cdiv(dv, m["BV"])),
                      (k, src, g_arg, w_arg, vp_arg, h0, H, h_final, t, n, src_rows, nc, heads, src_heads, dk, dv),
                      dict(meta, HAS_BETA=delta), blocks, dev)
    else:
        h_final.copy_(h0)
    o = torch.empty(*prefix, dv, device=dev, dtype=out_dtype or torch.float32) if q is not None else nothing()
    if runs and q is not None:
        OUTPUT.launch(lambda m: (nc, n, cdiv(dv, m["BV"])),
                      (q, k, src, g_arg, H, o, t, n, src_rows, nc, float(scale), heads, src_heads, dk, dv),
                      dict(meta, BKC=blocks.BKC, BKD=blocks.BKD, BEFORE=bool(before)), blocks, dev)
    return o, h_final, H, Vp, W, Tm
