"""Assemble a loop record from the matched steps of a trace.

    before:  steps 0..T-1 of the trace, matched position by position to a template step
    after:   RerolledLoop(body: state_i, step_j, inv_k -> new states, per-step outputs;
                          inits, step_inputs, invariants, gathers, last_refs)

Carried states are template values read by the next step (values computed
from other states alone are recomputed, not carried); a write at index t
into a buffer that only the next write reads is a per-step output; values
gathered by ``stack``/``cat`` are per-step outputs; values of the last step
read after the loop are final states or last outputs.
"""
from __future__ import annotations

import torch
from torch import fx

from nlcompile.ir import LoopBody
from nlcompile.passes.fx.loop_record import Gather, NotALoop, RerolledLoop, StepInput, norm_dim

aten = torch.ops.aten
SCATTERS = (aten.select_scatter.default, aten.slice_scatter.default)


def assemble_loop(gm, tagger, bodies, matcher, m: int, loop_part: list[fx.Node]) -> RerolledLoop:
    trip = tagger.trip
    template = bodies[m]
    previous = set(bodies[m - 1])
    last_body = bodies[trip - 1]
    carried, invariants, sources, source_of = _interface(template, previous, tagger, matcher)

    # an output buffer: a carried write at index t that only the next step's write reads
    buffers: dict[int, int] = {}
    for slot in list(carried):
        node = template[slot]
        if node.target in SCATTERS and node in tagger.anchor and all(
            u is bodies[m + 1][slot] for u in node.users
        ):
            buffers[slot] = norm_dim(node.args[2], node.args[0])
            carried.remove(slot)

    derived = _derived_slots(template, carried, previous, tagger)
    carried = [slot for slot in carried if slot not in derived]

    outputs: list[int] = []      # template positions of per-step outputs

    def output_index(pos: int) -> int:
        if pos not in outputs:
            outputs.append(pos)
        return outputs.index(pos)

    at_slot = {matcher.local[n]: n for n in loop_part}   # the last step may lack dead template nodes
    gathers = [Gather(at_slot[slot], output_index(_value_pos(template, slot, matcher)), dim, "buffer")
               for slot, dim in buffers.items()]
    gathers += [_collector(c, bodies, matcher, output_index) for c in tagger.collectors]

    in_loop = set(loop_part)
    extras = [n for n in last_body if n not in in_loop]
    last_refs: dict[fx.Node, tuple[str, int]] = {}
    for node in loop_part:
        slot = matcher.local[node]
        if slot in buffers or all(u in in_loop or u in tagger.collectors for u in node.users):
            continue
        last_refs[node] = ("state", carried.index(slot)) if slot in carried else ("output", output_index(slot))
    _check_no_stray_refs(tagger, bodies, set(extras))

    inits = [matcher.inits.get(slot) for slot in carried]
    if any(i is None for i in inits):
        raise NotALoop("a carried state has no initial value before the loop")
    body = _build_body(template, carried, derived, sources, source_of, invariants, outputs, buffers, matcher)
    nodes = {n for t in range(trip - 1) for n in bodies[t]} | in_loop | set(tagger.collectors)
    return RerolledLoop(trip, body, tuple(inits), tuple(sources), tuple(invariants), tuple(gathers), last_refs,
                        frozenset(nodes))


def _derived_slots(template, carried, previous, tagger) -> dict[int, set[int]]:
    """Carried values that are a function of other carried states alone (say a view
    of S merged by CSE with the next step's use): recomputed, not carried."""
    local = {n: i for i, n in enumerate(template)}
    derived: dict[int, set[int]] = {}
    for slot in carried:
        stops = {template[y]: y for y in carried if y != slot}
        found: set[int] = set()
        todo, seen, ok = [template[slot]], set(), True
        while todo and ok:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in stops:
                found.add(stops[node])
                continue
            if node in tagger.source or any(a in previous for a in node.all_input_nodes):
                ok = False
            todo += [a for a in node.all_input_nodes if a in local]
        if ok and found:
            derived[slot] = found
    return {s: f for s, f in derived.items() if not (f & derived.keys())}


def _interface(template, previous, tagger, matcher):
    """Carried slots, invariants and per-step sources read by the template body."""
    carried: list[int] = []
    invariants: list[fx.Node] = []
    sources: list[StepInput] = []
    source_of: dict[int, int] = {}
    for i, node in enumerate(template):
        if node in tagger.source:
            src = tagger.source[node]
            if src not in sources:
                sources.append(src)
            source_of[i] = sources.index(src)
            continue
        for arg in node.all_input_nodes:
            if arg in previous:
                if matcher.local[arg] not in carried:
                    carried.append(matcher.local[arg])
            elif tagger.tag[arg] is None and arg not in invariants:
                invariants.append(arg)
    return carried, invariants, sources, source_of


def _value_pos(template: list[fx.Node], slot: int, matcher) -> int:
    value = template[slot].args[1]
    if value not in matcher.local or template[matcher.local[value]] is not value:
        raise NotALoop(f"the value written into the output buffer at {template[slot].name} is not "
                       "computed in the loop body")
    return matcher.local[value]


def _collector(coll: fx.Node, bodies, matcher, output_index) -> Gather:
    items = coll.args[0]
    trip = len(bodies)
    dim = coll.args[1] if len(coll.args) > 1 else coll.kwargs.get("dim", 0)
    if len(items) != trip:
        raise NotALoop(f"{coll.name} gathers {len(items)} values over {trip} steps")
    slots = {matcher.local.get(x) for x in items}
    if len(slots) != 1 or any(matcher.tagger.tag.get(x) != t for t, x in enumerate(items)):
        raise NotALoop(f"{coll.name} does not gather one value per step in step order")
    kind = "stack" if coll.target == aten.stack.default else "cat"
    ndim = items[0].meta["val"].dim() + (1 if kind == "stack" else 0)
    return Gather(coll, output_index(slots.pop()), dim % ndim, kind)


def _check_no_stray_refs(tagger, bodies, extras: set[fx.Node]) -> None:
    """Values of steps before the last may leave their step only through gathers."""
    trip = len(bodies)
    for t in range(trip - 1):
        for node in bodies[t]:
            for user in node.users:
                if user in tagger.collectors:
                    continue
                if tagger.tag.get(user) in (t, t + 1) and user not in extras:
                    continue
                raise NotALoop(f"{node.name} of step {t} is used after the loop by {user.name}; "
                               "only gathered (stacked / written) values may leave a loop step")


def _build_body(template, carried, derived, sources, source_of, invariants, outputs, buffers,
                matcher) -> LoopBody:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    prev_slot: dict[int, fx.Node] = {}
    for i, slot in enumerate(carried):
        ph = graph.placeholder(f"state_{i}")
        ph.meta["val"] = template[slot].meta["val"]
        prev_slot[slot] = ph
    step_ph = []
    for j, src in enumerate(sources):
        ph = graph.placeholder(f"step_{j}")
        step_ph.append(ph)
    inv_ph = {}
    for k, inv in enumerate(invariants):
        ph = graph.placeholder(f"inv_{k}")
        ph.meta["val"] = inv.meta.get("val")
        inv_ph[inv] = ph
    for pos, node in enumerate(template):
        if pos in source_of:
            ph = step_ph[source_of[pos]]
            ph.meta["val"] = node.meta["val"]
            env[node] = ph
            continue
        if pos in buffers:
            continue

        def remap(arg):
            if arg in env:
                return env[arg]
            if arg in inv_ph:
                return inv_ph[arg]
            slot = matcher.local.get(arg)
            if slot in prev_slot:
                return prev_slot[slot]
            if slot in derived:
                return _recompute(graph, template[slot], {template[y]: prev_slot[y] for y in derived[slot]},
                                  inv_ph)
            raise NotALoop(f"{node.name} reads {arg.name}, which is neither in the step nor carried")

        env[node] = graph.node_copy(node, remap)
    outs = [env[template[s]] for s in carried] + [env[template[p]] for p in outputs]
    graph.output(tuple(outs))
    graph.eliminate_dead_code()
    gm = fx.GraphModule(torch.nn.Module(), graph)
    return LoopBody(gm, len(carried), len(sources), len(invariants), len(outputs))


def _recompute(graph: fx.Graph, node: fx.Node, stops: dict[fx.Node, fx.Node], inv_ph) -> fx.Node:
    """Emit the template's computation of ``node`` from the carried states ``stops``."""
    memo = dict(stops)

    def emit(n: fx.Node) -> fx.Node:
        if n in memo:
            return memo[n]
        if n in inv_ph:
            return inv_ph[n]
        memo[n] = graph.node_copy(n, emit)
        return memo[n]

    return emit(node)
