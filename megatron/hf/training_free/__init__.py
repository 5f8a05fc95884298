"""Training-free SepLLM on stock ``transformers`` decoders (Llama, Mistral, Qwen2, GPT-NeoX, Falcon).

    from megatron.hf.training_free import apply_sepllm
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")   # or "eager"
    apply_sepllm(model, "configs/training_free/pythia_sepllm_a3_n256.yml", tokenizer=tokenizer)

``config`` is the reference's training-free YAML (or a dict of its keys); left out, the settings saved with the
model are read: the ``sepllm_config`` field of its config.json, else ``sepllm_config.yml`` in its directory
(:func:`write_saved_config` writes one). See docs/training_free.md.
"""
from typing import Optional

from .attention import TrainingFreeSepLLM, TrainingFreeUsageError
from .config import (CONFIG_JSON_FIELD, SAVED_CONFIG_NAME, ConfigLike, Settings, TrainingFreeConfig,
                     TrainingFreeConfigError, load_config, saved_config, write_saved_config)
from .families import FAMILIES, UnsupportedModelError, attention_modules, check_supported

_PATCH_ATTR = "_sepllm_training_free"

__all__ = ["apply_sepllm", "remove_sepllm", "sepllm_settings", "load_config", "saved_config",
           "write_saved_config", "TrainingFreeConfig", "Settings", "TrainingFreeConfigError",
           "TrainingFreeUsageError", "UnsupportedModelError", "FAMILIES", "SAVED_CONFIG_NAME", "CONFIG_JSON_FIELD"]


def resolve_settings(model, config: Optional[ConfigLike] = None, tokenizer=None) -> Settings:
    """Checks ``model`` and ``config`` together (family, attention implementation, ``Layer_num``, lists) and
    returns the settings, without changing the model."""
    check_supported(model)
    if config is None:
        found = saved_config(getattr(model, "name_or_path", None), model.config)
        if found is None:
            raise TrainingFreeConfigError(
                f"no training-free config given and none saved with the model ({model.name_or_path!r} has no "
                f"config.json field '{CONFIG_JSON_FIELD}' and no {SAVED_CONFIG_NAME})")
        config = found
    return load_config(config).resolve(int(model.config.num_hidden_layers), tokenizer)


def apply_sepllm(model, config: Optional[ConfigLike] = None, tokenizer=None) -> Settings:
    """Makes ``model`` run training-free SepLLM / StreamingLLM / FixLLM attention (mask-based, eager or sdpa).

    ``USE_ORIGINAL_FULL_ATTEN`` leaves the model as it is. Applying again replaces the previous settings.
    Returns the resolved :class:`Settings`; ``model`` is changed in place (hooks, see :func:`remove_sepllm`).
    """
    settings = resolve_settings(model, config, tokenizer)
    modules = attention_modules(model, model.config.model_type)
    remove_sepllm(model)
    patch = TrainingFreeSepLLM(model, settings, modules) if settings.mode != "full" else None
    setattr(model, _PATCH_ATTR, (settings, patch))
    return settings


def remove_sepllm(model) -> None:
    """Undoes :func:`apply_sepllm` (the stock attention again)."""
    applied = getattr(model, _PATCH_ATTR, None)
    if applied is None:
        return
    if applied[1] is not None:
        applied[1].remove()
    delattr(model, _PATCH_ATTR)


def sepllm_settings(model) -> Optional[Settings]:
    """The settings :func:`apply_sepllm` applied to ``model``, or None."""
    applied = getattr(model, _PATCH_ATTR, None)
    return None if applied is None else applied[0]


def kv_ratio_printer(model):
    """The model's :class:`~megatron.hf.training_free.kv_ratio.KVRatioPrinter` (``PRINT_KV_RATIO``), or None."""
    applied = getattr(model, _PATCH_ATTR, None)
    return None if applied is None or applied[1] is None else applied[1].kv_ratio
