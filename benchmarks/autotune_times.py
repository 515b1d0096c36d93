"""Every autotuned kernel's timings as Triton's autotuner measured them on a GPU (no GPU needed).

    .venv/bin/python benchmarks/autotune_times.py gpu-logs/triton-autotune.tgz
    .venv/bin/python benchmarks/autotune_times.py .triton-autotune

``gpu_check.sh`` packs the autotuners' results of a GPU run (ours and flash-linear-attention's:
Triton's ``*.autotune.json``, one per kernel and tuning key, each candidate's median, 20th and
80th percentile ms) into ``triton-autotune.tgz``.  They are per-kernel device times of the shapes
that first met each key (the benchmark's first length, T=2048 by default), which a profile of the
benchmark does not give at that length.  How Triton times them (``do_bench``): the L2 cache is
flushed before each run, and the autotuner's save and restore of the buffers a kernel updates in
place (``restore_value``; our states kernels' V') run inside the timed call, so those kernels'
times include the copies.  A file is written when its key is first tuned on a machine, so where
``gpu_check.sh`` carried an earlier run's files in (``.triton-autotune``), those keys' timings are
that run's, at its shapes.  This prints, per kernel and key, the best candidate's median and
configuration, the slowest candidate's that ran, and how many failed (out of resources, or
compile errors: Triton times them as inf).
"""
from __future__ import annotations

import argparse
import json
import math
import tarfile
from pathlib import Path


def read(source: Path) -> list[tuple[str, list, list]]:
    """(kernel, key, configs_timings) of every ``*.autotune.json`` in a folder or a .tgz."""
    found = []
    if source.is_dir():
        files = ((p.name, p.read_text()) for p in sorted(source.rglob("*.autotune.json")))
    else:
        with tarfile.open(source) as tar:
            files = [(Path(m.name).name, tar.extractfile(m).read().decode()) for m in tar.getmembers()
                     if m.isfile() and m.name.endswith(".autotune.json")]
    for name, text in files:
        data = json.loads(text)
        found.append((name[: -len(".autotune.json")], data.get("key", []), data.get("configs_timings") or []))
    return sorted(found, key=lambda f: (f[0], str(f[1])))


_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.int32": "i32",
           "torch.int64": "i64"}


def short_key(key: list) -> str:
    """The tuning key with torch's dtype names shortened (its tail: every tensor argument's dtype)."""
    return " ".join(_DTYPES.get(x, str(x)) if isinstance(x, str) else str(x) for x in key)


def describe(config: dict) -> str:
    tuned = "".join(f"{name}={x} " for name, x in config.get("kwargs", {}).items())
    return f"{tuned}warps={config.get('num_warps')} stages={config.get('num_stages')}"


def median_us(timing) -> float:
    return 1e3 * (timing[0] if isinstance(timing, list) else timing)


def table(entries: list[tuple[str, list, list]]) -> str:
    lines = ["| kernel | tuning key | best (us) | best config | slowest (us) | candidates (failed) |",
             "|---|---|---|---|---|---|"]
    for kernel, key, timings in entries:
        if not timings:
            lines.append(f"| {kernel} | {short_key(key)} | - | (no timings kept) | - | 0 |")
            continue
        ran = sorted((ct for ct in timings if math.isfinite(median_us(ct[1]))), key=lambda ct: median_us(ct[1]))
        failed = len(timings) - len(ran)
        if not ran:
            lines.append(f"| {kernel} | {short_key(key)} | - | (every candidate failed) | - | "
                         f"{len(timings)} ({failed}) |")
            continue
        (best, best_t), (_, worst_t) = ran[0], ran[-1]
        lines.append(f"| {kernel} | {short_key(key)} | {median_us(best_t):.1f} | {describe(best)} | "
                     f"{median_us(worst_t):.1f} | {len(timings)} ({failed}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a folder of *.autotune.json (Triton's cache) or gpu_check.sh's .tgz")
    args = ap.parse_args(argv)
    if not args.source.exists():
        ap.error(f"{args.source} does not exist")
    entries = read(args.source)
    if not entries:
        ap.error(f"no *.autotune.json in {args.source}")
    print(table(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
