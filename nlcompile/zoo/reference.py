"""Hand-written chunkwise-parallel forms of the zoo's update rules.

These are the benchmark baselines ("hand-written chunkwise reference") and the
numerical cross-check of the naive loops.  They are written from the equations
in ``MATH.md`` and share nothing with the compiler.

Conventions, for every function here:

* inputs ``[B, H, T, D]`` (time at dim 2), per-token gates / betas ``[B, H, T]``
  (or ``[B, H, T, dk]`` for the per-key-channel gates of GLA and KDA), any ``T``: the ragged
  tail is padded with neutral values (zeros, log-gate 0, beta 0);
* state ``[B, H, dk, dv]``; readout after the update, ``o_t = S_t^T (scale q_t)``;
* computation in fp32 (fp64 stays fp64), output cast back to the input dtype;
* returns ``(o, final_state)``, the final state in fp32 (fp64 for fp64 input).

Everything is batched over all chunks; only the short inter-chunk recurrence
loops over chunks (and for linear attention not even that: it is a cumsum).

    naive:      for t in range(T): S = f(S, k_t, v_t, ...); o_t = S^T q_t
    chunkwise:  O_i = (intra-chunk matmuls on chunk i) + Q_i-side term * S_{i-1}
                S_i = decay_i * S_{i-1} + (chunk i's contribution)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "chunk_linear_attention",
    "chunk_simple_gla",
    "chunk_gla",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_kda",
    "readout_before",
]


# --------------------------------------------------------------------------- helpers
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _pad_chunk(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, H, T, *rest] -> [B, H, N, C, *rest], zero-padding the ragged tail."""
    B, H, T = x.shape[:3]
    n = -(-T // C)
    pad = n * C - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, H, pad, *x.shape[3:])], dim=2)
    return x.reshape(B, H, n, C, *x.shape[3:])


def _unchunk(o: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, H, T, D] (drops the padded tail)."""
    B, H, N, C = o.shape[:4]
    return o.reshape(B, H, N * C, *o.shape[4:])[:, :, :T]


def _initial(initial_state, B, H, K, V, dtype, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, H, K, V, dtype=dtype, device=device)
    return initial_state.to(dtype)


def _causal(C: int, device, strict: bool = False) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _prepare(q, k, v, scale, chunk_size):
    acc = _acc_dtype(q)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    qc = _pad_chunk(q.to(acc) * scale, C)
    kc = _pad_chunk(k.to(acc), C)
    vc = _pad_chunk(v.to(acc), C)
    return acc, qc, kc, vc


def _decayed_recurrence(decay, kv, S):
    """S_i = decay_i * S_{i-1} + kv_i over the chunk axis (dim 2).

    ``decay`` is [B, H, N, 1, 1] (scalar) or [B, H, N, K, 1] (per key channel).
    Returns the states *entering* each chunk, stacked on dim 2, and the final one.
    """
    entering = []
    for n in range(kv.shape[2]):
        entering.append(S)
        S = decay[:, :, n] * S + kv[:, :, n]
    return torch.stack(entering, dim=2), S


# --------------------------------------------------------------------------- additive
def chunk_linear_attention(q, k, v, chunk_size: int = 64, scale: float | None = None,
                           initial_state: torch.Tensor | None = None):
    """S_t = S_{t-1} + k_t v_t^T;  O_i = Q_i S_{i-1} + tril(Q_i K_i^T) V_i."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    acc, qc, kc, vc = _prepare(q, k, v, scale, chunk_size)
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    P = (qc @ kc.transpose(-1, -2)).masked_fill(~_causal(chunk_size, q.device), 0)
    kv = kc.transpose(-1, -2) @ vc                                   # [B, H, N, K, V]
    inclusive = torch.cumsum(kv, dim=2) + S0[:, :, None]
    entering = torch.cat([S0[:, :, None], inclusive[:, :, :-1]], dim=2)
    o = P @ vc + qc @ entering
    return _unchunk(o, T).to(q.dtype), inclusive[:, :, -1]


# --------------------------------------------------------------------------- scalar decay
def chunk_simple_gla(q, k, v, g, chunk_size: int = 64, scale: float | None = None,
                     initial_state: torch.Tensor | None = None):
    """Scalar decay per head and token: S_t = exp(g_t) S_{t-1} + k_t v_t^T (g: [B, H, T]).

    Gamma_rs = exp(G_r - G_s) for r >= s, masked to -inf *before* the exp.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc, qc, kc, vc = _prepare(q, k, v, scale, C)
    G = _pad_chunk(g.to(acc), C).cumsum(-1)                          # [B, H, N, C]
    G_last = G[..., -1:]
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~_causal(C, q.device), -math.inf)
    P = (qc @ kc.transpose(-1, -2)) * diff.exp()
    kv = (kc * (G_last - G).exp()[..., None]).transpose(-1, -2) @ vc
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    entering, S = _decayed_recurrence(G_last.exp()[..., None], kv, S0)
    o = P @ vc + (qc * G.exp()[..., None]) @ entering
    return _unchunk(o, T).to(q.dtype), S


# --------------------------------------------------------------------------- per-channel decay
def _gla_intra_scores(qc, kc, G, sub: int):
    """P_rs = sum_c q_rc k_sc exp(G_rc - G_sc) for s <= r inside each chunk.

    Blocks of ``sub`` x ``sub`` positions: off-diagonal blocks (s in an earlier
    sub-chunk than r) fold the gate relative to the boundary b just before r's
    sub-chunk: exp(G_r - G_b) and exp(G_b - G_s) both have exponents <= 0 for
    decays, so nothing overflows.  Diagonal blocks use the pairwise form
    (masked to -inf before the exp).  Returns [B, H, N, C, C].
    """
    B, H, N, C, K = qc.shape
    ns = C // sub
    dev = qc.device
    Gs = G.reshape(B, H, N, ns, sub, K)
    qs = qc.reshape(B, H, N, ns, sub, K)
    ks = kc.reshape(B, H, N, ns, sub, K)
    # boundary before each sub-chunk (G of the previous sub-chunk's last token, 0 for the first)
    G_ref = torch.cat([torch.zeros_like(Gs[:, :, :, :1, 0]), Gs[:, :, :, :-1, -1]], dim=3)
    q_fold = qs * (Gs - G_ref[..., None, :]).exp()                   # [B,H,N,ns,sub,K]
    earlier = torch.arange(C, device=dev)[None, :] < (torch.arange(ns, device=dev) * sub)[:, None]
    expo = (G_ref[..., None, :] - G[:, :, :, None]).masked_fill(~earlier[..., None], -math.inf)
    k_fold = kc[:, :, :, None] * expo.exp()                          # [B,H,N,ns,C,K]
    P_off = q_fold @ k_fold.transpose(-1, -2)                        # [B,H,N,ns,sub,C]
    pair = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(
        ~_causal(sub, dev)[..., None], -math.inf)                    # [B,H,N,ns,sub,sub,K]
    P_diag = (qs[..., :, None, :] * ks[..., None, :, :] * pair.exp()).sum(-1)
    eye = torch.eye(ns, dtype=P_diag.dtype, device=dev)
    P_diag = P_diag[..., :, :, None, :] * eye[:, None, :, None]      # onto the block diagonal
    P = P_off.reshape(B, H, N, ns, sub, ns, sub) + P_diag
    return P.reshape(B, H, N, C, C)


def chunk_gla(q, k, v, g, chunk_size: int = 64, scale: float | None = None,
              initial_state: torch.Tensor | None = None, sub_chunk: int = 16):
    """Per-key-channel decay: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T (g: [B, H, T, dk]).

    Works in log space; never multiplies exp(+G) by exp(-G) over a whole chunk
    (see ``_gla_intra_scores``), so strong gates (-4 * softplus) give no inf/NaN.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc, qc, kc, vc = _prepare(q, k, v, scale, C)
    G = _pad_chunk(g.to(acc), C).cumsum(-2)                          # [B, H, N, C, K]
    G_last = G[..., -1:, :]
    P = _gla_intra_scores(qc, kc, G, math.gcd(C, sub_chunk))
    kv = (kc * (G_last - G).exp()).transpose(-1, -2) @ vc           # [B, H, N, K, V]
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    entering, S = _decayed_recurrence(G_last.exp().transpose(-1, -2), kv, S0)
    o = P @ vc + (qc * G.exp()) @ entering
    return _unchunk(o, T).to(q.dtype), S


# --------------------------------------------------------------------------- delta rules
def _unit_lower_solve(A_strict: torch.Tensor, *rhs: torch.Tensor):
    """Solve (I + A) X = R for each R, with A strictly lower triangular."""
    C = A_strict.shape[-1]
    IA = A_strict + torch.eye(C, dtype=A_strict.dtype, device=A_strict.device)
    return [torch.linalg.solve_triangular(IA, r, upper=False, unitriangular=True) for r in rhs]


def _delta_recurrence(qc, kc, W, U, P, S, decay_q=None, decay_k=None, decay_last=None):
    """Inter-chunk loop of the (gated) delta rule in WY form.

    U' = U - W S;  O = (Q [* exp G]) S + P U';  S = [exp G_last] S + (K [* exp(G_last - G)])^T U'.
    """
    outs = []
    q_side = qc if decay_q is None else qc * decay_q
    k_side = kc if decay_k is None else kc * decay_k
    for n in range(qc.shape[2]):
        U_n = U[:, :, n] - W[:, :, n] @ S
        outs.append(q_side[:, :, n] @ S + P[:, :, n] @ U_n)
        S_dec = S if decay_last is None else decay_last[:, :, n] * S
        S = S_dec + k_side[:, :, n].transpose(-1, -2) @ U_n
    return torch.stack(outs, dim=2), S


def chunk_delta_rule(q, k, v, beta, chunk_size: int = 64, scale: float | None = None,
                     initial_state: torch.Tensor | None = None):
    """DeltaNet, S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, in WY/UT form.

    A = tril(diag(b) K K^T, -1);  W = (I + A)^{-1} (b K);  U = (I + A)^{-1} (b V).
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc, qc, kc, vc = _prepare(q, k, v, scale, C)
    bc = _pad_chunk(beta.to(acc), C)[..., None]                      # [B, H, N, C, 1]
    kb = kc * bc
    A = (kb @ kc.transpose(-1, -2)).tril(-1)
    W, U = _unit_lower_solve(A, kb, vc * bc)
    P = (qc @ kc.transpose(-1, -2)).tril()
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    o, S = _delta_recurrence(qc, kc, W, U, P, S0)
    return _unchunk(o, T).to(q.dtype), S


def chunk_gated_delta_rule(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None,
                           initial_state: torch.Tensor | None = None):
    """Gated DeltaNet, S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T (g: [B, H, T]).

    Gamma_rs = exp(G_r - G_s) (masked before the exp);  A = tril(diag(b) K K^T * Gamma, -1);
    W = (I + A)^{-1} (b K exp(G));  U = (I + A)^{-1} (b V).
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc, qc, kc, vc = _prepare(q, k, v, scale, C)
    bc = _pad_chunk(beta.to(acc), C)[..., None]
    G = _pad_chunk(g.to(acc), C).cumsum(-1)                          # [B, H, N, C]
    G_last = G[..., -1:]
    mask = _causal(C, q.device)
    Gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~mask, -math.inf).exp()
    kb = kc * bc
    A = ((kb @ kc.transpose(-1, -2)) * Gamma).tril(-1)
    W, U = _unit_lower_solve(A, kb * G.exp()[..., None], vc * bc)
    P = (qc @ kc.transpose(-1, -2)) * Gamma                         # Gamma is already lower
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    o, S = _delta_recurrence(qc, kc, W, U, P, S0, decay_q=G.exp()[..., None],
                             decay_k=(G_last - G).exp()[..., None],
                             decay_last=G_last.exp()[..., None])
    return _unchunk(o, T).to(q.dtype), S


def chunk_kda(q, k, v, g, beta, chunk_size: int = 64, scale: float | None = None,
              initial_state: torch.Tensor | None = None):
    """Kimi Delta Attention, S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T
    (g: [B, H, T, dk], a log-gate per key channel).

    G = cumsum of g inside the chunk, per channel;  Gamma_rsc = exp(G_rc - G_sc) for s <= r
    (masked to -inf before the exp: every exponent is <= 0);
    A_rs = b_r sum_c k_rc k_sc Gamma_rsc (s < r);  W = (I + A)^{-1} (b K exp(G));
    U = (I + A)^{-1} (b V);  P_rs = sum_c q_rc k_sc Gamma_rsc (s <= r);  then per chunk
    U' = U - W S,  O = (Q exp(G)) S + P U',  S = exp(G_last) S + (K exp(G_last - G))^T U'.
    Gamma is materialised as [B, H, N, C, C, dk]: simple, but memory-hungry at large dk.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    acc, qc, kc, vc = _prepare(q, k, v, scale, C)
    bc = _pad_chunk(beta.to(acc), C)[..., None]                      # [B, H, N, C, 1]
    G = _pad_chunk(g.to(acc), C).cumsum(-2)                          # [B, H, N, C, K]
    G_last = G[..., -1:, :]                                          # [B, H, N, 1, K]
    mask = _causal(C, q.device)[..., None]                           # [C, C, 1]
    Gamma = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~mask, -math.inf).exp()
    k_s = kc[..., None, :, :] * Gamma                                # [B, H, N, C, C, K]
    kb = kc * bc
    A = (kb[..., :, None, :] * k_s).sum(-1).tril(-1)
    W, U = _unit_lower_solve(A, kb * G.exp(), vc * bc)
    P = (qc[..., :, None, :] * k_s).sum(-1)                         # Gamma is already lower
    S0 = _initial(initial_state, B, H, K, V, acc, q.device)
    o, S = _delta_recurrence(qc, kc, W, U, P, S0, decay_q=G.exp(),
                             decay_k=(G_last - G).exp(),
                             decay_last=G_last.exp().transpose(-1, -2))
    return _unchunk(o, T).to(q.dtype), S


# --------------------------------------------------------------------------- readout before
def readout_before(chunk_fn: Callable, q: torch.Tensor, *per_token: torch.Tensor, **kwargs):
    """o_t = S_{t-1}^T q_t from a readout-after chunk function, exactly.

    Run length T + 1 with every per-token input but q shifted one step later
    (a neutral zero step first: k = v = 0, log-gate 0, beta 0) and a zero query
    appended: step t' = t then holds S_{t-1} when it reads q_t, and the last
    step lands on S_{T-1}.  Returns (o[:, :, :T], final_state).
    """
    T = q.shape[2]
    q1 = torch.cat([q, torch.zeros_like(q[:, :, :1])], dim=2)
    xs = [torch.cat([torch.zeros_like(x[:, :, :1]), x], dim=2) for x in per_token]
    o, S = chunk_fn(q1, *xs, **kwargs)
    return o[:, :, :T], S
