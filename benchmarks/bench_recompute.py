"""Training memory against time: ``nlcompile.compile(layer, recompute=...)``, both in one run.

    .venv/bin/python benchmarks/bench_recompute.py                       # torch target, CPU (about a minute)
    .venv/bin/python benchmarks/bench_recompute.py --target triton       # on a CUDA GPU (bf16)
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_recompute.py --target triton --smoke

The zoo's ``nn.Module`` layers (DeltaNet, GLA; d_model 256, 4 heads of 64, B=2, T in {2048, 8192})
compiled with ``recompute=False`` and ``recompute=True``: the MiB autograd keeps from the forward
for the backward beyond the input and the parameters (each storage once: what a stack of such
layers holds per layer until its backward), and the forward+backward time of the two, timed in
interleaved rounds (the ratio is what to read: the machines are shared and absolute times
drift).  ``--smoke`` runs tiny shapes to check the script.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from nlcompile.memory import saved_storages
from nlcompile.timing import interleaved_best


def measure(target: str, layers, lengths, B: int, d_model: int, heads: int, head_dim: int, dtype, device,
            repeats: int) -> list[dict]:
    import nlcompile
    from nlcompile.zoo import LAYERS

    rows = []
    for name in layers:
        entry = LAYERS[name]
        model = entry.make_module(seed=0, d_model=d_model, n_heads=heads, head_dim=head_dim).to(device, dtype)
        params = list(model.parameters())
        for T in lengths:
            (x,) = entry.make_inputs(B=B, T=T, d_model=d_model, dtype=dtype, device=device)
            row = dict(layer=name, T=T, target=target)
            steps = {}
            for recompute in (False, True):
                compiled = nlcompile.compile(model, target=target, recompute=recompute)
                with torch.no_grad():
                    compiled(x)   # compile outside the timing

                def step(compiled=compiled):
                    compiled(x).float().square().sum().backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)

                label = "recompute" if recompute else "keep"
                _, saved = saved_storages(lambda: compiled(x), [x, *params])
                row[f"{label}_kept_mib"] = sum(saved.values()) / 2 ** 20
                steps[label] = step
            t = interleaved_best(steps, {"keep": repeats, "recompute": repeats}, warm=True)
            row.update(keep_s=t["keep"], recompute_s=t["recompute"])
            rows.append(row)
            print(f"{name} T={T}: kept for the backward {row['keep_kept_mib']:.1f} -> {row['recompute_kept_mib']:.1f}"
                  f" MiB; fwd+bwd {t['keep'] * 1e3:.1f} -> {t['recompute'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}", "",
             "| layer | T | target | kept for bwd, keep (MiB) | kept, recompute (MiB) | kept ratio "
             "| fwd+bwd, keep (ms) | fwd+bwd, recompute (ms) | time ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['T']} | {r['target']} | {r['keep_kept_mib']:.1f} | "
                     f"{r['recompute_kept_mib']:.1f} | {r['recompute_kept_mib'] / r['keep_kept_mib']:.2f}x | "
                     f"{r['keep_s'] * 1e3:.1f} | {r['recompute_s'] * 1e3:.1f} | "
                     f"{r['recompute_s'] / r['keep_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="torch", help="torch (default), inductor or triton")
    ap.add_argument("--layers", default="deltanet_layer,gla_layer", help="comma-separated zoo layers")
    ap.add_argument("--lengths", default="2048,8192", help="comma-separated sequence lengths")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and args.target == "triton" else torch.float32
    if args.smoke:
        shape, lengths, repeats = dict(B=1, d_model=32, heads=2, head_dim=16), [40], 1
    else:
        shape, lengths, repeats = dict(B=2, d_model=256, heads=4, head_dim=64), \
            [int(t) for t in args.lengths.split(",")], 3
    rows = measure(args.target, args.layers.split(","), lengths, shape["B"], shape["d_model"], shape["heads"],
                   shape["head_dim"], dtype, device, repeats)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(table(rows, f"{name}, {dtype}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
