"""Prove the update kind of a loop body from its algebra.

Abstract interpretation of one step's ATen graph over polynomials of degree <= 1
in the carried states (``algebra.Poly``), then a structural reading of each new
state's polynomial (``layout.fit_rule``)::

    before:  %mv = mv(transpose(state_0), step_0); %sub = sub(%mv, step_1)
             %mul_2 = mul(view(mul(expand(ones_like), mul(pow(%sub, 1.0), 2.0))), step_0)
             %sub_1 = sub(state_0, mul(inv_0, transpose(%mul_2)))
    after:   state 0: S - 2 inv_0 k k^T S + 2 inv_0 k v^T
             -> StateRule(kind=DELTA, k=step_0, v=step_1, beta=2*inv_0, write=2*inv_0)

State-free nodes consumed by state-dependent ops are *opened* through
multilinear ops (mul, div, views, outer products...) into factors; anything
else state-free is one opaque factor.  Ops outside the table make the value
non-polynomial (``Bad``) with a reason naming the op and node; the value returned
as new state i counts, where other ops read it, as the symbol S_i^after.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import fx

from nlcompile.ir import LoopAnalysis, LoopBody, Readout, RuleKind, StateRule
from nlcompile.passes.fx import algebra as al
from nlcompile.passes.fx.algebra import Mono, NonPoly, Poly, StateRef
from nlcompile.passes.fx.layout import find_readouts, fit_rule

aten = torch.ops.aten


@dataclass(frozen=True)
class Bad:
    """A state-dependent value that is not a degree <= 1 polynomial."""

    reason: str
    node: str
    linear: bool


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if val is None and node.op == "get_attr":
        val = getattr(node.graph.owning_module, node.target)
    return tuple(int(s) for s in val.shape)


class _Ctx:
    """What an op rule sees: fresh polys of its arguments, the index space, the node."""

    def __init__(self, ix: "Interpreter", node: fx.Node):
        self.ix, self.node, self.space = ix, node, ix.space

    def arg(self, x: Any) -> Poly:
        if isinstance(x, (bool, int, float)):
            return self.space.constant((), float(x))
        if not isinstance(x, fx.Node):
            raise NonPoly(f"has an unsupported argument {x!r}", linear=True)
        v = self.ix.value(x, self.node)
        if isinstance(v, Bad):
            raise NonPoly(v.reason, v.linear)
        return al.freshen(self.ix.open(x) if v is None else v, self.space)

    @property
    def out(self) -> tuple[int, ...]:
        return _shape(self.node)


# ---------------------------------------------------------------- op rules
def _lin(ctx: _Ctx, terms) -> Poly:
    n = len(ctx.out)
    ops = [(p, al.broadcast_letters(len(p.dims), n), c) for p, c in ((ctx.arg(a), c) for a, c in terms)]
    return al.lincomb(ctx.space, ops, al.letters(n))


def _addlike(first: int, sign: float) -> Callable:
    """x + alpha*y (add), x - alpha*y (sub), y - alpha*x (rsub)."""
    def rule(ctx, n):
        alpha = sign * float(n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1))
        return _lin(ctx, [(n.args[first], 1.0), (n.args[1 - first], alpha)])
    return rule


_add, _sub, _rsub = _addlike(0, 1.0), _addlike(0, -1.0), _addlike(1, -1.0)


def _times(ctx: _Ctx, polys) -> Poly:
    n = len(ctx.out)
    return al.product(ctx.space, [(p, al.broadcast_letters(len(p.dims), n)) for p in polys], al.letters(n))


def _mul(ctx, n):
    return _times(ctx, [ctx.arg(n.args[0]), ctx.arg(n.args[1])])


def _div(ctx, n):
    den = ctx.arg(n.args[1])
    if den.degree:
        raise NonPoly("divides by a state-dependent value")
    return _times(ctx, [ctx.arg(n.args[0]), al.invert(den)])


def _pow(ctx, n):
    e = n.args[1]
    if e == 1:
        return ctx.arg(n.args[0])
    if e == 2:
        return _times(ctx, [ctx.arg(n.args[0]), ctx.arg(n.args[0])])
    if e == 0:
        return ctx.space.constant(ctx.out, 1.0)
    if e == -1:
        return al.invert(ctx.arg(n.args[0]))
    raise NonPoly(f"raises a value to the power {e}")


def _sum(ctx, n):
    axes = n.args[1] if len(n.args) > 1 else None
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    return al.reduce_sum(ctx.arg(n.args[0]), axes, keep, ctx.space)


def _mean(ctx, n):
    count = max(1, math.prod(_shape(n.args[0]))) // max(1, math.prod(ctx.out))
    return al.scale(_sum(ctx, n), 1.0 / count)


def _contract(spec: str) -> Callable:
    ins, out = spec.split("->")
    specs = ins.split(",")

    def rule(ctx, n):
        return al.product(ctx.space, [(ctx.arg(a), s) for a, s in zip(n.args, specs)], out)
    return rule


def _addmm(ctx, n):
    prod = al.product(ctx.space, [(ctx.arg(n.args[1]), "ij"), (ctx.arg(n.args[2]), "jk")], "ik")
    bias = ctx.arg(n.args[0])
    beta, alpha = float(n.kwargs.get("beta", 1)), float(n.kwargs.get("alpha", 1))
    return al.lincomb(ctx.space, [(bias, al.broadcast_letters(len(bias.dims), 2), beta),
                                  (prod, "ab", alpha)], "ab")


def _view(ctx, n):
    return al.view(ctx.arg(n.args[0]), ctx.out, ctx.space)


def _permute(ctx, n):
    return al.permute(ctx.arg(n.args[0]), n.args[1])


def _transpose(ctx, n):
    return al.transpose(ctx.arg(n.args[0]), *n.args[1:3])


def _unsqueeze(ctx, n):
    return al.unsqueeze(ctx.arg(n.args[0]), n.args[1])


def _squeeze(ctx, n):
    return al.squeeze(ctx.arg(n.args[0]), n.args[1] if len(n.args) > 1 else None)


def _expand(ctx, n):
    return al.expand(ctx.arg(n.args[0]), ctx.out, ctx.space)


def _cast(ctx, n):
    """A float-to-float cast keeps the algebra (rounding aside); a cast to an integer
    or bool type does not."""
    src, dst = n.args[0].meta.get("val"), n.meta.get("val")
    if src is None or dst is None or not (src.dtype.is_floating_point and dst.dtype.is_floating_point):
        raise NonPoly("casts to a non-floating dtype")
    return _same(ctx, n)


def _same(ctx, n):
    return ctx.arg(n.args[0])


def _slice(ctx, n):
    p = ctx.arg(n.args[0])
    dim = n.args[1] if len(n.args) > 1 else 0
    start = n.args[2] if len(n.args) > 2 else None
    step = n.args[4] if len(n.args) > 4 else 1
    size = _shape(n.args[0])[dim]
    if (start in (None, 0)) and step == 1 and ctx.out[dim] == size:
        return p
    raise NonPoly("takes a strided or partial slice (linear, not tracked)", linear=True)


def _select(ctx, n):
    """x[..., i, ...] on a size-1 dim is a squeeze."""
    if _shape(n.args[0])[n.args[1]] != 1:
        raise NonPoly("selects one entry of a dim (linear, not tracked)", linear=True)
    return al.squeeze(ctx.arg(n.args[0]), n.args[1])


def _select_backward(ctx, n):
    """The gradient of a select on a size-1 dim is an unsqueeze."""
    sizes, dim = n.args[1], n.args[2]
    if int(sizes[dim]) != 1:
        raise NonPoly("scatters into one entry of a dim (linear, not tracked)", linear=True)
    return al.unsqueeze(ctx.arg(n.args[0]), dim % len(sizes))


RULES: dict[Any, Callable[[_Ctx, fx.Node], Poly]] = {
    aten.add.Tensor: _add, aten.add.Scalar: _add, aten.sub.Tensor: _sub, aten.sub.Scalar: _sub,
    aten.rsub.Tensor: _rsub, aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _mul, aten.mul.Scalar: _mul, aten.div.Tensor: _div, aten.div.Scalar: _div,
    aten.neg.default: lambda c, n: al.scale(c.arg(n.args[0]), -1.0),
    aten.pow.Tensor_Scalar: _pow, aten.square.default: lambda c, n: _times(c, [c.arg(n.args[0])] * 2),
    aten.reciprocal.default: lambda c, n: al.invert(c.arg(n.args[0])),
    aten.sum.dim_IntList: _sum, aten.sum.default: _sum, aten.mean.dim: _mean, aten.mean.default: _mean,
    aten.bmm.default: _contract("bij,bjk->bik"), aten.mm.default: _contract("ij,jk->ik"),
    aten.mv.default: _contract("ij,j->i"), aten.dot.default: _contract("i,i->"), aten.addmm.default: _addmm,
    aten.view.default: _view, aten._unsafe_view.default: _view, aten.reshape.default: _view,
    aten.view_copy.default: _view, aten._reshape_alias.default: _view,
    aten.permute.default: _permute, aten.permute_copy.default: _permute,
    aten.transpose.int: _transpose, aten.transpose_.default: _transpose,
    aten.t.default: _transpose, aten.t_.default: _transpose,
    aten.unsqueeze.default: _unsqueeze, aten.unsqueeze_.default: _unsqueeze,
    aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze, aten.squeeze.default: _squeeze,
    aten.squeeze_.dim: _squeeze, aten.squeeze_.dims: _squeeze, aten.squeeze_.default: _squeeze,
    aten.expand.default: _expand, aten.expand_copy.default: _expand,
    aten.clone.default: _same, aten._to_copy.default: _cast, aten.alias.default: _same,
    aten.contiguous.default: _same, aten.detach.default: _same, aten.lift_fresh_copy.default: _same,
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.select_backward.default: _select_backward,
}

# ops that never read their input's values: state-free whatever they are applied to
CONSTANTS: dict[Any, Callable[[fx.Node], float]] = {
    aten.ones_like.default: lambda n: 1.0, aten.zeros_like.default: lambda n: 0.0,
    aten.full_like.default: lambda n: n.args[1], aten.new_ones.default: lambda n: 1.0,
    aten.new_zeros.default: lambda n: 0.0, aten.new_full.default: lambda n: n.args[2],
    aten.ones.default: lambda n: 1.0, aten.zeros.default: lambda n: 0.0,
    aten.full.default: lambda n: n.args[1], aten.scalar_tensor.default: lambda n: n.args[0],
}

_NOT_OPENED = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor,
               aten.rsub.Scalar, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim,
               aten.mean.default, aten.addmm.default}
OPENED = frozenset(RULES) - _NOT_OPENED      # multilinear in their tensor arguments

LINEAR_UNTRACKED = frozenset({
    aten.slice_backward.default, aten.index.Tensor, aten.index_put.default, aten.cat.default,
    aten.stack.default, aten.index_select.default, aten.cumsum.default, aten.flip.default, aten.roll.default, aten.tril.default, aten.triu.default,
    aten.diagonal.default, aten.constant_pad_nd.default, aten.repeat.default, aten.narrow.default,
    aten.select_scatter.default, aten.slice_scatter.default, aten.split.Tensor, aten.unbind.int,
    aten.split_with_sizes.default, operator.getitem,
})
_ADDITIVE = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor, aten.cat.default,
                       aten.stack.default, aten.addmm.default, aten.select_scatter.default,
                       aten.slice_scatter.default})


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))
    return out


def _label(node: fx.Node) -> str:
    target = node.target
    name = str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    return f"{name} (node {node.name})"


_IDENTITY = frozenset({aten.clone.default, aten.alias.default, aten.contiguous.default,
                       aten.detach.default, aten.lift_fresh_copy.default, aten._to_copy.default})


def _same_meta(a: fx.Node, b: Any) -> bool:
    if not isinstance(b, fx.Node) or "val" not in a.meta or "val" not in b.meta:
        return False
    va, vb = a.meta["val"], b.meta["val"]
    return tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype


class Interpreter:
    """Abstract interpretation of one body: ``env`` maps state-dependent nodes to Poly or Bad.

    State-free nodes have no entry; ``open`` turns one into a poly on demand.
    ``after`` maps the node returned as new state i (and identity copies of it)
    to i: other consumers read it as the symbol S_i^after.
    """

    def __init__(self, body: LoopBody):
        self.body, self.space = body, al.Space()
        self.env: dict[fx.Node, Poly | Bad] = {}
        self._opened: dict[fx.Node, Poly] = {}
        nodes = list(body.graph.graph.nodes)
        flat = list(body.graph.graph.output_node().args[0])
        self.new_states, self.outputs = flat[: body.n_states], flat[body.n_states:]
        self.states = [n for n in nodes if n.op == "placeholder"][: body.n_states]
        self.by_name = {n.name: n for n in nodes}
        self.after: dict[fx.Node, int] = {}
        for i, n in enumerate(self.new_states):
            while isinstance(n, fx.Node) and n.op == "call_function" and n not in self.after:
                self.after[n] = i
                if n.target not in _IDENTITY or not _same_meta(n, n.args[0]):
                    break
                n = n.args[0]
        for node in nodes:
            self._visit(node)

    def value(self, node: fx.Node, consumer: fx.Node | None) -> Poly | Bad | None:
        """What ``consumer`` reads from ``node``: a poly, a Bad, or None (state-free)."""
        if node in self.after and self.after.get(consumer) != self.after[node]:
            atoms = self.space.dims_for(_shape(node))
            ref = StateRef(self.after[node], "after", tuple(a for d in atoms for a in d))
            return Poly(atoms, (Mono(1.0, (), ref),))
        return self.env.get(node)

    def open(self, node: fx.Node) -> Poly:
        """A state-free node as a poly: opened through multilinear ops, else one opaque factor."""
        if node not in self._opened:
            self._opened[node] = self._open(node)
        return self._opened[node]

    def _open(self, node: fx.Node) -> Poly:
        shape = _shape(node)
        if node.op == "call_function" and node.target in CONSTANTS:
            return self.space.constant(shape, float(CONSTANTS[node.target](node)))
        if node.op == "call_function" and node.target in OPENED:
            try:
                p = RULES[node.target](_Ctx(self, node), node)
            except Exception:  # noqa: BLE001 - anything not multilinear stays one opaque factor
                p = None
            if p is not None and len(p.monos) <= 1 and all(m.atoms() <= p.free for m in p.monos):
                return p
        return self.space.factor(node.name, shape)

    def exp_input(self, name: str) -> str | None:
        node = self.by_name.get(name)
        if node is not None and node.target is aten.exp.default and isinstance(node.args[0], fx.Node):
            return node.args[0].name
        return None

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder" and node in self.states:
            dims = self.space.dims_for(_shape(node))
            ref = StateRef(self.states.index(node), "before", tuple(a for d in dims for a in d))
            self.env[node] = Poly(dims, (Mono(1.0, (), ref),))
        if node.op != "call_function" or node.target in CONSTANTS:
            return
        deps = [self.value(a, node) for a in _tensor_args(node)]
        if any(d is not None for d in deps):
            self.env[node] = self._eval(node, deps)

    def _eval(self, node: fx.Node, deps: list) -> Poly | Bad:
        bads = [d for d in deps if isinstance(d, Bad)]
        if bads:
            return self._propagate(node, bads, deps)
        rule = RULES.get(node.target)
        if rule is not None:
            try:
                return rule(_Ctx(self, node), node)
            except NonPoly as e:
                return Bad(f"{_label(node)} {e.reason}", node.name, e.linear)
            except Exception as e:  # noqa: BLE001 - an analysis gap must fall back, never crash
                return Bad(f"{_label(node)} could not be analysed ({type(e).__name__}: {e})", node.name, False)
        if node.target in LINEAR_UNTRACKED:
            return Bad(f"{_label(node)} is linear in the state but its index map is not tracked", node.name, True)
        return Bad(f"{_label(node)} applies a nonlinearity to the state", node.name, False)

    def _propagate(self, node: fx.Node, bads: list[Bad], deps: list) -> Bad:
        """A linear op keeps a linear Bad linear; anything else makes it nonlinear."""
        nonlinear = [b for b in bads if not b.linear]
        if nonlinear:
            return nonlinear[0]
        t = node.target
        n_dep = sum(d is not None for d in deps)
        linear = (t in RULES or t in LINEAR_UNTRACKED) and (n_dep == 1 or t in _ADDITIVE)
        if t in (aten.div.Tensor, aten.div.Scalar) and isinstance(node.args[1], fx.Node):
            linear = linear and self.value(node.args[1], node) is None
        if t in (aten.pow.Tensor_Scalar, aten.reciprocal.default, aten.square.default):
            linear = linear and t is aten.pow.Tensor_Scalar and node.args[1] == 1
        if linear:
            return bads[0]
        return Bad(f"{_label(node)} applies a nonlinearity to the state", node.name, False)


def _rule_for(ix: Interpreter, i: int, raw: list[tuple[str, Poly]]) -> tuple[StateRule, list[Readout]]:
    node = ix.new_states[i]
    v = ix.env.get(node)
    if isinstance(v, Bad):
        kind = RuleKind.AFFINE if v.linear else RuleKind.NONLINEAR
        return StateRule(i, kind, reason=f"state {i}: {v.reason}", blocking_node=v.node), []
    poly = al.simplify(ix.open(node) if v is None else v)
    mine = [(n, p) for n, p in raw if p.monos[0].state.state == i]
    return fit_rule(i, node.name, poly, mine, ix.space, ix.exp_input)


def _operand_nodes(*ops) -> set[str]:
    return {n for op in ops if op is not None for n in op.nodes}


def analyse_body(body: LoopBody) -> LoopAnalysis:
    """Prove, per carried state, which update rule the body applies, and how outputs read the states.

    Never raises on an unsupported body: such states come back AFFINE or
    NONLINEAR with ``reason`` and ``blocking_node`` set.
    """
    ix = Interpreter(body)
    raw, post, leaves, with_constant = find_readouts(ix.outputs, ix.value, _tensor_args)
    rules, readouts = [], []
    for i in range(body.n_states):
        try:
            rule, reads = _rule_for(ix, i, raw)
        except Exception as e:  # noqa: BLE001 - an analysis gap must fall back, never crash
            node = getattr(ix.new_states[i], "name", None)
            rule, reads = StateRule(i, RuleKind.NONLINEAR, reason=f"state {i}: analysis failed "
                                    f"({type(e).__name__}: {e})", blocking_node=node), []
        rules.append(rule)
        readouts.extend(replace(r, constant=r.node in with_constant) for r in (reads if rule.kind.chunkwise else []))
    for r in rules:
        leaves |= _operand_nodes(r.k, r.v, r.beta, r.write, r.gate, r.log_gate)
    for r in readouts:
        leaves |= _operand_nodes(r.q, r.post)
    return LoopAnalysis(tuple(rules), tuple(readouts), frozenset(leaves), frozenset(post),
                        frozenset(n.name for n in ix.after))
