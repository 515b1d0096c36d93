"""What autograd keeps from a forward for its backward, measured (``compile(recompute=True)``'s
tests and benchmarks)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_storages(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, dict[int, int]]:
    """``fn()`` and the storages autograd saved for the backward while it ran, {address: bytes}
    (each storage once and whole, as it stays allocated), leaving out those of ``exclude``
    (tensors held anyway: inputs, parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
