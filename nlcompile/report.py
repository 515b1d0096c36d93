"""``explain``: what was found in a model and what was done with it."""
from __future__ import annotations

from dataclasses import dataclass, field

from nlcompile.ir import RuleKind

_ORDER = [RuleKind.ADDITIVE, RuleKind.DECAY, RuleKind.DELTA, RuleKind.GATED_DELTA, RuleKind.MOMENTUM,
          RuleKind.AFFINE, RuleKind.NONLINEAR]


@dataclass(frozen=True)
class StateReport:
    index: int
    shape: tuple[int, ...]
    dtype: str
    kind: str
    per_channel: bool = False


@dataclass(frozen=True)
class LoopReport:
    """One update loop: its kind (the most general of its states' kinds), period,
    states, time axis, the rewrite chosen, and for a loop left sequential the reason."""

    index: int
    kind: str | None
    period: int
    states: tuple[StateReport, ...]
    time_axis: tuple[str, ...]
    rewrite: str
    reason: str | None = None
    blocking_node: str | None = None
    readouts: tuple[str, ...] = ()
    source_line: str | None = None
    runs: tuple[str, ...] = ()   # per state, how the target ran its scan in the latest call

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.states]


@dataclass(frozen=True)
class Report:
    target: str
    loops: tuple[LoopReport, ...] = ()
    fallback_reason: str | None = None
    compile_seconds: float = 0.0
    program_code: str = field(default="", repr=False)

    def __str__(self) -> str:
        lines = [f"nlcompile report (target={self.target}, compile {self.compile_seconds:.2f} s)"]
        if self.fallback_reason:
            lines.append(f"  no loop compiled; runs eagerly: {self.fallback_reason}")
        if not self.loops and not self.fallback_reason:
            lines.append("  no update loop found")
        head = f"  {'loop':<5}{'kind':<13}{'period':<8}{'rewrite':<12}time axis"
        if self.loops:
            lines.append(head)
        for lp in self.loops:
            states = ", ".join(f"S{s.index}{list(s.shape)}:{s.kind}{'/ch' if s.per_channel else ''}"
                               for s in lp.states)
            lines.append(f"  {lp.index:<5}{(lp.kind or '?'):<13}{lp.period:<8}{lp.rewrite:<12}"
                         f"{', '.join(lp.time_axis)}")
            lines.append(f"       states: {states}")
            if lp.readouts:
                lines.append(f"       readouts: {', '.join(lp.readouts)}")
            for run in lp.runs:
                lines.append(f"       runs (latest call): {run}")
            if lp.reason:
                lines.append(f"       left sequential: {lp.reason}")
            if lp.source_line:
                lines.append(f"       at {lp.source_line}")
        return "\n".join(lines)


def _overall(kinds: list[RuleKind]) -> str | None:
    return max(kinds, key=_ORDER.index).value if kinds else None


def build_report(compiled, options) -> Report:
    """Turn a ``Compiled`` entry into a ``Report``."""
    loops = []
    names = compiled.input_names
    for i, (loop, decision) in enumerate(zip(compiled.loops, compiled.decisions)):
        analysis = decision.analysis
        rules = {r.state: r for r in analysis.rules} if analysis else {}
        body_outs = list(loop.body.graph.graph.output_node().args[0])
        states = []
        for s in range(loop.body.n_states):
            val = body_outs[s].meta.get("val")
            rule = rules.get(s)
            kind = rule.kind.value if rule else "unknown"
            states.append(StateReport(s, tuple(val.shape) if val is not None else (), str(getattr(val, "dtype", "")),
                                      kind, bool(rule and rule.per_channel)))
        axis = tuple(f"{names[j] if j < len(names) else j}[dim {d}]" for j, d in compiled.time_axis)
        blocking = next((r.blocking_node for r in rules.values() if r.blocking_node), None)
        readouts = tuple(f"{r.node} ({r.when} update)" for r in analysis.readouts) if analysis else ()
        where = compiled.source_lines[i] if i < len(compiled.source_lines) else None
        notes = getattr(getattr(compiled.program, f"loop_{i}", None), "scan_notes", {})
        runs = tuple(f"S{s} on {note}" for s, note in sorted(notes.items()))
        loops.append(LoopReport(i, _overall([r.kind for r in rules.values()]), 1, tuple(states), axis,
                                decision.rewrite, decision.reason, blocking, readouts, where, runs))
    code = compiled.program.code if compiled.program is not None else ""
    return Report(options.target, tuple(loops), compiled.fallback_reason, compiled.compile_seconds, code)

