"""The configuration an export is built from: the checkpoint's own resolved ``NeoXArgs``, and the HF configs.

A checkpoint ``<save>/global_stepN`` carries ``configs/resolved_config.yml``, written by
``NeoXArgs.save_resolved`` after derivation and the SepLLM checker. The export reads it back through
``NeoXArgs.from_resolved``, so derived values (separator ids from the run's tokenizer, the padded vocabulary,
the precision) are the ones training used, never defaults of the exporter's own.

* A user ``--config_file`` goes through ``NeoXArgs.from_ymls`` (duplicate and unknown keys are errors, values
  are derived as at launch). Where it disagrees with the checkpoint on a key in :data:`MODEL_KEYS`, the export
  stops, naming the key and both values; its other keys (e.g. a moved ``vocab_file``) are used.
* A checkpoint without ``resolved_config.yml`` (an older one, or GPT-NeoX's own) is read from its
  ``configs/*.yml`` through ``NeoXArgs.from_ymls``, and the export says so.

The config is rebuilt as rank 0 of the training run saw it (world size from the resolved config), with the run's
data paths and ``load`` cleared: an export needs neither, and they may not exist where it runs.
"""
import contextlib
import glob
import io
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.checkpoint_io import CheckpointError
from megatron.neox_arguments import ConfigError, Environment, NeoXArgs

ConversionError = CheckpointError  # one error type for every bad input of the export

RESOLVED_NAME = "resolved_config.yml"
ARCHITECTURES = ("sepllm_gpt_neox", "neox", "llama")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DTYPES = {"fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

# Keys of the SepLLM HF config, with the reference's exact names (SEPLLM_REFERENCE.md §9.2).
SEPLLM_KEYS = ("pos_emb", "separator_token_ids", "PADDING_ID",
               "prefill_local_window_size", "generate_local_window_size",
               "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
               "prefill_loc_win_size_list", "generate_win_loc_size_list", "init_tok_max_idx",
               "USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "PRINT_KV_RATIO", "print_ratio_intervals",
               "EXCLUDE_DIAGONAL", "USE_BiPE", "BiPE_seps", "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO",
               "SA_Numerator_Bias", "SA_Denominator_Bias", "BATCH_ADAPTIVE_INIT_POS", "USE_FIXED_SEP_INTERVALs",
               "fixed_sep_intervals_list")
_LOGGING_ONLY = ("PRINT_KV_RATIO", "print_ratio_intervals")
# Keys whose value changes the exported model (its weights' meaning, attention, or dtype under --precision auto).
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
              "mlp_multiple_of", "sliding_window_width", "rms_norm_epsilon", "max_position_embeddings",
              "rotary_pct", "rotary_emb_base", "norm", "layernorm_epsilon", "use_bias_in_norms",
              "use_bias_in_attn_linear", "use_bias_in_mlp", "no_weight_tying", "gpt_j_residual", "gpt_j_tied",
              "activation", "padded_vocab_size", "precision") + tuple(k for k in SEPLLM_KEYS if k not in _LOGGING_ONLY)
# What a model export does not need from the run and may not find where it runs.
_RUN_ONLY = {"load": None, "data_path": None, "train_data_paths": None, "valid_data_paths": None,
             "test_data_paths": None, "train_data_weights": None, "valid_data_weights": None,
             "test_data_weights": None, "hostfile": None, "user_script": None}


def _quiet(build: Callable):
    """Derivation prints the tokenizer and SepLLM checker lines of a launch; an export reports its own."""
    with contextlib.redirect_stdout(io.StringIO()):
        return build()


def _environment(world_size: int) -> Environment:
    # Rank 0 of the training run. A device is claimed so that an fp16 run's config validates on a CPU-only
    # machine; nothing of the export runs on it.
    return Environment(cuda_device_count=1, environ={"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"})


def _yaml_world_size(paths: List[str]) -> int:
    """World size implied by a YAML's batch keys when all three are given (else any size fits: 1)."""
    from megatron.neox_arguments.loading import merge_sources, read_yaml_keys

    values, _ = merge_sources([(p, read_yaml_keys(p)) for p in paths])
    glob_b, micro, accum = (values.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                    "gradient_accumulation_steps"))
    if all(isinstance(v, int) and v > 0 for v in (glob_b, micro, accum)) and glob_b % (micro * accum) == 0:
        ranks = max(int(values.get("pipe_parallel_size") or 0), 1) * int(values.get("model_parallel_size") or 1)
        return glob_b // (micro * accum) * ranks
    return 1


def _from_ymls(paths: List[str], world_size: Optional[int], what: str) -> NeoXArgs:
    try:
        world = world_size if world_size is not None else _yaml_world_size(paths)
        return _quiet(lambda: NeoXArgs.from_ymls(paths, overrides=dict(_RUN_ONLY), env=_environment(world)))
    except ConfigError as err:
        raise ConversionError(f"{what} {', '.join(paths)}: {err}") from None


def checkpoint_config_files(input_dir: str) -> List[str]:
    """The user YAMLs saved with a checkpoint (``configs/*.yml`` other than the resolved one)."""
    found = glob.glob(os.path.join(input_dir, "configs", "*.yml")) + \
        glob.glob(os.path.join(input_dir, "configs", "*.yaml"))
    return sorted(p for p in found if os.path.basename(p) != RESOLVED_NAME)


def checkpoint_args(input_dir: str, log: Callable[[str], None] = print) -> Optional[NeoXArgs]:
    """The checkpoint's own config: its resolved config, else (saying so) its saved YAMLs, else ``None``."""
    resolved = os.path.join(input_dir, "configs", RESOLVED_NAME)
    if os.path.isfile(resolved):
        import yaml

        try:
            with open(resolved, encoding="utf-8") as handle:
                values = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConversionError(f"broken resolved config {resolved}: {' '.join(str(err).split())}") from None
        if not isinstance(values, dict):
            raise ConversionError(f"resolved config {resolved} is not a mapping")
        world = values.get("global_num_gpus") or values.get("world_size") or 1
        overrides = dict(_RUN_ONLY)
        for key in ("vocab_file", "merge_file"):
            # Derived values (padded vocabulary, separator ids) are in the file already; the tokenizer itself
            # is only needed to save it, and a --config_file may say where it is now.
            if values.get(key) and not os.path.isfile(values[key]):
                log(f"note: {key} {values[key]} of {resolved} does not exist here; the model is built from the "
                    f"resolved values")
                overrides[key] = None
        try:
            return _quiet(lambda: NeoXArgs.from_resolved(resolved, env=_environment(int(world)),
                                                         overrides=overrides))
        except ConfigError as err:
            raise ConversionError(f"resolved config {resolved}: {err}") from None
    files = checkpoint_config_files(input_dir)
    if not files:
        return None
    log(f"note: {input_dir} has no configs/{RESOLVED_NAME} (an older or GPT-NeoX checkpoint): building its "
        f"config from {', '.join(os.path.basename(f) for f in files)} through NeoXArgs")
    return _from_ymls(files, None, "checkpoint config")


def _normal(value):
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def model_differences(ckpt: NeoXArgs, user: NeoXArgs) -> List[Tuple[str, object, object]]:
    """``(key, checkpoint value, user value)`` for every model key the two configs disagree on."""
    return [(key, getattr(ckpt, key), getattr(user, key)) for key in MODEL_KEYS
            if _normal(getattr(ckpt, key)) != _normal(getattr(user, key))]


def export_args(input_dir: str, config_files: Optional[List[str]],
                log: Callable[[str], None] = print) -> Tuple[NeoXArgs, Optional[NeoXArgs], str]:
    """``(model args, user args or None, description of the source)``; the model args are the checkpoint's."""
    ckpt = checkpoint_args(input_dir, log)
    source = os.path.join(input_dir, "configs", RESOLVED_NAME)
    if ckpt is not None and not os.path.isfile(source):
        source = f"the YAMLs in {os.path.join(input_dir, 'configs')}"
    if not config_files:
        if ckpt is None:
            raise ConversionError(f"--config_file not given and {input_dir} has no configs/{RESOLVED_NAME} "
                                  f"nor configs/*.yml")
        return ckpt, None, source
    world = ckpt.global_num_gpus if ckpt is not None else None
    user = _from_ymls(list(config_files), world, "--config_file")
    if ckpt is None:
        log(f"note: {input_dir} holds no saved config; the model is described by --config_file alone")
        return user, user, "--config_file " + ", ".join(config_files)
    for key, saved, given in model_differences(ckpt, user):
        raise ConversionError(f"--config_file {', '.join(config_files)} gives {key}={_normal(given)!r} but the "
                              f"checkpoint was trained with {key}={_normal(saved)!r} ({source}); fix or drop "
                              f"--config_file")
    return ckpt, user, source


def export_dtype(args: NeoXArgs, precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ConversionError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    return DTYPES[args.precision if precision == "auto" else precision]


# ---------------------------------------------------------------------------------------- HF configs
def supported_by_gpt_neox(args: NeoXArgs) -> None:
    """Refuses, naming the key, a model the GPT-NeoX model classes (stock or SepLLM) cannot represent."""
    refusals = (("activation", args.activation != "gelu", "GPT-NeoX exports support 'gelu' only"),
                ("norm", args.norm != "layernorm", "GPT-NeoX exports support 'layernorm' only"),
                ("gpt_j_tied", args.gpt_j_tied, "one shared layernorm is not supported by GPT-NeoX exports"),
                ("num_kv_heads", args.num_kv_heads != args.num_attention_heads,
                 "GPT-NeoX exports have multi-head attention only (use --architecture llama)"),
                ("sliding_window_width", args.sliding_window_width is not None,
                 "GPT-NeoX exports have no sliding window (use --architecture llama)"))
    for key, refused, why in refusals:
        if refused:
            raise ConversionError(f"{key}={getattr(args, key)!r}: {why}")


def hf_common(args: NeoXArgs, vocab_size: int) -> Dict:
    supported_by_gpt_neox(args)
    return {
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "intermediate_size": args.mlp_inner_size,
        "hidden_act": "gelu",
        "max_position_embeddings": args.max_position_embeddings,
        "initializer_range": args.init_method_std,
        "layer_norm_eps": args.layernorm_epsilon,
        "use_cache": True,
        "tie_word_embeddings": not args.no_weight_tying,
        "use_parallel_residual": args.gpt_j_residual,
        "attention_bias": args.use_bias_in_attn_linear,
        "rotary_pct": args.rotary_pct,
        "rotary_emb_base": args.rotary_emb_base,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def make_neox_config(args: NeoXArgs, vocab_size: int):
    from transformers import GPTNeoXConfig

    mode_flags = [k for k in ("streamingLLM", "USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO", "USE_BiPE",
                              "USE_FIXED_SEP_INTERVALs")
                  if getattr(args, k)]
    sepllm = not args.USE_ORIGINAL_FULL_ATTEN and _normal(args.separator_token_ids) not in (None, [-1])
    if mode_flags or sepllm:
        raise ConversionError(f"--architecture neox exports full attention only; this checkpoint uses "
                              f"{mode_flags or ['SepLLM separator_token_ids']}: use --architecture sepllm_gpt_neox")
    if args.pos_emb != "rotary":
        raise ConversionError(f"pos_emb={args.pos_emb!r}: stock GPTNeoX supports rotary only")
    config = GPTNeoXConfig(**hf_common(args, vocab_size))
    config.architectures = ["GPTNeoXForCausalLM"]
    return config


def sepllm_config_dict(args: NeoXArgs, vocab_size: int) -> Dict:
    """The ``sepllm_gpt_neox`` config: GPT-NeoX shapes plus every SepLLM key as training resolved it."""
    out = hf_common(args, vocab_size)
    out.update(model_parallel_size=args.model_parallel_size, num_layers=args.num_layers)
    # The trainer has no muP: its embeddings are scaled by 1, which the HF model reads from this key.
    out["mup_rp_embedding_mult"] = 1.0
    for key in SEPLLM_KEYS:
        out[key] = _normal(getattr(args, key))
    if out["separator_token_ids"] is None:
        out["separator_token_ids"] = [-1]
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
