"""Every environment switch nlcompile reads, in one place.

* ``NLCOMPILE_DUMP=dir``: write the graph after every pass to ``dir``.
* ``NLCOMPILE_VERBOSE=1``: print progress of long work (probing, verifying).
* ``NLCOMPILE_TRITON_DOT=ieee|tf32x3|tf32|bf16``: the Triton kernels' matmul precision, overriding
  the choice by the loop's precision (``targets/triton/common.dot_precision``); for measuring.
* ``NLCOMPILE_TRITON_WARPS=1|2|4|8|16``: warps per program of the Triton kernels on CUDA,
  overriding ``targets/triton/common.kernel_blocks`` (and the autotuning); for measuring.
* ``NLCOMPILE_TRITON_CHUNK=16|32|64``: the Triton kernels' chunk length, overriding
  ``targets/triton/ops.kernel_chunk`` and the CUDA tile cap of ``common.kernel_blocks``; for measuring.
* ``NLCOMPILE_TRITON_TUNE=0``: launch the Triton kernels on CUDA with the fixed configuration of
  ``targets/triton/common.kernel_blocks`` instead of autotuning them (``targets/triton/tuning.py``).
* ``NLCOMPILE_TUNE_HEAP=0``: leave glibc's malloc thresholds alone (see ``nlcompile/heap.py``).
"""
from __future__ import annotations

import os
from pathlib import Path


def dump_dir() -> Path | None:
    value = os.environ.get("NLCOMPILE_DUMP")
    return Path(value) if value else None


def verbose() -> bool:
    return os.environ.get("NLCOMPILE_VERBOSE", "") not in ("", "0")


def tune_heap() -> bool:
    return os.environ.get("NLCOMPILE_TUNE_HEAP", "1") != "0"


TRITON_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")


def triton_dot_precision() -> str | None:
    value = os.environ.get("NLCOMPILE_TRITON_DOT", "")
    if value and value not in TRITON_DOT_PRECISIONS:
        raise ValueError(f"NLCOMPILE_TRITON_DOT={value!r}: expected one of {', '.join(TRITON_DOT_PRECISIONS)} "
                         "(or unset, to choose by the loop's precision)")
    return value or None


def triton_warps() -> int | None:
    value = os.environ.get("NLCOMPILE_TRITON_WARPS", "")
    if value and value not in ("1", "2", "4", "8", "16"):
        raise ValueError(f"NLCOMPILE_TRITON_WARPS={value!r}: expected 1, 2, 4, 8 or 16 (or unset)")
    return int(value) if value else None


def triton_tune() -> bool:
    value = os.environ.get("NLCOMPILE_TRITON_TUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"NLCOMPILE_TRITON_TUNE={value!r}: expected 0 or 1 (or unset: 1)")
    return value == "1"


def triton_chunk() -> int | None:
    value = os.environ.get("NLCOMPILE_TRITON_CHUNK", "")
    if value and value not in ("16", "32", "64"):
        raise ValueError(f"NLCOMPILE_TRITON_CHUNK={value!r}: expected 16, 32 or 64 (or unset)")
    return int(value) if value else None
