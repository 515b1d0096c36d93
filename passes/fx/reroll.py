"""Re-roll the unrolled update loop of a trace into one step body.

    before (trace at probe length T=5):
        k0 = select(k, 1, 0); S1 = add(S0, mul(k0, ..)); o0 = ...
        k1 = select(k, 1, 1); S2 = add(S1, mul(k1, ..)); o1 = ...
        ...                                            out = stack([o0, .., o4], 1)
    after:
        body(state_0, step_0, ..) -> (new_state_0, o)       # one step, generic
        RerolledLoop(inits=[S0], step_inputs=[(k, dim 1)], collectors=[stack -> o])

Each node is tagged with the step it belongs to: a per-step slice of a
time-carrying tensor (``select``/``slice`` at index t, ``unbind``/``split``
items) or a write into an output buffer at index t anchors its step; other
nodes take the latest step among their inputs, and never an earlier step
than the last anchor before them in execution order (a Python loop runs its
iterations one after the other).  Bodies of the middle steps must be
isomorphic; values flowing from body t-1 into body t are the carried states;
values gathered by ``stack``/``cat`` or written into a buffer at index t are
per-step outputs.  Anything else raises ``NotALoop`` with the reason.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from nlcompile.passes.fx.assemble import SCATTERS as _SCATTERS
from nlcompile.passes.fx.assemble import assemble_loop
from nlcompile.passes.fx.loop_record import NotALoop, RerolledLoop, StepInput, norm_dim

aten = torch.ops.aten

_SELECTS = (aten.select.int,)
_SLICES = (aten.slice.Tensor,)
_UNBINDS = (aten.unbind.int,)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
_COLLECTORS = (aten.stack.default, aten.cat.default)


def _time_dim(node: fx.Node, trip: int) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = [d for d, s in enumerate(val.shape) if s == trip]
    return dims[0] if len(dims) == 1 else None


class _Tagger:
    """Assign every node of the trace a step (None: prologue / invariant)."""

    def __init__(self, gm: fx.GraphModule, trip: int, settled: frozenset[fx.Node] = frozenset()):
        self.trip = trip
        self.asap: dict[fx.Node, int | None] = {}
        self.anchor: dict[fx.Node, int] = {}
        self.source: dict[fx.Node, StepInput] = {}
        self.tcarry: dict[fx.Node, int] = {}
        self.tag: dict[fx.Node, int | None] = {}
        self.collectors: list[fx.Node] = []     # stack / cat of one value per step, in order
        current = -1
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            ins = [self.asap[a] for a in node.all_input_nodes]
            steps = [s for s in ins if s is not None]
            asap = max(steps) if steps else None
            if node in settled:      # part of a loop found before: a finished value here
                asap = None
            t, positional = self._anchor(node) if node not in settled else (None, False)
            if t is not None:
                self.anchor[node] = t
                asap = t if asap is None else max(asap, t)
                if positional:
                    current = max(current, t)
            self.asap[node] = asap
            if asap is None:
                dim = _time_dim(node, trip)
                if dim is not None:
                    self.tcarry[node] = dim
                self.tag[node] = None
            else:
                self.tag[node] = max(asap, current)
            if node.target in _COLLECTORS and self._gathers_every_step(node):
                self.collectors.append(node)

    def _gathers_every_step(self, node: fx.Node) -> bool:
        """``stack``/``cat`` of exactly one value of each step 0..trip-1, in order
        (an in-body ``cat([h, x_t])`` is an ordinary op of its step)."""
        items = node.args[0]
        return (isinstance(items, (list, tuple)) and len(items) == self.trip
                and [self.tag.get(x) for x in items] == list(range(self.trip)))

    def _anchor(self, node: fx.Node) -> tuple[int | None, bool]:
        """Step index anchored by ``node``, and whether its position marks the step."""
        if node.op != "call_function":
            return None, False
        args = node.args
        if node.target in _SELECTS and args[0] in self.tcarry:
            if norm_dim(args[1], args[0]) == self.tcarry[args[0]]:
                self.source[node] = StepInput(args[0], self.tcarry[args[0]], False)
                return args[2], True
        if node.target in _SLICES and args[0] in self.tcarry and len(args) >= 4:
            step = args[4] if len(args) > 4 else 1
            if norm_dim(args[1], args[0]) == self.tcarry[args[0]] and args[3] == args[2] + 1 and step == 1:
                self.source[node] = StepInput(args[0], self.tcarry[args[0]], True)
                return args[2], True
        if node.target is operator.getitem and isinstance(args[0], fx.Node):
            parent = args[0]
            if parent.target in _UNBINDS + _SPLITS and parent.args[0] in self.tcarry:
                src = parent.args[0]
                at = 1 if parent.target in _UNBINDS else 2        # unbind(x, dim); split(x, size, dim)
                dim = norm_dim(parent.args[at] if len(parent.args) > at else parent.kwargs.get("dim", 0), src)
                unit = parent.target in _UNBINDS or parent.args[1] in (1, [1] * self.trip)
                if dim == self.tcarry[src] and unit:
                    self.source[node] = StepInput(src, dim, parent.target in _SPLITS)
                    return args[1], False
        if node.target in _SCATTERS:
            buf = args[0]
            dim = self.tcarry.get(buf, self._buffer_dim(buf))
            if dim is not None and norm_dim(args[2], buf) == dim:
                if node.target == aten.select_scatter.default:
                    return args[3], True
                if len(args) >= 5 and args[4] == args[3] + 1:
                    return args[3], True
        return None, False

    def _buffer_dim(self, buf: fx.Node) -> int | None:
        if buf.target in _SCATTERS and buf in self.anchor:
            return norm_dim(buf.args[2], buf.args[0])
        return None


def _step_index_slots(node: fx.Node) -> tuple[int, ...]:
    """Positions in ``node.args`` that hold the step index (compared with an offset)."""
    if node.target in _SELECTS:
        return (2,)
    if node.target in _SLICES:
        return (2, 3)
    if node.target is operator.getitem:
        return (1,)
    if node.target == aten.select_scatter.default:
        return (3,)
    if node.target == aten.slice_scatter.default:
        return (3, 4)
    return ()


class _Matcher:
    """Compare the bodies of two steps node by node (local positions)."""

    def __init__(self, tagger: _Tagger, bodies: dict[int, list[fx.Node]]):
        self.tagger = tagger
        self.bodies = bodies
        self.local = {n: i for b in bodies.values() for i, n in enumerate(b)}
        self.inits: dict[int, fx.Node] = {}
        self.hoisted: set[fx.Node] = set()

    def same(self, a: fx.Node, ta: int, m: fx.Node, tm: int) -> bool:
        if a.op != m.op or a.target != m.target or len(a.args) != len(m.args):
            return False
        slots = _step_index_slots(a) if a in self.tagger.anchor else ()
        for i, (x, y) in enumerate(zip(a.args, m.args)):
            if i in slots:
                if not (isinstance(x, int) and isinstance(y, int) and x - ta == y - tm):
                    return False
            elif not self._same_arg(x, ta, y, tm):
                return False
        return a.kwargs.keys() == m.kwargs.keys() and all(
            self._same_arg(a.kwargs[k], ta, m.kwargs[k], tm) for k in a.kwargs
        )

    def _same_arg(self, x, ta: int, y, tm: int) -> bool:
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(
                self._same_arg(p, ta, q, tm) for p, q in zip(x, y)
            )
        if not isinstance(x, fx.Node):
            return not isinstance(y, fx.Node) and type(x) is type(y) and x == y
        if not isinstance(y, fx.Node):
            return False
        tx, ty = self.tagger.tag[x], self.tagger.tag[y]
        if tx is None or ty is None:
            if tx is None and ty is None:
                return x is y
            if ta == 0 and tx is None and ty == tm - 1:   # initial value of a carried state
                slot = self.local[y]
                return self.inits.setdefault(slot, x) is x
            if ta == 0 and tx is None and ty == tm and y in self.hoisted:
                return self.same(x, 0, y, tm)             # hoisted before the loop in step 0
            return False
        return tx - ta == ty - tm and tx >= ta - 1 and self.local.get(x) == self.local.get(y)


def _bodies(tagger: _Tagger, gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    bodies: dict[int, list[fx.Node]] = {t: [] for t in range(tagger.trip)}
    for node in gm.graph.nodes:
        tag = tagger.tag.get(node)
        if tag is None or node in tagger.collectors:
            continue
        if tag >= tagger.trip or tag < 0:
            raise NotALoop(f"node {node.name} has step {tag} outside the trip count {tagger.trip}")
        bodies[tag].append(node)
    return bodies


def _state_only(template: list[fx.Node], previous: set[fx.Node], tagger: _Tagger) -> set[fx.Node]:
    """Template nodes computed from carried values and invariants alone.  In step 0
    they read only values from before the loop, so the trace hoists them there."""
    out: set[fx.Node] = set()
    for node in template:
        if node not in tagger.anchor and all(
            a in previous or tagger.tag[a] is None or a in out for a in node.all_input_nodes
        ):
            out.add(node)
    return out


def _check_isomorphic(matcher: _Matcher, bodies: dict[int, list[fx.Node]], m: int
                      ) -> tuple[list[fx.Node], set[int]]:
    """Check every step's body against the template (step m); return the last step's
    loop nodes and the template positions the last step lacks."""
    template = bodies[m]
    trip = len(bodies)
    matcher.hoisted = _state_only(template, set(bodies[m - 1]), matcher.tagger)
    first = iter(bodies[0])
    pending = next(first, None)
    for pos, b in enumerate(template):      # step 0: hoisted template nodes may be missing
        if pending is not None and matcher.same(pending, 0, b, m):
            matcher.local[pending] = pos
            pending = next(first, None)
        elif b not in matcher.hoisted:
            raise NotALoop(f"step 0 differs from step {m} at {b.name} ({b.target}): the loop body "
                           "changes between steps (a branch on the step index?)")
    if pending is not None:
        raise NotALoop(f"step 0 has an extra op {pending.name}: the loop body changes between steps")
    for t in range(1, trip - 1):
        body = bodies[t]
        if len(body) != len(template):
            raise NotALoop(f"step {t} has {len(body)} ops, step {m} has {len(template)}: the loop body "
                           "changes between steps (a branch on the step index?)")
        for a, b in zip(body, template):
            if not matcher.same(a, t, b, m):
                raise NotALoop(f"step {t} differs from step {m} at {a.name} ({a.target}) vs {b.name}: "
                               "the loop body changes between steps (a branch on the step index?)")
    return _match_last(matcher, bodies, m)


def _match_last(matcher: _Matcher, bodies: dict[int, list[fx.Node]], m: int) -> list[fx.Node]:
    """Match the last step to the template; return the nodes that belong to the loop.

    The last step may lack a tail of the template that only feeds the next step:
    dead code (a final state nobody returns) or a rotated body (``h @ W`` or
    ``S * gamma`` written before the step's own slices).  Whatever follows the
    template in the last step is code after the loop."""
    template, trip = bodies[m], len(bodies)
    following = set(bodies[m + 1])
    droppable: set[fx.Node] = set()
    for b in reversed(template):
        users = list(b.users)
        if users and all(u in following or u in droppable for u in users):
            droppable.add(b)
    last = bodies[trip - 1]
    matched, dropped, i = [], set(), 0
    for pos, b in enumerate(template):
        if i < len(last) and matcher.same(last[i], trip - 1, b, m):
            matcher.local[last[i]] = pos
            matched.append(last[i])
            i += 1
        elif b in droppable:
            dropped.add(pos)
        else:
            raise NotALoop(f"the last step does not repeat the loop body (missing {b.name}, {b.target})")
    return matched, dropped


def reroll_all(gm: fx.GraphModule, trip: int) -> list[RerolledLoop]:
    """Every update loop of a trace, in order (stacked layers: loop 2 slices what
    loop 1 gathered).  Raises NotALoop when there is none or one is not understood."""
    loops: list[RerolledLoop] = []
    settled: frozenset[fx.Node] = frozenset()
    while True:
        try:
            loop = reroll(gm, trip, settled)
        except NotALoop as exc:
            if loops and str(exc) == _NO_SLICE:
                return loops
            raise
        loops.append(loop)
        settled = settled | loop.nodes


_NO_SLICE = "no per-step slice of a time-carrying input: no loop over the time axis"


def reroll(gm: fx.GraphModule, trip: int, settled: frozenset[fx.Node] = frozenset()) -> RerolledLoop:
    """Find the first update loop of a trace made at probe length ``trip`` that is not
    among the ``settled`` nodes (loops found before)."""
    if trip < 5:
        raise ValueError("re-rolling needs a probe of at least 5 steps")
    tagger = _Tagger(gm, trip, settled)
    if not tagger.anchor:
        raise NotALoop(_NO_SLICE)
    m = 2  # a middle step: its neighbours are ordinary steps too
    bodies = _bodies(tagger, gm)
    matcher = _Matcher(tagger, bodies)
    loop_part, dropped = _check_isomorphic(matcher, bodies, m)
    if dropped and not any(bodies[m][p] in tagger.anchor for p in dropped):
        # maybe a rotated body: the tail the last step lacks starts the next step;
        # move it there and match again (if that fails, the tail was dead code)
        saved = dict(tagger.tag)
        for t in range(trip - 1):
            for node in bodies[t]:
                if matcher.local.get(node) in dropped:
                    tagger.tag[node] = t + 1
        try:
            rotated = _bodies(tagger, gm)
            rmatcher = _Matcher(tagger, rotated)
            rloop, rdropped = _check_isomorphic(rmatcher, rotated, m)
        except NotALoop:
            rdropped = True
        if rdropped:
            tagger.tag = saved
        else:
            bodies, matcher, loop_part = rotated, rmatcher, rloop
    return assemble_loop(gm, tagger, bodies, matcher, m, loop_part)
