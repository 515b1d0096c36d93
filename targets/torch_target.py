"""The ``torch`` target: the rewritten graph run by PyTorch (the CPU default).

Loops with an exact chunkwise form run as ``ChunkwiseLoop`` over the
pure-PyTorch scans of ``nlcompile.targets.scan``; every other loop runs as one
sequential loop op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from nlcompile.heap import tune_heap
from nlcompile.ir import RuleKind
from nlcompile.loop_ops import ChunkwiseLoop
from nlcompile.targets.registry import LoopPlan
from nlcompile.targets.scan import choose_chunk_size, chunkwise_scan


class TorchTarget:
    name = "torch"
    fast_kinds = frozenset({RuleKind.ADDITIVE, RuleKind.DECAY, RuleKind.DELTA, RuleKind.GATED_DELTA})

    def available(self) -> tuple[bool, str]:
        return True, ""

    def loop_module(self, plan: LoopPlan) -> torch.nn.Module:
        tune_heap()  # before the chunk chooser times anything
        loop = plan.loop
        dims = loop.step_dims
        return ChunkwiseLoop(loop.body, plan.analysis, dims, chunkwise_scan, plan.chunk_size, choose_chunk_size,
                             recompute=plan.recompute)

    def finalize(self, program: fx.GraphModule) -> Callable:
        return program
