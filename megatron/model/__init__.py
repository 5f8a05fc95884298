"""GPT-NeoX model. ``GPT2ModelPipe`` needs DeepSpeed and is imported on first access, so the plain-torch parts
(layers, ``build_sequential_model``) work where DeepSpeed is absent (e.g. GPU benchmark images)."""
from megatron.model.layer_list import build_sequential_model, gpt2_layer_specs  # noqa: F401


def __getattr__(name):
    if name in ("GPT2ModelPipe", "cross_entropy"):
        from megatron.model import gpt2_model

        return getattr(gpt2_model, name)
    raise AttributeError(f"module 'megatron.model' has no attribute {name!r}")
