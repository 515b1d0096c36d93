"""The torch target's heap tuning (``nlcompile/heap.py``): when it applies, and what it changes."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not GLIBC, reason="the heap tuning is for glibc's malloc; elsewhere it does nothing")


def run_fresh(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (the tuning is once per process) and return its stdout."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "NLCOMPILE_TUNE_HEAP")) and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


TUNED = "from nlcompile.heap import tune_heap; print(tune_heap(), tune_heap())"


def test_heap_is_tuned_once_unless_switched_off_or_configured_by_the_user():
    assert run_fresh(TUNED) == "True True"
    assert run_fresh(TUNED, NLCOMPILE_TUNE_HEAP="0") == "False False"
    assert run_fresh(TUNED, MALLOC_TRIM_THRESHOLD_="1000000") == "False False"
    assert run_fresh(TUNED, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4096") == "False False"


WHERE_BUFFERS_LIVE = """
    import ctypes, torch, nlcompile
    from nlcompile.zoo import MODELS

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    entry = MODELS["deltanet_fla"]
    args = entry.make_inputs(B=1, H=1, T=8, D=4)
    nlcompile.compile(entry.fn, example_inputs=args)(*args)  # the torch target tunes the heap
    where = []
    for mb in (1, 4, 16, 30):
        before = libc.mallinfo2().hblkhd  # bytes in mmap-ed blocks
        buffer = torch.empty(mb << 18)
        where.append("mmap" if libc.mallinfo2().hblkhd - before >= mb << 20 else "heap")
        del buffer
    print(" ".join(where))
"""


def test_compiling_for_the_torch_target_keeps_buffers_below_32mb_in_the_heap():
    """Tuned, buffers up to 32 MB come from the heap (and once freed are reused from it) instead
    of being mapped, and faulted in, anew on every call.  Untuned, glibc maps the larger ones."""
    assert run_fresh(WHERE_BUFFERS_LIVE) == "heap heap heap heap"
    assert run_fresh(WHERE_BUFFERS_LIVE, NLCOMPILE_TUNE_HEAP="0").split()[-1] == "mmap"
