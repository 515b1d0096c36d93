"""Roles of a state's atomic indices (batch / key / value), and tensors in kernel layout.

``fit_rule`` reads the new state's polynomial as
``S' = gate (I - beta k k^T) S + write k v^T`` and chooses which atom of the state
is the key and which the value (the rest are batch)::

    before:  S'[b,h,i,j] = S[b,h,i,j] - beta[b,h] k[b,h,i] k[b,h,c] S[b,h,c,j]
                           + beta[b,h] k[b,h,i] v[b,h,j]
    after:   StateRule(DELTA, layout=(batch=(b, h), key=i, value=j),
                       k=k[b,h,i], v=v[b,h,j], beta=beta[b,h], write=beta[b,h])

The numeric helpers move per-step leaves and states between the body's own
layout and the scan kernels' layout: states ``[N, dk, dv]``, keys ``[N, T, dk]``,
values ``[N, T, dv]``, scalars ``[N, T]`` (N = the batch atoms, flattened in
``layout.batch`` order).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from nlcompile.ir import Factor, Operand, Readout, RuleKind, StateLayout, StateRule
from nlcompile.passes.fx import algebra as al
from nlcompile.passes.fx.algebra import Mono, Poly


class _Fail(Exception):
    """A rule or role assignment that does not fit; ``node`` names the culprit when known."""

    def __init__(self, reason: str, node: str | None = None):
        super().__init__(reason)
        self.node = node


@dataclass(frozen=True)
class _Parts:
    state: int
    atoms: tuple[int, ...]                 # output atom per state atom position
    dims: tuple[tuple[int, ...], ...]
    gate: Mono | None
    proj: tuple[int, Mono] | None
    write: Mono | None
    reads: tuple[tuple[str, Poly], ...]
    space: al.Space
    exp_input: Callable[[str], str | None]


def _atoms(fs: Sequence[Factor]) -> set[int]:
    return {a for f in fs for a in f.indices}


def _check(fs: Sequence[Factor], allowed: set[int], what: str, value: int | None) -> None:
    extra = _atoms(fs) - allowed
    if extra and value in extra:
        raise _Fail(f"{what} carries the value index (per value channel): not supported")
    if extra:
        raise _Fail(f"{what} carries an index outside its role ({sorted(extra)})")


def _remove(fs: Sequence[Factor], sub: Sequence[Factor]) -> list[Factor]:
    rest = list(fs)
    for f in sub:
        if f not in rest:
            raise _Fail("the projection term is not gated by the same decay as the state term")
        rest.remove(f)
    return rest


def _rename(f: Factor, a: int, b: int) -> Factor:
    return Factor(f.node, f.power, f.atomic_shape, tuple(b if x == a else x for x in f.indices))


def _split(state: int, poly: Poly, out: tuple[int, ...]):
    """Sort the monomials into the state term, the projection term and the write term."""
    gates, projs, writes = [], [], []
    for m in poly.monos:
        st = m.state
        if st is None:
            writes.append(m)
            continue
        if st.state != state or st.when != "before":
            raise _Fail(f"depends on state {st.state} ({st.when} its update): coupled states (e.g. momentum)")
        diff = [p for p, (a, b) in enumerate(zip(st.indices, out)) if a != b]
        if not diff:
            gates.append(m)
        elif len(diff) == 1 and st.indices[diff[0]] not in out:
            projs.append((diff[0], m))
        else:
            raise _Fail("the linear map mixes entries of the state beyond one contracted dim")
    for items, what in ((gates, "state (decay) term"), (projs, "projection term"), (writes, "write term")):
        if len(items) > 1:
            raise _Fail(f"the {what} is a sum of {len(items)} monomials")
    if projs and not gates:
        raise _Fail("the state is multiplied by a matrix that is not identity minus a rank-one projection")
    return (gates or [None])[0], (projs or [None])[0], (writes or [None])[0]


def _align_state(poly: Poly, space: al.Space) -> Poly:
    for d in poly.dims:
        if len(d) > 1:
            merged = al.merge(poly, d, space.fresh(space.size(d)), space)
            if merged is None:
                raise _Fail("a dim of the new state holds several atoms that cannot be merged")
            poly = merged
    return poly


def _candidates(r: int, proj: tuple[int, Mono] | None):
    pairs = sorted(((k, v) for k in range(r) for v in range(r) if k != v), key=lambda kv: (-sum(kv), kv[0]))
    cands = pairs + [(k, None) for k in reversed(range(r))]
    return [c for c in cands if proj is None or c[0] == proj[0]]


def fit_rule(state: int, node: str, poly: Poly, reads: Sequence[tuple[str, Poly]], space: al.Space,
             exp_input: Callable[[str], str | None]) -> tuple[StateRule, list[Readout]]:
    """Classify one state from its new value's polynomial; readouts of it are checked and built too."""
    try:
        poly = _align_state(poly, space)
        atoms = tuple(d[0] for d in poly.dims if d)
        parts = _Parts(state, atoms, poly.dims, *_split(state, poly, atoms), tuple(reads), space, exp_input)
    except _Fail as e:
        return _fallback(state, node, str(e), RuleKind.AFFINE), []
    first = None
    for key, value in _candidates(len(atoms), parts.proj):
        try:
            return _build(parts, key, value)
        except _Fail as e:
            first = first or e
    why = str(first) if first else "a state without dims"
    return _fallback(state, node, why, RuleKind.AFFINE, getattr(first, "node", None)), []


def _fallback(state: int, node: str, why: str, kind: RuleKind, culprit: str | None = None) -> StateRule:
    return StateRule(state, kind, reason=f"state {state} (new value at node {node}): {why}",
                     blocking_node=culprit or node)


def _projection(parts: _Parts, gate: Sequence[Factor], ca: float, key: int, bset: set[int], value):
    """(erase key factors, beta, gate_first) of the projection term ``-b k k^T (gate) S``.

    A per-key-channel gate is found either on the written key index (``D (I - b k k^T) S``:
    delta, then decay) or on the read index (``(I - b k k^T) D S``: decay, then delta,
    ``gate_first``); a scalar gate commutes and is reported as not first.
    """
    pos, m = parts.proj
    c = m.state.indices[pos]
    gate_first = False
    try:
        rest = _remove(m.factors, gate)
    except _Fail:
        rest = _remove(m.factors, [_rename(f, key, c) for f in gate])
        gate_first = True
    read = [f for f in rest if c in f.indices]
    wrote = [f for f in rest if key in f.indices]
    if any(c in f.indices and key in f.indices for f in rest):
        raise _Fail("one factor carries both the read and the written key index: not a rank-one projection")
    if sorted((_rename(f, c, key) for f in read), key=repr) != sorted(wrote, key=repr):
        raise _Fail("the projection is not k k^T (different factors read and write the key)")
    _check(wrote, bset | {key}, "the key", value)
    beta = [f for f in rest if f not in read and f not in wrote]
    _check(beta, bset, "beta", value)
    return tuple(wrote), Operand(-m.coef / ca, tuple(beta)), gate_first


def _write(parts: _Parts, key: int, value: int | None, bset: set[int], erase_key):
    m = parts.write
    if m is None:
        return Operand(1.0, erase_key or ()), Operand(1.0, ()) if value is not None else None, Operand(0.0, ())
    kw = [f for f in m.factors if key in f.indices]
    vw = [f for f in m.factors if value is not None and value in f.indices]
    if set(kw) & set(vw):
        raise _Fail("a write factor carries both the key and the value index: the write is not rank one")
    w = [f for f in m.factors if f not in kw and f not in vw]
    _check(kw, bset | {key}, "the write key", value)
    _check(w, bset, "the write coefficient", value)
    if value is not None:
        _check(vw, bset | {value}, "the value", None)
    if erase_key is not None and sorted(kw, key=repr) != sorted(erase_key, key=repr):
        raise _Fail("the write key differs from the erase key (for instance a per-key-channel decay between "
                    "the delta step's erase and its write): no chunkwise form")
    v = Operand(1.0, tuple(vw)) if value is not None else None
    return Operand(1.0, tuple(kw)), v, Operand(m.coef, tuple(w))


def _build(parts: _Parts, key_pos: int, value_pos: int | None) -> tuple[StateRule, list[Readout]]:
    key = parts.atoms[key_pos]
    value = parts.atoms[value_pos] if value_pos is not None else None
    batch = tuple(a for p, a in enumerate(parts.atoms) if p not in (key_pos, value_pos))
    bset = set(batch)
    gate, ca = (parts.gate.factors, parts.gate.coef) if parts.gate else ((), 0.0)
    _check(gate, bset | {key}, "the decay", value)
    erase_key, beta, gate_first = (_projection(parts, gate, ca, key, bset, value) if parts.proj
                                   else (None, None, False))
    k, v, write = _write(parts, key, value, bset, erase_key)
    if value is None and k.factors and not bset <= _atoms(k.factors):
        raise _Fail("no value dim found: the key does not carry every other index of the state")
    layout = StateLayout(parts.dims, tuple((a, parts.space.sizes[a]) for a in parts.atoms), batch, key, value)
    plain = not gate and ca == 1.0
    if parts.proj:
        kind = RuleKind.DELTA if plain else RuleKind.GATED_DELTA
    else:
        kind = RuleKind.ADDITIVE if plain else RuleKind.DECAY
    g = None if plain else Operand(ca, tuple(gate))
    readouts = [make_readout(name, p, parts.state, layout, parts.space) for name, p in parts.reads]
    if value is None and any(r.q.factors and not bset <= _atoms(r.q.factors) for r in readouts):
        raise _Fail("no value dim found: a readout query does not carry every other index of the state")
    note = None
    if not readouts and not parts.proj and value is not None:
        note = f"no readout: key taken as state dim {next(d for d, t in enumerate(parts.dims) if t == (key,))}"
    per_channel = any(key in f.indices for f in gate)
    rule = StateRule(parts.state, kind, layout, k, v, beta, write, g, _log_gate(g, parts.exp_input),
                     per_channel, note, gate_first=gate_first and per_channel)
    return rule, readouts


def _log_gate(gate: Operand | None, exp_input: Callable[[str], str | None]) -> Operand | None:
    """log(a) when a = exp(g)**p of one state-free node g (same indices): Operand(p, g)."""
    if gate is None or gate.coef != 1.0 or not gate.factors or len(gate.nodes) != 1:
        return None
    f0 = gate.factors[0]
    src = exp_input(f0.node)
    if src is None or any(f.indices != f0.indices for f in gate.factors):
        return None
    return Operand(float(sum(f.power for f in gate.factors)), (Factor(src, 1, f0.atomic_shape, f0.indices),))


def make_readout(name: str, poly: Poly, state: int, layout: StateLayout, space: al.Space) -> Readout:
    """o = coef * (S^T q) * post, read off a one-monomial poly; raises _Fail when not of that form."""
    poly = al.freshen(poly, space)
    st = poly.monos[0].state
    own = tuple(a for d in layout.dims for a in d)
    p = al.rename_all(poly, dict(zip(st.indices, own)), space)
    m, free = p.monos[0], p.free
    if layout.key in free:
        raise _Fail(f"the per-step output {name} does not contract the key index of the state (o = S^T q "
                    "expected)", name)
    bset = set(layout.batch)
    q, post = [], []
    for f in m.factors:
        at = set(f.indices)
        if not at <= set(own) or (layout.key in at and layout.value in at):
            raise _Fail(f"the per-step output {name} is not a readout S^T q (factor {f.node})", name)
        (q if layout.key in at or at <= bset else post).append(f)
    roles = layout.batch + ((layout.value,) if layout.value is not None else ())
    summed = tuple(a for a in roles if a not in free)
    return Readout(name, state, st.when, Operand(m.coef, tuple(q)), Operand(1.0, tuple(post)) if post else None,
                   p.dims, summed)


def find_readouts(outputs: Sequence, value: Callable, inputs: Callable):
    """Walk back from the per-step outputs to the readouts.

    A node read as a one-monomial degree-1 poly is a readout; so is one with a
    single degree-1 monomial beside state-free terms (its degree-1 part is read,
    the rest is the node at zero state: listed in ``with_constant``); any other
    state-dependent node on the way (a sum, a Bad) is post and the walk goes on
    into its inputs; state-free nodes met are leaves.  ``value(node, consumer)``
    and ``inputs(node)`` come from the interpreter.  Returns (readouts as
    (node name, poly), post node names, leaf node names, with_constant).
    """
    raw: list[tuple[str, Poly]] = []
    post: set[str] = set()
    leaves: set[str] = set()
    with_constant: set[str] = set()
    seen: set = set()

    def visit(node, consumer) -> None:
        if not hasattr(node, "name") or node in seen:
            return
        seen.add(node)
        v = value(node, consumer)
        if v is None:
            leaves.add(node.name)
        elif isinstance(v, Poly) and len(v.monos) == 1 and v.monos[0].state is not None:
            raw.append((node.name, v))
        elif isinstance(v, Poly) and sum(m.state is not None for m in v.monos) == 1:
            raw.append((node.name, Poly(v.dims, tuple(m for m in v.monos if m.state is not None))))
            with_constant.add(node.name)
        else:
            post.add(node.name)
            for a in inputs(node):
                visit(a, node)

    for out in outputs:
        visit(out, None)
    return raw, post, leaves, with_constant


# ---------------------------------------------------------------- numerics
@dataclass(frozen=True)
class _Materialization:
    """How ``materialize`` builds one operand: the einsum equation, or the permutation that
    replaces it when one factor holds every index once; the dim of the result that is T;
    the shapes before and after broadcasting, T included as -1."""

    equation: str
    permutation: tuple[int, ...] | None
    time_dim: int
    shape: tuple[int, ...]
    full: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def _materialization(op: Operand, order: tuple[int, ...], sizes: tuple[tuple[int, int], ...],
                     time_at: int) -> _Materialization:
    """The index bookkeeping of ``materialize``: pure in its arguments, so worked out once
    per operand and layout instead of on every call of a compiled program."""
    size = dict(sizes)
    names = {a: chr(ord("a") + i) if i < 25 else chr(ord("A") + i - 25) for i, a in enumerate(order)}
    subs = []
    for f in op.factors:
        if not set(f.indices) <= set(order):
            raise ValueError(f"factor {f.node} carries indices {sorted(set(f.indices) - set(order))} not in {order}")
        subs.append("z" + "".join(names[a] for a in f.indices))
    carried = [a for a in order if any(a in f.indices for f in op.factors)]
    before = sum(a in carried for a in order[:time_at])
    out = "".join(names[a] for a in carried)
    out = out[:before] + "z" + out[before:]
    permutation = None
    if len(subs) == 1 and sorted(subs[0]) == sorted(out) and len(set(out)) == len(out):
        permutation = tuple(subs[0].index(c) for c in out)
    shape = [size[a] if a in carried else 1 for a in order]
    full = [size[a] for a in order]
    shape.insert(time_at, -1)
    full.insert(time_at, -1)
    return _Materialization(",".join(subs) + "->" + out, permutation, before, tuple(shape), tuple(full))


def materialize(op: Operand, values: Mapping[str, torch.Tensor], order: Sequence[int],
                sizes: Mapping[int, int], time_at: int = 0, keep_dtype: bool = False) -> torch.Tensor:
    """``coef * prod(factor ** power)`` over ``order`` (broadcast where no factor carries
    an index), with the time dim inserted before ``order[time_at]``: by default
    ``[T, *sizes[order]]``; a kernel layout ``[batch..., T, d]`` comes out directly.  In at least
    fp32, unless ``keep_dtype`` and the operand is one factor as it is (no arithmetic to round)."""
    plan = _materialization(op, tuple(order), tuple(sorted(sizes.items())), time_at)
    terms = []
    for f in op.factors:
        x = values[f.node]
        x = x.reshape(x.shape[0], *f.atomic_shape)
        terms.append(x if f.power == 1 else x.to(_float(x.dtype)) ** f.power)
    if terms:
        as_is = keep_dtype and len(terms) == 1 and op.factors[0].power == 1 and op.coef == 1.0
        dtype = _promote([*(t.dtype for t in terms), *(() if as_is else (torch.float32,))])  # gates, coefficients
        if plan.permutation is not None:
            res = terms[0].to(dtype).permute(plan.permutation)  # a view, not an einsum
        else:
            res = torch.einsum(plan.equation, *[t.to(dtype) for t in terms])
        if op.coef != 1.0:
            res = res * op.coef
    else:
        first = next(iter(values.values()), None)
        t = first.shape[0] if first is not None else 1
        dtype = torch.promote_types(first.dtype, torch.float32) if first is not None else torch.float32
        res = torch.full((t,), float(op.coef), dtype=dtype if dtype.is_floating_point else torch.float32)
    steps = res.shape[plan.time_dim]
    res = res.reshape([steps if n == -1 else n for n in plan.shape])
    return res if plan.shape == plan.full else res.expand([steps if n == -1 else n for n in plan.full])


def _promote(dtypes) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    return out


def _float(d: torch.dtype) -> torch.dtype:
    return d if d.is_floating_point else torch.float32


ONE = Operand(1.0, ())   # no factor: what an absent value or write coefficient stands for


def operand_for_kernel(op: Operand | None, layout: StateLayout, role: str, values: Mapping[str, torch.Tensor],
                       per_channel: bool | None = None, time_major: bool = False,
                       keep_dtype: bool = False) -> torch.Tensor:
    """role "key" -> [N, T, dk], "value" -> [N, T, dv], "scalar" -> [N, T], "gate" -> [N, T] or [N, T, dk];
    ``time_major``: [T, N, ...] instead, which for the per-step values (stacked over a leading T)
    is a view where the flat layout is a transposing copy.  ``keep_dtype``: keys and values that
    are one value as it is keep its dtype (bf16 stays bf16), the rest is at least fp32."""
    op = op if op is not None else ONE
    sizes = dict(layout.sizes)
    if role == "gate" and per_channel is None:
        per_channel = layout.key in {a for f in op.factors for a in f.indices}
    inner = {"key": layout.key, "value": layout.value, "scalar": None,
             "gate": layout.key if per_channel else None}[role]
    order = layout.batch + ((inner,) if inner is not None else ())
    time_at = 0 if time_major else len(layout.batch)
    keep = keep_dtype and role in ("key", "value")
    x = materialize(op, values, order, sizes, time_at=time_at, keep_dtype=keep)   # [batch..., T, (d)] or [T, ...]
    n = math.prod(sizes[a] for a in layout.batch)
    steps = x.shape[time_at]
    lead = (steps, n) if time_major else (n, steps)
    x = x.reshape(*lead, -1) if inner is not None else x.reshape(lead)
    return x.unsqueeze(-1) if role == "value" and inner is None else x


def _kernel_order(layout: StateLayout) -> tuple[int, ...]:
    return layout.batch + (layout.key,) + ((layout.value,) if layout.value is not None else ())


def state_to_kernel(layout: StateLayout, S: torch.Tensor) -> torch.Tensor:
    """The state in its own layout -> ``[N, dk, dv]`` (dv = 1 without a value dim)."""
    sizes, atoms = dict(layout.sizes), [a for d in layout.dims for a in d]
    x = S.reshape([sizes[a] for a in atoms]).permute([atoms.index(a) for a in _kernel_order(layout)])
    dv = sizes[layout.value] if layout.value is not None else 1
    return x.reshape(math.prod(sizes[a] for a in layout.batch), sizes[layout.key], dv)


def state_from_kernel(layout: StateLayout, S_kernel: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``state_to_kernel``: ``[N, dk, dv]`` -> the state's own ``shape``."""
    sizes, atoms, order = dict(layout.sizes), [a for d in layout.dims for a in d], _kernel_order(layout)
    x = S_kernel.reshape([sizes[a] for a in order]).permute([order.index(a) for a in atoms])
    return x.reshape(tuple(shape))


def readout_to_node(readout: Readout, layout: StateLayout, o: torch.Tensor, values: Mapping[str, torch.Tensor],
                    node_shape: Sequence[int], time_major: bool = False) -> torch.Tensor:
    """Kernel output ``o = S^T q`` -> the readout node's values stacked over time, ``[T, *node_shape]``.

    ``o`` is in kernel layout, ``[N, T, dv]`` (as the scan kernels return it and as
    ``operand_for_kernel`` lays out its tensors; dv = 1 without a value dim), or ``[T, N, dv]``
    when ``time_major``.
    Then ``post`` is applied, ``summed`` indices are summed, and the rest is
    permuted / merged / broadcast into the node's dims.
    """
    sizes = dict(layout.sizes)
    order = list(layout.batch + ((layout.value,) if layout.value is not None else ()))
    n = math.prod(sizes[a] for a in layout.batch)
    dv = sizes[layout.value] if layout.value is not None else 1
    if o.dim() != 3 or o.shape[1 if time_major else 0] != n or o.shape[2] != dv:
        want = f"[T, N={n}, dv={dv}]" if time_major else f"[N={n}, T, dv={dv}]"
        raise ValueError(f"readout {readout.node}: o must be {want}, got {tuple(o.shape)}")
    if not time_major:
        o = o.movedim(1, 0)
    x = o.reshape(o.shape[0], *[sizes[a] for a in order])
    if readout.post is not None:
        x = x * materialize(readout.post, values, order, sizes)
    if readout.summed:
        x = x.sum(dim=[1 + order.index(a) for a in readout.summed])
    keep = [a for a in order if a not in readout.summed]
    node_atoms = [a for d in readout.dims for a in d]
    if not set(keep) <= set(node_atoms):
        raise ValueError(f"readout {readout.node}: indices {set(keep) - set(node_atoms)} not in the node")
    _broadcast_sizes(readout.dims, node_shape, sizes)
    x = x.permute([0] + [1 + keep.index(a) for a in node_atoms if a in keep])
    x = x.reshape(x.shape[0], *[sizes[a] if a in keep else 1 for a in node_atoms])
    x = x.expand(x.shape[0], *[sizes[a] for a in node_atoms])
    return x.reshape(x.shape[0], *node_shape)


def _broadcast_sizes(dims, node_shape: Sequence[int], sizes: dict[int, int]) -> None:
    """Fill in sizes of a node's atoms no state index explains (at most one such atom per dim)."""
    for d, atoms in zip(dims, node_shape):
        unknown = [a for a in d if a not in sizes]
        if len(unknown) > 1:
            raise ValueError(f"cannot size broadcast atoms {unknown}")
        if unknown:
            sizes[unknown[0]] = int(atoms) // math.prod(sizes[a] for a in d if a in sizes)
