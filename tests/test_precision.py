"""The precision a loop computes its recurrence in (passes/fx/precision.py), as the compiled
loop modules see it: the dtype they tell the scan to compute at."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nlcompile

BF16 = torch.bfloat16


def _additive(q, k, v, upcast=False, post=None):
    """Linear attention on [B, T, D] inputs, einsum spelling; optionally each step's inputs
    upcast to fp32, and ``post`` applied to the readout inside the step."""
    acc = torch.float32 if upcast else k.dtype
    S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2], dtype=torch.promote_types(acc, k.dtype))
    outs = []
    for t in range(k.shape[1]):
        k_t, v_t, q_t = (x[:, t].to(acc) for x in (k, v, q))
        S = S + torch.einsum("bk,bv->bkv", k_t, v_t)
        o = torch.einsum("bk,bkv->bv", q_t, S)
        outs.append(o if post is None else post(o))
    return torch.stack(outs, 1)


def _delta(q, k, v):
    """DeltaNet on [B, T, D] inputs: the update reads the state through a product (S^T k)."""
    S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2])
    outs = []
    for t in range(k.shape[1]):
        err = torch.einsum("bk,bkv->bv", k[:, t], S) - v[:, t]
        S = S - 0.5 * torch.einsum("bk,bv->bkv", k[:, t], err)
        outs.append(torch.einsum("bk,bkv->bv", q[:, t], S))
    return torch.stack(outs, 1)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 9, 8, generator=gen).to(dtype) for _ in range(3))


CASES = {
    "fp32": (_additive, torch.float32, False, torch.float32),
    "bf16 throughout": (_additive, BF16, False, BF16),
    "bf16 inputs upcast inside": (lambda q, k, v: _additive(q, k, v, upcast=True), BF16, False, torch.float32),
    "upcast, readout cast back to bf16 inside": (
        lambda q, k, v: _additive(q, k, v, upcast=True, post=lambda o: o.to(BF16)), BF16, False, torch.float32),
    "fp32, readout cast to bf16 and normalised": (
        lambda q, k, v: _additive(q, k, v, post=lambda o: F.rms_norm(o.to(BF16), (o.shape[-1],))),
        torch.float32, False, torch.float32),
    "fp32, gated by a bf16 copy of the readout": (
        lambda q, k, v: _additive(q, k, v, post=lambda o: o * torch.sigmoid(o.to(BF16)).float()),
        torch.float32, False, torch.float32),
    # autocast runs every einsum in bf16: the delta rule's update reads S through a bf16 copy, so
    # both its new state and its readout are bf16-precise in eager; the additive rule adds bf16
    # products to an fp32 state that no product reads: its new state stays fp32-precise
    "delta rule under autocast": (_delta, torch.float32, True, BF16),
    "additive rule under autocast": (_additive, torch.float32, True, torch.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrence_dtype(case):
    """The kernels' precision: for each value they produce (the new state, each readout), the least
    precise dtype its path from the state computes with, and of those the most precise: not the
    inputs' storage (an upcasting loop computes in fp32), not what is done with a readout
    afterwards, but the bf16 copies of the state that autocast makes for its products."""
    fn, dtype, autocast, want = CASES[case]
    args = _inputs(dtype)
    compiled = nlcompile.compile(fn)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        compiled(*args)
        program = compiled.compiled_for(*args).program
    assert type(program.loop_0).__name__ == "ChunkwiseLoop"
    assert program.loop_0.compute_dtypes == [want]
