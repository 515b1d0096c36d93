"""Backward Triton kernels (``targets.triton.backward.chunk_backward``) against autograd
through ``sequential_scan`` in float64.

The forward intermediates the backward needs (H: state entering each chunk, V', W and the
WY inverses Tm of the delta family) come from ``chunk_intermediates`` below, a float64 PyTorch
transcription of the chunk formulas, itself checked against ``sequential_scan``.
Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes are small.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from _compare import low_precision_kernel_tol
from _draws import Draws
from nlcompile.targets.scan import sequential_scan
from nlcompile.targets.triton import backward
from nlcompile.targets.triton.backward import chunk_backward
from nlcompile.targets.triton.forward import chunk_forward

# kda: the delta rule with a per-key-channel gate, gate first (Kimi Delta Attention):
# S_t = (I - b_t k_t k_t^T) diag(e^{g_t}) S_{t-1} + k_t v_t^T
KINDS = ["additive", "decay", "decay_channel", "delta", "gated_delta", "kda"]
N = 2


def make_inputs(kind: str, T: int, dk: int, dv: int, *, with_q=True, seed=0, gate_scale=1.0) -> dict:
    """fp32 kernel inputs with realistic gates: g = -gate_scale * softplus(randn), beta in (0, 1),
    l2-normalised keys for the delta family."""
    gen = Draws(seed)
    rnd = gen.randn
    delta = kind in ("delta", "gated_delta", "kda")
    k = rnd(N, T, dk)
    x = dict(k=F.normalize(k, dim=-1) if delta else k, v=rnd(N, T, dv), q=rnd(N, T, dk) if with_q else None,
             beta=gen.rand(N, T) if delta else None, g=None, h0=rnd(N, dk, dv))
    if kind in ("decay", "gated_delta"):
        x["g"] = -gate_scale * F.softplus(rnd(N, T))
    elif kind in ("decay_channel", "kda"):
        x["g"] = -gate_scale * F.softplus(rnd(N, T, dk))
    return x


def _pad(x, rows: int):
    return None if x is None else F.pad(x, [0, 0] * (x.dim() - 2) + [0, rows - x.shape[1]])


def chunk_intermediates(k, v, q, beta, g, h0, C: int, before: bool):
    """The spec's chunk formulas in float64: (o or None, final state, H [N,nc,dk,dv],
    Vp [N,nc*C,dv], W [N,nc*C,dk], Tm [N,nc*C,C]) (Vp, W, Tm: empty unless beta is given)."""
    d = lambda x: None if x is None else x.double()  # noqa: E731
    k, v, q, beta, g, h = d(k), d(v), d(q), d(beta), d(g), d(h0)
    n, T, dk = k.shape
    nc = math.ceil(T / C)
    P = nc * C
    k, v, q, beta, g = (_pad(x, P) for x in (k, v, q, beta, g))
    per_channel = g is not None and g.dim() == 3
    rows = torch.arange(C)
    strict = rows[:, None] > rows[None, :]
    seen = rows[:, None] > rows[None, :] if before else rows[:, None] >= rows[None, :]
    Hs, Vps, Ws, Tms, Os = [], [], [], [], []
    for i in range(nc):
        sl = slice(i * C, (i + 1) * C)
        kc, vc = k[:, sl], v[:, sl]
        gc = g[:, sl] if g is not None else k.new_zeros(n, C)
        G = gc.cumsum(1)
        Gk = G if per_channel else G[..., None]                           # [n,C,dk or 1]
        Gq = Gk - (gc if per_channel else gc[..., None]) if before else Gk
        GL = Gk[:, -1:]
        vp = vc
        if beta is not None:
            bc = beta[:, sl]
            expo = (Gk[:, :, None, :] - Gk[:, None, :, :]).masked_fill(~strict[:, :, None], float("-inf"))
            Akk = bc[:, :, None] * torch.einsum("nrc,nsc,nrsc->nrs", kc, kc, expo.exp())
            Tm = torch.linalg.inv(torch.eye(C, dtype=k.dtype) + Akk)
            Wc = Tm @ (kc * bc[..., None] * Gk.exp())
            vp = Tm @ vc - Wc @ h
            Vps.append(vp)
            Ws.append(Wc)
            Tms.append(Tm)
        if q is not None:
            qc = q[:, sl]
            expo = (Gq[:, :, None, :] - Gk[:, None, :, :]).masked_fill(~seen[:, :, None], float("-inf"))
            A = torch.einsum("nrc,nsc,nrsc->nrs", qc, kc, expo.exp()) if per_channel else \
                (qc @ kc.transpose(1, 2)) * expo.squeeze(-1).exp()
            Os.append((qc * Gq.exp()) @ h + A @ vp)
        Hs.append(h)
        h = GL.exp().transpose(1, 2) * h + (kc * (GL - Gk).exp()).transpose(1, 2) @ vp
    o = torch.cat(Os, 1)[:, :T] if q is not None else None
    empty = k.new_empty(0)
    rows = lambda xs: torch.cat(xs, 1) if beta is not None else empty  # noqa: E731
    return o, h, torch.stack(Hs, 1), rows(Vps), rows(Ws), rows(Tms)


def reference_grads(x: dict, do, dh_final, before: bool):
    """(dk, dv, dq, dbeta, dg, dh0) by autograd through sequential_scan in float64."""
    names = [nm for nm in ("k", "v", "q", "beta", "g", "h0") if x[nm] is not None]
    leaves = {nm: x[nm].double().requires_grad_(True) for nm in names}
    get = leaves.get
    write = torch.ones_like(leaves["beta"]) if "beta" in leaves else None
    o, s = sequential_scan(get("k"), get("v"), q=get("q"), beta=get("beta"), write=write, log_gate=get("g"),
                           initial_state=get("h0"), readout="before" if before else "after", gate_first=True)
    loss = (s * dh_final.double()).sum()
    if o is not None:
        loss = loss + (o * do.double()).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[nm] for nm in names])))
    return tuple(grads.get(nm) for nm in ("k", "v", "q", "beta", "g", "h0"))


def assert_grads_close(got, want, tol=1e-4):
    names = ("dk", "dv", "dq", "dbeta", "dg", "dh0")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a is not None and a.shape == b.shape and a.dtype == torch.float32, (name, a, b.shape)
        scale = max(1.0, b.abs().max().item())
        err = (a.double() - b).abs().max().item()
        assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def run_case(kind, T, C, dk, dv, before=False, with_q=True, h0=True, seed=0, gate_scale=1.0):
    x = make_inputs(kind, T, dk, dv, with_q=with_q, seed=seed, gate_scale=gate_scale)
    if not h0:
        x["h0"] = None
    gen = Draws(seed + 1)
    do = gen.randn(N, T, dv) if with_q else None
    dh_final = gen.randn(N, dk, dv)
    h0_ = x["h0"] if h0 else torch.zeros(N, dk, dv)
    _, _, H, Vp, W, Tm = chunk_intermediates(x["k"], x["v"], x["q"], x["beta"], x["g"], h0_, C, before)
    f32 = lambda t: t.float()  # noqa: E731
    got = chunk_backward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], f32(H), f32(Vp), f32(W), f32(Tm),
                         do, dh_final, C, before)
    assert_grads_close(got, reference_grads(x, do, dh_final, before))


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_intermediates_match_sequential(kind):
    """The test's own chunk forward (source of H, V', W, Tm) is the scan it claims to be."""
    x = make_inputs(kind, 37, 16, 24)
    for before in (False, True):
        o, s, *_ = chunk_intermediates(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], 16, before)
        wb = torch.ones_like(x["beta"]) if x["beta"] is not None else None
        d = lambda t: None if t is None else t.double()  # noqa: E731
        o_ref, s_ref = sequential_scan(d(x["k"]), d(x["v"]), q=d(x["q"]), beta=d(x["beta"]), write=d(wb),
                                       log_gate=d(x["g"]), initial_state=d(x["h0"]),
                                       readout="before" if before else "after", gate_first=True)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize("readout", ["after", "before"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunk16_tail(kind, readout):
    """T = 70 = 4 chunks of 16 and a masked tail of 6; nonzero h0 (dh0 checked)."""
    run_case(kind, T=70, C=16, dk=16, dv=32, before=readout == "before")


@pytest.mark.parametrize("readout", ["after", "before"])
@pytest.mark.parametrize("kind", ["decay", "decay_channel", "gated_delta", "kda"])
def test_slow_gates(kind, readout):
    """Gates near 1 (g = -0.05 softplus(randn)): with realistic gates a chunk's decay
    exp(G_L) is ~e^-10, so the inter-chunk gate paths (D dHn, dG_L) barely matter; here they do."""
    run_case(kind, T=50, C=16, dk=16, dv=16, before=readout == "before", gate_scale=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_chunk32_dk_gt_dv(kind):
    run_case(kind, T=45, C=32, dk=32, dv=16)


@pytest.mark.parametrize("kind", ["decay_channel", "gated_delta"])
def test_chunk64(kind, uncapped_chunk):
    run_case(kind, T=70, C=64, dk=16, dv=16, before=True)


@pytest.mark.parametrize("kind", KINDS)
def test_shorter_than_one_chunk(kind):
    """T < C: a single, mostly padded chunk; head dims that are not powers of two."""
    run_case(kind, T=11, C=16, dk=20, dv=24, before=True)


@pytest.mark.parametrize("kind", KINDS)
def test_no_queries(kind):
    """No q (so do=None): only the final state's gradient flows; h0 absent -> dh0 None."""
    run_case(kind, T=40, C=16, dk=24, dv=20, with_q=False, h0=False)


@pytest.mark.parametrize("kind", ["decay_channel", "gated_delta"])
def test_several_value_blocks(kind, monkeypatch):
    """dv split over several blocks (the states grid / the grads kernel's dv loop), the last partial."""
    blocks = backward.kernel_blocks
    monkeypatch.setattr(backward, "kernel_blocks", lambda *a: dataclasses.replace(blocks(*a), BV=16))
    run_case(kind, T=33, C=16, dk=16, dv=40)


@pytest.mark.parametrize("readout", ["after", "before", "no queries"])
@pytest.mark.parametrize("kind", KINDS)
def test_several_key_blocks(kind, readout, monkeypatch):
    """The grads kernel and the WY gradient kernel's key side over several channel blocks (16 of
    dk = 40, the last partial), as on a GPU: a scalar gate's dg summed over them."""
    blocks = backward.kernel_blocks
    monkeypatch.setattr(backward, "kernel_blocks", lambda *a: dataclasses.replace(blocks(*a), BKC=16, BKD=16))
    monkeypatch.setattr(backward, "_grads_key_block", lambda *a: 16)
    run_case(kind, T=37, C=16, dk=40, dv=24, before=readout == "before", with_q=readout != "no queries")


@pytest.mark.parametrize("kind", ["additive", "gated_delta", "kda"])
def test_half_precision_inputs_are_upcast(kind, monkeypatch):
    """bf16 k/v/q are loaded and cast in-kernel (computed here with fp32 dots): gradients are those
    of the rounded values, dk, dv and dq returned in bf16 (within two bf16 roundings at the
    gradient's scale: a partial sum that one kernel stores and another adds to is rounded too, dk
    with beta and dv without, as fla's dk is), dbeta, dg and dh0 in fp32."""
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "ieee")
    x = make_inputs(kind, 30, 16, 16)
    for nm in ("k", "v", "q"):
        x[nm] = x[nm].bfloat16()
    gen = Draws(5)
    do, dh_final = gen.randn(N, 30, 16), gen.randn(N, 16, 16)
    _, _, H, Vp, W, Tm = chunk_intermediates(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], 16, False)
    got = chunk_backward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], H.float(), Vp.float(), W.float(),
                         Tm.float(), do, dh_final, 16, False)
    want = reference_grads(x, do, dh_final, False)
    assert [g.dtype for g in got[:3]] == [torch.bfloat16] * 3
    for name, a, b in zip(("dk", "dv", "dq"), got[:3], want[:3]):
        assert (a.double() - b).abs().max() <= 2 ** -7 * b.abs().max(), name
    assert_grads_close((None,) * 3 + got[3:6], (None,) * 3 + want[3:], tol=low_precision_kernel_tol(1e-4))


@pytest.mark.parametrize("kind,before", [("gated_delta", False), ("decay_channel", True), ("decay", False),
                                         ("kda", True)])
def test_chained_with_chunk_forward(kind, before):
    """chunk_forward's H, V', W, Tm feed chunk_backward directly."""
    T, C, dk, dv = 37, 16, 16, 24
    x = make_inputs(kind, T, dk, dv)
    gen = Draws(3)
    do, dh_final = gen.randn(N, T, dv), gen.randn(N, dk, dv)
    o, h_final, H, Vp, W, Tm = chunk_forward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], C, before)
    got = chunk_backward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], H, Vp, W, Tm, do, dh_final, C, before)
    assert_grads_close(got, reference_grads(x, do, dh_final, before))
