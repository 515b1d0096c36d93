"""Deterministic parameter init for the zoo's nn.Module layers."""
from __future__ import annotations

import torch
import torch.nn as nn


def skip_linear(d_in: int, d_out: int, bias: bool = False) -> nn.Linear:
    return torch.nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias)


def init_params(module: nn.Module, seed: int) -> None:
    """Deterministic init from ``seed`` without touching the global RNG:
    weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm weights 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) * p.shape[1] ** -0.5)
            elif name.endswith("norm_weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) * 0.1)
