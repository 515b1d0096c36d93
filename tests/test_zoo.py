"""The zoo: every naive spelling computes its family's math, and the hand-written
chunkwise references agree with the naive loops.

The oracle below is written from MATH.md alone (explicit matrices, fp64, one
sequential loop), independent of every spelling in the zoo:

    S_t = Diag(a_t) (I - b_t k_t k_t^T) S_{t-1} + c_t k_t v_t^T
    o_t = S_t^T q_t   (or S_{t-1}^T q_t for readout "before")

except KDA, whose per-channel gate acts first: S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + ...
"""
from __future__ import annotations

import inspect
import itertools
import re
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from nlcompile.zoo import LAYERS, MODELS, canonical_inputs, from_time_dim
from nlcompile.zoo import reference as R
from nlcompile.zoo.inputs import to_time_dim

KINDS = {"additive", "decay", "delta", "gated_delta"}


# --------------------------------------------------------------------------- helpers
def run(entry, args, want_state=True):
    """(o, final_state) of ``entry.fn`` in the canonical layouts ([B, H, T, D], [.., dk, dv])."""
    kwargs = {entry.state_kwarg: True} if (want_state and entry.state_kwarg) else {}
    out = entry.fn(*args, **kwargs)
    o, S = out if isinstance(out, tuple) else (out, None)
    o = from_time_dim(o, entry.time_dim)
    if S is not None and entry.state_layout == "vk":
        S = S.transpose(-1, -2)
    return o, S


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def groups():
    """Spellings that must compute the same function, keyed by (family, variant, readout)."""
    g = defaultdict(list)
    for e in MODELS.values():
        g[(e.family, e.variant, e.readout)].append(e)
    return g


# --------------------------------------------------------------------------- oracle
def _oracle_terms(family, variant, c):
    """Per-step (q, k, v, a, b, c) from MATH.md, all fp64, [B, H, T, ...]."""
    c = {n: x.double() for n, x in c.items()}
    if family == "mamba2":
        q, k, v = c["C"], c["B"], c["x"] * c["dt"][..., None]
        return q, k, v, torch.exp(c["dt"] * c["A"][:, None]), None, None
    q, k, v = c["q"], c["k"], c["v"]
    dk = q.shape[-1]
    B, H, T = q.shape[:3]
    if family == "linear_attention":
        return q * dk ** -0.5, k, v, None, None, None
    if family == "retnet":
        gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)
        return q, k * dk ** -0.5, v, gamma[None, :, None].expand(B, H, T), None, None
    a = torch.exp(c["g"]) if "g" in c else None
    b = c.get("beta")
    write = b
    if variant == "gate_after":
        write = a * b
    return q * dk ** -0.5, k, v, a, b, write


def oracle(family, variant, readout, c):
    """The sequential form of MATH.md, with explicit (dk x dk) transition matrices."""
    if variant == "normalized":
        return oracle_normalized(c)
    q, k, v, a, b, w = _oracle_terms(family, variant, c)
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    eye = torch.eye(dk, dtype=torch.float64)
    S = torch.zeros(B, H, dk, dv, dtype=torch.float64)
    outs = []
    for t in range(T):
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]            # column vectors
        M = eye.expand(B, H, dk, dk)
        if b is not None:
            M = M - b[:, :, t, None, None] * (kt @ kt.transpose(-1, -2))
        if a is not None:
            decay = a[:, :, t]
            if family == "kda":                                      # M Diag(a): decay first
                M = M * decay[..., None, :]
            else:
                M = (decay[..., None] if decay.ndim == 3 else decay[..., None, None]) * M
        write = 1.0 if w is None else w[:, :, t, None, None]
        S_prev = S
        S = M @ S + write * (kt @ vt.transpose(-1, -2))
        S_read = S_prev if readout == "before" else S
        outs.append((S_read.transpose(-1, -2) @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outs, dim=2), S


def oracle_normalized(c):
    phi = lambda x: F.elu(x.double()) + 1  # noqa: E731
    q, k, v = phi(c["q"]), phi(c["k"]), c["v"].double()
    B, H, T, dk = q.shape
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, dk, dtype=torch.float64)
    outs = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        num = (S * q[:, :, t, :, None]).sum(-2)
        outs.append(num / ((z * q[:, :, t]).sum(-1, keepdim=True) + 1e-6))
    return torch.stack(outs, dim=2), None


# --------------------------------------------------------------------------- registry shape
def test_registry_covers_the_brief():
    fams = defaultdict(list)
    for name, e in MODELS.items():
        assert e.name == name and e.kind in KINDS and e.readout in ("after", "before")
        assert e.state_layout in ("kv", "vk") and e.time_dim in (0, 1, 2)
        fams[e.family].append(e)
    assert set(fams) == {"linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet",
                         "kda"}
    for fam, es in fams.items():
        assert len(es) >= 2, fam
        assert {e.time_dim for e in es} >= {1, 2}, fam          # both [B,T,H,D] and [B,H,T,D]
    assert any(e.time_dim == 0 for e in MODELS.values())
    assert {e.state_layout for e in MODELS.values()} == {"kv", "vk"}
    assert any(e.readout == "before" for e in MODELS.values())
    assert any(e.returns_state for e in MODELS.values())


def test_sources_have_per_token_loops_and_no_item():
    for e in MODELS.values():
        src = inspect.getsource(e.fn)
        assert re.search(r"for \w+ in range\(T\):", src), e.name
        assert ".item(" not in src and "if S" not in src, e.name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_make_inputs_layout(name):
    e = MODELS[name]
    args = e.make_inputs(B=2, H=3, T=5, D=4, Dv=6)
    assert args[0].shape[e.time_dim] == 5
    again = e.make_inputs(B=2, H=3, T=5, D=4, Dv=6)
    assert all(torch.equal(x, y) for x, y in zip(args, again))
    out = e.fn(*args)
    if e.returns_state:
        assert isinstance(out, tuple) and isinstance(out[1], torch.Tensor)


# --------------------------------------------------------------------------- spellings agree
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_spellings_of_a_family_agree(T, dtype, tol):
    for key, entries in groups().items():
        if len(entries) < 2:
            continue
        results = [run(e, e.make_inputs(B=2, H=3, T=T, D=8, Dv=5, dtype=dtype, seed=T)) for e in entries]
        o0, S0 = results[0]
        for e, (o, S) in zip(entries[1:], results[1:]):
            assert o.shape == o0.shape and o.dtype == dtype, (key, e.name)
            assert rel(o, o0) <= tol, (key, e.name, rel(o, o0))
            if S is not None and S0 is not None:
                assert rel(S, S0) <= tol, (key, e.name, "state")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spelling_matches_oracle(name):
    e = MODELS[name]
    for T in (1, 6):
        args = e.make_inputs(B=2, H=3, T=T, D=4, Dv=3, dtype=torch.float64, seed=1)
        o, S = run(e, args)
        c = canonical_inputs(e.family, B=2, H=3, T=T, D=4, Dv=3, dtype=torch.float64, seed=1)
        o_ref, S_ref = oracle(e.family, e.variant, e.readout, c)
        assert rel(o, o_ref) <= 1e-12, (name, T)
        if S is not None:
            assert S.shape == S_ref.shape and rel(S, S_ref) <= 1e-12, (name, T)


def test_readout_before_differs_from_after():
    c = canonical_inputs("linear_attention", T=5, dtype=torch.float64)
    before, _ = oracle("linear_attention", "standard", "before", c)
    after, _ = oracle("linear_attention", "standard", "after", c)
    assert before[:, :, 0].abs().max() == 0 and rel(before, after) > 1e-2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_inputs_keep_dtype(name):
    e = MODELS[name]
    o, _ = run(e, e.make_inputs(T=9, D=8, dtype=torch.bfloat16))
    o64, _ = run(e, e.make_inputs(T=9, D=8, dtype=torch.float64))
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    assert rel(o, o64) < 5e-2, name


# --------------------------------------------------------------------------- chunkwise references
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_matches_naive(name, dtype, tol):
    e = MODELS[name]
    for T in (1, 7, 64, 100):
        args = e.make_inputs(B=1, H=2, T=T, D=8, Dv=6, dtype=dtype, seed=T)
        o, S = run(e, args)
        for C in (16, 64):
            o_ref, S_ref = e.reference(*args, chunk_size=C)
            o_ref = from_time_dim(o_ref, e.time_dim)
            assert o_ref.dtype == dtype and rel(o_ref, o) <= tol, (name, T, C, rel(o_ref, o))
            if S is not None:
                S_ref = S_ref.transpose(-1, -2) if e.state_layout == "vk" else S_ref
                assert rel(S_ref, S) <= tol, (name, T, C, "state")


def _strong(shape, gen):
    return -4 * F.softplus(torch.randn(*shape, generator=gen))


@pytest.mark.parametrize("C", [16, 64])
def test_chunk_gla_strong_gates_no_nan(C):
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 100, 16
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    g = _strong((B, H, T, D), gen)
    o, S = R.chunk_gla(q, k, v, g, chunk_size=C)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    o_n, S_n = MODELS["gla_naive_bhtd"].fn(q, k, v, g, output_final_state=True)
    assert rel(o, o_n) <= 1e-4 and rel(S, S_n) <= 1e-4
    o_s, _ = R.chunk_simple_gla(q, k, v, g[..., 0], chunk_size=C)
    assert torch.isfinite(o_s).all()
    kn = F.normalize(k, dim=-1)
    beta = torch.rand(B, H, T, generator=gen)
    o_d, _ = R.chunk_gated_delta_rule(q, kn, v, g[..., 0], beta, C)
    assert torch.isfinite(o_d).all()
    o_k, S_k = R.chunk_kda(q, kn, v, g, beta, C)
    assert torch.isfinite(o_k).all() and torch.isfinite(S_k).all()
    o_n, S_n = MODELS["kda_fla"].fn(q, kn, v, g, beta, output_final_state=True)
    assert rel(o_k, o_n) <= 1e-4 and rel(S_k, S_n) <= 1e-4


@pytest.mark.parametrize("name", ["linear_attention_einsum", "retnet_recurrent", "mamba2_scan_bhtd",
                                  "gla_naive_bhtd", "deltanet_fla", "gated_deltanet_fla", "kda_fla"])
def test_reference_gradients_match_naive(name):
    e = MODELS[name]
    args = [a.requires_grad_(True) for a in e.make_inputs(B=1, H=2, T=21, D=4, dtype=torch.float64)]
    o, _ = run(e, args, want_state=False)
    o_ref, _ = e.reference(*args, chunk_size=8)
    w = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((o * w).sum(), args)
    grads_ref = torch.autograd.grad((from_time_dim(o_ref, e.time_dim) * w).sum(), args)
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g_ref, g) <= 1e-10, name


_WITH_INITIAL_STATE = [
    ("linear_attention_einsum", R.chunk_linear_attention, ("q", "k", "v")),
    ("gla_naive_bhtd", R.chunk_gla, ("q", "k", "v", "g")),
    ("deltanet_fla", R.chunk_delta_rule, ("q", "k", "v", "beta")),
    ("gated_deltanet_fla", R.chunk_gated_delta_rule, ("q", "k", "v", "g", "beta")),
    ("kda_fla", R.chunk_kda, ("q", "k", "v", "g", "beta")),
]


@pytest.mark.parametrize("name,chunk_fn,keys", _WITH_INITIAL_STATE)
def test_reference_initial_state(name, chunk_fn, keys):
    e = MODELS[name]
    c = canonical_inputs(e.family, B=1, H=2, T=21, D=8, Dv=4, dtype=torch.float64, seed=3)
    S0 = torch.randn(1, 2, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    args = [c[k] for k in keys]
    o, S = e.fn(*args, initial_state=S0, output_final_state=True)
    o_ref, S_ref = chunk_fn(*args, chunk_size=8, initial_state=S0)
    assert rel(o_ref, o) <= 1e-10 and rel(S_ref, S) <= 1e-10


def _kda_loop(q, k, v, g, beta, S0=None):
    """The KDA formula token by token, fp64: S = (I - b k k^T) Diag(exp g) S + b k v^T,
    o = S^T (q / sqrt(dk))."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, H, T, dk = q.shape
    S = torch.zeros(B, H, dk, v.shape[-1], dtype=torch.float64) if S0 is None else S0.double()
    eye = torch.eye(dk, dtype=torch.float64)
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, :, t, :, None], v[:, :, t, :, None], beta[:, :, t, None, None]
        S = (eye - bt * kt @ kt.transpose(-1, -2)) @ (torch.exp(g[:, :, t])[..., None] * S) \
            + bt * kt @ vt.transpose(-1, -2)
        outs.append(S.transpose(-1, -2) @ (q[:, :, t, :, None] * dk ** -0.5))
    return torch.cat(outs, dim=-1).transpose(-1, -2), S


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_kda_matches_per_token_formula(dtype, with_state):
    for T in (1, 7, 70):
        c = canonical_inputs("kda", B=2, H=2, T=T, D=8, Dv=5, dtype=dtype, seed=T)
        assert (c["g"] < 0).all() and c["g"].min() < -1          # realistic, not near zero
        S0 = torch.randn(2, 2, 8, 5, generator=torch.Generator().manual_seed(T)).to(dtype) \
            if with_state else None
        args = (c["q"], c["k"], c["v"], c["g"], c["beta"])
        o_ref, S_ref = _kda_loop(*args, S0=S0)
        for C in (16, 64):
            o, S = R.chunk_kda(*args, chunk_size=C, initial_state=S0)
            assert o.dtype == dtype and o.shape == o_ref.shape and S.shape == S_ref.shape
            assert rel(o, o_ref) <= 1e-5, (T, C, rel(o, o_ref))
            assert rel(S, S_ref) <= 1e-5, (T, C, "state", rel(S, S_ref))


def test_readout_before_helper_on_decay():
    c = canonical_inputs("gla", B=1, H=2, T=19, D=4, dtype=torch.float64)
    o, S = R.readout_before(R.chunk_gla, c["q"], c["k"], c["v"], c["g"], chunk_size=8)
    o_ref, S_ref = oracle("gla", "standard", "before", c)
    assert rel(o, o_ref) <= 1e-10 and rel(S, S_ref) <= 1e-10


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_deterministic(name):
    le = LAYERS[name]
    x, = le.make_inputs(B=2, T=9, d_model=32)
    m1 = le.make_module(seed=7, d_model=32, n_heads=2, head_dim=8)
    m2 = le.make_module(seed=7, d_model=32, n_heads=2, head_dim=8)
    m3 = le.make_module(seed=8, d_model=32, n_heads=2, head_dim=8)
    state = torch.get_rng_state()
    y1, y2, y3 = m1(x), m2(x), m3(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert y1.shape == x.shape and torch.isfinite(y1).all()
    assert torch.equal(y1, y2) and not torch.allclose(y1, y3)
    # causal: the first outputs do not see later tokens
    x2 = x.clone()
    x2[:, 5:] = torch.randn_like(x2[:, 5:])
    assert torch.allclose(m1(x2)[:, :5], y1[:, :5], atol=1e-6)


# --------------------------------------------------------------------------- traceable
@pytest.mark.parametrize("name", sorted(MODELS))
def test_spelling_traces_with_make_fx(name):
    """No data-dependent branches: the functionalised trace succeeds and replays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    e = MODELS[name]
    args = e.make_inputs(B=1, H=2, T=3, D=4)
    gm = make_fx(torch.func.functionalize(lambda *a: e.fn(*a)))(*args)
    want = e.fn(*args)
    got = gm(*args)
    flat_w = [w for w in (want if isinstance(want, tuple) else (want,)) if w is not None]
    flat_g = [g for g in (got if isinstance(got, (tuple, list)) else (got,)) if g is not None]
    assert all(torch.allclose(a, b) for a, b in zip(flat_g, flat_w))


def test_layout_helpers_roundtrip():
    x = torch.randn(2, 3, 5, 4)
    for d in (0, 1, 2):
        y = to_time_dim(x, d)
        assert y.shape[d] == 5 and torch.equal(from_time_dim(y, d), x)
    for a, b in itertools.permutations(range(3), 2):
        assert to_time_dim(x, a).shape != to_time_dim(x, b).shape
