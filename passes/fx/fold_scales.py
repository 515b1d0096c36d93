"""Fold a constant factor on a loop's queries into the loop's scan.

    before:  mul = aten.mul.Tensor(q, 0.125);  loop_0(k, mul, v, ...)      # q * scale, a full pass
    after:   loop_0(k, q, v, ...)   with loop_0.source_scales = {1: 0.125}  # scaled in the scan's copy

Fast-weight code scales the queries before the loop (``q = q * scale``).  The
readout is linear in q, and the chunkwise scan copies the queries into chunk
order once anyway, so that copy applies the factor (DeltaNet, T=2048, on the
2-core CPU: the separate pass was ~4% of the call); the Triton kernels scale
the readout instead (no scaled copy of q).  Folded only when the product feeds
nothing but this one loop argument, the loop reads that source only as readout
queries, and they are float32/64 (where the torch scan's product is the eager
product, bit for bit).
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def _scalar_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, s) when ``node`` is ``x * s`` (either order) with s a Python number."""
    if node.op != "call_function" or node.target != aten.mul.Tensor or node.kwargs:
        return None
    for x, s in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and isinstance(s, (int, float)) and not isinstance(s, bool):
            return x, float(s)
    return None


def fold_query_scales(program: fx.GraphModule) -> fx.GraphModule:
    """Move ``x * scale`` feeding only a loop's queries into that loop module (in place)."""
    changed = False
    for node in program.graph.nodes:
        if node.op != "call_module":
            continue
        module = program.get_submodule(node.target)
        for i in sorted(getattr(module, "query_sources", ())):
            arg = node.args[i]
            found = _scalar_factor(arg) if isinstance(arg, fx.Node) else None
            if found is None or len(arg.users) != 1 or node.args.count(arg) != 1:
                continue
            node.update_arg(i, found[0])
            module.source_scales[i] = found[1]
            changed = True
    if changed:
        program.graph.eliminate_dead_code()
        program.recompile()
    return program
