"""Recurrence kernels of the ``torch`` target: fast-weight scans, per token and chunkwise.

One update rule covers the exact kinds nlcompile rewrites (state S in R^{dk x dv})::

    S_t = diag(a_t) (I - b_t k_t k_t^T) S_{t-1} + w_t k_t v_t^T
        (gate_first: S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + w_t k_t v_t^T)
    o_t = S_t^T q_t        (readout "after")   or   S_{t-1}^T q_t   ("before")

    a_t = gate_t | exp(log_gate_t) | 1 ;  b_t = beta_t | absent ;  w_t = write_t | b_t | 1

additive (no beta, no gate), scalar decay (RetNet, Mamba-2), per-key-channel
decay (GLA), delta (DeltaNet), gated delta with a scalar gate (Gated DeltaNet)
or a per-key-channel gate applied first (Kimi Delta Attention; applied after
the delta step it has no chunkwise form), and delta with a separate write
coefficient.  ``sequential_scan`` is the
per-token reference; ``chunkwise_scan`` computes the same function (up to
float reassociation) with chunk-level matmuls, a WY/UT triangular solve for
the delta family and a short inter-chunk recurrence (see ``scan_chunk``).

Tensors are batch-major (N = batch * heads): k, q [N,T,dk], v [N,T,dv],
beta, write [N,T], gate / log_gate [N,T] or [N,T,dk], initial_state [N,dk,dv].
Work is in float32 (bf16/fp16 inputs are upcast; states and gates stay fp32),
or in float64 when any input is float64.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from nlcompile.timing import interleaved_best

from .scan_chunk import ChunkInputs, chunk_outputs, chunk_states, prepare_chunks
from .scan_decay import GateCum, gate_steps, records_grad, underflow_floor

Readout = Literal["after", "before"]

__all__ = ["sequential_scan", "chunkwise_scan", "choose_chunk_size"]


@dataclass(frozen=True)
class _Scan:
    """Validated inputs, cast to the compute dtype."""

    k: Tensor
    v: Tensor
    q: Optional[Tensor]
    beta: Optional[Tensor]
    write: Optional[Tensor]
    gate: Optional[Tensor]
    log_gate: Optional[Tensor]
    state: Tensor
    before: bool
    gate_first: bool = False
    q_scale: float = 1.0  # the queries are q * q_scale (folded into their one copy by the chunkwise scan)

    def cut(self, start: int, stop: int) -> "_Scan":
        """Steps [start, stop) (the same object when that is all of them)."""
        if start == 0 and stop >= self.k.shape[1]:
            return self
        per_step = ("k", "v", "q", "beta", "write", "gate", "log_gate")
        return dataclasses.replace(self, **{name: None if getattr(self, name) is None
                                            else getattr(self, name)[:, start:stop] for name in per_step})

    @property
    def per_channel(self) -> bool:
        g = self.gate if self.gate is not None else self.log_gate
        return g is not None and g.dim() == 3


def _normalise(k, v, q, beta, write, gate, log_gate, initial_state, readout, gate_first=False,
               q_scale=1.0, compute_dtype=None) -> _Scan:
    if readout not in ("after", "before"):
        raise ValueError(f"readout must be 'after' or 'before', got {readout!r}")
    if isinstance(q_scale, bool) or not isinstance(q_scale, (int, float)):
        raise TypeError(f"q_scale must be a Python number, got {type(q_scale).__name__}")
    if gate is not None and log_gate is not None:
        raise ValueError("give at most one of gate and log_gate")
    if k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k must be [N,T,dk] and v [N,T,dv], got {tuple(k.shape)} and {tuple(v.shape)}")
    n, t, dk = k.shape
    dv = v.shape[-1]
    expected = {
        "q": (q, [(n, t, dk)]),
        "beta": (beta, [(n, t)]),
        "write": (write, [(n, t)]),
        "gate": (gate, [(n, t), (n, t, dk)]),
        "log_gate": (log_gate, [(n, t), (n, t, dk)]),
        "initial_state": (initial_state, [(n, dk, dv)]),
    }
    for name, (x, shapes) in expected.items():
        if x is not None and tuple(x.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(x.shape)}")
    given = [x for x in (k, v, q, beta, write, gate, log_gate, initial_state) if x is not None]
    wide = compute_dtype == torch.float64 or any(x.dtype == torch.float64 for x in given)
    dtype = torch.float64 if wide else torch.float32
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    state = cast(initial_state) if initial_state is not None else k.new_zeros(n, dk, dv, dtype=dtype)
    return _Scan(
        cast(k), cast(v), cast(q), cast(beta), cast(write), cast(gate), cast(log_gate), state, readout == "before",
        gate_first, float(q_scale),
    )


def _without_autocast(scan: Callable) -> Callable:
    """``scan`` with autocast off on the keys' device: the scans compute in the dtype they choose
    (float32, or float64); under an enclosing ``torch.autocast`` their matmuls would run in
    bf16/fp16 instead, and the triangular solve has no bf16 kernel (a layer compiled under
    autocast fell back to its sequential loop).  The loop it replaces, run eagerly under
    autocast, computes no more precisely."""
    @functools.wraps(scan)
    def run(k: Tensor, *args, **kwargs):
        device = k.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return scan(k, *args, **kwargs)
        return scan(k, *args, **kwargs)

    return run


@_without_autocast
def sequential_scan(
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
    gate_first: bool = False,
    q_scale: float = 1.0,
) -> tuple[Optional[Tensor], Tensor]:
    """Run the update rule one token at a time (the reference the chunkwise form must match).

    Returns (o [N,T,dv] or None when q is None, final state [N,dk,dv]).
    """
    x = _normalise(k, v, q, beta, write, gate, log_gate, initial_state, readout, gate_first, q_scale)
    s = x.state.clone()
    q = x.q if x.q_scale == 1.0 else x.q * x.q_scale
    factor = x.gate if x.log_gate is None else x.log_gate.exp()
    coef = x.write if x.write is not None else x.beta
    outs = []
    for t in range(x.k.shape[1]):
        kt = x.k[:, t]
        if q is not None and x.before:
            outs.append((q[:, t, None, :] @ s).squeeze(1))
        a_t = None if factor is None else factor[:, t, :, None] if x.per_channel else factor[:, t, None, None]
        if a_t is not None and x.gate_first:
            s = s * a_t
        if x.beta is not None:
            s = s - x.beta[:, t, None, None] * kt[:, :, None] * (kt[:, None, :] @ s)
        if a_t is not None and not x.gate_first:
            s = s * a_t
        vt = x.v[:, t] if coef is None else x.v[:, t] * coef[:, t, None]
        s = s + kt[:, :, None] * vt[:, None, :]
        if q is not None and not x.before:
            outs.append((q[:, t, None, :] @ s).squeeze(1))
    o = None
    if x.q is not None:
        o = torch.stack(outs, 1) if outs else x.v.new_zeros(x.v.shape)
    return o, s


def _to_chunks(x: Tensor, c: int, nc: int, view: bool = False, scale: float = 1.0) -> Tensor:
    """[N, T, ...] -> chunk-major [nc, N, c, ...] (times ``scale``), the tail padded with zeros
    (one copy; with ``view`` and no tail, a strided view instead, for operands only read
    elementwise)."""
    n, t = x.shape[:2]
    rest = x.shape[2:]
    if view and t == nc * c:
        return x.reshape(n, nc, c, *rest).transpose(0, 1)
    out = x.new_empty(nc, n, c, *rest)
    full = t // c
    if full:
        src = x[:, : full * c].reshape(n, full, c, *rest).transpose(0, 1)
        if scale == 1.0:
            out[:full].copy_(src)
        elif records_grad(x):  # out= does not record
            out[:full] = src * scale
        else:
            torch.mul(src, scale, out=out[:full])
    rem = t - full * c
    if rem:
        out[full, :, :rem] = x[:, full * c :] if scale == 1.0 else x[:, full * c :] * scale
        out[full, :, rem:] = 0
    return out


# Tokens per pass of the chunkwise form.  Longer sequences run pass after pass,
# carrying the state, so each pass's chunk tensors stay in cache (DeltaNet,
# N=8, d=64, T=8192 on the 2-core CPU: 58-60 ms in passes of 1024, 82-140 ms in
# one; T=2048, C=32, interleaved: 10.8 ms in passes of 512, 12.6 of 1024, 13.0 of
# 256, and the same order for Gated DeltaNet, GLA and KDA).
SEGMENT_TOKENS = 512


def _next_pow2(t: int) -> int:
    return 1 << max(0, t - 1).bit_length()


@_without_autocast
def chunkwise_scan(
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
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Optional[Tensor], Tensor]:
    """Same function as ``sequential_scan``, computed chunk by chunk (exact, any T >= 1).

    The tail is padded with neutral steps (k = v = q = 0, beta = write = 0,
    gate 1).  ``chunk_size`` is capped at the next power of two >= T; with a
    per-channel gate it is rounded down to a power of two (the intra-chunk
    scores halve the chunk recursively).  A per-channel gate together with
    beta needs ``gate_first`` (else NotImplementedError: applied after the
    delta step, the gate makes each step rank two).  Differentiable: under autograd the
    recurrence avoids its out= buffers, and gradients at exact-zero gates are
    exact (see ``scan_decay.GateCum``).  Sequences longer than ``SEGMENT_TOKENS``
    run in passes of that many tokens, the state carried.  The queries are ``q * q_scale``,
    scaled in their one copy into chunk order (no pass of their own).  The readout comes back in
    ``out_dtype`` when given (the Triton kernels write it so; here it is converted).  ``on_plan``
    is told the chunk length used, in words (``explain``).  ``compute_dtype``, the dtype the update
    loop computes in: float64 computes in float64 whatever the inputs' dtypes (else float32, or
    float64 with a float64 input, as always).
    """
    x = _normalise(k, v, q, beta, write, gate, log_gate, initial_state, readout, gate_first, q_scale, compute_dtype)
    n, t, _ = x.k.shape
    if t == 0:
        return (x.v.clone() if x.q is not None else None), x.state.clone()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    c = min(chunk_size, _next_pow2(t))
    if x.per_channel:
        c = 1 << (c.bit_length() - 1)
    if on_plan is not None:
        on_plan(f"the PyTorch chunkwise scan, chunk {c}")
    segment = max(c, SEGMENT_TOKENS // c * c)
    grad = records_grad(x.k, x.v, x.q, x.beta, x.write, x.gate, x.log_gate, x.state)
    # outside autograd every pass writes its readout straight into one [N, T (padded), dv] buffer
    out = None if x.q is None or grad else x.v.new_empty(n, -(-t // c) * c, x.v.shape[-1])
    steps = floor = None
    if x.gate is not None or x.log_gate is not None:  # once: their checks read the whole sequence
        steps = gate_steps(x.gate, x.log_gate)
        floor = underflow_floor(steps)
    state, outs = x.state, []
    for start in range(0, t, segment):
        cut = None if steps is None else steps.map(lambda y: y[:, start:start + segment])
        o, state = _chunkwise_pass(x.cut(start, start + segment), c, state, cut, floor,
                                   None if out is None else out[:, start:start + segment])
        outs.append(o)
    if x.q is None:
        o = None
    elif out is not None:
        o = out[:, :t]
    else:
        o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return (o if o is None or out_dtype is None else o.to(out_dtype)), state.clone()


def _chunkwise_pass(x: _Scan, c: int, state: Tensor, steps: Optional[GateCum], floor: Optional[float],
                    out: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor]:
    """One pass of the chunkwise scan over all of ``x`` from ``state`` (``steps``: the gate's
    per-step values over these steps, ``floor`` its flush floor).  With ``out`` ([N, nc*c, dv]
    of the caller's buffer) the readout is written there and None returned."""
    n, t, _ = x.k.shape
    nc = -(-t // c)
    chunk = lambda y: None if y is None else _to_chunks(y, c, nc)  # noqa: E731
    v_in = x.v if x.beta is not None or x.write is None else x.v * x.write.unsqueeze(-1)
    cum = None
    if steps is not None:
        steps = steps.map(chunk)
        cum = steps.cumsum(2)
    inputs = ChunkInputs(
        k=chunk(x.k),
        v=_to_chunks(v_in, c, nc, view=x.beta is not None),  # the delta family only scales v
        q=None if x.q is None else _to_chunks(x.q, c, nc, scale=x.q_scale),
        beta=chunk(x.beta),
        write=chunk(x.write) if x.beta is not None else None,
        cum=cum,
        steps=steps,
        per_channel=x.per_channel,
        before=x.before,
        floor=floor,
        gate_first=x.gate_first,
    )
    plan = prepare_chunks(inputs)
    states, values = chunk_states(plan, state)
    if x.q is None:
        return None, states[nc]
    if out is not None:  # [N, nc*c, dv] seen chunk-major, as chunk_outputs lays out its result
        chunk_outputs(plan, states, values, out=out.view(n, nc, c, -1).transpose(0, 1))
        return None, states[nc]
    o = chunk_outputs(plan, states, values)  # [nc, N, c, dv]
    return o.transpose(0, 1).reshape(n, nc * c, -1)[:, :t], states[nc]


_CHUNK_CACHE: dict[tuple, int] = {}
_CANDIDATES = (16, 32, 64)
_PROBE_T = 2 * SEGMENT_TOKENS  # two passes of the scan: what every longer sequence runs, state carried between
_ROUNDS = 12


CHECKPOINT_NOTE = ", recomputed in the backward (activation checkpoint)"   # for ``explain``


def recomputing(scan: Callable, recompute: bool) -> tuple[Callable, str]:
    """(``scan`` as this call runs it, what ``explain`` adds): ``checkpointed`` when asked to
    recompute and autograd records, else as it is."""
    if recompute and torch.is_grad_enabled():
        return checkpointed(scan), CHECKPOINT_NOTE
    return scan, ""


def checkpointed(scan: Callable) -> Callable:
    """``scan`` under non-reentrant activation checkpointing (``torch.utils.checkpoint``): autograd
    keeps only what goes in, and the backward runs the scan again (``compile(recompute=True)``
    for a scan with no recomputation of its own).  The initial state goes in as a copy: a
    program may write the final state back into the tensor it came from (``state.copy_(S)``),
    and the recomputation would read the new values (the checkpoint does not check versions)."""
    def run(*args, **kwargs):
        if kwargs.get("initial_state") is not None:
            kwargs["initial_state"] = kwargs["initial_state"].clone()
        return torch.utils.checkpoint.checkpoint(scan, *args, use_reentrant=False, **kwargs)

    return run


def choose_chunk_size(
    k: Tensor,
    v: Tensor,
    *,
    beta: Optional[Tensor] = None,
    gate: Optional[Tensor] = None,
    log_gate: Optional[Tensor] = None,
    q: Optional[Tensor] = None,
    gate_first: bool = False,
) -> int:
    """Pick the chunk length for these shapes by timing a few candidates once.

    The best chunk depends on the machine and the kind (per-chunk Python
    steps against C^2 matmul work; on a 2-core CPU DeltaNet at T=4096 took
    about 50 ms with C=16 and 28 ms with C=32 or 64), so after two warm-up calls
    of each (a shape's first matmuls are slower) the candidates run in
    ``_ROUNDS`` interleaved rounds (a busy spell of this shared machine slows
    every candidate alike), best time of each, on a prefix of at most
    ``_PROBE_T`` tokens of the actual inputs (two passes of the segmented scan);
    the winner is cached per (kind, N, dk, dv, T bucket, dtype, device), one
    bucket for every T of the probe length or more (they time the same probe).  Short
    sequences (< 2 chunks of 64) skip timing: one chunk, the next power of two >= T.
    """
    n, t, dk = k.shape
    if t < 2 * _CANDIDATES[-1]:
        return min(_CANDIDATES[-1], _next_pow2(t))
    g = gate if gate is not None else log_gate
    per_channel = g is not None and g.dim() == 3
    if per_channel and beta is not None and not gate_first:
        return _CANDIDATES[-1]  # unsupported by chunkwise_scan; nothing to time
    kind = (beta is not None, g is None, per_channel, log_gate is not None, q is not None)
    key = (kind, n, dk, v.shape[-1], min(_next_pow2(t), _PROBE_T), k.dtype, k.device)
    if key in _CHUNK_CACHE:
        return _CHUNK_CACHE[key]
    tp = min(t, _PROBE_T)
    cut = lambda y: None if y is None else y[:, :tp]  # noqa: E731
    args = dict(q=cut(q), beta=cut(beta), gate=cut(gate), log_gate=cut(log_gate), gate_first=gate_first)
    sync = torch.cuda.synchronize if k.is_cuda else (lambda: None)

    def run(c: int) -> None:
        chunkwise_scan(cut(k), cut(v), chunk_size=c, **args)
        sync()

    with torch.no_grad():
        for c in _CANDIDATES * 2:
            run(c)  # warm-up
        best = interleaved_best({c: functools.partial(run, c) for c in _CANDIDATES},
                                dict.fromkeys(_CANDIDATES, _ROUNDS))
    _CHUNK_CACHE[key] = min(_CANDIDATES, key=best.__getitem__)
    return _CHUNK_CACHE[key]
