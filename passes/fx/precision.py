"""The precision a loop body computes its recurrence in.

A loop may keep its state in fp32 and still round it for its products: under
``torch.autocast`` the step's ``S^T k`` runs as a bf16 ``bmm`` on a bf16 copy of S (the traced
body holds the casts); a loop that upcasts its bf16 inputs to fp32 computes every product in
fp32.  The scan that replaces the loop must compute no less precisely than the loop (DESIGN
5: no further from an fp64 run than eager's own run) and need not compute more precisely, so
the Triton kernels take their dot precision from ``recurrence_dtype``.  Each value the kernels
produce, the new state and each readout S^T q, is computed by the loop on a path from the state;
the least precise float dtype the path computes with (not only casts or views) bounds how
precisely eager has it.  The kernels, one precision for all, take the most precise of those
bounds: no output less precise than eager's.  What is done with a readout afterwards (a cast, a
norm, a gate: run by the loop module as it is) is not on the path.

    S fp32 -> _to_copy bf16 -> bmm (bf16) -> ... -> S', o          -> bf16   (autocast, delta rule)
    S fp32 -> mul / add / bmm (fp32) ... -> S', o                  -> fp32
    S fp32 -> add -> S' (fp32);  S' -> _to_copy bf16 -> bmm -> o   -> fp32   (S' needs fp32)
    o -> _to_copy bf16 -> rms_norm -> output                          (after the readout: not counted)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

aten, prims = torch.ops.aten, torch.ops.prims

# ops that move a value on without computing with it (beside the views)
_PASS_ON = {aten._to_copy.default, aten.clone.default, aten._unsafe_view.default, prims.convert_element_type.default}


def _passes_on(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _PASS_ON or bool(getattr(node.target, "is_view", False)))


def _computed_with(node: fx.Node, within: set[fx.Node]) -> bool:
    """Whether some use of ``node`` in ``within``, through casts, copies and views, computes with it."""
    todo, seen = [u for u in node.users if u in within], set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if not _passes_on(user):
            return True
        todo.extend(u for u in user.users if u in within)
    return False


def _float_dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else None


def _least_precise(dtypes) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def _path_dtype(state: fx.Node, depends: set[fx.Node], end: fx.Node) -> torch.dtype:
    """The least precise float dtype the values between ``state`` and ``end`` are computed with."""
    leads, todo = set(), [end]
    while todo:
        node = todo.pop()
        if node not in leads:
            leads.add(node)
            todo.extend(node.all_input_nodes)
    path = depends & leads
    return _least_precise({_float_dtype(n) for n in path if n is state or _computed_with(n, path)} - {None})


def recurrence_dtype(gm: fx.GraphModule, state: fx.Node, ends: Sequence[fx.Node]) -> torch.dtype:
    """The precision the loop body ``gm`` computes the recurrence of ``state`` (a placeholder)
    in: over ``ends`` (its new value and its readout nodes), the most precise of the least precise
    dtypes on each one's path from the state."""
    depends = {state}
    for node in gm.graph.nodes:   # topological order
        if node not in depends and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    paths = [_path_dtype(state, depends, end) for end in ends]
    return min(paths, key=lambda d: torch.finfo(d).eps, default=torch.float32)
