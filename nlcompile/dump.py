"""Write the graph a pass produced, when ``NLCOMPILE_DUMP`` names a folder."""
from __future__ import annotations

import itertools

from torch import fx

from nlcompile import knobs

_counter = itertools.count()


def dump_graph(pass_name: str, gm: fx.GraphModule | fx.Graph, note: str = "") -> None:
    """Write ``gm``'s readable code to ``$NLCOMPILE_DUMP/NNN_<pass_name>.txt``."""
    folder = knobs.dump_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    text = f"# pass: {pass_name}\n# {note}\n" + str(graph)
    if isinstance(gm, fx.GraphModule):
        text += "\n\n" + gm.code
    (folder / f"{next(_counter):03d}_{pass_name}.txt").write_text(text)
