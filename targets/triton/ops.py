"""The Triton chunk kernels as ``torch.library`` custom ops, and the scan built on them.

``nlcompile::chunk_scan_v4`` (forward) and ``nlcompile::chunk_scan_backward_v3`` are
opaque to ``torch.compile`` / ``torch.export``: each has a fake (meta)
implementation giving output shapes, and the forward's autograd formula calls
the backward op, so a compiled graph keeps them as single nodes and Inductor
fuses the code around them (a plain eager call runs the ops' implementations without their
dispatch: ``_plain_eager``, ``_EagerScan``).  The version in
their names changes with their schemas: a graph that torch.compile cached (AOTAutograd's cache,
keyed on the traced graph, not on the schemas of the ops it calls) calls the ops as they were
when it was compiled, so a changed op takes a new name rather than meet an old cache entry (seen
here: v2 added the WY inverses to the forward's outputs, and a cached backward called the new op
with the old arguments; then ``recompute`` and ``compute_dtype``).

What the backward needs beyond the inputs (the states entering each chunk H, the corrected values
V', W and the WY inverses: at d = 128 about 4.5x the keys' size at chunk 64, H alone 2x; 6x and 4x
at chunk 32) is kept
from the forward, or with ``recompute`` formed again in the backward by the forward's WY-inverse,
prepare and states kernels (as flash-linear-attention does): then only the inputs are saved,
bit-identical gradients for one more pass of those kernels.

``triton_chunkwise_scan`` has the keyword API of ``targets.scan.chunkwise_scan`` (the loop modules
call either); it prepares the kernel inputs with ordinary, differentiable torch ops (gates to log
space; without beta the write coefficient folded into v, while the delta family's kernels scale v
themselves; log-gates floored at ``LOG_GATE_FLOOR``) and falls back to the exact PyTorch scan for
what the kernels do not cover: float64, gates (not log-gates) with zeros or negative values, a
per-key-channel gate with a delta rule in the gate-after order (``gate_first=False``; the kernels
implement the gate-first order of Kimi Delta Attention), head dims above 256.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from nlcompile import knobs
from nlcompile.targets.scan import Readout, chunkwise_scan, recomputing
from nlcompile.targets.triton.backward import chunk_backward
from nlcompile.targets.triton.common import (
    MAX_HEAD_DIM, block, cdiv, dot_precision, gradient_dtype, kernel_blocks, kernel_dtype, operand_dtype, sequences,
)
from nlcompile.targets.triton.forward import chunk_forward

_EMPTY = (0,)

# Log-gates are floored here before the kernels see them: a zero gate (log-gate -inf, a state
# reset) would make the kernels' in-chunk log-gate sums -inf and their differences NaN.  Floored,
# its factor is e^-40 (4e-18) instead of 0: the decayed state's term is lost in fp32's rounding
# unless that state is some 1e10 times what is written with it; the gradient there is 0, as
# eager's (e^g times anything) is.  A finite log-gate below the floor is such a factor already.
# Not so for gates given as such: a zero gate's gradient (d/da of a S is S) is not 0, so those
# still fall back.  The floor is small in magnitude because each floored step adds 40 to the
# in-chunk sums, whose differences then lose fp32 bits: with a quarter or half of the steps
# zero, outputs, states and gradients stayed within 4e-5 of float64's with the true zeros (at
# chunk 64; with a floor of -80 7.5e-5; test_zero_log_gates_run_in_the_kernels).  So no check of
# the log-gates on the host (a sync per call, and none can run while a CUDA graph is captured);
# NaN or +inf log-gates give NaN (eager: NaN or inf).
LOG_GATE_FLOOR = -40.0


@torch.library.custom_op("nlcompile::chunk_scan_v4", mutates_args=())
def chunk_scan(k: Tensor, v: Tensor, q: Optional[Tensor], beta: Optional[Tensor], g: Optional[Tensor],
               h0: Tensor, chunk: int, before: bool, coef: Optional[Tensor] = None,
               out_dtype: Optional[torch.dtype] = None, scale: float = 1.0, recompute: bool = False,
               compute_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, final state, states entering each chunk, corrected values, W, the chunks' WY inverses Tm);
    see ``forward.chunk_forward``.  Log-gates ``g`` as the kernels take them: finite (a caller of
    the op floors them, as ``triton_chunkwise_scan`` does at ``LOG_GATE_FLOOR``).  ``recompute``:
    the autograd formula saves only the inputs and forms the last four again in the backward (the
    forward computes the same either way)."""
    return chunk_forward(k, v, q, beta, g, h0, chunk, before, coef, out_dtype, scale, compute_dtype)


@chunk_scan.register_fake
def _(k, v, q, beta, g, h0, chunk, before, coef=None, out_dtype=None, scale=1.0, recompute=False, compute_dtype=None):
    n, t, _, prefix = sequences(k)
    dk, dv = k.shape[-1], v.shape[-1]
    nc = cdiv(t, chunk)
    f32 = dict(dtype=torch.float32, device=k.device)
    operands = dict(dtype=operand_dtype(dot_precision(k, q, compute_dtype=compute_dtype)), device=k.device)
    o = k.new_empty((*prefix, dv), dtype=out_dtype or torch.float32) if q is not None else k.new_empty(_EMPTY, **f32)
    delta = beta is not None

    def rows(width: int) -> Tensor:   # V', W, Tm: delta family only
        return k.new_empty((n, nc * chunk, width), **operands) if delta else k.new_empty(_EMPTY, **f32)

    return o, k.new_empty(n, dk, dv, **f32), k.new_empty(n, nc, dk, dv, **operands), rows(dv), rows(dk), rows(chunk)


@torch.library.custom_op("nlcompile::chunk_scan_backward_v3", mutates_args=())
def chunk_scan_backward(k: Tensor, v: Tensor, q: Optional[Tensor], beta: Optional[Tensor], g: Optional[Tensor],
                        h0: Tensor, states: Tensor, v_new: Tensor, w: Tensor, tm: Tensor, do: Optional[Tensor],
                        dh_final: Tensor, chunk: int, before: bool, coef: Optional[Tensor] = None,
                        scale: float = 1.0, compute_dtype: Optional[torch.dtype] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dk, dv, dq, dbeta, dg, dh0, dcoef); an absent input's gradient is an empty tensor
    (``backward.chunk_backward``: dk, dv, dq in ``common.gradient_dtype``, the others fp32)."""
    grads = chunk_backward(k, v, q, beta, g, h0, states, v_new, w, tm, do, dh_final, chunk, before, coef, scale,
                           compute_dtype)
    return tuple(k.new_empty(_EMPTY, dtype=torch.float32) if x is None else x for x in grads)


@chunk_scan_backward.register_fake
def _(k, v, q, beta, g, h0, states, v_new, w, tm, do, dh_final, chunk, before, coef=None, scale=1.0,
      compute_dtype=None):
    like = lambda x: k.new_empty(_EMPTY if x is None else x.shape, dtype=torch.float32)  # noqa: E731
    as_dtype = kernel_dtype(k, q, compute_dtype)
    own = lambda x: like(x) if x is None else k.new_empty(x.shape, dtype=gradient_dtype(x, as_dtype))  # noqa: E731
    return (own(k), own(v), own(q), *(like(x) for x in (beta, g, h0, coef)))


def _setup_context(ctx, inputs, output):
    k, v, q, beta, g, h0, chunk, before, coef, _, scale, recompute, compute_dtype = inputs
    intermediates = output[2:]   # states, v_new, w, tm
    # the initial state's values are needed only to recompute the states (H_0 = h0 is kept
    # otherwise): not saved then, so a program may write the final state back into it
    ctx.save_for_backward(k, v, q, beta, g, h0 if recompute else None, coef, *(() if recompute else intermediates))
    ctx.chunk, ctx.before, ctx.scale, ctx.h0_shape = chunk, before, scale, tuple(h0.shape)
    # resolved once (common.kernel_dtype): the backward and a recomputation without the queries
    # then run at the forward's precision whatever the queries' dtype
    ctx.compute_dtype = kernel_dtype(k, q, compute_dtype)
    ctx.mark_non_differentiable(*intermediates)
    # outputs without a gradient reach the backward as None, not as zeros autograd would allocate
    # and fill (the intermediates' alone: 288 MiB at B=8, H=16, T=2048, d=128, bf16 dots)
    ctx.set_materialize_grads(False)
    ctx.eager = False


def _backward(ctx, do, dh_final, *_intermediates):
    k, v, q, beta, g, h0, coef, *intermediates = ctx.saved_tensors
    # the ops' implementations themselves where the forward ran as ``_EagerScan``, unless a tracer
    # (compiled autograd) runs this backward: it must see the ops
    direct = ctx.eager and not torch.compiler.is_compiling()
    forward, backward = (chunk_forward, chunk_backward) if direct else (chunk_scan, chunk_scan_backward)
    if h0 is None:   # only its shape matters to the backward
        h0 = k.new_empty(ctx.h0_shape, dtype=torch.float32)
    if not intermediates:   # recompute: the forward's WY-inverse, prepare and states kernels again (no readout)
        intermediates = forward(k, v, None, beta, g, h0, ctx.chunk, ctx.before, coef,
                                compute_dtype=ctx.compute_dtype)[2:]
    states, v_new, w, tm = intermediates
    if dh_final is None:
        dh_final = torch.zeros_like(h0, dtype=torch.float32)
    if q is not None and do is None:
        do = k.new_zeros(*k.shape[:-1], v.shape[-1], dtype=torch.float32)
    grads = backward(k, v, q, beta, g, h0, states, v_new, w, tm, do if q is not None else None,
                     dh_final, ctx.chunk, ctx.before, coef, ctx.scale, ctx.compute_dtype)
    inputs = (k, v, q, beta, g, h0, coef)
    dk, dv, dq, dbeta, dg, dh0, dcoef = [None if x is None else gx.to(x.dtype) for x, gx in zip(inputs, grads)]
    return dk, dv, dq, dbeta, dg, dh0, None, None, dcoef, None, None, None, None


chunk_scan.register_autograd(_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """``chunk_scan`` and its autograd formula, without the op: for a plain eager call that autograd
    records (``_plain_eager``), where the op's dispatch, its argument normalisation for the formula
    and the backward op's dispatch are host time the GPU may wait for.  The context is set up inside
    ``forward``, not in a ``setup_context`` of its own: with one, ``Function.apply`` binds every call's
    arguments to ``forward``'s signature (``inspect``), which functorch transforms need and this
    path never meets (``_plain_eager``)."""

    @staticmethod
    def forward(ctx, *inputs):
        k, v, q, beta, g, h0, chunk, before, coef, out_dtype, scale, _, compute_dtype = inputs
        output = chunk_forward(k, v, q, beta, g, h0, chunk, before, coef, out_dtype, scale, compute_dtype)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def kernel_chunk(chunk_size: int, per_channel: bool, device: torch.device | str, dk: int, dv: int,
                 prec: str | tuple[str, ...]) -> int:
    """The kernel's chunk length: a power of two in [16, 64]; 16 with a per-channel gate
    (its intra-chunk scores are [C, C, channels] register blocks); on a GPU possibly shorter
    for large head dims or fp32 dots (``common.kernel_blocks``, at the dot precision ``prec``: the
    forward's and the backward's, which share it), unless ``NLCOMPILE_TRITON_CHUNK`` fixes it (for
    measuring)."""
    forced = knobs.triton_chunk()
    if forced:
        return forced
    if per_channel:
        chunk = 16
    else:
        chunk = min(64, block(chunk_size))
    return kernel_blocks(device, dk, dv, chunk, prec, shrink=True).chunk


_warned: set[str] = set()


def _fallback(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"nlcompile triton target: {why}; this scan runs as the exact PyTorch chunkwise form",
                      stacklevel=3)


def _unsupported(k, v, beta, gate, log_gate, tensors, gate_first: bool = False,
                 compute_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the kernels cannot run these inputs (None when they can)."""
    if any(x.dtype == torch.float64 for x in tensors):
        return "float64 inputs (the kernels compute in float32)"
    if compute_dtype == torch.float64:
        return "a loop computing in float64 (the kernels compute in float32)"
    if max(k.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(k.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    g = gate if gate is not None else log_gate
    if g is not None and g.dim() == k.dim() and beta is not None and not gate_first:
        return ("a per-key-channel gate with a delta rule applied after the delta step (gate_first=False: "
                "no chunkwise form; the kernels implement gate_first=True, Kimi Delta Attention)")
    if gate is not None and not bool((gate > 0).all()):
        return "gates with zero or negative values (the kernels work in log space)"
    return None


def triton_chunkwise_scan(
    k: Tensor,
    v: Tensor,
    *,
    q: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    write: Optional[Tensor] = None,
    gate: Optional[Tensor] = None,
    log_gate: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
    readout: Readout = "after",
    chunk_size: int = 64,
    gate_first: bool = False,
    q_scale: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
    on_plan: Optional[Callable[[str], None]] = None,
    recompute: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Optional[Tensor], Tensor]:
    """``chunkwise_scan`` computed by the Triton kernels (same arguments, same results; o in
    ``out_dtype`` when given, e.g. the model's bf16, written so by the kernels, else fp32;
    ``q_scale`` applied by the kernels to o, and to dO in the backward, not to a copy of q;
    ``recompute``: the backward forms the chunk states again instead of keeping them from the
    forward, so autograd holds only the inputs between the two, see ``chunk_scan``;
    ``compute_dtype``: the dtype the update loop computes its recurrence in, which sets the
    kernels' precision when given (a loop that upcasts bf16 keys to fp32 inside is passed the
    bf16 keys as they are and fp32 here: the kernels then compute as for fp32 inputs;
    ``common.kernel_dtype``)).

    Also takes flash-linear-attention's layout, the heads after time: k [B,T,H,dk], v [B,T,H,dv],
    q like k, beta / write / scalar gates [B,T,H], per-channel gates like k, initial_state
    [B*H,dk,dv]; the kernels read it in place and o comes back as [B,T,H,dv] (the final state as
    [B*H,dk,dv]).  ``gate_first`` only matters for a per-key-channel gate with beta (a scalar gate
    commutes with the delta step): the kernels run the gate-first order; the other falls back.
    ``on_plan`` is told how these inputs run, in words (``explain``): the kernels' chunk and dot
    precisions, or the PyTorch scan and why."""
    if isinstance(q_scale, bool) or not isinstance(q_scale, (int, float)):
        raise TypeError(f"q_scale must be a Python number, got {type(q_scale).__name__}")
    given = [x for x in (k, v, q, beta, write, gate, log_gate, initial_state) if x is not None]
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(x).tangent is not None for x in given):
        raise NotImplementedError("forward-mode AD (dual tensors) through the Triton kernels: they have no "
                                  "forward-mode derivative, and their outputs would carry no tangent; take "
                                  "gradients in reverse mode (torch.autograd.grad, .backward())")
    why = _unsupported(k, v, beta, gate, log_gate, given, gate_first, compute_dtype)
    if why is not None:
        _fallback(why)
        scan, note = recomputing(chunkwise_scan, recompute)   # the PyTorch scan has no recomputation of its own
        if on_plan is not None:
            on_plan(f"the PyTorch chunkwise scan: {why}{note}")
        heads_last = k.dim() == 4
        flat = (lambda x: None if x is None else x.transpose(1, 2).flatten(0, 1)) if heads_last else (lambda x: x)
        o, final = scan(flat(k), flat(v), q=flat(q), beta=flat(beta), write=flat(write), gate=flat(gate),
                        log_gate=flat(log_gate), initial_state=initial_state, readout=readout, chunk_size=chunk_size,
                        gate_first=gate_first, q_scale=q_scale, out_dtype=out_dtype, compute_dtype=compute_dtype)
        if heads_last and o is not None:
            o = o.unflatten(0, (k.shape[0], k.shape[2])).transpose(1, 2)
        return o, final
    if readout not in ("after", "before"):
        raise ValueError(f"readout must be 'after' or 'before', got {readout!r}")
    n, _, _, _ = sequences(k)
    dk, dv = k.shape[-1], v.shape[-1]
    coef = write if write is not None else beta
    if beta is None and coef is not None:   # the kernels scale v by the delta family's coefficient themselves
        v, coef = v.float() * coef.float().unsqueeze(-1), None
    if log_gate is not None:
        g = log_gate.float().clamp(min=LOG_GATE_FLOOR)
    else:   # gates, not floored: a tiny gate's gradient is not tiny (d/da of a S is S)
        g = gate.float().log() if gate is not None else None
    h0 = initial_state.float() if initial_state is not None else None   # None: zeros
    if recompute and h0 is not None and torch.is_grad_enabled():
        h0 = h0.clone()   # kept for the recomputation: a copy, as in ``targets.scan.checkpointed``
    per_channel = g is not None and g.dim() == k.dim()
    fwd, bwd = dot_precision(k, q, compute_dtype=compute_dtype), dot_precision(k, q, True, compute_dtype)
    c = kernel_chunk(chunk_size, per_channel, k.device, dk, dv, (fwd, bwd))
    if on_plan is not None:
        on_plan(f"the Triton kernels, chunk {c}, {fwd} dots" + ("" if bwd == fwd else f" ({bwd} in the backward)")
                + (", chunk states recomputed in the backward" if recompute else ""))
    contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
    eager = _plain_eager(given)   # the op's implementation (and formula), without its dispatch
    inference = eager and not (torch.is_grad_enabled() and any(x.requires_grad for x in given))
    if h0 is None and not inference:   # for the op's schema and the autograd formula (chunk_forward fills its
        h0 = k.new_zeros(n, dk, dv, dtype=torch.float32)   # own zeros after its first launch)
    args = (contiguous(k), contiguous(v), contiguous(q), contiguous(None if beta is None else beta.float()),
            contiguous(g), contiguous(h0), c, readout == "before", contiguous(coef), out_dtype, q_scale)
    if inference:
        o, final, *_ = chunk_forward(*args, compute_dtype)
    else:
        o, final, *_ = (_EagerScan.apply if eager else chunk_scan)(*args, bool(recompute), compute_dtype)
    return (o if q is not None else None), final


def _plain_eager(tensors: list[Tensor]) -> bool:
    """Whether a call may run the ops' implementations directly (``chunk_forward``, and with
    autograd recording ``_EagerScan``): nothing that must see the op as such (torch.compile tracing,
    a dispatch or function mode such as export's fake tensors, a functorch transform, a tensor
    subclass other than ``nn.Parameter``, meta tensors). The forward op's dispatch (autograd's
    no-grad path, the redispatch, its compiler guard) took 26-30 us of a forward call's 164-174 us
    of host time, 17-20 of them before its first launch, while a GPU waits idle at the start of
    every call; the ops' path of a forward+backward step 90-100 us of 650-664
    (``benchmarks/host_overhead.py --triton`` on this project's 2-core CPU, DeltaNet and Gated
    DeltaNet, the two paths alternated three times)."""
    if torch.compiler.is_compiling():   # first: what follows is not for the tracer
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    # nn.Parameter: a plain tensor to dispatch (a learned initial state); meta: the op's fake implementation
    return all(type(x) in _PLAIN and not x.is_meta for x in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)
