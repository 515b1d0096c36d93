"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2025), naive per-token loops.

    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T     (kind: gated_delta)
    o_t = S_t^T (scale * q_t)                                     (readout after)

i.e. decay the state, then take the delta step.  g_t <= 0 is a log-gate per
head and token, b_t in (0, 1), keys L2-normalised.  One spelling applies the
gate AFTER the delta step (variant "gate_after"), a different function:

    S_t = a_t (S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T)
        = a_t (I - b_t k_t k_t^T) S_{t-1} + a_t b_t k_t v_t^T
"""
from __future__ import annotations

import torch


def gated_deltanet_fla(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """[B, H, T, D] inputs, flash-linear-attention's naive recurrent style:
    ``S = S * exp(g_i)[..., None, None]`` then the delta step with
    broadcast-and-sum; preallocated output; returns (o, S or None)."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = 1 / K ** 0.5
    o = torch.zeros(B, H, T, V, dtype=acc, device=q.device)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    if initial_state is not None:
        S = S + initial_state
    q = q * scale
    for i in range(T):
        q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]
        g_i, b_i = g[:, :, i].exp(), beta[:, :, i]
        S = S.clone() * g_i[..., None, None]
        v_new = (v_i - (S * k_i[..., None]).sum(-2)) * b_i[..., None]
        S = S + k_i.unsqueeze(-1) * v_new.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q_i, S)
    if not output_final_state:
        S = None
    return o.to(dtype), S


def gated_deltanet_matmul_bthd(q, k, v, g, beta):
    """[B, T, H, D] inputs; state stored [B, H, dv, dk]; the delta step in
    expanded form ``S - (S k)(b k)^T + (b v) k^T``; matmul; list + stack."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, V, K, dtype=acc, device=q.device)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = (x[:, t].to(acc) for x in (q, k, v))
        b_t = beta[:, t].to(acc)[..., None]                        # [B, H, 1]
        S = S * torch.exp(g[:, t].to(acc))[..., None, None]
        S = S - (S @ k_t.unsqueeze(-1)) @ (b_t * k_t).unsqueeze(-2) \
            + (b_t * v_t).unsqueeze(-1) @ k_t.unsqueeze(-2)
        outs.append((S @ (q_t * K ** -0.5).unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, dim=1).to(q.dtype)


def gated_deltanet_gate_after(q, k, v, alpha, beta):
    """[T, B, H, D] inputs (time first); decay given as a factor alpha_t = exp(g_t)
    [T, B, H] and applied AFTER the delta step:
    ``S = alpha_t * (S + k (b (v - S^T k))^T)``; broadcast-and-sum; fp32 state
    (type promotion carries fp64 through); torch.cat of unsqueezed steps."""
    T, B, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    outs = []
    for t in range(T):
        k_t, v_t, b_t = k[t], v[t], beta[t][..., None]
        u_t = b_t * (v_t - (S * k_t[..., :, None]).sum(-2))
        S = alpha[t][..., None, None] * (S + k_t[..., :, None] * u_t[..., None, :])
        o_t = (S * (q[t] * K ** -0.5)[..., :, None]).sum(-2)
        outs.append(o_t.unsqueeze(0))
    return torch.cat(outs, dim=0).to(q.dtype)
