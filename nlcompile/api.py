"""Public entry points: ``compile`` and ``explain``."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from nlcompile.capture import Traceable, flatten_call
from nlcompile.compiler import Compiled, CompileOptions, compile_signature
from nlcompile.report import Report, build_report
from nlcompile.targets.registry import get_target


class CompiledFunction:
    """A compiled model or function: same call signature and outputs as the original.

    Compiles on the first call for each input signature (rank, dtype, device and
    sizes apart from the time axis, the non-tensor arguments, and autocast's state on those
    devices: a program traced under autocast holds its casts); a later call
    with another T reuses the program.  ``captures`` counts compilations.
    """

    def __init__(self, model_or_fn: Callable, options: CompileOptions):
        self._traceable = Traceable(model_or_fn)
        self._options = options
        self._target = get_target(options.target)
        self._entries: list[tuple[tuple, Compiled]] = []
        self.captures = 0
        if isinstance(model_or_fn, torch.nn.Module):
            self.__wrapped__ = model_or_fn
        else:
            functools.update_wrapper(self, model_or_fn)

    # -- signature handling -------------------------------------------------
    @staticmethod
    def _describe(t: torch.Tensor, skip: Sequence[int] = ()) -> tuple:
        shape = tuple(-1 if d in skip else s for d, s in enumerate(t.shape))
        return (t.dim(), t.dtype, t.device.type, shape)

    def _module_key(self) -> tuple:
        """Parameters' and buffers' names, shapes, dtypes, devices, and train/eval
        modes: a compiled program is only valid for the module state it was traced in."""
        target = self._traceable.target
        if not isinstance(target, torch.nn.Module):
            return ()
        tensors = tuple((n, self._describe(t)) for n, t in self._traceable.named_tensors())
        return tensors, tuple(m.training for m in target.modules())

    @staticmethod
    def _autocast_key(devices) -> tuple:
        """Autocast's state (on, dtype) on ``devices`` (device types)."""
        return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(set(devices))
                     if torch.amp.is_autocast_available(d))

    def _outer_key(self, tensors, layout_key) -> tuple:
        module = self._module_key()   # its parameters' descriptions hold their device types
        devices = [t.device.type for t in tensors] + [desc[2] for _, desc in (module[0] if module else ())]
        return layout_key, module, self._autocast_key(devices)

    def _find(self, tensors, layout_key):
        outer = self._outer_key(tensors, layout_key)
        for key, compiled in self._entries:
            if key[0] != outer or len(key[1]) != len(tensors):
                continue
            skips = {i: [] for i in range(len(tensors))}
            for i, d in compiled.time_axis:
                skips[i].append(d)
            if all(self._describe(t, skips[i]) == key[1][i] for i, t in enumerate(tensors)):
                return compiled
        return None

    def _check_time_lengths(self, compiled: Compiled, tensors, names) -> None:
        sizes = {(i, d): tensors[i].shape[d] for i, d in compiled.time_axis}
        if len(set(sizes.values())) > 1:
            parts = ", ".join(f"{names[i]} dim {d} = {n}" for (i, d), n in sizes.items())
            raise ValueError(f"nlcompile: the time axis has different lengths across inputs ({parts}); "
                             "all inputs must cover the same steps")

    def compiled_for(self, *args, **kwargs) -> Compiled:
        """The ``Compiled`` entry serving this call (compiling it if needed)."""
        return self._entry(args, kwargs, *flatten_call(args, kwargs))

    def _entry(self, args, kwargs, tensors, layout) -> Compiled:
        found = self._find(tensors, layout.key())
        if found is not None:
            return found
        params = [t for _, t in self._traceable.named_tensors()]
        names = [n for n, _ in self._traceable.named_tensors()]
        compiled = compile_signature(self._traceable, layout, params, tensors, names, self._target, self._options)
        compiled.input_names = _input_names(self._traceable.target, args, kwargs)
        compiled.output = self._traceable.output
        self.captures += 1
        skips = {i: [d for j, d in compiled.time_axis if j == i] for i in range(len(tensors))}
        described = tuple(self._describe(t, skips[i]) for i, t in enumerate(tensors))
        key = (self._outer_key(tensors, layout.key()), described)
        self._entries.append((key, compiled))
        return compiled

    def __call__(self, *args, **kwargs):
        tensors, layout = flatten_call(args, kwargs)
        compiled = self._entry(args, kwargs, tensors, layout)
        if compiled.run is None:
            return self._traceable.target(*args, **kwargs)
        self._check_time_lengths(compiled, tensors, compiled.input_names)
        params = [t for _, t in self._traceable.named_tensors()]
        # the program was traced on contiguous probes (its reshapes may be views); inputs
        # it writes into (``state.mul_()``) are passed as they are, so the write lands
        inputs = [*params, *tensors]
        inputs = [t if i in compiled.written_inputs else t.contiguous() for i, t in enumerate(inputs)]
        flat = compiled.run(*inputs)
        flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        return compiled.output.unflatten(flat)

    def explain(self, *args, **kwargs) -> Report:
        """What was found and chosen for calls shaped like these arguments."""
        return build_report(self.compiled_for(*args, **kwargs), self._options)


def _input_names(target: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Readable names of the flat tensor inputs (``q``, ``kwargs['initial_state']``...)."""
    fn = target.forward if isinstance(target, torch.nn.Module) else target
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        top, *rest = path[1:] if path else (None,)
        if path[0].idx == 0:
            base = params[top.idx] if top.idx < len(params) else f"arg{top.idx}"
        else:
            base = str(top.key)
        names.append(base + "".join(str(p) for p in rest))
    return names


def compile(model_or_fn: Callable, *, target: str = "torch", example_inputs: Sequence | None = None,
            chunk_size: int | None = None, relax: Sequence[str] = (), recompute: bool = False) -> CompiledFunction:
    """Compile the update loops of ``model_or_fn`` into exact chunkwise programs.

    Returns a callable with the same signature and output structure.  It
    compiles on the first call (or now, when ``example_inputs`` is given) and
    caches per input signature; the time axis may change length freely.
    ``relax`` names opt-in relaxations (none exist yet: any name is rejected).
    ``recompute=True`` trades time for training memory: each chunkwise scan's backward
    recomputes its intermediates (per-chunk states and the like, several times the size of the
    keys) from the scan's inputs instead of keeping them from the forward, as
    flash-linear-attention's kernels do; same gradients (``loop_ops.ChunkwiseLoop``); a loop
    left sequential (no chunkwise form) runs under activation checkpointing.
    """
    if relax:
        raise ValueError(f"unknown relaxation(s) {list(relax)}; none are available yet")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be True or False, got {recompute!r}")
    compiled = CompiledFunction(model_or_fn, CompileOptions(target, chunk_size, tuple(relax), recompute))
    if example_inputs is not None:
        compiled.compiled_for(*example_inputs)
    return compiled


def explain(model_or_fn: Callable, *example_inputs, target: str = "torch", **example_kwargs) -> Report:
    """Report the update loops found in ``model_or_fn`` for these example inputs."""
    fn = model_or_fn if isinstance(model_or_fn, CompiledFunction) else compile(model_or_fn, target=target)
    return fn.explain(*example_inputs, **example_kwargs)
