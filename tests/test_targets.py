"""Targets: the registry, a user-registered target, an entry-point plug-in, inductor."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import nlcompile
from nlcompile.loop_ops import SequentialLoop
from nlcompile.memory import saved_storages

from _benchmarks import load_benchmark


def delta_loop(q, k, v, beta):
    S = torch.zeros(q.shape[0], q.shape[2], v.shape[2])
    outs = []
    for t in range(q.shape[1]):
        err = torch.einsum("bk,bkv->bv", k[:, t], S) - v[:, t]
        S = S - beta[:, t, None, None] * k[:, t, :, None] * err[:, None, :]
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    return torch.stack(outs, 1)


def inputs(T, B=2, D=6):
    k = F.normalize(torch.randn(B, T, D), dim=-1)
    return torch.randn(B, T, D), k, torch.randn(B, T, D), torch.rand(B, T)


def test_builtin_targets_are_listed():
    assert {"torch", "inductor"} <= set(nlcompile.list_targets())


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ValueError, match="known targets: .*torch"):
        nlcompile.compile(delta_loop, target="no-such-target")


class SequentialOnly:
    """A user target with no fast paths: every loop runs as one sequential loop op."""

    name = "sequential-only"
    fast_kinds = frozenset()

    def available(self):
        return True, ""

    def loop_module(self, plan):
        raise AssertionError("never asked: no fast kinds")

    def finalize(self, program):
        self.program = program
        return program


def test_registered_target_is_used():
    target = SequentialOnly()
    nlcompile.register_target("sequential-only", target)
    compiled = nlcompile.compile(delta_loop, target="sequential-only")
    args = inputs(40)
    torch.testing.assert_close(compiled(*args), delta_loop(*args))
    loop = compiled.explain(*args).loops[0]
    assert loop.kind == "delta" and loop.rewrite == "sequential"
    assert "no fast path for delta" in loop.reason
    assert any(isinstance(m, SequentialLoop) for m in target.program.modules())


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    dist = tmp_path / "nlc_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlc-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nlcompile.targets]\ndemo = nlc_demo_plugin:DemoTarget\n")
    (tmp_path / "nlc_demo_plugin.py").write_text(textwrap.dedent("""
        from nlcompile.targets.torch_target import TorchTarget

        class DemoTarget(TorchTarget):
            name = "demo"
            finalized = 0

            def finalize(self, program):
                DemoTarget.finalized += 1
                return program
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "demo" in nlcompile.list_targets()
    compiled = nlcompile.compile(delta_loop, target="demo")
    args = inputs(30)
    torch.testing.assert_close(compiled(*args), delta_loop(*args))
    assert sys.modules["nlc_demo_plugin"].DemoTarget.finalized >= 1
    assert compiled.explain(*args).loops[0].rewrite == "chunkwise"


def test_a_target_with_its_own_scan(monkeypatch):
    """A user target running the chunkwise loops through its own scan function (here the torch
    scan behind a narrower signature: no ``on_plan``) is called with what it takes."""
    from nlcompile.loop_ops import ChunkwiseLoop
    from nlcompile.targets.scan import choose_chunk_size, chunkwise_scan
    from nlcompile.targets.torch_target import TorchTarget

    calls = []

    def my_scan(k, v, *, q=None, beta=None, write=None, gate=None, log_gate=None, initial_state=None,
                readout="after", chunk_size=64, gate_first=False, q_scale=1.0, out_dtype=None):
        calls.append(chunk_size)
        return chunkwise_scan(k, v, q=q, beta=beta, write=write, gate=gate, log_gate=log_gate,
                              initial_state=initial_state, readout=readout, chunk_size=chunk_size,
                              gate_first=gate_first, q_scale=q_scale, out_dtype=out_dtype)

    class OwnScan(TorchTarget):
        name = "own-scan"

        def loop_module(self, plan):
            return ChunkwiseLoop(plan.loop.body, plan.analysis, plan.loop.step_dims, my_scan, plan.chunk_size,
                                 choose_chunk_size)

    nlcompile.register_target("own-scan", OwnScan())
    compiled = nlcompile.compile(delta_loop, target="own-scan")
    args = inputs(30)
    torch.testing.assert_close(compiled(*args), delta_loop(*args), rtol=1e-4, atol=1e-5)
    loop = compiled.explain(*args).loops[0]
    assert calls and loop.rewrite == "chunkwise" and loop.runs == ()


def test_recompute_checkpoints_a_scan_that_cannot_recompute_itself():
    """The torch target's scan has no ``recompute`` of its own: with ``compile(recompute=True)`` it
    runs under activation checkpointing (less kept for the backward, the same gradients), and
    explain says so."""
    args = inputs(70)
    runs = {}
    for recompute in (False, True):
        compiled = nlcompile.compile(delta_loop, target="torch", recompute=recompute)
        compiled(*args)
        leaves = [x.detach().requires_grad_(True) for x in args]
        out, saved = saved_storages(lambda: compiled(*leaves))
        runs[recompute] = torch.autograd.grad(out.square().sum(), leaves), sum(saved.values())
        note = compiled.explain(*args).loops[0].runs[0]
        assert note.endswith(", recomputed in the backward (activation checkpoint)") == recompute, note
    (grads, kept), (again, lean) = runs[False], runs[True]
    assert lean < kept / 2, (lean, kept)
    for g, w in zip(again, grads):
        assert torch.equal(g, w)


def _tanh_loop(q, k, v):
    """A nonlinear update (no chunkwise form): runs as one sequential loop op."""
    S = torch.zeros(q.shape[0], q.shape[2], v.shape[2])
    outs = []
    for t in range(q.shape[1]):
        S = torch.tanh(S + k[:, t, :, None] * v[:, t, None, :])
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    return torch.stack(outs, 1)


def test_recompute_checkpoints_a_sequential_loop():
    """A loop left sequential runs under activation checkpointing with ``recompute``: less kept
    for the backward, the same gradients."""
    args = inputs(40)[:3]
    runs = {}
    for recompute in (False, True):
        compiled = nlcompile.compile(_tanh_loop, recompute=recompute)
        compiled(*args)
        assert compiled.explain(*args).loops[0].rewrite == "sequential"
        leaves = [x.detach().requires_grad_(True) for x in args]
        out, saved = saved_storages(lambda: compiled(*leaves))
        runs[recompute] = torch.autograd.grad(out.square().sum(), leaves), sum(saved.values())
    (grads, kept), (again, lean) = runs[False], runs[True]
    assert lean < kept / 2, (lean, kept)
    for g, w in zip(again, grads):
        assert torch.equal(g, w)


def _decay_into_state(q, k, v, state, step=lambda S, kv: S * 0.9 + kv):
    """A loop that starts from ``state`` and writes its final state back into it."""
    S = state
    outs = []
    for t in range(q.shape[1]):
        S = step(S, k[:, t, :, None] * v[:, t, None, :])
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    state.copy_(S)
    return torch.stack(outs, 1)


def _tanh_into_state(q, k, v, state):
    return _decay_into_state(q, k, v, state, step=lambda S, kv: torch.tanh(S + kv))


@pytest.mark.parametrize("fn,rewrite", [(_decay_into_state, "chunkwise"), (_tanh_into_state, "sequential")])
@pytest.mark.parametrize("recompute", [False, True])
def test_a_loop_writing_its_state_back_trains(fn, rewrite, recompute):
    """The final state written back into the initial state's tensor: gradients as eager's, also
    when the backward recomputes the loop (it must not read the overwritten initial state)."""
    q, k, v = inputs(16)[:3]
    state = torch.randn(2, 6, 6)
    compiled = nlcompile.compile(fn, recompute=recompute)
    compiled(q, k, v, state.clone())
    assert compiled.explain(q, k, v, state.clone()).loops[0].rewrite == rewrite
    runs = []
    for f in (compiled, fn):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        written = state.clone()
        out = f(*leaves, written)
        runs.append((written.detach(), *torch.autograd.grad(out.square().sum(), leaves)))
    for got, want in zip(*runs):   # the state written back, then the gradients
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_recompute_warns_when_a_target_ignores_it():
    """A plugin target whose loop modules do not recompute is named: its backward keeps what its
    forward saved."""
    from nlcompile.targets.torch_target import TorchTarget

    class Keeps(TorchTarget):
        name = "keeps"

        def loop_module(self, plan):
            return SequentialLoop(plan.loop.body, plan.loop.step_dims)

    nlcompile.register_target("keeps", Keeps())
    args = inputs(9)
    with pytest.warns(UserWarning, match="target 'keeps' builds loop modules that do not recompute"):
        out = nlcompile.compile(delta_loop, target="keeps", recompute=True)(*args)
    torch.testing.assert_close(out, delta_loop(*args), rtol=1e-4, atol=1e-5)


def test_recompute_benchmark_runs_in_smoke_mode(capsys, tmp_path):
    """benchmarks/bench_recompute.py on tiny shapes: both zoo layers keep less for the backward
    with recompute, and the table shows the two side by side."""
    import json

    bench = load_benchmark("bench_recompute")
    saved = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(saved.read_text())["rows"]
    assert [r["layer"] for r in rows] == ["deltanet_layer", "gla_layer"]
    for r in rows:
        assert 0 < r["recompute_kept_mib"] < r["keep_kept_mib"] / 2, r
        assert f"| {r['layer']} | 40 | torch | {r['keep_kept_mib']:.1f} |" in out


def test_recompute_must_be_a_bool():
    with pytest.raises(TypeError, match="recompute must be True or False"):
        nlcompile.compile(delta_loop, recompute="yes")


def test_a_scan_taking_any_keyword_is_told_everything(monkeypatch):
    """A plugin scan that forwards ``**kwargs`` to ours is passed every keyword the loop has (the
    plan's notes, the loop's dtype), which ``chunkwise_scan`` takes: the loop stays chunkwise."""
    from nlcompile.loop_ops import ChunkwiseLoop
    from nlcompile.targets.scan import choose_chunk_size, chunkwise_scan
    from nlcompile.targets.torch_target import TorchTarget

    seen = []

    def forwarding_scan(k, v, **kw):
        seen.append(sorted(kw))
        return chunkwise_scan(k, v, **kw)

    class Forwards(TorchTarget):
        name = "forwards"

        def loop_module(self, plan):
            return ChunkwiseLoop(plan.loop.body, plan.analysis, plan.loop.step_dims, forwarding_scan,
                                 plan.chunk_size, choose_chunk_size)

    nlcompile.register_target("forwards", Forwards())
    compiled = nlcompile.compile(delta_loop, target="forwards")
    args = inputs(30)
    torch.testing.assert_close(compiled(*args), delta_loop(*args), rtol=1e-4, atol=1e-5)
    loop = compiled.explain(*args).loops[0]
    assert loop.rewrite == "chunkwise" and loop.runs[0].startswith("S0 on the PyTorch chunkwise scan, chunk"), loop
    assert {"compute_dtype", "on_plan"} <= set(seen[-1]), seen[-1]


def test_inductor_target_matches_eager():
    compiled = nlcompile.compile(delta_loop, target="inductor")
    for T in (9, 100):
        args = inputs(T)
        torch.testing.assert_close(compiled(*args), delta_loop(*args), rtol=1e-4, atol=1e-5)
    assert compiled.captures == 1
    assert compiled.explain(*inputs(9)).loops[0].rewrite == "chunkwise"
