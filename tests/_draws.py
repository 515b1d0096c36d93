"""Seeded test data drawn on the CPU and moved to the tests' device."""
from __future__ import annotations

import torch


class Draws:
    """Random tensors from one seeded CPU generator, moved to the default device (CUDA for the
    Triton test files on a GPU: ``conftest``).  The same seed gives the same numbers on every
    device, so a bound set on the CPU is checked on the same data on a GPU; CUDA's own generator
    would draw other numbers from the seed, and some bounds (an ill-conditioned WY inverse, a
    low-precision error ratio) hold for some draws and not others."""

    def __init__(self, seed: int):
        self.gen = torch.Generator("cpu").manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._moved(torch.randn(*shape, generator=self.gen, dtype=dtype, device="cpu"))

    def rand(self, *shape: int) -> torch.Tensor:
        return self._moved(torch.rand(*shape, generator=self.gen, device="cpu"))

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._moved(torch.randint(low, high, shape, generator=self.gen, device="cpu"))

    @staticmethod
    def _moved(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.get_default_device())
