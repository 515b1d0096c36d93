"""The update kind of a loop body, proved from its algebra, and checked numerically.

Every chunkwise classification is replayed: for random states and inputs the
body is run once (an ``fx.Interpreter`` records every node's value), and the
new states and readout nodes are rebuilt from the extracted operands as
``S' = diag(a) (I - beta k k^T) S + w k v^T`` and ``o = S^T q`` in kernel layout.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

from nlcompile.ir import Operand, RuleKind
from nlcompile.passes.fx.analyse import analyse_body
from nlcompile.passes.fx.layout import (materialize, operand_for_kernel, readout_to_node, state_from_kernel,
                                        state_to_kernel)
from nlcompile.passes.fx.step_trace import trace_step

B, H, DK, DV = 2, 3, 4, 5
R = torch.randn


class _Recorder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _run(body, args):
    rec = _Recorder(body.graph)
    rec.values = {}
    outs = rec.run(*args)
    return outs, {k: v.unsqueeze(0) for k, v in rec.values.items() if isinstance(v, torch.Tensor)}


def _step_kernel(rule, values, S):
    """One step of S' = diag(a) (I - beta k k^T) S + w k v^T in kernel layout (fp64)."""
    L = rule.layout
    Sk = state_to_kernel(L, S).double()
    k = operand_for_kernel(rule.k, L, "key", values)[:, 0].double()
    v = operand_for_kernel(rule.v, L, "value", values)[:, 0].double()
    w = operand_for_kernel(rule.write, L, "scalar", values)[:, 0].double()
    P = Sk
    if rule.beta is not None:
        b = operand_for_kernel(rule.beta, L, "scalar", values)[:, 0].double()
        P = Sk - b[:, None, None] * k[:, :, None] * torch.einsum("nk,nkv->nv", k, Sk)[:, None, :]
    if rule.gate is not None:
        a = operand_for_kernel(rule.gate, L, "gate", values)[:, 0].double()
        P = a[:, :, None] * P if rule.per_channel else a[:, None, None] * P
        if rule.log_gate is not None:
            g = operand_for_kernel(rule.log_gate, L, "gate", values, rule.per_channel)[:, 0].double()
            torch.testing.assert_close(g.exp(), a, rtol=1e-5, atol=1e-6)
    return Sk, P + w[:, None, None] * k[:, :, None] * v[:, None, :]


def check_numbers(body, args, an) -> None:
    """The extracted operands reproduce the body's new states and readouts."""
    outs, values = _run(body, args)
    kernel = {}
    for rule in an.rules:
        assert rule.kind.chunkwise, rule
        S = args[rule.state]
        before, after = _step_kernel(rule, values, S)
        got = state_from_kernel(rule.layout, after, S.shape)
        torch.testing.assert_close(got, outs[rule.state].double(), rtol=1e-4, atol=1e-4)
        kernel[rule.state] = {"before": before, "after": after}
    for ro in an.readouts:
        L = an.rules[ro.state].layout
        q = operand_for_kernel(ro.q, L, "key", values)[:, 0].double()
        o = torch.einsum("nk,nkv->nv", q, kernel[ro.state][ro.when])[:, None]   # [N, T=1, dv]
        want = values[ro.node][0]
        got = readout_to_node(ro, L, o, values, want.shape)[0]
        torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-4)


def analyse(step, states, steps, invs=()):
    body = trace_step(step, states, steps, invs)
    an = analyse_body(body)
    if an.chunkwise:
        check_numbers(body, [*states, *steps, *invs], an)
    return body, an


# ---------------------------------------------------------------- spellings of S^T k and k u^T
def read(S, x, layout, how):
    """S^T x, contracting the key dim of S ("kv": [..., dk, dv], "vk": [..., dv, dk])."""
    if layout == "kv":
        return {"einsum": lambda: torch.einsum("...kv,...k->...v", S, x),
                "matmul": lambda: (x.unsqueeze(-2) @ S).squeeze(-2),
                "bsum": lambda: (S * x[..., :, None]).sum(-2)}[how]()
    return {"einsum": lambda: torch.einsum("...vk,...k->...v", S, x),
            "matmul": lambda: (S @ x.unsqueeze(-1)).squeeze(-1),
            "bsum": lambda: (S * x[..., None, :]).sum(-1)}[how]()


def outer(k, u, layout, how):
    """k u^T in the state's layout."""
    if layout == "vk":
        k, u = u, k
    return {"einsum": lambda: torch.einsum("...a,...b->...ab", k, u),
            "matmul": lambda: k.unsqueeze(-1) @ u.unsqueeze(-2),
            "bsum": lambda: k[..., :, None] * u[..., None, :]}[how]()


def _shapes(layout, batch):
    lead = (B, H) if batch else ()
    state = (*lead, DK, DV) if layout == "kv" else (*lead, DV, DK)
    return lead, state


def _bc(x):
    """A per-batch scalar broadcast against the state."""
    return x[..., None, None]


def delta_step(layout, sk, op, form, readout, normalise):
    def step(S, k, v, q, b):
        if normalise:
            k = k / k.norm(dim=-1, keepdim=True)
        o = read(S, q, layout, sk)
        if form == "outside":
            S = S - _bc(b) * outer(k, read(S, k, layout, sk) - v, layout, op)
        elif form == "inside":
            S = S + outer(k, b[..., None] * (v - read(S, k, layout, sk)), layout, op)
        elif form == "split":
            S = S - _bc(b) * outer(k, read(S, k, layout, sk), layout, op) + outer(b[..., None] * k, v, layout, op)
        else:
            half = form == "grad_half"

            def loss(S):
                e = ((read(S, k, layout, sk) - v) ** 2).sum()
                return 0.5 * e if half else e
            S = S - _bc(b) * torch.func.grad(loss)(S)
        outs = {"none": (), "before": (o,), "after": (read(S, q, layout, sk),)}[readout]
        return (S,), outs
    return step


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(["kv", "vk"]), batch=st.booleans(),
       sk=st.sampled_from(["einsum", "matmul", "bsum"]), op=st.sampled_from(["einsum", "matmul", "bsum"]),
       form=st.sampled_from(["outside", "inside", "split", "grad", "grad_half"]),
       readout=st.sampled_from(["none", "before", "after"]), normalise=st.booleans())
def test_delta_spellings_property(layout, batch, sk, op, form, readout, normalise):
    lead, state = _shapes(layout, batch)
    step = delta_step(layout, sk, op, form, readout, normalise)
    _, an = analyse(step, [R(state)], [R(*lead, DK), R(*lead, DV), R(*lead, DK), torch.rand(lead)])
    (rule,) = an.rules
    assert rule.kind is RuleKind.DELTA, rule.reason
    assert rule.layout.dims[-1 if layout == "vk" else -2] == (rule.layout.key,)
    assert rule.layout.size(rule.layout.key) == DK and rule.layout.size(rule.layout.value) == DV
    assert len(rule.layout.batch) == len(lead)
    assert [r.when for r in an.readouts] == ([] if readout == "none" else [readout])


# ---------------------------------------------------------------- one table per kind
def _linattn(S, k, v, q):
    S = S + torch.einsum("bhk,bhv->bhkv", k, v)
    return (S,), (torch.einsum("bhkv,bhk->bhv", S, q),)


def _linattn_vk_matmul(S, k, v, q):
    S = S + v.unsqueeze(-1) @ k.unsqueeze(-2)
    return (S,), ((S @ q.unsqueeze(-1)).squeeze(-1),)


def _linattn_flat(S, k, v, q):
    o = S.T @ q
    return (S + torch.outer(k, v),), (o,)


def _retnet_const(S, k, v, q):
    S = 0.9 * S + k[..., :, None] * v[..., None, :]
    return (S,), ((S * q[..., :, None]).sum(-2),)


def _mamba_exp(S, k, v, q, g):
    S = torch.exp(g)[..., None, None] * S + torch.einsum("bhk,bhv->bhkv", k, v)
    return (S,), (torch.einsum("bhkv,bhk->bhv", S, q),)


def _gla_sigmoid(S, k, v, q, g):
    o = torch.einsum("bhkv,bhk->bhv", S, q)
    S = torch.sigmoid(g)[..., :, None] * S + torch.einsum("bhk,bhv->bhkv", k, v)
    return (S,), (o,)


def _gla_vk(S, k, v, q, g):
    S = torch.exp(g)[..., None, :] * S + v[..., :, None] * k[..., None, :]
    return (S,), ((S @ q[..., :, None]).squeeze(-1),)


def _gated_delta(S, k, v, q, g):
    a = torch.exp(g)[..., None, None]
    b = torch.sigmoid(g)[..., None, None]
    S = a * S
    S = S - b * k[..., :, None] * (k[..., :, None] * S).sum(-2, keepdim=True) + b * k[..., :, None] * v[..., None, :]
    return (S,), (torch.einsum("bhkv,bhk->bhv", S, q),)


def _gated_delta_after(S, k, v, q, g):
    Sk = torch.einsum("bhkv,bhk->bhv", S, k)
    S = torch.exp(g)[..., None, None] * (S + torch.einsum("bhk,bhv->bhkv", k, torch.sigmoid(g)[..., None] * (v - Sk)))
    return (S,), (torch.einsum("bhkv,bhk->bhv", S, q),)


KINDS = [
    (_linattn, (B, H, DK, DV), False, RuleKind.ADDITIVE),
    (_linattn_vk_matmul, (B, H, DV, DK), False, RuleKind.ADDITIVE),
    (_retnet_const, (B, H, DK, DV), False, RuleKind.DECAY),
    (_mamba_exp, (B, H, DK, DV), True, RuleKind.DECAY),
    (_gla_sigmoid, (B, H, DK, DV), "channel", RuleKind.DECAY),
    (_gla_vk, (B, H, DV, DK), "channel", RuleKind.DECAY),
    (_gated_delta, (B, H, DK, DV), True, RuleKind.GATED_DELTA),
    (_gated_delta_after, (B, H, DK, DV), True, RuleKind.GATED_DELTA),
]


@pytest.mark.parametrize("step,state,gated,kind", KINDS, ids=[s.__name__ for s, *_ in KINDS])
def test_kinds(step, state, gated, kind):
    steps = [R(B, H, DK), R(B, H, DV), R(B, H, DK)]
    if gated:
        steps.append(R(B, H, DK) if gated == "channel" else R(B, H))
    _, an = analyse(step, [R(state)], steps)
    (rule,) = an.rules
    assert rule.kind is kind, rule.reason
    assert rule.per_channel == (gated == "channel")
    assert len(an.readouts) == 1 and an.readouts[0].q.nodes == {"step_2"}


def test_flat_state_without_batch_reads_before():
    _, an = analyse(_linattn_flat, [R(DK, DV)], [R(DK), R(DV), R(DK)])
    assert an.rules[0].kind is RuleKind.ADDITIVE and an.rules[0].layout.batch == ()
    assert an.readouts[0].when == "before"


def test_log_gate_from_exp():
    _, an = analyse(_mamba_exp, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), R(B, H, DK), R(B, H)])
    rule = an.rules[0]
    assert rule.log_gate is not None and rule.log_gate.nodes == {"step_3"} and rule.log_gate.coef == 1.0
    _, an = analyse(_gla_sigmoid, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), R(B, H, DK), R(B, H, DK)])
    assert an.rules[0].log_gate is None and an.rules[0].gate.nodes == {"sigmoid"}


def test_gate_applied_twice_has_log_gate_two_g():
    def step(S, k, v, g):
        a = torch.exp(g)
        return (a * (a * S) + torch.outer(k, v),), ()
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV), R(())])
    assert an.rules[0].kind is RuleKind.DECAY and an.rules[0].log_gate.coef == 2.0
    assert an.rules[0].reason.startswith("no readout")


def test_constant_gate():
    _, an = analyse(_retnet_const, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), R(B, H, DK)])
    assert an.rules[0].gate == Operand(0.9, ()) and an.rules[0].log_gate is None


# ---------------------------------------------------------------- several states, readouts, layouts
def test_normaliser_state_has_no_value_dim():
    def step(S, z, k, v, q):
        S = S + torch.einsum("bhk,bhv->bhkv", k, v)
        z = z + k
        o = torch.einsum("bhkv,bhk->bhv", S, q) / (z * q).sum(-1, keepdim=True)
        return (S, z), (o.sum(1),)
    _, an = analyse(step, [R(B, H, DK, DV), R(B, H, DK)], [R(B, H, DK), R(B, H, DV), R(B, H, DK)])
    assert [r.kind for r in an.rules] == [RuleKind.ADDITIVE, RuleKind.ADDITIVE]
    z = an.rules[1]
    assert z.layout.value is None and z.v is None and z.layout.size(z.layout.key) == DK
    assert {r.state for r in an.readouts} == {0, 1}
    assert {"div", "sum_2"} <= an.post_nodes
    assert {"step_0", "step_1", "step_2"} <= an.leaf_nodes


def test_output_gate_is_post_and_head_sum_is_summed():
    def step(S, k, v, q, x):
        S = 0.9 * S + torch.einsum("bhk,bhv->bhkv", k, v)
        return (S,), (torch.einsum("bhkv,bhk->bv", S, q) * torch.sigmoid(x),)
    _, an = analyse(step, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), R(B, H, DK), R(B, DV)])
    (ro,) = an.readouts
    assert ro.post is not None and ro.post.nodes == {"sigmoid"}
    assert len(ro.summed) == 1 and an.rules[0].layout.size(ro.summed[0]) == H
    assert "sigmoid" in an.leaf_nodes


def test_readouts_before_and_after_feed_a_post_sum():
    def step(S, k, v, q1, q2):
        o1 = torch.einsum("bhkv,bhk->bhv", S, q1)
        S = S + torch.einsum("bhk,bhv->bhkv", k, v)
        return (S,), (torch.nn.functional.silu(o1 + torch.einsum("bhkv,bhk->bhv", S, q2) + v),)
    _, an = analyse(step, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), R(B, H, DK), R(B, H, DK)])
    assert sorted(r.when for r in an.readouts) == ["after", "before"]
    assert "silu" in an.post_nodes and "step_1" in an.leaf_nodes


def test_merged_batch_heads_state():
    def step(S, k, v, b):
        k2, v2 = k.reshape(B * H, DK), v.reshape(B * H, DV)
        Sk = torch.bmm(k2.unsqueeze(1), S).squeeze(1)
        S = S + b.reshape(B * H, 1, 1) * torch.bmm(k2.unsqueeze(2), (v2 - Sk).unsqueeze(1))
        return (S,), ((S * k2.unsqueeze(-1)).sum(1).view(B, H, DV),)
    _, an = analyse(step, [R(B * H, DK, DV)], [R(B, H, DK), R(B, H, DV), torch.rand(B, H)])
    assert an.rules[0].kind is RuleKind.DELTA and len(an.readouts) == 1


def test_merged_key_viewed_into_heads():
    def step(S, kf, v, b):
        k = kf.view(B, H, DK)
        Sk = torch.einsum("bhkv,bhk->bhv", S, k)
        return (S + b[..., None, None] * k[..., None] * (v - Sk)[..., None, :],), ()
    _, an = analyse(step, [R(B, H, DK, DV)], [R(B * H, DK), R(B, H, DV), torch.rand(B, H)])
    assert an.rules[0].kind is RuleKind.DELTA


def test_clone_of_new_state_is_read_after():
    def step(S, k, v, q):
        S = S + torch.outer(k, v)
        return (S.clone(),), (S.T @ q,)
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV), R(DK)])
    assert an.readouts[0].when == "after"


def test_ttt_linear_inner_gradient_with_indexing():
    def step(W, x, y, lr):
        def loss(W):
            return 0.5 * ((torch.bmm(x[:, None], W)[:, 0] - y) ** 2).sum()
        W = W - lr * torch.func.grad(loss)(W)
        return (W,), (torch.bmm(x[:, None], W)[:, 0],)
    _, an = analyse(step, [R(B, DK, DV)], [R(B, DK), R(B, DV)], [torch.tensor(0.3)])
    assert an.rules[0].kind is RuleKind.DELTA and an.rules[0].beta.nodes == {"inv_0"}
    assert an.readouts[0].when == "after"


def test_in_place_spelling():
    def step(S, k, v, q, g):
        S = S.clone()
        S.mul_(torch.exp(g)).add_(torch.outer(k, v))
        return (S,), (S.mT @ q,)
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV), R(DK), R(())])
    assert an.rules[0].kind is RuleKind.DECAY and an.rules[0].log_gate.nodes == {"step_3"}


def test_readouts_through_a_linear_untracked_op_are_post():
    def step(S, k, v, q1, q2):
        S = S + torch.outer(k, v)
        return (S,), (torch.cat([S.T @ q1, S.T @ q2]),)
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV), R(DK), R(DK)])
    assert len(an.readouts) == 2 and "cat" in an.post_nodes


def test_post_value_fed_back_into_the_state_is_nonlinear():
    def step(S, k, v, q):
        h = torch.tanh(S.T @ q)
        return (S + torch.outer(k, h),), (h,)
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV), R(DK)])
    assert an.rules[0].kind is RuleKind.NONLINEAR and "aten.tanh" in an.rules[0].reason


# ---------------------------------------------------------------- what must fall back
def test_tanh_is_nonlinear_and_named():
    def step(S, x, W):
        return (torch.tanh(S @ W) + torch.outer(x, x),), ()
    body, an = analyse(step, [R(DK, DK)], [R(DK)], [R(DK, DK)])
    rule = an.rules[0]
    assert rule.kind is RuleKind.NONLINEAR and "aten.tanh" in rule.reason
    node = next(n for n in body.graph.graph.nodes if n.name == rule.blocking_node)
    assert node.target is torch.ops.aten.tanh.default


@pytest.mark.parametrize("name,step,kind,words", [
    ("square", lambda S, k, v: ((S + S * S,), ()), RuleKind.NONLINEAR, "degree 2"),
    ("divide_by_state", lambda S, k, v: ((S + torch.outer(k, v) / S.sum(),), ()), RuleKind.NONLINEAR, "divides"),
    ("norm_of_state", lambda S, k, v: ((S / S.norm(),), ()), RuleKind.NONLINEAR, "nonlinearity"),
    ("roll", lambda S, k, v: ((torch.roll(S, 1, 0) + torch.outer(k, v),), ()), RuleKind.AFFINE, "aten.roll"),
    ("two_writes", lambda S, k, v: ((S + torch.outer(k, v) + torch.outer(k * k, v),), ()), RuleKind.AFFINE, "sum of 2"),
    ("full_rank_write_with_readout",
     lambda S, k, v: ((S + torch.outer(k, v).exp(),), (S.T @ k,)), RuleKind.AFFINE, "not rank one"),
])
def test_fallbacks(name, step, kind, words):
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV)])
    rule = an.rules[0]
    assert rule.kind is kind and words in rule.reason and rule.blocking_node, rule.reason


@pytest.mark.parametrize("identity", [False, True])
def test_full_state_free_matrix_is_affine(identity):
    def step(S, k, v, M):
        return ((S if identity else 0) + S @ M + torch.outer(k, v),), (S.T @ k,)
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DV)], [R(DV, DV)])
    assert an.rules[0].kind is RuleKind.AFFINE
    assert ("rank-one" if identity else "matrix") in an.rules[0].reason, an.rules[0].reason


def test_write_key_differs_from_erase_key():
    def step(S, k, k2, v, b):
        return (S - b * torch.outer(k, k @ S) + b * torch.outer(k2, v),), ()
    _, an = analyse(step, [R(DK, DV)], [R(DK), R(DK), R(DV), R(())])
    assert an.rules[0].kind is RuleKind.AFFINE and "erase key" in an.rules[0].reason


def test_per_value_channel_beta_and_gate():
    def beta_v(S, k, v, b):
        Sk = torch.einsum("bhkv,bhk->bhv", S, k)
        return (S + torch.einsum("bhk,bhv->bhkv", k, b * (v - Sk)),), ()

    def gate_v(S, k, v, b):
        return (b[..., None, :] * S + torch.einsum("bhk,bhv->bhkv", k, v),), (torch.einsum("bhkv,bhk->bhv", S, k),)
    for step in (beta_v, gate_v):
        _, an = analyse(step, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), torch.rand(B, H, DV)])
        assert an.rules[0].kind is RuleKind.AFFINE and "value index" in an.rules[0].reason, an.rules[0].reason


def test_momentum_is_affine_and_coupled():
    def step(S, M, k, v, eta):
        M = eta * M + torch.outer(k, v)
        S = S + M
        return (S, M), (S.T @ k,)
    _, an = analyse(step, [R(DK, DV), R(DK, DV)], [R(DK), R(DV), R(())])
    assert an.rules[0].kind is RuleKind.AFFINE and "state 1 (after" in an.rules[0].reason
    assert an.rules[1].kind is RuleKind.DECAY and not an.chunkwise


def test_gate_not_dividing_the_projection_is_affine():
    def step(S, k, v, lr):
        def loss(S):
            return 0.5 * ((torch.einsum("bhkv,bhk->bhv", S, k) - v) ** 2).sum()
        return (torch.sigmoid(lr)[..., None, None] * S - lr[..., None, None] * torch.func.grad(loss)(S),), ()
    _, an = analyse(step, [R(B, H, DK, DV)], [R(B, H, DK), R(B, H, DV), torch.rand(B, H)])
    assert an.rules[0].kind is RuleKind.AFFINE and "gated by the same decay" in an.rules[0].reason


# ---------------------------------------------------------------- layout helpers
def test_materialize_broadcasts_and_checks_indices():
    from nlcompile.ir import Factor
    op = Operand(2.0, (Factor("x", 1, (3,), (7,)), Factor("y", -1, (3,), (7,))))
    values = {"x": torch.tensor([[1.0, 2.0, 3.0]]), "y": torch.tensor([[2.0, 4.0, 6.0]])}
    out = materialize(op, values, [5, 7], {5: 2, 7: 3})
    torch.testing.assert_close(out, torch.ones(1, 2, 3))
    with pytest.raises(ValueError):
        materialize(op, values, [5], {5: 2})


def test_state_kernel_round_trip():
    _, an = analyse(_gla_vk, [R(B, H, DV, DK)], [R(B, H, DK), R(B, H, DV), R(B, H, DK), R(B, H, DK)])
    layout, S = an.rules[0].layout, R(B, H, DV, DK)
    Sk = state_to_kernel(layout, S)
    assert Sk.shape == (B * H, DK, DV)
    torch.testing.assert_close(Sk[1], S[0, 1].T)
    torch.testing.assert_close(state_from_kernel(layout, Sk, S.shape), S)


@pytest.mark.parametrize("step", [_gla_vk, _gated_delta], ids=["gla_vk", "gated_delta"])
def test_time_major_operands_and_readouts(step):
    """``time_major`` operands are the flat [N, T, ...] ones with T and N swapped (for leaves stacked
    over T a view, not a copy: what the Triton target's loop passes in place), and a time-major
    readout [T, N, dv] goes back to the same node values as the flat one."""
    state, gate = {_gla_vk: ((B, H, DV, DK), (B, H, DK)), _gated_delta: ((B, H, DK, DV), (B, H))}[step]
    inputs = lambda: [R(state), R(B, H, DK), R(B, H, DV), R(B, H, DK), R(gate)]  # noqa: E731
    body, an = analyse(step, inputs()[:1], inputs()[1:])
    T = 5
    runs = [_run(body, inputs())[1] for _ in range(T)]
    values = {name: torch.cat([run[name] for run in runs]) for name in runs[0]}
    rule, readout = an.rules[0], an.readouts[0]
    lay = rule.layout
    operands = [(rule.k, "key", {}), (rule.v, "value", {}), (rule.gate, "gate", dict(per_channel=rule.per_channel))]
    if rule.beta is not None:
        operands.append((rule.beta, "scalar", {}))
    for op, role, how in operands:
        flat = operand_for_kernel(op, lay, role, values, **how)
        major = operand_for_kernel(op, lay, role, values, time_major=True, **how)
        assert major.shape == (T, B * H, *flat.shape[2:])
        torch.testing.assert_close(major, flat.transpose(0, 1))
    k = operand_for_kernel(rule.k, lay, "key", values, time_major=True)
    assert k.is_contiguous() and k.data_ptr() == values[rule.k.factors[0].node].data_ptr()   # a view
    o, shape = R(B * H, T, DV), values[readout.node].shape[1:]
    torch.testing.assert_close(readout_to_node(readout, lay, o.transpose(0, 1).contiguous(), values, shape,
                                               time_major=True),
                               readout_to_node(readout, lay, o, values, shape))
    with pytest.raises(ValueError, match=r"\[T, N=6, dv=5\]"):
        readout_to_node(readout, lay, o, values, shape, time_major=True)
