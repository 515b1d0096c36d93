"""Lift a ``torch._higher_order_ops.scan`` into the same loop record as a re-rolled loop.

    before:  scan(combine_graph, [S0], [q, k, v], [W]) -> (S_T, ys)      # a HOP in the trace
    after:   RerolledLoop(body=combine_graph as LoopBody, inits=[S0],
                          step_inputs=[(q, dim 0), ...], invariants=[W],
                          gathers=[ys: stack at dim 0], last_refs={S_T: state 0})

A scan is a loop already; only its body has to be put in the loop-body form
(states, per-step slices, invariants -> new states, per-step outputs).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from nlcompile.ir import LoopBody
from nlcompile.passes.fx.normalize import normalize
from nlcompile.passes.fx.loop_record import Gather, NotALoop, RerolledLoop, StepInput

_SCAN = getattr(torch.ops.higher_order, "scan", None)


def scan_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _SCAN is not None and n.target is _SCAN]


def lift_scan(gm: fx.GraphModule, trip: int) -> RerolledLoop:
    """The loop record of the single ``scan`` in ``gm`` (traced at probe length ``trip``)."""
    scans = scan_nodes(gm)
    if len(scans) != 1:
        raise NotALoop("no per-step slice and no single scan: no loop over the time axis")
    node = scans[0]
    combine, inits, xs, extra = node.args[:4]
    if node.kwargs.get("reverse") or (len(node.args) > 4 and node.args[4]):
        raise NotALoop("a reversed scan is not supported yet")
    body_gm = getattr(gm, combine.target)
    body_gm = normalize(fx.GraphModule(body_gm, body_gm.graph))
    phs = [n for n in body_gm.graph.nodes if n.op == "placeholder"]
    ns, nx = len(inits), len(xs)
    names = [f"state_{i}" for i in range(ns)] + [f"step_{j}" for j in range(nx)]
    names += [f"inv_{k}" for k in range(len(extra))]
    for ph, name in zip(phs, names):
        ph.name = ph.target = name
    body_gm.recompile()
    n_out = len(body_gm.graph.output_node().args[0])
    body = LoopBody(body_gm, ns, nx, len(extra), n_out - ns)
    for x in xs:
        if x.meta["val"].shape[0] != trip:
            raise NotALoop(f"the scan walks {x.name} whose first dim is not the time axis")

    gathers, last_refs = [], {}
    for user in node.users:
        if user.target is not operator.getitem:
            raise NotALoop(f"the scan's result is used whole by {user.name}")
        i = user.args[1]
        if i < ns:
            last_refs[user] = ("state", i)
        else:
            gathers.append(Gather(user, i - ns, 0, "stack"))
    nodes = frozenset({node, combine, *node.users})
    return RerolledLoop(trip, body, tuple(inits), tuple(StepInput(x, 0, False) for x in xs), tuple(extra),
                        tuple(gathers), last_refs, nodes)
