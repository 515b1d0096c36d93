"""Command line: ``python -m nlcompile.cli demo`` (the README's main job) and ``list``."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from nlcompile.numerics import relative_error
from nlcompile.timing import interleaved_best


def demo(model: str, T: int, B: int, H: int, D: int, target: str) -> int:
    """Compile a zoo model, print what was found, the check against eager and the speedup."""
    import nlcompile
    from nlcompile.zoo import MODELS

    entry = MODELS[model]
    torch.manual_seed(0)
    args = entry.make_inputs(B=B, H=H, T=T, D=D)
    print(f"model: {model} ({entry.family}, expected kind {entry.kind}), B={B} H={H} T={T} D={D}, target={target}")
    compiled = nlcompile.compile(entry.fn, target=target)
    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(*args)
    first_call = time.perf_counter() - start
    report = compiled.explain(*args)
    print(report)
    with torch.no_grad():
        want = entry.fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    errors = [relative_error(g, w) for g, w in zip(got, want) if isinstance(w, torch.Tensor)]
    ok = all(e <= 1e-4 for e in errors)
    print(f"check against eager: max relative error {max(errors):.2e} ({'OK' if ok else 'MISMATCH'})")
    with torch.no_grad():
        best = interleaved_best({"eager": lambda: entry.fn(*args), "ours": lambda: compiled(*args)},
                                {"eager": 3, "ours": 8})
    eager, ours = best["eager"], best["ours"]
    print(f"compile (first call): {first_call:.2f} s; eager {eager * 1e3:.1f} ms, nlcompile {ours * 1e3:.1f} ms "
          f"-> speedup {eager / ours:.1f}x (best of interleaved rounds, measured side by side in this run)")
    return 0 if ok and report.loops and report.loops[0].rewrite == "chunkwise" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlcompile")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a zoo model and compare it with eager")
    d.add_argument("--model", default="deltanet_fla")
    d.add_argument("--T", type=int, default=2048)
    d.add_argument("--B", type=int, default=2)
    d.add_argument("--H", type=int, default=4)
    d.add_argument("--D", type=int, default=64)
    d.add_argument("--target", default="torch")
    sub.add_parser("list", help="list zoo models and targets")
    ns = parser.parse_args(argv)
    if ns.cmd == "demo":
        return demo(ns.model, ns.T, ns.B, ns.H, ns.D, ns.target)
    import nlcompile
    from nlcompile.zoo import MODELS

    print("targets:", ", ".join(nlcompile.list_targets()))
    for name, entry in MODELS.items():
        print(f"  {name:<36} {entry.kind:<12} time dim {entry.time_dim}, readout {entry.readout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
