"""Keep freed CPU buffers in the process heap, so chunkwise programs stop paying page faults.

A chunkwise scan allocates a few buffers of 0.5-16 MB per call.  glibc's
malloc serves blocks above its mmap threshold (128 KB at start, raised
towards 32 MB as such blocks are freed) with fresh pages, and returns free
heap top above its trim threshold (twice the mmap threshold) to the kernel:
until those heuristics settle, and again whenever the allocation pattern
shifts, every call faults its buffers in anew.  Measured on the 2-core CPU
(DeltaNet, N=8, d=64): 1000-2600 page faults per call of the scan at
T=1024, which made it 50-100% slower and made the chunk chooser pick the
slower chunk in most trials; T=2048 went 10.3 -> 8.9 ms.  ``tune_heap``
sets the two thresholds once to where glibc's own heuristic would end up
(mmap above 32 MB, trim above 64 MB).  Process-wide; it changes nothing
but when freed memory goes back to the kernel.  Skipped off glibc, when the
user configured malloc already (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``,
another allocator in ``LD_PRELOAD``), and with ``NLCOMPILE_TUNE_HEAP=0``.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

from nlcompile import knobs

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit, and its dynamic ceiling
TRIM_THRESHOLD = 64 << 20


def _user_configured_malloc() -> bool:
    env = os.environ
    return (any(name.startswith("MALLOC_") and name.endswith("_") for name in env)
            or "malloc" in env.get("GLIBC_TUNABLES", "")
            or any(lib in env.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))


@functools.cache
def tune_heap() -> bool:
    """Set glibc's mmap and trim thresholds once per process; whether they were set."""
    if not knobs.tune_heap() or _user_configured_malloc():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
