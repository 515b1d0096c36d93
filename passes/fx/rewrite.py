"""Choose the rewrite of each loop: exact chunkwise, or one sequential loop op.

    before:  RerolledLoop(body: S' = S + b k (v - S^T k)^T ...)
    after:   loop_0 = ChunkwiseLoop(delta, C chosen by the target)   # proven kind
             loop_0 = SequentialLoop(body)                           # anything else

The analysis proves the kind; the target says which kinds it runs fast.  A loop
that cannot be analysed keeps its reason for ``explain``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from nlcompile.ir import LoopAnalysis, RuleKind
from nlcompile.loop_ops import SequentialLoop, UnsupportedLoop
from nlcompile.passes.fx.analyse import analyse_body
from nlcompile.targets.registry import LoopPlan, Target


@dataclass(frozen=True)
class LoopDecision:
    """What was chosen for one loop and why (read by ``explain``)."""

    analysis: LoopAnalysis | None
    rewrite: str            # "chunkwise" | "sequential"
    reason: str | None      # why not chunkwise, when sequential


def _why_not(analysis: LoopAnalysis, target: Target) -> str | None:
    for rule in analysis.rules:
        if not rule.kind.chunkwise:
            return rule.reason or f"state {rule.state} is {rule.kind.value}"
        if rule.kind not in target.fast_kinds:
            return f"target {target.name} has no fast path for {rule.kind.value}"
        if rule.kind is RuleKind.GATED_DELTA and rule.per_channel and not rule.gate_first:
            return ("the per-key-channel gate is applied after the delta step (S' = diag(a) (I - b k k^T) S "
                    "+ ...): no exact chunkwise (WY) form; decaying first, S' = (I - b k k^T) diag(a) S + ... "
                    "(Kimi Delta Attention), has one")
    return None


def plan_loop(loop, target: Target, chunk_size: int | None, force_sequential: str | None = None,
              recompute: bool = False) -> tuple[torch.nn.Module, LoopDecision]:
    """The loop module for ``loop`` on ``target``, and the decision record.  With ``recompute``, a
    target's loop module that does not say it recomputes (``recompute`` attribute, as
    ``ChunkwiseLoop`` and ``SequentialLoop`` have) is warned about: its backward keeps what its
    forward saved."""
    dims = loop.step_dims
    try:
        analysis = analyse_body(loop.body)
    except Exception as exc:  # the analysis must never abort a compile
        return SequentialLoop(loop.body, dims, recompute), LoopDecision(None, "sequential", f"analysis failed: {exc}")
    reason = force_sequential or _why_not(analysis, target)
    if analysis.rules and reason is None:
        try:
            module = target.loop_module(LoopPlan(loop, analysis, chunk_size, recompute))
            if recompute and not getattr(module, "recompute", False):
                warnings.warn(f"nlcompile: target {target.name!r} builds loop modules that do not recompute "
                              "(LoopPlan.recompute is ignored): their backward keeps what the forward saved; "
                              "build them as ChunkwiseLoop(..., recompute=plan.recompute)", stacklevel=2)
            return module, LoopDecision(analysis, "chunkwise", None)
        except UnsupportedLoop as exc:
            reason = str(exc)
    if not analysis.rules and reason is None:
        reason = "the loop carries no state"
    return SequentialLoop(loop.body, dims, recompute), LoopDecision(analysis, "sequential", reason)

