"""The CUDA launch path of the chunk kernels: autotuning (``targets/triton/tuning.py``).

Without a GPU the tuned path runs in Triton's interpreter with a CPU stand-in for the timing
(``do_bench``), so what it can get wrong is checked here: the grids as functions of the tuned
value block, and the kernels that update a buffer in place (the autotuner runs each candidate on
the real arguments, so those must be restored between runs, or the answer is computed from the
previous candidate's output).  The fake timings let a different candidate win in each run.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from _draws import Draws
from nlcompile.targets.triton import backward, forward, tuning
from nlcompile.targets.triton.backward import chunk_backward
from nlcompile.targets.triton.common import kernel_blocks
from nlcompile.targets.triton.forward import chunk_forward
from test_triton_backward import (
    KINDS, assert_grads_close, chunk_intermediates, make_inputs, reference_grads,
)


def _cpu_tuned(kernel: tuning.ChunkKernel, winner: int) -> tuning.ChunkKernel:
    """``kernel`` with an autotuner that times on the CPU and makes its ``winner``-th timed
    candidate the fastest (the first one where there are fewer)."""
    counter = itertools.count()

    def fake_bench(call, quantiles=None):
        call()
        i = next(counter)
        t = 1.0 if i == winner else 2.0 + i
        return [t, t, t]

    return tuning.ChunkKernel(kernel.fn, kernel.space, restore=kernel.restore, do_bench=fake_bench)


@pytest.fixture(params=[0, 1, 5])
def tuned_on_cpu(request, monkeypatch):
    """Force the tuned path; the candidate that wins is the fixture's parameter."""
    monkeypatch.setattr(tuning, "tuning_enabled", lambda device: True)
    for module, names in ((forward, ("WY_INVERSE", "PREPARE", "STATES", "OUTPUT")),
                          (backward, ("READOUT_DV", "STATES_BWD", "GRADS", "WY_GRADS"))):
        for name in names:
            monkeypatch.setattr(module, name, _cpu_tuned(getattr(module, name), request.param))
    return request.param


@pytest.mark.parametrize("kind", KINDS)
def test_tuned_launches_match_the_reference(kind, tuned_on_cpu):
    """Forward outputs and backward gradients through the tuned launch path equal the float64
    chunk formulas, whichever candidate won (dv = 40: every BV candidate leaves a partial block)."""
    T, C, dk, dv = 37, 16, 16, 40
    x = make_inputs(kind, T, dk, dv)
    o, h_final, H, Vp, W, Tm = chunk_forward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], C, False)
    ref_o, ref_final, ref_H, *_ = chunk_intermediates(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], C, False)
    for got, ref in ((o, ref_o), (h_final, ref_final), (H, ref_H)):
        assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    gen = Draws(3)
    do, dh_final = gen.randn(2, T, dv), gen.randn(2, dk, dv)
    got = chunk_backward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], H, Vp, W, Tm, do, dh_final, C, False)
    assert_grads_close(got, reference_grads(x, do, dh_final, False), tol=1e-4)
    assert forward.STATES.chosen() and backward.GRADS.chosen()  # the tuned path ran


@pytest.mark.parametrize("kind", ["additive", "delta"])
def test_tuning_leaves_the_callers_tensors_alone(kind, tuned_on_cpu):
    """The autotuner restores in-place buffers with copy_ between candidates: never a caller's
    tensor (v is the states kernel's source without beta; k was the stand-in for an absent dg),
    or its autograd version changes and backward through other users of it fails."""
    T, C, dk, dv = 37, 16, 16, 40
    x = make_inputs(kind, T, dk, dv)
    given = {name: t for name, t in x.items() if t is not None}
    versions = {name: t._version for name, t in given.items()}
    o, h_final, H, Vp, W, Tm = chunk_forward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], C, False)
    do, dh_final = torch.ones_like(o), torch.ones_like(h_final)
    chunk_backward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], H, Vp, W, Tm, do, dh_final, C, False)
    assert {name: t._version for name, t in given.items()} == versions
    assert do._version == dh_final._version == 0


def test_candidates_are_compiled_once_per_new_key(tuned_on_cpu, monkeypatch):
    """Before the autotuner times a new key, its candidates are handed to the parallel compile,
    once: ``tuning_key`` is the autotuner's own key (a second identical call finds it cached)."""
    calls = []

    def record(self, args, meta, configs, device):
        calls.append((self.name, self.tuning_key(args, meta)))
        return 0

    monkeypatch.setattr(tuning.ChunkKernel, "_precompile", record)
    x = make_inputs("gated_delta", 37, 16, 40)
    for _ in range(2):
        chunk_forward(x["k"], x["v"], x["q"], x["beta"], x["g"], x["h0"], 16, False)
    assert [name for name, _ in calls] == ["_wy_inverse_kernel", "_prepare_kernel", "_states_kernel", "_output_kernel"]
    for kernel, (_, key) in zip((forward.WY_INVERSE, forward.PREPARE, forward.STATES, forward.OUTPUT), calls):
        assert key in kernel.tuned.cache


def test_a_tuned_key_is_launched_with_its_choice_directly(tuned_on_cpu, monkeypatch):
    """Once a key is tuned, later launches with it call the kernel with the autotuner's choice for
    that key and skip the autotuner (its lookup builds a key from every argument: 30% of a
    forward's host time): the same outputs bit for bit.  Whatever is in the autotuner's key sends
    a launch through it again: a head dim (positional), the sequence count N (positional), a
    constexpr the caller passes (the readout's BEFORE: the output kernel's alone), a dtype (beta's)."""
    kernels = (forward.WY_INVERSE, forward.PREPARE, forward.STATES, forward.OUTPUT)
    names = [k.name for k in kernels]
    tuner_runs, direct = [], []
    for kernel in kernels:
        monkeypatch.setattr(kernel.tuned, "run", lambda *a, _run=kernel.tuned.run, _k=kernel, **kw:
                            tuner_runs.append(_k.name) or _run(*a, **kw))
        monkeypatch.setattr(kernel.fn, "run", lambda *a, _run=kernel.fn.run, _k=kernel, **kw:
                            direct.append((_k, a, kw)) or _run(*a, **kw))

    def call(dv: int = 40, sequences: int = 2, before: bool = False, beta_dtype=torch.float32) -> tuple:
        x = make_inputs("gated_delta", 37, 16, dv)
        x = {n: None if t is None else t[:sequences] for n, t in x.items()}
        tuner_runs.clear()
        direct.clear()
        return chunk_forward(x["k"], x["v"], x["q"], x["beta"].to(beta_dtype), x["g"], x["h0"], 16, before)

    first = call()
    assert tuner_runs == names
    second = call()
    assert tuner_runs == [] and [k.name for k, _, _ in direct] == names
    for kernel, args, kwargs in direct:   # the choice of this very key, as the autotuner keeps it
        tuned = {"BV"} if kernel.space.value_blocks else set()
        meta = {n: x for n, x in kwargs.items() if n in kernel.fn.arg_names and n not in tuned}
        chosen = kernel.tuned.cache[kernel.tuning_key(args, meta)].all_kwargs()
        assert chosen.items() <= kwargs.items()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    call(dv=24)
    assert tuner_runs == names[1:]   # the WY inverse takes no dv: its key is the same
    call(sequences=1)
    assert tuner_runs == names
    call(before=True)
    assert tuner_runs == ["_output_kernel"]
    call(beta_dtype=torch.bfloat16)
    assert tuner_runs == names[:2]   # beta is read by the WY inverse and prepare kernels only


def test_compile_in_parallel_counts_and_survives_failures():
    seen, configs = [], tuning.Space(value_blocks=(16, 32, 64), warps=(4, 8), stages=(2,)).configs()

    def compile_one(config):
        seen.append((config.kwargs["BV"], config.num_warps))
        if config.kwargs["BV"] == 64:
            raise RuntimeError("does not compile")

    assert tuning.compile_in_parallel(compile_one, configs, workers=2) == 4   # 6 candidates, 2 fail
    assert sorted(seen) == sorted((c.kwargs["BV"], c.num_warps) for c in configs)
    assert tuning.compile_in_parallel(compile_one, []) == 0


def test_space_and_clipping():
    space = tuning.Space(value_blocks=(32, 64), warps=(4, 8), stages=(1, 2, 3), maxnreg=255)
    configs = space.configs()
    assert len(configs) == 12 and {c.maxnreg for c in configs} == {255}
    assert {(c.kwargs["BV"], c.num_warps, c.num_stages) for c in configs} == set(
        itertools.product((32, 64), (4, 8), (1, 2, 3)))
    clipped = tuning._clip_value_blocks(configs, {"dv": 20})   # block(20) = 32: BV 64 -> 32, deduplicated
    assert len(clipped) == 6 and {c.kwargs["BV"] for c in clipped} == {32}
    assert len(tuning._clip_value_blocks(configs, {}, dv=128)) == 12
    assert tuning.Space().configs()[0].kwargs == {}               # BV passed by the caller
    # the kind of scan (gate, readout, precision...) is in the key: a launch tuned for one kind is
    # not reused for another; the tuned BV is not
    assert {"N", "dk", "dv", "C", "GATE", "HAS_BETA", "PREC"} <= set(forward.STATES.tuned.keys)
    assert "BV" not in forward.STATES.tuned.keys and "BV" in forward.PREPARE.tuned.keys


def test_untuned_warps(monkeypatch):
    """The untuned launch's warps: the device's (``Blocks.num_warps``), or a kernel's own where its
    space fixes them (the WY inverse's [16, 16] tiles: one warp), both overridden by a forced
    ``NLCOMPILE_TRITON_WARPS``."""
    monkeypatch.delenv("NLCOMPILE_TRITON_WARPS", raising=False)
    blocks = kernel_blocks("cuda", 128, 128, 64, "bf16")
    assert blocks.num_warps == 8
    assert forward.WY_INVERSE.untuned_warps(blocks) == 1 and forward.STATES.untuned_warps(blocks) == 8
    monkeypatch.setenv("NLCOMPILE_TRITON_WARPS", "2")
    assert forward.WY_INVERSE.untuned_warps(blocks) == 2 == forward.STATES.untuned_warps(blocks)


def test_when_tuning_applies(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for name in ("TRITON_INTERPRET", "NLCOMPILE_TRITON_TUNE", "NLCOMPILE_TRITON_WARPS"):  # gpu_check.sh sets TUNE=0
        monkeypatch.delenv(name, raising=False)
    assert tuning.tuning_enabled(cuda) and not tuning.tuning_enabled(cpu)
    monkeypatch.setenv("NLCOMPILE_TRITON_TUNE", "0")
    assert not tuning.tuning_enabled(cuda)
    monkeypatch.setenv("NLCOMPILE_TRITON_TUNE", "2")
    with pytest.raises(ValueError, match="NLCOMPILE_TRITON_TUNE"):
        tuning.tuning_enabled(cuda)
    monkeypatch.delenv("NLCOMPILE_TRITON_TUNE")
    monkeypatch.setenv("NLCOMPILE_TRITON_WARPS", "4")     # a measuring knob fixes the launch
    assert not tuning.tuning_enabled(cuda)
    monkeypatch.delenv("NLCOMPILE_TRITON_WARPS")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not tuning.tuning_enabled(cuda)


def test_a_tuning_on_disk_skips_compiling_every_candidate(monkeypatch):
    """A key whose tuning Triton's disk cache holds (carried by gpu_check.sh) is not precompiled:
    the autotuner's own lookup is asked, with a benchmark that stops it on a miss before it writes
    its cache file."""
    class Autotuner:   # the part of triton's Autotuner the lookup uses
        cache_results, configs, written = True, tuning.Space(value_blocks=(32, 64)).configs(), []

        def __init__(self, on_disk):
            self.on_disk = on_disk

        def check_disk_cache(self, key, configs, bench_fn):
            if self.on_disk:
                return True
            bench_fn()
            self.written.append(key)   # what triton does after benchmarking

    kernel = forward.STATES
    for on_disk in (True, False):
        monkeypatch.setattr(kernel, "tuned", Autotuner(on_disk))
        configs = tuning._clip_value_blocks(Autotuner.configs, {}, dv=128, PREC="bf16")
        assert kernel._tuned_on_disk(("key",), configs) is on_disk
    assert Autotuner.written == []


def test_faulting_candidates_are_pruned():
    """BV = 32 with one pipeline stage under bf16 dots faulted on an H100 (Triton 3.6, the states
    kernel at chunk 64): never timed with bf16 dots, still a candidate otherwise; BV clipped to dv."""
    configs = tuning.Space(value_blocks=(32, 64), stages=(1, 2)).configs()

    def kept(**args):
        return {(c.kwargs["BV"], c.num_warps, c.num_stages) for c in tuning._clip_value_blocks(configs, args)}

    assert not any(bv == 32 and s == 1 for bv, _, s in kept(dv=128, PREC="bf16"))
    assert (32, 4, 1) in kept(dv=128, PREC="tf32") and (64, 4, 1) in kept(dv=128, PREC="bf16")
    assert {bv for bv, _, _ in kept(dv=20, PREC="tf32")} == {32}
