"""Loading a model for inference: from a trainer checkpoint (in memory, no export written) or an export dir.

Both paths end in the same HF model classes, so generation, streaming and lm-eval share one code path and
the trainer-vs-HF parity tests cover all of them. A trainer checkpoint becomes a ``sepllm_gpt_neox`` model
(every attention mode), converted with the exporter's own readers, merge rules and shape checks (megatron.hf.export).
"""
import os
from typing import List, Optional

import torch


class TextTokenizer:
    """The small tokenizer surface inference needs: ``encode``, ``decode``, ``eod``, ``pad``, ``vocab_size``."""

    def __init__(self, hf_tokenizer=None, megatron_tokenizer=None):
        if (hf_tokenizer is None) == (megatron_tokenizer is None):
            raise ValueError("TextTokenizer needs exactly one of an HF or a megatron tokenizer")
        self.hf = hf_tokenizer
        self.mt = megatron_tokenizer

    def encode(self, text: str) -> List[int]:
        if self.hf is not None:
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        return list(self.mt.tokenize(text))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.hf is not None:
            return self.hf.decode(ids)
        return self.mt.detokenize(ids)

    @property
    def eod(self) -> int:
        if self.hf is not None:
            return int(self.hf.eos_token_id if self.hf.eos_token_id is not None else 0)
        return int(self.mt.eod)

    @property
    def pad(self) -> int:
        if self.hf is not None and self.hf.pad_token_id is not None:
            return int(self.hf.pad_token_id)
        return self.eod


def load_export(model_dir: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """``(model, TextTokenizer)`` from an export directory (stock gpt_neox or remote-code sepllm_gpt_neox)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} is not an export directory (no config.json)")
    kwargs = {"trust_remote_code": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return model, TextTokenizer(hf_tokenizer=tokenizer)


def load_from_neox_args(neox_args, device: str = "cpu"):
    """``(model, TextTokenizer)`` from the checkpoint ``neox_args.load`` (else ``save``) points at (``latest`` or a
    tag dir)."""
    from megatron.checkpoint_io import CheckpointReader
    from megatron.checkpointing import resolve_checkpoint
    from megatron.hf.configuration_sepllm_gpt_neox import SepLLMGPTNeoXConfig
    from megatron.hf.export import build_state_dict
    from megatron.hf.export_config import checkpoint_args, export_dtype, model_differences, sepllm_config_dict
    from megatron.hf.modeling_sepllm_gpt_neox import SepLLMGPTNeoXForCausalLM

    # Like training, which resumes from 'load' and writes to 'save': a config that only trained (no 'load')
    # generates from the checkpoint its training wrote.
    path = neox_args.load or neox_args.save
    if not path:
        raise ValueError("set 'load' (or 'save') in the config to the checkpoint directory to generate from")
    load_dir, tag = resolve_checkpoint(path)
    ckpt_dir = os.path.join(load_dir, tag)
    saved = checkpoint_args(ckpt_dir, log=lambda line: None)
    # The weights mean what the checkpoint's own config says; a run config that contradicts it would build
    # another model around them.
    for key, trained, given in (model_differences(saved, neox_args) if saved is not None else ()):
        if key != "precision":  # inference may run the weights in another dtype
            raise ValueError(f"the config gives {key}={given!r} but checkpoint {ckpt_dir} was trained with "
                             f"{key}={trained!r}")
    reader = CheckpointReader(ckpt_dir, neox_args.num_layers)
    sd = build_state_dict(reader, neox_args)
    config_dict = sepllm_config_dict(neox_args, sd["gpt_neox.embed_in.weight"].shape[0])
    for key in ("model_type", "architectures", "auto_map", "torch_dtype"):
        config_dict.pop(key, None)
    config = SepLLMGPTNeoXConfig(**config_dict)
    model = SepLLMGPTNeoXForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {load_dir}/{tag} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    dtype = export_dtype(neox_args, "auto")
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 matmuls are slow or missing on CPU
    return model.to(device=device, dtype=dtype).eval(), tokenizer_from_neox_args(neox_args)


def tokenizer_from_neox_args(neox_args) -> TextTokenizer:
    vocab_file = neox_args.vocab_file
    if vocab_file and str(vocab_file).endswith(".json") and neox_args.tokenizer_type == "HFTokenizer":
        from transformers import GPTNeoXTokenizerFast

        return TextTokenizer(hf_tokenizer=GPTNeoXTokenizerFast(tokenizer_file=str(vocab_file)))
    from megatron.tokenizer import build_tokenizer

    return TextTokenizer(megatron_tokenizer=build_tokenizer(neox_args))
