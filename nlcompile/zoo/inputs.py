"""Realistic example inputs for the zoo, in one canonical layout per family.

``canonical_inputs(family, ...)`` returns a dict of tensors with time at dim 2
(``[B, H, T, D]``, gates / betas ``[B, H, T]``); each zoo entry permutes them
into its own layout (``to_time_dim``) and derives what its spelling takes
(e.g. a decay factor ``alpha = exp(g)`` instead of the log-gate ``g``).  The
values are drawn in fp32 on the CPU from a seeded generator, then cast, so the
same seed gives the same numbers in every dtype and every spelling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FAMILIES = ("linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "kda")

STATIC_KEYS = frozenset({"A"})          # per-head parameters with no time axis
DERIVED_KEYS = {                        # spelling-side name: (canonical name, forward, inverse)
    "alpha": ("g", torch.exp, torch.log),
}


def to_time_dim(x: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Canonical [B, H, T, ...] -> time at ``time_dim`` (2: as is, 1: [B, T, H, ...], 0: [T, B, H, ...])."""
    if time_dim == 2:
        return x
    if time_dim == 1:
        return x.transpose(1, 2).contiguous()
    if time_dim == 0:
        return x.permute(2, 0, 1, *range(3, x.ndim)).contiguous()
    raise ValueError(f"time_dim must be 0, 1 or 2, got {time_dim}")


def from_time_dim(x: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Inverse of ``to_time_dim``: back to [B, H, T, ...]."""
    if time_dim == 2:
        return x
    if time_dim == 1:
        return x.transpose(1, 2)
    if time_dim == 0:
        return x.permute(1, 2, 0, *range(3, x.ndim))
    raise ValueError(f"time_dim must be 0, 1 or 2, got {time_dim}")


def _draw(family: str, B: int, H: int, T: int, D: int, Dv: int, gen: torch.Generator) -> dict:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=gen.device)

    def unit(*shape):
        return F.normalize(randn(*shape), p=2, dim=-1)

    if family in ("linear_attention", "retnet"):
        return {"q": randn(B, H, T, D), "k": randn(B, H, T, D), "v": randn(B, H, T, Dv)}
    if family == "mamba2":
        x = randn(B, H, T, Dv)
        dt = F.softplus(randn(B, H, T) - 3.0)                 # ~ 0.05 .. 0.3
        A = -torch.exp(torch.rand(H, generator=gen, device=gen.device) * math.log(16.0))   # in [-16, -1]
        return {"x": x, "dt": dt, "A": A, "B": randn(B, H, T, D), "C": randn(B, H, T, D)}
    if family == "gla":
        return {"q": randn(B, H, T, D), "k": randn(B, H, T, D), "v": randn(B, H, T, Dv),
                "g": F.logsigmoid(randn(B, H, T, D))}
    if family == "deltanet":
        return {"q": unit(B, H, T, D), "k": unit(B, H, T, D), "v": randn(B, H, T, Dv),
                "beta": torch.sigmoid(randn(B, H, T))}
    if family == "gated_deltanet":
        return {"q": unit(B, H, T, D), "k": unit(B, H, T, D), "v": randn(B, H, T, Dv),
                "g": -F.softplus(randn(B, H, T)), "beta": torch.sigmoid(randn(B, H, T))}
    if family == "kda":                                       # log-gate per key channel
        return {"q": unit(B, H, T, D), "k": unit(B, H, T, D), "v": randn(B, H, T, Dv),
                "g": -0.6 * F.softplus(randn(B, H, T, D)), "beta": torch.sigmoid(randn(B, H, T))}
    raise KeyError(f"unknown zoo family {family!r}; known: {', '.join(FAMILIES)}")


def canonical_inputs(family: str, B: int = 2, H: int = 4, T: int = 16, D: int = 16,
                     dtype: torch.dtype = torch.float32, seed: int = 0, *,
                     Dv: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """The family's inputs in the canonical layout, keyed by name.

    D is the key (state) dim, Dv the value dim (defaults to D).  Keys are
    L2-normalised for the delta rules, betas in (0, 1), log-gates <= 0.  Drawn on the CPU (the
    same values on every machine), then moved to ``device`` (default: torch's default device).
    """
    gen = torch.Generator().manual_seed(seed)
    drawn = _draw(family, B, H, T, D, D if Dv is None else Dv, gen)
    device = torch.get_default_device() if device is None else device
    return {name: x.to(dtype=dtype, device=device) for name, x in drawn.items()}


def spelling_args(canonical: dict, arg_names: tuple[str, ...], time_dim: int) -> tuple:
    """Positional args of one spelling from canonical inputs."""
    args = []
    for name in arg_names:
        if name in DERIVED_KEYS:
            src, forward, _ = DERIVED_KEYS[name]
            x = forward(canonical[src])
        else:
            x = canonical[name]
        args.append(x if name in STATIC_KEYS else to_time_dim(x, time_dim))
    return tuple(args)


def canonical_from_args(args: tuple, arg_names: tuple[str, ...], time_dim: int) -> dict:
    """Inverse of ``spelling_args``."""
    out = {}
    for name, x in zip(arg_names, args):
        if name not in STATIC_KEYS:
            x = from_time_dim(x, time_dim)
        if name in DERIVED_KEYS:
            src, _, inverse = DERIVED_KEYS[name]
            out[src] = inverse(x)
        else:
            out[name] = x
    return out
