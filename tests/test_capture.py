"""Capture and re-rolling: loops written in this file, checked against eager.

These loops are written here (not taken from the zoo) in the ways researchers
write them; every test compares with the eager function and asserts, through
``explain``, what was found.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import nlcompile
from _compare import assert_close_outputs

torch.manual_seed(0)


# ---- loops in several spellings -------------------------------------------------

def la_stack_time1(q, k, v):
    """[B, T, H, D], list + stack, broadcast-multiply-and-sum readout."""
    S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((S * q[:, t, :, :, None]).sum(-2))
    return torch.stack(outs, 1)


def delta_inplace_time2(q, k, v, beta, initial_state=None):
    """[B, H, T, D], preallocated output written in place, einsum, optional state."""
    B, H, T, D = q.shape
    S = torch.zeros(B, H, D, v.shape[-1]) if initial_state is None else initial_state.clone()
    o = torch.zeros_like(v)
    for t in range(T):
        kt = k[:, :, t]
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S.clone() + torch.einsum("bhk,bhv->bhkv", kt, beta[:, :, t, None] * (v[:, :, t] - pred))
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o, S


def decay_time0_cat(q, k, v, g):
    """[T, B, D] with the state [dv, dk], matmul, cat of unsqueezed steps, readout before."""
    S = q.new_zeros(q.shape[1], v.shape[2], q.shape[2])
    outs = []
    for t in range(q.shape[0]):
        outs.append((S @ q[t].unsqueeze(-1)).squeeze(-1).unsqueeze(0))
        S = torch.exp(g[t])[:, None, None] * S + v[t].unsqueeze(-1) @ k[t].unsqueeze(-2)
    return torch.cat(outs, 0), S


def nonlinear_time1(x, w):
    h = torch.zeros(x.shape[0], x.shape[2])
    outs = []
    for t in range(x.shape[1]):
        h = torch.tanh(h @ w + x[:, t])
        outs.append(h)
    return torch.stack(outs, 1)


def inputs_la(T, B=2, H=3, D=8):
    return torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)


def inputs_delta(T, B=2, H=3, D=8):
    k = F.normalize(torch.randn(B, H, T, D), dim=-1)
    return torch.randn(B, H, T, D), k, torch.randn(B, H, T, D), torch.rand(B, H, T)


def inputs_decay(T, B=3, D=6):
    return torch.randn(T, B, D), torch.randn(T, B, D), torch.randn(T, B, D + 1), -F.softplus(torch.randn(T, B))


CASES = [
    (la_stack_time1, inputs_la, "additive"),
    (delta_inplace_time2, inputs_delta, "delta"),
    (decay_time0_cat, inputs_decay, "decay"),
]


@pytest.mark.parametrize("fn,make,kind", CASES, ids=[c[0].__name__ for c in CASES])
def test_one_program_serves_every_length(fn, make, kind):
    compiled = nlcompile.compile(fn)
    for T in (7, 64, 1000, 1, 33):
        args = make(T)
        assert_close_outputs(compiled(*args), fn(*args))
    assert compiled.captures == 1
    report = compiled.explain(*make(9))
    assert [lp.kind for lp in report.loops] == [kind]
    assert report.loops[0].rewrite == "chunkwise", str(report)


def test_time_axis_found_when_another_dim_equals_T():
    # D == T == 16 in the first call: the time axis must still be dim 1, not D.
    compiled = nlcompile.compile(la_stack_time1)
    args = inputs_la(16, D=16)
    assert_close_outputs(compiled(*args), la_stack_time1(*args))
    report = compiled.explain(*args)
    assert report.loops[0].time_axis == ("q[dim 1]", "k[dim 1]", "v[dim 1]")
    args = inputs_la(40, D=16)
    assert_close_outputs(compiled(*args), la_stack_time1(*args))
    assert compiled.captures == 1


def test_first_call_at_T1_still_probes():
    compiled = nlcompile.compile(delta_inplace_time2)
    args = inputs_delta(1)
    assert_close_outputs(compiled(*args), delta_inplace_time2(*args))
    args = inputs_delta(50)
    assert_close_outputs(compiled(*args), delta_inplace_time2(*args))
    assert compiled.explain(*args).loops[0].kind == "delta"


def test_initial_state_keyword_and_final_state():
    compiled = nlcompile.compile(delta_inplace_time2)
    q, k, v, b = inputs_delta(20)
    s0 = torch.randn(2, 3, 8, 8)
    assert_close_outputs(compiled(q, k, v, b, initial_state=s0), delta_inplace_time2(q, k, v, b, initial_state=s0))
    # a different call structure (no initial state) is a different signature
    assert_close_outputs(compiled(q, k, v, b), delta_inplace_time2(q, k, v, b))
    assert compiled.captures == 2


def test_nonlinear_loop_runs_as_one_sequential_loop():
    w = torch.randn(5, 5) * 0.3
    compiled = nlcompile.compile(nonlinear_time1)
    x = torch.randn(2, 30, 5)
    assert_close_outputs(compiled(x, w), nonlinear_time1(x, w))
    loop = compiled.explain(x, w).loops[0]
    assert loop.kind == "nonlinear" and loop.rewrite == "sequential"
    assert "tanh" in loop.reason
    assert loop.source_line and "torch.tanh(h @ w + x[:, t])" in loop.source_line


def test_value_dependent_branch_falls_back_with_the_line():
    def gated(x):
        h = torch.zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            h = h + x[:, t]
            if h.norm() > 3.0:  # value-dependent: cannot be traced
                h = h * 0.5
            outs.append(h)
        return torch.stack(outs, 1)

    x = torch.randn(2, 12, 4)
    compiled = nlcompile.compile(gated)
    with pytest.warns(UserWarning, match="running eagerly"):
        out = compiled(x)
    assert torch.equal(out, gated(x))
    report = compiled.explain(x)
    assert report.loops == () and "h.norm() > 3.0" in report.fallback_reason


def test_branch_on_step_index_is_not_silently_baked_in():
    def warmup(x):
        h = torch.zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            h = h + x[:, t] if t % 3 else h * 0.5 + x[:, t]
            outs.append(h)
        return torch.stack(outs, 1)

    x = torch.randn(2, 40, 4)
    compiled = nlcompile.compile(warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(x)
    assert_close_outputs(out, warmup(x), tol=1e-6)


def test_model_without_update_loop_is_left_alone():
    def mlp(x, w):
        return torch.relu(x @ w)

    x, w = torch.randn(4, 6), torch.randn(6, 3)
    compiled = nlcompile.compile(mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a model with nothing to do
        assert torch.equal(compiled(x, w), mlp(x, w))
    assert compiled.explain(x, w).loops == ()


def test_loop_without_state_is_left_alone():
    def per_head(x, w):
        out = torch.zeros_like(x)
        for h in range(x.shape[1]):  # a loop over heads carries nothing from one head to the next
            out[:, h] = torch.tanh(x[:, h] @ w)
        return out

    x, w = torch.randn(3, 16, 5), torch.randn(5, 5)
    compiled = nlcompile.compile(per_head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(compiled(x, w), per_head(x, w))
    assert compiled.explain(x, w).loops == ()


def test_dtype_change_recompiles():
    compiled = nlcompile.compile(la_stack_time1)
    args = inputs_la(12)
    assert_close_outputs(compiled(*args), la_stack_time1(*args))
    args64 = [a.double() for a in args]
    out = compiled(*args64)
    assert out.dtype == torch.float64
    assert_close_outputs(out, la_stack_time1(*args64), tol=1e-10)
    assert compiled.captures == 2


def test_non_tensor_arguments_are_part_of_the_signature():
    def scaled(q, k, v, scale=1.0):
        S = torch.zeros(q.shape[0], q.shape[2], v.shape[2])
        outs = []
        for t in range(q.shape[1]):
            S = S + k[:, t, :, None] * v[:, t, None, :]
            outs.append(torch.einsum("bk,bkv->bv", q[:, t] * scale, S))
        return torch.stack(outs, 1)

    compiled = nlcompile.compile(scaled)
    q, k, v = torch.randn(2, 11, 4), torch.randn(2, 11, 4), torch.randn(2, 11, 5)
    assert_close_outputs(compiled(q, k, v, scale=0.5), scaled(q, k, v, scale=0.5))
    assert_close_outputs(compiled(q, k, v, scale=2.0), scaled(q, k, v, scale=2.0))
    assert compiled.captures == 2


def test_mismatched_time_lengths_raise_a_clear_error():
    compiled = nlcompile.compile(la_stack_time1)
    compiled(*inputs_la(10))
    q, k, v = inputs_la(10)
    with pytest.raises(ValueError, match=r"time axis has different lengths .*k dim 1 = 8"):
        compiled(q, k[:, :8], v)


def test_rank_change_recompiles_instead_of_returning_garbage():
    def la_3d(q, k, v):
        S = torch.zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])
        outs = []
        for t in range(q.shape[-2]):
            S = S + k[..., t, :, None] * v[..., t, None, :]
            outs.append((S * q[..., t, :, None]).sum(-2))
        return torch.stack(outs, -2)

    compiled = nlcompile.compile(la_3d)
    a = [torch.randn(3, 12, 4) for _ in range(3)]
    b = [torch.randn(2, 3, 12, 4) for _ in range(3)]
    assert_close_outputs(compiled(*a), la_3d(*a))
    assert_close_outputs(compiled(*b), la_3d(*b))
    assert compiled.captures == 2


class TinyDelta(torch.nn.Module):
    def __init__(self, d_model=12, d=6):
        super().__init__()
        self.wq = torch.nn.Linear(d_model, d, bias=False)
        self.wk = torch.nn.Linear(d_model, d, bias=False)
        self.wv = torch.nn.Linear(d_model, d, bias=False)
        self.wb = torch.nn.Linear(d_model, 1)

    def forward(self, x):
        q, k, v = self.wq(x), F.normalize(self.wk(x), dim=-1), self.wv(x)
        beta = torch.sigmoid(self.wb(x))[..., 0]
        S = x.new_zeros(x.shape[0], k.shape[-1], v.shape[-1])
        outs = []
        for t in range(x.shape[1]):
            S = S - beta[:, t, None, None] * k[:, t, :, None] * (torch.einsum("bk,bkv->bv", k[:, t], S) - v[:, t])[:, None, :]
            outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
        return torch.stack(outs, 1)


def test_module_parameters_stay_live():
    model = TinyDelta()
    compiled = nlcompile.compile(model)
    x = torch.randn(2, 20, 12)
    assert_close_outputs(compiled(x), model(x))
    with torch.no_grad():
        model.wv.weight.mul_(-2.0)
    assert_close_outputs(compiled(x), model(x))
    assert compiled.captures == 1
    assert compiled.explain(x).loops[0].kind == "delta"


def delta_scan(q, k, v, beta):
    """The delta rule written with torch's ``scan`` higher-order op (time at dim 0)."""
    from torch._higher_order_ops.scan import scan

    def step(S, xs):
        qt, kt, vt, bt = xs
        err = torch.einsum("bk,bkv->bv", kt, S) - vt
        S = S - bt[:, None, None] * kt[:, :, None] * err[:, None, :]
        return S, torch.einsum("bk,bkv->bv", qt, S)

    S, o = scan(step, torch.zeros(q.shape[1], q.shape[2], v.shape[2]), (q, k, v, beta))
    return o, S


def test_scan_higher_order_op_is_lifted():
    compiled = nlcompile.compile(delta_scan)
    for T in (7, 130):
        q, v = torch.randn(T, 2, 5), torch.randn(T, 2, 4)
        k, b = F.normalize(torch.randn(T, 2, 5), dim=-1), torch.rand(T, 2)
        assert_close_outputs(compiled(q, k, v, b), delta_scan(q, k, v, b))
    assert compiled.captures == 1
    loop = compiled.explain(q, k, v, b).loops[0]
    assert loop.kind == "delta" and loop.rewrite == "chunkwise"


def test_branch_with_a_long_period_is_not_baked_in():
    # fires at t = 63, 127, ...: invisible to short probes; the long check must catch it
    def periodic(q, k, v):
        S = torch.zeros(q.shape[0], q.shape[2], v.shape[2])
        outs = []
        for t in range(q.shape[1]):
            S = S + k[:, t, :, None] * v[:, t, None, :]
            if (t + 1) % 64 == 0:
                S = S * 0.5
            outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
        return torch.stack(outs, 1)

    q, k, v = torch.randn(2, 300, 4), torch.randn(2, 300, 4), torch.randn(2, 300, 3)
    compiled = nlcompile.compile(periodic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close_outputs(compiled(q, k, v), periodic(q, k, v), tol=1e-6)


def unbind_loop(q, k, v):
    """Steps taken with ``unbind``, time at dim 2, in-body ``cat`` of two features."""
    S = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[3], v.shape[3])
    outs = []
    for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2)):
        feat = torch.cat([k_t, k_t * 0.5], -1)
        S = S + feat[..., :, None] * v_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", torch.cat([q_t, q_t], -1), S))
    return torch.stack(outs, 2)


def test_unbind_steps_and_in_body_cat():
    compiled = nlcompile.compile(unbind_loop)
    for T in (9, 70):
        args = [torch.randn(2, 3, T, 4) for _ in range(3)]
        assert_close_outputs(compiled(*args), unbind_loop(*args))
    loop = compiled.explain(*args).loops[0]
    assert loop.kind == "additive" and loop.rewrite == "chunkwise" and loop.time_axis[0] == "q[dim 2]"


def test_compiling_does_not_write_into_the_callers_tensors():
    def inplace_state(q, k, v, state):
        S = state            # updated in place: the caller's tensor is the state
        outs = []
        for t in range(q.shape[1]):
            S.mul_(0.9).add_(k[:, t, :, None] * v[:, t, None, :])
            outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
        return torch.stack(outs, 1)

    q, k, v = torch.randn(2, 20, 4), torch.randn(2, 20, 4), torch.randn(2, 20, 3)
    state = torch.randn(2, 4, 3)
    before = state.clone()
    compiled = nlcompile.compile(inplace_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled.compiled_for(q, k, v, state)
    assert torch.equal(state, before)


def test_outputs_own_their_memory():
    """The program copies a loop's output only where it could alias: a readout is returned as the
    scan wrote it, an echoed input step gets memory of its own."""
    def echo(q, k, v):
        S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        outs, keys = [], []
        for t in range(q.shape[1]):
            S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append((S * q[:, t, :, :, None]).sum(-2))
            keys.append(k[:, t])
        return torch.stack(outs, 1), torch.stack(keys, 1)

    compiled = nlcompile.compile(echo)
    for T in (64, 70):
        args = [torch.randn(2, T, 3, 4) for _ in range(3)]
        got = compiled(*args)
        assert_close_outputs(got, echo(*args))
        storages = [x.untyped_storage().data_ptr() for x in (*got, *args)]
        assert len(set(storages)) == len(storages)
        assert all(x.is_contiguous() for x in got)
    program = compiled.compiled_for(*args).program
    calls = [n.target for n in program.graph.nodes if n.op in ("call_function", "call_method")]
    assert calls.count("contiguous") == 1 and calls.count(torch.ops.aten.clone.default) == 1


def test_outputs_merged_by_normalisation_stay_apart():
    """Two stacks of one list and a copy of an input are separate tensors in eager, so they are
    in the compiled program too (CSE merged the stacks, copy removal left the input itself);
    one tensor returned twice stays one tensor."""
    def twice(q, k, v):
        S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        outs = []
        for t in range(q.shape[1]):
            S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append((S * q[:, t, :, :, None]).sum(-2))
        o = torch.stack(outs, 1)
        return torch.stack(outs, 1), o, o, q.clone()

    compiled = nlcompile.compile(twice)
    args = [torch.randn(2, 40, 3, 4) for _ in range(3)]
    got = compiled(*args)
    assert_close_outputs(got, twice(*args))
    assert got[1] is got[2]
    storages = [x.untyped_storage().data_ptr() for x in (got[0], got[1], got[3], *args)]
    assert len(set(storages)) == len(storages)


def test_non_tensor_output_that_depends_on_T_is_not_frozen():
    def with_length(q, k, v):
        return la_stack_time1(q, k, v), q.shape[1]

    compiled = nlcompile.compile(with_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for T in (10, 33):
            out, n = compiled(*inputs_la(T))
            assert n == T


def test_module_dtype_and_mode_changes_recompile():
    model = TinyDelta()
    compiled = nlcompile.compile(model)
    x = torch.randn(2, 20, 12)
    assert_close_outputs(compiled(x), model(x))
    model.double()
    assert_close_outputs(compiled(x.double()), model(x.double()), tol=1e-10)
    model.eval()
    assert_close_outputs(compiled(x.double()), model(x.double()), tol=1e-10)
    assert compiled.captures == 3


def test_non_contiguous_inputs():
    compiled = nlcompile.compile(la_stack_time1)
    q, k, v = (torch.randn(2, 3, 30, 8).transpose(1, 2) for _ in range(3))   # [B, T, H, D] views
    assert not q.is_contiguous()
    assert_close_outputs(compiled(q, k, v), la_stack_time1(q, k, v))
    assert compiled.explain(q, k, v).loops[0].rewrite == "chunkwise"


def test_a_state_updated_in_place_is_updated_by_the_compiled_program_too():
    def inplace_state(q, k, v, state):
        for t in range(q.shape[1]):
            state.mul_(0.9).add_(k[:, t, :, None] * v[:, t, None, :])
        return state.sum()

    q, k, v = torch.randn(2, 20, 4), torch.randn(2, 20, 4), torch.randn(2, 20, 3)
    mine, theirs = torch.randn(2, 4, 3), None
    theirs = mine.clone()
    compiled = nlcompile.compile(inplace_state)
    assert_close_outputs(compiled(q, k, v, mine), inplace_state(q, k, v, theirs))
    assert_close_outputs(mine, theirs)
    assert compiled.explain(q, k, v, mine).loops[0].rewrite == "chunkwise"


class TwoLayers(torch.nn.Module):
    """Two update loops in one forward: the second slices what the first gathered."""

    def __init__(self):
        super().__init__()
        self.first, self.second = TinyDelta(12, 12), TinyDelta(12, 12)

    def forward(self, x):
        h = torch.relu(self.first(x)) + x
        return self.second(h)


def test_stacked_layers_compile_every_loop():
    model = TwoLayers()
    compiled = nlcompile.compile(model)
    for T in (9, 120):
        x = torch.randn(2, T, 12)
        with torch.no_grad():
            assert_close_outputs(compiled(x), model(x))
    assert compiled.captures == 1
    loops = compiled.explain(x).loops
    assert [(lp.kind, lp.rewrite) for lp in loops] == [("delta", "chunkwise")] * 2


def test_chunk_size_option_is_used_and_validated():
    compiled = nlcompile.compile(delta_inplace_time2, chunk_size=8)
    args = inputs_delta(70)
    assert_close_outputs(compiled(*args), delta_inplace_time2(*args))
    assert compiled.compiled_for(*args).program.loop_0.chunk_sizes_used == {0: 8}
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        nlcompile.compile(delta_inplace_time2, chunk_size=0)
    with pytest.raises(ValueError, match="unknown relaxation"):
        nlcompile.compile(delta_inplace_time2, relax=("freeze_gradients",))


def quadratic_time1(x):
    h = torch.zeros(x.shape[0], x.shape[2], x.shape[2])
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        h = 0.1 * xt[:, :, None] * xt[:, None, :] + 0.5 * (h @ h)
        outs.append(h.sum(-1))
    return torch.stack(outs, 1)


def test_blocking_matmul_is_traced_to_its_at_sign():
    compiled = nlcompile.compile(quadratic_time1)
    x = torch.randn(2, 12, 4) * 0.5
    assert_close_outputs(compiled(x), quadratic_time1(x))
    loop = compiled.explain(x).loops[0]
    assert loop.kind == "nonlinear" and loop.rewrite == "sequential"
    assert loop.source_line and "0.5 * (h @ h)" in loop.source_line, (loop.reason, loop.source_line)
