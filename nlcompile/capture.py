"""Capture a function or module as functional ATen graphs at short probe lengths.

Tracing costs tens of ms per unrolled step, so we never trace at the caller's
T: we find the time axis, cut (or cycle) the inputs to a few steps, and trace
there.  Parameters and buffers are traced as inputs (``functional_call``), so
an updated parameter is seen by the compiled program.
"""
from __future__ import annotations

import linecache
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from nlcompile.passes.fx.normalize import normalize


class CaptureError(Exception):
    """The model could not be traced; the message names the cause and the line."""


class _BudgetExceeded(Exception):
    pass


_OURS = ("/torch/", "/nlcompile/", "/passes/", "/targets/")


def _user_frame(frame) -> str | None:
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in _OURS) and not name.startswith("<"):
            text = linecache.getline(name, frame.f_lineno).strip()
            return f"{name}:{frame.f_lineno}: {text}"
        frame = frame.f_back
    return None


class _OpBudget(TorchFunctionMode):
    """Abort a trace that runs far more ops than a short probe can need; optionally
    record, for each torch call, its name and the user's source line."""

    def __init__(self, budget: int, lines: list[tuple[str, str]] | None = None):
        super().__init__()
        self.left = budget
        self.lines = lines

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling():   # inside a HOP's own compilation (eager scan)
            return func(*args, **(kwargs or {}))
        self.left -= 1
        if self.left < 0:
            raise _BudgetExceeded()
        if self.lines is not None:
            where = _user_frame(sys._getframe(1))
            if where:
                self.lines.append((getattr(func, "__name__", str(func)), where))
        return func(*args, **(kwargs or {}))


# ATen ops that several torch functions lower to (a matmul written ``a @ b`` becomes mm or bmm).
_SAME_OP = [{"mm", "bmm", "matmul", "rmatmul", "einsum", "baddbmm", "addmm"},
            {"add", "radd"}, {"sub", "rsub"}, {"mul", "rmul"}, {"div", "truediv", "rtruediv"},
            {"pow", "rpow"}]


def _op_names(name: str) -> set[str]:
    name = name.strip("_")
    return next((group for group in _SAME_OP if name in group), {name})


def source_line(op: object, lines: Sequence[tuple[str, str]]) -> str | None:
    """The user's line that called the torch function behind ATen ``op`` (diagnostics
    only: matched by name, first occurrence), e.g. ``aten.tanh.default`` -> ``torch.tanh``,
    ``aten.bmm.default`` -> ``a @ b``."""
    names = _op_names(getattr(op, "__name__", str(op)).split(".")[0])
    for called, where in lines:
        if called.strip("_") in names:
            return where
    return None


OP_BUDGET = 5000


def count_ops(fn: Callable, tensors: Sequence[torch.Tensor], budget: int = OP_BUDGET,
              lines: list[tuple[str, str]] | None = None) -> int | str:
    """How many torch calls ``fn`` makes eagerly, or why it could not be counted."""
    mode = _OpBudget(budget, lines)
    try:
        with mode:
            fn(*tensors)
    except _BudgetExceeded:
        return f"runs more than {budget} torch calls at the probe length"
    except Exception as exc:
        return f"fails with this axis resized ({type(exc).__name__}: {exc})"
    return budget - mode.left


@dataclass(frozen=True)
class CallLayout:
    """How one call's ``(args, kwargs)`` flatten: which leaves are tensors."""

    spec: pytree.TreeSpec
    tensor_slots: tuple[int, ...]
    constants: tuple[tuple[int, Any], ...]

    def key(self) -> tuple:
        return (str(self.spec), self.tensor_slots, tuple((i, repr(c)) for i, c in self.constants))

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        leaves: list[Any] = [None] * (len(self.tensor_slots) + len(self.constants))
        for slot, t in zip(self.tensor_slots, tensors):
            leaves[slot] = t
        for slot, c in self.constants:
            leaves[slot] = c
        return pytree.tree_unflatten(leaves, self.spec)


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], CallLayout]:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    slots = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
    consts = tuple((i, x) for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor))
    return [leaves[i] for i in slots], CallLayout(spec, slots, consts)


@dataclass(frozen=True)
class OutputLayout:
    """How a call's outputs flatten: the tree and its non-tensor leaves (None...)."""

    spec: pytree.TreeSpec
    constants: tuple[tuple[int, Any], ...]

    def unflatten(self, flat: Sequence[torch.Tensor]) -> Any:
        consts, it = dict(self.constants), iter(flat)
        leaves = [consts[i] if i in consts else next(it) for i in range(self.spec.num_leaves)]
        return pytree.tree_unflatten(leaves, self.spec)


class Traceable:
    """``model_or_fn`` as a flat function of (parameters..., input tensors...)."""

    def __init__(self, model_or_fn: Callable):
        self.target = model_or_fn
        self.is_module = isinstance(model_or_fn, torch.nn.Module)
        self.output: OutputLayout | None = None   # of the latest traced or checked call

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        if not self.is_module:
            return []
        return list(self.target.named_parameters()) + list(self.target.named_buffers())

    def flat_fn(self, layout: CallLayout, names: Sequence[str]) -> Callable:
        def run(*tensors):
            params, inputs = tensors[:len(names)], tensors[len(names):]
            args, kwargs = layout.rebuild(inputs)
            if self.is_module:
                out = torch.func.functional_call(self.target, dict(zip(names, params)), args, kwargs)
            else:
                out = self.target(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)
            consts = tuple((i, x) for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor))
            self.output = OutputLayout(spec, consts)
            return tuple(x for x in leaves if isinstance(x, torch.Tensor))

        return run


def user_line(exc: BaseException) -> str:
    """The innermost frame of the user's code in an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if not any(part in f.filename for part in _OURS)]
    if not mine:
        return "<unknown>"
    f = mine[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def trace(fn: Callable, tensors: Sequence[torch.Tensor], budget: int = OP_BUDGET) -> torch.fx.GraphModule:
    """Functionalised ``make_fx`` trace of ``fn`` (normalised); raises CaptureError."""
    try:
        with _OpBudget(budget):
            gm = make_fx(torch.func.functionalize(fn))(*tensors)
    except _BudgetExceeded:
        raise CaptureError(f"the trace ran more than {budget} ops at the probe length") from None
    except Exception as exc:  # make_fx raises many kinds on value-dependent code
        raise CaptureError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                           f"(at {user_line(exc)})") from exc
    traced = list(gm.graph.output_node().args[0])
    return _keep_outputs_apart(normalize(gm), traced)


def _keep_outputs_apart(gm: torch.fx.GraphModule, traced: Sequence) -> torch.fx.GraphModule:
    """``normalize`` merges common subexpressions and drops copies: where that made an output
    the same tensor as an earlier output, or an input, that it was not in the trace (two stacks
    of one list, ``x.clone()``), the output gets a copy of its own again, as eager returned
    separate memory (a write into one must not reach the other)."""
    out = gm.graph.output_node()
    outputs = list(out.args[0])
    chosen: dict = {}  # traced output node -> the node that now serves it (one tensor returned twice stays one)
    for i, (was, now) in enumerate(zip(traced, outputs)):
        if not isinstance(now, torch.fx.Node):
            continue
        if was in chosen:
            outputs[i] = chosen[was]
            continue
        merged = any(node is now for node in chosen.values())
        if merged or (now.op == "placeholder" and was.op != "placeholder"):
            with gm.graph.inserting_before(out):
                outputs[i] = gm.graph.call_function(torch.ops.aten.clone.default, (now,))
        chosen[was] = outputs[i]
    if outputs != list(out.args[0]):
        out.args = (tuple(outputs),)
        gm.recompile()
    return gm


def resize_time(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """A copy of ``x`` with ``dim`` cut or cycled to ``length`` steps (probe inputs;
    always a copy, so probing never writes into the caller's tensors)."""
    n = x.shape[dim]
    index = torch.arange(length, device=x.device) % n
    return x.index_select(dim, index)


CHECK_LONG = 263
_PRIMES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


def probe_lengths(tensors: Sequence[torch.Tensor], avoid: frozenset[int] = frozenset()
                  ) -> tuple[int, int, tuple[int, int]]:
    """Two trace lengths and two check lengths, equal to no size of the inputs.

    Trace lengths are small primes (sizes inside a model are rarely prime) at
    least 3 apart, never next to a size of the inputs or ``avoid`` (sizes a
    trace showed inside the model).  Tracing costs per step, so they are short.
    The checks run eagerly: one short, one past the periods and warm-ups
    research code branches on (``if (t + 1) % 64 == 0``, ``if t < 100``), which
    traces this short cannot see."""
    sizes = {s for t in tensors for s in t.shape} | set(avoid)

    def free(n: int) -> bool:
        return not ({n - 1, n, n + 1} & sizes)

    t1 = next(p for p in _PRIMES if free(p))
    t2 = next(p for p in _PRIMES if p >= t1 + 3 and free(p))
    t3 = next(n for n in range(max(2 * t2 + 3, 19), 10**6) if free(n))
    t4 = next(n for n in range(CHECK_LONG, 10**6) if free(n))
    return t1, t2, (t3, t4)


def ambiguous_sizes(gm: torch.fx.GraphModule, trip: int) -> bool:
    """Whether some value in the trace has two dims of the probe length (say a head
    dim equal to it): the time axis would then be ambiguous in that value."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and sum(int(s) == trip for s in val.shape) > 1:
            return True
    return False


def time_axis_candidates(tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, int], ...]]:
    """Groups of (input, dim) that may be the time axis, most plausible first.

    All dims of one size form a group (larger sizes first, since a long
    sequence is usually the largest dim), unless one input has two dims in it
    (an update loop walks one time axis per input); when the dims sit at
    several positions, groups by dim position follow.
    """
    by_size: dict[int, list[tuple[int, int]]] = {}
    for i, t in enumerate(tensors):
        for d, s in enumerate(t.shape):
            by_size.setdefault(s, []).append((i, d))
    out: list[tuple[tuple[int, int], ...]] = []
    for size in sorted(by_size, reverse=True):
        group = by_size[size]
        inputs = [i for i, _ in group]
        if len(set(inputs)) == len(inputs):
            out.append(tuple(group))
        positions = sorted({d for _, d in group})
        if len(positions) > 1:
            out += [tuple(x for x in group if x[1] == p) for p in positions]
    return out
