"""nlcompile's Triton kernels against flash-linear-attention's chunk kernels and the torch target (GPU).

    .venv/bin/python benchmarks/bench_triton.py                  # needs a CUDA GPU
    .venv/bin/python benchmarks/bench_triton.py --json out.json
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_triton.py --smoke   # tiny shapes on the CPU

DeltaNet and Gated DeltaNet at B=8, H=16, D=128, T in {2048, 8192}, bf16: forward and
forward+backward time of ``triton_chunkwise_scan`` (our kernels, reading fla's [B, T, H, D] inputs
in place as fla does, autotuned on first use; ``--dots``, ``--warps`` and ``--chunks`` time them at
several tl.dot precisions, fixed warps per program (or untuned: ``--warps fixed``) and chunk
lengths), with the seconds of each variant's first call (compiles, tuning), of the ``fla`` package's
``chunk_delta_rule`` / ``chunk_gated_delta_rule`` (when installed: ``pip install
flash-linear-attention``) and of the torch target's ``chunkwise_scan``, as ratios measured in one
run, with the device named, each output's max error relative to the torch target's fp32 scan on
the same (rounded) inputs and that of its gradients (every input's, for one fixed output
cotangent: a backward kernel the GPU's Triton compiled wrong shows there, not in the forward's
error; a row far from the torch target's own is named under the table), the device memory a
forward+backward step holds at its peak beyond its inputs (``peak_memory``: what is saved for the
backward, scratch, the loss's temporaries) and what autograd keeps from the forward for the
backward beyond the inputs (``kept_memory``; on any device), and where a forward call's time goes:
its host time (the Python and the launches), its pace with calls queued back to back
(``host_and_queued``) and, for ours and fla's, the forward replayed from a CUDA graph (the GPU's
time alone: ``graph_replay``). ``--recompute`` adds each variant of our kernels with
``recompute=True`` (only the inputs kept; the chunk states formed again in the backward).
``--compiled`` adds what a user of ``nlcompile.compile(model, target="triton")`` gets: the zoo's
per-token loop of the model (``deltanet_matmul_bthd`` / ``gated_deltanet_matmul_bthd``, which
compute in fp32 inside, so ieee dots) compiled, the loop modules and the code around them
included (its first call captures and compiles the model).
``--dtype fp16`` / ``fp32`` and ``--dim`` time other inputs than the issue's bf16 at D=128 (the
kernels pick other dot precisions and chunks for them: ``common.dot_precision``,
``ops.kernel_chunk``).
``--smoke`` runs tiny shapes (on the CPU under TRITON_INTERPRET=1) to check the script itself; its
times mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def host_and_queued(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Where a call's time goes: the median host seconds of one call (the Python and the launches,
    timed from an idle GPU to the call's return, without waiting for the kernels), and the seconds
    per call of ``repeats`` calls queued back to back (CUDA events around them all: the pace of the
    slower of host and GPU once the host may run ahead).  A call timed alone (``timed``) takes at
    least its host time, and at least the GPU's work plus the host's time to the first launch; a
    queued pace under the time alone is what a model's stream of calls would gain."""
    host = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
    if device.type != "cuda":
        return statistics.median(host), statistics.median(host)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return statistics.median(host), start.elapsed_time(end) / 1e3 / repeats


def first_call(fn, device: torch.device) -> float:
    """Wall-clock seconds of a first call (kernel compiles and autotuning included)."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(fn, device: torch.device):
    """MiB of device memory at the peak of ``fn()`` beyond what was allocated before it; None off
    CUDA.  For the benchmark's step (forward, loss, backward): what the forward saves for the
    backward, the kernels' scratch, and the loss's temporaries (the same loss for every row, on
    the output cast to fp32: a bf16 output adds an fp32 copy that an fp32 one does not)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def kept_memory(fn, inputs) -> float:
    """MiB that autograd keeps from ``fn()`` for the backward beyond ``inputs`` (held by the caller
    anyway; ``nlcompile.memory.saved_storages``)."""
    from nlcompile.memory import saved_storages

    return sum(saved_storages(fn, inputs)[1].values()) / 2 ** 20


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock otherwise)."""
    fn()  # warm-up
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


def graph_replay(fn) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, as ``torch.cuda.graph``
    asks), returned as its replay: the same kernels with no Python and no launches from the host,
    so its time is the GPU's alone (the gaps between kernels included)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    stream = torch.cuda.current_stream()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    finally:   # a failed capture leaves its own stream current (torch.cuda.graph's exit raises first)
        torch.cuda.set_stream(stream)
    return graph.replay


def make_inputs(model: str, B: int, H: int, T: int, D: int, device, dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=gen.device)  # noqa: E731
    x = dict(q=rnd(B, T, H, D) * D ** -0.5, k=F.normalize(rnd(B, T, H, D), dim=-1), v=rnd(B, T, H, D),
             beta=torch.rand(B, T, H, generator=gen, device=gen.device))
    if model == "GatedDeltaNet":
        x["g"] = F.logsigmoid(rnd(B, T, H) + 3)
    return {n: t.to(device=device, dtype=dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}


def ours(x: dict, scan):
    """The torch target's scan on fla's [B, T, H, D] inputs (flattened to [B*H, T, D] copies)."""
    B, T, H, D = x["k"].shape
    flat = lambda t: t.transpose(1, 2).reshape(B * H, T, *t.shape[3:])  # noqa: E731
    kw = dict(q=flat(x["q"]), beta=flat(x["beta"]))
    if "g" in x:
        kw["log_gate"] = flat(x["g"])
    o, _ = scan(flat(x["k"]), flat(x["v"]), **kw)
    return o.view(B, H, T, -1).transpose(1, 2)  # back to [B, T, H, D]


def ours_in_place(x: dict, recompute: bool = False):
    """Our kernels on fla's [B, T, H, D] inputs, read in place (``triton_chunkwise_scan``), the
    output in the inputs' dtype as fla's is."""
    from nlcompile.targets.triton.ops import triton_chunkwise_scan

    o, _ = triton_chunkwise_scan(x["k"], x["v"], q=x["q"], beta=x["beta"], log_gate=x.get("g"),
                                 out_dtype=x["q"].dtype, recompute=recompute)
    return o


def compiled_zoo_model(model: str, D: int):
    """The zoo's naive loop of ``model`` through ``nlcompile.compile(target="triton")``, on the
    benchmark's inputs: q times sqrt(D) undoes the zoo model's own D^-0.5 (one elementwise pass,
    timed), so that every row computes the same function."""
    import nlcompile
    from nlcompile.zoo import MODELS

    name = {"DeltaNet": "deltanet_matmul_bthd", "GatedDeltaNet": "gated_deltanet_matmul_bthd"}[model]
    compiled = nlcompile.compile(MODELS[name].fn, target="triton")
    if model == "DeltaNet":
        return lambda x: compiled(x["q"] * D ** 0.5, x["k"], x["v"], x["beta"])
    return lambda x: compiled(x["q"] * D ** 0.5, x["k"], x["v"], x["g"], x["beta"])


FLA_UNCHECKED = "fla, its Triton check off (timing only)"
_FLA_CHECK: dict[str, object] = {}   # fla's own value of the flag its refusal reads, taken once


def fla_kernel(model: str, unchecked: bool = False):
    """fla's chunk kernel of ``model`` on our inputs; None if fla is not importable.  ``unchecked``:
    with fla's refusal of its gated backward on Triton < 3.7.1 on Hopper turned off (fla says that
    Triton compiles its gated ``chunk_bwd_dqkwg`` wrong there; the row's gradients' error shows
    whether it did), so that its backward can be timed on the lent machines' Triton 3.6."""
    try:
        if model == "DeltaNet":
            from fla.ops.delta_rule import chunk_delta_rule as fn
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
        from fla.ops.common import chunk_o
    except ImportError as e:
        print(f"fla not importable: {e}", file=sys.stderr)
        return None
    checked = _FLA_CHECK.setdefault("TRITON_ABOVE_3_7_1", getattr(chunk_o, "TRITON_ABOVE_3_7_1", None))
    if checked is None or checked is True:   # no refusal in this fla, or not on this Triton: nothing to turn off
        return None if unchecked else (lambda x: fn(**x, scale=1.0)[0])

    def call(x):   # the flag is read by the backward, which autograd runs right after this call
        chunk_o.TRITON_ABOVE_3_7_1 = True if unchecked else checked
        return fn(**x, scale=1.0)[0]
    return call


def variant_knobs(prec: str, warps: str, chunk: str) -> dict[str, Optional[str]]:
    """The environment knobs one variant of our kernels sets (None: unset): tl.dot precision, warps
    ("fixed": the untuned configuration) and chunk length.  "auto" sets nothing: the launchers'
    choice under the environment as it is, which the variant's label names too (its dots and
    chunk, "tuned" where tuning is on: with ``NLCOMPILE_TRITON_TUNE=0`` set, as the GPU test stage
    of ``gpu_check.sh`` sets it, the "auto" variant runs untuned, not tuning every test shape)."""
    knobs: dict[str, Optional[str]] = {}
    if prec != "auto":
        knobs["NLCOMPILE_TRITON_DOT"] = prec
    if chunk != "auto":
        knobs["NLCOMPILE_TRITON_CHUNK"] = chunk
    if warps == "fixed":
        knobs.update(NLCOMPILE_TRITON_WARPS=None, NLCOMPILE_TRITON_TUNE="0")
    elif warps != "auto":   # forced warps are the untuned launch's (``tuning.tuning_enabled``)
        knobs["NLCOMPILE_TRITON_WARPS"] = warps
    return knobs


@contextlib.contextmanager
def kernel_knobs(wanted: dict[str, Optional[str]]):
    """Set the knobs (None: unset) while timing, the backward included (it launches later, from
    autograd); the others as they are."""
    old = {name: os.environ.pop(name, None) for name in wanted}
    os.environ.update({name: value for name, value in wanted.items() if value is not None})
    try:
        yield
    finally:
        for name, value in old.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def reference(x: dict, cotangent: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The torch target's fp32 scan on the (rounded) inputs ``x``: its output, and every input's
    gradient for the output cotangent ``cotangent``."""
    from nlcompile.targets.scan import chunkwise_scan

    leaves = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    out = ours(leaves, chunkwise_scan)
    out.backward(cotangent)
    return out.detach(), {n: t.grad for n, t in leaves.items()}


def fixed_cotangent(B: int, T: int, H: int, D: int, device) -> torch.Tensor:
    """A fixed random output cotangent [B, T, H, D], drawn on the CPU (the same numbers on every
    device, whatever the default device is)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(B, T, H, D, generator=gen, device="cpu").to(device)


def far(err: float, ref: float, factor: float = 10.0, floor: float = 1e-2) -> bool:
    """An error that is not finite, or over both ``floor`` and ``factor`` times ``ref`` (the same error
    of a run trusted to be right): what a wrong kernel looks like, not a rounding difference."""
    return not err <= max(factor * ref, floor)


def grad_error(fn, x: dict, cotangent: torch.Tensor, want: dict) -> float:
    """Max error of ``fn``'s gradients (q, k, v, beta and the gate) relative to ``want``'s
    (``reference``), each relative to its own largest magnitude."""
    leaves = {n: t.detach().requires_grad_() for n, t in x.items()}
    fn(leaves).float().backward(cotangent)
    return max(rel_err(leaves[n].grad, want[n]) for n in want)


def measure(models, lengths, B, H, D, device, dtype, repeats, dots=("auto",), warps=("auto",), chunks=("auto",),
            profile_lengths=(), on_row=None, compiled=False, recompute=False, fla_unchecked=False) -> list[dict]:
    """One row per (model, T, kernel): fwd and fwd+bwd median seconds, and the output's and the
    gradients' max errors relative to the torch target's fp32 scan on the same (rounded) inputs.  ``on_row(rows)``
    is called after each row (so a run cut short by a time limit still leaves its rows)."""
    from nlcompile.targets.scan import chunkwise_scan
    from nlcompile.targets.triton.common import dot_precision as auto_precision
    from nlcompile.targets.triton.ops import kernel_chunk
    from nlcompile.targets.triton.tuning import tuning_enabled

    rows = []
    for model in models:
        impls = {}
        probe = torch.empty(0, dtype=dtype)
        chosen = "/".join((auto_precision(probe, None), auto_precision(probe, None, backward=True)))
        for prec, w, chunk, lean in itertools.product(dots, warps, chunks, (False, True)[:1 + recompute]):
            label = f"nlcompile-triton ({chosen if prec == 'auto' else prec}"
            label += {"auto": ", tuned" if tuning_enabled(device) else "", "fixed": ", untuned"}.get(w, f", {w} warps")
            if chunk == "auto":   # the launchers' choice for this variant's dots (forward and backward)
                precs = tuple(chosen.split("/")) if prec == "auto" else (prec,)
                chunk_label = f"auto C={kernel_chunk(64, False, device, D, D, precs)}"
            else:
                chunk_label = f"C={chunk}"
            label += f", {chunk_label}" + (", recompute" if lean else "") + ")"
            impls[label] = (variant_knobs(prec, w, chunk), functools.partial(ours_in_place, recompute=lean))
        fla = fla_kernel(model)
        if fla is not None:   # right after our first variant: a run cut short still has a ratio to fla
            first = next(iter(impls.items()))
            impls = dict([first, ("fla", ({}, fla)), *list(impls.items())[1:]])
        unchecked = fla_kernel(model, unchecked=True) if fla is not None and fla_unchecked else None
        if unchecked is not None and model == "GatedDeltaNet":
            impls[FLA_UNCHECKED] = ({}, unchecked)
        if compiled:
            impls["nlcompile.compile (zoo loop, fp32 inside)"] = ({}, compiled_zoo_model(model, D))
        impls["torch target"] = ({}, lambda x: ours(x, chunkwise_scan))
        for T in lengths:
            x = make_inputs(model, B, H, T, D, device, dtype)
            cotangent = fixed_cotangent(B, T, H, D, device)
            want, want_grads = reference(x, cotangent)
            grads = {n: t.requires_grad_(n in ("q", "k", "v")) for n, t in x.items()}
            for name, (wanted, fn) in impls.items():
                row = dict(model=model, T=T, kernel=name)
                with kernel_knobs(wanted):
                    with torch.no_grad():
                        row["first_s"] = first_call(lambda: fn(x), device)
                        row["err"] = rel_err(fn(x), want)
                        row["fwd"] = timed(lambda: fn(x), device, repeats)
                        row["fwd_host"], row["fwd_queued"] = host_and_queued(lambda: fn(x), device, repeats)
                    step = lambda: fn(grads).float().square().sum().backward()  # noqa: E731
                    try:
                        row["fwd_bwd"] = timed(step, device, repeats)
                    except RuntimeError as e:  # fla refuses some backward passes on some Triton versions
                        if name != "fla":
                            raise
                        row["fwd_bwd"], row["note"] = None, str(e).splitlines()[0]
                    if row["fwd_bwd"] is not None:
                        row["grad_err"] = grad_error(fn, x, cotangent, want_grads)
                        row["peak_mib"] = peak_memory(step, device)
                        row["kept_mib"] = kept_memory(lambda: fn(grads), grads.values())
                    if T in profile_lengths:
                        with torch.no_grad():
                            row["profile_fwd"] = kernel_profile(lambda: fn(x), top=20)
                            try:   # a diagnostic: a failure here must not cost the run its rows
                                row["timeline_fwd"] = call_timeline(lambda: fn(x))
                            except Exception as e:
                                print(f"  timeline failed: {e!r}", file=sys.stderr)
                        if row["fwd_bwd"] is not None:   # (a refused backward: none)
                            row["profile"] = kernel_profile(step)
                        print("  " + profile_text(row), file=sys.stderr, flush=True)
                    if device.type == "cuda" and (name == "fla" or name.startswith("nlcompile-triton")):
                        with torch.no_grad():
                            try:   # the GPU's time alone: a diagnostic, which must not cost the run its rows
                                row["fwd_graph"] = timed(graph_replay(lambda: fn(x)), device, repeats)
                            except Exception as e:   # the capture's end fails after what made it fail
                                cause = e.__context__ or e
                                row["graph_note"] = (str(cause).splitlines() or [repr(cause)])[0]
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                both = "-" if row["fwd_bwd"] is None else f"{row['fwd_bwd'] * 1e3:.2f} ms"
                if row.get("peak_mib") is not None:
                    both += f" (peak {row['peak_mib']:.0f} MiB)"
                if row.get("kept_mib") is not None:
                    both += f", kept for the backward {row['kept_mib']:.1f} MiB"
                grad_err = f", gradients' error {row['grad_err']:.1e}" if "grad_err" in row else ""
                graph = f", CUDA graph {row['fwd_graph'] * 1e3:.2f}" if "fwd_graph" in row else ""
                print(f"  {model} T={T} {name}: fwd {row['fwd'] * 1e3:.2f} ms (host {row['fwd_host'] * 1e3:.2f}, "
                      f"queued {row['fwd_queued'] * 1e3:.2f}{graph}), fwd+bwd {both}, "
                      f"error {row['err']:.1e}{grad_err}, first fwd call {row['first_s']:.1f} s", file=sys.stderr,
                      flush=True)
    return rows


def tuned_launches() -> list[str]:
    """What the autotuner chose for each of our kernels and keys in this run."""
    from nlcompile.targets.triton import backward, forward

    lines = []
    for kernel in forward.KERNELS + backward.KERNELS:
        names = kernel.tuned.keys
        for key, choice in kernel.chosen().items():
            shown = ", ".join(f"{n}={v}" for n, v in zip(names, key) if n in ("N", "dk", "dv", "C", "GATE", "PREC"))
            lines.append(f"tuned {kernel.name} ({shown}): {choice}")
    return lines


def kernel_profile(step, top: int = 10) -> list[tuple[str, float]]:
    """(kernel name, device ms) of one call of ``step``, the ``top`` most expensive (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total / 1e3) for e in prof.key_averages()]
    return sorted(events, key=lambda e: -e[1])[:top]


TIMELINE_MARK = "bench_triton.call"


def timeline_of(events, is_kernel) -> dict[str, float]:
    """Where a profiled call's time went (ms), from its profiler events: the host's time from the
    call's start (the ``TIMELINE_MARK`` range around it) to its first kernel's start, the kernels'
    busy time (the union of their ranges), the gaps between the first's start and the last's end
    where none ran, and the call's host time; ``is_kernel`` picks the device's events (on a GPU
    memsets and copies count as kernels: device work too)."""
    call = next(e for e in events if e.name == TIMELINE_MARK and not is_kernel(e))
    spans = sorted((e.time_range.start, e.time_range.end) for e in events   # (the mark's device-side copy: not)
                   if is_kernel(e) and e.name != TIMELINE_MARK and not getattr(e, "is_user_annotation", False))
    if not spans:
        return {"kernels": 0}
    busy, reach = 0.0, spans[0][0]
    for start, end in spans:   # the union of the ranges, overlaps counted once
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    first = spans[0][0]
    return {"kernels": len(spans), "to_first_kernel": (first - call.time_range.start) / 1e3,
            "busy": busy / 1e3, "gaps": (reach - first - busy) / 1e3,
            "host": (call.time_range.end - call.time_range.start) / 1e3}


def call_timeline(fn) -> dict[str, float]:
    """``timeline_of`` one call of ``fn`` on the GPU (torch.profiler, host and device; the
    profiler's own cost is in the host times).  A call timed alone takes about to_first_kernel +
    busy + gaps: what the kernels took, and what the host left the GPU idle."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(TIMELINE_MARK):
            fn()
        torch.cuda.synchronize()
    return timeline_of(prof.events(), lambda e: e.device_type == DeviceType.CUDA)


def profile_text(row: dict) -> str:
    """Device ms per kernel of one forward (every kernel it launches) and of one fwd+bwd step (rows
    saved before the forward's profile have only the latter)."""
    text = lambda events: "; ".join(f"{name[:60]} {t:.3f}" for name, t in events)  # noqa: E731
    parts = [f"one {what}, device ms per kernel: {text(row[key])}"
             for what, key in (("fwd", "profile_fwd"), ("fwd+bwd", "profile")) if key in row]
    line = row.get("timeline_fwd")
    if line and line.get("kernels"):
        parts.append(f"one fwd's timeline (ms): {line['to_first_kernel']:.3f} from the call to its first kernel, "
                     f"{line['kernels']} kernels busy {line['busy']:.3f}, gaps {line['gaps']:.3f}, "
                     f"host {line['host']:.3f}")
    return f"{row['model']} T={row['T']} {row['kernel']}, " + "\n  ".join(parts)


def far_gradients(rows: list[dict]) -> list[str]:
    """Rows whose gradients' error is ``far`` from the torch target's (on the same inputs, in their
    dtype; with fp32 inputs that one is the reference itself): what a wrong backward looks like."""
    torch_rows = {(r["model"], r["T"]): r.get("grad_err") for r in rows if r["kernel"] == "torch target"}
    named = []
    for r in rows:
        err, ref = r.get("grad_err"), torch_rows.get((r["model"], r["T"]))
        if err is not None and ref is not None and far(err, ref):
            named.append(f"{r['model']} T={r['T']} {r['kernel']}: gradients' error {err:.1e}, over 10x the "
                         f"torch target's {ref:.1e}")
    return named


def table(rows: list[dict], device_name: str) -> str:
    fla = {(r["model"], r["T"]): r for r in rows if r["kernel"] == "fla"}
    lines = [f"device: {device_name}", "",
             "| model | T | kernel | fwd (ms) | fwd+bwd (ms) | fwd / fla | fwd+bwd / fla | max error vs fp32 "
             "| gradients' max error vs fp32 | first fwd call (s) | fwd+bwd peak memory (MiB) | kept for bwd (MiB) "
             "| fwd host / queued (ms) | fwd CUDA graph (ms) / fla's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes, profiles = [], []
    ms = lambda t: "-" if t is None else f"{t * 1e3:.2f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
    unchecked = {(r["model"], r["T"]): r for r in rows if r["kernel"] == FLA_UNCHECKED}
    for r in rows:
        ref = fla.get((r["model"], r["T"]), {})
        both = ratio(r["fwd_bwd"], ref.get("fwd_bwd"))
        if ref.get("fwd_bwd") is None and (r["model"], r["T"]) in unchecked:   # fla refused its backward
            both = ratio(r["fwd_bwd"], unchecked[r["model"], r["T"]]["fwd_bwd"]) + " (†)"
        ratios = f"{ratio(r['fwd'], ref.get('fwd'))} | {both}"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        kept = "-" if r.get("kept_mib") is None else f"{r['kept_mib']:.1f}"
        grad_err = "-" if r.get("grad_err") is None else f"{r['grad_err']:.1e}"
        lines.append(f"| {r['model']} | {r['T']} | {r['kernel']} | {ms(r['fwd'])} | {ms(r['fwd_bwd'])} | {ratios} | "
                     f"{r['err']:.1e} | {grad_err} | {r['first_s']:.1f} | {peak} | {kept} | "
                     f"{ms(r.get('fwd_host'))} / {ms(r.get('fwd_queued'))} | "
                     f"{ms(r.get('fwd_graph'))} / {ratio(r.get('fwd_graph'), ref.get('fwd_graph'))} |")
        if "note" in r:
            notes.append(f"{r['model']} T={r['T']} {r['kernel']} fwd+bwd: {r['note']}")
        if "graph_note" in r:
            notes.append(f"{r['model']} T={r['T']} {r['kernel']}: no CUDA graph: {r['graph_note']}")
        if "profile_fwd" in r or "profile" in r:
            profiles.append(profile_text(r))
    if not fla:
        notes.append("fla not installed: no ratios")
    if unchecked:
        notes.append(f"(†): to the row '{FLA_UNCHECKED}', where fla refused its backward")
    notes += far_gradients(rows)
    return "\n".join(lines + [""] + notes + profiles + tuned_launches())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU interpreter ok)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--dots", default="auto", help="comma-separated tl.dot precisions to time our kernels with: "
                    "auto (by the inputs' dtype here), ieee, tf32x3, tf32, bf16")
    ap.add_argument("--warps", default="auto", help="comma-separated warps per program to time our kernels with "
                    "(auto: autotuned on CUDA unless NLCOMPILE_TRITON_TUNE=0; fixed: the untuned launch), "
                    "crossed with --dots")
    ap.add_argument("--models", default="DeltaNet,GatedDeltaNet", help="comma-separated: DeltaNet, GatedDeltaNet")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="q, k, v dtype (beta, gates: fp32)")
    ap.add_argument("--dim", type=int, default=128, help="head dim D of q, k, v (not with --smoke)")
    ap.add_argument("--lengths", default="2048,8192", help="comma-separated sequence lengths (not with --smoke)")
    ap.add_argument("--chunks", default="auto", help="comma-separated chunk lengths to time our kernels with "
                    "(auto: the launchers' choice; 16, 32, 64), crossed with --dots and --warps")
    ap.add_argument("--profile", default="", metavar="T[,T...]", help="also list each kernel's device time at "
                    "these lengths, over one forward (every kernel) and one forward+backward step (the 10 longest)")
    ap.add_argument("--recompute", action="store_true", help="also time each variant of our kernels with "
                    "recompute=True (the chunk states formed again in the backward, only the inputs kept)")
    ap.add_argument("--compiled", action="store_true", help="also time the zoo's per-token loop of each model "
                    "compiled with nlcompile.compile(target='triton')")
    ap.add_argument("--fla-unchecked", action="store_true", help="also time fla's Gated DeltaNet with its "
                    "refusal of the backward on Triton < 3.7.1 on Hopper turned off (timing only: fla says its "
                    "gradients are wrong there; the row's gradients' error shows it)")
    ap.add_argument("--render", metavar="JSON", help="only print the table of rows saved by --json (e.g. by a run "
                    "cut short by a time limit)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        print(table(saved["rows"], saved["device"]))
        return 0
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape, lengths, repeats = dict(B=1, H=2, D=16), [40], 1
    else:
        if not torch.cuda.is_available():
            print("bench_triton.py needs a CUDA GPU (the Triton interpreter on the CPU is for tests; "
                  "use --smoke under TRITON_INTERPRET=1 to check the script)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shape, lengths, repeats = dict(B=8, H=16, D=args.dim), [int(t) for t in args.lengths.split(",")], 10
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU (Triton interpreter: {os.environ.get('TRITON_INTERPRET', '0')})"
    device_name += f"; B={shape['B']} H={shape['H']} D={shape['D']}, {args.dtype} q, k, v" \
                   f"; torch {torch.__version__}, triton {triton.__version__}"
    models = args.models.split(",")
    unknown = set(models) - {"DeltaNet", "GatedDeltaNet"}
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from DeltaNet, GatedDeltaNet")
    def save(rows: list[dict]) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name, "rows": rows}, f, indent=1)

    rows = measure(models, lengths, shape["B"], shape["H"], shape["D"], device,
                   DTYPES[args.dtype], repeats, args.dots.split(","), args.warps.split(","), args.chunks.split(","),
                   [int(t) for t in args.profile.split(",") if t], on_row=save, compiled=args.compiled,
                   recompute=args.recompute, fla_unchecked=args.fla_unchecked)
    print(table(rows, device_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
