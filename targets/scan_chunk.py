"""The three phases of the exact chunkwise scan.

Before (per token, T steps of a Python loop)::

    for t in range(T):
        S = diag(a_t) (I - b_t k_t k_t^T) S + w_t k_t v_t^T ;  o_t = S^T q_t

After (C-token chunks, all tensors chunk-major ``[nc, N, C, ...]``)::

    plan   = prepare_chunks(x)            # parallel over all chunks
    states = chunk_states(plan, S0)       # nc small matmul steps
    o      = chunk_outputs(plan, states)  # parallel over all chunks

Phases 1 and 3 are pure batched tensor programs with static shapes (given
nc and C), the part a compiler can take; phase 2 is the short recurrence
that is kept out of compiled regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .scan_decay import GateCum, channel_scores, decay, triangle_mask, unit_lower_inverse


@dataclass(frozen=True)
class ChunkInputs:
    """Padded, chunk-major inputs: k [nc,N,C,dk], v [nc,N,C,dv], q like k or None,
    beta/write [nc,N,C] or None, cum (inclusive gate sums; fields [nc,N,C] or
    [nc,N,C,dk]) and steps (the per-step values) or None.  With no beta the
    write coefficient is already folded into v."""

    k: Tensor
    v: Tensor
    q: Optional[Tensor]
    beta: Optional[Tensor]
    write: Optional[Tensor]
    cum: Optional[GateCum]
    steps: Optional[GateCum]
    per_channel: bool
    before: bool
    floor: Optional[float] = None  # flush gate factors below exp(floor) (see scan_decay)
    gate_first: bool = False       # per-channel gate applied before the delta step


@dataclass(frozen=True)
class ChunkPlan:
    """What the recurrence and the readout need, per chunk (chunk-major).

    The state entering chunk i+1 is ``transition_i S_i + state_add_i``, where
    the transition is a full matrix [nc,N,dk,dk] for the delta family
    (``decay_last * I - K_end^T W``) and otherwise a decay ``decay_last``
    ([nc,N,1,1] or [nc,N,dk,1], None when there is no gate).
    The readout of chunk i is ``intra_i + q_in_i S_i`` (intra: the intra-chunk
    part, [nc,N,C,dv]; both None without queries).  Tensors may be views with
    strided rows (slices of one wider matmul result).  Outside autograd,
    ``state_add`` is slots 1.. of ``states`` ([nc+1,N,dk,dv]), the buffer the
    recurrence then fills in place (no copy of the additions).
    """

    transition: Optional[Tensor]
    decay_last: Optional[Tensor]
    state_add: Tensor
    q_in: Optional[Tensor]
    intra: Optional[Tensor]
    states: Optional[Tensor] = None


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul over any leading dims of contiguous chunk-major tensors."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def _baddbmm(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x + a @ b`` over the leading dims of chunk-major tensors (one op: no separate add)."""
    lead = a.shape[:-2]
    flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
    return torch.baddbmm(flat(x), flat(a), flat(b)).view(*lead, *x.shape[-2:])


def _grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records through any of these (then out= buffers are avoided)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _state_adds(k_end_t: Tensor, values: Tensor, grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``K_end^T values`` per chunk [nc,N,dk,dv]; outside autograd written into slots 1.. of
    a fresh states buffer [nc+1,N,dk,dv], which is returned too (else None)."""
    if grad:
        return _bmm(k_end_t, values), None
    nc, n, dk = k_end_t.shape[:3]
    states = values.new_empty(nc + 1, n, dk, values.shape[-1])
    torch.bmm(k_end_t.reshape(nc * n, dk, -1), values.reshape(nc * n, *values.shape[2:]),
              out=states[1:].view(nc * n, dk, -1))
    return states[1:], states


def _scale(x: Tensor, factor: Tensor, per_channel: bool) -> Tensor:
    """x [..., C, d] times a per-position factor [..., C] or [..., C, d]."""
    return x * (factor if per_channel else factor.unsqueeze(-1))


def _channel_scores(q: Tensor, k: Tensor, q_cum: GateCum, k_cum: GateCum, diagonal: bool,
                    floor: Optional[float]) -> Tensor:
    """``channel_scores`` over chunk-major tensors [nc, N, C, dk] -> [nc, N, C, C]."""
    nc, n, c = q.shape[:3]
    flat = lambda t: t.reshape(nc * n, c, -1)  # noqa: E731
    return channel_scores(flat(q), flat(k), q_cum.map(flat), k_cum.map(flat), diagonal, floor).view(nc, n, c, c)


def _scores(x: ChunkInputs, row_cum: Optional[GateCum], c: int) -> Tensor:
    """Intra-chunk readout scores, masked (and decayed) as the readout requires."""
    q, k = x.q, x.k
    diag = 0 if not x.before else -1
    if x.cum is None:
        return _bmm(q, k.transpose(-1, -2)).tril_(diag)
    if x.per_channel:
        return _channel_scores(q, k, row_cum, x.cum, not x.before, x.floor)
    return _bmm(q, k.transpose(-1, -2)) * _gamma(row_cum, x.cum, c, diag, x.floor)


def _gamma(row_cum: GateCum, cum: GateCum, c: int, diag: int, floor: Optional[float]) -> Tensor:
    """Scalar-gate window products D(r, s) [nc,N,C,C], zero above diagonal ``diag``."""
    mask = triangle_mask(c, diag, cum.log)
    return decay(row_cum.map(lambda t: t.unsqueeze(-1)), cum.map(lambda t: t.unsqueeze(-2)), mask, floor)


def prepare_chunks(x: ChunkInputs) -> ChunkPlan:
    """Phase 1: everything that does not depend on the state, for all chunks at once.

    Delta family (WY/UT form): A = tril(diag(b) K K^T * Gamma, -1),
    T = (I + A)^{-1}, W = T (b * K * exp(G)), U = T (w * V).  The corrected
    values U - W S never need forming: the chunk's state map is
    S -> (exp(G_last) I - K_end^T W) S + K_end^T U and its readout is
    scores U + (Q_in - scores W) S.  With a per-channel gate applied first
    (``gate_first``) the same holds with A_rs = b_r sum_c k_rc k_sc
    exp(G_rc - G_sc) (the channel scores of b K against K) and exp(G) per channel.
    """
    k, v = x.k, x.v
    c = k.shape[2]
    if x.per_channel and x.beta is not None and not x.gate_first:
        raise NotImplementedError(
            "gated delta rule with a per-key-channel gate applied after the delta step has no exact "
            "WY form (each step is rank two); use a scalar gate, the gate before the delta step "
            "(gate_first), or the sequential scan"
        )
    decay_last = row_cum = None
    if x.cum is None:
        k_end = k
    else:
        last = x.cum.map(lambda t: t[:, :, -1:])
        k_end = _scale(k, decay(last, x.cum, floor=x.floor), x.per_channel)
        d_last = decay(last)  # [nc,N,1] or [nc,N,1,dk]
        decay_last = d_last.transpose(-1, -2) if x.per_channel else d_last.unsqueeze(-1)
        row_cum = x.cum.minus(x.steps) if x.before else x.cum
    k_end_t = k_end.transpose(-1, -2)
    q_in = scores = None
    if x.q is not None:
        q_in = x.q if row_cum is None else _scale(x.q, decay(row_cum, floor=x.floor), x.per_channel)
        scores = _scores(x, row_cum, c)
    grad = _grad(k, v, x.q, x.beta, x.write, *(x.cum or ()))
    if x.beta is None:
        intra = None if scores is None else _bmm(scores, v)
        add, states = _state_adds(k_end_t, v, grad)
        return ChunkPlan(None, decay_last, add, q_in, intra, states)
    kb = k * x.beta.unsqueeze(-1)
    if x.per_channel:  # gate first: A_rs = b_r sum_c k_rc k_sc exp(G_rc - G_sc), s < r
        gram = _channel_scores(kb, k, x.cum, x.cum, False, x.floor)
    else:
        gram = _bmm(kb, k.transpose(-1, -2))
    if x.cum is not None:
        if not x.per_channel:
            gram = gram * _gamma(x.cum, x.cum, c, -1, x.floor)
        kb = _scale(kb, decay(x.cum, floor=x.floor), x.per_channel)
    t_inv = unit_lower_inverse(gram)  # reads only the strictly lower part
    write = x.beta if x.write is None else x.write
    dv = v.shape[-1]
    if grad:
        rhs = torch.cat([v * write.unsqueeze(-1), -kb], -1)
    else:  # same values, without the cat's extra copy
        rhs = v.new_empty(*v.shape[:-1], dv + k.shape[-1])
        torch.mul(v, write.unsqueeze(-1), out=rhs[..., :dv])
        torch.neg(kb, out=rhs[..., dv:])
    u_negw = _bmm(t_inv, rhs)  # [U | -W]
    add, states = _state_adds(k_end_t, u_negw[..., :dv], grad)  # K_end^T U
    transition = _bmm(k_end_t, u_negw[..., dv:])  # -K_end^T W, contiguous for the recurrence
    transition.diagonal(dim1=-2, dim2=-1).add_(1.0 if decay_last is None else decay_last.squeeze(-1))
    intra = None
    if q_in is not None:
        intra = _bmm(scores, u_negw[..., :dv])  # scores U
        q_in = _baddbmm(q_in, scores, u_negw[..., dv:])  # Q_in - scores W
    return ChunkPlan(transition, None, add, q_in, intra, states)


def chunk_states(plan: ChunkPlan, initial_state: Tensor) -> Tensor:
    """Phase 2: the inter-chunk recurrence, one small step per chunk.

    Returns states [nc+1, N, dk, dv]: states[i] enters chunk i, states[nc] is final.
    """
    nc = plan.state_add.shape[0]
    add, dl, m = plan.state_add, plan.decay_last, plan.transition
    if plan.states is None or _grad(initial_state):  # autograd: no in-place updates
        s, out = initial_state, [initial_state]
        for i in range(nc):
            s = (m[i] @ s if m is not None else s if dl is None else dl[i] * s) + add[i]
            out.append(s)
        return torch.stack(out)
    states = plan.states  # slots 1.. hold the additions: each step adds its map of the state before
    states[0] = initial_state
    slot = states.unbind(0)  # every slot's view in one call (indexing each step costs more than the step)
    if m is not None:
        for i, m_i in enumerate(m.unbind(0)):
            slot[i + 1].baddbmm_(m_i, slot[i])
    elif dl is not None:
        for i, dl_i in enumerate(dl.unbind(0)):
            slot[i + 1].addcmul_(dl_i, slot[i])
    else:
        for i in range(nc):
            slot[i + 1].add_(slot[i])
    return states


def chunk_outputs(plan: ChunkPlan, states: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Phase 3: O_i = intra_i + Q_in,i S_i for all chunks at once -> [nc,N,C,dv].

    ``out`` (outside autograd; any strides, e.g. a transposed view of the caller's
    [N, T, dv] output) receives the result directly.
    """
    nc = plan.state_add.shape[0]
    o = _bmm(plan.q_in, states[:nc])
    return o.add_(plan.intra) if out is None else torch.add(o, plan.intra, out=out)
