"""Loops spelled the way public fast-weight libraries spell their naive references.

Each function below is written for this file (nothing is copied), but has the
*structure* of one naive/recurrent PyTorch reference in flash-linear-attention
(``fla/ops/*/naive.py``, named in each docstring): the same call conventions
(``[B, T, H, D]`` or ``[B, H, T, D]``, transposes at entry and exit, ``scale=None``,
``initial_state=None``, ``output_final_state=False``, ``.float()`` / ``.to(dtype)``
casts), and the same loop idioms (``h = h.clone()``, in-place ``o[:, :, i] = ...``,
``h += initial_state``, einsum strings, ``torch.zeros_like``, broadcast-and-sum
readouts).  Every test compiles the function, compares it with eager at several
lengths and call structures, and asserts through ``explain`` that exactly one loop
was found, of the right kind, and rewritten chunkwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nlcompile
from _compare import assert_close_outputs

B, H, D = 2, 3, 16
LENGTHS = (7, 64, 300)



# ---------------------------------------------------------------- the loops

def linear_attn_recurrent(q, k, v, scale=None, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/linear_attn/naive.py (naive_recurrent_linear_attn):
    [B, T, H, D] kept as is, torch.empty_like output written at o[:, t],
    einsum strings with spaces, ``S = S + initial_state``."""
    in_dtype = q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    q, k, v = (x.to(torch.float32) for x in (q, k, v))
    o = torch.empty_like(v)
    S = torch.zeros((batch, heads, d_k, d_v), device=q.device, dtype=torch.float32)
    if initial_state is not None:
        S = S + initial_state
    for t in range(seq_len):
        S = S + torch.einsum("b h k, b h v -> b h k v", k[:, t], v[:, t])
        o[:, t] = torch.einsum("b h k v, b h k -> b h v", S, q[:, t] * scale)
    return o.to(in_dtype), (S if output_final_state else None)


def retention_recurrent(q, k, v, scale=None, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/retention (naive.py's per-head decay 1 - 2^(-5-h), as
    fused_recurrent.py feeds it to simple GLA as a constant log-gate g_gamma):
    [B, H, T, D], a loop-invariant per-head decay, readout by matmul."""
    orig = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    b, n_heads, seq_len, d_head = q.shape
    if scale is None:
        scale = d_head ** -0.5
    heads = q.new_tensor(range(n_heads), dtype=torch.float)
    g_gamma = (1 - q.new_tensor(2.0, dtype=torch.float).pow(-5.0 - heads)).log()
    decay = g_gamma.exp().view(1, n_heads, 1, 1)
    S = q.new_zeros(b, n_heads, d_head, v.shape[-1])
    if initial_state is not None:
        S = initial_state.float().clone()
    o = torch.zeros_like(v)
    for n in range(seq_len):
        kv = k[:, :, n].unsqueeze(-1) @ v[:, :, n].unsqueeze(-2)
        S = decay * S + kv
        o[:, :, n] = (q[:, :, n].unsqueeze(-2) * scale @ S).squeeze(-2)
    if not output_final_state:
        S = None
    return o.to(orig), S


def simple_gla_recurrent(q, k, v, g, scale=None, initial_state=None, output_final_state=True):
    """Mirrors fla/ops/simple_gla/naive.py (naive_recurrent_simple_gla):
    [B, T, H, D] transposed at entry and exit, scalar log-gate per head [B, T, H],
    ``S += initial_state`` in place, unsqueeze-chain gate, broadcast-and-sum
    readout, output_final_state defaults to True."""
    dtype = q.dtype
    q, k, v, g = (x.transpose(1, 2).float() for x in (q, k, v, g))
    batch, heads, seq_len, d_k = q.shape
    d_v = v.shape[-1]
    if scale is None:
        scale = d_k ** -0.5
    q = q * scale
    o = v.new_zeros(batch, heads, seq_len, d_v)
    S = q.new_zeros(batch, heads, d_k, d_v)
    if initial_state is not None:
        S += initial_state
    for i in range(seq_len):
        a = g[:, :, i].exp()
        kv = k[:, :, i].unsqueeze(-1) * v[:, :, i].unsqueeze(-2)
        S = S * a.unsqueeze(-1).unsqueeze(-1) + kv
        o[:, :, i] = (q[:, :, i, :].unsqueeze(-1) * S).sum(-2)
    if not output_final_state:
        S = None
    return o.transpose(1, 2).to(dtype), S


def simple_gla_head_first(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                          head_first=True):
    """The older fla API of the same op (``head_first`` keyword, as the fused
    recurrent kernels had it): inputs [B, H, T, D] when head_first else
    [B, T, H, D], rearranged at entry and back at exit; einsum strings."""
    if not head_first:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        g = g.transpose(1, 2)
    q, k, v, g = (x.contiguous().to(torch.float32) for x in (q, k, v, g))
    bsz, nh, T, K = q.shape
    if scale is None:
        scale = 1 / (K ** 0.5)
    h = torch.zeros(bsz, nh, K, v.shape[-1]).to(v)
    if initial_state is not None:
        h = h + initial_state.to(torch.float32)
    o = torch.zeros_like(v)
    for t in range(T):
        h = h * torch.exp(g[:, :, t])[:, :, None, None] + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, h)
    if not head_first:
        o = o.transpose(1, 2)
    return o, (h if output_final_state else None)


def simple_gla_fused_api(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                         output_final_state=False):
    """The call convention of fla/ops/simple_gla/fused_recurrent.py (a per-step
    gate ``g`` [B, T, H] or a data-independent per-head gate ``g_gamma`` [H],
    both optional keywords), with the loop written naively: [B, T, H, D] without
    transposes, index-and-broadcast (``k[:, t, :, :, None]``), scale applied to
    the readout."""
    bsz, T, nh, K = q.shape
    if scale is None:
        scale = K ** -0.5
    h = q.new_zeros(bsz, nh, K, v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        h = h + initial_state
    o = torch.zeros_like(v, dtype=torch.float32)
    for t in range(T):
        if g is not None:
            h = h * g[:, t].exp()[..., None, None]
        if g_gamma is not None:
            h = h * g_gamma.exp()[None, :, None, None]
        h = h + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = (q[:, t, :, :, None] * h).sum(-2) * scale
    return o.to(q.dtype), (h if output_final_state else None)


def lightning_attn_recurrent(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                             output_final_state=False):
    """Mirrors fla/ops/lightning_attn/fused_recurrent.py: a wrapper that builds a
    per-head constant log-decay from (layer_idx, num_layers) with
    ``q.new_tensor(range(H))`` and hands it to the simple-GLA recurrence."""
    nh = q.shape[2]
    g_gamma = -(8 / nh * (1 - layer_idx / num_layers)) * q.new_tensor(range(nh), dtype=torch.float)
    return simple_gla_fused_api(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state)


def mamba2_recurrent(x, dt, A, Bm, Cm, Dskip, initial_state=None, output_final_state=False):
    """Mamba-2 (SSD) as a scalar-gate linear recurrence, the parameterisation fla
    runs through fla/ops/simple_gla (g = A * dt): x [B, T, H, P], dt [B, T, H]
    (softplus'd), A [H] < 0, B/C [B, T, H, N]; state [B, H, P, N] (the key on
    the last axis), skip connection D * x added to the readout."""
    dtype = x.dtype
    batch, seq_len, heads, p = x.shape
    n = Bm.shape[-1]
    x, dt, Bm, Cm = x.float(), dt.float(), Bm.float(), Cm.float()
    h = torch.zeros(batch, heads, p, n, dtype=torch.float32, device=x.device)
    if initial_state is not None:
        h = initial_state.clone()
    y = torch.zeros_like(x)
    for t in range(seq_len):
        dA = torch.exp(dt[:, t] * A)                                     # [B, H]
        dBx = torch.einsum("bh,bhn,bhp->bhpn", dt[:, t], Bm[:, t], x[:, t])
        h = h * dA[..., None, None] + dBx
        y[:, t] = torch.einsum("bhpn,bhn->bhp", h, Cm[:, t]) + Dskip[:, None] * x[:, t]
    return y.to(dtype), (h if output_final_state else None)


def gla_recurrent(q, k, v, gk, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/gla/naive.py (naive_recurrent_gla): [B, T, H, D]
    transposed and cast at entry, per-key-channel log-gate gk [B, T, H, K],
    ``h += initial_state.float()``, scale applied per step, broadcast-and-sum
    readout, transposed back and cast at exit."""
    dtype = q.dtype
    q, k, v, gk = (x.transpose(1, 2).float() for x in (q, k, v, gk))
    b, nh, T, K = q.shape
    V = v.shape[-1]
    o = torch.zeros_like(v)
    scale = K ** -0.5
    h = q.new_zeros(b, nh, K, V, dtype=torch.float32)
    if initial_state is not None:
        h += initial_state.float()
    for i in range(T):
        q_i = q[:, :, i] * scale
        decay_i = gk[:, :, i].exp()
        kv_i = k[:, :, i][..., None] * v[:, :, i][..., None, :]
        h = h * decay_i[..., None] + kv_i
        o[:, :, i] = (q_i[..., None] * h).sum(-2)
    if not output_final_state:
        h = None
    return o.transpose(1, 2).to(dtype), h


def rwkv6_recurrent(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/rwkv6/recurrent_naive.py (naive_recurrent_rwkv6):
    [B, H, T, D], per-channel log-decay w, readout *before* the update with a
    per-head bonus u on the current token, ``h += initial_state``."""
    orig_dtype = r.dtype
    bsz, nh, T, K = r.shape
    V = v.shape[-1]
    r, k, v, w, u = (x.float() for x in (r, k, v, w, u))
    h = torch.zeros(bsz, nh, K, V, dtype=torch.float32, device=r.device)
    o = torch.zeros_like(v)
    if scale is None:
        scale = K ** -0.5
    if initial_state is not None:
        h += initial_state
    for t in range(T):
        r_t = r[:, :, t, :] * scale
        kv_t = k[:, :, t][..., None] * v[:, :, t, :][..., None, :]
        o[:, :, t] = ((h + u[None, ..., None] * kv_t) * r_t[..., None]).sum(-2)
        h = h * w[:, :, t].exp()[..., None] + kv_t
    final = h if output_final_state else None
    return o.to(orig_dtype), final


def delta_rule_recurrent(q, k, v, beta, initial_state=None, output_final_state=True):
    """Mirrors fla/ops/delta_rule/naive.py (delta_rule_recurrence): [B, H, T, D],
    beta [B, H, T] lifted with ``beta[..., None]`` when it has fewer dims, q
    scaled before the loop, ``S += initial_state``, ``v[:, :, i].clone()``,
    ``S.clone()`` reads, in-place einsum readout, ``None if ... is False``."""
    orig_dtype = q.dtype
    b, h, seq_len, d_k = q.shape
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    d_v = v.shape[-1]
    o = torch.zeros_like(v)
    S = torch.zeros(b, h, d_k, d_v).to(v)
    q = q * (d_k ** -0.5)
    if beta.ndim < v.ndim:
        beta = beta[..., None]
    if initial_state is not None:
        S += initial_state
    for i in range(seq_len):
        k_i = k[:, :, i]
        u_i = v[:, :, i].clone()
        u_i = u_i - (S.clone() * k_i[..., None]).sum(-2)
        u_i = u_i * beta[:, :, i]
        S = S.clone() + k_i.unsqueeze(-1) * u_i.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i], S)
    S = None if output_final_state is False else S
    return o.to(orig_dtype), S


def gated_delta_recurrent(q, k, v, beta, g, scale=None, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/gated_delta_rule/naive.py (naive_recurrent_gated_delta_rule):
    [B, T, H, D] with ``.transpose(1, 2).contiguous().to(torch.float32)`` at entry,
    scalar log-gate g [B, T, H], ``h = h.clone() * g.exp()[..., None, None]``,
    ``torch.zeros(...).to(v)``, ``.transpose(1, 2).contiguous()`` at exit."""
    q, k, v, beta, g = (x.transpose(1, 2).contiguous().to(torch.float32) for x in (q, k, v, beta, g))
    nb, nh, T, K = k.shape
    V = v.shape[-1]
    o = torch.zeros(nb, nh, T, V).to(v)
    h = torch.zeros(nb, nh, K, V).to(v)
    if initial_state is not None:
        h = initial_state.to(torch.float32)
    if scale is None:
        scale = 1 / (q.shape[-1] ** 0.5)
    q = q * scale
    for i in range(T):
        k_i = k[:, :, i]
        h = h.clone() * g[:, :, i].exp()[..., None, None]
        err = v[:, :, i].clone() - (h.clone() * k_i[..., None]).sum(-2)
        err = err * beta[:, :, i][..., None]
        h = h.clone() + k_i.unsqueeze(-1) * err.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i], h)
    if not output_final_state:
        h = None
    o = o.transpose(1, 2).contiguous()
    return o, h


def gated_delta_product_recurrent(q, k, v, g, beta, scale, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/gated_delta_product/naive.py with one Householder step per
    token: [B, T, H, D] without transposes, optional gate (``if g is not None``),
    the erase-and-write folded into one expression, readout
    ``(h * q[..., None]).sum(-2)``; the final state is returned unconditionally
    unless output_final_state is False."""
    dt = q.dtype
    bsz, T, nh, K = q.shape
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    h = torch.zeros(bsz, nh, K, v.shape[-1], dtype=torch.float32, device=q.device)
    if initial_state is not None:
        h = initial_state
    o = torch.zeros(bsz, T, nh, v.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(T):
        if g is not None:
            h = h * g[:, i, :].exp()[..., None, None]
        k_i, v_i, b_i = k[:, i, :, :], v[:, i, :, :], beta[:, i, :]
        h = h + (v_i - (h * k_i[..., None]).sum(-2)).unsqueeze(-2) * k_i[..., None] * b_i[..., None, None]
        o[:, i] = (h * (q[:, i, :, :] * scale)[..., None]).sum(-2)
    return o.to(dt), (h if output_final_state else None)


# ---------------------------------------------------------------- inputs

def _qkv(T, bthd=True, dk=D, dv=D, norm_k=False, heads=H):
    shape_k = (B, T, heads, dk) if bthd else (B, heads, T, dk)
    shape_v = (B, T, heads, dv) if bthd else (B, heads, T, dv)
    q, k, v = torch.randn(shape_k), torch.randn(shape_k), torch.randn(shape_v)
    if norm_k:
        k = F.normalize(k, dim=-1)
    return q, k, v


def _scalar_gate(T, bthd=True):
    return F.logsigmoid(torch.randn((B, T, H) if bthd else (B, H, T)) + 2.0)


def _state(dk=D, dv=D):
    return torch.randn(B, H, dk, dv)


def make_linear_attn(T):
    return _qkv(T), {}


def make_retention(T):
    return _qkv(T, bthd=False), {}


def make_simple_gla(T):
    return (*_qkv(T), _scalar_gate(T)), {}


def make_simple_gla_head_first(T):
    return (*_qkv(T, bthd=False), _scalar_gate(T, bthd=False)), {}


def make_simple_gla_g_gamma(T):
    return _qkv(T), {"g_gamma": F.logsigmoid(torch.randn(H) + 3.0)}


def make_lightning(T):
    return (*_qkv(T), 3, 8), {}


def make_mamba2(T, P=8, N=16):
    x = torch.randn(B, T, H, P)
    dt = F.softplus(torch.randn(B, T, H) - 1.0)
    A = -torch.exp(torch.randn(H) * 0.5)
    return (x, dt, A, torch.randn(B, T, H, N), torch.randn(B, T, H, N), torch.randn(H)), {}


def _mamba_state(P=8, N=16):
    return torch.randn(B, H, P, N)


def make_gla(T):
    gk = F.logsigmoid(torch.randn(B, T, H, D) + 3.0) / 4
    return (*_qkv(T), gk), {}


def make_rwkv6(T):
    w = -torch.exp(torch.randn(B, H, T, D) - 2.0)
    u = torch.randn(H, D) * 0.5
    return (*_qkv(T, bthd=False), w, u), {}


def make_delta(T):
    beta = torch.sigmoid(torch.randn(B, H, T))
    return (*_qkv(T, bthd=False, norm_k=True), beta), {}


def make_gated_delta(T):
    beta = torch.sigmoid(torch.randn(B, T, H))
    g = -F.softplus(torch.randn(B, T, H) - 2.0)
    return (*_qkv(T, norm_k=True), beta, g), {}


def make_gated_delta_product(T):
    q, k, v = _qkv(T, norm_k=True)
    g = -F.softplus(torch.randn(B, T, H) - 2.0)
    beta = torch.sigmoid(torch.randn(B, T, H))
    return (q, k, v, g, beta), {"scale": D ** -0.5}


def kda_recurrent(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Mirrors fla/ops/kda/naive.py (naive_recurrent_kda, Kimi Delta Attention): [B, T, H, K],
    a per-key-channel log-gate g [B, T, H, K] applied to the state BEFORE the delta step,
    ``S += initial_state``, broadcast-and-sum retrieval, einsum write and readout."""
    dtype = v.dtype
    B_, T, H_, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    q, k, v, g, beta = (x.to(torch.float) for x in (q, k, v, g, beta))
    q = q * scale
    S = k.new_zeros(B_, H_, K, V).to(q)
    if initial_state is not None:
        S += initial_state
    o = torch.zeros_like(v)
    for i in range(T):
        q_i, k_i, v_i, g_i, b_i = q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i]
        S = S * g_i[..., None].exp()
        S = S + torch.einsum("bhk,bhv->bhkv", b_i[..., None] * k_i, v_i - (k_i[..., None] * S).sum(-2))
        o[:, i] = torch.einsum("bhk,bhkv->bhv", q_i, S)
    return o.to(dtype), (S if output_final_state else None)


def make_kda(T):
    q, k, v = _qkv(T, norm_k=True)
    g = -F.softplus(torch.randn(B, T, H, D))
    beta = torch.sigmoid(torch.randn(B, T, H))
    return (q, k, v, g, beta), {}


# (function, inputs, extra call keywords per call structure, expected kind);
# a callable keyword value is called afresh for every call (a new initial state).
WITH_STATE = ({}, {"initial_state": _state, "output_final_state": True})
CASES = [
    (linear_attn_recurrent, make_linear_attn, WITH_STATE, "additive"),
    (retention_recurrent, make_retention, WITH_STATE, "decay"),
    (simple_gla_recurrent, make_simple_gla, ({}, {"initial_state": _state}, {"output_final_state": False}), "decay"),
    (simple_gla_head_first, make_simple_gla_head_first, WITH_STATE, "decay"),
    (simple_gla_fused_api, make_simple_gla_g_gamma, WITH_STATE, "decay"),
    (lightning_attn_recurrent, make_lightning, WITH_STATE, "decay"),
    (mamba2_recurrent, make_mamba2, ({}, {"initial_state": _mamba_state, "output_final_state": True}), "decay"),
    (gla_recurrent, make_gla, WITH_STATE, "decay"),
    (rwkv6_recurrent, make_rwkv6, WITH_STATE, "decay"),
    (delta_rule_recurrent, make_delta, ({}, {"initial_state": _state}, {"output_final_state": False}), "delta"),
    (gated_delta_recurrent, make_gated_delta, WITH_STATE, "gated_delta"),
    (gated_delta_product_recurrent, make_gated_delta_product, WITH_STATE, "gated_delta"),
    (kda_recurrent, make_kda, WITH_STATE, "gated_delta"),
]


def _resolve(extra):
    return {name: val() if callable(val) else val for name, val in extra.items()}


@pytest.mark.parametrize("fn,make,structures,kind", CASES, ids=[c[0].__name__ for c in CASES])
def test_public_spelling_compiles_chunkwise_and_exact(fn, make, structures, kind):
    compiled = nlcompile.compile(fn)
    for s, extra in enumerate(structures):
        for T in LENGTHS:
            args, kw = make(T)
            kw = {**kw, **_resolve(extra)}
            assert_close_outputs(compiled(*args, **kw), fn(*args, **kw))
        assert compiled.captures == s + 1
        args, kw = make(LENGTHS[0])
        kw = {**kw, **_resolve(extra)}
        report = compiled.explain(*args, **kw)
        assert compiled.captures == s + 1  # explain reuses the program for this call structure
        assert len(report.loops) == 1, str(report)
        loop = report.loops[0]
        assert loop.kind == kind, str(report)
        assert loop.rewrite == "chunkwise", str(report)
        assert loop.readouts, str(report)


def test_head_first_false_is_its_own_structure():
    """head_first=False transposes at entry and exit: same kind, same numbers."""
    fn = simple_gla_head_first
    compiled = nlcompile.compile(fn)
    for T in LENGTHS:
        args, _ = make_simple_gla(T)
        assert_close_outputs(compiled(*args, head_first=False), fn(*args, head_first=False))
    assert compiled.captures == 1
    for T in LENGTHS:
        args, _ = make_simple_gla(T)
        kw = {"head_first": False, "initial_state": _state(), "output_final_state": True}
        assert_close_outputs(compiled(*args, **kw), fn(*args, **kw))
    assert compiled.captures == 2
    report = compiled.explain(*make_simple_gla(9)[0], head_first=False)
    assert [(lp.kind, lp.rewrite) for lp in report.loops] == [("decay", "chunkwise")], str(report)
    assert report.loops[0].time_axis[0] == "q[dim 1]", str(report)


def test_optional_gate_none_is_a_plain_delta_rule():
    """gated_delta_product with g=None: the gate branch is a Python branch on an
    argument, so the same function compiles to a plain delta rule."""
    fn = gated_delta_product_recurrent
    compiled = nlcompile.compile(fn)
    for T in LENGTHS:
        (q, k, v, _, beta), kw = make_gated_delta_product(T)
        assert_close_outputs(compiled(q, k, v, None, beta, **kw), fn(q, k, v, None, beta, **kw))
    assert compiled.captures == 1
    (q, k, v, _, beta), kw = make_gated_delta_product(9)
    report = compiled.explain(q, k, v, None, beta, **kw)
    assert [(lp.kind, lp.rewrite) for lp in report.loops] == [("delta", "chunkwise")], str(report)


def test_call_structures_interleaved():
    """Real use alternates call structures on one compiled object (a training
    call without state, then a call that carries the state on): each call must
    come back in its own output structure, (o, None) or (o, final_state)."""
    fn = gated_delta_recurrent
    compiled = nlcompile.compile(fn)
    for T in LENGTHS:
        args, _ = make_gated_delta(T)
        assert_close_outputs(compiled(*args), fn(*args))
        kw = {"initial_state": _state(), "output_final_state": True}
        assert_close_outputs(compiled(*args, **kw), fn(*args, **kw))
    assert compiled.captures == 2


def per_channel_gate_after_delta(q, k, v, g, beta):
    """The per-channel gate applied AFTER the delta step (then the write): S' = D (I - b k k^T) S + b k v^T,
    rank two per step, no WY form."""
    S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        k_t, b_t = k[:, t], beta[:, t, :, None]
        S = S - (b_t * k_t)[..., None] * (k_t[..., None] * S).sum(-2)[..., None, :]
        S = S * g[:, t].exp()[..., None]
        S = S + (b_t * k_t)[..., None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1)


def per_channel_gate_after_write(q, k, v, g, beta):
    """The whole delta step, write included, then the per-channel gate: an affine map."""
    S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        S = S + (beta[:, t, :, None] * k_t)[..., None] * (v[:, t] - (k_t[..., None] * S).sum(-2))[..., None, :]
        S = S * g[:, t].exp()[..., None]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("fn,kind,why", [
    (per_channel_gate_after_delta, "gated_delta", "applied after the delta step"),
    (per_channel_gate_after_write, "affine", "the write key differs from the erase key"),
])
def test_per_channel_gate_after_the_delta_step_stays_sequential_and_says_why(fn, kind, why):
    compiled = nlcompile.compile(fn)
    for T in LENGTHS:
        args, _ = make_kda(T)
        assert_close_outputs(compiled(*args), fn(*args))
    loop = compiled.explain(*make_kda(9)[0]).loops[0]
    assert (loop.kind, loop.rewrite) == (kind, "sequential"), loop
    assert why in loop.reason, loop.reason
