"""The zoo's registry: every naive spelling with what the compiler should find.

``MODELS[name]`` is a ``ZooEntry``: the plain function, how to build its
positional inputs, the update kind it implements, where its time axis is and
whether it reads the state after or before the update.  Spellings that share
``(family, variant, readout)`` compute the same function on the same data
(after layout permutations).  ``entry.reference(*args)`` computes the same
thing with the hand-written chunkwise forms of ``reference.py``.

``LAYERS[name]`` is a ``LayerEntry`` for the ``nn.Module`` layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import deltanet, gated_deltanet, gla, kda, linear_attention, mamba2, reference, retnet
from .inputs import canonical_from_args, canonical_inputs, spelling_args, to_time_dim

__all__ = ["ZooEntry", "LayerEntry", "MODELS", "LAYERS", "family_reference"]


@dataclass(frozen=True)
class ZooEntry:
    """One naive spelling of a fast-weight recurrence.

    name, family, kind:  ``kind`` is the update kind the compiler should prove
        ("additive", "decay", "delta", "gated_delta").
    fn:                  the plain function with its per-token loop.
    make_inputs:         ``(B=2, H=4, T=16, D=16, dtype=float32, seed=0, *, Dv=None,
                         device=None) -> tuple`` of positional args for ``fn``.
    time_dim:            dim of T in the first input (and in the output).
    readout:             "after" (o_t = S_t^T q_t) or "before" (o_t = S_{t-1}^T q_t).
    returns_state:       ``fn(*args)`` returns ``(o, final_state)`` with a tensor state.
    state_layout:        "kv" (state [..., dk, dv]) or "vk" ([..., dv, dk]), as the loop stores it.
    state_kwarg:         keyword that makes ``fn`` return ``(o, final_state)``, if any
                         (with it False, ``fn`` returns ``o`` or ``(o, None)``).
    variant:             "standard", or the name of a deliberately different function.
    arg_names:           canonical name of each positional arg ("alpha" = exp(g)).
    """

    name: str
    family: str
    kind: str
    fn: Callable
    make_inputs: Callable[..., tuple]
    time_dim: int
    readout: str
    returns_state: bool
    state_layout: str = "kv"
    state_kwarg: str | None = None
    variant: str = "standard"
    arg_names: tuple[str, ...] = ()

    def reference(self, *args, chunk_size: int = 64):
        """Chunkwise reference on ``fn``'s positional args -> ``(o, final_state)`` in
        this entry's layouts (state in ``state_layout``; None where the loop keeps
        more than one state), whatever ``fn`` itself returns."""
        canonical = canonical_from_args(args, self.arg_names, self.time_dim)
        o, S = family_reference(self.family, canonical, variant=self.variant,
                                readout=self.readout, chunk_size=chunk_size)
        o = to_time_dim(o, self.time_dim)
        if S is not None and self.state_layout == "vk":
            S = S.transpose(-1, -2)
        return o, S


@dataclass(frozen=True)
class LayerEntry:
    """An ``nn.Module`` layer with a naive per-token loop in ``forward``.

    make_module(seed=0, d_model=64, n_heads=4, head_dim=16) -> nn.Module;
    make_inputs(B=2, T=16, d_model=64, dtype=float32, seed=0, *, device=None) -> (x,),
    x [B, T, d_model].
    """

    name: str
    family: str
    kind: str
    cls: type
    make_module: Callable[..., nn.Module]
    make_inputs: Callable[..., tuple]
    time_dim: int = 1
    readout: str = "after"


# --------------------------------------------------------------------------- references
def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_call(family: str, c: dict, variant: str):
    """(chunk_fn, positional tensors, kwargs) computing ``family`` with readout after."""
    if family == "linear_attention":
        if variant == "normalized":
            return _normalized_linear_attention, (c["q"], c["k"], c["v"]), {}
        return reference.chunk_linear_attention, (c["q"], c["k"], c["v"]), {}
    if family == "retnet":
        B, H, T, K = c["q"].shape
        acc = _acc(c["q"])
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64, device=c["q"].device))
        g = gamma.log().to(acc)[None, :, None].expand(B, H, T)
        k = c["k"].to(acc) * K ** -0.5
        return reference.chunk_simple_gla, (c["q"].to(acc), k, c["v"].to(acc), g), {"scale": 1.0}
    if family == "mamba2":
        acc = _acc(c["x"])
        dt, A = c["dt"].to(acc), c["A"].to(acc)
        v = c["x"].to(acc) * dt[..., None]
        return reference.chunk_simple_gla, (c["C"].to(acc), c["B"].to(acc), v, dt * A[None, :, None]), \
            {"scale": 1.0}
    if family == "gla":
        return reference.chunk_gla, (c["q"], c["k"], c["v"], c["g"]), {}
    if family == "deltanet":
        return reference.chunk_delta_rule, (c["q"], c["k"], c["v"], c["beta"]), {}
    if family == "gated_deltanet":
        v = c["v"]
        if variant == "gate_after":          # S = a (I - b k k^T) S + (a b) k v^T
            v = v.to(_acc(v)) * c["g"].to(_acc(v)).exp()[..., None]
        return reference.chunk_gated_delta_rule, (c["q"], c["k"], v, c["g"], c["beta"]), {}
    if family == "kda":
        return reference.chunk_kda, (c["q"], c["k"], c["v"], c["g"], c["beta"]), {}
    raise KeyError(f"no chunkwise reference for family {family!r}")


def _normalized_linear_attention(q, k, v, chunk_size: int = 64, eps: float = 1e-6):
    """elu+1 feature map and normaliser z_t = sum phi(k): one chunkwise pass
    with a column of ones appended to v gives numerator and denominator."""
    acc = _acc(q)
    phi_q, phi_k = F.elu(q.to(acc)) + 1, F.elu(k.to(acc)) + 1
    Dv = v.shape[-1]
    v1 = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
    o, _ = reference.chunk_linear_attention(phi_q, phi_k, v1, chunk_size, scale=1.0)
    return (o[..., :Dv] / (o[..., Dv:] + eps)).to(q.dtype), None


def family_reference(family: str, canonical: dict, variant: str = "standard",
                     readout: str = "after", chunk_size: int = 64):
    """Chunkwise reference on canonical ([B, H, T, ...]) inputs -> (o, state [.., dk, dv])."""
    fn, tensors, kwargs = _chunk_call(family, canonical, variant)
    out_dtype = next(iter(canonical.values())).dtype      # q (or Mamba's x)
    if readout == "before":
        o, S = reference.readout_before(fn, *tensors, chunk_size=chunk_size, **kwargs)
    else:
        o, S = fn(*tensors, chunk_size=chunk_size, **kwargs)
    return o.to(out_dtype), S


# --------------------------------------------------------------------------- entries
def _make_inputs(family, arg_names, time_dim, B=2, H=4, T=16, D=16, dtype=torch.float32,
                 seed=0, *, Dv=None, device=None) -> tuple:
    c = canonical_inputs(family, B, H, T, D, dtype, seed, Dv=Dv, device=device)
    return spelling_args(c, arg_names, time_dim)


_ARGS = {
    "linear_attention": ("q", "k", "v"),
    "retnet": ("q", "k", "v"),
    "mamba2": ("x", "dt", "A", "B", "C"),
    "gla": ("q", "k", "v", "g"),
    "deltanet": ("q", "k", "v", "beta"),
    "gated_deltanet": ("q", "k", "v", "g", "beta"),
    "kda": ("q", "k", "v", "g", "beta"),
}
_KIND = {"linear_attention": "additive", "retnet": "decay", "mamba2": "decay", "gla": "decay",
         "deltanet": "delta", "gated_deltanet": "gated_delta", "kda": "gated_delta"}


def _entry(family, fn, time_dim, *, readout="after", returns_state=False, state_layout="kv",
           state_kwarg=None, variant="standard", arg_names=None) -> ZooEntry:
    arg_names = tuple(arg_names or _ARGS[family])
    return ZooEntry(
        name=fn.__name__, family=family, kind=_KIND[family], fn=fn,
        make_inputs=functools.partial(_make_inputs, family, arg_names, time_dim),
        time_dim=time_dim, readout=readout, returns_state=returns_state,
        state_layout=state_layout, state_kwarg=state_kwarg, variant=variant,
        arg_names=arg_names)


_OFS = "output_final_state"
_ENTRIES = [
    _entry("linear_attention", linear_attention.linear_attention_einsum, 2, state_kwarg=_OFS),
    _entry("linear_attention", linear_attention.linear_attention_matmul_bthd, 1, state_layout="vk"),
    _entry("linear_attention", linear_attention.linear_attention_tbhd, 0),
    _entry("linear_attention", linear_attention.linear_attention_readout_before, 1,
           readout="before", state_kwarg=_OFS),
    _entry("linear_attention", linear_attention.linear_attention_normalized, 2, variant="normalized"),
    _entry("retnet", retnet.retnet_recurrent, 2, state_kwarg=_OFS),
    _entry("retnet", retnet.retnet_recurrent_bthd, 1, state_layout="vk"),
    _entry("retnet", retnet.retnet_readout_before, 2, readout="before", returns_state=True,
           state_kwarg=_OFS),
    _entry("mamba2", mamba2.mamba2_ssd_naive, 1, state_layout="vk",
           state_kwarg="return_final_states"),
    _entry("mamba2", mamba2.mamba2_scan_bhtd, 2, returns_state=True),
    _entry("gla", gla.gla_naive_bhtd, 2, state_kwarg=_OFS),
    _entry("gla", gla.gla_einsum_bthd, 1, state_layout="vk"),
    _entry("gla", gla.gla_factor_tbhd, 0, state_kwarg=_OFS, arg_names=("q", "k", "v", "alpha")),
    _entry("deltanet", deltanet.deltanet_fla, 2, returns_state=True, state_kwarg=_OFS),
    _entry("deltanet", deltanet.deltanet_matmul_bthd, 1),
    _entry("deltanet", deltanet.deltanet_vk_einsum, 1, state_layout="vk", state_kwarg=_OFS),
    _entry("deltanet", deltanet.deltanet_inner_grad, 1),
    _entry("gated_deltanet", gated_deltanet.gated_deltanet_fla, 2, state_kwarg=_OFS),
    _entry("gated_deltanet", gated_deltanet.gated_deltanet_matmul_bthd, 1, state_layout="vk"),
    _entry("gated_deltanet", gated_deltanet.gated_deltanet_gate_after, 0, variant="gate_after",
           arg_names=("q", "k", "v", "alpha", "beta")),
    _entry("kda", kda.kda_fla, 2, state_kwarg=_OFS),
    _entry("kda", kda.kda_matmul_bthd, 1, state_layout="vk"),
]
MODELS: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


# --------------------------------------------------------------------------- layers
def _make_module(cls, seed=0, d_model=64, n_heads=4, head_dim=16) -> nn.Module:
    return cls(d_model, n_heads, head_dim, seed=seed)


def _layer_inputs(B=2, T=16, d_model=64, dtype=torch.float32, seed=0, *, device=None) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    device = torch.get_default_device() if device is None else device
    return (torch.randn(B, T, d_model, generator=gen, device=gen.device).to(dtype=dtype, device=device),)


LAYERS: dict[str, LayerEntry] = {
    "deltanet_layer": LayerEntry("deltanet_layer", "deltanet", "delta", deltanet.DeltaNetLayer,
                                 functools.partial(_make_module, deltanet.DeltaNetLayer),
                                 _layer_inputs),
    "gla_layer": LayerEntry("gla_layer", "gla", "decay", gla.GLALayer,
                            functools.partial(_make_module, gla.GLALayer), _layer_inputs),
}
