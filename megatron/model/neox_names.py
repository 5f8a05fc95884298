"""The two namings of an ungated MLP's tensors in GPT-NeoX checkpoints.

GPT-NeoX names every MLP's projections ``linear1`` / ``linear2`` since 0d4bdb96 (Sep 2024, "current");
Pythia-era checkpoints ("v2.0") name the ungated (gelu) ones ``dense_h_to_4h`` / ``dense_4h_to_h``, which are
this trainer's module names. Gated (swiglu) MLPs are ``linear1`` / ``linear2`` in both. Checkpoints of either
naming load; ``checkpoint_tensor_names`` decides which one this trainer writes.
"""
from typing import Dict

CURRENT_TO_V2 = {"linear1.": "dense_h_to_4h.", "linear2.": "dense_4h_to_h."}
NAMINGS = ("v2.0", "current")


def _rename(state: Dict, prefix: str, mapping: Dict[str, str]) -> None:
    for old, new in mapping.items():
        for key in [k for k in state if k.startswith(prefix + old)]:
            target = prefix + new + key[len(prefix + old):]
            if target in state:
                raise ValueError(f"checkpoint holds both '{key}' and '{target}': two copies of one MLP projection")
            state[target] = state.pop(key)


def to_module_names(state: Dict, prefix: str) -> None:
    """An ungated MLP's tensors under ``prefix`` renamed, in place, from the current naming to the module's."""
    _rename(state, prefix, CURRENT_TO_V2)


def to_current_names(state: Dict, prefix: str) -> None:
    """An ungated MLP's tensors under ``prefix`` renamed, in place, to GPT-NeoX's current naming."""
    _rename(state, prefix, {v: k for k, v in CURRENT_TO_V2.items()})


def normalise_layer(state: Dict) -> Dict:
    """A transformer layer's state dict (``mlp.`` prefix) with an ungated MLP under the module names, for readers
    that do not build the model. Ungated is told from the shapes: its ``linear1`` has as many rows as ``linear2``
    has columns; a gated one (rows ``[x; gate]``) twice as many, also per tensor-parallel shard."""
    one, two = state.get("mlp.linear1.weight"), state.get("mlp.linear2.weight")
    if one is not None and two is not None and one.shape[0] == two.shape[1]:
        state = dict(state)
        to_module_names(state, "mlp.")
    return state
