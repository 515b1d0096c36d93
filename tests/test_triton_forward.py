"""Forward Triton chunk kernels (``targets/triton/forward.py``) against the per-token scan.

``chunk_forward`` is compared with ``sequential_scan`` run in float64 on the
same inputs (beta=b, write=ones, log_gate=g, so the reference's v is the
already-scaled v).  Checked: the output o, the final state and H (the state
entering each chunk: H[:, i] equals the sequential state after i*C steps), for
every kind (additive, scalar decay, per-channel decay, delta, gated delta, and the delta rule
with a per-channel gate in the gate-first order, Kimi Delta Attention: "kda"),
both readouts, without queries, at lengths 1, shorter than, equal to and not a
multiple of the chunk, with dk != dv and non-power-of-two sizes, chunks 16, 32
and 64, bf16 inputs, growing gates (g > 0), strong decay and several value blocks.

fp32 tolerance: max |error| <= 1e-4 * max(1, max |reference|) per tensor.
bf16 inputs: the reference sees the same bf16-rounded values (upcast to
float64).  Their dots run in tf32 there (forced: in the CPU interpreter emulated, operands
truncated as an H100 does), within 1e-3; on a GPU 5e-3 (``_compare.low_precision_kernel_tol``).
Shapes stay small: the kernels run in the Triton interpreter on CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from _compare import low_precision_kernel_tol
from _draws import Draws
from test_triton_backward import chunk_intermediates
from nlcompile.targets.scan import sequential_scan
from nlcompile.targets.triton import forward as fwd
from nlcompile.targets.triton.common import (
    cdiv, round_to_tf32, tf32x3_emulated, truncate_to_tf32, unit_lower_inverse,
)
from nlcompile.targets.triton.forward import chunk_forward

N = 2
TOL = {torch.float32: 1e-4, torch.bfloat16: low_precision_kernel_tol(1e-3)}
KINDS = ("additive", "decay", "channel", "delta", "gated_delta", "kda")


def _inputs(kind: str, t: int, dk: int = 16, dv: int = 32, *, seed: int = 0, dtype=torch.float32,
            growth: bool = False, with_q: bool = True, with_h0: bool = True) -> dict:
    """Inputs of one kind: realistic log-gates -softplus(randn) (gates in (0, 1)), or small
    positive ones (gates > 1) with ``growth``; l2-normalised k and beta in (0, 1) for the delta family."""
    gen = Draws(seed)
    randn = gen.randn
    k, v, q = randn(N, t, dk), randn(N, t, dv), randn(N, t, dk)
    beta = g = None
    if kind in ("delta", "gated_delta", "kda"):
        k = F.normalize(k, dim=-1)
        beta = gen.rand(N, t) * 0.9 + 0.05
    if kind in ("decay", "gated_delta", "channel", "kda"):
        shape = (N, t) if kind not in ("channel", "kda") else (N, t, dk)
        g = 0.05 * gen.rand(*shape) if growth else -F.softplus(randn(*shape))
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return dict(k=cast(k), v=cast(v), q=cast(q) if with_q else None, beta=cast(beta), g=g,
                h0=randn(N, dk, dv) if with_h0 else None)


def _reference(x: dict, before: bool):
    """float64 sequential scan on the given inputs: (o or None, final state, scan(prefix) -> state).
    gate_first=True: the kernels' order (the same function unless the gate is per channel with beta)."""
    d = lambda y: None if y is None else y.double()  # noqa: E731

    def scan(length: int):
        cut = lambda y: None if y is None else d(y)[:, :length]  # noqa: E731
        write = None if x["beta"] is None else torch.ones(N, length, dtype=torch.float64)
        return sequential_scan(cut(x["k"]), cut(x["v"]), q=cut(x["q"]), beta=cut(x["beta"]), write=write,
                               log_gate=cut(x["g"]), initial_state=d(x["h0"]),
                               readout="before" if before else "after", gate_first=True)

    o, h = scan(x["k"].shape[1])
    return o, h, scan


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == torch.float32, (name, got.dtype)
    err = (got.double() - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def _check(x: dict, chunk: int, before: bool = False, tol: float | None = None):
    """Run chunk_forward and compare o, h_final and every H[:, i] with the float64 reference."""
    tol = TOL[x["k"].dtype] if tol is None else tol
    o, h_final, H, Vp, W, Tm = chunk_forward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], chunk, before)
    ref_o, ref_h, scan = _reference(x, before)
    t, dk, dv = x["k"].shape[1], x["k"].shape[2], x["v"].shape[2]
    nc = cdiv(t, chunk)
    if x["q"] is None:
        assert o.numel() == 0
    else:
        _assert_close("o", o, ref_o, tol)
    _assert_close("h_final", h_final, ref_h, tol)
    assert H.shape == (N, nc, dk, dv)
    for i in range(nc):
        _assert_close(f"H[:, {i}]", H[:, i], scan(i * chunk)[1], tol)
    if x["beta"] is None:
        assert Vp.numel() == 0 and W.numel() == 0 and Tm.numel() == 0
    else:
        assert Vp.shape == (N, nc * chunk, dv) and W.shape == (N, nc * chunk, dk)
        assert torch.isfinite(Vp).all() and torch.isfinite(W).all()
        # the chunks' WY inverses, kept for the backward (padded rows: identity rows)
        h0 = x["h0"] if x["h0"] is not None else torch.zeros(N, dk, dv)
        want = chunk_intermediates(x["k"], x["v"], x["q"], x["beta"], x["g"], h0, chunk, before)[5]
        _assert_close("Tm", Tm, want, tol)
    return o, h_final, H, Vp, W


@pytest.mark.parametrize("before", [False, True], ids=["after", "before"])
@pytest.mark.parametrize("kind", KINDS)
def test_kinds_and_readouts(kind, before):
    _check(_inputs(kind, 37), chunk=16, before=before)


@pytest.mark.parametrize("kind", KINDS)
def test_state_only_without_q(kind):
    _check(_inputs(kind, 40, seed=1, with_q=False), chunk=16)


@pytest.mark.parametrize("t", [1, 10, 32, 70], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("kind", ["channel", "gated_delta"])
def test_lengths(kind, t):
    """T = 1, T < chunk, T a multiple of the chunk, and a masked tail (70 = 2*32 + 6)."""
    _check(_inputs(kind, t, seed=2), chunk=32, before=(t == 10))


@pytest.mark.parametrize("dk,dv", [(32, 16), (20, 24), (16, 5)], ids=["dk32-dv16", "dk20-dv24", "dk16-dv5"])
@pytest.mark.parametrize("kind", ["additive", "channel", "gated_delta", "kda"])
def test_dk_differs_from_dv(kind, dk, dv):
    _check(_inputs(kind, 23, dk, dv, seed=3), chunk=16)


@pytest.mark.parametrize("kind", ["channel", "gated_delta"])
def test_chunk_64(kind, uncapped_chunk):
    _check(_inputs(kind, 70, seed=4), chunk=64, before=True)


@pytest.mark.parametrize("kind", ["decay", "channel", "gated_delta", "kda"])
def test_growing_gates_are_exact(kind):
    """Gates slightly above 1 (g in (0, 0.05)): nothing is flushed or clamped."""
    _check(_inputs(kind, 45, seed=5, growth=True), chunk=16)


@pytest.mark.parametrize("kind", ["decay", "channel", "gated_delta"])
def test_strong_decay_underflows_cleanly(kind, uncapped_chunk):
    """Log-gates -8*softplus(randn): e^G underflows to 0 inside a 64-chunk; the masked exponents
    keep every factor finite and the result still matches."""
    x = _inputs(kind, 70, seed=10)
    x["g"] = 8 * x["g"]
    o = _check(x, chunk=64, before=True)[0]
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("kind", ["additive", "channel", "gated_delta"])
def test_bf16_inputs(kind, monkeypatch):
    """bf16 inputs loaded and computed with tf32 dots (fp16's default; bf16's default, bf16 dots,
    is checked against the loop run in bf16 in tests/test_triton_target.py)."""
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "tf32")
    _check(_inputs(kind, 37, seed=6, dtype=torch.bfloat16), chunk=16, before=True)


def test_zero_initial_state_when_h0_is_none():
    _check(_inputs("gated_delta", 20, seed=7, with_h0=False), chunk=16)


@pytest.mark.parametrize("kind", ["channel", "gated_delta"])
def test_several_value_blocks(kind, monkeypatch):
    """dv split over programs of the states and output kernels (3 blocks of 16 for dv = 40)."""
    blocks = fwd.kernel_blocks
    monkeypatch.setattr(fwd, "kernel_blocks", lambda *a: dataclasses.replace(blocks(*a), BV=16))
    _check(_inputs(kind, 30, 16, 40, seed=8), chunk=16)


def test_delta_factors_match_their_definition():
    """W and V' (what the backward reads) satisfy the spec's chunk relations, checked in float64:
    (I + Akk) W = diag(b e^G) K, (I + Akk)(V' + W H_i) = V, H_{i+1} = e^{G_L} H_i + Kt^T V'."""
    C, t = 16, 37
    x = _inputs("gated_delta", t, seed=9)
    _, h_final, H, Vp, W = _check(x, chunk=C)
    nc = H.shape[1]
    pad = lambda y: F.pad(y.double(), (0, 0) * (y.dim() - 2) + (0, nc * C - t))  # noqa: E731
    k, v, b, g = pad(x["k"]), pad(x["v"]), pad(x["beta"]), pad(x["g"])
    states = torch.cat([H.double(), h_final.double()[:, None]], 1)
    eye = torch.eye(C, dtype=torch.float64)
    for i in range(nc):
        rows = slice(i * C, (i + 1) * C)
        K, V, B, G = k[:, rows], v[:, rows], b[:, rows], g[:, rows].cumsum(-1)
        Wi, Vpi, Hi = W[:, rows].double(), Vp[:, rows].double(), states[:, i]
        akk = (B[:, :, None] * (K @ K.transpose(1, 2)) * (G[:, :, None] - G[:, None, :]).exp()).tril(-1)
        torch.testing.assert_close((eye + akk) @ Wi, (B * G.exp())[..., None] * K, atol=1e-5, rtol=0)
        torch.testing.assert_close((eye + akk) @ (Vpi + Wi @ Hi), V, atol=1e-4, rtol=0)
        G_L = G[:, -1:]
        Kt = K * (G_L - G).exp()[..., None]
        nxt = G_L.exp()[..., None] * Hi + Kt.transpose(1, 2) @ Vpi
        torch.testing.assert_close(nxt, states[:, i + 1], atol=1e-4, rtol=0)
    assert Vp[:, t:].abs().max() == 0 and W[:, t:].abs().max() == 0  # masked tail rows are neutral


@triton.jit
def _inverse_kernel(a_ptr, out_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = tl.program_id(0) * C * C + r[:, None] * C + r[None, :]
    tl.store(out_ptr + at, unit_lower_inverse(tl.load(a_ptr + at), C))


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_wy_inverse_matches_float64(chunk):
    """The blocked inverse (I + tril(a, -1))^{-1} of the WY form with a per-channel gate (16x16
    diagonal blocks, then Horner over the block levels; its products at C = 64 are tf32x3, emulated
    here) at fp32 rounding, also for ill-conditioned matrices (entries of the inverse up to ~1e8 at
    C = 64); the diagonal and upper part of ``a`` are ignored."""
    gen = Draws(11)
    a = gen.randn(6, chunk, chunk, dtype=torch.float64)
    a[:3] *= 0.3
    expected = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + a.tril(-1))
    out = torch.empty(6, chunk, chunk)
    _inverse_kernel[(6,)](a.float().contiguous(), out, C=chunk)
    err = (out.double() - expected).abs().amax((1, 2)) / expected.abs().amax((1, 2))
    assert err.max() < 2e-5, err


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_blocked_wy_inverse_matches_float64(chunk, uncapped_chunk):
    """The delta family's WY inverse as ``wy_inverse`` forms it without a per-channel gate ([16, 16]
    blocks: the diagonal ones by substitution, the ones below by block forward substitution in
    tf32x3 products, emulated here) is as accurate as the whole-tile inverse (``unit_lower_inverse``)
    on the same matrices, also ill-conditioned ones (inverse entries ~1e3, ~1e5 and ~1e12 at chunks
    16, 32, 64).  Keys in {-1, 0, 1} and betas in eighths make Akk exact in fp32, so the error is the
    inverse's alone."""
    gen = Draws(5)
    n, t, dk = 4, 2 * chunk, 16
    k = gen.randint(-1, 2, (n, t, dk)).float()
    beta = gen.randint(1, 9, (n, t)) / 8
    tm = chunk_forward(k, torch.zeros(n, t, 16), None, beta, None, None, chunk, False)[5]
    akk = torch.stack([(beta[:, s, None] * (k[:, s] @ k[:, s].transpose(1, 2))).tril(-1)
                       for s in (slice(i * chunk, (i + 1) * chunk) for i in range(t // chunk))], 1)
    akk = akk.reshape(-1, chunk, chunk)   # [n * chunks, C, C], exact
    want = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + akk.double())
    whole = torch.empty_like(akk)
    _inverse_kernel[(akk.shape[0],)](akk.contiguous(), whole, C=chunk)
    error = lambda x: ((x.double() - want).abs().amax((1, 2)) / want.abs().amax((1, 2))).max().item()  # noqa: E731
    blocked = error(tm.reshape(-1, chunk, chunk))
    assert want.abs().max() > {16: 1e2, 32: 1e4, 64: 1e11}[chunk]
    assert blocked <= max(3 * error(whole), 1e-6) and blocked < 2e-4, (blocked, error(whole))


@triton.jit
def _tf32_kernel(a_ptr, b_ptr, round_ptr, x3_ptr, trunc_ptr, C: tl.constexpr):
    r = tl.arange(0, C)
    at = r[:, None] * C + r[None, :]
    a, b = tl.load(a_ptr + at), tl.load(b_ptr + at)
    tl.store(round_ptr + at, round_to_tf32(a))
    tl.store(x3_ptr + at, tf32x3_emulated(a, b))
    tl.store(trunc_ptr + at, tl.dot(truncate_to_tf32(a), truncate_to_tf32(b), input_precision="ieee"))


def test_tf32x3_emulation_is_fp32_accurate():
    """The interpreter's stand-in for an NVIDIA GPU's "tf32x3" dots (the WY inverse's products at
    C = 64, ``NLCOMPILE_TRITON_DOT=tf32x3``): operands rounded to tf32 ties away from zero (PTX
    cvt.rna), and three tf32 products that come within fp32 rounding of the float64 product,
    far closer than one tf32 product."""
    gen = Draws(3)
    a, b = (gen.randn(32, 32) for _ in range(2))
    a[0, :3] = torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 3 * 2 ** -12])   # ties, and a round-up
    rounded, x3, trunc = (torch.empty_like(a) for _ in range(3))
    _tf32_kernel[(1,)](a, b, rounded, x3, trunc, C=32)
    bits = a.view(torch.int32).long() & 0xFFFFFFFF
    assert torch.equal(rounded, ((bits + 0x1000) & 0xFFFFE000).to(torch.int32).view(torch.float32))
    assert rounded[0, :3].tolist() == [1 + 2 ** -10, -(1 + 2 ** -10), 1 + 2 ** -10]
    exact = a.double() @ b.double()
    scale = exact.abs().max()
    assert (x3.double() - exact).abs().max() / scale < 5e-7
    assert (trunc.double() - exact).abs().max() / scale > 100 * (x3.double() - exact).abs().max() / scale
    # and it is tf32x3, not fp32: x^2 for x = 1 + 2^-11 + 2^-20 (head 1 + 2^-10, rest -2^-11 + 2^-20)
    # misses the dropped rest x rest product: (1 + 2^-10)(1 + 2^-19) in fp32, not x^2 = 1.000978708...
    x = torch.zeros(32, 32)
    x[0, 0] = 1 + 2 ** -11 + 2 ** -20
    _tf32_kernel[(1,)](x, x, rounded, x3, trunc, C=32)
    assert x3[0, 0].item() == 1 + 2 ** -10 + 2 ** -19 != (x[0, 0] ** 2).item()


def test_argument_errors():
    x = _inputs("gated_delta", 8)
    args = lambda **kw: {**x, **kw}  # noqa: E731
    call = lambda a, chunk=16: chunk_forward(a["k"], a["v"], a["q"], a["beta"], a["g"], a["h0"], chunk, False)  # noqa: E731
    with pytest.raises(ValueError, match="chunk"):
        call(x, chunk=8)
    with pytest.raises(ValueError, match="^v "):
        call(args(v=torch.randn(N, 7, 32)))
    with pytest.raises(ValueError, match="^q "):
        call(args(q=torch.randn(N, 8, 17)))
    with pytest.raises(ValueError, match="^beta "):
        call(args(beta=torch.rand(N, 8, 1)))
    with pytest.raises(ValueError, match="^g "):
        call(args(g=torch.randn(N, 8, 3)))
    with pytest.raises(ValueError, match="^h0 "):
        call(args(h0=torch.randn(N, 32, 16)))
    with pytest.raises(ValueError, match="^k"):
        call(args(k=torch.randn(N, 8)))
    with pytest.raises(ValueError, match="dk"):
        call(args(k=torch.randn(N, 8, 300), q=None, h0=None))
    with pytest.raises(ValueError, match="dv"):
        call(args(v=torch.randn(N, 8, 257), h0=None))
