"""RetNet retention (Sun et al., 2023), recurrent form, naive per-token loops.

    gamma_h = 1 - 2 ** (-5 - h)          (fixed per head, computed from H inside)
    S_t = gamma_h S_{t-1} + (dk ** -0.5 k_t) v_t^T     (kind: decay, scalar per head)
    o_t = S_t^T q_t                      (readout after; one spelling reads before)

The key is scaled by dk ** -0.5 (as torchscale does), so the state holds the
scaled keys.
"""
from __future__ import annotations

import torch


def _retnet_gamma(H: int, dtype, device) -> torch.Tensor:
    return 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=dtype, device=device))


def retnet_recurrent(q, k, v, initial_state=None, output_final_state=False):
    """[B, H, T, D] inputs; fp32 state [B, H, dk, dv]; einsum; list + stack."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    in_dtype = q.dtype
    acc = torch.promote_types(in_dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc) * K ** -0.5, v.to(acc)
    gamma = 1 - 2 ** (-5 - torch.arange(H, dtype=acc, device=q.device))
    kv = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    if initial_state is not None:
        kv = kv + initial_state
    outs = []
    for t in range(T):
        kv = kv * gamma[None, :, None, None] + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", kv, q[:, :, t]))
    o = torch.stack(outs, dim=2).to(in_dtype)
    return o, (kv if output_final_state else None)


def retnet_recurrent_bthd(q, k, v):
    """[B, T, H, D] inputs; state stored [B, H, dv, dk]; matmul; preallocated
    output; ``S = S.clone()`` each step as in flash-linear-attention's naive code."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    in_dtype = q.dtype
    dtype = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k = k * K ** -0.5
    decay = _retnet_gamma(H, dtype, q.device).view(1, H, 1, 1)
    S = q.new_zeros(B, H, V, K)
    o = torch.empty(B, T, H, V, dtype=dtype, device=q.device)
    for t in range(T):
        S = S.clone()
        S = decay * S + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2)
        o[:, t] = (S @ q[:, t].unsqueeze(-1)).squeeze(-1)
    return o.to(in_dtype)


def retnet_readout_before(q, k, v, output_final_state=True):
    """[B, H, T, D] inputs; broadcast-multiply-and-sum; reads the state BEFORE
    the update: o_t = S_{t-1}^T q_t.  Returns (o, final_state)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    gamma = _retnet_gamma(H, torch.float32, q.device)[:, None, None]   # [H, 1, 1]
    S = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t] * K ** -0.5, v[:, :, t]
        outs.append((S * q_t[..., None]).sum(-2))
        S = gamma * S + k_t[..., :, None] * v_t[..., None, :]
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)
