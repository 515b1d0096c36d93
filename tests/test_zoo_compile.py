"""Every zoo model and spelling, compiled: numbers against eager, kinds via explain.

fp32: max error <= 1e-4 relative to the output scale, at T in {1, 7, 64, 1000}
and two batch/head shapes, one compiled object per shape (captures stay 1).
bf16: our result must be no further from an fp64 run than eager's own bf16
run is, with a slack factor of 2 plus 2e-3 absolute (relative to scale).
"""
from __future__ import annotations

import pytest
import torch

import nlcompile
from _compare import as_tuple, assert_close_outputs, assert_within_eager_error, rel_err, runs_under_autocast
from nlcompile.zoo import LAYERS, MODELS


def check(compiled, fn, args, tol=1e-4):
    assert_close_outputs(compiled(*args), fn(*args), tol)


SHAPES = [dict(B=2, H=3, D=8), dict(B=1, H=2, D=16)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_model_compiles_exactly(name):
    entry = MODELS[name]
    for shape in SHAPES:
        compiled = nlcompile.compile(entry.fn)
        for T in (7, 64, 1000, 1):
            with torch.no_grad():
                check(compiled, entry.fn, entry.make_inputs(T=T, **shape))
        assert compiled.captures == 1
        report = compiled.explain(*entry.make_inputs(T=9, **shape))
        assert len(report.loops) == 1, str(report)
        loop = report.loops[0]
        assert loop.kind == entry.kind, str(report)
        assert loop.rewrite == "chunkwise", str(report)
        assert [r.endswith(f"({entry.readout} update)") for r in loop.readouts] == [True] * len(loop.readouts)
        # how the latest call ran each state (T = 1: the scan's chunk is capped at T)
        assert loop.runs == tuple(f"S{s.index} on the PyTorch chunkwise scan, chunk 1" for s in loop.states), str(report)


LOW_PRECISION = [(n, torch.bfloat16, 96) for n in sorted(MODELS)] + [
    (n, torch.float16, 80) for n in ("deltanet_fla", "gla_naive_bhtd", "gated_deltanet_fla", "retnet_recurrent")]


@pytest.mark.parametrize("name,dtype,T", LOW_PRECISION, ids=[f"{n}-{str(d)[6:]}" for n, d, _ in LOW_PRECISION])
def test_zoo_model_low_precision(name, dtype, T):
    """No further from an fp64 run than eager's own run in that dtype (slack 2x + 2e-3)."""
    entry = MODELS[name]
    args = entry.make_inputs(B=2, H=2, T=T, D=16, dtype=dtype)
    compiled = nlcompile.compile(entry.fn)
    with torch.no_grad():
        got, eager = as_tuple(compiled(*args)), as_tuple(entry.fn(*args))
        exact = as_tuple(entry.fn(*[a.double() if a.is_floating_point() else a for a in args]))
    assert compiled.explain(*args).loops[0].rewrite == "chunkwise"
    present = [(g, e, x) for g, e, x in zip(got, eager, exact) if x is not None]
    assert all(g.dtype == e.dtype for g, e, _ in present)
    assert_within_eager_error(*zip(*present))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zoo_layer_module(name):
    entry = LAYERS[name]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=8)
    compiled = nlcompile.compile(model)
    for T in (5, 130):
        (x,) = entry.make_inputs(B=2, T=T, d_model=32)
        with torch.no_grad():
            check(compiled, model, (x,))
    assert compiled.captures == 1
    (x,) = entry.make_inputs(B=2, T=9, d_model=32)
    loop = compiled.explain(x).loops[0]
    assert loop.kind == entry.kind and loop.rewrite == "chunkwise"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zoo_layer_gradients_match_eager(name):
    """Training through the compiled program: input and parameter gradients."""
    entry = LAYERS[name]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=8)
    compiled = nlcompile.compile(model)
    (x,) = entry.make_inputs(B=2, T=40, d_model=32)
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        assert rel_err(got, want) <= 1e-4
    assert compiled.explain(x).loops[0].rewrite == "chunkwise"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zoo_layer_under_autocast(name):
    """A layer trained under ``torch.autocast`` (bf16 on this CPU) stays chunkwise (the scans turn
    autocast off inside: its bf16 matmuls once broke the triangular solve, and the check against
    eager sent the loop back to sequential), and output and gradients are no further from an fp64
    run than eager's own run under autocast (slack 2x + 2e-3)."""
    entry = LAYERS[name]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=8)
    compiled = nlcompile.compile(model)
    (x,) = entry.make_inputs(B=2, T=70, d_model=32)
    assert_within_eager_error(*runs_under_autocast(compiled, model, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled.explain(x).loops[0].rewrite == "chunkwise"


def test_autocast_state_is_part_of_the_signature():
    """A program traced under autocast holds its casts: a call without autocast compiles its own
    program (fp32, as eager) instead of reusing it, and the autocast one is reused."""
    entry = LAYERS["deltanet_layer"]
    model = entry.make_module(seed=0, d_model=32, n_heads=2, head_dim=8)
    compiled = nlcompile.compile(model)
    (x,) = entry.make_inputs(B=2, T=20, d_model=32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert compiled(x).dtype == torch.bfloat16
        check(compiled, model, (x,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(x)
    assert compiled.captures == 2


@pytest.mark.parametrize("head_dim", [5, 7, 11])
def test_probe_length_equal_to_a_size_inside_the_model(head_dim):
    """A head dim that only exists inside forward (after a view) may equal a probe length."""
    entry = LAYERS["deltanet_layer"]
    model = entry.make_module(seed=0, d_model=2 * head_dim, n_heads=2, head_dim=head_dim)
    compiled = nlcompile.compile(model)
    (x,) = entry.make_inputs(B=2, T=40, d_model=2 * head_dim)
    with torch.no_grad():
        check(compiled, model, (x,))
    assert compiled.explain(x).loops[0].rewrite == "chunkwise"


def test_the_program_never_calls_back_into_the_zoo():
    from nlcompile.loop_ops import ChunkwiseLoop, SequentialLoop

    entry = MODELS["deltanet_fla"]
    compiled = nlcompile.compile(entry.fn)
    program = compiled.compiled_for(*entry.make_inputs(T=20)).program
    assert "zoo" not in program.code
    loops = [m for name, m in program.named_children()]
    assert loops and all(isinstance(m, (ChunkwiseLoop, SequentialLoop)) for m in loops)
    for module in loops:
        for sub in module.modules():
            assert "zoo" not in type(sub).__module__
            if isinstance(sub, torch.fx.GraphModule):
                assert "zoo" not in sub.code
