"""Host time of one call of the Triton kernels' scan, the kernels themselves not run (any machine).

    .venv/bin/python benchmarks/host_overhead.py             # DeltaNet and Gated DeltaNet shapes
    .venv/bin/python benchmarks/host_overhead.py --T 2048
    .venv/bin/python benchmarks/host_overhead.py --triton    # through Triton's launch path too (no GPU)
    .venv/bin/python benchmarks/host_overhead.py --triton --fla --rounds 3   # and fla's, alternated

On a GPU, a call timed alone (as ``bench_triton.py`` times them) leaves the GPU idle until the
host's first launch, and a host slower than the GPU's work shows in the time of every call: at
T=2048 on an H200 (2026-11-27) our forward took 0.95 ms against fla's 0.82 while its kernels' work
grew with T no faster than fla's (``docs/triton-notes.md``, earlier GPU runs); on an H100
(2026-11-28) its host time at T=2048 was 0.26-0.57 ms against fla's 0.49-0.97 (README).  This
measures the Python of that path on the host: the host time from the call to its first launch, the
whole call (forward, no autograd), and a forward + backward step (autograd on q, k, v).  By
default ``tuning.ChunkKernel.launch`` is replaced by a stub that records when it is called, which
leaves out Triton's launch path.

``--triton`` (no GPU needed; not on one, where ``bench_triton.py``'s host column times the real
launches) keeps that path as a GPU runs it, in a child process where Triton is not interpreted:
the autotuner (each key's first candidate taken, untimed) and ``JITFunction.run`` (argument
binding, specialisation, its kernel cache), under a stand-in CUDA driver (an sm_90 target), with a
stand-in compiled kernel whose ``run``, where the C launcher would be called, records the launch
(what it leaves out: that launcher, a few microseconds a kernel).  ``--fla`` adds
flash-linear-attention's chunk functions on the same path, under ``sm90_vs_fla.py``'s stand-in
H100, which fla's imports and launchers ask about (fla-core 0.6.0 installed as that script says),
so that the two Python paths compare on one machine: on this project's CPU (2026-11-27, three
rounds, DeltaNet and Gated DeltaNet) fla's forward took 317-364 us against our 137-145, and its
first launch came at 72-85 us against our 75-82.  The stand-in understates fla's a little: with
CPU tensors its ``input_guard`` enters a null context where on a GPU it enters
``torch.cuda.device`` on each guarded call.  The first launch is timed where the C launcher would
be called under ``--triton``, at the entry of ``ChunkKernel.launch`` without it: the two modes'
columns do not compare.

Inputs are on the GPU where there is one, else on the CPU (under ``TRITON_INTERPRET=1`` without
``--triton``: the kernels' device check), small (B=1, H=2 by default) and with the initial state
given (``--no-initial-state``: none, as ``bench_triton.py`` calls the kernels; then our path fills a
zero state, after its first launch where autograd records nothing): large CPU tensors would add the
CPU allocator's and memsets' costs, which a GPU's caching allocator and its kernels do not have.
Medians over many calls; absolute times drift with the machine's load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
TRITON_CHILD = "--triton-child"   # the child process of --triton (Triton not interpreted there)
if not torch.cuda.is_available() and TRITON_CHILD not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU tensors pass the kernels' device check


@contextmanager
def launches_stubbed(record: Callable[[], None]) -> Iterator[None]:
    """``ChunkKernel.launch`` replaced by ``record``."""
    from nlcompile.targets.triton import tuning

    original = tuning.ChunkKernel.launch
    tuning.ChunkKernel.launch = lambda self, *args, **kwargs: record()
    try:
        yield
    finally:
        tuning.ChunkKernel.launch = original


_RECORDERS: list[Callable[[], None]] = []   # those of the triton_launch_path contexts entered, innermost last


@contextmanager
def triton_launch_path(record: Callable[[], None]) -> Iterator[None]:
    """Triton's launch path as on a GPU, down to the compiled kernel's ``run`` (``record``), on a
    machine without one, under ``sm90_vs_fla.fake_h100``'s stand-in driver; for a process of its
    own (what it patches stays patched)."""
    from triton.runtime import autotuner, jit

    from nlcompile.targets.triton import common, forward, tuning

    if not isinstance(forward.STATES.fn, jit.JITFunction):
        raise RuntimeError("--triton needs Triton not interpreted (TRITON_INTERPRET unset)")

    class Compiled:   # a compiled kernel as the JIT launches it (kept in the JIT's cache)
        function = packed_metadata = None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            _RECORDERS[-1]()

    def compile_nothing(self, key, signature, device, *rest, **kwargs):
        kernel = self.device_caches[device][0][key] = Compiled()
        return kernel

    if not getattr(jit.JITFunction._do_compile, "stand_in", False):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from sm90_vs_fla import fake_h100

        fake_h100()
        compile_nothing.stand_in = True
        jit.JITFunction._do_compile = compile_nothing
        autotuner.Autotuner.prune_configs = lambda self, kwargs, *rest: self.configs[:1]   # untimed
        tuning.tuning_enabled = lambda device: True
        tuning.ChunkKernel._precompile = lambda self, *args: 0
        tuning.ChunkKernel._tuned_on_disk = lambda self, *args: False
        common.INTERPRETED.value = True   # lets CPU tensors past the kernels' device check; nothing compiles
    _RECORDERS.append(record)
    try:
        yield
    finally:
        _RECORDERS.pop()


def measure(gated: bool, B: int, T: int, H: int, D: int, calls: int, triton: bool = False,
            fla: bool = False, initial_state: bool = True) -> dict[str, float]:
    """Median host microseconds: to the first launch, the forward call, a forward+backward step and
    its first launch ("first of step": the forward's, autograd recording), and the kernels a forward
    launched; of flash-linear-attention's chunk function instead of ours with ``fla`` (under
    ``--triton``); without ``initial_state``, none given (zeros)."""
    from nlcompile.targets.triton.ops import triton_chunkwise_scan

    launches: list[float] = []
    with (triton_launch_path if triton else launches_stubbed)(lambda: launches.append(time.perf_counter())):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=gen, device=device).bfloat16() for _ in range(3))
        k = F.normalize(k.float(), dim=-1).bfloat16()
        beta = torch.rand(B, T, H, generator=gen, device=device)
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen, device=device)) if gated else None
        h0 = torch.zeros(B * H, D, D, device=device) if initial_state else None

        def call(x):
            if fla:   # fla's layout of the initial state: [B, H, dk, dv]
                from fla.ops import chunk_delta_rule, chunk_gated_delta_rule

                kw = dict(q=x[0], k=x[1], v=x[2], beta=beta, scale=1.0, output_final_state=True,
                          initial_state=None if h0 is None else h0.view(B, H, D, D))
                return (chunk_gated_delta_rule(g=g, **kw) if gated else chunk_delta_rule(**kw))[0]
            return triton_chunkwise_scan(x[1], x[2], q=x[0], beta=beta, log_gate=g, out_dtype=torch.bfloat16,
                                         initial_state=h0)[0]

        first, forward, step, step_first = [], [], [], []
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
        forward_launches = len(launches)
        for i in range(calls + warm):   # then forward+backward steps
            launches.clear()
            t0 = time.perf_counter()
            call(leaves).float().sum().backward()
            if device.type == "cuda":   # the loss's own kernels are real: wait for them
                torch.cuda.synchronize()
            if i >= warm:
                step.append(time.perf_counter() - t0)
                step_first.append(launches[0] - t0)
    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    return {"to the first launch": us(first), "forward": us(forward), "forward+backward": us(step),
            "first of step": us(step_first), "launches": forward_launches}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1, help="every row this many times, the rows alternated")
    ap.add_argument("--triton", action="store_true", help="through Triton's launch path (machines without a GPU)")
    ap.add_argument("--fla", action="store_true", help="with --triton: also flash-linear-attention's chunk "
                    "functions, under a stand-in H100 (fla-core 0.6.0 in --fla-site, as sm90_vs_fla.py installs it)")
    ap.add_argument("--fla-site", type=Path, default=ROOT / ".fla-site")
    ap.add_argument("--no-initial-state", action="store_true", help="give no initial state (as bench_triton.py "
                    "calls the kernels: ours then fill a zero state, fla's read none)")
    ap.add_argument(TRITON_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fla and not (args.triton or args.triton_child):
        ap.error("--fla needs --triton (fla's launches go through Triton's launch path)")
    if args.triton:
        if torch.cuda.is_available():
            print("--triton stands in for a GPU: on this one, bench_triton.py's host column times the real "
                  "launches", file=sys.stderr)
            return 2
        env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        if args.fla:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from sm90_vs_fla import check_fla_site

            check_fla_site(args.fla_site)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.fla_site), env.get("PYTHONPATH")) if p)
        child = [a for a in argv if a != "--triton"] + [TRITON_CHILD]
        done = subprocess.run([sys.executable, __file__, *child], env=env, capture_output=True, text=True)
        print(done.stdout, end="")
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr, end="")
        return done.returncode
    if args.fla:   # the stand-in H100, before fla's imports ask about it
        from sm90_vs_fla import fla_on_fake_h100

        fla_on_fake_h100()
    how = ("through Triton's launch path (stand-in CUDA driver and compiled kernels)" if args.triton_child
           else "kernel launches stubbed")
    print(f"host time per call, {how} (B={args.B} T={args.T} H={args.H} D={args.D}, bf16, "
          f"{'no' if args.no_initial_state else 'an'} initial state, medians of {args.calls} calls)")
    print("| model | to the first launch (us) | forward (us) | forward+backward (us) | a step's first launch (us) "
          "| kernels a forward launches |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for model, gated in (("DeltaNet", False), ("Gated DeltaNet", True)):
            for fla in (False, True)[:1 + args.fla]:
                r = measure(gated, args.B, args.T, args.H, args.D, args.calls, triton=args.triton_child, fla=fla,
                            initial_state=not args.no_initial_state)
                print(f"| {'fla ' * fla}{model} | {r['to the first launch']:.0f} | {r['forward']:.0f} | "
                      f"{r['forward+backward']:.0f} | {r['first of step']:.0f} | {r['launches']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
