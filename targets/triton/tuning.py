"""How the chunk kernels are launched: autotuned on CUDA, one fixed configuration otherwise.

The best value block BV, warps and pipeline stages of a kernel depend on the device, the Triton
version and the problem: the sequential kernels (states, states_bwd) run one program per
sequence and value block for the whole sequence, so their time is set by how many of those
programs are resident at once (registers and shared memory per program against N * dv / BV
programs), which static analysis can bound but not rank.  So on CUDA every kernel is wrapped in
``triton.autotune`` over a small space (``Space``), keyed on N (the sequences), the kernel's
constexprs (head count and dims, chunk, gate, readout, dot precision...) and the tensors' dtypes: the first launch
with a new key compiles and times each candidate (seconds; candidates that do not fit the device
are dropped by Triton), later launches reuse the choice (launched directly, without the
autotuner's per-launch lookup: ``ChunkKernel._plan``), and so do later processes (Triton's disk
cache).  The chunk length is not tuned here: it fixes the layout of the buffers the kernels pass
each other.

The fixed configuration (``common.kernel_blocks``) is used on the CPU interpreter, and on CUDA
when ``NLCOMPILE_TRITON_TUNE=0`` or a forced ``NLCOMPILE_TRITON_WARPS`` asks for it (measuring).
``NLCOMPILE_VERBOSE=1`` prints each tuning result to stderr.  The candidates of a new key are
compiled on a thread pool first (``compile_in_parallel``), then timed.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from nlcompile import knobs
from nlcompile.targets.triton_target import interpreting

from .common import Blocks, block

TUNING_KEY = ["N"]   # the runtime argument the best launch depends on; the rest of the key is the constexprs
# Tuning results kept in Triton's cache directory, so a new process does not time the candidates
# again (keyed there on the kernel's source, the GPU architecture and the tuning key); Triton
# versions without the option tune once per process.
_DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@dataclass(frozen=True)
class Space:
    """Candidate launch parameters of one kernel on CUDA (the cross product of the three)."""

    value_blocks: tuple[int, ...] = ()   # BV candidates; () when the caller passes BV itself
    warps: tuple[int, ...] = (4, 8)
    stages: tuple[int, ...] = (2, 3)
    maxnreg: Optional[int] = None        # register cap on CUDA, tuned or not
    fixed_warps: Optional[int] = None    # warps of the untuned launch (None: ``Blocks.num_warps``)

    def configs(self) -> list[triton.Config]:
        return [triton.Config({} if bv is None else {"BV": bv}, num_warps=w, num_stages=s, maxnreg=self.maxnreg)
                for bv in (self.value_blocks or (None,)) for w in self.warps for s in self.stages]


def _clip_value_blocks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Candidates with BV at most the value dim's block (wider ones would only compute padding), deduplicated
    (a kernel without value blocks, such as the WY inverse, takes no dv: its candidates as they are).

    Dropped: BV = 32 with one pipeline stage under bf16 dots: on an H100 (Triton 3.6) the forward
    states kernel at chunk 64 faulted with an illegal address in exactly those two candidates
    (4 and 8 warps; every other candidate and the fixed launch ran and gave finite outputs)."""
    args = {**named_args, **kwargs}
    kept: dict[tuple, triton.Config] = {}
    for c in configs:
        kw = {name: (min(x, block(args["dv"])) if name == "BV" else x) for name, x in c.kwargs.items()}
        if kw.get("BV") == 32 and c.num_stages == 1 and str(args.get("PREC", "")).startswith("bf16"):
            continue
        kept.setdefault((tuple(sorted(kw.items())), c.num_warps, c.num_stages),
                        triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg))
    return list(kept.values())


def _constexpr_args(fn: triton.JITFunction) -> list[str]:
    """The kernel's tl.constexpr parameters (the kind of scan: gate, readout, precision...; the head
    count and head dims), which belong in the tuning key: one kernel, specialised differently, can
    want another launch."""
    params = inspect.signature(fn.fn).parameters.values()
    return [p.name for p in params
            if p.annotation is tl.constexpr or str(p.annotation).split(".")[-1] == "constexpr"]


def tuning_enabled(device: torch.device) -> bool:
    """Autotune on CUDA (compiled kernels), unless switched off or a measuring knob fixes the warps."""
    return (device.type == "cuda" and not interpreting()
            and knobs.triton_tune() and knobs.triton_warps() is None)


def describe(config: triton.Config) -> str:
    tuned = "".join(f"{name}={x} " for name, x in config.kwargs.items())
    return f"{tuned}warps={config.num_warps} stages={config.num_stages}"


class ChunkKernel:
    """A chunk kernel with its CUDA tuning space; ``launch`` picks the tuned or the fixed path.

    ``restore`` names the arguments the kernel updates in place (read, then overwritten): the
    autotuner restores them between its timed runs with ``copy_``, so they must be the launcher's
    own buffers, never a caller's tensor (its autograd version would change).  ``do_bench`` replaces Triton's timing (tests;
    its results are not written to the disk cache).
    """

    def __init__(self, fn: triton.JITFunction, space: Space, restore: tuple[str, ...] = (),
                 do_bench: Optional[Callable] = None):
        self.fn, self.space, self.restore = fn, space, restore
        tuned_here = {"BV"} if space.value_blocks else set()
        key = TUNING_KEY + [name for name in _constexpr_args(fn) if name not in tuned_here]
        self.tuned = triton.autotune(space.configs(), key=key, restore_value=list(restore),
                                     prune_configs_by={"early_config_prune": _clip_value_blocks},
                                     do_bench=do_bench, **({} if do_bench else _DISK_CACHE))(fn)
        # where the key's runtime values sit among the positional arguments (N, the head count and
        # dims): ``_plan``
        self._key_positions = tuple(i for i, name in enumerate(fn.arg_names) if name in key)
        self._chosen: dict[tuple, dict] = {}   # ``_plan`` -> the tuned launch's keyword arguments

    @property
    def name(self) -> str:
        return self.fn.__name__

    def launch(self, grid: Callable[[dict], tuple], args: tuple, meta: dict, blocks: Blocks,
               device: torch.device) -> None:
        """Run on ``grid`` (a function of the meta-parameters, BV among them): ``args`` positional,
        ``meta`` the constexprs the caller fixes (BV too when the space does not tune it)."""
        if tuning_enabled(device):
            plan = self._plan(args, meta)
            chosen = self._chosen.get(plan)
            if chosen is None:   # this key's first launch in this process: through the autotuner
                self._through_autotuner(grid, args, meta, device)
                self._chosen[plan] = self.tuned.best_config.all_kwargs()
            else:
                self.fn.run(*args, grid=grid, warmup=False, **meta, **chosen)
            return
        fixed = dict(num_warps=self.untuned_warps(blocks),
                     maxnreg=self.space.maxnreg if device.type == "cuda" else None)
        if self.space.value_blocks:
            fixed["BV"] = blocks.BV
        self.fn[grid({**meta, **fixed})](*args, **meta, **fixed)

    def _plan(self, args: tuple, meta: dict) -> tuple:
        """What the tuning key depends on, cheaply: its runtime values among ``args``, the caller's
        constexprs, the tensors' dtypes.  Once a key is tuned the kernel is launched with its choice
        directly, not through the autotuner, whose lookup builds its key from every argument on every
        launch: with ``tuning_key`` beside it that was 30% of a forward's host time through Triton's
        launch path (``benchmarks/host_overhead.py --triton``, this project's 2-core CPU: DeltaNet /
        Gated DeltaNet forward 231-252 -> 159-171 us, forward+backward 857-925 -> 638-663 us)."""
        return (tuple([args[i] for i in self._key_positions if i < len(args)]), tuple(meta.items()),
                tuple([x.dtype for x in args if hasattr(x, "dtype")]))

    def _through_autotuner(self, grid: Callable[[dict], tuple], args: tuple, meta: dict,
                           device: torch.device) -> None:
        """Launch through the autotuner, which on a new key first compiles (``_precompile``) and
        times the candidates, or takes its choice from Triton's disk cache."""
        key = self.tuning_key(args, meta)
        if key in self.tuned.cache:
            self.tuned[grid](*args, **meta)
            return
        start = time.perf_counter()
        # the candidates the autotuner will consider for this key (its early prune, our own)
        configs = _clip_value_blocks(self.tuned.configs, dict(zip(self.fn.arg_names, args)), **meta)
        on_disk = self._tuned_on_disk(key, configs)
        compiled = 0 if on_disk else self._precompile(args, meta, configs, device)
        self.tuned[grid](*args, **meta)
        if knobs.verbose():
            how = "from Triton's disk cache" if on_disk else f"{compiled} candidates compiled in parallel"
            print(f"nlcompile: tuned {self.name} in {time.perf_counter() - start:.1f} s ({how}): "
                  f"{describe(self.tuned.best_config)}", file=sys.stderr)

    def untuned_warps(self, blocks: Blocks) -> int:
        """Warps of the untuned launch: the space's own where it fixes them (a kernel of [16, 16]
        tiles), unless ``NLCOMPILE_TRITON_WARPS`` forces them for every kernel; else the device's."""
        return knobs.triton_warps() or self.space.fixed_warps or blocks.num_warps

    def candidates(self, dv: int, prec: str) -> list[triton.Config]:
        """The configs the autotuner times at value dim ``dv`` and dot precision ``prec``: the space, BV
        clipped to dv's block, the candidates known to fault dropped (``_clip_value_blocks``)."""
        return _clip_value_blocks(self.space.configs(), dict(dv=dv, PREC=prec))

    def tuning_key(self, args: tuple, meta: dict) -> tuple:
        """The autotuner's cache key for these arguments (its key names' values, then every tensor's dtype)."""
        named = {**dict(zip(self.fn.arg_names, args)), **meta}
        return (tuple(named[name] for name in self.tuned.keys if name in named)
                + tuple(str(x.dtype) for x in named.values() if hasattr(x, "dtype")))

    def _tuned_on_disk(self, key: tuple, configs: list[triton.Config]) -> bool:
        """Whether Triton's disk cache holds this key's tuning (from an earlier run on this machine,
        or carried from one by benchmarks/gpu_check.sh): the autotuner then takes it and compiles
        only its choice, so compiling every candidate first would be wasted.  Asked through the
        autotuner's own lookup (which on a hit also records the choice), with a benchmark that
        stops it on a miss, before it writes anything; any other Triton answers False."""
        if not getattr(self.tuned, "cache_results", False) or len(configs) < 2:
            return False

        class Miss(Exception):
            pass

        def miss() -> None:
            raise Miss

        try:
            return bool(self.tuned.check_disk_cache(key, configs, miss))
        except Exception:   # Miss, or a Triton whose autotuner works otherwise
            return False

    def _precompile(self, args: tuple, meta: dict, configs: list[triton.Config], device: torch.device) -> int:
        """Compile this key's candidates on a thread pool before the autotuner times them (it
        compiles them one after another); returns how many compiled.  Not in the interpreter."""
        if interpreting():
            return 0

        def compile_one(config: triton.Config) -> None:
            with torch.cuda.device(device):   # the current device is per thread
                self.fn.warmup(*args, grid=(1,), **meta, **config.all_kwargs())

        return compile_in_parallel(compile_one, configs)

    def chosen(self) -> dict[tuple, str]:
        """The configuration tuned for each key so far (for the benchmark's record)."""
        return {key: describe(config) for key, config in self.tuned.cache.items()}


def compile_in_parallel(compile_one: Callable[[triton.Config], None], configs: list[triton.Config],
                        workers: Optional[int] = None) -> int:
    """Run ``compile_one`` for every candidate on a thread pool and return how many succeeded.

    Triton's compiler releases the GIL (measured here: 8 kernels compiled in 5.4 s one after
    another, 3.0 s on 2 threads), so on a GPU machine's many cores a first call's tuning is
    mostly the timing.  A candidate that fails is left to the autotuner, which compiles it again
    and drops or reports it as it would have."""
    def attempt(config: triton.Config) -> bool:
        try:
            compile_one(config)
            return True
        except Exception:
            return False

    if not configs:
        return 0
    first = attempt(configs[0])   # in this thread: sets up the kernel's per-device caches
    with ThreadPoolExecutor(max(1, min(len(configs) - 1, workers or os.cpu_count() or 1))) as pool:
        return first + sum(pool.map(attempt, configs[1:]))
