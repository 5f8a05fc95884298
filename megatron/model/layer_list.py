"""GPT-NeoX's pipeline layer list, described without DeepSpeed so a plain-torch model can be built from it.

Index 0 embedding, 1 ``pre_transformer_block``, 2..L+1 transformer layers, L+2 ``post_transformer_block``,
L+3 final norm, L+4 output layer (``final_linear``, or the tied word embedding).
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.model.init_functions import get_init_methods
from megatron.model.norms import get_norm
from megatron.model.transformer import (NormPipe, ParallelLinearPipe, ParallelTransformerLayerPipe,
                                        post_transformer_block, pre_transformer_block, tied_logits)
from megatron.model.utils import Lambda, SequentialWrapper
from megatron.model.word_embeddings import EmbeddingPipe
from megatron.neox_arguments.model_args import POS_EMBS

TIE_KEY = "embed"


@dataclass
class Spec:
    """One entry: a module class with its arguments, a tied-module reference, or a parameter-free function."""

    typename: Any = None
    args: Tuple = ()
    kwargs: Dict = field(default_factory=dict)
    tie_key: Optional[str] = None  # layers sharing this key share one module (DeepSpeed TiedLayerSpec)
    forward_fn: Optional[Callable] = None  # for a tied receiver: fn(module, x)
    function: Optional[Callable] = None  # parameter-free layer


def activation_checkpoint_interval(neox_args) -> int:
    if neox_args.checkpoint_activations:
        return int(neox_args.checkpoint_num_layers)
    return 0


def gpt2_layer_specs(neox_args, parallel_output: bool = False) -> List[Spec]:
    """The layer list of a GPT-NeoX model for ``neox_args``."""
    for key in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        if getattr(neox_args, key) is None:
            raise ValueError(f"model configuration is missing {key!r}")
    if neox_args.pos_emb not in POS_EMBS:
        raise ValueError(f"pos_emb {neox_args.pos_emb!r} is not supported; choose one of {', '.join(POS_EMBS)}")
    init_method, output_layer_init_method = get_init_methods(neox_args)
    tied = not neox_args.no_weight_tying
    hidden = int(neox_args.hidden_size)
    max_pos = int(neox_args.max_position_embeddings)
    dropout = float(neox_args.hidden_dropout)
    emb_args = (neox_args, hidden, int(neox_args.padded_vocab_size), max_pos, dropout, init_method)
    specs = [Spec(EmbeddingPipe, emb_args, tie_key=TIE_KEY if tied else None), Spec(function=pre_transformer_block)]
    for i in range(int(neox_args.num_layers)):
        specs.append(Spec(ParallelTransformerLayerPipe, (neox_args, init_method, output_layer_init_method, i)))
    specs.append(Spec(function=post_transformer_block))
    norm, eps = get_norm(neox_args)
    specs.append(Spec(NormPipe, (norm, hidden, eps)))
    if tied:
        specs.append(Spec(EmbeddingPipe, emb_args, tie_key=TIE_KEY,
                          forward_fn=partial(tied_logits, parallel_output=parallel_output)))
    else:
        specs.append(Spec(ParallelLinearPipe, (neox_args, init_method), {"parallel_output": parallel_output}))
    return specs


def build_sequential_model(neox_args, parallel_output: bool = False) -> SequentialWrapper:
    """The model as a plain ``nn.Module`` (no DeepSpeed needed), built in layer order from the same specs."""
    layers, owners = [], {}
    for spec in gpt2_layer_specs(neox_args, parallel_output):
        if spec.function is not None:
            layers.append(Lambda(spec.function))
        elif spec.tie_key is not None and spec.tie_key in owners:
            owner = owners[spec.tie_key]
            layers.append(Lambda(lambda x, fn=spec.forward_fn, m=owner: fn(m, x)))
        else:
            module = spec.typename(*spec.args, **spec.kwargs)
            if spec.tie_key is not None:
                owners[spec.tie_key] = module
            layers.append(module)
    model = SequentialWrapper(layers, activation_checkpoint_interval(neox_args))
    if neox_args.torch_compile:
        compile_layers(model.sequential)
    return model


def compile_layers(layers) -> None:
    """``torch.compile`` each module layer in place (keeps parameter names; parameter-free layers stay eager)."""
    for layer in layers:
        if isinstance(layer, ParallelTransformerLayerPipe) or isinstance(layer, (NormPipe, ParallelLinearPipe)):
            layer.compile()
