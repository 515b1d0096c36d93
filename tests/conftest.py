"""Run Triton kernels on the CPU (the interpreter) when there is no GPU, on the GPU when there is one.

TRITON_INTERPRET is set before any kernel module is imported: ``triton.jit`` reads it at
decoration time.  With a GPU, the Triton test files (``test_triton_*``) make CUDA the default
device, so their tensors live where the kernels run; their random data are drawn on the CPU and
moved there (``_draws.Draws``: the same numbers on both devices).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def uncapped_chunk(monkeypatch):
    """Chunk 64 at fp32 "ieee" dots on a GPU too: there ``common.kernel_blocks`` caps that chunk at
    32 (the kernels' registers; chunk 64 spills), and ``NLCOMPILE_TRITON_CHUNK`` lifts the cap, so
    that the tests of chunk 64 run it on both devices (the interpreter has no cap)."""
    monkeypatch.setenv("NLCOMPILE_TRITON_CHUNK", "64")


@pytest.fixture(autouse=True)
def _triton_tests_on_the_gpu(request):
    if torch.cuda.is_available() and request.module.__name__.startswith("test_triton_"):
        with torch.device("cuda"):
            yield
    else:
        yield
