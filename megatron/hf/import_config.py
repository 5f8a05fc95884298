"""The trainer configuration of a HuggingFace model directory: ``config.json`` -> GPT-NeoX YAML keys.

Supported: stock ``GPTNeoXForCausalLM`` (Pythia), ``LlamaForCausalLM`` and ``MistralForCausalLM``. Each HF setting
becomes the trainer key that builds the same model (the inverse of :mod:`megatron.hf.export_config` and
:mod:`megatron.hf.export_llama`); a setting the trainer cannot build (another activation, RoPE scaling, a head
size other than ``hidden_size / heads``) is refused naming the ``config.json`` key.

* MLP width: HF's ``intermediate_size`` is the trainer's ``mlp_inner_size``, which GPT-NeoX derives from the
  ``intermediate_size`` key. For gelu the two are equal (left unset when it is GPT-NeoX's default 4 x hidden, so
  ``configs/models/pythia-160m.yml`` describes the same model); for swiglu GPT-NeoX takes ``int(2 f / 3) // 2``,
  so ``intermediate_size`` is written as ``3 x`` HF's with ``mlp_multiple_of: 1``.
* Vocabulary: the trainer pads the tokenizer's size up to a multiple of ``make_vocab_size_divisible_by``; the value
  written makes that padding land exactly on HF's ``vocab_size`` (GPT-NeoX's 128 whenever it does, as for Pythia's
  50277 -> 50304).
* Mistral's ``sliding_window`` counts the query itself; ``sliding_window_width`` does not (``W = sliding_window - 1``).
"""
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from megatron.hf.export_config import ConversionError

ARCHITECTURES = {"GPTNeoXForCausalLM": "gpt_neox", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
MODEL_TYPES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
DEFAULT_VOCAB_MULTIPLE = 128  # GPT-NeoX's make_vocab_size_divisible_by
PRECISION_OF_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class TokenizerChoice:
    tokenizer_type: str
    path: str  # the file in the HF directory (or --vocab_file)
    vocab_size: int  # tokens the trainer's tokenizer reports (before padding)


def architecture_of(hf_dir: str) -> str:
    """``gpt_neox`` / ``llama`` / ``mistral`` from ``config.json``; anything else is refused by name."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"--hf_dir {hf_dir} has no config.json (give a HuggingFace model directory)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path} cannot be read as JSON: {err}") from None
    names = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if names:
        if len(names) != 1 or names[0] not in ARCHITECTURES:
            raise ConversionError(f"{path}: architectures {names} (model_type {model_type!r}) is not supported; "
                                  f"the import reads {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[names[0]]
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{path}: model_type {model_type!r} (no architectures key) is not supported; the "
                              f"import reads {', '.join(ARCHITECTURES)}")
    return model_type


def load_hf_config(hf_dir: str, arch: str):
    """The stock config class of ``arch`` (no remote code), which maps legacy keys (``rotary_pct``, ...)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig

    cls = {"gpt_neox": GPTNeoXConfig, "llama": LlamaConfig, "mistral": MistralConfig}[arch]
    try:
        return cls.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as err:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: {str(err).splitlines()[0]}") from None


def _refuse(hf_dir: str, key: str, value, why: str):
    raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: {key}={value!r}: {why}")


def _rope(hf_dir: str, config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        _refuse(hf_dir, "rope_parameters.rope_type", rope_type,
                "the trainer's rotary embedding has no RoPE scaling (only 'default')")
    theta = rope.get("rope_theta", 10000)
    if float(theta) != int(float(theta)):
        _refuse(hf_dir, "rope_theta", theta, "rotary_emb_base is an integer in the trainer")
    return {"rotary_emb_base": int(float(theta)), "rotary_pct": float(rope.get("partial_rotary_factor", 1.0))}


def _head_size(hf_dir: str, config) -> None:
    if config.hidden_size % config.num_attention_heads:
        _refuse(hf_dir, "num_attention_heads", config.num_attention_heads,
                f"does not divide hidden_size={config.hidden_size}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads:
        _refuse(hf_dir, "head_dim", head_dim, f"the trainer's head size is hidden_size / num_attention_heads = "
                                              f"{config.hidden_size // config.num_attention_heads}")


def model_keys(hf_dir: str, arch: str, config, seq_length: Optional[int] = None) -> "OrderedDict[str, object]":
    """GPT-NeoX YAML keys of the model (shape, norm, rotary, biases, dropout), in the order a reader expects."""
    _head_size(hf_dir, config)
    rope = _rope(hf_dir, config)
    positions = int(config.max_position_embeddings)
    keys = OrderedDict(num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
                       num_attention_heads=int(config.num_attention_heads))
    if arch == "gpt_neox":
        if config.hidden_act != "gelu":
            _refuse(hf_dir, "hidden_act", config.hidden_act, "the trainer's GPT-NeoX MLP imports the exact 'gelu' only")
        if int(config.intermediate_size) != 4 * int(config.hidden_size):
            keys["intermediate_size"] = int(config.intermediate_size)
        keys.update(activation="gelu", norm="layernorm", layernorm_epsilon=float(config.layer_norm_eps),
                    gpt_j_residual=bool(config.use_parallel_residual),
                    use_bias_in_attn_linear=bool(config.attention_bias))
    else:
        if config.hidden_act != "silu":
            _refuse(hf_dir, "hidden_act", config.hidden_act, "Llama-family models import with the silu gate (swiglu)")
        if rope["rotary_pct"] != 1.0:
            _refuse(hf_dir, "partial_rotary_factor", rope["rotary_pct"], "Llama-family models rotate every dimension")
        kv = int(config.num_key_value_heads or config.num_attention_heads)
        if config.num_attention_heads % kv:
            _refuse(hf_dir, "num_key_value_heads", kv, f"does not divide num_attention_heads="
                                                       f"{config.num_attention_heads}")
        keys.update(num_kv_heads=kv, intermediate_size=3 * int(config.intermediate_size), mlp_multiple_of=1,
                    activation="swiglu", norm="rmsnorm", rms_norm_epsilon=float(config.rms_norm_eps),
                    use_bias_in_norms=False, gpt_j_residual=False,
                    use_bias_in_attn_linear=bool(getattr(config, "attention_bias", False)),
                    use_bias_in_mlp=bool(getattr(config, "mlp_bias", False)))
        window = getattr(config, "sliding_window", None) if arch == "mistral" else None
        if window is not None:
            if int(window) < 2:
                _refuse(hf_dir, "sliding_window", window, "a window must hold the query and at least one key")
            keys["sliding_window_width"] = int(window) - 1
    keys.update(seq_length=int(seq_length or positions), max_position_embeddings=positions, pos_emb="rotary",
                rotary_pct=rope["rotary_pct"], rotary_emb_base=rope["rotary_emb_base"],
                no_weight_tying=not bool(config.tie_word_embeddings),
                hidden_dropout=float(getattr(config, "hidden_dropout", 0.0) or 0.0),
                attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0))
    if keys["seq_length"] > positions:
        raise ConversionError(f"--seq_length {keys['seq_length']} exceeds max_position_embeddings={positions} of "
                              f"{os.path.join(hf_dir, 'config.json')}")
    return keys


def choose_tokenizer(hf_dir: str, vocab_file: Optional[str] = None) -> TokenizerChoice:
    """The tokenizer the trainer builds for this model: ``tokenizer.json`` (HFTokenizer, which needs GPT-NeoX's
    ``<|endoftext|>``), else ``tokenizer.model`` (SPMTokenizer, GPT-NeoX's choice for Llama); ``vocab_file``
    (a ``.json`` or a SentencePiece model) overrides the directory's."""
    from megatron.tokenizer.tokenizer import TokenizerError, make_tokenizer

    if vocab_file is not None:
        if not os.path.isfile(vocab_file):
            raise ConversionError(f"--vocab_file {vocab_file} does not exist")
        candidates = [("HFTokenizer" if vocab_file.endswith(".json") else "SPMTokenizer", vocab_file)]
    else:
        candidates = [(t, os.path.join(hf_dir, n)) for t, n in (("HFTokenizer", "tokenizer.json"),
                                                                ("SPMTokenizer", "tokenizer.model"))]
        candidates = [(t, p) for t, p in candidates if os.path.isfile(p)]
        if not candidates:
            raise ConversionError(f"--hf_dir {hf_dir} has neither tokenizer.json nor tokenizer.model; give "
                                  f"--vocab_file")
    problems = []
    for tokenizer_type, path in candidates:
        try:
            tokenizer = make_tokenizer(tokenizer_type, path, None)
        except (TokenizerError, OSError, ImportError) as err:
            problems.append(f"{tokenizer_type} {path}: {err}")
            continue
        return TokenizerChoice(tokenizer_type, path, int(tokenizer.vocab_size))
    raise ConversionError("no tokenizer the trainer can build: " + "; ".join(problems)
                          + " (give --vocab_file)")


def vocab_multiple(tokenizer_size: int, vocab_rows: int, tokenizer_path: str) -> int:
    """``make_vocab_size_divisible_by`` whose padding of ``tokenizer_size`` is exactly ``vocab_rows`` (HF's
    ``vocab_size``): a divisor of ``vocab_rows`` greater than the padding, 128 where that works, else the largest
    such divisor below 128, else the smallest above it."""
    if tokenizer_size > vocab_rows:
        raise ConversionError(f"tokenizer {tokenizer_path} has {tokenizer_size} tokens but the model's vocab_size "
                              f"(config.json) is {vocab_rows}: ids >= {vocab_rows} would have no embedding row")
    fits = [m for m in range(1, vocab_rows + 1) if vocab_rows % m == 0 and m > vocab_rows - tokenizer_size]
    if DEFAULT_VOCAB_MULTIPLE in fits:
        return DEFAULT_VOCAB_MULTIPLE
    below = [m for m in fits if m < DEFAULT_VOCAB_MULTIPLE]
    return max(below) if below else min(fits)
