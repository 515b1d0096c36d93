"""Trace one step function into a ``LoopBody`` (used for scan bodies and tests)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from nlcompile.ir import LoopBody
from nlcompile.passes.fx.normalize import normalize


def trace_step(
    step: Callable,
    states: Sequence[torch.Tensor],
    step_inputs: Sequence[torch.Tensor],
    invariants: Sequence[torch.Tensor] = (),
) -> LoopBody:
    """Trace ``step(*states, *step_inputs, *invariants) -> (new_states, outputs)``.

    ``new_states`` and ``outputs`` are sequences of tensors; the body returns
    them flattened.  The trace is functionalised and normalised.
    """
    ns, nx = len(states), len(step_inputs)

    def flat(*args):
        new_states, outs = step(*args)
        return tuple(new_states) + tuple(outs)

    args = [*states, *step_inputs, *invariants]
    gm = make_fx(torch.func.functionalize(flat))(*args)
    names = [f"state_{i}" for i in range(ns)] + [f"step_{j}" for j in range(nx)]
    names += [f"inv_{k}" for k in range(len(invariants))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names):
        node.name = name
        node.target = name
    normalize(gm)
    out = gm.graph.output_node()
    n_out = len(out.args[0])
    return LoopBody(gm, ns, nx, len(invariants), n_out - ns)
