"""nlcompile's Triton kernels against flash-linear-attention's chunk kernels and the torch target (GPU).

    .venv/bin/python benchmarks/bench_triton.py                  # needs a CUDA GPU
    .venv/bin/python benchmarks/bench_triton.py --json out.json
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_triton.py --smoke   # tiny shapes on the CPU

DeltaNet and Gated DeltaNet at B=8, H=16, D=128, T in {2048, 8192}, bf16:
forward and forward+backward time of ``triton_chunkwise_scan`` (our kernels),
of the ``fla`` package's ``chunk_delta_rule`` / ``chunk_gated_delta_rule``
(when installed: ``pip install flash-linear-attention``) and of the torch
target's ``chunkwise_scan``, as ratios measured in one run, with the device
named.  ``--smoke`` runs tiny shapes (on the CPU under TRITON_INTERPRET=1) to
check the script itself; its times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock otherwise)."""
    import statistics
    import time

    fn()  # warm-up (and kernel compilation)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(model: str, B: int, H: int, T: int, D: int, device, dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = dict(q=rnd(B, T, H, D) * D ** -0.5, k=F.normalize(rnd(B, T, H, D), dim=-1), v=rnd(B, T, H, D),
             beta=torch.rand(B, T, H, generator=gen))
    if model == "GatedDeltaNet":
        x["g"] = F.logsigmoid(rnd(B, T, H) + 3)
    return {n: t.to(device=device, dtype=dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}


def ours(x: dict, scan):
    """Our kernels (or the torch target's scan) on fla's [B, T, H, D] inputs."""
    B, T, H, D = x["k"].shape
    flat = lambda t: t.transpose(1, 2).reshape(B * H, T, *t.shape[3:])  # noqa: E731
    kw = dict(q=flat(x["q"]), beta=flat(x["beta"]))
    if "g" in x:
        kw["log_gate"] = flat(x["g"])
    o, _ = scan(flat(x["k"]), flat(x["v"]), **kw)
    return o.view(B, H, T, -1).transpose(1, 2)  # back to [B, T, H, D]


def fla_kernel(model: str):
    try:
        if model == "DeltaNet":
            from fla.ops.delta_rule import chunk_delta_rule as fn
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
    except ImportError:
        return None
    return lambda x: fn(**x, scale=1.0)[0]


def measure(models, lengths, B, H, D, device, dtype, repeats) -> list[dict]:
    from nlcompile.targets.scan import chunkwise_scan
    from nlcompile.targets.triton.ops import triton_chunkwise_scan

    rows = []
    for model in models:
        impls = {"nlcompile-triton": lambda x: ours(x, triton_chunkwise_scan),
                 "torch-target": lambda x: ours(x, chunkwise_scan)}
        fla = fla_kernel(model)
        if fla is not None:
            impls["fla"] = fla
        for T in lengths:
            x = make_inputs(model, B, H, T, D, device, dtype)
            grads = {n: t.requires_grad_(n in ("q", "k", "v")) for n, t in x.items()}
            row = {"model": model, "T": T}
            if fla is not None:  # same function: report how far apart the two kernels are
                with torch.no_grad():
                    a, b = impls["nlcompile-triton"](x).float(), fla(x).float()
                row["rel diff vs fla"] = ((a - b).abs().max() / b.abs().max()).item()
            for name, fn in impls.items():
                with torch.no_grad():
                    row[f"{name} fwd"] = timed(lambda: fn(x), device, repeats)
                row[f"{name} fwd+bwd"] = timed(lambda: fn(grads).float().square().sum().backward(), device, repeats)
                print(f"  {model} T={T} {name}: fwd {row[f'{name} fwd'] * 1e3:.2f} ms, "
                      f"fwd+bwd {row[f'{name} fwd+bwd'] * 1e3:.2f} ms", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict], device_name: str) -> str:
    diffs = [f"{r['model']} T={r['T']}: {r['rel diff vs fla']:.1e}" for r in rows if "rel diff vs fla" in r]
    lines = [f"device: {device_name}", f"max relative output difference vs fla: {', '.join(diffs) or 'fla not installed'}",
             "",
             "| model | T | pass | nlcompile-triton (ms) | fla (ms) | triton / fla | torch target (ms) | "
             "torch target / triton |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in ("fwd", "fwd+bwd"):
            ours_t, torch_t = r[f"nlcompile-triton {p}"], r[f"torch-target {p}"]
            fla_t = r.get(f"fla {p}")
            fla_cols = f"{fla_t * 1e3:.2f} | {ours_t / fla_t:.2f}x" if fla_t else "not installed | -"
            lines.append(f"| {r['model']} | {r['T']} | {p} | {ours_t * 1e3:.2f} | {fla_cols} | "
                         f"{torch_t * 1e3:.2f} | {torch_t / ours_t:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU interpreter ok)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape, lengths, repeats = dict(B=1, H=2, D=16), [40], 1
    else:
        if not torch.cuda.is_available():
            print("bench_triton.py needs a CUDA GPU (the Triton interpreter on the CPU is for tests; "
                  "use --smoke under TRITON_INTERPRET=1 to check the script)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shape, lengths, repeats = dict(B=8, H=16, D=128), [2048, 8192], 10
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU (Triton interpreter: {os.environ.get('TRITON_INTERPRET', '0')})"
    rows = measure(["DeltaNet", "GatedDeltaNet"], lengths, shape["B"], shape["H"], shape["D"], device,
                   torch.bfloat16, repeats)
    print(table(rows, device_name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
