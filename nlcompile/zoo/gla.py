"""Gated Linear Attention (Yang et al., 2024), naive per-token loops.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T     (kind: decay, per key channel)
    o_t = S_t^T (scale * q_t)                    (readout after), scale = dk ** -0.5

g_t in R^{dk} is a log-gate (<= 0).  One spelling takes the decay as a factor
alpha_t = exp(g_t) instead.  ``GLALayer`` is an ``nn.Module`` written the same
naive way (log-sigmoid gate / 16, output gate, per-head RMSNorm).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._params import init_params, skip_linear


def gla_naive_bhtd(q, k, v, gk, scale=None, initial_state=None, output_final_state=False):
    """[B, H, T, D] inputs, flash-linear-attention's naive recurrent style:
    fp32 state [B, H, dk, dv], gate exponentiated inside the loop,
    broadcast-multiply-and-sum readout, preallocated output."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    q, k, v, gk = (x.to(acc) for x in (q, k, v, gk))
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    o = torch.zeros_like(v)
    h = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    if initial_state is not None:
        h += initial_state
    for i in range(T):
        q_i = q[:, :, i] * scale
        k_i = k[:, :, i]
        v_i = v[:, :, i].clone()
        gk_i = gk[:, :, i].exp()
        kv_i = k_i[..., None] * v_i[..., None, :]
        h = h * gk_i[..., None] + kv_i
        o_i = (q_i[..., None] * h).sum(-2)
        o[:, :, i] = o_i
    if not output_final_state:
        h = None
    return o.to(dtype), h


def gla_einsum_bthd(q, k, v, g):
    """[B, T, H, D] inputs; state stored [B, H, dv, dk] (decay on the last axis);
    einsum; list + stack; returns o only."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, V, K, dtype=acc, device=q.device)
    outs = []
    for t in range(T):
        q_t = q[:, t].to(acc) * K ** -0.5
        decay = torch.exp(g[:, t].to(acc))                           # [B, H, dk]
        S = S * decay[:, :, None, :] + torch.einsum("bhv,bhk->bhvk", v[:, t].to(acc), k[:, t].to(acc))
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q_t))
    return torch.stack(outs, dim=1).to(q.dtype)


def gla_factor_tbhd(q, k, v, alpha, scale=None, initial_state=None, output_final_state=False):
    """[T, B, H, D] inputs (time first); the decay comes as a factor alpha in
    (0, 1] per key channel, not a log-gate; fp32 state (type promotion carries
    fp64 through); matmul; torch.cat of unsqueezed steps."""
    T, B, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    if initial_state is not None:
        S = S + initial_state
    outs = []
    for t in range(T):
        S = alpha[t].unsqueeze(-1) * S + k[t].unsqueeze(-1) @ v[t].unsqueeze(-2)
        o_t = (q[t].to(S.dtype).unsqueeze(-2) * scale) @ S
        outs.append(o_t.squeeze(-2).unsqueeze(0))
    o = torch.cat(outs, dim=0).to(q.dtype)
    return o, (S if output_final_state else None)


class GLALayer(nn.Module):
    """GLA token mixer: x [B, T, d_model] -> [B, T, d_model].

    q/k/v projections, a low-rank per-key-channel gate
    g = logsigmoid(x W_g1 W_g2 + b) / 16, the per-token decayed loop, then a
    per-head RMSNorm, a swish output gate and the output projection.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, seed: int = 0,
                 gate_logit_normalizer: float = 16.0, gate_rank: int = 16):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.gate_logit_normalizer = gate_logit_normalizer
        inner = n_heads * head_dim
        self.q_proj = skip_linear(d_model, inner)
        self.k_proj = skip_linear(d_model, inner)
        self.v_proj = skip_linear(d_model, inner)
        self.gk_proj = nn.Sequential(skip_linear(d_model, gate_rank),
                                     skip_linear(gate_rank, inner, bias=True))
        self.g_proj = skip_linear(d_model, inner)
        self.o_proj = skip_linear(inner, d_model)
        self.norm_weight = nn.Parameter(torch.empty(head_dim))
        init_params(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        acc = torch.promote_types(x.dtype, torch.float32)
        q = self.q_proj(x).view(B, T, H, D).to(acc) * D ** -0.5
        k = self.k_proj(x).view(B, T, H, D).to(acc)
        v = self.v_proj(x).view(B, T, H, D).to(acc)
        gk = F.logsigmoid(self.gk_proj(x).view(B, T, H, D).to(acc)) / self.gate_logit_normalizer
        S = torch.zeros(B, H, D, D, dtype=acc, device=x.device)
        o = torch.zeros(B, T, H, D, dtype=acc, device=x.device)
        for t in range(T):
            S = S * gk[:, t].exp().unsqueeze(-1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
            o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        o = F.rms_norm(o, (D,), self.norm_weight.to(acc), eps=1e-5).to(x.dtype)
        o = o * F.silu(self.g_proj(x)).view(B, T, H, D)
        return self.o_proj(o.reshape(B, T, H * D))
