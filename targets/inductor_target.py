"""The ``inductor`` target: the rewritten graph through ``torch.compile``.

The short inter-chunk recurrence stays out of the compiled region (as a Python
loop inside it Inductor recompiles for every chunk count; as a ``scan`` it
fails in Inductor): the loop module runs eagerly, the code around it (the
prologue and epilogue of the program) is compiled with dynamic shapes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from nlcompile.targets.torch_target import TorchTarget


class InductorTarget(TorchTarget):
    name = "inductor"

    def finalize(self, program: fx.GraphModule) -> Callable:
        for name, module in program.named_children():
            if name.startswith("loop_"):
                module.forward = torch.compiler.disable(module.forward)
        return torch.compile(program, dynamic=True)
