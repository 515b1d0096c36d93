"""Compile one call signature: probe, re-roll, rewrite, build, verify.

    screen the candidate time axes eagerly, then for the first that works:
    capture at T1 and T2 (probe lengths that collide with no other size)
      -> reroll both -> rewrite (analyse, choose chunkwise / sequential)
      -> generic program (T from the input's size) -> target.finalize
      -> check against eager at two more lengths, one long (a mismatch vetoes
         the chunkwise form, then the re-rolled loop: the call then runs eagerly)

Nothing here traces at the caller's T, so compile time does not grow with T.
"""
from __future__ import annotations

import functools
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from nlcompile import knobs
from nlcompile.capture import (CallLayout, CaptureError, Traceable, ambiguous_sizes, count_ops, probe_lengths,
                               resize_time, source_line, time_axis_candidates, trace)
from nlcompile.dump import dump_graph
from nlcompile.numerics import relative_error
from nlcompile.passes.fx.fold_scales import fold_query_scales
from nlcompile.passes.fx.generic import Probe, build_program
from nlcompile.passes.fx.lift_scan import lift_scan, scan_nodes
from nlcompile.passes.fx.loop_record import NotALoop
from nlcompile.passes.fx.reroll import reroll_all
from nlcompile.passes.fx.rewrite import LoopDecision, plan_loop
from nlcompile.targets.registry import Target


@dataclass(frozen=True)
class CompileOptions:
    target: str = "torch"
    chunk_size: int | None = None
    relax: tuple[str, ...] = ()
    recompute: bool = False


@dataclass
class Compiled:
    """The program for one input signature, or the reasons it runs eagerly."""

    run: Callable | None                      # flat tensors -> flat outputs; None: eager
    time_axis: tuple[tuple[int, int], ...]     # (input tensor index, dim)
    decisions: list[LoopDecision] = field(default_factory=list)
    loops: list[Any] = field(default_factory=list)       # RerolledLoop per loop
    fallback_reason: str | None = None
    input_names: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    program: torch.fx.GraphModule | None = None
    source_lines: list[str | None] = field(default_factory=list)   # per loop: where it was blocked
    output: Any = None                        # capture.OutputLayout of this signature's outputs

    @functools.cached_property
    def written_inputs(self) -> frozenset[int]:
        """Positions of the program's inputs that it writes into (``copy_`` at the end);
        read on every call, so worked out once."""
        if self.program is None:
            return frozenset()
        phs = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        return frozenset(phs.index(n.args[0]) for n in self.program.graph.nodes
                         if n.target is torch.ops.aten.copy_.default and n.args[0] in phs)


def _progress(msg: str) -> None:
    if knobs.verbose():
        print(f"[nlcompile] {msg}", file=sys.stderr)


def _resized(params, tensors, group, length):
    """Probe inputs: copies (probing must not write into the caller's tensors or the
    module's buffers) with the time axis cut or cycled to ``length``."""
    out = [t.detach().clone() for t in tensors]
    for i, d in group:                       # an input may carry several dims of the group
        out[i] = resize_time(out[i], d, length)
    return [*(p.detach().clone() for p in params), *out]


def _matches(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], low_precision: bool) -> str | None:
    """Why ``got`` is not ``want`` up to float reassociation, or None.  With bf16 /
    fp16 inputs eager rounds intermediates we keep in fp32: a looser bound."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i} is {tuple(g.shape)} {g.dtype}, eager gives {tuple(w.shape)} {w.dtype}"
        tol = 6e-2 if low_precision or w.dtype not in (torch.float32, torch.float64) else 1e-4
        if w.is_floating_point() and w.numel() and (err := relative_error(g, w)) > tol:
            return f"output {i} differs from eager by {err:.2e} (relative)"
        if not w.is_floating_point() and not torch.equal(g, w):
            return f"output {i} differs from eager"
    return None


def _find_loops(gm, trip: int) -> tuple:
    """The update loops of a probe trace: a ``scan`` lifted as is, or unrolled loops re-rolled."""
    return (lift_scan(gm, trip),) if scan_nodes(gm) else tuple(reroll_all(gm, trip))


_STATELESS = "the loop carries no state from step to step (left alone)"
_SMALL_TRACE = 300   # torch calls: a trace this small is cheap even if the axis is wrong


def _screen(fn, params, tensors, group, lengths, lines: list) -> None:
    """Cheap eager check before tracing: the function must run with this axis
    resized, and its work must grow with the probe length (unless it is small:
    a ``scan`` does not grow).  The first probe's torch calls are recorded with
    their source lines in ``lines``."""
    counts = [count_ops(fn, _resized(params, tensors, group, n), lines=lines if i == 0 else None)
              for i, n in enumerate(lengths[:2])]
    for c in counts:
        if isinstance(c, str):
            raise NotALoop(c)
    if counts[1] <= counts[0] and counts[0] > _SMALL_TRACE:
        raise NotALoop("no per-step slice: the work does not grow with this axis")


def _output_constants(traceable: Traceable):
    return repr(traceable.output.constants) if traceable.output else None


def _check(run, fn, traceable, inputs_by_length, expected_consts) -> str | None:
    """Why the program differs from eager at the check lengths, or None."""
    for length, inputs in inputs_by_length:
        with torch.no_grad():
            want = fn(*[t.clone() for t in inputs])      # each side on its own copy: either may
            inputs = [t.clone() for t in inputs]         # write into its inputs
        if _output_constants(traceable) != expected_consts:
            raise NotALoop(f"a non-tensor output changes with T (at T={length}); it cannot be compiled")
        try:
            with torch.no_grad():
                got = run(*inputs)
        except Exception as exc:  # a rewrite that fails to run is vetoed like a wrong one
            return f"the rewritten program failed at T={length}: {type(exc).__name__}: {exc}"
        got = list(got) if isinstance(got, (tuple, list)) else [got]
        low = any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)
        if (why := _matches(got, list(want), low)) is not None:
            return f"at T={length}: {why}"
    return None


def _probe_traces(traceable, fn, params, tensors, group):
    """Traces at two probe lengths that collide with no size inside the model."""
    avoid: set[int] = set()
    for _ in range(4):
        lengths = probe_lengths([*params, *tensors], frozenset(avoid))
        t1, t2, _ = lengths
        gm1 = trace(fn, _resized(params, tensors, group, t1))
        consts = _output_constants(traceable)
        if ambiguous_sizes(gm1, t1):
            avoid.add(t1)
            continue
        gm2 = trace(fn, _resized(params, tensors, group, t2))
        if ambiguous_sizes(gm2, t2):
            avoid.add(t2)
            continue
        if _output_constants(traceable) != consts:
            raise NotALoop("a non-tensor output changes with T; it cannot be compiled")
        return lengths, gm1, gm2, consts
    raise NotALoop(f"every probe length tried ({sorted(avoid)}) equals another size inside the model")


def _try_axis(traceable, fn, params, tensors, group, target: Target, options: CompileOptions):
    lines: list[tuple[str, str]] = []
    _screen(fn, params, tensors, group, probe_lengths([*params, *tensors]), lines)
    lengths, gm1, gm2, consts = _probe_traces(traceable, fn, params, tensors, group)
    t1, t2, checks = lengths
    loops1 = _find_loops(gm1, t1)
    if all(lp.body.n_states == 0 for lp in loops1):
        raise NotALoop(_STATELESS)
    loops2 = _find_loops(gm2, t2)
    dump_graph("capture", gm1, f"probe T={t1}")
    for lp in loops1:
        dump_graph("reroll_body", lp.body.graph, f"{lp.body}")
    time_inputs = [(len(params) + i, d) for i, d in group]
    inputs_by_length = [(n, _resized(params, tensors, group, n)) for n in checks]
    veto, force = None, None
    for _attempt in range(2):
        decisions = []

        def make_loop(loop):
            module, decision = plan_loop(loop, target, options.chunk_size, force, options.recompute)
            decisions.append(decision)
            return module

        program = build_program(Probe(gm1, t1, loops1), Probe(gm2, t2, loops2), time_inputs, make_loop)
        dump_graph("program", program, f"target {target.name}")
        program = fold_query_scales(program)
        dump_graph("fold_scales", program, f"target {target.name}")
        run = target.finalize(program)
        veto = _check(run, fn, traceable, inputs_by_length, consts)
        if veto is None:
            return run, decisions, list(loops1), program, [_blocking_line(lp, d, lines)
                                                           for lp, d in zip(loops1, decisions)]
        if all(d.rewrite == "sequential" for d in decisions):
            break
        force = f"the check against eager vetoed the chunkwise form {veto}"
        _progress(force)
    raise NotALoop(f"the re-rolled program does not match eager {veto}")


def _blocking_line(loop, decision: LoopDecision, lines) -> str | None:
    """The source line of the op that kept a loop sequential, when one is named."""
    if decision.analysis is None:
        return None
    names = {n.name: n for n in loop.body.graph.graph.nodes}
    for rule in decision.analysis.rules:
        node = names.get(rule.blocking_node or "")
        if node is not None and (where := source_line(node.target, lines)):
            return where
    return None


def compile_signature(traceable: Traceable, layout: CallLayout, params: Sequence[torch.Tensor],
                      tensors: Sequence[torch.Tensor], names: Sequence[str], target: Target,
                      options: CompileOptions) -> Compiled:
    """Compile ``traceable`` for calls shaped like ``tensors`` (apart from T)."""
    start = time.perf_counter()
    fn = traceable.flat_fn(layout, names)
    reasons: list[str] = []
    for group in time_axis_candidates(tensors):
        _progress(f"probing time axis {group}")
        try:
            run, decisions, loops, program, where = _try_axis(traceable, fn, params, tensors, group,
                                                              target, options)
        except (CaptureError, NotALoop) as exc:
            reasons.append(f"axis {group}: {exc}")
            continue
        except Exception as exc:  # a compiler bug must fall back, never break the user's call
            reasons.append(f"axis {group}: internal error {type(exc).__name__}: {exc}")
            continue
        return Compiled(run, tuple(group), decisions, loops, compile_seconds=time.perf_counter() - start,
                        program=program, source_lines=where)
    reason = _summarise(reasons)
    if reason:
        warnings.warn(f"nlcompile: no update loop compiled, running eagerly: {reason}", stacklevel=4)
    # the eager fallback is exact for any T: cache it along the most plausible axis
    candidates = time_axis_candidates(tensors)
    return Compiled(None, candidates[0] if candidates else (), fallback_reason=reason,
                    compile_seconds=time.perf_counter() - start)


def _summarise(reasons: list[str]) -> str | None:
    """The reasons worth a warning; None when every candidate axis simply had no
    loop (no per-step slice, the function fails with that axis resized, or the
    loop carries no state)."""
    quiet = ("no per-step slice", "fails with this axis", _STATELESS)
    interesting = [r for r in reasons if not any(q in r for q in quiet)]
    return "; ".join(interesting[:3]) or None
