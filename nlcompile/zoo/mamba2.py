"""Mamba-2 SSD (Dao & Gu, 2024), the selective state update as a per-token loop.

    a_t = exp(dt_t * A_h)                          (scalar decay per head and token)
    h_t = a_t h_{t-1} + (dt_t x_t) (x) B_t         (kind: decay)
    y_t = h_t C_t                                  (readout after)

In linear-attention terms: q = C, k = B, v = dt * x, log-gate g = dt * A.
x: [.., P] (head dim), B, C: [.., N] (state dim; one group per head), dt > 0
(after softplus), A: [H] < 0.  No D skip term, no scale.  Mamba stores the
state as [headdim, dstate] = [dv, dk].
"""
from __future__ import annotations

import torch


def mamba2_ssd_naive(x, dt, A, B, C, initial_states=None, return_final_states=False):
    """[batch, T, H, *] inputs; state [batch, H, P, N] (dv x dk) in fp32; the
    decay exp(dt A) is taken inside the loop; broadcast outer product, einsum
    readout, list + stack.  Returns y, or (y, final_states)."""
    batch, T, H, P = x.shape
    N = B.shape[-1]
    in_dtype = x.dtype
    acc = torch.promote_types(in_dtype, torch.float32)
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))
    h = torch.zeros(batch, H, P, N, dtype=acc, device=x.device)
    if initial_states is not None:
        h = h + initial_states.to(acc)
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t] * A)                                  # [batch, H]
        dBx = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        h = h * dA[:, :, None, None] + dBx
        y = torch.einsum("bhpn,bhn->bhp", h, C[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1).to(in_dtype)
    if return_final_states:
        return y, h
    return y


def mamba2_scan_bhtd(x, dt, A, B, C, initial_state=None):
    """[batch, H, T, *] inputs; log-gate g = dt * A computed before the loop and
    exponentiated inside it; state [batch, H, N, P] (dk x dv); matmul;
    preallocated output.  Returns (y, final_state)."""
    batch, H, T, P = x.shape
    N = B.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = dt.to(acc) * A.to(acc)[None, :, None]                         # [batch, H, T]
    state = torch.zeros(batch, H, N, P, dtype=acc, device=x.device)
    if initial_state is not None:
        state = state + initial_state
    y = torch.zeros(batch, H, T, P, dtype=acc, device=x.device)
    for t in range(T):
        u_t = dt[:, :, t, None].to(acc) * x[:, :, t].to(acc)          # [batch, H, P]
        state = torch.exp(g[:, :, t])[..., None, None] * state \
            + B[:, :, t].to(acc).unsqueeze(-1) @ u_t.unsqueeze(-2)
        y[:, :, t] = (C[:, :, t].to(acc).unsqueeze(-2) @ state).squeeze(-2)
    return y.to(x.dtype), state
