"""Cut a sub-program out of a loop body: given input nodes, compute output nodes.

Used to batch the state-free part of a step over all T at once (the leaves) and
the post-processing of readouts (norms, gates), each as its own small graph.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx


def extract_subgraph(gm: fx.GraphModule, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """A graph taking ``inputs`` (as placeholders) and returning ``outputs`` (a tuple).

    Raises ValueError naming the node when an output needs a value that is
    neither an input nor computable from the inputs.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        ph = graph.placeholder(f"in_{i}_{node.name}")
        ph.meta = dict(node.meta)
        env[node] = ph

    needed: set[fx.Node] = set()
    todo = [n for n in outputs if n not in env]
    while todo:
        n = todo.pop()
        if n in needed or n in env:
            continue
        if n.op == "placeholder":
            raise ValueError(f"{n.name} is needed but is not an input of the sub-program")
        needed.add(n)
        todo += n.all_input_nodes
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)
