"""Loop modules called by the generic program: how one re-rolled loop runs.

Each takes ``(*step_sources, *initial_states, *invariants)`` (a step source is
the whole time-carrying tensor; step t reads ``source.select(dim, t)``) and
returns ``(*final_states, *per_step_outputs stacked on a new leading T dim)``.
A module may say which per-step outputs are memory of its own (not views of
its inputs or of each other) in ``fresh_outputs`` (one bool per output): the
program then skips the defensive copy of those.
"""
from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch

from nlcompile.ir import LoopBody, Operand
from nlcompile.passes.fx import layout as L
from nlcompile.passes.fx.precision import recurrence_dtype
from nlcompile.passes.fx.subgraph import extract_subgraph
from nlcompile.targets.scan import checkpointed, recomputing


def step_slice(source: torch.Tensor, dim: int, keepdim: bool, t: int) -> torch.Tensor:
    return source.narrow(dim, t, 1) if keepdim else source.select(dim, t)


def _split(args: Sequence[torch.Tensor], n_sources: int, n_states: int):
    """The loop module's arguments: (step sources, initial states, invariants)."""
    return args[:n_sources], args[n_sources:n_sources + n_states], args[n_sources + n_states:]


def _every_step(gm: torch.fx.GraphModule, step_dims, sources, before=(), after=()):
    """``gm(*before, *step slices, *after)`` for all steps at once: vmap over the time dims."""
    def call(*xs):
        xs = [x.unsqueeze(d) if keep else x for x, (d, keep) in zip(xs, step_dims)]
        return gm(*before, *xs, *after)

    return torch.vmap(call, in_dims=tuple(d for d, _ in step_dims))(*sources)


class SequentialLoop(torch.nn.Module):
    """Run the step body once per step: one loop op, never T unrolled copies.

    The exact fallback for a loop with no chunkwise form (nonlinear, affine...).  With
    ``recompute`` it runs under activation checkpointing when autograd records: only its inputs
    are kept for the backward, which runs the loop again.
    """

    def __init__(self, body: LoopBody, step_dims: Sequence[tuple[int, bool]], recompute: bool = False):
        super().__init__()
        self.body = body.graph
        self.n_states = body.n_states
        self.n_outputs = body.n_step_outputs
        self.step_dims = tuple(step_dims)
        self.fresh_outputs = (True,) * self.n_outputs  # each a torch.stack of its own
        self.recompute = recompute

    def forward(self, *args: torch.Tensor):
        if self.recompute and torch.is_grad_enabled():
            # the initial states go in as copies (``targets.scan.checkpointed`` says why)
            sources, states, invariants = _split(args, len(self.step_dims), self.n_states)
            return checkpointed(self._run)(*sources, *(s.clone() for s in states), *invariants)
        return self._run(*args)

    def _run(self, *args: torch.Tensor):
        sources, states, invariants = _split(args, len(self.step_dims), self.n_states)
        dim0, _ = self.step_dims[0]
        trip = sources[0].shape[dim0]
        outs: list[list[torch.Tensor]] = [[] for _ in range(self.n_outputs)]
        for t in range(trip):
            xs = [step_slice(s, d, keep, t) for s, (d, keep) in zip(sources, self.step_dims)]
            res = self.body(*states, *xs, *invariants)
            states = list(res[:self.n_states])
            for j in range(self.n_outputs):
                outs[j].append(res[self.n_states + j])
        return (*states, *(torch.stack(o) for o in outs))


class UnsupportedLoop(Exception):
    """The analysis holds something this loop module cannot run (the reason)."""


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


class ChunkwiseLoop(torch.nn.Module):
    """Run a loop whose every state has an exact chunkwise form.

    1. the state-free part of the step (the leaves: k, v, q, gates...) is batched
       over all T at once (``vmap`` of the body's leaf sub-graph over the time dim);
    2. each state runs as one chunkwise scan (``scan``, chosen by the target);
    3. readouts go back to the body's layout and the post-processing of the
       readouts (norms, gates, projections) is batched over T like the leaves.

    ``scan`` takes the keyword API of ``targets.scan.chunkwise_scan``, and per-step tensors as
    [N, T, ...]; with ``heads_last`` also as [B, T, H, ...] (flash-linear-attention's layout, which
    the Triton kernels read in place) and in the dtype of the values (bf16 keys stay bf16: half
    the bytes).  The loop then passes [1, T, N, ...] where
    the keys come out contiguous in that layout (leaves computed per step are stacked over a
    leading T; sources laid out [B, T, H, d]): [N, T, ...] would be a transposing copy of each
    operand, and of the readout.  A scan that takes ``compute_dtype`` (the Triton one), or any
    keyword, is told the dtype the loop computes its recurrence in (``passes/fx/precision.py``):
    bf16 keys that the loop upcasts to fp32 inside are computed on in fp32, not at the precision
    of their storage; a loop whose products round its fp32 state to bf16 (autocast), in bf16.  A
    scan that takes ``on_plan`` (both of ours; a plugin's may not), or any keyword, is told
    through it how it runs each call, kept per state in ``scan_notes`` for ``explain``.

    ``recompute`` (``compile(recompute=True)``): under autograd each scan's backward recomputes
    what it needs from the scan's inputs instead of keeping it from the forward, so that only the
    inputs are held between the two: a scan taking a ``recompute`` keyword (the Triton kernels' op
    keeps only its inputs and reruns its state kernels) is asked to; any other runs under
    ``torch.utils.checkpoint`` (its whole forward again in the backward).
    """

    def __init__(self, body: LoopBody, analysis, step_dims: Sequence[tuple[int, bool]], scan,
                 chunk_size: int | None, choose_chunk_size, heads_last: bool = False, recompute: bool = False):
        super().__init__()
        self.heads_last = heads_last
        params = inspect.signature(scan).parameters
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.tells_plan = any_keyword or "on_plan" in params
        self.tells_dtype = any_keyword or "compute_dtype" in params
        self.recompute = recompute
        self.scan_recomputes = "recompute" in params
        self.scan_notes: dict[int, str] = {}   # state -> how the scan ran it in the latest call
        gm = body.graph
        phs = _placeholders(gm)
        ns, nx = body.n_states, body.n_step_inputs
        step_ph, inv_ph = phs[ns:ns + nx], phs[ns + nx:]
        nodes = {n.name: n for n in gm.graph.nodes}
        out_nodes = list(gm.graph.output_node().args[0])
        self.analysis = analysis
        self.step_dims = tuple(step_dims)
        self.n_states = ns
        self.scan, self.chunk_size, self.choose = scan, chunk_size, choose_chunk_size
        self.chunk_sizes_used: dict[int, int] = {}   # state -> chunk size of the latest call
        self.leaf_names = sorted(analysis.leaf_nodes)
        # leaves that are step inputs themselves are views of their source (no vmap call: at short T
        # its overhead is a sizeable part of the loop's time); the others are computed by vmap
        step_names = [p.name for p in step_ph]
        self.step_leaves = {n: step_names.index(n) for n in self.leaf_names if n in step_names}
        self.computed_leaves = [n for n in self.leaf_names if n not in self.step_leaves]
        self.leaf_gm = (extract_subgraph(gm, step_ph + inv_ph, [nodes[n] for n in self.computed_leaves])
                        if self.computed_leaves else None)
        self.state_vals = [n.meta["val"] for n in out_nodes[:ns]]
        # per state, the precision its recurrence is computed in: on the paths to its new value and readouts
        ends = [[out_nodes[s]] + [nodes[r.node] for r in analysis.readouts if r.state == s] for s in range(ns)]
        self.compute_dtypes = [recurrence_dtype(gm, phs[s], ends[s]) for s in range(ns)]
        self.readout_vals = {r.node: nodes[r.node].meta["val"] for r in analysis.readouts}
        readout_names = sorted(self.readout_vals)
        self.sources: list[tuple[str, object]] = []
        post_outs = []
        for node in out_nodes[ns:]:
            if node.name in self.readout_vals:
                self.sources.append(("readout", node.name))
            elif node.name in analysis.leaf_nodes:
                self.sources.append(("leaf", node.name))
            elif node.name in analysis.post_nodes:
                self.sources.append(("post", len(post_outs)))
                post_outs.append(node)
            else:
                raise UnsupportedLoop(f"per-step output {node.name} depends on the state in a way the "
                                      "chunkwise form does not produce")
        # which per-step outputs are memory of their own (a readout, the first time it is returned):
        # the program need not copy those; leaves and post-processed values may be views of inputs
        self.fresh_outputs = tuple(kind == "readout" and (kind, ref) not in self.sources[:i]
                                   for i, (kind, ref) in enumerate(self.sources))
        # readouts that also hold state-free terms: their value at zero state (old and new)
        self.const_names = sorted(r.node for r in analysis.readouts if r.constant)
        self.const_gm, zero_at = None, []
        if self.const_names:
            news = [n for n in gm.graph.nodes if n.name in analysis.after_nodes] + out_nodes[:ns]
            zero_at = list(dict.fromkeys(phs[:ns] + news))
            self.zero_vals = [n.meta["val"] for n in zero_at]
            self.const_gm = extract_subgraph(gm, zero_at + step_ph + inv_ph, [nodes[n] for n in self.const_names])
        self.post_inputs = readout_names + self.leaf_names
        self.post_gm = None
        if post_outs:
            self.post_gm = extract_subgraph(gm, [nodes[n] for n in self.post_inputs] + inv_ph, post_outs)
        subs = [(self.leaf_gm, step_ph + inv_ph), (self.const_gm, zero_at + step_ph + inv_ph),
                (self.post_gm, [nodes[n] for n in self.post_inputs] + inv_ph)]
        read = {node.name for sub, ins in subs if sub is not None
                for ph, node in zip(_placeholders(sub), ins) if ph.users}
        self.query_sources = self._query_only_sources(step_ph, read)
        self.source_scales: dict[int, float] = {}  # set by passes/fx/fold_scales: source i is x * scale

    def _query_only_sources(self, step_ph, read: set[str]) -> frozenset[int]:
        """Step sources that the loop reads only as readout queries, in float32/64 (``read``:
        the body values the loop's batched sub-programs read): a constant factor on one (``q * scale``
        before the loop) can be folded into the scan, which copies the queries once anyway
        (passes/fx/fold_scales)."""
        queries = {r.q.factors[0].node for r in self.analysis.readouts
                   if len(r.q.factors) == 1 and r.q.factors[0].power == 1}
        other = {name for rule in self.analysis.rules
                 for op in (rule.k, rule.v, rule.beta, rule.write, rule.gate, rule.log_gate) if op is not None
                 for name in op.nodes}
        other |= {name for r in self.analysis.readouts if len(r.q.factors) != 1 for name in r.q.nodes}
        other |= {ref for kind, ref in self.sources if kind == "leaf"} | read
        found = set()
        for name, i in self.step_leaves.items():
            dtype = step_ph[i].meta["val"].dtype
            if name in queries and name not in other and dtype in (torch.float32, torch.float64):
                found.add(i)
        return frozenset(found)

    def _leaves(self, sources, invariants) -> dict[str, torch.Tensor]:
        """Every leaf's values at all steps, stacked on a leading T dim."""
        values = {}
        for name, i in self.step_leaves.items():
            dim, keep = self.step_dims[i]
            x = sources[i].movedim(dim, 0)  # what step_slice gives at each t, stacked
            values[name] = x.unsqueeze(dim + 1) if keep else x
        if self.leaf_gm is not None:
            values.update(zip(self.computed_leaves,
                              _every_step(self.leaf_gm, self.step_dims, sources, after=invariants)))
        return values

    def _at_zero_state(self, sources, invariants) -> dict[str, torch.Tensor]:
        """The constant-readout nodes evaluated with every state (old and new) zero."""
        zeros = [torch.zeros(v.shape, dtype=v.dtype, device=sources[0].device) for v in self.zero_vals]
        vals = _every_step(self.const_gm, self.step_dims, sources, before=zeros, after=invariants)
        return dict(zip(self.const_names, vals))

    @staticmethod
    def _implied_write(rule) -> bool:
        """Whether the scans' default write coefficient is the rule's (beta in the delta family, else
        1): then none is passed (no copy of the same values, no tensor of ones)."""
        return rule.write is None or rule.write == (rule.beta if rule.beta is not None else L.ONE)

    def _operand(self, layout, values, time_major: bool, op, role: str, **how) -> torch.Tensor:
        """One scan input: [N, T, ...], or [1, T, N, ...] when ``time_major`` (``operand_for_kernel``)."""
        x = L.operand_for_kernel(op, layout, role, values, time_major=time_major, keep_dtype=self.heads_last, **how)
        return x.unsqueeze(0) if time_major else x

    def _note(self, state: int, suffix: str, note: str) -> None:
        self.scan_notes[state] = note + suffix

    def _scan_for_call(self):
        """``self.scan`` as this call runs it ((scan, note suffix)): asked to recompute, or under
        ``torch.utils.checkpoint``, when recomputing under autograd."""
        if self.scan_recomputes and self.recompute and torch.is_grad_enabled():
            return functools.partial(self.scan, recompute=True), ""
        return recomputing(self.scan, self.recompute)

    def forward(self, *args: torch.Tensor):
        sources, inits, invariants = _split(args, len(self.step_dims), self.n_states)
        values = self._leaves(sources, invariants)
        scan, note_suffix = self._scan_for_call()
        finals: list[torch.Tensor | None] = [None] * self.n_states
        readouts: dict[str, torch.Tensor] = {}
        for rule in self.analysis.rules:
            lay = rule.layout
            k = self._operand(lay, values, True, rule.k, "key") if self.heads_last else None
            major = k is not None and k.is_contiguous()
            operand = functools.partial(self._operand, lay, values, major)
            if not major:   # a time-major view that is not contiguous is the flat one, transposed
                k = k[0].transpose(0, 1) if k is not None else operand(rule.k, "key")
            v = operand(rule.v, "value") if rule.v is not None else k.new_ones(*k.shape[:-1], 1)
            kw = dict(
                beta=operand(rule.beta, "scalar") if rule.beta is not None else None,
                write=None if self._implied_write(rule) else operand(rule.write, "scalar"),
                initial_state=L.state_to_kernel(lay, inits[rule.state]),
            )
            if rule.log_gate is not None:
                kw["log_gate"] = operand(rule.log_gate, "gate", per_channel=rule.per_channel)
            elif rule.gate is not None:
                kw["gate"] = operand(rule.gate, "gate", per_channel=rule.per_channel)
            kw["gate_first"] = rule.gate_first
            if self.tells_dtype:
                kw["compute_dtype"] = self.compute_dtypes[rule.state]
            chunk = self.chunk_size or self.choose(
                k, v, **{x: kw.get(x) for x in ("beta", "gate", "log_gate", "gate_first")})
            self.chunk_sizes_used[rule.state] = chunk
            if self.tells_plan:
                kw["on_plan"] = functools.partial(self._note, rule.state, note_suffix)
            mine = [r for r in self.analysis.readouts if r.state == rule.state]
            final = None
            for r in mine:
                # the queries' constant factor (and their source's, folded by passes/fx/fold_scales)
                # is applied by the scan (the torch scan in its copy of them, the kernels to o),
                # not by a pass of its own here
                q = operand(Operand(1.0, r.q.factors), "key")
                scale = r.q.coef
                if len(r.q.factors) == 1 and r.q.factors[0].node in self.step_leaves:
                    scale *= self.source_scales.get(self.step_leaves[r.q.factors[0].node], 1.0)
                val = self.readout_vals[r.node]
                # a readout the node takes as it is (no factor after S^T q, nothing summed) is
                # written by the scan in the node's dtype
                typed = r.post is None and not r.summed and not r.constant
                o, final = scan(k, v, q=q, readout=r.when, chunk_size=chunk, q_scale=scale,
                                out_dtype=val.dtype if typed else None, **kw)
                o = o[0] if major else o
                readouts[r.node] = L.readout_to_node(r, lay, o, values, tuple(val.shape), major).to(val.dtype)
            if not mine:
                _, final = scan(k, v, chunk_size=chunk, **kw)
            val = self.state_vals[rule.state]
            finals[rule.state] = L.state_from_kernel(lay, final, tuple(val.shape)).to(val.dtype)
        if self.const_gm is not None:
            for name, value in self._at_zero_state(sources, invariants).items():
                readouts[name] = readouts[name] + value.to(readouts[name].dtype)
        post = ()
        if self.post_gm is not None:
            ins = [readouts[n] if n in readouts else values[n] for n in self.post_inputs]
            in_dims = (0,) * len(ins) + (None,) * len(invariants)
            post = torch.vmap(self.post_gm, in_dims=in_dims)(*ins, *invariants)
        outs = []
        for kind, ref in self.sources:
            outs.append(readouts[ref] if kind == "readout" else values[ref] if kind == "leaf" else post[ref])
        return (*finals, *outs)
