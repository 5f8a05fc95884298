#!/usr/bin/env python
"""Export a trainer checkpoint (``<save>/global_stepN``) to a HuggingFace model directory.

    python tools/ckpts/convert_neox_to_hf.py --input_dir <save>/global_stepN --config_file cfg.yml \
        --output_dir out/ --precision auto|fp16|bf16|fp32 --architecture sepllm_gpt_neox|neox [--no_save_tokenizer]

* Both checkpoint layouts: pipeline layer files ``layer_XX-model_YY-model_states.pt`` and the sequential
  ``mp_rank_YY_model_states.pt`` (keys ``sequential.<idx>.``). Layer indices: 0 embedding, 2..L+1 blocks,
  L+3 final norm, L+4 output layer.
* Tensor-parallel shards are merged: column-parallel weights/biases on dim 0, row-parallel weights on dim 1,
  row-parallel biases summed with the parallel (GPT-J) residual (every rank adds its bias before the
  all-reduce) and taken once otherwise (replicated after the all-reduce), norms averaged, embeddings on dim 0.
* ``neox`` writes a stock ``GPTNeoXForCausalLM`` (full attention only); ``sepllm_gpt_neox`` writes every
  SepLLM/SA/BiPE key plus self-contained modeling code (config, model, SepCache and a verbatim copy of the
  trainer's ``rule.py``) for ``trust_remote_code=True``.
* The export is written to a temporary directory beside ``--output_dir`` and renamed at the end.

``--config_file`` defaults to the YAMLs saved with the checkpoint (``global_stepN/configs/*.yml``).
"""
import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron.checkpoint_io import CheckpointError, CheckpointReader  # noqa: E402
HF_SOURCE_DIR = REPO_ROOT / "megatron" / "hf"
RULE_SOURCE = REPO_ROOT / "megatron" / "model" / "sepllm" / "rule.py"
ARCHITECTURES = ("sepllm_gpt_neox", "neox")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")

COLUMN_PARALLEL = ("attention.query_key_value.weight", "attention.query_key_value.bias",
                   "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
ROW_PARALLEL_WEIGHTS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
ROW_PARALLEL_BIASES = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")
LAYER_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
               "post_attention_layernorm.bias")
SEPLLM_KEYS = ("pos_emb", "mup_rp_embedding_mult", "separator_token_ids", "PADDING_ID",
               "prefill_local_window_size", "generate_local_window_size",
               "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
               "prefill_loc_win_size_list", "generate_win_loc_size_list", "init_tok_max_idx",
               "USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "PRINT_KV_RATIO", "print_ratio_intervals",
               "EXCLUDE_DIAGONAL", "USE_BiPE", "BiPE_seps", "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO",
               "SA_Numerator_Bias", "SA_Denominator_Bias", "BATCH_ADAPTIVE_INIT_POS")
EXPORT_CODE_FILES = ("configuration_sepllm_gpt_neox.py", "modeling_sepllm_gpt_neox.py", "sep_cache.py")


# Bad input for the converter (the message names the file, key or value); checkpoint read errors are the same type.
ConversionError = CheckpointError


# ---------------------------------------------------------------------------------------- config
def load_config(paths: List[str]) -> Dict:
    """Merges YAML files in order; keys are normalised ``-`` -> ``_`` (GPT-NeoX convention)."""
    merged: Dict = {}
    for path in paths:
        if not os.path.isfile(path):
            raise ConversionError(f"config file not found: {path}")
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ConversionError(f"config file {path} does not hold a mapping")
        for key, value in data.items():
            merged[key.replace("-", "_")] = value
    return merged


def default_config_files(input_dir: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(input_dir, "configs", "*.yml")) +
                   glob.glob(os.path.join(input_dir, "configs", "*.yaml")))
    if not files:
        raise ConversionError(f"--config_file not given and no configs/*.yml under {input_dir}")
    return files


def _get(cfg: Dict, key: str, default=None):
    return cfg.get(key, default)


def resolve_precision(cfg: Dict, precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ConversionError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    fp16 = cfg.get("fp16") or {}
    bf16 = cfg.get("bf16") or {}
    named = str(cfg.get("precision", "")).lower()
    if (isinstance(fp16, dict) and fp16.get("enabled")) or named in ("fp16", "float16", "half"):
        return torch.float16
    if (isinstance(bf16, dict) and bf16.get("enabled")) or named in ("bf16", "bfloat16"):
        return torch.bfloat16
    return torch.float32


def _take(states: List[Dict], key: str, where: str) -> List[torch.Tensor]:
    for sd in states:
        if key not in sd:
            raise ConversionError(f"{where}: tensor '{key}' is missing (keys: {sorted(sd)[:12]}...)")
    return [sd[key] for sd in states]


def merge_block(states: List[Dict], parallel_residual: bool, where: str) -> Dict[str, torch.Tensor]:
    """Merges one transformer block across TP ranks (rules in the module docstring)."""
    out = {}
    for key in COLUMN_PARALLEL:
        if key in states[0]:
            out[key] = torch.cat(_take(states, key, where), dim=0)
    for key in ROW_PARALLEL_WEIGHTS:
        out[key] = torch.cat(_take(states, key, where), dim=1)
    for key in ROW_PARALLEL_BIASES:
        if key in states[0]:
            parts = _take(states, key, where)
            out[key] = sum(parts) if parallel_residual else parts[0]
    for key in LAYER_NORMS:
        out[key] = sum(_take(states, key, where)) / len(states)
    return out


# ---------------------------------------------------------------------------------------- state dict
def build_state_dict(reader: CheckpointReader, cfg: Dict, hidden: int, heads: int, vocab_rows: Optional[int],
                     use_bipe: bool) -> Dict[str, torch.Tensor]:
    num_layers = reader.num_layers
    parallel_residual = bool(_get(cfg, "gpt_j_residual", False))
    sd: Dict[str, torch.Tensor] = {}
    emb = reader.layer(0)
    sd["gpt_neox.embed_in.weight"] = torch.cat(_take(emb, "word_embeddings.weight", "layer 0 (embedding)"), 0)
    if use_bipe or _get(cfg, "pos_emb", "rotary") == "learned":
        # Not vocab-parallel: every rank holds the whole table.
        sd["gpt_neox.position_embeddings.weight"] = _take(emb, "position_embeddings.weight",
                                                          "layer 0 (embedding)")[0]
    for i in range(num_layers):
        block = merge_block(reader.layer(i + 2), parallel_residual, f"layer {i + 2} (transformer block {i})")
        for key, value in block.items():
            sd[f"gpt_neox.layers.{i}.{key}"] = value
    norm = reader.layer(num_layers + 3)
    sd["gpt_neox.final_layer_norm.weight"] = sum(_take(norm, "norm.weight", "final norm")) / len(norm)
    sd["gpt_neox.final_layer_norm.bias"] = sum(_take(norm, "norm.bias", "final norm")) / len(norm)
    head = reader.layer(num_layers + 4, required=bool(_get(cfg, "no_weight_tying", False)))
    if head is not None and "final_linear.weight" in head[0]:
        sd["embed_out.weight"] = torch.cat(_take(head, "final_linear.weight", "output layer"), 0)
    else:
        sd["embed_out.weight"] = sd["gpt_neox.embed_in.weight"].clone()
    check_shapes(sd, num_layers, hidden, heads, cfg, vocab_rows)
    return sd


def check_shapes(sd: Dict[str, torch.Tensor], num_layers: int, hidden: int, heads: int, cfg: Dict,
                 vocab_rows: Optional[int]) -> None:
    """Every tensor must match the config; the error names the tensor and the config key."""
    ffn = 4 * hidden if not _get(cfg, "intermediate_size") else int(cfg["intermediate_size"])
    expect = {}
    for i in range(num_layers):
        p = f"gpt_neox.layers.{i}."
        expect[p + "attention.query_key_value.weight"] = ((3 * hidden, hidden), "hidden_size")
        expect[p + "attention.dense.weight"] = ((hidden, hidden), "hidden_size")
        expect[p + "mlp.dense_h_to_4h.weight"] = ((ffn, hidden), "hidden_size (ffn = 4 x hidden_size)")
        expect[p + "mlp.dense_4h_to_h.weight"] = ((hidden, ffn), "hidden_size (ffn = 4 x hidden_size)")
        expect[p + "input_layernorm.weight"] = ((hidden,), "hidden_size")
    expect["gpt_neox.final_layer_norm.weight"] = ((hidden,), "hidden_size")
    for key, (shape, cfg_key) in expect.items():
        got = tuple(sd[key].shape)
        if got != shape:
            raise ConversionError(f"tensor {key} has shape {got} but the config ({cfg_key}={hidden}, "
                                  f"num_attention_heads={heads}) implies {shape}")
    rows, cols = sd["gpt_neox.embed_in.weight"].shape
    if cols != hidden:
        raise ConversionError(f"tensor word_embeddings.weight has {cols} columns but hidden_size is {hidden}")
    if vocab_rows is not None and rows != vocab_rows:
        raise ConversionError(f"tensor word_embeddings.weight has {rows} rows but the padded vocabulary from "
                              f"vocab_file / make_vocab_size_divisible_by is {vocab_rows}")
    if "gpt_neox.position_embeddings.weight" in sd:
        got = sd["gpt_neox.position_embeddings.weight"].shape
        if tuple(got) != (int(_get(cfg, "max_position_embeddings", _get(cfg, "seq_length"))), hidden):
            raise ConversionError(f"tensor position_embeddings.weight has shape {tuple(got)} but "
                                  f"max_position_embeddings={_get(cfg, 'max_position_embeddings')}")


def padded_vocab(cfg: Dict, tokenizer) -> Optional[int]:
    if tokenizer is None:
        return None
    multiple = int(_get(cfg, "make_vocab_size_divisible_by", 128)) * int(_get(cfg, "model_parallel_size", 1))
    size = len(tokenizer)
    return ((size + multiple - 1) // multiple) * multiple


def load_tokenizer(cfg: Dict):
    vocab_file = _get(cfg, "vocab_file")
    if not vocab_file:
        return None
    if not os.path.isfile(vocab_file):
        raise ConversionError(f"vocab_file {vocab_file} (from the config) does not exist")
    if not str(vocab_file).endswith(".json"):
        return None  # GPT-2 BPE / SentencePiece vocabularies are not exported as fast tokenizers here
    from transformers import GPTNeoXTokenizerFast

    return GPTNeoXTokenizerFast(tokenizer_file=str(vocab_file))


# ---------------------------------------------------------------------------------------- HF configs
def hf_common(cfg: Dict, vocab_size: int) -> Dict:
    hidden = int(cfg["hidden_size"])
    act = _get(cfg, "activation", "gelu")
    if act != "gelu":
        raise ConversionError(f"activation={act!r}: GPT-NeoX exports support 'gelu' only")
    if str(_get(cfg, "norm", "layernorm")) != "layernorm":
        raise ConversionError(f"norm={cfg['norm']!r}: GPT-NeoX exports support 'layernorm' only")
    if _get(cfg, "gpt_j_tied", False):
        raise ConversionError("gpt_j_tied=True (one shared layernorm) is not supported by GPT-NeoX exports")
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": int(cfg["num_layers"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "intermediate_size": int(_get(cfg, "intermediate_size") or 4 * hidden),
        "hidden_act": "gelu",
        "max_position_embeddings": int(_get(cfg, "max_position_embeddings", _get(cfg, "seq_length", 2048))),
        "initializer_range": float(_get(cfg, "init_method_std", 0.02)),
        "layer_norm_eps": float(_get(cfg, "layernorm_epsilon", 1e-5)),
        "use_cache": True,
        "tie_word_embeddings": not bool(_get(cfg, "no_weight_tying", False)),
        "use_parallel_residual": bool(_get(cfg, "gpt_j_residual", False)),
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def make_neox_config(cfg: Dict, vocab_size: int):
    from transformers import GPTNeoXConfig

    mode_flags = [k for k in ("streamingLLM", "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO", "USE_BiPE")
                  if _get(cfg, k, False)]
    sepllm = not _get(cfg, "USE_ORIGINAL_FULL_ATTEN", False) and _get(cfg, "separator_token_ids") not in (None, [-1])
    if mode_flags or sepllm:
        raise ConversionError(f"--architecture neox exports full attention only; this config uses "
                              f"{mode_flags or ['SepLLM separator_token_ids']}: use --architecture sepllm_gpt_neox")
    if _get(cfg, "pos_emb", "rotary") != "rotary":
        raise ConversionError(f"pos_emb={cfg['pos_emb']!r}: stock GPTNeoX supports rotary only")
    common = hf_common(cfg, vocab_size)
    common.update(rotary_pct=float(_get(cfg, "rotary_pct", 1.0)),
                  rotary_emb_base=float(_get(cfg, "rotary_emb_base", 10000)))
    config = GPTNeoXConfig(**common)
    config.architectures = ["GPTNeoXForCausalLM"]
    return config


def sepllm_config_dict(cfg: Dict, vocab_size: int) -> Dict:
    sys.path.insert(0, str(REPO_ROOT))
    from megatron.hf.configuration_sepllm_gpt_neox import SEPLLM_DEFAULTS

    out = hf_common(cfg, vocab_size)
    out.update(rotary_pct=float(_get(cfg, "rotary_pct", 1.0)), rotary_emb_base=float(_get(cfg, "rotary_emb_base", 10000)),
               model_parallel_size=int(_get(cfg, "model_parallel_size", 1)), num_layers=int(cfg["num_layers"]))
    for key in SEPLLM_KEYS:
        value = cfg.get(key, SEPLLM_DEFAULTS.get(key))
        out[key] = value
    if out["separator_token_ids"] is None:
        out["separator_token_ids"] = [-1]
    num_layers = int(cfg["num_layers"])
    for flag, lst in (("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_loc_win_size_list"),
                      ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "generate_win_loc_size_list")):
        if out[flag] and (not isinstance(out[lst], list) or len(out[lst]) != num_layers):
            raise ConversionError(f"{lst} must list {num_layers} windows (num_layers) when {flag} is true, "
                                  f"got {out[lst]!r}")
    if out["pos_emb"] not in ("rotary", "alibi", "learned", "none"):
        raise ConversionError(f"pos_emb={out['pos_emb']!r} is not supported by sepllm_gpt_neox")
    out.update({
        "model_type": "sepllm_gpt_neox",
        "architectures": ["SepLLMGPTNeoXForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sepllm_gpt_neox.SepLLMGPTNeoXConfig",
            "AutoModelForCausalLM": "modeling_sepllm_gpt_neox.SepLLMGPTNeoXForCausalLM",
        },
        "torch_dtype": None,
    })
    return out


# ---------------------------------------------------------------------------------------- export
def export(input_dir: str, config_files: Optional[List[str]], output_dir: str, precision: str = "auto",
           architecture: str = "sepllm_gpt_neox", save_tokenizer: bool = True,
           rule_source: Optional[Path] = None) -> str:
    """Converts and writes the export; returns ``output_dir``. Raises :class:`ConversionError` on bad input."""
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"unknown --architecture {architecture!r}; choose one of {ARCHITECTURES}")
    cfg = load_config(config_files or default_config_files(input_dir))
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if key not in cfg:
            raise ConversionError(f"config key '{key}' is missing from {config_files}")
    dtype = resolve_precision(cfg, precision)
    tokenizer = load_tokenizer(cfg) if save_tokenizer or _get(cfg, "vocab_file") else None
    reader = CheckpointReader(input_dir, int(cfg["num_layers"]))
    sd = build_state_dict(reader, cfg, int(cfg["hidden_size"]), int(cfg["num_attention_heads"]),
                          padded_vocab(cfg, tokenizer), bool(_get(cfg, "USE_BiPE", False)))
    vocab_size = sd["gpt_neox.embed_in.weight"].shape[0]
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}

    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
        if architecture == "neox":
            config = make_neox_config(cfg, vocab_size)
            config.torch_dtype = dtype_name
            config.save_pretrained(tmp)
        else:
            config = sepllm_config_dict(cfg, vocab_size)
            config["torch_dtype"] = dtype_name
            config["dtype"] = dtype_name
            with open(tmp / "config.json", "w") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
            for name in EXPORT_CODE_FILES:
                shutil.copyfile(HF_SOURCE_DIR / name, tmp / name)
            rule = Path(rule_source) if rule_source else RULE_SOURCE
            if not rule.is_file():
                raise ConversionError(f"the SepLLM rule {rule} is missing; the export needs a verbatim copy")
            shutil.copyfile(rule, tmp / "rule.py")
        from safetensors.torch import save_file

        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if save_tokenizer and tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return str(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="<save>/global_stepN")
    parser.add_argument("--config_file", nargs="*", default=None,
                        help="YAML file(s) of the run (default: <input_dir>/configs/*.yml)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--architecture", default="sepllm_gpt_neox")
    parser.add_argument("--no_save_tokenizer", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = export(args.input_dir, args.config_file, args.output_dir, args.precision, args.architecture,
                      not args.no_save_tokenizer)
    except ConversionError as err:
        print(f"convert_neox_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.architecture} model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
