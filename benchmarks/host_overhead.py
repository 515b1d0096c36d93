"""Host time of one call of the Triton kernels' scan, the kernel launches stubbed out (any machine).

    .venv/bin/python benchmarks/host_overhead.py             # DeltaNet and Gated DeltaNet shapes
    .venv/bin/python benchmarks/host_overhead.py --T 2048

On a GPU, a call timed alone (as ``bench_triton.py`` times them) leaves the GPU idle until the
host's first launch, and a host slower than the GPU's work shows in the time of every call: at
T=2048 on an H200 our forward took 0.95 ms against fla's 0.82 while its kernels' work grew with T
no faster than fla's (README, GPU section).  This measures the Python of that path on the host,
with ``tuning.ChunkKernel.launch`` replaced by a stub that records when it is called: the host
time from the call to its first launch, and the whole call (forward, no autograd), and a forward +
backward step (autograd on q, k, v).  What it leaves out: Triton's own launcher and the autotuner's
lookup (``launch`` is stubbed), which only a GPU runs.  Inputs are on the GPU where there is one,
else on the CPU under ``TRITON_INTERPRET=1`` (the kernels' device check), small (B=1, H=2 by
default) and with the initial state given: large CPU tensors would add the CPU allocator's and
memsets' costs, which a GPU's caching allocator and its kernels do not have.  Medians over many
calls; absolute times drift with the machine's load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():   # CPU tensors pass the kernels' device check only in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def measure(gated: bool, B: int, T: int, H: int, D: int, calls: int) -> dict[str, float]:
    """Median host microseconds: to the first launch, the forward call, a forward+backward step."""
    from nlcompile.targets.triton import tuning
    from nlcompile.targets.triton.ops import triton_chunkwise_scan

    launches: list[float] = []
    original = tuning.ChunkKernel.launch
    tuning.ChunkKernel.launch = lambda self, *args, **kwargs: launches.append(time.perf_counter())
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device).bfloat16() for _ in range(3))
        k = F.normalize(k.float(), dim=-1).bfloat16()
        beta = torch.rand(B, T, H, generator=gen, device=device)
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen, device=device)) if gated else None
        h0 = torch.zeros(B * H, D, D, device=device)

        def call(x):
            return triton_chunkwise_scan(x[1], x[2], q=x[0], beta=beta, log_gate=g, out_dtype=torch.bfloat16,
                                         initial_state=h0)[0]

        first, forward, step = [], [], []
        leaves = tuple(x.detach().requires_grad_(True) for x in (q, k, v))
        warm = calls // 10
        for i in range(calls + warm):   # forward calls in a row, as bench_triton.py times them
            launches.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                call((q, k, v))
            if i >= warm:
                first.append(launches[0] - t0)
                forward.append(time.perf_counter() - t0)
        for i in range(calls + warm):   # then forward+backward steps
            t0 = time.perf_counter()
            call(leaves).float().sum().backward()
            if device.type == "cuda":   # the loss's own kernels are real: wait for them
                torch.cuda.synchronize()
            if i >= warm:
                step.append(time.perf_counter() - t0)
    finally:
        tuning.ChunkKernel.launch = original
    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    return {"to the first launch": us(first), "forward": us(forward), "forward+backward": us(step)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    print(f"host time per call, kernel launches stubbed (B={args.B} T={args.T} H={args.H} D={args.D}, bf16, "
          f"medians of {args.calls} calls)")
    print("| model | to the first launch (us) | forward (us) | forward+backward (us) |")
    print("|---|---|---|---|")
    for model, gated in (("DeltaNet", False), ("Gated DeltaNet", True)):
        r = measure(gated, args.B, args.T, args.H, args.D, args.calls)
        print(f"| {model} | {r['to the first launch']:.0f} | {r['forward']:.0f} | {r['forward+backward']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
