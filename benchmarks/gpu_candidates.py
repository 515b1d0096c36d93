"""Every autotuning candidate of our chunk kernels, one at a time, checked against the fp32 reference (GPU).

    .venv/bin/python benchmarks/gpu_candidates.py                          # needs a CUDA GPU
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu_candidates.py --smoke   # tiny shapes on the CPU

On CUDA the autotuner (``targets/triton/tuning.py``) may pick any candidate of a kernel's space for some
shape, and a candidate that the GPU's Triton compiles wrong would then give wrong outputs or gradients
without a word: fla documents Hopper miscompiles of its analogues of our backward kernels (a transposed
tensor-core result fed to another product before Triton 3.7.1, a pattern ours avoid since
``common.transposed``; 4 warps at 64-row chunks).  The tests run
the untuned launch, and the benchmark checks only what the tuner chose at its shape.  This runs DeltaNet
and Gated DeltaNet at the benchmark's configuration (bf16 inputs and dots, head dim 128, chunk 64, fla's
[B, T, H, D] layout; B=2, H=4, T=256: a multiple of 16 as the benchmark's T, which Triton specialises
on) untuned, tuned, and with one kernel at a time forced to each of its candidates (the others at their
untuned launch), and prints the output's and the gradients' max errors against the torch target's fp32
scan (``bench_triton.reference``), each verdict as it comes on stderr.  A row over 10x the untuned
launch's error (and over 1e-2), or not finite, is marked WRONG, and one that faults (an illegal address)
FAULT (a fault loses the CUDA context, so the rows after it fault too: the first one names the
candidate); either makes the exit status 1.  A candidate that does not fit the GPU or compile is listed as not
run (the autotuner drops those).  ``--smoke`` runs tiny shapes under TRITON_INTERPRET=1 to check the
script (the interpreter ignores warps and stages, so there one candidate per value block).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_triton import (far, fixed_cotangent, grad_error, kernel_knobs, make_inputs, ours_in_place,  # noqa: E402
                          reference, rel_err)

MODELS = ("DeltaNet", "GatedDeltaNet")
KERNELS = dict(forward=("WY_INVERSE", "PREPARE", "STATES", "OUTPUT"),
               backward=("READOUT_DV", "STATES_BWD", "GRADS", "WY_GRADS"))


def _dropped() -> tuple[type, ...]:
    """The errors Triton's autotuner drops a candidate for (``Autotuner._bench``)."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    return OutOfResources, PTXASError, CompileTimeAssertionFailure


DROPPED = _dropped()


def candidates(kernel, dv: int, prec: str, interpreted: bool) -> list:
    """``kernel``'s autotuning candidates at value dim ``dv`` and dot precision ``prec``; in the
    interpreter, which ignores warps and stages, one per value block."""
    configs = kernel.candidates(dv, prec)
    if interpreted:
        configs = list({tuple(sorted(c.kwargs.items())): c for c in configs}.values())
    return configs


@contextlib.contextmanager
def forced(module, name: str, config):
    """``module.name`` (a ``tuning.ChunkKernel``) launched through the tuned path over ``config`` alone (the
    autotuner runs a single candidate without timing it), whatever ``NLCOMPILE_TRITON_TUNE`` says."""
    from nlcompile.targets.triton import tuning

    class Forced(tuning.ChunkKernel):
        def launch(self, *args, **kwargs):
            enabled = tuning.tuning_enabled
            tuning.tuning_enabled = lambda device: True
            try:
                super().launch(*args, **kwargs)
            finally:
                tuning.tuning_enabled = enabled

    kernel = getattr(module, name)
    space = tuning.Space(value_blocks=(config.kwargs["BV"],) if "BV" in config.kwargs else (),
                         warps=(config.num_warps,), stages=(config.num_stages,), maxnreg=kernel.space.maxnreg)
    setattr(module, name, Forced(kernel.fn, space, restore=kernel.restore))
    try:
        yield
    finally:
        setattr(module, name, kernel)


def errors(x: dict, cotangent: torch.Tensor, want: torch.Tensor, want_grads: dict) -> tuple[float, float]:
    """(output error, gradients' error) of our kernels on ``x`` against the reference."""
    with torch.no_grad():
        err = rel_err(ours_in_place(x), want)
    return err, grad_error(ours_in_place, x, cotangent, want_grads)


def check(models, B: int, H: int, T: int, D: int, device: torch.device) -> list[dict]:
    """One row per (model, kernel, candidate), and per model one for the untuned and one for the tuned
    launch (run with ``NLCOMPILE_TRITON_TUNE=0``: every kernel but the forced one untuned).  A
    candidate that does not compile or launch (the autotuner drops those) is a row with its error."""
    from nlcompile.targets.triton import backward, forward
    from nlcompile.targets.triton.common import dot_precision
    from nlcompile.targets.triton_target import interpreting

    prec = dot_precision(torch.empty(0, dtype=torch.bfloat16), None)
    kernels = [(module, name) for module in (forward, backward)
               for name in KERNELS[module.__name__.rsplit(".", 1)[1]]]
    rows = []

    def add(row: dict) -> None:   # each verdict printed as it comes: a run cut short still says what it saw
        rows.append(row)
        verdict = verdict_of(row, rows)
        errs = f" {row['err']:.1e} / {row['grad_err']:.1e}" if "err" in row else ""
        print(f"  {row['model']} {row['kernel']} {row['config']}:{errs} {verdict}", file=sys.stderr, flush=True)

    for model in models:
        x = make_inputs(model, B, H, T, D, device, torch.bfloat16)
        cotangent = fixed_cotangent(B, T, H, D, device)
        want, want_grads = reference(x, cotangent)
        # the untuned launch, then the tuned one (on CUDA: every candidate compiled on a thread pool, so
        # that the forced ones below find them compiled)
        for launch, tune in (("(untuned launch)", "0"), ("(tuned launch)", "1")):
            with kernel_knobs({"NLCOMPILE_TRITON_TUNE": tune}):
                err, grad_err = errors(x, cotangent, want, want_grads)
            add(dict(model=model, kernel=launch, config="-", err=err, grad_err=grad_err))
        for module, name in kernels:
            for config in candidates(getattr(module, name), D, prec, interpreting()):
                shown = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
                row = dict(model=model, kernel=getattr(module, name).name,
                           config=f"{shown} warps={config.num_warps} stages={config.num_stages}".strip())
                try:
                    with forced(module, name, config):
                        row["err"], row["grad_err"] = errors(x, cotangent, want, want_grads)
                except DROPPED as e:   # what the autotuner drops (it times them as infinitely slow)
                    row["note"] = f"not run ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                except Exception as e:  # noqa: BLE001 -- a fault (an illegal address...) is a wrong candidate
                    row["fault"] = f"FAULT ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                add(row)
    return rows


def wrong(rows: list[dict]) -> list[dict]:
    """Rows that faulted, or whose output or gradients' error is ``far`` from the untuned launch's for
    the same model."""
    base = {r["model"]: r for r in rows if r["kernel"] == "(untuned launch)"}
    return [r for r in rows if "fault" in r or "err" in r
            and any(far(r[key], base[r["model"]][key]) for key in ("err", "grad_err"))]


def verdict_of(row: dict, rows: list[dict]) -> str:
    """ok, WRONG, the fault, or why it did not run."""
    if "err" not in row:
        return row.get("fault") or row["note"]
    return "WRONG" if any(r is row for r in wrong(rows)) else "ok"


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}", "", "| model | kernel | candidate | output error | gradients' error | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        errs = f"{r['err']:.1e} | {r['grad_err']:.1e}" if "err" in r else "- | -"
        lines.append(f"| {r['model']} | {r['kernel']} | {r['config']} | {errs} | {verdict_of(r, rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU interpreter ok)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: DeltaNet, GatedDeltaNet")
    args = ap.parse_args(argv)
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape = dict(B=1, H=2, T=70, D=64)
    elif not torch.cuda.is_available():
        print("gpu_candidates.py needs a CUDA GPU (--smoke under TRITON_INTERPRET=1 checks the script)",
              file=sys.stderr)
        return 2
    else:
        device, shape = torch.device("cuda"), dict(B=2, H=4, T=256, D=128)
    models = args.models.split(",")
    if set(models) - set(MODELS):
        ap.error(f"--models: unknown {sorted(set(models) - set(MODELS))}; choose from {', '.join(MODELS)}")
    with kernel_knobs({"NLCOMPILE_TRITON_TUNE": "0"}):   # every kernel but the forced one at its untuned launch
        rows = check(models, device=device, **shape)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(table(rows, f"{name}; B={shape['B']} H={shape['H']} T={shape['T']} D={shape['D']}, bf16"))
    return 1 if wrong(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
