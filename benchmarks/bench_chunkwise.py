"""Eager vs nlcompile vs the hand-written chunkwise reference, as ratios from one run.

    .venv/bin/python benchmarks/bench_chunkwise.py            # full table (a few minutes)
    .venv/bin/python benchmarks/bench_chunkwise.py --quick    # T in {256, 2048}, no torch.compile

For DeltaNet, GLA and KDA (Kimi Delta Attention) at B=2, H=4, D=64 and T in {256, 2048, 8192}: the time of
the naive per-token loop (eager), of ``nlcompile.compile`` (torch target) and
of the zoo's hand-written chunkwise reference given the same chunk size
nlcompile chose; nlcompile's cold compile time at each T (a fresh process);
and ``torch.compile``'s compile time on the naive loop at T=32/64/128 for
contrast.  Times are best-of-n wall clock on this machine, the three variants
timed in interleaved rounds; the ratios are what to read (the machine is shared
and absolute times drift).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

from nlcompile.timing import interleaved_best

BENCH = {"DeltaNet": "deltanet_fla", "GLA": "gla_naive_bhtd", "KDA": "kda_fla"}


def chosen_chunk(compiled, args) -> int:
    """The chunk size nlcompile's loop used in its latest call on these inputs."""
    program = compiled.compiled_for(*args).program
    return program.loop_0.chunk_sizes_used[0]


COLD_COMPILE = r"""
import sys, time, torch, nlcompile
from nlcompile.zoo import MODELS
entry = MODELS[sys.argv[1]]
args = entry.make_inputs(B=2, H=4, T=int(sys.argv[2]), D=64)
start = time.perf_counter()
fn = nlcompile.compile(entry.fn, example_inputs=args)
print(time.perf_counter() - start)
"""

TORCH_COMPILE = r"""
import sys, time, torch
from nlcompile.zoo import MODELS
entry = MODELS[sys.argv[1]]
args = entry.make_inputs(B=2, H=4, T=int(sys.argv[2]), D=64)
fn = torch.compile(lambda *a: entry.fn(*a))
start = time.perf_counter()
fn(*args)
print(time.perf_counter() - start)
"""


def in_fresh_process(script: str, *argv: str) -> float:
    """Seconds printed by ``script`` run cold: a new process, Inductor's caches off."""
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def run(lengths, torch_compile_lengths) -> list[dict]:
    import nlcompile
    from nlcompile.zoo import MODELS

    rows = []
    for label, name in BENCH.items():
        entry = MODELS[name]
        for T in lengths:
            args = entry.make_inputs(B=2, H=4, T=T, D=64)
            compiled = nlcompile.compile(entry.fn, example_inputs=args)
            compiled(*args)
            chunk = chosen_chunk(compiled, args)
            with torch.no_grad():
                fns = {"eager": lambda: entry.fn(*args), "ours": lambda: compiled(*args),
                       "ref": lambda: entry.reference(*args, chunk_size=chunk)}
                t = interleaved_best(fns, {"eager": 3, "ours": 8, "ref": 8}, warm=True)
                eager, ours, ref = t["eager"], t["ours"], t["ref"]
            kind = compiled.explain(*args).loops[0].kind
            cold = in_fresh_process(COLD_COMPILE, name, str(T))
            row = dict(model=label, T=T, kind=kind, chunk=chunk, eager_ms=eager * 1e3, ours_ms=ours * 1e3,
                       ref_ms=ref * 1e3, speedup=eager / ours, vs_ref=ref / ours, compile_s=cold)
            rows.append(row)
            print(f"{label:<9} T={T:<5} {kind:<12} C={chunk:<3} eager {eager * 1e3:9.1f} ms  nlcompile "
                  f"{ours * 1e3:7.1f} ms  reference {ref * 1e3:7.1f} ms  speedup {eager / ours:6.1f}x  "
                  f"ref/nlcompile {ref / ours:4.2f}  compile {cold:5.2f} s", flush=True)
    for T in torch_compile_lengths:
        seconds = in_fresh_process(TORCH_COMPILE, BENCH["DeltaNet"], str(T))
        rows.append(dict(model="DeltaNet", T=T, torch_compile_s=seconds))
        print(f"torch.compile of the naive DeltaNet loop at T={T}: compile {seconds:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    ns = parser.parse_args()
    lengths = (256, 2048) if ns.quick else (256, 2048, 8192)
    tc = () if ns.quick else (32, 64, 128)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = run(lengths, tc)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
