"""The ``torch`` target's recurrence kernels: chunkwise_scan == sequential_scan.

Every kind of the update rule S_t = diag(a_t)(I - b_t k_t k_t^T) S_{t-1} + w_t k_t v_t^T
is checked in fp64 (relative error <= 1e-10) and fp32 (<= 1e-4), for both
readouts, with and without queries and an initial state, at lengths that are
shorter than, equal to and not a multiple of the chunk.  The oracle itself is
pinned against a hand-written loop.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from nlcompile.targets import scan as scan_mod
from nlcompile.targets.scan import choose_chunk_size, chunkwise_scan, sequential_scan

N, DK, DV = 3, 8, 5
LENGTHS = (1, 5, 16, 37, 100)
CHUNKS = (4, 16, 64)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _signed_gate(shape, gen, dtype):
    """Gate factors in (-1, 1) with exact zeros and negatives (resets, sign flips)."""
    g = torch.rand(shape, generator=gen, dtype=dtype) * 0.5 + 0.5
    g[torch.rand(shape, generator=gen) < 0.1] = 0.0
    flip = torch.rand(shape, generator=gen) < 0.2
    return torch.where(flip, -g, g)


def _strong_log_gate(shape, gen, dtype):
    return -4 * F.softplus(torch.randn(shape, generator=gen, dtype=dtype))


def _kind_args(kind: str, t: int, gen: torch.Generator, dtype) -> dict:
    """Keyword arguments (beta / write / gate / log_gate) for one kind of rule."""
    scalar, channel = (N, t), (N, t, DK)
    beta = lambda: torch.rand(scalar, generator=gen, dtype=dtype)  # noqa: E731
    return {
        "additive": lambda: {},
        "additive_write": lambda: {"write": torch.randn(scalar, generator=gen, dtype=dtype)},
        "decay": lambda: {"gate": torch.rand(scalar, generator=gen, dtype=dtype) * 0.3 + 0.7},
        "decay_signed": lambda: {"gate": _signed_gate(scalar, gen, dtype)},
        "decay_log": lambda: {"log_gate": _strong_log_gate(scalar, gen, dtype)},
        "channel": lambda: {"gate": torch.rand(channel, generator=gen, dtype=dtype) * 0.3 + 0.7},
        "channel_signed": lambda: {"gate": _signed_gate(channel, gen, dtype)},
        "channel_log": lambda: {"log_gate": _strong_log_gate(channel, gen, dtype)},
        "channel_growth": lambda: {"gate": torch.rand(channel, generator=gen, dtype=dtype) * 0.4 + 0.8},
        "delta": lambda: {"beta": beta()},
        "gated_delta": lambda: {"beta": beta(), "gate": _signed_gate(scalar, gen, dtype)},
        "gated_delta_log": lambda: {"beta": beta(), "log_gate": _strong_log_gate(scalar, gen, dtype)},
        "delta_write": lambda: {"beta": beta(), "write": torch.randn(scalar, generator=gen, dtype=dtype)},
        # per-key-channel gate applied before the delta step (Kimi Delta Attention)
        "kda": lambda: {"beta": beta(), "gate": torch.rand(channel, generator=gen, dtype=dtype) * 0.3 + 0.7,
                        "gate_first": True},
        "kda_signed": lambda: {"beta": beta(), "gate": _signed_gate(channel, gen, dtype), "gate_first": True},
        "kda_log": lambda: {"beta": beta(), "log_gate": _strong_log_gate(channel, gen, dtype), "gate_first": True},
    }[kind]()


KINDS = (
    "additive",
    "additive_write",
    "decay",
    "decay_signed",
    "decay_log",
    "channel",
    "channel_signed",
    "channel_log",
    "channel_growth",
    "delta",
    "gated_delta",
    "gated_delta_log",
    "delta_write",
    "kda",
    "kda_signed",
    "kda_log",
)


def _problem(kind: str, t: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(N, t, DK, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(N, t, DV, generator=gen, dtype=dtype)
    q = torch.randn(N, t, DK, generator=gen, dtype=dtype)
    s0 = torch.randn(N, DK, DV, generator=gen, dtype=dtype)
    return k, v, q, s0, _kind_args(kind, t, gen, dtype)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("readout", ["after", "before"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunkwise_matches_sequential(kind, readout, t, dtype):
    k, v, q, s0, kw = _problem(kind, t, dtype)
    for with_q in (True, False):
        for init in (s0, None):
            ref_o, ref_s = sequential_scan(k, v, q=q if with_q else None, initial_state=init, readout=readout, **kw)
            for c in CHUNKS:
                o, s = chunkwise_scan(
                    k, v, q=q if with_q else None, initial_state=init, readout=readout, chunk_size=c, **kw
                )
                where = f"{kind} {readout} T={t} C={c} q={with_q} init={init is not None}"
                assert s.dtype == dtype and s.shape == (N, DK, DV), where
                assert torch.isfinite(s).all(), where
                assert _rel(s, ref_s) <= TOL[dtype], f"state: {where}: {_rel(s, ref_s):.2e}"
                if not with_q:
                    assert o is None, where
                    continue
                assert o.dtype == dtype and o.shape == (N, t, DV), where
                assert torch.isfinite(o).all(), where
                assert _rel(o, ref_o) <= TOL[dtype], f"output: {where}: {_rel(o, ref_o):.2e}"


@pytest.mark.parametrize("kind", ["delta", "gated_delta_log", "channel_log", "decay_signed"])
def test_low_precision_inputs_stay_within_eager_error(kind):
    """bf16 inputs: our fp32-state result is no further from the fp64 truth than
    a per-token loop on the same bf16-rounded inputs with an fp32 state (slack 4x,
    plus 5e-7 of the output scale, a few fp32 ulps, for the rounding floor)."""
    k, v, q, s0, kw = _problem(kind, 300, torch.float32, seed=1)
    low = [x.to(torch.bfloat16) for x in (k, v, q, s0)]
    low_kw = {name: x.to(torch.bfloat16) for name, x in kw.items()}
    up = lambda x: x.double()  # noqa: E731
    truth_o, truth_s = sequential_scan(*map(up, low[:2]), q=up(low[2]), initial_state=up(low[3]),
                                       **{n: up(x) for n, x in low_kw.items()})
    eager_o, eager_s = sequential_scan(low[0], low[1], q=low[2], initial_state=low[3], **low_kw)
    ours_o, ours_s = chunkwise_scan(low[0], low[1], q=low[2], initial_state=low[3], chunk_size=32, **low_kw)
    assert ours_o.dtype == torch.float32 and ours_s.dtype == torch.float32
    assert _rel(ours_o, truth_o) <= 4 * _rel(eager_o, truth_o) + 5e-7
    assert _rel(ours_s, truth_s) <= 4 * _rel(eager_s, truth_s) + 5e-7


@pytest.mark.parametrize("readout", ["after", "before"])
def test_strong_per_channel_decay_is_finite_at_chunk_64(readout):
    """Folding exp(+-G) over a whole chunk overflows here; the halving scheme must not."""
    gen = torch.Generator().manual_seed(2)
    n, t, dk, dv = 4, 256, 32, 16
    k = torch.randn(n, t, dk, generator=gen)
    v = torch.randn(n, t, dv, generator=gen)
    q = torch.randn(n, t, dk, generator=gen)
    log_gate = -8 * F.softplus(torch.randn(n, t, dk, generator=gen))
    o, s = chunkwise_scan(k, v, q=q, log_gate=log_gate, readout=readout, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    ref_o, ref_s = sequential_scan(k.double(), v.double(), q=q.double(), log_gate=log_gate.double(), readout=readout)
    assert _rel(o, ref_o) <= 1e-4 and _rel(s, ref_s) <= 1e-4


def test_sequential_scan_matches_a_hand_written_loop():
    """Pin the oracle: S_t = diag(a_t)(I - b_t k_t k_t^T) S_{t-1} + w_t k_t v_t^T, one matrix at a time."""
    gen = torch.Generator().manual_seed(3)
    t, dt = 7, torch.float64
    k = torch.randn(2, t, 3, generator=gen, dtype=dt)
    v = torch.randn(2, t, 2, generator=gen, dtype=dt)
    q = torch.randn(2, t, 3, generator=gen, dtype=dt)
    beta = torch.rand(2, t, generator=gen, dtype=dt)
    write = torch.randn(2, t, generator=gen, dtype=dt)
    gate = torch.rand(2, t, 3, generator=gen, dtype=dt)
    s0 = torch.randn(2, 3, 2, generator=gen, dtype=dt)
    for readout in ("after", "before"):
        o, s = sequential_scan(k, v, q=q, beta=beta, write=write, gate=gate, initial_state=s0, readout=readout)
        expected_o = torch.empty_like(o)
        for n in range(2):
            state = s0[n].clone()
            for i in range(t):
                kk = k[n, i].reshape(3, 1)
                prev = state
                state = torch.diag(gate[n, i]) @ (torch.eye(3, dtype=dt) - beta[n, i] * kk @ kk.T) @ state
                state = state + write[n, i] * kk @ v[n, i].reshape(1, 2)
                expected_o[n, i] = (prev if readout == "before" else state).T @ q[n, i]
            torch.testing.assert_close(s[n], state, rtol=0, atol=1e-12)
        torch.testing.assert_close(o, expected_o, rtol=0, atol=1e-12)


def test_odd_chunk_sizes_and_padding():
    """Chunk sizes that are not powers of two (rounded down for per-channel gates)."""
    for kind in ("gated_delta", "channel_log", "additive"):
        k, v, q, s0, kw = _problem(kind, 23, seed=4)
        ref_o, ref_s = sequential_scan(k, v, q=q, initial_state=s0, **kw)
        for c in (1, 3, 6, 200):
            o, s = chunkwise_scan(k, v, q=q, initial_state=s0, chunk_size=c, **kw)
            assert _rel(o, ref_o) <= 1e-10 and _rel(s, ref_s) <= 1e-10, (kind, c)


def test_inputs_are_not_modified_and_errors_are_clear():
    k, v, q, s0, kw = _problem("gated_delta", 20)
    before = [x.clone() for x in (k, v, q, s0, *kw.values())]
    chunkwise_scan(k, v, q=q, initial_state=s0, chunk_size=8, **kw)
    for x, y in zip((k, v, q, s0, *kw.values()), before):
        assert torch.equal(x, y)
    with pytest.raises(NotImplementedError, match="per-key-channel"):
        chunkwise_scan(k, v, beta=kw["beta"], gate=torch.rand(N, 20, DK, dtype=k.dtype))
    with pytest.raises(ValueError, match="at most one"):
        chunkwise_scan(k, v, gate=kw["gate"], log_gate=kw["gate"])
    with pytest.raises(ValueError, match="readout"):
        chunkwise_scan(k, v, readout="during")
    with pytest.raises(ValueError, match="beta"):
        chunkwise_scan(k, v, beta=kw["beta"][:, :5])


def test_choose_chunk_size_is_a_cached_power_of_two(monkeypatch):
    """A bounded measurement (a warm-up and a few rounds of each of the 3 candidates, on at most one
    segment of tokens), then a cache hit that runs nothing."""
    gen = torch.Generator().manual_seed(5)
    for t, expected in ((1, 1), (5, 8), (100, 64)):
        k = torch.randn(2, t, 16, generator=gen)
        assert choose_chunk_size(k, torch.randn(2, t, 16, generator=gen)) == expected
    k = F.normalize(torch.randn(2, 3000, 16, generator=gen), dim=-1)
    v = torch.randn(2, 3000, 16, generator=gen)
    beta = torch.rand(2, 3000, generator=gen)
    scanned = []
    real_scan = scan_mod.chunkwise_scan
    monkeypatch.setattr(scan_mod, "chunkwise_scan",
                        lambda k, v, **kw: scanned.append((k.shape[1], kw["chunk_size"])) or real_scan(k, v, **kw))
    scan_mod._CHUNK_CACHE.clear()
    c = choose_chunk_size(k, v, beta=beta, q=k)
    assert c in (16, 32, 64)
    assert len(scan_mod._CHUNK_CACHE) == 1
    probe = scan_mod._PROBE_T
    assert probe < 3000
    assert sorted(scanned) == sorted([(probe, c) for c in (16, 32, 64)] * (2 + scan_mod._ROUNDS))
    scanned.clear()
    assert choose_chunk_size(k, v, beta=beta, q=k) == c
    longer = torch.cat([k, k], 1)  # times the same probe: shares the entry
    assert choose_chunk_size(longer, torch.cat([v, v], 1), beta=torch.cat([beta, beta], 1), q=longer) == c
    assert scanned == []


@pytest.mark.parametrize("kind", ["gated_delta_log", "delta_write", "channel_log", "decay_signed", "kda_log",
                                  "kda_signed"])
def test_gradients_match_sequential(kind):
    """The chunkwise program is differentiable and has the sequential loop's gradients."""
    k, v, q, s0, kw = _problem(kind, 21, seed=6)
    flags = {name: kw.pop(name) for name in list(kw) if isinstance(kw[name], bool)}
    inputs = {"k": k, "v": v, "q": q, "initial_state": s0, **kw}
    for x in inputs.values():
        x.requires_grad_(True)
    gen = torch.Generator().manual_seed(7)
    probe_o = torch.randn(N, 21, DV, generator=gen, dtype=k.dtype)
    probe_s = torch.randn(N, DK, DV, generator=gen, dtype=k.dtype)

    def grads(fn, **extra):
        o, s = fn(readout="before", **inputs, **extra)
        return torch.autograd.grad((o * probe_o).sum() + (s * probe_s).sum(), list(inputs.values()))

    ref = grads(sequential_scan, **flags)
    ours = grads(chunkwise_scan, chunk_size=8, **flags)
    for name, g, r in zip(inputs, ours, ref):
        assert _rel(g, r) <= 1e-9, f"d/d{name}: {_rel(g, r):.2e}"


@pytest.mark.parametrize("readout", ["after", "before"])
@pytest.mark.parametrize("kind", ["additive", "delta", "gated_delta_log", "channel_log", "decay_signed", "kda_log"])
def test_long_sequences_run_in_passes_exactly(kind, readout, monkeypatch):
    """Past SEGMENT_TOKENS steps the scan runs pass after pass carrying the state."""
    monkeypatch.setattr(scan_mod, "SEGMENT_TOKENS", 16)
    k, v, q, s0, kw = _problem(kind, 100)
    ref_o, ref_s = sequential_scan(k, v, q=q, initial_state=s0, readout=readout, **kw)
    for c in (4, 8):
        o, s = chunkwise_scan(k, v, q=q, initial_state=s0, readout=readout, chunk_size=c, **kw)
        assert _rel(o, ref_o) <= 1e-10 and _rel(s, ref_s) <= 1e-10, (c, _rel(o, ref_o), _rel(s, ref_s))
    _, s = chunkwise_scan(k, v, initial_state=s0, readout=readout, chunk_size=8, **kw)
    assert _rel(s, ref_s) <= 1e-10


@pytest.mark.parametrize("kind", ["delta", "gated_delta_log", "kda_log"])
@pytest.mark.parametrize("t", [5, 37])
def test_query_scale_is_applied_by_the_scan(kind, t):
    """``q_scale`` gives the results (and gradients) of scaling q first, in its chunk copy
    (tails included); the sequential reference takes it too."""
    k, v, q, s0, kw = _problem(kind, t, seed=8)
    q.requires_grad_(True)
    for readout in ("after", "before"):
        want_o, want_s = sequential_scan(k, v, q=q * 0.3, initial_state=s0, readout=readout, **kw)
        for scan, extra in ((chunkwise_scan, {"chunk_size": 16}), (sequential_scan, {})):
            o, s = scan(k, v, q=q, initial_state=s0, readout=readout, q_scale=0.3, **extra, **kw)
            assert _rel(o, want_o) <= 1e-10 and _rel(s, want_s) <= 1e-10
    (grad,) = torch.autograd.grad(chunkwise_scan(k, v, q=q, q_scale=0.3, chunk_size=16, **kw)[0].sum(), [q])
    (want,) = torch.autograd.grad(sequential_scan(k, v, q=q * 0.3, **kw)[0].sum(), [q])
    assert _rel(grad, want) <= 1e-10
    with pytest.raises(TypeError, match="q_scale must be a Python number"):
        chunkwise_scan(k, v, q=q, q_scale=torch.tensor(0.3), **kw)
