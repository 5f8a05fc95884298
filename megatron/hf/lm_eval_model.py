"""``sepllm_hf``: lm-evaluation-harness's HF model with training-free SepLLM, registered in lm-eval's model registry.

``model_args`` are ``HFLM``'s (``pretrained``, ``dtype``, ``batch_size``, ``attn_implementation``, ...) plus one of:

- ``sepllm_config=FILE``: the reference's training-free YAML, applied with
  :func:`megatron.hf.training_free.apply_sepllm` (mask-based; eager or sdpa);
- ``sep_cache=a,s,w,c``: generation with a :class:`megatron.hf.sep_cache.SepCache` of ``init_cache_size=a``,
  ``sep_cache_size=s``, ``local_size=w``, ``cache_size=c`` (any attention implementation). Scoring requests are
  one prefill each, which a SepCache never compresses, so only ``generate_until`` tasks change;
- neither: the settings saved with the model (config.json field ``sepllm_config`` or ``sepllm_config.yml``), else
  the stock model.

Importing this module registers the class (``python -m megatron.hf.lm_eval`` does).
"""
from typing import Optional, Sequence, Tuple

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from megatron.hf.training_free import TrainingFreeConfigError, apply_sepllm, load_config, saved_config
from megatron.hf.training_free.config import hf_separator_ids
from megatron.hf.training_free.families import FAMILIES, UnsupportedModelError

MODEL_NAME = "sepllm_hf"


def parse_sep_cache(value) -> Tuple[int, int, int, int]:
    """``(a, s, w, c)`` from ``"a,s,w,c"`` (also ``a:s:w:c`` or a list), checked: ``a + s + w < c``."""
    if isinstance(value, str):
        parts = value.strip().strip("[]()").replace(":", ",").split(",")
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        parts = [value]
    try:
        sizes = tuple(int(str(p).strip()) for p in parts if str(p).strip() != "")
    except ValueError:
        sizes = ()
    if len(sizes) != 4:
        raise ValueError(f"sep_cache={value!r}: expected four integers init,sep,local,cache (e.g. 4,64,256,512)")
    a, s, w, c = sizes
    if min(a, s) < 0 or w < 1:
        raise ValueError(f"sep_cache={value!r}: sizes must be >= 0 and local >= 1")
    if a + s + w >= c:
        raise ValueError(f"sep_cache={value!r}: init + sep + local = {a + s + w} must be < cache_size {c}")
    return sizes


@register_model(MODEL_NAME)
class SepLLMHFLM(HFLM):
    """``HFLM`` whose model runs training-free SepLLM (mask-based) or generates with a SepCache."""

    def __init__(self, pretrained, sepllm_config: Optional[str] = None, sep_cache=None, **kwargs):
        if sepllm_config and sep_cache is not None:
            raise ValueError("model_args: give sepllm_config (mask-based SepLLM) or sep_cache (a SepCache), not both")
        config = load_config(sepllm_config) if sepllm_config else None
        sizes = parse_sep_cache(sep_cache) if sep_cache is not None else None
        if isinstance(pretrained, str) and config is not None:
            self._check_before_loading(pretrained, config, kwargs)
        super().__init__(pretrained=pretrained, **kwargs)
        self.sep_cache_sizes = sizes
        self.sepllm_settings = None
        if config is None and sizes is None:
            config = saved_config(getattr(self.model, "name_or_path", None), self.model.config)
        if config is not None:
            self.sepllm_settings = apply_sepllm(self.model, config, tokenizer=self.tokenizer)
        if sizes is not None:
            self._sep_cache_kwargs = self._sep_cache_settings(sizes)

    @staticmethod
    def _check_before_loading(pretrained: str, config, kwargs) -> None:
        """Family and ``Layer_num`` from the model's config.json, before any weight is read."""
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=bool(kwargs.get("trust_remote_code")))
        family = getattr(model_config, "model_type", None)
        if family not in FAMILIES:
            raise UnsupportedModelError(f"model family {family!r} of {pretrained} is not supported by the "
                                        f"training-free SepLLM path; supported: {sorted(FAMILIES)}")
        config.check_layers(int(model_config.num_hidden_layers))

    def _sep_cache_settings(self, sizes) -> dict:
        from megatron.hf.sep_cache import MODEL_TYPE_PRESETS

        a, s, w, c = sizes
        kwargs = dict(init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c)
        model_config = self.model.config
        trained = getattr(model_config, "separator_token_ids", None)
        if not trained and getattr(model_config, "model_type", None) not in MODEL_TYPE_PRESETS:
            kwargs["separator_token_ids"] = hf_separator_ids(self.tokenizer)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            kwargs["PADDING_ID"] = pad
        return kwargs

    def new_sep_cache(self):
        """A fresh SepCache for one generation (``sep_cache=...``)."""
        from megatron.hf.sep_cache import SepCache

        return SepCache.from_model_config(self.model.config, **self._sep_cache_kwargs)

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        if self.sep_cache_sizes is not None:
            generation_kwargs["cache"] = self.new_sep_cache()  # transformers 5: generate(cache=...)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lm-eval splits ``model_args`` on every comma; ``sep_cache=a,s,w,c`` keeps its four numbers."""
        return super().create_from_arg_string(join_sep_cache(arg_string), additional_config)


def join_sep_cache(arg_string: str) -> str:
    """``...,sep_cache=4,64,256,512,...`` -> ``...,sep_cache=4:64:256:512,...`` (bare numbers after the key)."""
    if not arg_string or "sep_cache=" not in arg_string:
        return arg_string
    out = []
    for part in arg_string.split(","):
        if out and out[-1].startswith("sep_cache=") and part.strip().isdigit():
            out[-1] += ":" + part.strip()
        else:
            out.append(part)
    return ",".join(out)


__all__ = ["SepLLMHFLM", "MODEL_NAME", "parse_sep_cache", "join_sep_cache", "TrainingFreeConfigError"]
