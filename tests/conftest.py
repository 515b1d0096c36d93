"""Run Triton kernels on the CPU (the interpreter) when there is no GPU.

Set before any kernel module is imported: ``triton.jit`` reads it at decoration time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
