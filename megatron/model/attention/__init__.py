"""Core attention variants behind one interface, selected by configuration.

Every variant is ``cls(neox_args, layer_number)`` with ``forward(q, k, v, meta) -> out`` (``[B, H, S, D]``,
see docs/internals.md). The configuration's ``attention_variant`` names the one a run uses; derivation
settles it from the SepLLM mode flags. Adding a variant: one module, one line in ``_VARIANT_MODULES``, its
name in ``ATTENTION_VARIANT_NAMES`` (megatron/neox_arguments/model_args.py) and the flag that selects
it in ``attention_variant`` (megatron/neox_arguments/derive.py). Variants other than ``full`` are
imported lazily so that a missing or broken optional module only matters to runs that select it.
"""
import importlib

from .full import FullAttention

# variant name -> (module, class name, the config flag that selects it: named in errors)
_VARIANT_MODULES = {
    "sepllm_mask": ("megatron.model.attention.sepllm_mask", "SepLLMMaskAttention",
                    "USE_SEP_ATTN_KERNEL_ACCELERATOR: false (mask-based SepLLM)"),
    "streamingllm": ("megatron.model.attention.streaming", "StreamingLLMAttention", "streamingLLM"),
    "fixllm": ("megatron.model.attention.fixllm", "FixLLMAttention", "USE_FIXED_SEP_INTERVALs"),
    "sa_softmax": ("megatron.model.attention.sa_softmax", "SASoftmaxAttention",
                   "USE_SA_SOFTMAX / USE_SA_SOFTMAX_NO_DENO"),
    "sep_kernel": ("megatron.model.attention.sep_kernel_mode", "SepKernelModeAttention", "USE_SEP_ATTN_KERNEL_ACCELERATOR"),
}

ATTENTION_VARIANTS = {"full": FullAttention}


def get_attention_class(name: str) -> type:
    """The class registered as ``name``, importing its module on first use."""
    if name in ATTENTION_VARIANTS:
        return ATTENTION_VARIANTS[name]
    if name not in _VARIANT_MODULES:
        known = ", ".join(sorted(set(ATTENTION_VARIANTS) | set(_VARIANT_MODULES)))
        raise ValueError(f"attention variant {name!r} is not known; known variants: {known}")
    module_name, class_name, flag = _VARIANT_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"attention variant {name!r} (selected by {flag}) needs {module_name}, "
                          f"which cannot be imported: {err}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ImportError(f"attention variant {name!r} (selected by {flag}): {module_name} has no {class_name}")
    ATTENTION_VARIANTS[name] = cls
    return cls


def build_core_attention(neox_args, layer_number: int):
    """The configured core attention module for 0-based ``layer_number``."""
    return get_attention_class(neox_args.attention_variant)(neox_args, layer_number)
