"""Targets by name: built-ins, ``register_target()`` and the ``nlcompile.targets``
entry-point group (third-party packages), all looked up lazily.

A target says whether it can run here, which rule kinds it has fast paths for,
builds the module that runs one loop, and turns the finished program into a
callable.  Adding a backend is one class and one ``register_target`` call.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import fx

from nlcompile.ir import LoopAnalysis, RuleKind


@dataclass(frozen=True)
class LoopPlan:
    """What the rewrite decided for one loop: the body, its analysis (None when
    the analysis failed), the chunk size asked for (None: the target chooses) and
    whether the backward is to recompute the scans' intermediates (``compile(recompute=True)``;
    ``ChunkwiseLoop(recompute=...)`` does it for any scan)."""

    loop: object            # passes.fx.reroll.RerolledLoop
    analysis: LoopAnalysis | None
    chunk_size: int | None
    recompute: bool = False


@runtime_checkable
class Target(Protocol):
    name: str
    fast_kinds: frozenset[RuleKind]

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, why and what to install)."""

    def loop_module(self, plan: LoopPlan) -> torch.nn.Module:
        """The module that runs one loop (see ``nlcompile.loop_ops`` for the calling convention)."""

    def finalize(self, program: fx.GraphModule) -> Callable:
        """Turn the rewritten program into the callable that is run."""


_BUILTINS = {
    "torch": "nlcompile.targets.torch_target:TorchTarget",
    "inductor": "nlcompile.targets.inductor_target:InductorTarget",
    "triton": "nlcompile.targets.triton_target:TritonTarget",
}
_registered: dict[str, Callable[[], Target] | Target] = {}


def register_target(name: str, target: Target | Callable[[], Target]) -> None:
    """Register a target object (or a zero-argument factory) under ``name``."""
    _registered[name] = target


def _entry_point_targets() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="nlcompile.targets")}


def list_targets() -> list[str]:
    """Names of every known target: built-in, registered and installed plug-ins."""
    return sorted(set(_BUILTINS) | set(_registered) | set(_entry_point_targets()))


def get_target(name: str) -> Target:
    """The target called ``name``; unknown names list the known ones."""
    if name in _registered:
        obj = _registered[name]
    elif name in _BUILTINS:
        module, attr = _BUILTINS[name].split(":")
        obj = getattr(importlib.import_module(module), attr)
    elif name in (eps := _entry_point_targets()):
        obj = eps[name].load()
    else:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(list_targets())}. "
                         "Add one with nlcompile.register_target(name, target).")
    target = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Target)) else obj
    ok, why = target.available()
    if not ok:
        raise RuntimeError(f"target {name!r} is not available here: {why}")
    return target
