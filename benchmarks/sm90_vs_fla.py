"""Static sm_90 comparison of flash-linear-attention's chunk kernels with ours: instruction counts, no GPU.

    .venv/bin/python benchmarks/sm90_vs_fla.py [--fla-site DIR] [--cache FILE] [--every] [--workers N]

Compiles ahead of time for an NVIDIA H100 (``GPUTarget("cuda", 90, 32)``, Triton's bundled ptxas and
cuobjdump) every Triton kernel that fla-core 0.6.0 launches for ``chunk_delta_rule`` and
``chunk_gated_delta_rule``, forward and backward, at the benchmark shape (B=8, T=2048, H=16, D=128,
bf16 q, k, v in the [B, T, H, D] layout, called as ``benchmarks/bench_triton.py`` calls them), with
every config its autotuners would time on an H100, and ours with every autotune candidate
(``tests/test_triton_sm90.py``: ``kernel_specs(kind, 128, prec="bf16", space=True)``, ``compile_all``).
It prints per model the best-guess config of each kernel (``best``) and the phase totals of both
sides; ``--every`` adds every config of every kernel.

fla's launches are recorded, not run, in a child process (``record_launches``) so that the patched
Triton stays there: a fake driver and torch.cuda probes make fla take its Hopper paths, each autotuner
"launches" every config left after its early pruning, and Triton's JIT records the specialisation
(signature, constexprs, attributes, options) and the grid of each launch instead of compiling it.
Other child processes compile the records (``compile_fla``).  fla's results are cached in FILE
(default DIR/sm90-cache.json): a cold run (empty Triton cache too) took 7 minutes on 2 CPUs, a rerun
compiles ours only (under a minute).

fla is not a dependency of the project; install it into DIR (default: .fla-site in the repo root):

    .venv/bin/python -m pip install --no-deps --target .fla-site fla-core==0.6.0 einops==0.8.1
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triton.backends.compiler import GPUTarget

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_triton_sm90 import (GATED_DELTANET, DELTANET, SM90_SHARED_BYTES, blocks_per_sm,  # noqa: E402
                              compile_all, compile_env, cubin_counts, kernel_specs)

B, T, H = 8, 2048, 16           # the benchmark shape, K = V = 128, bf16
K = V = 128
FLA_CHUNK = 64
NT = T // FLA_CHUNK             # fla's chunks per sequence
SMS = 132                       # an H100's SMs
FLA_PINS = {"fla-core": "0.6.0", "einops": "0.8.1"}
INSTALL = "{python} -m pip install --no-deps --target {site} fla-core==0.6.0 einops==0.8.1"
MODELS = (("DeltaNet", "chunk_delta_rule", False), ("GatedDeltaNet", "chunk_gated_delta_rule", True))
BATCH = 8                       # fla records per compiling child (each imports torch and fla first)

# The recording relies on Triton 3.9's JIT internals: it replaces JITFunction._pack_args, _do_compile and run
# (with these parameters) and Autotuner.run; on a Triton without them it stops with a message
# (``check_jit_internals``) instead of recording nothing or something else.
JIT_INTERNALS = {
    "_pack_args": ["self", "backend", "kwargs", "bound_args", "specialization", "options"],
    "_do_compile": ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"],
    "run": ["self", "args", "grid", "warmup", "kwargs"],
}


# --- child processes: the fake H100, the recording of fla's launches, their compiles ---------------------------

def fake_h100() -> GPUTarget:
    """Make Triton and torch.cuda report one NVIDIA H100 (sm_90, 132 SMs, 232448 B of shared memory per block)
    without a GPU, so that fla's import-time and launch-time checks take its Hopper paths.  Children only.
    Returns the Triton target."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    props = dict(multiprocessor_count=SMS, max_shared_mem=SM90_SHARED_BYTES, max_num_regs=65536, warpSize=32,
                 sm_clock_rate=1980000, mem_clock_rate=2619000, mem_bus_width=5120)
    triton.runtime.driver.set_active(types.SimpleNamespace(
        backend="cuda", utils=types.SimpleNamespace(get_device_properties=lambda index=0: dict(props)),
        get_current_target=lambda: target, get_current_device=lambda: 0, get_current_stream=lambda device=None: 0))
    name = "NVIDIA H100 80GB HBM3"
    torch.cuda.get_device_name = lambda *args, **kwargs: name
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
        name=name, major=9, minor=0, multi_processor_count=SMS, shared_memory_per_block=49152,
        shared_memory_per_block_optin=SM90_SHARED_BYTES, total_memory=80 * 2**30)
    return target


def check_jit_internals() -> None:
    """Stop with a message unless Triton's JITFunction has the internals the recording replaces (Triton 3.9's)."""
    import triton
    from triton.runtime.jit import JITFunction

    found = {name: list(inspect.signature(getattr(JITFunction, name)).parameters) if hasattr(JITFunction, name)
             else None for name in JIT_INTERNALS}
    if found != JIT_INTERNALS:
        raise SystemExit(f"recording fla's launches relies on Triton 3.9's JITFunction internals {JIT_INTERNALS}; "
                         f"triton {triton.__version__} has {found}")


def patch_triton(records: list[dict], state: dict) -> None:
    """Make every autotuner "launch" each config left after its early pruning, and every JIT launch append
    its specialisation and grid to ``records`` (with ``state``'s model and phase) instead of compiling."""
    from fla.ops.utils.cache import CachedAutotuner
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    check_jit_internals()
    pack_args, jit_run = JITFunction._pack_args, JITFunction.run

    def autotuner_run(self, *args, grid, warmup=False, **kwargs):
        configs = self.configs
        if self.early_config_prune:
            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
        for config in configs:
            self.fn.run(*args, grid=grid, warmup=False, **{**kwargs, **config.all_kwargs()})

    def keep_bound_args(self, backend, kwargs, bound_args, specialization, options):
        state["bound"] = dict(bound_args)
        return pack_args(self, backend, kwargs, bound_args, specialization, options)

    def keep_grid(self, *args, grid, warmup, **kwargs):
        state["grid"] = grid
        return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        grid = state["grid"](state["bound"]) if callable(state["grid"]) else state["grid"]
        records.append(dict(
            model=state["model"], phase=state["phase"], module=self.module, name=self.__name__,
            signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs),
            options=dict(num_warps=options.num_warps, num_stages=options.num_stages, maxnreg=options.maxnreg,
                         num_ctas=options.num_ctas),
            grid=tuple(int(g) for g in grid), consts={self.arg_names[path[0]]: v for path, v in constexprs.items()}))
        return None  # no kernel: run returns without launching

    Autotuner.run = CachedAutotuner.run = autotuner_run
    JITFunction._pack_args, JITFunction.run, JITFunction._do_compile = keep_bound_args, keep_grid, record


def fla_on_fake_h100() -> None:
    """The fake H100 (``fake_h100``), and fla imported under it taking its Hopper paths for CPU
    tensors.  Children only (also ``host_overhead.py --fla``)."""
    fake_h100()
    import fla.utils
    import fla.utils.hardware as hardware

    # fla's launchers ask check_shared_mem('hopper', k.device.index): None for CPU tensors, 0 on a GPU
    hardware.get_all_max_shared_mem = lambda: {0: SM90_SHARED_BYTES, None: SM90_SHARED_BYTES}
    hardware.check_shared_mem.cache_clear()
    if not (fla.utils.IS_NVIDIA_HOPPER and hardware.check_shared_mem("hopper", None)):
        raise SystemExit("the fake H100 did not take: fla does not take its Hopper paths")


def record_launches(out: str) -> None:
    """Child: run fla's chunk functions forward and backward on CPU tensors of the benchmark shape under the
    fake H100 and pickle the launch records (``patch_triton``) to ``out``."""
    fla_on_fake_h100()
    import torch

    records, state = [], {}
    patch_triton(records, state)
    import fla.ops

    torch.manual_seed(0)
    for model, function, gated in MODELS:
        q, k, v = (torch.randn(B, T, H, K, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        x = dict(q=q, k=k, v=v, beta=torch.rand(B, T, H, requires_grad=True))
        if gated:
            x["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H) + 3).requires_grad_()
        state.update(model=model, phase="fwd")
        o = getattr(fla.ops, function)(**x, scale=1.0)[0]
        state.update(phase="bwd")
        o.backward(torch.ones_like(o))
    Path(out).write_bytes(pickle.dumps(records))


def compile_record(record: dict, target: GPUTarget) -> dict:
    """AOT-compile one recorded launch with its exact specialisation: shared bytes and ``cubin_counts``."""
    import triton
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(record["module"]), record["name"])
    while not isinstance(fn, JITFunction):  # under its autotuner and heuristics
        fn = fn.fn
    kernel = triton.compile(triton.compiler.ASTSource(fn, record["signature"], constexprs=record["constexprs"],
                                                      attrs=record["attrs"]),
                            target=target, options={k: v for k, v in record["options"].items() if v is not None})
    return dict(shared=kernel.metadata.shared, **cubin_counts(kernel.asm["cubin"]))


def compile_fla(out: str) -> None:
    """Child: compile the pickled records on stdin; their results (or errors) as JSON to ``out``."""
    target = fake_h100()  # fla's modules query the device when imported
    results = []
    for record in pickle.load(sys.stdin.buffer):
        try:
            results.append(compile_record(record, target))
        except Exception as e:  # noqa: BLE001 -- reported by the parent, not cached
            results.append(dict(error=f"{type(e).__name__}: {str(e)[:300]}"))
    Path(out).write_text(json.dumps(results))


# --- the parent: fla's site, children, cache ----------------------------------------------------------------------

def check_fla_site(site: Path) -> None:
    """Stop with the install command unless ``site`` holds fla-core 0.6.0 and einops 0.8.1."""
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version
             for d in importlib.metadata.distributions(path=[str(site)])}
    if any(found.get(name) != version for name, version in FLA_PINS.items()):
        raise SystemExit(f"{site} holds {found or 'nothing'}, not {FLA_PINS}; install them with\n    "
                         + INSTALL.format(python=os.path.relpath(sys.executable), site=site))


def run_child(mode: str, site: Path, stdin: bytes = b"") -> bytes:
    """Run this script's child ``mode`` with fla's site importable (``compile_env``: without
    TRITON_INTERPRET); what it wrote."""
    env = compile_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        child = subprocess.run([sys.executable, __file__, mode, out], input=stdin, env=env, capture_output=True)
        if child.returncode:
            raise SystemExit(f"{mode} failed:\n{child.stderr.decode()[-4000:]}")
        return Path(out).read_bytes()


def spec_key(record: dict) -> str:
    """The cache key of one recorded launch: kernel and exact specialisation."""
    return hashlib.sha1(repr((record["module"], record["name"], sorted(record["signature"].items()),
                              sorted((str(k), repr(v)) for k, v in record["constexprs"].items()),
                              sorted((str(k), repr(v)) for k, v in record["attrs"].items()),
                              sorted(record["options"].items()))).encode()).hexdigest()[:16]


def compile_batch(records: list[dict], site: Path) -> list[dict]:
    """Compile ``records`` in one child (``compile_fla``)."""
    return json.loads(run_child("--compile-fla", site, pickle.dumps(records)))


def fla_results(records: list[dict], site: Path, cache: Path, workers: int) -> dict:
    """Compile results by ``spec_key``: from ``cache`` (for this Triton and fla) or compiled ``BATCH``
    records per child, ``workers`` at a time, saved to ``cache`` as they come; failures are reported."""
    versions = dict(FLA_PINS, triton=importlib.metadata.version("triton"))
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    results = saved.get("results", {}) if saved.get("versions") == versions else {}
    todo = list({spec_key(r): r for r in records if spec_key(r) not in results}.values())
    print(f"fla: {len(todo)} of {len(results) + len(todo)} distinct launches to compile", file=sys.stderr)
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    with ThreadPoolExecutor(workers) as pool:
        for batch, done in zip(batches, pool.map(lambda b: compile_batch(b, site), batches)):
            for record, result in zip(batch, done):
                if "error" in result:
                    print(f"fla: {record['name']} {record['options']} failed: {result['error']}", file=sys.stderr)
                else:
                    results[spec_key(record)] = result
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(dict(versions=versions, results=results)))
    return results


# --- metrics ------------------------------------------------------------------------------------------------------

def fla_loops(kernel: str, consts: dict) -> list[tuple[str, int, bool]]:
    """The source loops of fla's kernels in order, with their trip counts at the benchmark shape: (label, trips,
    constant?); constant-trip loops may be unrolled by the compiler.  Kernels not listed have none."""
    bk, bv = consts.get("BK") or K, consts.get("BV") or V
    row_solve = [("row solve", 14, False)] * 4  # forward substitution, per 16-row block
    wy_bwd = ([("K/BK", K // bk, True), ("V/BV", V // bv, True), ("K/BK", K // bk, True)] if consts.get("USE_G")
              else [("V/BV", V // bv, True), ("K/BK", K // bk, True), ("K/BK", K // bk, True)])
    return {
        "chunk_scaled_dot_kkt_fwd_kernel": [("K/BK", K // bk, True)],
        "merge_16x16_to_64x64_inverse_kernel": row_solve,
        "recompute_w_u_fwd_kernel": [("V/BV", V // bv, True), ("K/BK", K // bk, True)],
        "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": [("chunks", NT, False)],
        "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64": [("chunks", NT, False)],
        "chunk_fwd_kernel_o": [("K/BK", K // bk, True)],
        "chunk_bwd_kernel_dv_local": [("K/BK", K // bk, True), ("V/BV", V // bv, True)],
        "chunk_bwd_kernel_dqkwg": [("V/BV", V // bv, True)],
        "prepare_wy_repr_bwd_kernel": wy_bwd,
        "chunk_gated_delta_rule_fwd_kkt_solve_kernel": [("K/BK", K // bk, True)] + row_solve,
    }.get(kernel, [])


def match_loops(sass_loops: list, source: list[tuple[str, int, bool]]) -> list[tuple[tuple, str, int]]:
    """Pair SASS loops (in address order) with source loops: drop the source loops the compiler removed (trip 1,
    or constant trips unrolled: the largest constant first) until the counts agree; unpaired, a loop is "?" x1."""
    src = [s for s in source if s[1] > 1]
    while len(src) > len(sass_loops):
        consts = [i for i, s in enumerate(src) if s[2]]
        if not consts:
            break
        src.pop(max(consts, key=lambda i: src[i][1]))
    if len(src) != len(sass_loops):
        return [(tuple(loop), "?", 1) for loop in sass_loops]
    return [(tuple(loop), s[0], s[1]) for loop, s in zip(sass_loops, src)]


def metrics(instr: int, loops: list[tuple[tuple, str, int]], programs: int, warps: int, reg: int,
            shared: int) -> dict:
    """Instruction work of one config (counts, not times; memory traffic, tensor-core latency and L2 ignored):
    exec = SASS instructions + sum over loops of body x (trips - 1): one warp's dynamic instructions in one
           program (loops the compiler unrolled are in the SASS count already);
    M    = exec x ceil(programs / (blocks/SM x 132)): a warp's instruction chain times the waves;
    W/4  = exec x warps x programs / 132 / 4: warp-instructions per SM over its 4 schedulers;
    cost = max(M, W/4): a crude issue-bound proxy in cycles at one instruction per cycle and warp."""
    exe = instr + sum(loop[0] * (trips - 1) for loop, _, trips in loops)
    bps = blocks_per_sm(reg, shared, warps)
    m = exe * math.ceil(programs / (bps * SMS)) if bps else float("inf")  # 0 blocks/SM: does not fit
    w4 = exe * warps * programs / SMS / 4
    return dict(exec=exe, bps=bps, M=m, W4=w4, cost=max(m, w4))


def make_row(side: str, model: str, phase: str, kernel: str, grid: tuple, warps: int, stages: int | str, cfg: str,
             result: dict, loops: list[tuple[tuple, str, int]]) -> dict:
    """One config of one kernel, with its ``metrics``."""
    programs = math.prod(grid)
    return dict(side=side, model=model, phase=phase, kernel=kernel, grid=grid, programs=programs, warps=warps,
                stages=stages, cfg=cfg, shared=result["shared"], reg=result["reg"], stack=result["stack"],
                instr=result["instructions"], bar=result["barriers"], loops=loops,
                **metrics(result["instructions"], loops, programs, warps, result["reg"], result["shared"]))


def fla_rows(records: list[dict], results: dict) -> list[dict]:
    """A row per recorded launch that compiled, its loops paired with ``fla_loops``."""
    rows = []
    for r in records:
        result = results.get(spec_key(r))
        if result is not None:
            cfg = ",".join(f"{k}={v}" for k, v in r["consts"].items() if k in ("BK", "BV", "BC", "BS", "DOT_PRECISION"))
            rows.append(make_row("fla", r["model"], r["phase"], r["name"], r["grid"], r["options"]["num_warps"],
                                 r["options"]["num_stages"], cfg, result,
                                 match_loops(result["loops"], fla_loops(r["name"], r["consts"]))))
    return rows


# kernel: (phase, grid, label and trips of its loops); nc: chunks, N: sequences (B x H), vb: value blocks dv / BV
OURS = {
    "_wy_inverse_kernel": ("fwd", ("nc", "N"), "block inverse", 15),  # wy_inverse._diagonal_inverses' 15 steps
    "_prepare_kernel": ("fwd", ("nc", "N"), "", 1),
    "_states_kernel": ("fwd", ("N", "vb"), "chunks", "nc"),
    "_output_kernel": ("fwd", ("nc", "N", "vb"), "", 1),
    "_readout_dv_kernel": ("bwd", ("nc", "N", "vb"), "", 1),
    "_states_bwd_kernel": ("bwd", ("N", "vb"), "chunks", "nc"),
    "_grads_kernel": ("bwd", ("nc", "N"), "V/BV", "vb"),
    "_wy_grads_kernel": ("bwd", ("nc", "N"), "V/BV", "vb"),
}


def _loop_label(result: dict, loop: tuple, label: str, trips: int) -> tuple[str, int]:
    """A loop's label and trips: the kernel's (``OURS``), except the WY inverse's key loop (the one
    without shuffles, beside its substitution's), which takes BK / BKD trips."""
    c = result["constexprs"]
    if result["kernel"] == "_wy_inverse_kernel" and not loop[2]:
        return "K/BKD", c["BK"] // c["BKD"]
    return label, trips


def our_rows(workers: int) -> list[dict]:
    """A row per autotune candidate of our kernels (DeltaNet and Gated DeltaNet, d = 128, bf16 dots)."""
    specs = [s for kind in (DELTANET, GATED_DELTANET) for s in kernel_specs(kind, K, prec="bf16", space=True)]
    rows = []
    for r in compile_all(specs, workers):
        phase, grid, label, trips = OURS[r["kernel"]]
        c = r["constexprs"]
        dims = dict(nc=T // c["C"], N=B * H, vb=-(-V // c.get("BV", V)))
        loops = [(tuple(loop), *_loop_label(r, loop, label, dims.get(trips, trips))) for loop in r["loops"]]
        rows.append(make_row("ours", r["kind"], phase, r["kernel"], tuple(dims[g] for g in grid), r["num_warps"],
                             r["num_stages"] or "default", f"BV={c['BV']}" if "BV" in c else "", r, loops))
    return rows


def best(rows: list[dict]) -> dict:
    """The best-guess config: the non-spilling one (any if all spill) with the least cost, then exec."""
    return min([r for r in rows if r["stack"] == 0] or rows, key=lambda r: (r["cost"], r["exec"]))


# --- tables -------------------------------------------------------------------------------------------------------

HEAD = ("| kernel | grid (programs) | config | warps | stages | shared B | REG | STACK B | blocks/SM | "
        "SASS instr / BAR | loops: instr/BAR/SHFL per iter x trips | exec/program | M | W/4 |\n" + "|" + " --- |" * 14)


def line(r: dict, kernel: str) -> str:
    """A table row."""
    loops = ", ".join(f"{'/'.join(map(str, loop))} x{trips} ({label})" for loop, label, trips in r["loops"]) or "-"
    return (f"| {kernel} | {'x'.join(map(str, r['grid']))} ({r['programs']}) | {r['cfg']} | {r['warps']} | "
            f"{r['stages']} | {r['shared']} | {r['reg']} | {r['stack']} | {r['bps']} | {r['instr']} / {r['bar']} | "
            f"{loops} | {r['exec']} | {r['M']:.0f} | {r['W4']:.0f} |")


def groups(rows: list[dict]) -> dict:
    """Rows by (side, model, phase, kernel), in launch order."""
    out = {}
    for r in rows:
        out.setdefault((r["side"], r["model"], r["phase"], r["kernel"]), []).append(r)
    return out


def model_tables(grouped: dict, model: str) -> list[str]:
    """Each side's best-guess config per kernel, and the totals per side and phase."""
    out, totals = [f"\n## {model}: best-guess config per kernel\n"], {}
    for side in ("fla", "ours"):
        out.append(f"\n### {side}\n\n{HEAD}")
        for (s, m, phase, kernel), rows in grouped.items():
            if (s, m) == (side, model):
                b = best(rows)
                out.append(line(b, f"{phase} {kernel}"))
                t = totals.setdefault((side, phase), dict.fromkeys(("n", "M", "W4", "cost", "seq"), 0))
                seq = sum(loop[0] * trips for loop, label, trips in b["loops"] if label == "chunks")
                for key, value in dict(n=1, M=b["M"], W4=b["W4"], cost=b["cost"], seq=seq).items():
                    t[key] += value
    out += ["\n### totals (sum over the kernels' best configs; fla's bwd includes its recompute of w, u, h)\n",
            "| side | phase | kernels | sum M | sum W/4 | sum max(M, W/4) | "
            f"sequential chunk loops: instr/iter x {NT} |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {side} | {phase} | {t['n']} | {t['M']:.0f} | {t['W4']:.0f} | {t['cost']:.0f} | {t['seq']} |"
            for (side, phase), t in sorted(totals.items())]
    return out


def every_config(grouped: dict) -> list[str]:
    """Every distinct config of every kernel, the best-guess one marked."""
    out = ["\n## every config\n"]
    for (side, model, phase, kernel), rows in grouped.items():
        out.append(f"\n### {side} {model} {phase} {kernel}\n\n{HEAD}")
        b, seen = best(rows), set()
        for r in rows:
            key = (r["cfg"], r["warps"], r["stages"], r["instr"], r["reg"])
            if key not in seen:
                seen.add(key)
                out.append(line(r, ("**best** " if r is b else "") + kernel))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fla-site", type=Path, default=ROOT / ".fla-site",
                        help="where fla-core 0.6.0 and einops 0.8.1 are installed (default: .fla-site)")
    parser.add_argument("--cache", type=Path, help="fla's compile results (default: FLA_SITE/sm90-cache.json)")
    parser.add_argument("--every", action="store_true", help="also print every config of every kernel")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--record", metavar="OUT", help=argparse.SUPPRESS)       # children
    parser.add_argument("--compile-fla", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record:
        record_launches(args.record)
        return 0
    if args.compile_fla:
        compile_fla(args.compile_fla)
        return 0
    site = args.fla_site.resolve()
    check_fla_site(site)
    start = time.time()
    records = pickle.loads(run_child("--record", site))
    print(f"fla: {len(records)} launches recorded ({time.time() - start:.0f} s)", file=sys.stderr)
    results = fla_results(records, site, args.cache or site / "sm90-cache.json", args.workers)
    print(f"fla compiled ({time.time() - start:.0f} s); compiling ours", file=sys.stderr)
    grouped = groups(fla_rows(records, results) + our_rows(args.workers))
    print(f"done ({time.time() - start:.0f} s)", file=sys.stderr)
    out = [f"# sm_90 (static): fla-core 0.6.0 vs ours, B={B} T={T} H={H} K=V={K} bf16; instruction counts, not times"]
    for model, _, _ in MODELS:
        out += model_tables(grouped, model)
    if args.every:
        out += every_config(grouped)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
