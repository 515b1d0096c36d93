"""Comparing compiled results with eager, shared by the test files."""
from __future__ import annotations

import copy

import torch

from nlcompile.numerics import relative_error as rel_err

__all__ = ["rel_err", "as_tuple", "assert_close_outputs", "low_precision_kernel_tol", "assert_within_eager_error",
           "runs_under_autocast"]


def low_precision_kernel_tol(cpu_tol: float) -> float:
    """The Triton kernels' tolerance for bf16 / fp16 inputs, relative to the output scale.

    With tf32 dots (fp16's default, forced where these bounds are used; ``targets/triton/common.
    dot_precision``: 10 mantissa bits for the fp32 intermediates, against bf16's 8 for the inputs
    themselves).  The CPU interpreter
    emulates that rounding (``common.truncate_to_tf32``), so the test's own bound ``cpu_tol`` is
    checked with the GPU's arithmetic; on a GPU, where the products are summed in another order,
    5e-3 (the bound the tests passed with on an H100 before the emulation existed).
    """
    return 5e-3 if torch.cuda.is_available() else cpu_tol


def assert_within_eager_error(got, eager, exact) -> None:
    """DESIGN's low-precision rule, each tensor of ``got`` no further from ``exact`` (an fp64 run)
    than ``eager`` (eager's own run at that precision) is, with a slack of 2x plus 2e-3."""
    for g, e, x in zip(got, eager, exact):
        assert rel_err(g, x) <= 2 * rel_err(e, x) + 2e-3, (rel_err(g, x), rel_err(e, x))


def runs_under_autocast(compiled, model: torch.nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Output and parameter gradients (of the output's sum of squares) of ``compiled`` and of
    ``model`` run under bf16 autocast (on ``x``'s device), and of an fp64 copy of ``model`` run
    without: the three arguments of ``assert_within_eager_error``."""
    in_fp64 = copy.deepcopy(model).double()
    runs = []
    for fn, module, inputs, autocast in ((compiled, model, x, True), (model, model, x, True),
                                        (in_fp64, in_fp64, x.double(), False)):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(inputs)
            runs.append([out, *torch.autograd.grad(out.float().square().sum(), list(module.parameters()))])
    return runs


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_close_outputs(got, want, tol=1e-4):
    """Same structure, shapes and dtypes; every tensor within ``tol`` relative to its scale."""
    got, want = as_tuple(got), as_tuple(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        assert rel_err(g, w) <= tol, rel_err(g, w)
