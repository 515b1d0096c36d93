"""Exact decay factors between positions of a chunk, for any real gate.

A gate a_t enters the recurrence as a product over a window,
``D(r, s) = prod_{s < j <= r} a_j``.  Dividing cumulative products is unsafe
(overflow, and wrong for a_j = 0), so each chunk keeps three running sums:

    log   = cumsum(log|a_j|)      (0 where a_j == 0)
    zeros = cumsum([a_j == 0])    (None when the gate has no zeros)
    negs  = cumsum([a_j < 0])     (None when the gate has no negatives)

and ``D(r, s) = (-1)^(negs_r - negs_s) * [zeros_r == zeros_s] * exp(log_r - log_s)``.
Masked entries are set to -inf *before* the exp, so no inf * 0 can appear;
when every |a| <= 1, so are factors below exp(-80) in fp32 (exp(-700) in
fp64), flushed to zero as FTZ would: denormals slow CPU matmuls about 4x.
A per-key-channel gate simply carries a trailing ``dk`` axis in every field.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class GateCum(NamedTuple):
    """Running gate sums inside each chunk (see the module docstring).

    ``ghost`` (only with zeros, under autograd) is cumsum(a_j * [a_j == 0]):
    identically 0, it carries d D / d a_j at an exact zero, which is the
    product of the window's other factors (a window with one zero) or 0.
    """

    log: Tensor
    zeros: Optional[Tensor] = None
    negs: Optional[Tensor] = None
    ghost: Optional[Tensor] = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> "GateCum":
        """Apply ``fn`` (an index or a view) to every field that is present."""
        return GateCum(*(None if t is None else fn(t) for t in self))

    def cumsum(self, dim: int) -> "GateCum":
        return self.map(lambda t: t.cumsum(dim))

    def minus(self, other: "GateCum") -> "GateCum":
        """Field-wise difference; turns inclusive sums into exclusive ones."""
        return GateCum(*(None if a is None else a - b for a, b in zip(self, other)))


def records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records through any of these (then out= buffers and in-place ops are avoided)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gate_steps(gate: Optional[Tensor], log_gate: Optional[Tensor]) -> GateCum:
    """Per-step (log|a|, [a == 0], [a < 0], ghost) with absent fields dropped.

    The presence checks read the data once, so that positive gates (the common
    case) pay for no sign or zero bookkeeping.
    """
    if log_gate is not None:
        zero = torch.isneginf(log_gate)
        if bool(zero.any()):
            return GateCum(log_gate.masked_fill(zero, 0.0), zero.to(log_gate.dtype))
        return GateCum(log_gate)
    assert gate is not None
    zero = gate == 0
    neg = gate < 0
    if not bool(zero.any()):
        return GateCum(gate.abs().log(), None, neg.to(gate.dtype) if bool(neg.any()) else None)
    log_abs = torch.where(zero, 1.0, gate).abs().log()  # finite, gradient 0 at the zeros
    ghost = gate * zero if torch.is_grad_enabled() and gate.requires_grad else None
    return GateCum(log_abs, zero.to(gate.dtype), neg.to(gate.dtype) if bool(neg.any()) else None, ghost)


# Log-factor floors: below them a factor is flushed to exact 0, as
# flush-to-zero would.  Denormal gate products made the CPU matmuls 4x slower
# with gates -4*softplus(randn).  Only safe when every |a| <= 1: then a tiny
# factor means a tiny term, < e^-80 |q||k||v| in fp32 (< e^-40 for the split
# factors of ``channel_scores``), far below rounding; see ``underflow_floor``.
_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def underflow_floor(steps: GateCum) -> Optional[float]:
    """The flush floor for these gates, or None when some |a| > 1 (growth: no flushing)."""
    return _FLOOR.get(steps.log.dtype) if bool((steps.log <= 0).all()) else None


def decay(
    later: GateCum, earlier: Optional[GateCum] = None, mask: Optional[Tensor] = None, floor: Optional[float] = None
) -> Tensor:
    """``D(later, earlier)`` elementwise (broadcasting); ``earlier=None`` is the chunk start.

    ``mask`` (additive: 0 to keep, -inf to drop) forces entries to exact 0 and
    ``floor`` (a log value) flushes smaller factors to 0; both act before the
    exp.  (Additive masks and F.threshold cost a third of masked_fill here.)  Outside
    autograd the steps after the first write into its result (GLA and KDA ~4-5% faster).
    """
    diff = (lambda a, b: a) if earlier is None else (lambda a, b: a - b)
    earlier = earlier or GateCum(*(None for _ in later))
    d = diff(later.log, earlier.log)
    e = d if mask is None else d + mask
    dz = None if later.zeros is None else diff(later.zeros, earlier.zeros)
    if dz is not None:
        e = torch.where(dz == 0, e, float("-inf"))
    grad = records_grad(*later, *earlier)  # (the ghost term, which reads d, exists only then)
    if floor is not None:
        e = F.threshold(e, floor, float("-inf"), inplace=not grad and e is not later.log)
    out = e.exp() if grad or e is later.log else e.exp_()
    if later.ghost is not None:  # zero in value; the derivative at a lone zero
        lone = torch.where(dz == 1, d if mask is None else d + mask, float("-inf"))
        out = out + lone.exp() * diff(later.ghost, earlier.ghost)
    if later.negs is not None:
        out = out * (1.0 - 2.0 * torch.remainder(diff(later.negs, earlier.negs), 2.0))
    return out


def triangle_mask(c: int, diagonal: int, like: Tensor) -> Tensor:
    """Additive [c, c] mask: 0 on and below ``diagonal`` (as in tril), -inf above."""
    keep = torch.ones(c, c, dtype=torch.bool, device=like.device).tril(diagonal)
    return torch.zeros(c, c, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def channel_scores(
    qs: Sequence[Tensor], k: Tensor, q_cum: GateCum, k_cum: GateCum, diagonal: bool, floor: Optional[float] = None
) -> list[Tensor]:
    """Intra-chunk scores ``P_rs = sum_c q_rc k_sc D^c(r, s)`` for s <= r (s < r without ``diagonal``),
    for each q of ``qs`` (left operands sharing ``q_cum``: their gate factors are worked out once).

    Shapes: each q, k, cum fields [B, C, dk] with C a power of two; returns [B, C, C] per q.
    ``q_cum`` is the row-side sum (inclusive for readout after, exclusive for
    readout before); ``k_cum`` is the inclusive sum.

    Folding exp(G) into q and exp(-G) into k over a whole chunk overflows, so
    the pairs are split by recursive halving: for every block of 2h positions,
    pairs (r in right half, s in left half) fold around m = the last position
    of the left half, ``D(r, s) = D(r, m) * D(m, s)``.  Both factors are
    products of gates over sub-windows, so they stay bounded by 1 whenever
    |a| <= 1 (no exp(+G) is ever formed).  Cost: log2(C) batched matmuls.
    Each factor is flushed at ``floor / 2``, so that their products stay normal.
    """
    bsz, C, dk = k.shape
    scores = [k.new_zeros(bsz, C, C) for _ in qs]
    if diagonal:
        for q, out in zip(qs, scores):
            out.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    half_floor = None if floor is None else floor / 2
    h = 1
    while h < C:
        nb = C // (2 * h)

        def half(t: Tensor, side: int) -> Tensor:
            return t.view(bsz, nb, 2, h, dk)[:, :, side]

        mid = k_cum.map(lambda t: t.view(bsz, nb, 2, h, dk)[:, :, 0, h - 1 : h])
        q_decay = decay(q_cum.map(lambda t: half(t, 1)), mid, floor=half_floor)
        k_fold = (half(k, 0) * decay(mid, k_cum.map(lambda t: half(t, 0)), floor=half_floor)).transpose(-1, -2)
        for q, out in zip(qs, scores):
            blocks = (half(q, 1) * q_decay) @ k_fold  # [B, nb, h, h]
            target = out.view(bsz, nb, 2, h, nb, 2, h)[:, :, 1, :, :, 0, :]
            target.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        h *= 2
    return scores


def unit_lower_inverse(a: Tensor) -> Tensor:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A`` [..., C, C].

    One batched triangular solve against the C x C identity (the diagonal of
    ``A`` is never read); much faster on CPU than solving against the wide
    right-hand sides directly, which are then one batched matmul away.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
