"""The ``triton`` target: Triton kernels for the recurrences, Inductor for the rest.

Every loop with a chunkwise form runs through the ``nlcompile::chunk_scan_v4``
custom op (``targets/triton``); on a CUDA device the code around the loops
goes through ``torch.compile`` as in the ``inductor`` target (the loop modules
themselves are left out of the compiled region: they launch the kernels).  Without a GPU the target is unavailable, except under
``TRITON_INTERPRET=1``, where the kernels run on CPU tensors (slowly: for
testing) and the program runs eagerly.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch
from torch import fx

from nlcompile.loop_ops import ChunkwiseLoop
from nlcompile.targets.registry import LoopPlan
from nlcompile.targets.inductor_target import InductorTarget


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter: ``TRITON_INTERPRET`` read as Triton reads
    it (1, true or on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def kernel_chunk_size(k, v, **_) -> int:
    """The chunk asked of the kernels when the user gives none (64, as flash-linear-attention;
    ``ops.kernel_chunk`` narrows it for per-channel gates, and on a GPU for large head dims and fp32 dots)."""
    return 64


class TritonTarget(InductorTarget):
    name = "triton"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed: pip install 'nlcompile[triton]'"
        if not torch.cuda.is_available() and not interpreting():
            return False, ("no CUDA GPU here; the triton target needs one (or set TRITON_INTERPRET=1 to run "
                           "its kernels on the CPU, slowly, for testing); use target='torch' on the CPU")
        return True, ""

    def loop_module(self, plan: LoopPlan) -> torch.nn.Module:
        from nlcompile.targets.triton.ops import triton_chunkwise_scan

        loop = plan.loop
        return ChunkwiseLoop(loop.body, plan.analysis, loop.step_dims, triton_chunkwise_scan, plan.chunk_size,
                             kernel_chunk_size, heads_last=True, recompute=plan.recompute)

    def finalize(self, program: fx.GraphModule) -> Callable:
        if interpreting():
            return program  # CPU tensors: Inductor's C++ build would dominate the test suite
        return super().finalize(program)
