"""passes/fx/fold_scales: ``q * scale`` before a loop is applied in the scan's copy of q."""
from __future__ import annotations

import torch

import nlcompile
from nlcompile.zoo import MODELS
from tests._compare import rel_err

DELTANET = MODELS["deltanet_fla"]  # q = q * scale before the loop, flash-linear-attention style


def program_of(fn, args):
    return fn.compiled_for(*args).program


def muls(program) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.mul.Tensor)


def test_the_query_scale_moves_into_the_loop_and_results_and_gradients_match_eager():
    args = DELTANET.make_inputs(B=2, H=2, T=37, D=8)
    fn = nlcompile.compile(DELTANET.fn)
    program = program_of(fn, args)
    assert muls(program) == 0 and program.loop_0.source_scales == {1: 8 ** -0.5}
    q = args[0].clone().requires_grad_(True)
    o, s = fn(q, *args[1:])
    q_ref = args[0].clone().requires_grad_(True)
    o_ref, s_ref = DELTANET.fn(q_ref, *args[1:])
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    (grad,) = torch.autograd.grad(o.square().sum(), [q])
    (grad_ref,) = torch.autograd.grad(o_ref.square().sum(), [q_ref])
    assert rel_err(grad, grad_ref) <= 1e-5


def linear_attention(q, k, v):
    """The loop, read in fp32 whatever the inputs' dtype."""
    S = torch.zeros(q.shape[0], q.shape[2], v.shape[2])
    outs = []
    for t in range(q.shape[1]):
        S = S + k[:, t, :, None].float() * v[:, t, None, :].float()
        outs.append(torch.einsum("bk,bkv->bv", q[:, t].float(), S))
    return torch.stack(outs, 1)


def scaled_queries_also_returned(q, k, v):
    """The scaled queries are an output too: the product must stay."""
    q = q * 0.5
    return linear_attention(q, k, v), q


def test_a_scaled_query_used_elsewhere_is_not_folded():
    gen = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(2, 19, 6, generator=gen) for _ in range(3))
    fn = nlcompile.compile(scaled_queries_also_returned)
    program = program_of(fn, args)
    assert muls(program) == 1 and program.loop_0.source_scales == {}
    for got, want in zip(fn(*args), scaled_queries_also_returned(*args)):
        assert rel_err(got, want) <= 1e-5


def scaled_in_bf16(q, k, v):
    """Queries scaled in their own (bf16) precision, then read in fp32 by the loop."""
    return linear_attention(q * 0.3, k, v)


def test_queries_scaled_in_bf16_are_not_folded():
    """Eager rounds q * scale to bf16; scaled in the scan's fp32 copy the result would differ."""
    gen = torch.Generator().manual_seed(1)
    args = tuple(torch.randn(2, 19, 6, generator=gen).bfloat16() for _ in range(3))
    fn = nlcompile.compile(scaled_in_bf16)
    program = program_of(fn, args)
    assert muls(program) == 1 and all(not m.source_scales for name, m in program.named_children()
                                      if name.startswith("loop_"))
    assert rel_err(fn(*args), scaled_in_bf16(*args)) <= 1e-5
