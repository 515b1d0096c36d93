"""The triton target: custom ops (fake implementations, autograd, torch.compile) and
whole zoo models compiled with ``target="triton"``, checked against eager PyTorch.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd import forward_ad
from torch.overrides import _pop_mode_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import nlcompile
from nlcompile.memory import saved_storages
from nlcompile.targets.scan import sequential_scan
from nlcompile.targets.triton.common import cdiv, dot_precision, interpreting, round_to_bf16
from nlcompile.targets.triton.ops import chunk_scan, chunk_scan_backward, kernel_chunk, triton_chunkwise_scan
from nlcompile.targets.triton_target import TritonTarget
from nlcompile.zoo import LAYERS, MODELS

from _benchmarks import load_benchmark
from _compare import as_tuple, assert_close_outputs, assert_within_eager_error, rel_err, runs_under_autocast
from _draws import Draws

KINDS = ["additive", "decay", "decay_channel", "delta", "gated_delta", "kda"]


def scan_inputs(kind: str, N=2, T=37, dk=16, dv=32, dtype=torch.float32, seed=0):
    gen = Draws(seed)
    rnd = gen.randn
    k = rnd(N, T, dk)
    if kind in ("delta", "gated_delta", "kda"):
        k = F.normalize(k, dim=-1)
    kw = dict(q=rnd(N, T, dk).to(dtype), initial_state=rnd(N, dk, dv))
    if kind in ("delta", "gated_delta", "kda"):
        kw["beta"] = gen.rand(N, T).to(dtype)
    if kind in ("decay", "gated_delta"):
        kw["log_gate"] = -F.softplus(rnd(N, T))
    if kind == "decay_channel":
        kw["gate"] = torch.sigmoid(rnd(N, T, dk) + 2)
    if kind == "kda":  # Kimi Delta Attention: a per-key-channel gate, applied before the delta step
        kw["log_gate"] = -F.softplus(rnd(N, T, dk))
        kw["gate_first"] = True
    return k.to(dtype), rnd(N, T, dv).to(dtype), kw


def reference(k, v, kw, readout="after"):
    """sequential_scan in float64."""
    d = lambda x: x.double() if torch.is_tensor(x) else x  # noqa: E731
    return sequential_scan(d(k), d(v), readout=readout, **{n: d(x) for n, x in kw.items()})


def check_against_float64(k, v, kw, readout="after", q_scale=1.0, chunk=16):
    """Output, final state and the gradients wrt every tensor input of ``triton_chunkwise_scan``
    (chunk 16 unless asked, no fallback) within 1e-4 of scale of float64
    ``sequential_scan`` (queries times ``q_scale`` there)."""
    names = ["k", "v", *(n for n, x in kw.items() if torch.is_tensor(x))]
    leaves = [k, v, *(x for x in kw.values() if torch.is_tensor(x))]
    for x in leaves:
        x.requires_grad_(True)
    plans = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, s = triton_chunkwise_scan(k, v, readout=readout, chunk_size=chunk, q_scale=q_scale, on_plan=plans.append,
                                     **kw)
    assert plans[0].startswith("the Triton kernels"), plans   # (a fallback warns once per process only)
    o_ref, s_ref = reference(k, v, dict(kw, q=kw["q"] * q_scale), readout)
    assert rel_err(o, o_ref) <= 1e-4 and rel_err(s, s_ref) <= 1e-4
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    got = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), leaves)
    want = torch.autograd.grad((o_ref * w_o.double()).sum() + (s_ref * w_s.double()).sum(), leaves)
    for name, g, w in zip(names, got, want):
        assert rel_err(g, w) <= 1e-4, (name, rel_err(g, w))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("readout", ["after", "before"])
def test_scan_forward_and_gradients_match_sequential(kind, readout):
    """Every kind runs on the kernels."""
    check_against_float64(*scan_inputs(kind), readout)


def launched_chunk(per_channel: bool = False, d: int = 16, *precs: str) -> int:
    """The chunk the launchers pick for a loop's 64-chunk scan with head dims ``d`` at the dot
    precisions ``precs`` ("ieee" unless given) on this test's device: 64 (16 with a per-channel gate)
    in the interpreter; on a GPU fp32 "ieee" dots cap it at 32 (``common.kernel_blocks``)."""
    return kernel_chunk(64, per_channel, torch.get_default_device(), d, d, precs or ("ieee",))


@pytest.mark.parametrize("kind", ["decay_channel", "delta", "gated_delta", "kda"])
def test_tf32x3_dots_keep_fp32_exactness(kind, monkeypatch):
    """``NLCOMPILE_TRITON_DOT=tf32x3`` (three tf32 tensor-core products per dot, emulated here as an
    NVIDIA GPU computes them) keeps fp32 inputs within DESIGN's exactness bound (1e-4 of scale from
    float64), forward and gradients: a candidate for fp32's default, whose speed against "ieee"
    only a GPU can tell."""
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "tf32x3")
    k, v, kw = scan_inputs(kind)
    assert dot_precision(k, kw["q"]) == ("tf32x3-interpreted" if interpreting() else "tf32x3")
    check_against_float64(k, v, kw)


@pytest.mark.parametrize("kind,readout", [("additive", "before"), ("decay_channel", "after"), ("delta", "before"),
                                          ("gated_delta", "after"), ("kda", "after")])
def test_query_scale_is_applied_by_the_kernels(kind, readout, monkeypatch):
    """``q_scale`` gives the results and gradients of scaling q first; the kernels apply it to o
    (and to dO in the backward): q reaches them unscaled, not as a scaled copy."""
    import nlcompile.targets.triton.ops as ops

    seen, run = [], ops.chunk_forward   # what every path runs (the op's implementation, and without it)
    monkeypatch.setattr(ops, "chunk_forward", lambda k, v, q, *rest, **kw: seen.append(q) or run(k, v, q, *rest, **kw))
    k, v, kw = scan_inputs(kind, T=37)
    check_against_float64(k, v, kw, readout, q_scale=0.3)
    assert seen and seen[0] is kw["q"]


@pytest.mark.parametrize("kind", ["delta", "kda"])
def test_write_coefficient_is_folded_into_the_kernels(kind):
    """A delta rule whose write coefficient differs from beta (S += write_t k_t v_t^T after the
    delta step): the kernels scale v by it themselves (``coef``); output, state and the gradients
    wrt every input, write included, match float64, in both layouts."""
    k, v, kw = scan_inputs(kind, N=6)
    kw["write"] = Draws(5).rand(6, 37) + 0.5
    for layout in ("flat", "heads_last"):
        tensors = {"k": k, "v": v, **{n: x for n, x in kw.items() if torch.is_tensor(x)}}
        leaves = {n: (x if layout == "flat" or n == "initial_state" else heads_last(x, 3)).clone().requires_grad_(True)
                  for n, x in tensors.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o, s = triton_chunkwise_scan(**leaves, chunk_size=16, gate_first=kw.get("gate_first", False))
        if layout == "heads_last":
            o = heads_first(o)
        o_ref, s_ref = reference(k, v, kw)
        assert rel_err(o, o_ref) <= 1e-4 and rel_err(s, s_ref) <= 1e-4
        w_o, w_s = torch.randn_like(o), torch.randn_like(s)
        got = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), list(leaves.values()))
        ref_leaves = [x.double().requires_grad_(True) for x in tensors.values()]
        ref_kw = dict(zip(tensors, ref_leaves), gate_first=kw.get("gate_first", False))
        o_ref, s_ref = sequential_scan(ref_kw.pop("k"), ref_kw.pop("v"), **ref_kw)
        want = torch.autograd.grad((o_ref * w_o.double()).sum() + (s_ref * w_s.double()).sum(), ref_leaves)
        for name, g, w in zip(leaves, got, want):
            g = g if layout == "flat" or name == "initial_state" else heads_first(g)
            assert rel_err(g, w) <= 1e-4, (layout, name, rel_err(g, w))


@pytest.mark.parametrize("kind", ["additive", "gated_delta"])
def test_output_in_the_asked_dtype(kind):
    """out_dtype=bf16: the kernels store o in bf16, the fp32 result rounded once (within half a bf16
    ulp), and the gradients through it are those of the fp32 output given the same dO."""
    k, v, kw = scan_inputs(kind, dtype=torch.bfloat16)
    leaves = [x.clone().requires_grad_(True) for x in (k, v, kw["q"])]
    copies = [x.clone().requires_grad_(True) for x in (k, v, kw["q"])]
    rest = {n: x for n, x in kw.items() if n != "q"}
    o16, _ = triton_chunkwise_scan(leaves[0], leaves[1], q=leaves[2], out_dtype=torch.bfloat16, chunk_size=16, **rest)
    o32, _ = triton_chunkwise_scan(copies[0], copies[1], q=copies[2], chunk_size=16, **rest)
    assert o16.dtype == torch.bfloat16 and o32.dtype == torch.float32
    assert ((o16.float() - o32).abs() <= 2 ** -8 * o32.abs()).all()   # half a bf16 ulp of each value
    do = torch.randn_like(o32).bfloat16()
    for a, b in zip(torch.autograd.grad(o16, leaves, do), torch.autograd.grad(o32, copies, do.float())):
        assert rel_err(a, b) <= 1e-6


def test_coef_needs_the_delta_family():
    from nlcompile.targets.triton.forward import chunk_forward

    k, v, kw = scan_inputs("additive", T=8)
    with pytest.raises(ValueError, match="coef"):
        chunk_forward(k, v, kw["q"], None, None, None, 16, False, coef=torch.ones(2, 8))


def heads_last(x, heads: int):
    """[B*H, T, ...] -> flash-linear-attention's [B, T, H, ...] (a copy, contiguous)."""
    return x.unflatten(0, (-1, heads)).transpose(1, 2).contiguous()


def heads_first(x):
    """[B, T, H, ...] -> [B*H, T, ...]."""
    return x.transpose(1, 2).flatten(0, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("readout", ["after", "before"])
def test_heads_last_layout_matches_flat(kind, readout):
    """Inputs in flash-linear-attention's [B, T, H, D] layout, read in place by the kernels (B = 2,
    H = 3, a masked tail, dk != dv): the output, the final state and every gradient equal those of
    the same sequences given flat as [B*H, T, D] (which the other tests check against float64)."""
    k, v, kw = scan_inputs(kind, N=6)
    tensors = {"k": k, "v": v, **{n: x for n, x in kw.items() if torch.is_tensor(x)}}
    flat = {n: x.clone().requires_grad_(True) for n, x in tensors.items()}
    last = {n: (x if n == "initial_state" else heads_last(x, 3)).clone().requires_grad_(True)
            for n, x in tensors.items()}
    options = dict(readout=readout, chunk_size=16, gate_first=kw.get("gate_first", False))

    def run(x: dict):
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a fallback to the PyTorch scan fails the test
            return triton_chunkwise_scan(**x, **options)

    o_flat, s_flat = run(flat)
    o_last, s_last = run(last)
    assert o_last.shape == (2, 37, 3, 32)
    assert rel_err(heads_first(o_last), o_flat) <= 1e-6 and rel_err(s_last, s_flat) <= 1e-6
    w_o, w_s = torch.randn_like(o_flat), torch.randn_like(s_flat)
    got = torch.autograd.grad((heads_first(o_last) * w_o).sum() + (s_last * w_s).sum(), list(last.values()))
    want = torch.autograd.grad((o_flat * w_o).sum() + (s_flat * w_s).sum(), list(flat.values()))
    for name, g, w in zip(last, got, want):
        assert rel_err(g if name == "initial_state" else heads_first(g), w) <= 1e-6, name


@pytest.mark.parametrize("kind,dot,layout", [("decay", "auto", "flat"), ("delta", "auto", "flat"),
                                             ("delta", "bf16", "flat"), ("gated_delta", "auto", "heads_last"),
                                             ("delta", "auto", "upcast"), ("gated_delta", "auto", "recompute")])
def test_custom_op_passes_opcheck(kind, dot, layout, monkeypatch):
    """Fake implementation, autograd and schema agree with the kernels (with bf16 dots the states
    and W are returned in bf16: the fake must say so; in the [B, T, H, D] layout o is [B, T, H, dv],
    here also in bf16, with v scaled by the write coefficient and o by the queries' scale in the
    kernels; bf16 keys, values and queries computed on in fp32: fp32 buffers and gradients)."""
    if dot != "auto":
        monkeypatch.setenv("NLCOMPILE_TRITON_DOT", dot)
    k, v, kw = scan_inputs(kind, T=21)
    g = kw.get("log_gate")
    q, beta = kw["q"], kw.get("beta")
    options = {}
    if layout == "heads_last":   # B = 1, H = 2; with the write coefficient and a bf16 output
        k, v, q, beta, g = (None if x is None else heads_last(x, 2) for x in (k, v, q, beta, g))
        options = dict(coef=beta, out_dtype=torch.bfloat16, scale=0.5)   # and the queries' scale
    if layout == "upcast":
        k, v, q = k.bfloat16(), v.bfloat16(), q.bfloat16()
        options = dict(compute_dtype=torch.float32)
    if layout == "recompute":   # the autograd formula's recomputation in the backward
        options = dict(recompute=True)
    args = (k, v, q, beta, g, kw["initial_state"], 16, False)
    for x in (k, v, q, kw["initial_state"]):
        x.requires_grad_(True)
    torch.library.opcheck(chunk_scan, args, options)
    # the backward op on its own (its fake gives the gradients' dtypes)
    o, final, *saved = chunk_scan(*args, **options)
    inputs = [x.detach() if torch.is_tensor(x) else x for x in args[:6]]
    backward_options = {n: x for n, x in options.items() if n not in ("out_dtype", "recompute")}
    torch.library.opcheck(chunk_scan_backward, (*inputs, *(x.detach() for x in saved), torch.randn_like(o.float()),
                                                torch.randn_like(final), 16, False), backward_options)


@pytest.mark.parametrize("kind,mixed", [(kind, False) for kind in KINDS] + [("delta", True), ("gated_delta", True)])
def test_recompute_keeps_only_the_inputs_and_gives_the_same_gradients(kind, mixed):
    """With ``recompute`` the op saves exactly its tensor inputs (not the chunk states H, nor V', W
    and the WY inverses; without, all of those but the initial state, which H holds), and its
    backward, forming those again with the forward's kernels, gives
    bit-identical gradients; also with bf16 keys and values and fp32 queries (``mixed``: the
    recomputation, which has no queries, must run at the forward's precision, fp32)."""
    k, v, kw = scan_inputs(kind, T=37)
    if mixed:
        k, v = k.bfloat16(), v.bfloat16()
    g = kw.get("log_gate", kw["gate"].log() if "gate" in kw else None)
    given = [k, v, kw["q"], kw.get("beta"), g, kw["initial_state"]]
    runs = {}
    for recompute in (False, True):
        leaves = [None if x is None else x.detach().requires_grad_(True) for x in given]
        (o, s, states, *_), saved = saved_storages(
            lambda: chunk_scan(*leaves, 16, False, None, None, 0.5, recompute))
        gen = Draws(1)
        loss = (o * gen.randn(o.shape)).sum() + (s * gen.randn(s.shape)).sum()
        tensors = [x for x in leaves if x is not None]
        inputs = {x.untyped_storage().data_ptr() for x in tensors}
        runs[recompute] = torch.autograd.grad(loss, tensors)
        h0 = leaves[5].untyped_storage().data_ptr()
        if recompute:
            assert set(saved) == inputs
        else:   # the states instead of the initial state (H_0 is its copy)
            assert set(saved) >= (inputs - {h0}) | {states.untyped_storage().data_ptr()} and h0 not in saved
    for kept, again in zip(runs[False], runs[True]):
        assert torch.equal(kept, again)


def test_torch_export_keeps_the_op():
    """torch.export traces the op whole through its fake implementation: one node in the exported
    graph, and the exported program computes what the eager module does."""
    k, v, kw = scan_inputs("gated_delta", T=30)
    args = (k, v, kw["q"], kw["beta"], kw["log_gate"], kw["initial_state"])

    class Layer(torch.nn.Module):
        def forward(self, k, v, q, beta, log_gate, h0):
            o, s, *_ = chunk_scan(k, v, q, beta, log_gate, h0, 16, False, None, None, 0.5)
            return o.tanh(), s

    exported = torch.export.export(Layer(), args)
    ops = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.nlcompile.chunk_scan_v4.default) == 1, ops
    for got, want in zip(exported.module()(*args), Layer()(*args)):
        assert rel_err(got, want) == 0


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_compile_keeps_the_op_and_its_gradient(recompute):
    """Fake implementations and autograd let torch.compile trace the op whole (fullgraph);
    the scan around it (which checks gate values) compiles with a graph break.  With ``recompute``
    the compiled backward calls the forward op again (AOTAutograd traces the autograd formula)."""
    k, v, kw = scan_inputs("gated_delta", T=30)
    for x in (k, v, kw["q"]):
        x.requires_grad_(True)
    args = (k, v, kw["q"], kw["beta"], kw["log_gate"], kw["initial_state"])

    def layer_op(k, v, q, beta, log_gate, h0):
        o, s, *_ = chunk_scan(k, v * beta.unsqueeze(-1), q, beta, log_gate, h0, 16, False, recompute=recompute)
        return (o.tanh() * 2).sum() + s.square().sum()

    def layer_scan(k, v, q, beta, log_gate, h0):
        o, s = triton_chunkwise_scan(k, v, q=q, beta=beta, log_gate=log_gate, initial_state=h0, recompute=recompute)
        return (o.tanh() * 2).sum() + s.square().sum()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_ops = []

    def keep_backward(gm, _):
        backward_ops.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    for layer, fullgraph in ((layer_op, True), (layer_scan, False)):
        compiled = torch.compile(layer, backend=backend, fullgraph=fullgraph)
        want = torch.autograd.grad(layer(*args), (k, v, args[2]))
        got = torch.autograd.grad(compiled(*args), (k, v, args[2]))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert backward_ops.count(torch.ops.nlcompile.chunk_scan_backward_v3.default) == 2, backward_ops
    assert backward_ops.count(torch.ops.nlcompile.chunk_scan_v4.default) == (2 if recompute else 0), backward_ops


def test_inductor_compiles_the_code_around_the_op():
    """Real Inductor (C++ on this CPU), fullgraph: the op is one node, forward and backward."""
    k, v, kw = scan_inputs("gated_delta", T=30)
    leaves = (k.requires_grad_(True), v.requires_grad_(True), kw["q"].requires_grad_(True))

    def layer(k, v, q, beta, log_gate, h0):
        kn, vb = F.normalize(k, dim=-1), v * beta.unsqueeze(-1)
        o, s, *_ = chunk_scan(kn, vb, q * 0.5, beta, log_gate, h0, 16, False)
        return (o.tanh() * 2).sum() + s.square().sum()

    args = (*leaves, kw["beta"], kw["log_gate"], kw["initial_state"])
    want = torch.autograd.grad(layer(*args), leaves)
    got = torch.autograd.grad(torch.compile(layer, fullgraph=True)(*args), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_stay_within_eager_error():
    """bf16 inputs at the default precision (bf16 dots: operands rounded to bf16 as on a GPU, emulated
    so in the interpreter): the output is no further from float64 than the update loop run in bf16
    (DESIGN's low-precision reference)."""
    k, v, kw = scan_inputs("delta", T=40, dtype=torch.bfloat16)
    o, s = triton_chunkwise_scan(k, v, **kw)
    o_ref, _ = reference(k, v, kw)
    assert rel_err(o, o_ref) <= rel_err(eager_in_bf16(k, v, kw), o_ref)


def eager_in_bf16(k, v, kw):
    """The update loop as a bf16 model runs it: every tensor, the state included, in bf16
    (the "eager's own run in that dtype" of DESIGN's low-precision rule).  Gates before the delta step."""
    bf = lambda x: None if x is None else x.bfloat16()  # noqa: E731
    q, beta, s = bf(kw["q"]), bf(kw.get("beta")), bf(kw["initial_state"])
    a = None if kw.get("log_gate") is None else kw["log_gate"].exp().bfloat16()
    outs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        if a is not None:
            s = s * (a[:, t, :, None] if a.dim() == 3 else a[:, t, None, None])
        if beta is not None:
            s = s - beta[:, t, None, None] * kt[:, :, None] * (kt[:, None, :] @ s)
            vt = vt * beta[:, t, None]
        s = s + kt[:, :, None] * vt[:, None, :]
        outs.append((q[:, t, None, :] @ s).squeeze(1))
    return torch.stack(outs, 1)


@pytest.mark.parametrize("dot", ["bf16", "tf32"])
@pytest.mark.parametrize("kind", ["additive", "delta", "gated_delta", "kda"])
def test_low_precision_dots_stay_within_eager_bf16_error(kind, dot, monkeypatch):
    """``NLCOMPILE_TRITON_DOT=bf16`` (flash-linear-attention's precision: dot operands rounded to
    bf16, fp32 accumulation and recurrence, per-chunk states stored in bf16) and ``=tf32`` (forward
    and backward): the output and the gradients wrt k, v, q, beta and the log-gate are no further
    from the float64 reference than the loop run in bf16 (slack 1.5).  On the CPU the interpreter
    runs the same arithmetic emulated (``common.round_to_bf16``, ``common.truncate_to_tf32``)."""
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", dot)
    k, v, kw = scan_inputs(kind, T=48, dk=32, dv=32, dtype=torch.bfloat16)
    assert dot_precision(k, kw["q"]).startswith(dot)
    assert_within_eager_bf16_error(k, v, kw, lambda k_, v_, kw_: triton_chunkwise_scan(k_, v_, **kw_, chunk_size=16)[0])


@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_bf16_at_the_benchmark_configuration(kind):
    """DeltaNet and Gated DeltaNet as the GPU benchmark runs them: bf16 inputs at their default
    (bf16) dots, head dim 128, chunk 64 (the launchers' choice there on a GPU), fla's [B, T, H, D]
    layout read in place, a partial last chunk: the output and every gradient within the error of
    the loop run in bf16.  ``benchmarks/gpu_check.sh`` runs this file on a GPU, where it checks the
    configuration whose backward a Hopper compiler is known to get wrong in fla's analogues of our
    kernels (fla issues 640 and 984: a transposed tensor-core result fed to another product,
    64-row chunks; the benchmark checks its tuned launches' gradients too)."""
    k, v, kw = scan_inputs(kind, N=2, T=130, dk=128, dv=128, dtype=torch.bfloat16)
    heads_last = lambda x: x.transpose(0, 1).unsqueeze(0)   # [N, T, .] -> [1, T, N, .]  # noqa: E731
    plans = []

    def ours(k_, v_, kw_):
        step = {n: heads_last(x) for n, x in kw_.items() if n != "initial_state"}
        o, _ = triton_chunkwise_scan(heads_last(k_), heads_last(v_), **step, initial_state=kw_["initial_state"],
                                     chunk_size=64, on_plan=plans.append)
        return o[0].transpose(0, 1)

    assert_within_eager_bf16_error(k, v, kw, ours)
    assert plans == [f"the Triton kernels, chunk 64, {dot_precision(k, kw['q'])} dots"]


def assert_within_eager_bf16_error(k, v, kw, run):
    """``run(k, v, kw)``'s output and its gradients wrt k, v, q, beta and the log-gate (for one
    random output cotangent) no further from the float64 reference than the loop run in bf16
    (``eager_in_bf16``; slack 1.5)."""
    do = Draws(1).randn(k.shape[0], k.shape[1], v.shape[-1])
    names = ["q"] + [n for n in ("beta", "log_gate") if n in kw]

    def out_and_grads(run, dtype):
        """Output and gradients wrt k, v, q, beta and the log-gate (fp32 in our run and in eager's)."""
        leaves = [x.detach().to(dtype).requires_grad_() for x in (k, v)]
        leaves += [kw[n].detach().to(dtype if n == "q" else torch.promote_types(dtype, torch.float32))
                   .requires_grad_() for n in names]
        o = run(leaves[0], leaves[1], dict(kw, **dict(zip(names, leaves[2:]))))
        return [o, *torch.autograd.grad(o, leaves, do.to(o.dtype))]

    want = out_and_grads(lambda k_, v_, kw_: reference(k_, v_, kw_)[0], torch.float64)
    ours = out_and_grads(run, torch.bfloat16)
    eager = out_and_grads(eager_in_bf16, torch.bfloat16)
    for name, got, ref, bound in zip(["o", "dk", "dv"] + [f"d{n}" for n in names], ours, want, eager):
        assert rel_err(got, ref) <= 1.5 * rel_err(bound, ref), name


@triton.jit
def _round_to_bf16_kernel(x_ptr, y_ptr, n, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(y_ptr + i, round_to_bf16(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def test_round_to_bf16_rounds_to_nearest_even():
    """The interpreter's own fp32 -> bf16 conversion truncates; the emulation rounds as a GPU does."""
    x = torch.randn(1000) * 10.0 ** torch.randint(-5, 5, (1000,)).float()
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2 ** -8 * 257])  # halfway cases
    x = torch.cat([x, ties]).to(torch.get_default_device())
    y = torch.empty_like(x)
    _round_to_bf16_kernel[(1,)](x, y, x.numel(), B=triton.next_power_of_2(x.numel()))
    assert torch.equal(y, x.bfloat16().float())


@pytest.mark.parametrize("kind", ["decay", "gated_delta", "kda"])
@pytest.mark.parametrize("zeros", [0.25, 0.5])
def test_zero_log_gates_run_in_the_kernels(kind, zeros):
    """Log-gates of -inf (zero gates: state resets), a quarter or half of the steps, run in the
    kernels, floored at ``ops.LOG_GATE_FLOOR`` (no fallback, no check of the gates on the host):
    forward and gradients within 1e-4 of scale of float64 with the true zeros, chunk 64 asked (the
    interpreter runs it for a scalar gate, 16 for a per-channel one; largest error 4e-5).  Without
    the floor the kernels give NaN (the interpreter raises on -inf - -inf)."""
    k, v, kw = scan_inputs(kind, T=70)
    gen = Draws(1)
    zero = gen.rand(kw["log_gate"].shape) < zeros
    kw["log_gate"] = kw["log_gate"].masked_fill(zero, float("-inf"))
    check_against_float64(k, v, kw, chunk=64)


class _HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (``.item()``, ``bool()``: on a GPU a
    sync, which stops the host from queueing work ahead and which a CUDA graph capture refuses).
    A custom op is one op to a dispatch mode, its Python not seen: ``inside`` records in a
    function that such an op calls too."""

    def __init__(self, seen: list | None = None):
        super().__init__()
        self.seen = [] if seen is None else seen

    def inside(self, fn):
        def recorded(*args, **kwargs):
            with _HostReads(self.seen):
                return fn(*args, **kwargs)
        return recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["additive", "decay", "delta", "gated_delta", "kda", "decay_channel"])
def test_the_kernels_path_reads_no_value_on_the_host(kind, monkeypatch):
    """Forward and backward through the kernels read no tensor's value on the host, around the
    custom ops and inside them (``chunk_forward``, ``chunk_backward`` and what they call): log-gates
    are floored, not checked (``ops.LOG_GATE_FLOOR``).  Gates given as such are the exception, one
    read: their zeros and signs are checked (those fall back)."""
    import nlcompile.targets.triton.ops as ops

    reads = _HostReads()
    for name in ("chunk_forward", "chunk_backward"):
        monkeypatch.setattr(ops, name, reads.inside(getattr(ops, name)))
    k, v, kw = scan_inputs(kind)
    leaves = [x.requires_grad_(True) for x in (k, v, *kw.values()) if torch.is_tensor(x)]
    with reads:
        o, s = triton_chunkwise_scan(k, v, **kw)
        torch.autograd.grad(o.square().sum() + s.sum(), leaves)
    assert len(reads.seen) == (1 if "gate" in kw else 0), reads.seen


@contextlib.contextmanager
def _no_function_mode():
    """No torch function mode around a call: on a GPU the conftest's default-device mode is left."""
    if torch._C._is_torch_function_mode_enabled():
        with _pop_mode_temporarily():
            yield
    else:
        yield


def test_forward_mode_ad_is_refused_not_dropped():
    """Dual tensors (forward-mode AD) would leave the kernels' outputs without a tangent, silently:
    the scan refuses them, naming reverse mode."""
    k, v, kw = scan_inputs("delta", T=20)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(v, torch.ones_like(v))
        with pytest.raises(NotImplementedError, match="forward-mode AD .* reverse mode"):
            triton_chunkwise_scan(k, dual, **kw)
        o, _ = triton_chunkwise_scan(k, v, **kw)   # without a tangent, as ever
    assert torch.isfinite(o).all()


class _Subclass(torch.Tensor):
    pass


def test_a_plain_eager_call_skips_the_ops_dispatch(monkeypatch):
    """A plain eager call runs the ops' implementations directly (``ops._plain_eager``): the forward
    op's (``chunk_forward``) with nothing for autograd to record, else ``ops._EagerScan`` (the op's
    autograd formula around them, no op), both bit-identical to the op, gradients too; under a
    dispatch mode, a function mode (a default device), torch.compile, torch.vmap or torch.export,
    and for meta tensors or a tensor subclass, the op itself runs (export keeps it as one node,
    meta tensors get its fake implementation's shapes)."""
    import nlcompile.targets.triton.ops as ops

    calls = []
    op, backward_op = ops.chunk_scan, ops.chunk_scan_backward
    monkeypatch.setattr(ops, "chunk_scan", lambda *a: calls.append("op") or op(*a))
    monkeypatch.setattr(ops, "chunk_scan_backward", lambda *a: calls.append("backward op") or backward_op(*a))

    class Recorded(ops._EagerScan):
        @classmethod
        def apply(cls, *args):
            calls.append("eager autograd")
            return super().apply(*args)

    monkeypatch.setattr(ops, "_EagerScan", Recorded)
    k, v, kw = scan_inputs("gated_delta", T=30)
    scan = lambda: triton_chunkwise_scan(k, v, **kw)  # noqa: E731
    with torch.no_grad(), _HostReads():
        want = scan()

    def path(run) -> str:
        calls.clear()
        assert all(torch.equal(got, w) for got, w in zip(run(), want))
        return calls[0] if calls else "direct"

    assert calls == ["op"]
    with _no_function_mode():
        with torch.no_grad():
            assert path(scan) == "direct"
        assert path(scan) == "direct"   # grad on, no input requiring it
        with torch.no_grad(), torch.device(k.device):
            assert path(scan) == "op"
        with torch.no_grad():
            assert path(lambda: torch.compile(scan, backend="aot_eager")()) == "op"
            assert path(lambda: [x[0] for x in torch.vmap(lambda k: triton_chunkwise_scan(k, v, **kw))(k[None])]) \
                == "op"
            assert path(lambda: triton_chunkwise_scan(k.as_subclass(_Subclass), v, **kw)) == "op"
            calls.clear()
            meta = {n: x.to("meta") if torch.is_tensor(x) else x for n, x in kw.items()}
            o, s = triton_chunkwise_scan(k.to("meta"), v.to("meta"), **meta)
            assert calls == ["op"] and o.is_meta and o.shape == want[0].shape and s.shape == want[1].shape
        leaves = [kw["q"].requires_grad_(True), kw["initial_state"].requires_grad_(True)]
        grads = {}
        for mode in (contextlib.nullcontext(), torch.device(k.device)):
            calls.clear()
            with mode:
                o, s = scan()
                grads[calls[0]] = torch.autograd.grad(o.square().sum() + s.sum(), leaves)
            assert calls == [calls[0], *["backward op"] * (calls[0] == "op")], calls   # the backward alike
        assert list(grads) == ["eager autograd", "op"], list(grads)
        assert all(torch.equal(a, b) for a, b in zip(grads["eager autograd"], grads["op"]))
        learned = torch.nn.Parameter(kw["initial_state"].detach().clone())   # a learned initial state
        calls.clear()
        o, s = triton_chunkwise_scan(k, v, **dict(kw, initial_state=learned))
        assert calls == ["eager autograd"] and torch.equal(
            torch.autograd.grad(o.square().sum() + s.sum(), learned)[0], grads["op"][1])
        with pytest.raises(RuntimeError, match="differentiate twice"):   # as the op's: no second derivative
            o, s = scan()
            (dq,) = torch.autograd.grad(o.square().sum(), kw["q"], create_graph=True)
            dq.sum().backward()
        kw["q"].requires_grad_(False)
        kw["initial_state"].requires_grad_(False)

    class Layer(torch.nn.Module):
        def forward(self, k, v, q, beta, log_gate, h0):
            return triton_chunkwise_scan(k, v, q=q, beta=beta, log_gate=log_gate, initial_state=h0)

    with torch.no_grad():
        exported = torch.export.export(Layer(), (k, v, kw["q"].detach(), kw["beta"], kw["log_gate"],
                                                 kw["initial_state"]))
    nodes = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert nodes.count(torch.ops.nlcompile.chunk_scan_v4.default) == 1, nodes


def test_a_step_recorded_by_autograd_binds_no_signature(monkeypatch):
    """``ops._EagerScan`` sets its context up inside ``forward``: with a ``setup_context`` of its
    own, ``Function.apply`` binds every call's arguments to ``forward``'s signature through
    ``inspect`` (50-60 us before a training step's first launch on this CPU)."""
    import inspect

    calls, signature = [], inspect.signature   # (the interpreter inspects the kernels it runs: not counted)

    def counted(fn, *args, **kwargs):
        calls.append(getattr(fn, "__qualname__", ""))
        return signature(fn, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counted)
    k, v, kw = scan_inputs("gated_delta", T=20)
    kw["q"].requires_grad_(True)
    with _no_function_mode():
        o, s = triton_chunkwise_scan(k, v, chunk_size=16, **kw)
        torch.autograd.grad(o.square().sum() + s.sum(), kw["q"])
    assert not [name for name in calls if "_EagerScan" in name], calls


class _DeviceWork(TorchDispatchMode):
    """Records the aten ops a call runs, and (``launch``, patched over ``tuning.ChunkKernel.launch``)
    each kernel launch by name, in order; ``zero_fills``: the shapes of the tensors that zero-filling
    ops produce."""

    def __init__(self):
        super().__init__()
        self.seen, self.zero_fills = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append(func.overloadpacket.__name__)
        if "zero" in self.seen[-1]:
            self.zero_fills.append(tuple(out.shape))
        return out

    def launch(self, original):
        def recorded(kernel, *args, **kwargs):
            self.seen.append(kernel.name)
            with _disable_current_modes():   # the interpreted kernel's own tensor work is not the call's
                return original(kernel, *args, **kwargs)
        return recorded


@pytest.mark.parametrize("path", ["eager autograd", "op"])
def test_the_backward_gets_no_zero_gradients_for_outputs_the_loss_ignores(path):
    """Outputs that the loss does not use reach the autograd formula as None
    (``ctx.set_materialize_grads(False)``), not as zero tensors autograd would allocate and fill: the
    chunk states, V', W and the WY inverses (288 MiB at the benchmark's shape, every backward);
    only the final state's zero cotangent, which the kernels read, is filled."""
    k, v, kw = scan_inputs("gated_delta", T=40)
    for x in (k, v, kw["q"]):
        x.requires_grad_(True)
    with torch.device(k.device) if path == "op" else contextlib.nullcontext():   # a function mode: the op
        o, final = triton_chunkwise_scan(k, v, chunk_size=16, **kw)
    work = _DeviceWork()
    with work:
        grads = torch.autograd.grad(o.square().sum(), (k, v, kw["q"]))
    assert work.zero_fills == [tuple(final.shape)], work.zero_fills
    want = torch.autograd.grad(reference(k, v, kw)[0].square().sum(), (k, v, kw["q"]))
    assert all(rel_err(g, w) < 1e-4 for g, w in zip(grads, want))


def test_compiled_autograd_sees_the_ops_after_an_eager_forward():
    """A forward recorded eagerly (``ops._EagerScan``) whose backward compiled autograd traces: the
    formula calls the ops then (a tracer must not reach the launchers), with the plain backward's
    gradients."""
    import torch._dynamo.compiled_autograd as compiled_autograd

    grads = []
    for compiled in (False, True):
        k, v, kw = scan_inputs("gated_delta", T=20)
        leaves = (k, v, kw["q"], kw["initial_state"])
        for x in leaves:
            x.requires_grad_(True)
        o, s = triton_chunkwise_scan(k, v, chunk_size=16, **kw)
        with compiled_autograd._enable(torch.compile(backend="eager")) if compiled else contextlib.nullcontext():
            (o.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_a_call_allocates_each_buffer_just_before_the_launch_that_writes_it(kind, monkeypatch):
    """A GPU waits idle from a call's start until its first launch, so before it the host does only
    what that launch needs (the log-gates' floor, the WY inverses' buffer), and each other buffer is
    allocated, and a zero initial state filled, just before the launch that first writes (reads) it
    (``forward.chunk_forward``; the direct path, ``ops._plain_eager``, which a dispatch
    mode turns off, forced here)."""
    import nlcompile.targets.triton.ops as ops
    from nlcompile.targets.triton import tuning

    work = _DeviceWork()
    monkeypatch.setattr(tuning.ChunkKernel, "launch", work.launch(tuning.ChunkKernel.launch))
    monkeypatch.setattr(ops, "_plain_eager", lambda given: True)
    k, v, kw = scan_inputs(kind, T=30)
    del kw["initial_state"]
    with torch.no_grad(), work:
        o, final = triton_chunkwise_scan(k, v, **kw)
    assert work.seen == ["clamp"] * (kind == "gated_delta") + [
        "empty", "_wy_inverse_kernel", "empty", "empty", "_prepare_kernel",
        "empty", "empty", "zeros", "_states_kernel", "empty", "_output_kernel"], work.seen
    want_o, want_final = reference(k, v, kw)
    assert rel_err(o, want_o) < 1e-4 and rel_err(final, want_final) < 1e-4


@pytest.mark.parametrize("N,T", [(2, 0), (0, 5)])
def test_no_steps_or_no_sequences_launch_nothing_and_keep_the_initial_state(N, T, monkeypatch):
    """With T = 0 (or N = 0) no kernel runs: the output is empty, the final state is the initial
    one (zeros when none is given), and its gradient passes through unchanged."""
    from nlcompile.targets.triton import tuning

    monkeypatch.setattr(tuning.ChunkKernel, "launch", lambda *a, **kw: pytest.fail("a kernel launched"))
    gen = Draws(0)
    k, q, v = F.normalize(gen.randn(N, T, 16), dim=-1), gen.randn(N, T, 16), gen.randn(N, T, 32)
    h0, beta = gen.randn(N, 16, 32), gen.rand(N, T)
    with torch.no_grad():
        for given in (h0, None):
            o, final = triton_chunkwise_scan(k, v, q=q, beta=beta, initial_state=given)
            assert o.shape == (N, T, 32) and torch.equal(final, h0 if given is not None else torch.zeros_like(h0))
    h0.requires_grad_(True)
    o, final = triton_chunkwise_scan(k, v, q=q, beta=beta, initial_state=h0)
    cotangent = gen.randn(N, 16, 32)
    (grad,) = torch.autograd.grad((final * cotangent).sum(), h0)
    assert torch.equal(final, h0) and torch.equal(grad, cotangent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; on the CPU "
                    "test_the_kernels_path_reads_no_value_on_the_host checks what they need")
@pytest.mark.parametrize("kind", ["gated_delta", "kda"])
def test_a_cuda_graph_captures_the_kernels(kind):
    """With log-gates the kernels' forward reads no value on the host, so a CUDA graph captures
    it: replayed on other inputs copied into the captured ones, it gives what a plain call gives."""
    k, v, kw = scan_inputs(kind)
    inputs = [k, v, *(x for x in kw.values() if torch.is_tensor(x))]
    run = lambda: triton_chunkwise_scan(k, v, **kw)  # noqa: E731
    with torch.no_grad():
        side = torch.cuda.Stream()   # compiles (and tunes, where on) outside the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        k2, v2, kw2 = scan_inputs(kind, seed=1)
        for mine, other in zip(inputs, [k2, v2, *(x for x in kw2.values() if torch.is_tensor(x))]):
            mine.copy_(other)
        graph.replay()
        want = run()
    for got, ref in zip(captured, want):
        assert rel_err(got, ref) <= 1e-6


def test_gates_with_zeros_fall_back_exactly_with_a_warning():
    k, v, kw = scan_inputs("decay_channel", T=20)
    kw["gate"][:, 5] = 0.0
    with pytest.warns(UserWarning, match="zero or negative"):
        o, s = triton_chunkwise_scan(k, v, **kw)
    o_ref, s_ref = reference(k, v, kw)
    assert rel_err(o, o_ref) <= 1e-4 and rel_err(s, s_ref) <= 1e-4


def test_a_fallback_scan_still_recomputes_and_keeps_the_loop_dtype(monkeypatch):
    """What the kernels cannot run falls back to the PyTorch scan with ``recompute`` and
    ``compute_dtype`` honoured: under activation checkpointing (less kept, the same gradients,
    said in the plan), and a loop computing in float64 is computed in float64."""
    import nlcompile.targets.triton.ops as ops

    monkeypatch.setattr(ops, "_warned", set())
    k, v, kw = scan_inputs("delta", T=37)
    kw["gate"] = torch.sigmoid(torch.randn(k.shape[:2]))
    kw["gate"][:, 3] = 0.0    # zero gates: beyond the kernels' log space
    runs = {}
    for recompute in (False, True):
        leaves = [x.detach().requires_grad_(True) for x in (k, v, kw["q"])]
        notes = []
        with pytest.warns(UserWarning, match="zero or negative"):
            (o, s), saved = saved_storages(lambda: triton_chunkwise_scan(
                *leaves[:2], **dict(kw, q=leaves[2]), recompute=recompute, on_plan=notes.append))
        monkeypatch.setattr(ops, "_warned", set())
        assert notes[0].endswith(", recomputed in the backward (activation checkpoint)") == recompute, notes
        runs[recompute] = torch.autograd.grad(o.square().sum() + s.sum(), leaves), sum(saved.values())
    (grads, kept), (again, lean) = runs[False], runs[True]
    assert lean < kept / 2, (lean, kept)
    for g, w in zip(again, grads):
        assert torch.equal(g, w)
    notes = []
    with pytest.warns(UserWarning, match="a loop computing in float64"):
        o, s = triton_chunkwise_scan(k, v, **kw, compute_dtype=torch.float64, on_plan=notes.append)
    assert o.dtype == torch.float64 and notes == [
        "the PyTorch chunkwise scan: a loop computing in float64 (the kernels compute in float32)"]
    o_ref, s_ref = reference(k, v, kw)
    assert rel_err(o, o_ref) <= 1e-12 and rel_err(s, s_ref) <= 1e-12


def test_target_without_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = TritonTarget().available()
    assert not ok and "TRITON_INTERPRET=1" in why and "target='torch'" in why
    with pytest.raises(RuntimeError, match="not available here: no CUDA GPU"):
        nlcompile.compile(lambda x: x, target="triton")


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    """On a GPU machine, CPU tensors get an error that says what to do, not Triton's pointer error."""
    import nlcompile.targets.triton.forward as forward

    monkeypatch.setattr(forward, "INTERPRETED", tl.constexpr(False))
    k, v, kw = scan_inputs("delta")
    k, v, kw = k.cpu(), v.cpu(), {n: x.cpu() if torch.is_tensor(x) else x for n, x in kw.items()}  # on a GPU too
    with pytest.raises(ValueError, match=r"k is on cpu: the Triton kernels run on CUDA tensors .*target='torch'"):
        triton_chunkwise_scan(k, v, **kw)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_compile_to_kernels_and_match_eager(name):
    entry = MODELS[name]
    compiled = nlcompile.compile(entry.fn, target="triton")
    for T in (1, 7, 70):
        args = entry.make_inputs(B=1, H=2, T=T, D=16)
        assert_close_outputs(compiled(*args), entry.fn(*args))
    report = compiled.explain(*entry.make_inputs(B=1, H=2, T=7, D=16))
    assert [lp.rewrite for lp in report.loops] == ["chunkwise"] * len(report.loops), str(report)
    for lp in report.loops:   # the zoo's loops compute in fp32; per-channel gates get chunk 16
        chunks = [launched_chunk(s.per_channel) for s in lp.states]
        assert lp.runs == tuple(f"S{s.index} on the Triton kernels, chunk {c}, ieee dots"
                                for s, c in zip(lp.states, chunks)), str(report)
    assert compiled.captures == 1


def test_explain_says_when_a_loop_runs_the_pytorch_scan(monkeypatch):
    """float64 is beyond the kernels: the loop runs the exact PyTorch scan, explain says why."""
    import nlcompile.targets.triton.ops as ops

    monkeypatch.setattr(ops, "_warned", set())   # each fallback reason warns once per process
    entry = MODELS["deltanet_matmul_bthd"]
    args = [x.double() for x in entry.make_inputs(B=1, H=2, T=9, D=16)]
    compiled = nlcompile.compile(entry.fn, target="triton")
    with pytest.warns(UserWarning, match="float64"):
        assert_close_outputs(compiled(*args), entry.fn(*args), 1e-10)
    (loop,) = compiled.explain(*args).loops
    assert loop.runs == ("S0 on the PyTorch chunkwise scan: float64 inputs (the kernels compute in float32)",)
    assert "runs (latest call): S0 on the PyTorch chunkwise scan: float64" in str(compiled.explain(*args))


def _spy_on_scans(monkeypatch) -> list[dict]:
    """Record the tensors (and out_dtype) every loop hands ``triton_chunkwise_scan``."""
    import nlcompile.targets.triton.ops as ops

    calls, scan = [], ops.triton_chunkwise_scan

    def spy(k, v, **kw):
        calls.append(dict(k=k, v=v, **kw))
        return scan(k, v, **kw)

    monkeypatch.setattr(ops, "triton_chunkwise_scan", spy)
    return calls


@pytest.mark.parametrize("name,layout", [("deltanet_matmul_bthd", "heads_last"), ("gla_factor_tbhd", "heads_last"),
                                         ("deltanet_fla", "flat"), ("gla_naive_bhtd", "flat")])
def test_loops_pass_the_kernels_their_values_in_place(name, layout, monkeypatch):
    """A loop hands the kernels its per-step values without a transposing copy: [1, T, N, d] where
    they are time-major (leaves computed per step, stacked over T; sources [B, T, H, D] or [T, B, H,
    D]), [N, T, d] where the sources are [B, H, T, D]; contiguous either way (no copy in the scan)."""
    calls = _spy_on_scans(monkeypatch)
    entry = MODELS[name]
    args = entry.make_inputs(B=2, H=3, T=9, D=16)
    assert_close_outputs(nlcompile.compile(entry.fn, target="triton")(*args), entry.fn(*args))
    call = calls[-1]   # the call above (the ones before it probed the loop while compiling)
    per_step = [x for n, x in call.items() if torch.is_tensor(x) and n != "initial_state"]
    assert {x.dim() for x in per_step} <= ({4, 3} if layout == "heads_last" else {3, 2}), call.keys()
    assert call["k"].shape[:-1] == ((1, 9, 6) if layout == "heads_last" else (6, 9))
    assert all(x.is_contiguous() for x in per_step)


def _linear_attention_in_bf16(q, k, v):
    """[B, T, H, D] linear attention computed in the inputs' dtype throughout, the state included."""
    B, T, H, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(T):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((S * q[:, t, :, :, None]).sum(-2))
    return torch.stack(outs, 1)


def test_a_bf16_loop_runs_the_kernels_in_bf16(monkeypatch):
    """A loop computed in bf16 hands the kernels its bf16 keys, values and queries as they are (so
    they choose bf16 dots, and read half the bytes), and a readout it returns as it is, in bf16,
    is written in bf16 by the kernels (out_dtype); no further from the float64 run than the loop
    run eagerly in bf16 (DESIGN 5: slack 2x + 2e-3)."""
    calls = _spy_on_scans(monkeypatch)
    gen = Draws(0)
    q, k, v = (gen.randn(2, 50, 2, 16).bfloat16() for _ in range(3))
    compiled = nlcompile.compile(_linear_attention_in_bf16, target="triton")
    got = compiled(q, k, v)
    eager, exact = _linear_attention_in_bf16(q, k, v), _linear_attention_in_bf16(q.double(), k.double(), v.double())
    assert calls and all(c["out_dtype"] == torch.bfloat16 for c in calls)
    assert all(c[n].dtype == torch.bfloat16 for c in calls for n in ("k", "v", "q"))
    (loop,) = compiled.explain(q, k, v).loops
    assert loop.runs == (f"S0 on the Triton kernels, chunk 64, {dot_precision(k, q)} dots",)
    assert got.dtype == torch.bfloat16
    assert_within_eager_error([got], [eager], [exact])


def _deltanet_upcasting(q, k, v, beta):
    """[B, T, H, D] DeltaNet that computes in fp32 (or wider) whatever its inputs' dtype, as
    reference code often does: each step's keys, values and queries upcast inside the loop."""
    B, T, H, D = k.shape
    acc = torch.promote_types(k.dtype, torch.float32)
    S = k.new_zeros(B, H, D, v.shape[-1], dtype=acc)
    outs = []
    for t in range(T):
        k_t, v_t, q_t = k[:, t].to(acc), v[:, t].to(acc), q[:, t].to(acc)
        err = torch.einsum("bhk,bhkv->bhv", k_t, S) - v_t
        S = S - beta[:, t, :, None, None].to(acc) * k_t[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    return torch.stack(outs, 1).to(q.dtype)


def test_a_loop_that_upcasts_bf16_inputs_runs_the_kernels_in_fp32(monkeypatch):
    """bf16 inputs upcast to fp32 inside the loop: the kernels read the bf16 tensors as they are
    (no fp32 copies) and compute as the loop does, in fp32 (ieee dots, fp32 gradient partials,
    one rounding to bf16 at the end): output and gradients as close to the float64 run as the
    loop's own eager run (bf16 dots here were 2.5x further on the output)."""
    calls = _spy_on_scans(monkeypatch)
    gen = Draws(0)
    q, k, v = (gen.randn(2, 150, 2, 32).bfloat16() for _ in range(3))
    k = F.normalize(k.float(), dim=-1).bfloat16()
    beta = gen.rand(2, 150, 2)
    compiled = nlcompile.compile(_deltanet_upcasting, target="triton")
    runs = {}
    for name, fn, args in (("ours", compiled, (q, k, v, beta)), ("eager", _deltanet_upcasting, (q, k, v, beta)),
                           ("exact", _deltanet_upcasting, tuple(x.double() for x in (q, k, v, beta)))):
        leaves = [x.detach().requires_grad_(True) for x in args]
        out = fn(*leaves)
        w = Draws(1).randn(out.shape)
        runs[name] = (out, *torch.autograd.grad((out.double() * w.double()).sum(), leaves))
    assert calls and all(c[n].dtype == torch.bfloat16 and c["compute_dtype"] == torch.float32
                         for c in calls for n in ("k", "v", "q"))
    (loop,) = compiled.explain(q, k, v, beta).loops
    assert loop.runs == (f"S0 on the Triton kernels, chunk {launched_chunk(d=32)}, ieee dots",)
    for i, name in enumerate(("o", "dq", "dk", "dv", "dbeta")):
        got, eager, exact = runs["ours"][i], runs["eager"][i], runs["exact"][i]
        assert got.dtype == eager.dtype, name
        assert rel_err(got, exact) <= 1.1 * rel_err(eager, exact) + 1e-4, (name, rel_err(got, exact),
                                                                             rel_err(eager, exact))


def test_a_layer_under_autocast_runs_the_kernels_in_bf16():
    """Under ``torch.autocast`` a layer's loop rounds its fp32 state to bf16 for every product
    (its bmm), so the kernels may use bf16 dots (flash-linear-attention's precision, the fast
    one), and do: output and gradients no further from an fp64 run than eager's own run under
    autocast (slack 2x + 2e-3)."""
    entry = LAYERS["deltanet_layer"]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=16).to(torch.get_default_device())
    (x,) = entry.make_inputs(B=1, T=70, d_model=32)
    compiled = nlcompile.compile(model, target="triton")
    assert_within_eager_error(*runs_under_autocast(compiled, model, x))
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        (loop,) = compiled.explain(x).loops
    prec = dot_precision(x.bfloat16(), None)
    assert loop.runs == (f"S0 on the Triton kernels, chunk {launched_chunk(False, 16, prec)}, {prec} dots",)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zoo_layers_train_through_the_kernels(name):
    """Forward and parameter gradients of the nn.Module layers, against eager."""
    entry = LAYERS[name]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=16).to(torch.get_default_device())
    compiled = nlcompile.compile(model, target="triton")
    (x,) = entry.make_inputs(B=1, T=33, d_model=32)
    got, want = compiled(x), model(x)
    assert_close_outputs(got, want)
    params = list(model.parameters())
    g_got = torch.autograd.grad(as_tuple(got)[0].square().sum(), params)
    g_want = torch.autograd.grad(as_tuple(want)[0].square().sum(), params)
    for g, w in zip(g_got, g_want):
        assert rel_err(g, w) <= 1e-4


def _decay_into_state(q, k, v, state):
    """A decaying linear-attention loop that starts from ``state`` and writes its final state
    back into it (eager keeps no reference to the initial state: a scalar factor's product needs
    none for its gradient, so eager trains too)."""
    S = state
    outs = []
    for t in range(q.shape[1]):
        S = 0.9 * S + k[:, t, :, None] * v[:, t, None, :]
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    state.copy_(S)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_loop_writing_its_state_back_trains_on_the_kernels(recompute):
    """The op keeps no reference to the initial state it does not need (H_0 is kept), and a copy
    when it recomputes: the program writing the final state back into that tensor trains, with
    eager's gradients (autograd refused it: the op had saved the overwritten tensor)."""
    gen = Draws(0)
    q, k, v = (gen.randn(2, 20, 8) for _ in range(3))
    state = gen.randn(2, 8, 8)
    compiled = nlcompile.compile(_decay_into_state, target="triton", recompute=recompute)
    runs = []
    for fn in (compiled, _decay_into_state):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        written = state.clone()
        out = fn(*leaves, written)
        runs.append((written, *torch.autograd.grad(out.square().sum(), leaves)))
    (loop,) = compiled.explain(q, k, v, state.clone()).loops
    assert loop.runs[0].startswith("S0 on the Triton kernels"), loop.runs
    for got, want in zip(*runs):
        assert rel_err(got, want) <= 1e-4


def test_compiled_layer_recomputes_on_request():
    """``compile(recompute=True)``: the layer trains to bit-identical parameter gradients, autograd
    keeps less between forward and backward (no chunk states), and explain says so."""
    entry = LAYERS["deltanet_layer"]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=16).to(torch.get_default_device())
    (x,) = entry.make_inputs(B=1, T=70, d_model=32)
    runs = {}
    for recompute in (False, True):
        compiled = nlcompile.compile(model, target="triton", recompute=recompute)
        compiled(x)   # compiles (the probes and checks run without autograd's saving)
        out, saved = saved_storages(lambda: compiled(x))
        grads = torch.autograd.grad(as_tuple(out)[0].square().sum(), list(model.parameters()))
        runs[recompute] = grads, sum(saved.values())
        (loop,) = compiled.explain(x).loops
        assert loop.runs == (f"S0 on the Triton kernels, chunk {launched_chunk()}, ieee dots"
                             + (", chunk states recomputed in the backward" if recompute else ""),)
    (kept, kept_bytes), (again, lean_bytes) = runs[False], runs[True]
    # exactly the op's intermediates are no longer kept (2 heads, T = 70 in chunks of c, dk = dv =
    # 16, fp32), and a copy of the initial state is, for the recomputation
    n, c, d = 2, launched_chunk(), 16
    chunks = cdiv(70, c)
    rows = chunks * c
    states, v_new, w, tm, h0 = n * chunks * d * d, n * rows * d, n * rows * d, n * rows * c, n * d * d
    assert kept_bytes - lean_bytes == 4 * (states + v_new + w + tm - h0), (kept_bytes, lean_bytes)
    for g, w in zip(again, kept):
        assert torch.equal(g, w)


@pytest.mark.parametrize("through_triton", [False, True])
def test_host_overhead_benchmark_runs(capsys, through_triton):
    """benchmarks/host_overhead.py times the Python of the kernels' path (launches stubbed), and
    puts the launcher back after; with ``--triton`` (no GPU) through Triton's launch path, in a
    child process."""
    from nlcompile.targets.triton import tuning

    if through_triton and torch.cuda.is_available():
        assert load_benchmark("host_overhead").main(["--triton"]) == 2   # the real launches are timed there
        return
    launch = tuning.ChunkKernel.launch
    assert load_benchmark("host_overhead").main(["--calls", "20"] + ["--triton"] * through_triton) == 0
    out = capsys.readouterr().out
    assert ("through Triton's launch path" in out) == through_triton
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith(("| DeltaNet", "| Gated"))]
    assert len(rows) == 2 and all(float(us) > 0 for row in rows for us in row[1:5])
    # a step's first launch comes within it
    assert all(float(row[4]) < float(row[3]) for row in rows)
    # WY inverse, prepare, states, output: each reached the launcher (with --triton Triton's, down
    # to the stand-in compiled kernel's run)
    assert [int(row[5]) for row in rows] == [4, 4]
    assert tuning.ChunkKernel.launch is launch


def test_host_overhead_benchmark_names_what_fla_needs(tmp_path, capsys):
    """``--fla`` (fla's Python path beside ours) asks for ``--triton``, and for fla where it is
    missing, with the command that installs it."""
    script = load_benchmark("host_overhead")
    with pytest.raises(SystemExit):
        script.main(["--fla"])
    assert "--fla needs --triton" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit, match="pip install --no-deps --target"):
        script.main(["--triton", "--fla", "--fla-site", str(tmp_path)])


def test_gpu_benchmark_script_runs_in_smoke_mode(capsys, tmp_path):
    """benchmarks/bench_triton.py on tiny shapes (its GPU numbers need a GPU; this checks the script),
    here with fp16 inputs (``--dtype``), and its table rendered again from the rows it saved; with
    recompute the kernels keep less for the backward."""
    import json

    bench = load_benchmark("bench_triton")
    saved = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--dtype", "fp16", "--dots", "auto,ieee", "--compiled", "--recompute",
                       "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"B=1 H=2 D=16, fp16 q, k, v; torch {torch.__version__}, triton " in out.splitlines()[0]
    fp16 = torch.empty(0, dtype=torch.float16)   # "auto": the precisions chosen for fp16 inputs, named as chosen
    precs = dot_precision(fp16, None), dot_precision(fp16, None, backward=True)
    auto, c = "/".join(precs), launched_chunk(False, 16, *precs)
    for kernel in (f"nlcompile-triton ({auto}, auto C={c})", f"nlcompile-triton (ieee, auto C={launched_chunk()})",
                   f"nlcompile-triton (ieee, auto C={launched_chunk()}, recompute)", "torch target",
                   "nlcompile.compile (zoo loop, fp32 inside)"):
        assert f"| DeltaNet | 40 | {kernel} |" in out and f"| GatedDeltaNet | 40 | {kernel} |" in out
    rows = json.loads(saved.read_text())["rows"]
    # every row's gradients checked against the fp32 reference: near it, and nothing of ours named as far
    # from it (fla's rows, on a GPU machine with fla installed, are its own numerics)
    ours = [r for r in rows if r["kernel"] != "fla"]
    assert all(r["grad_err"] < 2e-2 for r in ours), [(r["kernel"], r["grad_err"]) for r in ours]
    assert not [line for line in out.splitlines() if "gradients' error" in line and " fla: " not in line]
    kept = {(r["model"], r["kernel"]): r["kept_mib"] for r in rows}
    for model in ("DeltaNet", "GatedDeltaNet"):
        assert (kept[model, f"nlcompile-triton ({auto}, auto C={c}, recompute)"]
                < kept[model, f"nlcompile-triton ({auto}, auto C={c})"] / 5)
    assert bench.main(["--render", str(saved)]) == 0
    rendered = capsys.readouterr().out
    assert [line for line in rendered.splitlines() if line.startswith("| ")] == \
        [line for line in out.splitlines() if line.startswith("| ")]


def test_gpu_benchmark_variants_set_only_the_knobs_they_fix(monkeypatch):
    """bench_triton's "auto" variant leaves the environment as it is (the launchers' choice, which its
    label names: with ``NLCOMPILE_TRITON_TUNE=0``, as gpu_check.sh runs the tests, untuned, not
    tuning every shape of the smoke test); the others set their knobs while they run, then restore."""
    import os

    bench = load_benchmark("bench_triton")
    monkeypatch.setenv("NLCOMPILE_TRITON_TUNE", "0")
    monkeypatch.setenv("NLCOMPILE_TRITON_WARPS", "4")
    monkeypatch.delenv("NLCOMPILE_TRITON_DOT", raising=False)
    monkeypatch.delenv("NLCOMPILE_TRITON_CHUNK", raising=False)
    before = dict(os.environ)
    assert bench.variant_knobs("auto", "auto", "auto") == {}
    with bench.kernel_knobs(bench.variant_knobs("bf16", "fixed", "32")):
        assert [os.environ.get(name) for name in ("NLCOMPILE_TRITON_DOT", "NLCOMPILE_TRITON_TUNE",
                                                  "NLCOMPILE_TRITON_WARPS", "NLCOMPILE_TRITON_CHUNK")] \
            == ["bf16", "0", None, "32"]
    with bench.kernel_knobs(bench.variant_knobs("auto", "8", "auto")):
        assert os.environ["NLCOMPILE_TRITON_WARPS"] == "8" and os.environ["NLCOMPILE_TRITON_TUNE"] == "0"
    assert dict(os.environ) == before


def test_gpu_benchmark_timeline_accounts_for_a_call():
    """bench_triton's timeline of a call (``timeline_of``; on a GPU its kernels), here on the CPU
    profiler's events with two matmuls as the kernels: idle 20 ms before the first and 30 ms
    between them show as the time to the first kernel and as a gap, the matmuls as busy time."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    bench = load_benchmark("bench_triton")
    a = torch.randn(256, 256, device="cpu")   # CPU events, also where the tests' default device is CUDA
    a @ a   # warm: a process's first CPU matmul took 41 ms on an H100 machine (more than the 30 ms gap)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(bench.TIMELINE_MARK):
            time.sleep(0.02)
            a @ a
            time.sleep(0.03)
            a @ a
    line = bench.timeline_of(prof.events(), lambda e: e.name == "aten::mm")
    assert line["kernels"] == 2 and line["to_first_kernel"] >= 20 and line["gaps"] >= 30
    assert 0 < line["busy"] < line["gaps"] and line["host"] >= line["to_first_kernel"] + line["busy"] + line["gaps"]
    text = bench.profile_text(dict(model="m", T=1, kernel="k", timeline_fwd=line))
    assert "2 kernels busy" in text and f"gaps {line['gaps']:.3f}" in text


def test_gpu_benchmark_timeline_arithmetic():
    """``timeline_of`` on GPU-like events (us): the call's mark on the host, its copy on the device
    (which spans everything and is no kernel), overlapping kernels counted once."""
    from types import SimpleNamespace as Event

    bench = load_benchmark("bench_triton")
    span = lambda name, start, end, device: Event(name=name, device=device,  # noqa: E731
                                                  time_range=Event(start=start, end=end))
    events = [span(bench.TIMELINE_MARK, 0, 500, "cpu"), span(bench.TIMELINE_MARK, 50, 1500, "cuda"),
              span("a", 100, 300, "cuda"), span("b", 250, 400, "cuda"), span("c", 1000, 1200, "cuda")]
    line = bench.timeline_of(events, lambda e: e.device == "cuda")
    assert line == dict(kernels=3, to_first_kernel=0.1, busy=0.5, gaps=0.6, host=0.5)


def test_autotune_times_reads_a_gpu_runs_results(tmp_path, capsys):
    """benchmarks/autotune_times.py prints each kernel's and key's best and slowest candidate from
    Triton's autotune files, in a folder or in gpu_check.sh's .tgz."""
    import json
    import tarfile

    folder = tmp_path / "cache" / "HASH"
    folder.mkdir(parents=True)
    config = lambda bv, warps: {"kwargs": {"BV": bv}, "num_warps": warps, "num_stages": 2}  # noqa: E731
    (folder / "_states_kernel.autotune.json").write_text(json.dumps({
        "key": [128, 16, "bf16", "torch.bfloat16", "torch.float32"],
        "configs_timings": [[config(32, 4), [0.25, 0.24, 0.26]], [config(64, 4), [0.199, 0.19, 0.2]],
                            [config(64, 8), [0.3, 0.29, 0.31]], [config(128, 8), [float("inf")] * 3]]}))
    saved = tmp_path / "triton-autotune.tgz"
    with tarfile.open(saved, "w:gz") as tar:
        tar.add(tmp_path / "cache", arcname=".")
    script = load_benchmark("autotune_times")
    for source in (tmp_path / "cache", saved):
        assert script.main([str(source)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| _states_kernel"))
        assert row == "| _states_kernel | 128 16 bf16 bf16 fp32 | 199.0 | BV=64 warps=4 stages=2 | 300.0 | 4 (1) |"
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nothing")])


def test_gpu_benchmark_names_far_gradients():
    """bench_triton.far_gradients names the rows whose gradients are not finite or far (over 10x
    and over 1e-2) from the torch target's error on the same inputs."""
    bench = load_benchmark("bench_triton")
    row = lambda kernel, err, T=2048: dict(model="DeltaNet", T=T, kernel=kernel, grad_err=err)  # noqa: E731
    rows = [row("torch target", 4e-3), row("ours ok", 3.9e-2), row("ours far", 4.1e-2), row("ours nan", float("nan")),
            row("fla", None), row("torch target", 0.0, T=8192), row("ours fp32", 9e-3, T=8192),
            row("ours wrong", 0.5, T=8192)]
    far = bench.far_gradients(rows)
    assert [line.split(":")[0] for line in far] == ["DeltaNet T=2048 ours far", "DeltaNet T=2048 ours nan",
                                                   "DeltaNet T=8192 ours wrong"]
    assert far[0].endswith("over 10x the torch target's 4.0e-03")


def test_gpu_candidates_script(capsys):
    """benchmarks/gpu_candidates.py on tiny shapes (a row per candidate of every kernel, each forced in
    turn, none marked wrong), forcing a candidate takes (the grads kernel's launch goes through an
    autotuner holding that candidate alone), and what it marks wrong."""
    import os

    from nlcompile.targets.triton import backward, forward, tuning
    from nlcompile.targets.triton_target import interpreting

    script = load_benchmark("gpu_candidates")
    tune = os.environ.get("NLCOMPILE_TRITON_TUNE")   # gpu_check.sh runs the tests with it set
    assert script.main(["--smoke", "--models", "GatedDeltaNet"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| GatedDeltaNet |")]
    kernels = [getattr(module, n) for module in (forward, backward)
               for n in script.KERNELS[module.__name__.rsplit(".", 1)[1]]]
    counts = [len(script.candidates(k, 64, "bf16", interpreting())) for k in kernels]
    assert len(kernels) == 8 and len(rows) == 2 + sum(counts)
    assert "WRONG" not in out

    assert os.environ.get("NLCOMPILE_TRITON_TUNE") == tune   # the script's knob was set for its run only
    k, v, kw = scan_inputs("gated_delta", T=20, dk=16, dv=40)
    config = next(c for c in script.candidates(backward.GRADS, 40, "bf16", False) if c.kwargs["BV"] == 32)
    with script.forced(backward, "GRADS", config):
        tuned, runs = backward.GRADS.tuned, []
        tuned.run = lambda *args, _run=tuned.run, **kwargs: runs.append(1) or _run(*args, **kwargs)
        k.requires_grad_()
        triton_chunkwise_scan(k, v, **kw)[0].sum().backward()
        assert runs == [1] and [c.kwargs for c in tuned.configs] == [config.kwargs] == [dict(BV=32)]
    assert backward.GRADS is not tuned and isinstance(backward.GRADS, tuning.ChunkKernel)

    base = dict(model="m", kernel="(untuned launch)", config="-", err=1e-3, grad_err=4e-3)
    fine, far, nan = (dict(base, kernel="x", err=e, grad_err=g) for e, g in ((9e-3, 3e-2), (2e-2, 1e-3),
                                                                              (1e-3, float("nan"))))
    not_run = dict(model="m", kernel="x", config="-", note="not run (OutOfResources: ...)")
    fault = dict(model="m", kernel="x", config="-", fault="FAULT (RuntimeError: CUDA error: ...)")
    assert script.wrong([base, fine, far, nan, not_run, fault]) == [far, nan, fault]
    table = script.table([base, fine, far, not_run, fault], "d")
    for line in ("| m | x | - | 9.0e-03 | 3.0e-02 | ok |", "| m | x | - | 2.0e-02 | 1.0e-03 | WRONG |",
                 "| m | x | - | - | - | not run (OutOfResources: ...) |",
                 "| m | x | - | - | - | FAULT (RuntimeError: CUDA error: ...) |"):
        assert line in table


def test_per_channel_delta_gate_after_falls_back_and_is_refused():
    """The gate-after order with a per-channel gate and beta has no chunkwise form: the target says
    so and the PyTorch scan it falls back to raises."""
    k, v, kw = scan_inputs("delta", T=20)
    kw["log_gate"] = -F.softplus(torch.randn(2, 20, 16))
    with pytest.warns(UserWarning, match="gate_first=False"), pytest.raises(NotImplementedError):
        triton_chunkwise_scan(k, v, **kw)
