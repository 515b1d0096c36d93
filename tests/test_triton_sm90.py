"""The Triton chunk kernels compile for an NVIDIA H100 (sm_90) and fit its shared memory.

No GPU needed: Triton compiles ahead of time for a given target (``triton.compile`` of an
``ASTSource`` with ``GPUTarget("cuda", 90, 32)``), down to the cubin, with its bundled
ptxas.  A kernel whose shared memory exceeds the H100's 232448 bytes per block compiles
but fails to launch, so the test compiles the kernels with the blocks the launchers choose
on CUDA (``common.kernel_blocks``, chunk from ``ops.kernel_chunk``) and checks
``metadata.shared``.  It prints REG and STACK (spill) bytes from ``cuobjdump -res-usage``
for the record, and from the SASS each kernel's instructions and barriers and, per loop, the
instructions, barriers and shuffles of one iteration (``sass_counts``: the sequential chain a
program walks, which nothing here can time).

Checked: the benchmark shape (dk = dv = 128, bf16 k/v/q) for DeltaNet (delta rule, no
gate), Gated DeltaNet (delta rule, scalar gate) and KDA (delta rule, per-key-channel gate,
gate first; chunk 16), forward (WY inverse, prepare, states, output with the readout after) and
backward (readout_dv, states_bwd, grads, wy_grads) kernels, and Gated DeltaNet at dk = dv = 64 and 256,
with tf32 forward and ieee backward dots (what the launchers pick for fp16 inputs); the
forward kernels for fp32 inputs (ieee) of DeltaNet at 128 and Gated DeltaNet at 256; DeltaNet,
Gated DeltaNet and KDA at 128 and Gated DeltaNet at 256 with bf16 dots (the default for bf16
inputs: chunk 64 at d = 128, 32 at 256), DeltaNet and Gated DeltaNet at 128 also with fp32 inputs
and bf16 dots, Gated DeltaNet also on [N, T, D] inputs (one head), a scalar decay without the
delta rule at 256 with bf16 dots (its grads kernel in two key blocks); and Gated DeltaNet at 128 with
fp16's dots at chunk 64 (``NLCOMPILE_TRITON_CHUNK=64``).  Head count (16: fla's layout, read in
place) and head dims are compile-time constants, as a launch makes them.
``python tests/test_triton_sm90.py --all`` prints the table for every kind (gate none / scalar /
per channel, delta on / off, readout before / after, with and without q, bf16 and fp32 inputs,
bf16 dots) at dk = dv in {64, 128, 256}; ``--space`` every candidate the autotuner times on CUDA
(``targets/triton/tuning.py``) for DeltaNet and Gated DeltaNet at d = 128 with bf16 dots (the
default for bf16 inputs), with the programs each
leaves resident per SM (blocks/SM: what bounds the sequential kernels).
Pointers and integer arguments are compiled as 16-divisible, as a launch at the benchmark
shape specialises them; that gives the larger shared memory (unaligned builds need less).

The compiles run in subprocesses without TRITON_INTERPRET (conftest sets it for this
machine's CPU runs, and the interpreter replaces the kernels' JITFunctions), two at a time.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from _benchmarks import load_benchmark

SM90_SHARED_BYTES = 232448  # H100: 227 KB of shared memory per block (opt-in maximum)
# bf16 at the benchmark (its inputs, o asked in their dtype, their gradients); beta, g, states... are fp32
BF16_POINTERS = {"k_ptr", "v_ptr", "q_ptr", "o_ptr", "do_ptr", "dk_ptr", "dv_ptr", "dq_ptr"}
BF16_OPERANDS = {"H_ptr", "h_ptr", "w_ptr", "dhn_ptr", "u_ptr", "vp_ptr", "src_ptr", "vals_ptr", "dvp_ptr",
                 "dw_ptr", "tm_ptr", "tr_ptr"}  # bf16 dots: bf16 too
# (name, delta, gate): gate 0 none, 1 scalar, 2 per key channel
DELTANET, GATED_DELTANET, KDA = ("DeltaNet", True, 0), ("GatedDeltaNet", True, 1), ("KDA", True, 2)
ALL_KINDS = [("additive", False, 0), ("decay", False, 1), ("channel", False, 2), DELTANET, GATED_DELTANET, KDA]


def kernel_specs(kind: tuple[str, bool, int], dk: int, dv: int | None = None, before: bool = False,
                 with_q: bool = True, prec: str = "tf32", space: bool = False,
                 inputs: str | None = None, heads: int = 16) -> list[dict]:
    """The kernels (module, name, constexprs, num_warps) the launchers run on CUDA for one kind
    of scan at head dims dk, dv (default dv = dk) with the chunk ``ops.kernel_chunk`` picks for
    chunk_size 64, with bf16 k, v, q and "tf32" forward, "ieee" backward dots (fp16's default;
    ``prec="bf16"``: bf16 dots everywhere, bf16's default) or fp32 ones
    (``prec="ieee"``: "ieee" everywhere): the untuned launch (``common.kernel_blocks``),
    or with ``space`` every candidate the autotuner tries (``tuning.Space``).  ``inputs`` "fp32" or
    "bf16" overrides the inputs' dtype (default: fp32 with "ieee" dots, else bf16); ``heads``: the
    inputs' head count (16: fla's [B, T, H, D] layout read in place; 1: [N, T, D])."""
    from nlcompile.targets.triton import backward, forward
    from nlcompile.targets.triton.common import kernel_blocks
    from nlcompile.targets.triton.ops import kernel_chunk
    from nlcompile.targets.triton.wy_inverse import inverse_key_block

    name, delta, gate = kind
    dv = dk if dv is None else dv
    precs = dict(forward=prec, backward=prec if prec == "bf16" else "ieee")   # as ``common.dot_precision``
    chunk = kernel_chunk(64, gate == 2, "cuda", dk, dv, tuple(precs.values()))
    b = kernel_blocks("cuda", dk, dv, chunk, tuple(precs.values()))
    specs = []

    def add(module, kernel, **constexprs):
        dot = precs[module]
        launches = [dict(BV=b.BV, num_warps=kernel.untuned_warps(b), num_stages=None)]
        if space:   # as the autotuner prunes them (BV clipped to dv, candidates known to fault dropped)
            configs = kernel.candidates(dv, dot)
            launches = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
        for launch in launches:
            consts = dict(constexprs, PREC=dot)
            if kernel.space.value_blocks:
                consts["BV"] = min(launch["BV"], b.BV_prepare)
            specs.append(dict(kind=name, d=dk if dk == dv else f"{dk}x{dv}", before=before, with_q=with_q,
                              inputs=inputs or ("fp32" if prec == "ieee" else "bf16"), module=module,
                              kernel=kernel.name,
                              constexprs=consts, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                              maxnreg=kernel.space.maxnreg))

    # V' and dV' are [N, T, dv] buffers (one "head"); without them the kernels read v, write dv
    base = dict(C=chunk, BK=b.BK, GATE=gate, HEADS=heads, dk=dk, dv=dv)
    value_heads = 1 if delta else heads
    if delta:
        if gate != 2:
            add("forward", forward.WY_INVERSE, C=chunk, BK=b.BK, BKD=inverse_key_block(b, "cuda"), GATE=gate,
                HEADS=heads, dk=dk)
        add("forward", forward.PREPARE, **base, BV=b.BV_prepare, BKC=b.BKC, HAS_COEF=True)
    add("forward", forward.STATES, **base, HAS_BETA=delta, src_heads=value_heads)
    if with_q:
        add("forward", forward.OUTPUT, **base, BKC=b.BKC, BKD=b.BKD, BEFORE=before, vals_heads=value_heads)
        add("backward", backward.READOUT_DV, **base, BKC=b.BKC, BKD=b.BKD, BEFORE=before, dvp_heads=value_heads)
    flags = dict(base, HAS_Q=with_q, DELTA=delta, BEFORE=before)
    add("backward", backward.STATES_BWD, **flags, dvp_heads=value_heads)
    add("backward", backward.GRADS, **flags, BKG=backward._grads_key_block(b, gate, delta, precs["backward"]))
    if delta:
        add("backward", backward.WY_GRADS, **base, BKC=b.BKC, BKD=b.BKD, HAS_COEF=True)
    return specs


def compile_sm90(spec: dict) -> dict:
    """AOT-compile one kernel for sm_90 (in a process without TRITON_INTERPRET): shared memory
    bytes, registers and stack bytes per thread, compile seconds."""
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(f"nlcompile.targets.triton.{spec['module']}"), spec["kernel"])
    consts = spec["constexprs"]
    bf16 = (BF16_POINTERS if spec["inputs"] == "bf16" else set()) | (BF16_OPERANDS if consts["PREC"] == "bf16" else set())
    signature = {a: "constexpr" if a in consts else ("*bf16" if a in bf16 else "*fp32") if a.endswith("_ptr")
                 else "fp32" if a == "scale" else "i32"
                 for a in fn.arg_names}
    # A launch specialises on 16-divisible pointers and integers (``tt.divisibility``), which
    # vectorises loads and changes layouts and shared memory; at the benchmark shape (T = 2048 or
    # 8192, d = 128) every argument is.  Not aligned: none is (e.g. T odd).
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if spec.get("aligned", True) and a not in consts}
    start = time.time()
    ck = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={key: spec[key] for key in ("num_warps", "num_stages", "maxnreg")
                                 if spec.get(key) is not None})
    seconds = time.time() - start
    return dict(spec, shared=ck.metadata.shared, seconds=round(seconds, 1), **cubin_counts(ck.asm["cubin"]))


def cubin_counts(cubin: bytes) -> dict:
    """REG and STACK bytes per thread (``cuobjdump -res-usage``, Triton's bundled one) and ``sass_counts``
    of a compiled kernel."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return dict(reg=reg, stack=stack, **sass_counts(sass))


def sass_counts(sass: str) -> dict:
    """Instructions and barriers (BAR) of a kernel's SASS, and for each loop (a backward branch) its
    body's instructions, barriers and warp shuffles (SHFL) per iteration: with the trip counts, what
    a program's sequential chain costs (no GPU to time it here)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for at, text in code:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            body = [t for a, t in code if int(target.group(1), 16) <= a <= at]
            loops.append((len(body), sum("BAR" in t for t in body), sum("SHFL" in t for t in body)))
    return dict(instructions=len(code), barriers=sum("BAR" in t for _, t in code), loops=loops)


def compile_env() -> dict:
    """The environment of a child process that compiles kernels: this one's without TRITON_INTERPRET
    (which would replace the kernels' JITFunctions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    return env


def _worker(specs: list[dict]) -> list[dict]:
    """Compile ``specs`` in a child process of this file (``compile_env``)."""
    out = subprocess.run([sys.executable, __file__, "--compile"], input=json.dumps(specs), env=compile_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def compile_all(specs: list[dict], workers: int = 2) -> list[dict]:
    """Compile ``specs`` in ``workers`` child processes (round robin), results in input order."""
    parts = [specs[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(_worker, [p for p in parts if p]))
    ordered = [None] * len(specs)
    for i, part in enumerate(done):
        for j, result in enumerate(part):
            ordered[i + j * workers] = result
    return ordered


def blocks_per_sm(reg: int, shared: int, warps: int) -> int:
    """Programs of one kernel resident at once on an H100 SM: 64K registers (allocated per warp in
    units of 256), 228 KB of shared memory (1 KB reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-max(reg, 1) * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 233472 // (shared + 1024), 64 // warps, 32)


def table(results: list[dict]) -> str:
    head = ("| kernel | kind | d | dot | C | BV | BKC | warps | stages | flags | shared B | REG | STACK B | "
            "blocks/SM | instructions / BAR | loops: instructions / BAR / SHFL per iteration | compile s |")
    rows = [head, "|" + " --- |" * 17]
    for r in results:
        c = r["constexprs"]
        flags = ",".join(f"{k}={int(v)}" for k, v in c.items() if k in ("HAS_Q", "BEFORE", "HAS_BETA"))
        rows.append(f"| {r['kernel']} | {r['kind']} | {r['d']} | {c['PREC']} | {c['C']} | {c.get('BV', '-')} | "
                    f"{c.get('BKC', '-')} | {r['num_warps']} | {r.get('num_stages') or 'default'} | {flags} | "
                    f"{r['shared']} | {r['reg']} | {r['stack']} | "
                    f"{blocks_per_sm(r['reg'], r['shared'], r['num_warps'])} | {r['instructions']} / {r['barriers']} | "
                    f"{', '.join('/'.join(map(str, loop)) for loop in r['loops']) or '-'} | {r['seconds']} |")
    return "\n".join(rows)


def _require_triton_cuda_backend():
    """The pinned triton wheel bundles ptxas and cuobjdump; without them this check cannot run (a failure,
    not a skip: it would hide kernels that no longer fit)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    assert os.path.exists(os.path.join(bin_dir, "cuobjdump")), \
        f"triton {triton.__version__} has no bundled NVIDIA toolchain in {bin_dir}: install the pinned triton"


def test_kernels_fit_h100_shared_memory():
    _require_triton_cuda_backend()
    specs = kernel_specs(DELTANET, 128) + kernel_specs(GATED_DELTANET, 128)
    specs += kernel_specs(GATED_DELTANET, 64) + kernel_specs(GATED_DELTANET, 256) + kernel_specs(KDA, 128)
    specs += [s for s in kernel_specs(DELTANET, 128, prec="ieee") + kernel_specs(GATED_DELTANET, 256, prec="ieee")
              if s["module"] == "forward"]  # ieee backward kernels: fp16's, the default specs above
    specs += kernel_specs(DELTANET, 128, prec="bf16") + kernel_specs(GATED_DELTANET, 128, prec="bf16")
    specs += kernel_specs(KDA, 128, prec="bf16") + kernel_specs(GATED_DELTANET, 256, prec="bf16")
    # fp32 storage with bf16 dots (a loop computing in bf16 on fp32 values, or the knob): fp32 tiles at chunk 64
    specs += kernel_specs(DELTANET, 128, prec="bf16", inputs="fp32") + kernel_specs(GATED_DELTANET, 128, prec="bf16",
                                                                                   inputs="fp32")
    specs += kernel_specs(GATED_DELTANET, 128, prec="bf16", heads=1)   # [N, T, D] inputs
    specs += kernel_specs(("decay", False, 1), 256, prec="bf16")  # the grads kernel in two key blocks
    with pytest.MonkeyPatch.context() as mp:  # chunk 64 at d = 128 with fp16's dots, as NLCOMPILE_TRITON_CHUNK
        mp.setenv("NLCOMPILE_TRITON_CHUNK", "64")  # asks (measuring)
        specs += kernel_specs(GATED_DELTANET, 128)
    results = compile_all(specs)
    print("\n" + table(results))
    over = [f"{r['kernel']} {r['kind']} d={r['d']}: {r['shared']} B" for r in results
            if r["shared"] > SM90_SHARED_BYTES]
    assert not over, f"over the H100's {SM90_SHARED_BYTES} B of shared memory per block: {over}"
    # ptxas left to itself gave the grads kernel 32 registers and 6 KB of spills (common.kernel_blocks)
    starved = [f"{r['kind']} d={r['d']}: {r['reg']} registers" for r in results
               if r["kernel"] in ("_grads_kernel", "_wy_grads_kernel", "_states_bwd_kernel") and r["reg"] <= 32]
    assert not starved, f"grads kernel starved of registers: {starved}"
    # the WY inverse runs at one warp, where an unrolled key loop of fp32 dots spilled 4.4 KB
    spilled = [f"{r['kind']} d={r['d']} {r['constexprs']['PREC']}: {r['stack']} B" for r in results
               if r["kernel"] == "_wy_inverse_kernel" and r["stack"]]
    assert not spilled, f"WY inverse kernel spills: {spilled}"


def test_sass_counts_reads_loops():
    """Loops are backward branches; the self-branch that ends every kernel is not one."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;   /* 0x0000000000007b1d */
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
        /*0050*/                   BRA 0x50;
    """
    assert sass_counts(sass) == dict(instructions=6, barriers=1, loops=[(3, 1, 1)])


def test_fla_comparison_metrics_and_site_check(tmp_path):
    """benchmarks/sm90_vs_fla.py (fla is not installed here, so only its parts that need no fla): SASS loops
    paired with source loops (constant-trip ones the compiler unrolled dropped, largest first), the
    instruction-work metrics, the best-guess config, and the install hint for a site without fla."""
    vs = load_benchmark("sm90_vs_fla")
    source = [("V/BV", 1, True), ("K/BK", 2, True), ("chunks", 32, False), ("K/BK", 4, True)]
    assert vs.match_loops([(10, 1, 0), (20, 2, 0)], source) == [((10, 1, 0), "K/BK", 2), ((20, 2, 0), "chunks", 32)]
    assert vs.match_loops([(10, 1, 0)] * 3, source[2:3]) == [((10, 1, 0), "?", 1)] * 3
    m = vs.metrics(100, [((10, 1, 0), "chunks", 32)], programs=264, warps=4, reg=128, shared=1024)
    assert m["exec"] == 100 + 10 * 31 and m["bps"] == blocks_per_sm(128, 1024, 4) == 4
    assert m["M"] == 410 * 1 and m["W4"] == 410 * 4 * 264 / 132 / 4 and m["cost"] == max(m["M"], m["W4"])
    rows = [dict(stack=8, cost=1, exec=1), dict(stack=0, cost=5, exec=9), dict(stack=0, cost=5, exec=7)]
    assert vs.best(rows) is rows[2]
    with pytest.raises(SystemExit, match="pip install --no-deps --target .* fla-core==0.6.0 einops==0.8.1"):
        vs.check_fla_site(tmp_path)


def test_launch_blocks_on_cuda():
    """The chunk shrinks with the head dim on CUDA (and only there), less under bf16 dots (2-byte
    operands), and is at most 32 under fp32 ("ieee") dots, forward or backward (fp16 inputs: tf32
    forward, ieee backward); a launcher refuses a chunk that would not fit instead of failing at
    launch (the backward also one chosen for other dots than its own)."""
    from nlcompile.targets.triton.common import kernel_blocks
    from nlcompile.targets.triton.ops import kernel_chunk

    dims = (32, 64, 128, 256)
    assert [kernel_chunk(64, False, "cuda", d, d, "tf32") for d in dims] == [64, 64, 32, 16]
    assert [kernel_chunk(64, False, "cuda", d, d, "ieee") for d in dims] == [32, 32, 32, 16]
    assert [kernel_chunk(64, False, "cuda", d, d, ("tf32", "ieee")) for d in dims] == [32, 32, 32, 16]
    assert [kernel_chunk(64, False, "cuda", d, d, "bf16") for d in dims] == [64, 64, 64, 32]
    assert [kernel_chunk(64, False, "cuda", d, d, ("bf16", "bf16")) for d in dims] == [64, 64, 64, 32]
    assert kernel_chunk(64, False, "cuda", 64, 64, ("bf16", "tf32")) == 64
    assert kernel_chunk(64, False, "cuda", 128, 128, ("bf16", "tf32")) == 32
    with pytest.raises(ValueError, match="too long for dk=64, dv=64 with bf16/ieee dots"):
        kernel_blocks("cuda", 64, 64, 64, ("bf16", "ieee"))
    assert [kernel_chunk(64, False, "cpu", d, d, p) for d in dims for p in ("ieee", "bf16-interpreted")] == [64] * 8
    assert kernel_chunk(64, True, "cuda", 256, 256, "bf16") == 16    # per-channel gate
    assert kernel_chunk(32, False, "cuda", 128, 128, "bf16") == 32   # a shorter chunk asked is kept
    with pytest.raises(ValueError, match="too long"):
        kernel_blocks("cuda", 128, 128, 64, "ieee")
    with pytest.raises(ValueError, match="too long"):
        kernel_blocks("cuda", 256, 256, 64, "bf16")
    assert kernel_blocks("cuda", 128, 128, 64, "bf16").chunk == 64


def test_forced_chunk(monkeypatch):
    """NLCOMPILE_TRITON_CHUNK fixes the kernels' chunk (for measuring), above the CUDA tile cap too."""
    from nlcompile.targets.triton.common import kernel_blocks
    from nlcompile.targets.triton.ops import kernel_chunk

    monkeypatch.setenv("NLCOMPILE_TRITON_CHUNK", "64")
    assert kernel_chunk(32, True, "cuda", 128, 128, "ieee") == kernel_blocks("cuda", 128, 128, 64, "ieee").chunk == 64
    monkeypatch.setenv("NLCOMPILE_TRITON_CHUNK", "48")
    with pytest.raises(ValueError, match="NLCOMPILE_TRITON_CHUNK"):
        kernel_chunk(32, False, "cuda", 128, 128, "ieee")


def test_dot_precision_and_warps_choices(monkeypatch):
    """fp32 inputs: ieee dots; bf16: bf16 dots (measured on an H100, see ``common.dot_precision``);
    fp16: tf32 forward, ieee backward; the two measuring knobs override and reject unknown values."""
    import torch

    from nlcompile.targets.triton.common import dot_precision, kernel_blocks

    f32, bf16, f16 = (torch.empty(0, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert [dot_precision(f32, f32), dot_precision(f32, None), dot_precision(bf16, bf16)] == ["ieee", "ieee", "bf16"]
    assert dot_precision(bf16, bf16, backward=True) == "bf16" and dot_precision(bf16, f32) == "ieee"
    assert dot_precision(f16, None) == "tf32" and dot_precision(f16, f16, backward=True) == "ieee"
    monkeypatch.setenv("TRITON_INTERPRET", "1")           # the interpreter gets the same arithmetic, emulated
    assert dot_precision(bf16, None) == "bf16-interpreted" and dot_precision(f16, None) == "tf32-interpreted"
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "bf16")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dot_precision(f32, f32) == "bf16"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dot_precision(f32, f32) == "bf16-interpreted"
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "tf32x3")
    assert dot_precision(f32, f32) == dot_precision(bf16, None, backward=True) == "tf32x3-interpreted"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dot_precision(f32, f32) == "tf32x3"
    monkeypatch.setenv("NLCOMPILE_TRITON_DOT", "fp8")
    with pytest.raises(ValueError, match="NLCOMPILE_TRITON_DOT"):
        dot_precision(f32, None)
    assert kernel_blocks("cuda", 128, 128, 32, "bf16").num_warps == 8
    monkeypatch.setenv("NLCOMPILE_TRITON_WARPS", "16")
    assert kernel_blocks("cuda", 128, 128, 32, "bf16").num_warps == 16
    assert kernel_blocks("cpu", 128, 128, 32, "bf16").num_warps == 4  # CUDA only (the interpreter ignores warps)
    monkeypatch.setenv("NLCOMPILE_TRITON_WARPS", "3")
    with pytest.raises(ValueError, match="NLCOMPILE_TRITON_WARPS"):
        kernel_blocks("cuda", 128, 128, 32, "bf16")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compile"]:  # child: specs on stdin, results on stdout
        print(json.dumps([compile_sm90(spec) for spec in json.load(sys.stdin)]))
        return 0
    if argv[:1] == ["--all"]:
        specs, seen = [], set()
        for d in (64, 128, 256):
            for kind in ALL_KINDS:
                for before, with_q, prec in ((False, True, "tf32"), (True, True, "tf32"), (False, False, "tf32"),
                                             (False, True, "ieee"), (False, True, "bf16")):
                    for s in kernel_specs(kind, d, d, before, with_q, prec):
                        key = json.dumps([s["module"], s["kernel"], d, s["constexprs"]], sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            specs.append(s)
        results = compile_all(specs, workers=max(1, os.cpu_count() or 1))
        print(table(results))
        print("max shared:", max(r["shared"] for r in results), "limit:", SM90_SHARED_BYTES)
        return 0
    if argv[:1] == ["--space"]:  # every autotuning candidate at the benchmark shape
        specs = [s for kind in (DELTANET, GATED_DELTANET) for s in kernel_specs(kind, 128, prec="bf16", space=True)]
        print(table(compile_all(specs, workers=max(1, os.cpu_count() or 1))))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
