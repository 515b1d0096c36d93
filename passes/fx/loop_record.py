"""The record of one loop found in a trace, and the reason when there is none.

``RerolledLoop`` is what re-rolling (or lifting a ``scan``) produces and what
the program builder consumes: the one-step body, how it is fed, and how its
values leave the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from nlcompile.ir import LoopBody


class NotALoop(Exception):
    """The trace holds no update loop we can re-roll; the message says why."""


@dataclass(frozen=True)
class StepInput:
    """Per-step slice ``source.select(dim, t)`` (``keepdim``: ``narrow(dim, t, 1)``)."""

    source: fx.Node
    dim: int
    keepdim: bool


@dataclass(frozen=True)
class Gather:
    """How per-step output ``output`` leaves the loop: a ``stack``/``cat`` node or a
    buffer written at index t along ``dim`` (``node`` is the last write)."""

    node: fx.Node
    output: int
    dim: int
    kind: str  # "stack" | "cat" | "buffer"


@dataclass(frozen=True)
class RerolledLoop:
    """One loop of a trace: its step body, how it is fed, and how its values leave it.

    ``nodes`` are the trace nodes the loop replaces (every step, gathers); the
    values read after the loop are ``gathers`` (per-step outputs stacked) and
    ``last_refs`` (a node of the last step -> ("state", i) | ("output", j))."""

    trip_count: int
    body: LoopBody
    inits: tuple[fx.Node, ...]
    step_inputs: tuple[StepInput, ...]
    invariants: tuple[fx.Node, ...]
    gathers: tuple[Gather, ...]
    last_refs: dict[fx.Node, tuple[str, int]]
    nodes: frozenset[fx.Node]

    @property
    def step_dims(self) -> list[tuple[int, bool]]:
        return [(s.dim, s.keepdim) for s in self.step_inputs]


def norm_dim(dim: int, node: fx.Node) -> int:
    return dim % node.meta["val"].dim()
