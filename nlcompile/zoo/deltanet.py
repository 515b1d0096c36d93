"""DeltaNet (Schlag et al., 2021; Yang et al., 2024), naive per-token loops.

    S_t = S_{t-1} + k_t (b_t (v_t - S_{t-1}^T k_t))^T      (kind: delta)
        = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    o_t = S_t^T (scale * q_t)                               (readout after), scale = dk ** -0.5

Keys (and queries) are L2-normalised by the caller, b_t in (0, 1) (sigmoid).
``DeltaNetLayer`` is an ``nn.Module`` written the same naive way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._params import init_params, skip_linear


def deltanet_fla(q, k, v, beta, scale=None, initial_state=None, output_final_state=True):
    """[B, H, T, D] inputs, flash-linear-attention's naive ``delta_rule_recurrence``
    style: ``v_new = (v_i - (S * k_i[..., None]).sum(-2)) * beta_i``, ``S.clone()``,
    in-place writes into a preallocated output.  Returns (o, S)."""
    orig_dtype = q.dtype
    acc = torch.promote_types(orig_dtype, torch.float32)
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    o = torch.zeros_like(v)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    q = q * scale
    if beta.ndim < v.ndim:
        beta = beta[..., None]
    if initial_state is not None:
        S += initial_state
    for i in range(T):
        _k = k[:, :, i]
        _q = q[:, :, i]
        _v = v[:, :, i].clone()
        beta_i = beta[:, :, i]
        _v = _v - (S.clone() * _k[..., None]).sum(-2)
        _v = _v * beta_i
        S = S.clone() + _k.unsqueeze(-1) * _v.unsqueeze(-2)
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", _q, S)
    S = None if output_final_state is False else S
    return o.to(orig_dtype), S


def deltanet_matmul_bthd(q, k, v, beta):
    """[B, T, H, D] inputs; fp32 state [B, H, dk, dv]; matmul on column vectors,
    ``S = S + k (b (v - S^T k))^T``; list + stack; returns o only."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    outs = []
    for t in range(T):
        q_t = q[:, t].to(acc).unsqueeze(-1) * K ** -0.5        # [B, H, dk, 1]
        k_t = k[:, t].to(acc).unsqueeze(-1)                    # [B, H, dk, 1]
        v_t = v[:, t].to(acc).unsqueeze(-1)                    # [B, H, dv, 1]
        b_t = beta[:, t].to(acc)[..., None, None]              # [B, H, 1, 1]
        v_old = S.transpose(-1, -2) @ k_t                      # [B, H, dv, 1]
        S = S + k_t @ (b_t * (v_t - v_old)).transpose(-1, -2)
        o_t = S.transpose(-1, -2) @ q_t
        outs.append(o_t.squeeze(-1))
    return torch.stack(outs, dim=1).to(q.dtype)


def deltanet_vk_einsum(q, k, v, beta, scale=None, initial_state=None, output_final_state=False):
    """[B, T, H, D] API that transposes to [B, H, T, D] and back; state stored
    [B, H, dv, dk]; einsum; beta applied to the key BEFORE the subtraction:
    ``S = S - (S k - v) (b k)^T``; preallocated output."""
    in_dtype = q.dtype
    acc = torch.promote_types(in_dtype, torch.float32)
    q, k, v = (x.transpose(1, 2).to(acc) for x in (q, k, v))
    beta = beta.transpose(1, 2).to(acc)
    B, H, T, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K)
    if initial_state is not None:
        S = S + initial_state
    o = q.new_zeros(B, H, T, V)
    for t in range(T):
        k_t = k[:, :, t]
        err = torch.einsum("bhvk,bhk->bhv", S, k_t) - v[:, :, t]
        S = S - torch.einsum("bhv,bhk->bhvk", err, beta[:, :, t, None] * k_t)
        o[:, :, t] = torch.einsum("bhvk,bhk->bhv", S, q[:, :, t] * scale)
    o = o.transpose(1, 2).to(in_dtype)
    return o, (S if output_final_state else None)


def deltanet_inner_grad(q, k, v, beta):
    """[B, T, H, D] inputs; the TTT-Linear reading of the delta rule: each token
    takes one gradient step of size b_t on the inner loss 0.5 ||S^T k_t - v_t||^2
    (``torch.func.grad`` inside the loop); fp32 state [B, H, dk, dv]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)

    def inner_loss(S, k_t, v_t):
        pred = torch.einsum("bhkv,bhk->bhv", S, k_t)
        return 0.5 * ((pred - v_t) ** 2).sum()

    inner_grad = torch.func.grad(inner_loss)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    outs = []
    for t in range(T):
        k_t, v_t = k[:, t].to(acc), v[:, t].to(acc)
        S = S - beta[:, t].to(acc)[..., None, None] * inner_grad(S, k_t, v_t)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(acc)) * K ** -0.5)
    return torch.stack(outs, dim=1).to(q.dtype)


class DeltaNetLayer(nn.Module):
    """DeltaNet token mixer: x [B, T, d_model] -> [B, T, d_model].

    q/k/v/beta projections, SiLU then L2 normalisation on q and k,
    beta = sigmoid(x W_b), the per-token delta-rule loop, output projection.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, seed: int = 0):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        inner = n_heads * head_dim
        self.q_proj = skip_linear(d_model, inner)
        self.k_proj = skip_linear(d_model, inner)
        self.v_proj = skip_linear(d_model, inner)
        self.b_proj = skip_linear(d_model, n_heads)
        self.o_proj = skip_linear(inner, d_model)
        init_params(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = F.normalize(F.silu(self.q_proj(x)).view(B, T, H, D), p=2, dim=-1)
        k = F.normalize(F.silu(self.k_proj(x)).view(B, T, H, D), p=2, dim=-1)
        v = self.v_proj(x).view(B, T, H, D)
        beta = torch.sigmoid(self.b_proj(x))                   # [B, T, H]
        acc = torch.promote_types(x.dtype, torch.float32)
        S = torch.zeros(B, H, D, D, dtype=acc, device=x.device)
        outs = []
        for t in range(T):
            k_t = k[:, t].to(acc)
            v_t = v[:, t].to(acc)
            b_t = beta[:, t].to(acc)[..., None]
            pred = torch.einsum("bhkv,bhk->bhv", S, k_t)
            S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v_t - pred))
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(acc) * D ** -0.5))
        o = torch.stack(outs, dim=1).to(x.dtype)
        return self.o_proj(o.reshape(B, T, H * D))
