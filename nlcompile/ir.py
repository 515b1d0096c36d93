"""The loop IR: small frozen records that every pass reads or produces.

A traced model is split into a *prologue* (runs once, generic in T), one or more
update *loops* (a re-rolled one-step body plus how it is fed and collected) and
an *epilogue*.  The analysis of a loop body yields, per carried state, the
``StateRule`` it proved, and, per readout, how the per-step output reads the
state.  Targets consume these records; nothing here depends on a target.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class RuleKind(str, enum.Enum):
    """What the analysis proved about ``S' = f(S, x_t)``."""

    ADDITIVE = "additive"        # S + c k v^T
    DECAY = "decay"              # a * S + c k v^T   (a scalar or per key channel)
    DELTA = "delta"              # (I - b k k^T) S + c k v^T
    GATED_DELTA = "gated_delta"  # a (I - b k k^T) S + c k v^T
    MOMENTUM = "momentum"        # two coupled linear states (Titans)
    AFFINE = "affine"            # linear in S, but with no known fast structure
    NONLINEAR = "nonlinear"      # anything else

    @property
    def chunkwise(self) -> bool:
        """Whether an exact chunkwise-parallel form exists for this kind."""
        return self in (RuleKind.ADDITIVE, RuleKind.DECAY, RuleKind.DELTA, RuleKind.GATED_DELTA)


@dataclass(frozen=True)
class LoopBody:
    """One step of a re-rolled update loop, as a functional ATen FX graph.

    Placeholders, in this order: the carried states ``state_0..``, the per-step
    input slices ``step_0..`` and the loop invariants ``inv_0..``.  The graph
    returns a flat tuple: the new states (same order), then the per-step outputs.
    ``node.meta["val"]`` holds a fake tensor with each node's shape and dtype.
    """

    graph: torch.fx.GraphModule
    n_states: int
    n_step_inputs: int
    n_invariants: int
    n_step_outputs: int


@dataclass(frozen=True)
class Factor:
    """An opaque per-step tensor (a state-free body node), to the power +-1.

    ``node`` reshaped to ``atomic_shape`` (memory order) has one *atomic index*
    per dim, named by ``indices``.  Indices are ints, meaningful inside one
    ``LoopAnalysis``.
    """

    node: str
    power: int
    atomic_shape: tuple[int, ...]
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Operand:
    """A per-step tensor ``coef * prod(factors)`` over atomic indices."""

    coef: float
    factors: tuple[Factor, ...]

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(f.node for f in self.factors)


@dataclass(frozen=True)
class StateLayout:
    """Roles of a state's atomic indices: batch (elementwise), key, value.

    ``dims`` gives, per dim of the state tensor, the atomic indices it holds.
    ``key`` or ``value`` is None when the state has no such dim (a normaliser
    ``z`` with only a key dim has ``value=None``).
    """

    dims: tuple[tuple[int, ...], ...]
    sizes: tuple[tuple[int, int], ...]          # (index, size) for every atomic index of the state
    batch: tuple[int, ...]
    key: int | None
    value: int | None

    def size(self, index: int) -> int:
        return dict(self.sizes)[index]


@dataclass(frozen=True)
class StateRule:
    """The update rule proved for one carried state.

    Per step:  S' = gate (I - beta k k^T) S + write k v^T   (terms absent -> 1 / 0).
    ``gate`` is a factor a_t (any sign); ``log_gate`` is set too when a_t = exp(g)
    was proved, so targets may work in log space.  ``per_channel`` marks a gate
    over the key index; ``gate_first`` marks a per-channel gate applied before the
    delta step, S' = (I - beta k k^T) gate S + write k v^T (Kimi Delta Attention;
    a scalar gate commutes with the projection and never sets it).  For AFFINE /
    NONLINEAR, ``reason`` and ``blocking_node`` say why no chunkwise form applies.
    """

    state: int
    kind: RuleKind
    layout: StateLayout | None = None
    k: Operand | None = None
    v: Operand | None = None
    beta: Operand | None = None
    write: Operand | None = None
    gate: Operand | None = None
    log_gate: Operand | None = None
    per_channel: bool = False
    reason: str | None = None
    blocking_node: str | None = None
    gate_first: bool = False


@dataclass(frozen=True)
class Readout:
    """A per-step value that is a linear readout of one state: o = S^T q (* post).

    ``node`` is the body node holding it; ``when`` is "after" (reads S_t) or
    "before" (reads S_{t-1}).  ``dims`` gives the node's atomic indices per dim
    (``()`` for a size-1 dim); ``summed`` lists batch indices the readout sums.
    ``post`` holds value-side factors (``None`` for none).  ``constant`` marks a
    node that also holds state-free terms (``(S + u k v^T)^T q``): its value at
    zero state is added to the readout.
    """

    node: str
    state: int
    when: str
    q: Operand
    post: Operand | None
    dims: tuple[tuple[int, ...], ...]
    summed: tuple[int, ...] = ()
    constant: bool = False


@dataclass(frozen=True)
class LoopAnalysis:
    """Everything the rewrite needs about one loop body."""

    rules: tuple[StateRule, ...]
    readouts: tuple[Readout, ...]
    leaf_nodes: frozenset[str]          # state-free nodes whose per-step values are needed
    post_nodes: frozenset[str] = field(default_factory=frozenset)  # state-dependent, downstream of readouts
    after_nodes: frozenset[str] = field(default_factory=frozenset)  # the new states and their plain copies

    @property
    def chunkwise(self) -> bool:
        return all(r.kind.chunkwise for r in self.rules)
