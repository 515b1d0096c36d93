"""The precision a loop computes its recurrence in (passes/fx/precision.py), as the compiled
loop modules see it: the dtype they tell the scan to compute at."""
from __future__ import annotations

import pytest
import torch

import nlcompile


def _loop(q, k, v, upcast=False, readout_dtype=None):
    """Linear attention on [B, T, D] inputs, einsum spelling; optionally each step's inputs
    upcast to fp32 and the readout cast to ``readout_dtype`` inside the step."""
    acc = torch.float32 if upcast else k.dtype
    S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2], dtype=torch.promote_types(acc, k.dtype))
    outs = []
    for t in range(k.shape[1]):
        k_t, v_t, q_t = (x[:, t].to(acc) for x in (k, v, q))
        S = S + torch.einsum("bk,bv->bkv", k_t, v_t)
        o = torch.einsum("bk,bkv->bv", q_t, S)
        outs.append(o if readout_dtype is None else o.to(readout_dtype))
    return torch.stack(outs, 1)


def _compute_dtype(fn, args, autocast=False) -> torch.dtype:
    compiled = nlcompile.compile(fn)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        compiled(*args)
        entry = compiled.compiled_for(*args)
    (loop,) = [m for name, m in entry.program.named_children() if name.startswith("loop_")]
    assert type(loop).__name__ == "ChunkwiseLoop"
    return loop.compute_dtypes[0]


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 9, 8, generator=gen).to(dtype) for _ in range(3))


@pytest.mark.parametrize("case,want", [
    ("fp32", torch.float32),
    ("bf16 throughout", torch.bfloat16),
    ("bf16 inputs upcast inside", torch.float32),
    ("bf16 inputs upcast, readout cast back inside", torch.float32),
    ("fp32 under autocast (products on a bf16 copy of the state)", torch.bfloat16),
])
def test_recurrence_dtype(case, want):
    """The least precise dtype the loop's state-dependent arithmetic runs in: not the inputs'
    storage (an upcasting loop computes in fp32), not a cast of what it returns, but the bf16
    copy of the state that autocast makes for each product."""
    if case == "fp32":
        got = _compute_dtype(_loop, _inputs(torch.float32))
    elif case == "bf16 throughout":
        got = _compute_dtype(_loop, _inputs(torch.bfloat16))
    elif case == "bf16 inputs upcast inside":
        got = _compute_dtype(lambda q, k, v: _loop(q, k, v, upcast=True), _inputs(torch.bfloat16))
    elif case == "bf16 inputs upcast, readout cast back inside":
        got = _compute_dtype(lambda q, k, v: _loop(q, k, v, upcast=True, readout_dtype=torch.bfloat16),
                             _inputs(torch.bfloat16))
    else:
        got = _compute_dtype(_loop, _inputs(torch.float32), autocast=True)
    assert got == want
