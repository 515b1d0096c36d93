"""The precision a loop body computes its recurrence in.

A loop may keep its state in fp32 and still round it for its products: under
``torch.autocast`` the step's ``S^T k`` runs as a bf16 ``bmm`` on a bf16 copy of S (the traced
body holds the casts); a loop that upcasts its bf16 inputs to fp32 computes every product in
fp32.  The scan that replaces the loop must compute no less precisely than the loop (DESIGN
5: no further from an fp64 run than eager's own run) and need not compute more precisely, so
the Triton kernels take their dot precision from ``recurrence_dtype``: the least precise float
dtype among the values that depend on the state and are computed with (not only cast, viewed
or returned).

    S fp32 -> _to_copy bf16 -> bmm (bf16)        -> bf16     (autocast)
    S fp32 -> mul / add / bmm (fp32) ... -> o -> _to_copy bf16 -> output   -> fp32
"""
from __future__ import annotations

import torch
from torch import fx

aten, prims = torch.ops.aten, torch.ops.prims

# ops that move a value on without computing with it (beside the views)
_PASS_ON = {aten._to_copy.default, aten.clone.default, aten._unsafe_view.default, prims.convert_element_type.default}


def _passes_on(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _PASS_ON or bool(getattr(node.target, "is_view", False)))


def _computed_with(node: fx.Node) -> bool:
    """Whether some use of ``node``, through casts, copies and views, computes with it."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if not _passes_on(user):
            return True
        todo.extend(user.users)
    return False


def _float_dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else None


def recurrence_dtype(gm: fx.GraphModule, state: fx.Node) -> torch.dtype:
    """The least precise float dtype (largest epsilon) among the state ``state`` (a placeholder
    of the body ``gm``) and the values depending on it that the body computes with."""
    depends = {state}
    for node in gm.graph.nodes:   # topological order
        if node not in depends and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    dtypes = {_float_dtype(n) for n in depends if n is state or _computed_with(n)} - {None}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)
