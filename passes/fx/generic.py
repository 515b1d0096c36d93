"""Build the T-generic program from two re-rolled probes.

    before (probe T=5 and probe T=8, each with its loop re-rolled):
        zeros([2, 5, 4, 16]) ... loop ... stack([o0..o4], 1)
        zeros([2, 8, 4, 16]) ... loop ... stack([o0..o7], 1)
    after (one graph for every T):
        T = sym_size(q, 1); zeros([2, T, 4, 16]); outs = loop_0(k, v, q, S0); movedim(outs, 0, 1)

The prologue and epilogue of the two probes must correspond node by node; an
int that differs between them is linear in T (``a*T + b``, solved from the two
probes) and becomes arithmetic on ``T``.  The loop becomes one call of a loop
module (chunkwise or sequential, chosen by the rewrite pass).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx

from nlcompile.passes.fx.loop_record import NotALoop, RerolledLoop

aten = torch.ops.aten


@dataclass(frozen=True)
class Probe:
    """A normalised trace at probe length ``trip`` and its re-rolled loops, in order."""

    gm: fx.GraphModule
    trip: int
    loops: tuple[RerolledLoop, ...]


def body_signature(gm: fx.GraphModule) -> list:
    """A structural fingerprint of a graph: targets and args, nodes as positions."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def norm(a):
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, norm(v)) for k, v in a.items()))
        return a

    return [(n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in gm.graph.nodes]


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Builder:
    def __init__(self, p1: Probe, p2: Probe, time_inputs: Sequence[tuple[int, int]]):
        self.p1, self.p2 = p1, p2
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.pair: dict[fx.Node, fx.Node] = {}
        self.root = torch.nn.Module()
        ph1 = [n for n in p1.gm.graph.nodes if n.op == "placeholder"]
        ph2 = [n for n in p2.gm.graph.nodes if n.op == "placeholder"]
        for a, b in zip(ph1, ph2):
            new = self.graph.placeholder(a.name)
            new.meta = dict(a.meta)
            self.env[a] = new
            self.pair[a] = b
        idx, dim = time_inputs[0]
        self.T = self.graph.call_function(aten.sym_size.int, (self.env[ph1[idx]], dim))

    def linear(self, x1: int, x2: int):
        t1, t2 = self.p1.trip, self.p2.trip
        a, rem = divmod(x2 - x1, t2 - t1)
        b = x1 - a * t1
        if rem:
            raise NotALoop(f"a size changes with T in a way that is not linear ({x1} at T={t1}, {x2} at T={t2})")
        node = self.T if a == 1 else self.graph.call_function(operator.mul, (self.T, a))
        return node if b == 0 else self.graph.call_function(operator.add, (node, b))

    def generic(self, x1, x2):
        if isinstance(x1, fx.Node):
            if not isinstance(x2, fx.Node) or self.pair.get(x1) is not x2:
                raise NotALoop(f"the two probes differ around {x1.name}")
            return self.env[x1]
        if isinstance(x1, (list, tuple)):
            if not isinstance(x2, (list, tuple)) or len(x1) != len(x2):
                raise NotALoop("the two probes differ in an argument list")
            return type(x1)(self.generic(a, b) for a, b in zip(x1, x2))
        if isinstance(x1, dict):
            return {k: self.generic(v, x2[k]) for k, v in x1.items()}
        if x1 == x2 and type(x1) is type(x2):
            return x1
        if isinstance(x1, int) and isinstance(x2, int) and not isinstance(x1, bool):
            return self.linear(x1, x2)
        raise NotALoop(f"a constant differs between probes ({x1!r} vs {x2!r}): the program depends on T")

    def copy(self, n1: fx.Node, n2: fx.Node) -> fx.Node:
        if n1.op == "get_attr":
            return self._constant(n1, n2)
        if n1.target != n2.target:
            raise NotALoop(f"the two probes differ: {n1.name} ({n1.target}) vs {n2.name} ({n2.target})")
        self.pair[n1] = n2
        args = self.generic(n1.args, n2.args)
        kwargs = self.generic(dict(n1.kwargs), dict(n2.kwargs))
        new = self.graph.call_function(n1.target, args, kwargs)
        new.meta = {k: v for k, v in n1.meta.items() if k != "val"}
        self.env[n1] = new
        return new

    def _constant(self, n1: fx.Node, n2: fx.Node) -> fx.Node:
        """A tensor constant made inside the function (``q.new_tensor(...)``): it must
        be the same in both probes, else it depends on T."""
        c1, c2 = _attr(self.p1.gm, n1.target), _attr(self.p2.gm, n2.target)
        if n2.op != "get_attr" or c1.shape != c2.shape or not torch.equal(c1, c2):
            raise NotALoop(f"the constant {n1.target} differs between probe lengths: it depends on T")
        name = f"_const_{len(list(self.root.buffers()))}"
        self.root.register_buffer(name, c1)
        new = self.graph.get_attr(name)
        new.meta = dict(n1.meta)
        self.env[n1] = new
        self.pair[n1] = n2
        return new


def _emit_loop(b: _Builder, index: int, l1: RerolledLoop, l2: RerolledLoop, module: torch.nn.Module) -> None:
    """Call loop module ``index`` and map what the trace read from the loop to its results."""
    if body_signature(l1.body.graph) != body_signature(l2.body.graph):
        raise NotALoop("the loop body differs between probe lengths: it depends on T")
    if len(l1.gathers) != len(l2.gathers) or len(l1.last_refs) != len(l2.last_refs):
        raise NotALoop("the loop's outputs differ between probe lengths")
    name = f"loop_{index}"
    b.root.add_module(name, module)
    args = [b.env[s.source] for s in l1.step_inputs] + [b.env[n] for n in (*l1.inits, *l1.invariants)]
    call = b.graph.call_module(name, tuple(args))
    n_states = l1.body.n_states
    results = [b.graph.call_function(operator.getitem, (call, i)) for i in range(n_states + l1.body.n_step_outputs)]
    finals, stacked = results[:n_states], results[n_states:]
    fresh = list(getattr(module, "fresh_outputs", ()))
    for g1, g2 in zip(l1.gathers, l2.gathers):
        y = b.graph.call_function(aten.movedim.int, (stacked[g1.output], 0, g1.dim))
        if g1.kind == "cat":
            y = b.graph.call_function(aten.flatten.using_ints, (y, g1.dim, g1.dim + 1))
        # the eager program stacked into fresh memory: later views rely on that layout, and writes
        # to it must not reach the inputs (a copy unless the loop module says the output is its own)
        if fresh[g1.output:g1.output + 1] == [True]:
            fresh[g1.output] = False  # a second gather of the same output gets a copy
            y = b.graph.call_method("contiguous", (y,))
        else:
            y = b.graph.call_function(aten.clone.default, (y,), {"memory_format": torch.contiguous_format})
        b.env[g1.node] = y
        b.pair[g1.node] = g2.node
    last2 = {v: k for k, v in l2.last_refs.items()}
    for node, (kind, i) in l1.last_refs.items():
        if (kind, i) not in last2:
            raise NotALoop("the values read after the loop differ between probe lengths")
        b.env[node] = finals[i] if kind == "state" else b.graph.call_function(aten.select.int, (stacked[i], 0, -1))
        b.pair[node] = last2[(kind, i)]


def _plain(p: Probe) -> list[fx.Node]:
    """The trace's nodes outside every loop (copied into the program, generic in T)."""
    inside = set().union(*(lp.nodes for lp in p.loops))
    return [n for n in p.gm.graph.nodes if n.op not in ("placeholder", "output") and n not in inside]


def build_program(p1: Probe, p2: Probe, time_inputs: Sequence[tuple[int, int]],
                  make_loop: Callable[[RerolledLoop], torch.nn.Module]) -> fx.GraphModule:
    """The T-generic program: the code around the loops, one loop module call per loop.

    The trace is walked in order; each loop is called where its last step ends
    (everything it reads is computed by then, everything that reads it comes after)."""
    if len(p1.loops) != len(p2.loops):
        raise NotALoop("the number of loops differs between probe lengths")
    plain1, plain2 = _plain(p1), _plain(p2)
    if len(plain1) != len(plain2):
        raise NotALoop("the code around the loops differs between probe lengths")
    pair = dict(zip(plain1, plain2))
    order = {n: i for i, n in enumerate(p1.gm.graph.nodes)}
    ends = {}
    for i, lp in enumerate(p1.loops):   # a loop's last step (its stack / cat may come later)
        steps = lp.nodes - {g.node for g in lp.gathers if g.kind != "buffer"}
        ends[max(steps, key=order.__getitem__)] = i
    b = _Builder(p1, p2, time_inputs)
    for node in p1.gm.graph.nodes:
        if node in pair:
            b.copy(node, pair[node])
        elif node in ends:
            i = ends[node]
            _emit_loop(b, i, p1.loops[i], p2.loops[i], make_loop(p1.loops[i]))
    out1 = p1.gm.graph.output_node()
    out2 = p2.gm.graph.output_node()
    b.graph.output(b.generic(out1.args[0], out2.args[0]))
    gm = fx.GraphModule(b.root, b.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
