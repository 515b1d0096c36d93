"""Normalise a functional ATen trace before loops are found and analysed.

    before:  s = select(buf, 2, t); c = copy(s, val); buf2 = select_scatter(buf, c, 2, t)
             a = select(k, 1, t); b = select(k, 1, t)          # the same slice taken twice
    after:   buf2 = select_scatter(buf, val, 2, t)
             a = select(k, 1, t)                               # b replaced by a

* ``copy(dst, src)`` only reads ``dst`` for its shape and dtype: it becomes ``src``
  (cast / expanded when those differ), so an output buffer written at step t
  no longer looks like a state read at step t.
* Common subexpressions are merged (random ops excepted), so one per-step
  slice or one derived key is one node however often the source spells it.
* ``*_copy`` view ops (from functionalised scan bodies) become the view ops.
* Dead nodes are removed.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

_COPY_OPS = (aten.copy.default,)
_IDENTITY_OPS = (aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default)


def _val(node: fx.Node):
    return node.meta.get("val")


def _replace_copies(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _IDENTITY_OPS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if node.target not in _COPY_OPS:
            continue
        dst, src = node.args[0], node.args[1]
        dv, sv = _val(dst), _val(src)
        new = src
        with graph.inserting_before(node):
            if dv is not None and sv is not None and dv.dtype != sv.dtype:
                new = graph.call_function(aten._to_copy.default, (new,), {"dtype": dv.dtype})
                new.meta["val"] = sv.to(dv.dtype)
            if dv is not None and sv is not None and tuple(dv.shape) != tuple(sv.shape):
                expanded = graph.call_function(aten.expand.default, (new, list(dv.shape)))
                expanded.meta["val"] = dv
                new = expanded
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _view_of_copy(target):
    """``aten.unsqueeze_copy.default`` -> ``aten.unsqueeze.default`` (same values; the
    ``_copy`` forms appear in functionalised higher-order-op bodies)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_copy"):
        return None
    base = getattr(aten, schema.name[len("aten::"):-len("_copy")], None)
    return getattr(base, target._overloadname, None) if base is not None else None


def _replace_view_copies(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and (view := _view_of_copy(node.target)) is not None:
            node.target = view


def _is_random(node: fx.Node) -> bool:
    target = node.target
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _key(node: fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, fx.Node):
            return ("node", a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        return (type(a).__name__, repr(a))

    return (node.target, freeze(node.args), freeze(node.kwargs))


def _cse(gm: fx.GraphModule) -> None:
    seen: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _is_random(node):
            continue
        key = _key(node)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove copies and aliases, merge common subexpressions, drop dead code (in place)."""
    _replace_copies(gm)
    _replace_view_copies(gm)
    _cse(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
