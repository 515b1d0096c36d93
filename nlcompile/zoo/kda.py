"""Kimi Delta Attention (KDA; Kimi Linear, Moonshot AI, 2025), naive per-token loops.

    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T   (kind: gated_delta)
    o_t = S_t^T (scale * q_t)                                         (readout after)

i.e. the gated delta rule with a gate per key channel: first decay the state
row by row (row c of S [dk, dv] times exp(g_t[c])), then take the delta step
``S = S + k (b (v - S^T k))^T`` on the decayed state.  g_t <= 0 is a log-gate
[dk] per head and token, b_t in (0, 1), keys L2-normalised.  Unlike the scalar
gate of Gated DeltaNet, Diag(exp(g_t)) does not commute with (I - b k k^T), so
the order (decay first) is part of the function.  Same math as
flash-linear-attention's ``fla.ops.kda`` (``naive_recurrent_kda``).
"""
from __future__ import annotations

import torch


def kda_fla(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """[B, H, T, D] inputs, flash-linear-attention's naive recurrent style:
    ``S = S * g_i.exp()[..., None]`` (g_i [B, H, K]: one factor per state row),
    then the delta step with broadcast-and-sum; preallocated output; returns
    (o, S or None)."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    q = q * scale
    S = k.new_zeros(B, H, K, V)
    if initial_state is not None:
        S = S + initial_state
    o = torch.zeros(B, H, T, V, dtype=acc, device=q.device)
    for i in range(T):
        q_i, k_i, v_i, g_i, b_i = q[:, :, i], k[:, :, i], v[:, :, i], g[:, :, i], beta[:, :, i]
        S = S * g_i.exp()[..., None]
        S = S + torch.einsum("bhk,bhv->bhkv", b_i[..., None] * k_i,
                             v_i - (k_i[..., None] * S).sum(-2))
        o[:, :, i] = torch.einsum("bhk,bhkv->bhv", q_i, S)
    if not output_final_state:
        S = None
    return o.to(dtype), S


def kda_matmul_bthd(q, k, v, g, beta):
    """[B, T, H, D] inputs; state stored transposed, [B, H, dv, dk], so the
    per-channel decay scales its last dim (columns); the delta step as
    ``u = b (v - S k)``, ``S = S + u k^T`` with matmuls; list + stack."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, V, K, dtype=acc, device=q.device)
    outs = []
    for t in range(T):
        q_t, k_t, v_t, g_t = (x[:, t].to(acc) for x in (q, k, v, g))
        b_t = beta[:, t].to(acc)[..., None]                         # [B, H, 1]
        S = S * torch.exp(g_t).unsqueeze(-2)                        # [B, H, 1, K]
        u_t = b_t * (v_t - (S @ k_t.unsqueeze(-1)).squeeze(-1))     # [B, H, V]
        S = S + u_t.unsqueeze(-1) @ k_t.unsqueeze(-2)
        outs.append((S @ (q_t * K ** -0.5).unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, dim=1).to(q.dtype)
