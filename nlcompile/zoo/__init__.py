"""The zoo: naive per-token fast-weight models as researchers write them, in
several spellings per family, plus hand-written chunkwise references.

    from nlcompile.zoo import MODELS, LAYERS
    entry = MODELS["deltanet_fla"]
    args = entry.make_inputs(B=2, H=4, T=64, D=32)
    o, S = entry.fn(*args)                # the naive loop
    o_ref, S_ref = entry.reference(*args) # the chunkwise reference
"""
from .inputs import FAMILIES, canonical_inputs, from_time_dim, to_time_dim
from .registry import LAYERS, MODELS, LayerEntry, ZooEntry, family_reference

__all__ = [
    "MODELS", "LAYERS", "ZooEntry", "LayerEntry", "FAMILIES",
    "canonical_inputs", "family_reference", "to_time_dim", "from_time_dim",
]
