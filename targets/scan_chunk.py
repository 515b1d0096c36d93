"""The three phases of the exact chunkwise scan.

Before (per token, T steps of a Python loop)::

    for t in range(T):
        S = diag(a_t) (I - b_t k_t k_t^T) S + w_t k_t v_t^T ;  o_t = S^T q_t

After (C-token chunks, all tensors chunk-major ``[nc, N, C, ...]``)::

    plan           = prepare_chunks(x)                    # parallel over all chunks
    states, values = chunk_states(plan, S0)               # nc small matmul steps
    o              = chunk_outputs(plan, states, values)  # parallel over all chunks

Phases 1 and 3 are pure batched tensor programs with static shapes (given
nc and C), the part a compiler can take; phase 2 is the short recurrence
that is kept out of compiled regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .scan_decay import GateCum, channel_scores, decay, records_grad, triangle_mask, unit_lower_inverse


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

    Chunk i's values enter the state corrected by the state before it:
    ``V'_i = U_i - W_i S_i`` for the delta family (WY form), ``V'_i = U_i``
    otherwise (``w`` None).  Then ``S_{i+1} = decay_last_i S_i + K_end_i^T V'_i``
    and the readout is ``O_i = Q_in,i S_i + scores_i V'_i``.

    u [nc,N,C,dv], w and k_end [nc,N,C,dk], decay_last [nc,N,1,1] or
    [nc,N,dk,1] (None without a gate), q_in [nc,N,C,dk] and scores [nc,N,C,C]
    (None without queries).  For the delta family, u is the plan's own memory
    and ``chunk_states`` turns it into V' in place (outside autograd).
    """

    u: Tensor
    w: Optional[Tensor]
    k_end: Tensor
    decay_last: Optional[Tensor]
    q_in: Optional[Tensor]
    scores: Optional[Tensor]


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul over any leading dims of contiguous chunk-major tensors."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*lead, *out.shape[-2:])


def _scale(x: Tensor, factor: Tensor, per_channel: bool) -> Tensor:
    """x [..., C, d] times a per-position factor [..., C] or [..., C, d]."""
    return x * (factor if per_channel else factor.unsqueeze(-1))


def _channel_scores(qs: list[Tensor], k: Tensor, q_cum: GateCum, k_cum: GateCum, diagonal: bool,
                    floor: Optional[float]) -> list[Tensor]:
    """``channel_scores`` over chunk-major tensors [nc, N, C, dk] -> [nc, N, C, C] per q."""
    nc, n, c = k.shape[:3]
    flat = lambda t: t.reshape(nc * n, c, -1)  # noqa: E731
    out = channel_scores([flat(q) for q in qs], flat(k), q_cum.map(flat), k_cum.map(flat), diagonal, floor)
    return [p.view(nc, n, c, c) for p in out]


def _scores(x: ChunkInputs, row_cum: Optional[GateCum], gamma: Optional[Tensor]) -> Tensor:
    """Intra-chunk readout scores, masked (and decayed: ``gamma`` for a scalar gate) as the
    readout requires."""
    q, k = x.q, x.k
    if x.cum is None:
        return _bmm(q, k.transpose(-1, -2)).tril_(0 if not x.before else -1)
    if x.per_channel:
        return _channel_scores([q], k, row_cum, x.cum, not x.before, x.floor)[0]
    return _bmm(q, k.transpose(-1, -2)).mul_(gamma)


def _gamma(row_cum: GateCum, cum: GateCum, c: int, diag: int, floor: Optional[float]) -> Tensor:
    """Scalar-gate window products D(r, s) [nc,N,C,C], zero above diagonal ``diag``."""
    mask = triangle_mask(c, diag, cum.log)
    return decay(row_cum.map(lambda t: t.unsqueeze(-1)), cum.map(lambda t: t.unsqueeze(-2)), mask, floor)


def prepare_chunks(x: ChunkInputs) -> ChunkPlan:
    """Phase 1: everything that does not depend on the state, for all chunks at once.

    Delta family (WY/UT form): A = tril(diag(b) K K^T * Gamma, -1),
    T = (I + A)^{-1}, W = T (b * K * exp(G)), U = T (w * V); the recurrence
    then corrects U by the state, V' = U - W S (fla's order: on this CPU ~10%
    faster than folding W into a [dk, dk] transition per chunk, which costs
    d^3 per chunk instead of 2 C d^2 and more batched work).  With a per-channel gate
    applied first (``gate_first``) the same holds with A_rs = b_r sum_c k_rc k_sc
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
    write = x.beta if x.write is None else x.write
    kb = None if x.beta is None else k * x.beta.unsqueeze(-1)
    # a scalar gate's window products D(r, s), s <= r: the readout's (strictly lower: readout
    # before), and below the diagonal the delta family's too (its solve never reads the diagonal)
    gamma = None
    if x.cum is not None and not x.per_channel and (x.q is not None or kb is not None):
        gamma = _gamma(row_cum if x.q is not None else x.cum, x.cum, c, -1 if x.before else 0, x.floor)
    q_in = scores = gram = None
    if x.q is not None:
        q_in = x.q if row_cum is None else _scale(x.q, decay(row_cum, floor=x.floor), x.per_channel)
        if x.per_channel and kb is not None and not x.before:  # gate first: one pass over the gate factors
            scores, gram = _channel_scores([x.q, kb], k, x.cum, x.cum, True, x.floor)
        else:
            scores = _scores(x, row_cum, gamma)
    if kb is None:
        return ChunkPlan(v, None, k_end, decay_last, q_in, scores)
    if gram is None and x.per_channel:  # gate first: A_rs = b_r sum_c k_rc k_sc exp(G_rc - G_sc), s < r
        gram = _channel_scores([kb], k, x.cum, x.cum, False, x.floor)[0]
    elif gram is None:
        gram = _bmm(kb, k.transpose(-1, -2))
        if gamma is not None:  # the readout's gamma unless its rows were the exclusive sums
            gram = gram.mul_(gamma if x.q is None or not x.before else _gamma(x.cum, x.cum, c, -1, x.floor))
    if x.cum is not None:
        kb = _scale(kb, decay(x.cum, floor=x.floor), x.per_channel)
    t_inv = unit_lower_inverse(gram)  # reads only the strictly lower part
    # two products, not one over [w V | b K exp(G)]: U comes out contiguous, ready to be corrected in place
    return ChunkPlan(_bmm(t_inv, v * write.unsqueeze(-1)), _bmm(t_inv, kb), k_end, decay_last, q_in, scores)


def chunk_states(plan: ChunkPlan, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """Phase 2: the inter-chunk recurrence, one or two small matmuls per chunk.

    Returns (states [nc+1, N, dk, dv], values V' [nc, N, C, dv]): states[i]
    enters chunk i, states[nc] is final.
    """
    u, w, dl = plan.u, plan.w, plan.decay_last
    nc = u.shape[0]
    k_end_t = plan.k_end.transpose(-1, -2)
    if records_grad(initial_state, u, w, dl, k_end_t):  # autograd: no out= buffers
        s, states, values = initial_state, [initial_state], []
        for i in range(nc):
            val = u[i] if w is None else u[i] - w[i] @ s
            s = (s if dl is None else dl[i] * s) + k_end_t[i] @ val
            states.append(s)
            values.append(val)
        return torch.stack(states), (u if w is None else torch.stack(values))
    states = initial_state.new_empty(nc + 1, *initial_state.shape)
    states[0] = initial_state
    slot = states.unbind(0)  # every slot's view in one call (indexing each step costs more than the step)
    decays = dl.unbind(0) if dl is not None else None
    if w is None:  # the additions do not depend on the state: all at once, then a decay and an add per chunk
        n, dk, dv = initial_state.shape
        torch.bmm(k_end_t.reshape(nc * n, dk, -1), u.reshape(nc * n, -1, dv), out=states[1:].view(nc * n, dk, dv))
        for i in range(nc):
            if decays is not None:
                slot[i + 1].addcmul_(decays[i], slot[i])
            else:
                slot[i + 1].add_(slot[i])
        return states, u
    values = u  # the plan's own U (consumed): each step subtracts W S in place
    for i, (w_i, kt_i, val) in enumerate(zip(w.unbind(0), k_end_t.unbind(0), values.unbind(0))):
        val.baddbmm_(w_i, slot[i], alpha=-1)  # V' = U - W S
        if decays is None:
            torch.bmm(kt_i, val, out=slot[i + 1]).add_(slot[i])
        else:
            torch.mul(slot[i], decays[i], out=slot[i + 1])
            slot[i + 1].baddbmm_(kt_i, val)
    return states, values


def chunk_outputs(plan: ChunkPlan, states: Tensor, values: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Phase 3: O_i = Q_in,i S_i + scores_i V'_i for all chunks at once -> [nc,N,C,dv].

    ``out`` (outside autograd; any strides, e.g. a transposed view of the caller's
    [N, T, dv] output) receives the result directly.
    """
    nc = values.shape[0]
    o, intra = _bmm(plan.q_in, states[:nc]), _bmm(plan.scores, values)
    return o.add_(intra) if out is None else torch.add(o, intra, out=out)
