"""The stock ``transformers`` decoder families the training-free path supports, and how to find their attention.

Every supported family passes its 4D attention mask to each attention module as the ``attention_mask`` keyword and
its cache as ``cache`` or ``layer_past``; each attention module carries its ``layer_idx``. Those three facts are
what :mod:`megatron.hf.training_free.attention` relies on, so a family is added here only after checking them in
its ``modeling_*.py``.
"""
import importlib
from typing import List

# model_type -> (transformers module, attention class)
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralAttention"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    "gpt_neox": ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXAttention"),
    "falcon": ("transformers.models.falcon.modeling_falcon", "FalconAttention"),
}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class UnsupportedModelError(ValueError):
    """A model the training-free path cannot run; the message names its family or attention implementation."""


def check_supported(model) -> str:
    """The model's family (``model_type``), or :class:`UnsupportedModelError` naming what is not supported."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family == "sepllm_gpt_neox":
        raise UnsupportedModelError("model_type 'sepllm_gpt_neox' is a trained SepLLM export with its own SepLLM "
                                    "attention (its config holds the settings); apply_sepllm is for stock models")
    if family not in FAMILIES:
        raise UnsupportedModelError(f"model family {family!r} ({type(model).__name__}) is not supported by the "
                                    f"training-free SepLLM path; supported: {sorted(FAMILIES)}")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTN_IMPLEMENTATIONS:
        hint = " (with flash attention use a SepCache: sep_cache=a,s,w,c)" if "flash" in str(impl) else ""
        raise UnsupportedModelError(f"attn_implementation {impl!r} of this {family} model is not supported by the "
                                    f"mask-based path; load it with attn_implementation='eager' or 'sdpa'{hint}")
    return family


def attention_modules(model, family: str) -> List:
    """The attention module of every layer, in layer order (checked: one per layer, ``layer_idx`` 0..L-1)."""
    module_name, class_name = FAMILIES[family]
    cls = getattr(importlib.import_module(module_name), class_name)
    found = [m for m in model.modules() if isinstance(m, cls)]
    found.sort(key=lambda m: m.layer_idx)
    layers = int(model.config.num_hidden_layers)
    if [m.layer_idx for m in found] != list(range(layers)):
        raise UnsupportedModelError(f"{family} model {type(model).__name__}: expected one {class_name} per layer "
                                    f"(layer_idx 0..{layers - 1}), found {[m.layer_idx for m in found]}")
    return found
