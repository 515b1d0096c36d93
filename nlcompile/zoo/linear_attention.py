"""Linear attention (Katharopoulos et al., 2020), naive per-token loops.

    S_t = S_{t-1} + k_t v_t^T            (kind: additive)
    o_t = S_t^T (scale * q_t)            (readout after; one spelling reads before)

Several spellings of the same recurrence, the way research code writes it:
different layouts, state orientations, einsum / matmul / broadcast-sum, list
append + stack vs preallocated outputs.  ``scale`` defaults to dk ** -0.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_attention_einsum(q, k, v, scale=None, initial_state=None, output_final_state=False):
    """[B, H, T, D] inputs; fp32 state [B, H, dk, dv]; einsum; list append + stack."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(acc)
    outputs = []
    for t in range(T):
        q_t = q[:, :, t].to(acc) * scale
        k_t = k[:, :, t].to(acc)
        v_t = v[:, :, t].to(acc)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    o = torch.stack(outputs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)


def linear_attention_matmul_bthd(q, k, v):
    """[B, T, H, D] inputs; state stored transposed, [B, H, dv, dk]; matmul;
    preallocated output written in place; returns o only."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q = q * (K ** -0.5)
    o = torch.zeros(B, T, H, V, dtype=q.dtype, device=q.device)
    S = torch.zeros(B, H, V, K, dtype=torch.float32, device=q.device)
    for t in range(T):
        k_t = k[:, t].unsqueeze(-2)                    # [B, H, 1, dk]
        v_t = v[:, t].unsqueeze(-1)                    # [B, H, dv, 1]
        S = S.clone()
        S = S + v_t @ k_t                              # S^T += v k^T
        o_t = S @ q[:, t].to(S.dtype).unsqueeze(-1)    # [B, H, dv, 1]
        o[:, t] = o_t.squeeze(-1).to(o.dtype)
    return o


def linear_attention_tbhd(q, k, v, scale=None):
    """[T, B, H, D] inputs (time first); state kept in the *input* dtype;
    broadcast-multiply-and-sum; torch.cat of unsqueezed steps."""
    T, B, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(T):
        S = S + k[t][..., :, None] * v[t][..., None, :]
        o_t = (S * (q[t] * scale)[..., :, None]).sum(-2)
        outs.append(o_t.unsqueeze(0))
    return torch.cat(outs, dim=0)


def linear_attention_readout_before(q, k, v, scale=None, initial_state=None,
                                    output_final_state=False):
    """[B, T, H, D] API that transposes to [B, H, T, D], loops, and transposes back.

    Reads the state BEFORE the update: o_t = S_{t-1}^T q_t (a strictly causal
    memory, the token does not see its own key/value).
    """
    in_dtype = q.dtype
    dtype = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    B, H, T, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=dtype, device=q.device)
    if initial_state is not None:
        S += initial_state
    o = torch.zeros(B, H, T, V, dtype=dtype, device=q.device)
    for t in range(T):
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
    o = o.transpose(1, 2).to(in_dtype)
    return o, (S if output_final_state else None)


def linear_attention_normalized(q, k, v, eps=1e-6):
    """Katharopoulos' causal linear attention with feature map elu + 1 and a
    normaliser state z_t = z_{t-1} + phi(k_t):

        o_t = S_t^T phi(q_t) / (z_t^T phi(q_t) + eps)

    [B, H, T, D] inputs, matmul, two carried states, no scale.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    phi_q = F.elu(q.to(acc)) + 1
    phi_k = F.elu(k.to(acc)) + 1
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    z = torch.zeros(B, H, K, dtype=acc, device=q.device)
    outputs = []
    for t in range(T):
        k_t = phi_k[:, :, t]
        S = S + k_t.unsqueeze(-1) @ v[:, :, t].to(acc).unsqueeze(-2)
        z = z + k_t
        q_t = phi_q[:, :, t].unsqueeze(-2)             # [B, H, 1, dk]
        num = (q_t @ S).squeeze(-2)                     # [B, H, dv]
        den = (q_t @ z.unsqueeze(-1)).squeeze(-2)       # [B, H, 1]
        outputs.append(num / (den + eps))
    return torch.stack(outputs, dim=2).to(q.dtype)
