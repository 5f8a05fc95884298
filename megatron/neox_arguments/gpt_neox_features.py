"""GPT-NeoX keys and values for features this project does not have, refused together by name.

GPT-NeoX's configs (and the configs it saves with its checkpoints) carry keys for Mixture of Experts,
Transformer Engine, bitsandbytes, gMLP, Mamba, RWKV, DeepSpeed sparse attention, comet, the profilers, muP,
preference training and more. Without this table such a key would be an "unknown key" error, one per run,
suggesting a look-alike key. Here every GPT-NeoX key that is not a field of this project is listed with
GPT-NeoX's default (megatron/neox_arguments/neox_args.py and deepspeed_args.py at ea7aefd8) and the feature
it belongs to, and `scan` reports all of them at once:

* a key at GPT-NeoX's default (the feature off, e.g. ``use_comet: false``, as GPT-NeoX writes every key into
  the configs it saves) asks for nothing this project lacks: it is dropped, and named once at launch;
* any other value is refused, all such keys and values in one message, each with its feature and where it
  was given.

Values of keys the project has, for features it lacks (``attention_config`` types such as ``sparse_fixed``,
``norm: scalenorm``, ``pos_emb: rpe``, ...), are collected in the same message.
"""
import json
from typing import Dict, List, Tuple

MOE = "Mixture of Experts"
TE = "Transformer Engine"
BNB = "bitsandbytes optimizers"
GMLP = "gMLP / aMLP blocks"
MAMBA = "Mamba blocks"
RWKV = "RWKV blocks"
SPARSE = "DeepSpeed sparse attention"
COMET = "comet logging"
PROFILER = "the PyTorch / memory profilers"
MUP = "muP (maximal update parametrisation)"
PREFERENCE = "preference and reward training (DPO, KTO, RM, REINFORCE)"
ONLINE = "online data serving / weight serving"
SHARING = "parameter sharing across layers"
NOISE = "gradient noise scale logging"
DS_MONITOR = ("DeepSpeed's own monitors (logging here is the project's: tensorboard_dir, use_wandb, "
              "log_interval)")
MEGATRON_FP16 = "Megatron's own fp16 loss scaler (loss scaling here is DeepSpeed's, in the fp16 section)"

# key -> (GPT-NeoX's default, feature). Keys are in the normalised spelling (`-` -> `_`).
FEATURE_KEYS: Dict[str, Tuple[object, str]] = {
    "moe_num_experts": (1, MOE), "moe_expert_interval": (1, MOE), "moe_top_k": (1, MOE),
    "moe_router_type": ("sinkhorn", MOE), "moe_lbl_in_fp32": (False, MOE), "moe_jitter_eps": (None, MOE),
    "te_columnparallel": (False, TE), "te_rowparallel": (False, TE), "te_layernorm_mlp": (False, TE),
    "te_mha": (False, TE), "te_fp8_format": ("hybrid", TE), "te_fp8_wgrad": (True, TE),
    "te_fp8_amax_history_len": (1, TE), "te_fp8_amax_compute_algo": ("most_recent", TE), "te_fp8_margin": (0, TE),
    "te_fp8_mha": (False, TE),
    "use_bnb_optimizer": (False, BNB),
    "gmlp_attn_dim": (64, GMLP),
    "mamba_selective_scan_fusion": (False, MAMBA), "mamba_causal_conv_fusion": (False, MAMBA),
    "mamba_inner_func_fusion": (False, MAMBA), "mamba_selective_fp32_params": (True, MAMBA),
    "mamba_use_bias_in_conv": (True, MAMBA), "mamba_use_bias_in_linears": (False, MAMBA),
    "expansion_factor": (None, "Mamba / RWKV block widths"),
    "dim_att": (None, RWKV), "head_size": (None, RWKV), "ffn_dim": (None, RWKV),
    "sparsity_config": (None, SPARSE), "sparse_attention": (None, SPARSE),
    "use_comet": (None, COMET), "comet_workspace": (None, COMET), "comet_project": (None, COMET),
    "comet_experiment_name": (None, COMET), "comet_tags": (None, COMET), "comet_others": (None, COMET),
    "comet_experiment": (None, COMET),
    "profile": (False, PROFILER), "profile_step_start": (10, PROFILER), "profile_step_stop": (12, PROFILER),
    "profile_backward": (False, PROFILER), "memory_profiling": (False, PROFILER),
    "memory_profiling_path": (None, PROFILER),
    "use_mup": (False, MUP), "coord_check": (False, MUP), "save_base_shapes": (False, MUP),
    "base_shapes_file": (None, MUP), "mup_init_scale": (1.0, MUP), "mup_attn_temp": (1.0, MUP),
    "mup_output_temp": (1.0, MUP), "mup_embedding_mult": (1.0, MUP), "mup_rp_embedding_mult": (1.0, MUP),
    "mup_width_scale": (2, MUP),
    "train_impl": ("normal", PREFERENCE), "dataset_impl": ("gpt2", "pairwise and online datasets"),
    "dpo_fp32": (True, PREFERENCE), "dpo_reference_free": (False, PREFERENCE), "dpo_beta": (0.1, PREFERENCE),
    "kto_fp32": (True, PREFERENCE), "kto_desirable_weight": (1.0, PREFERENCE),
    "kto_undesirable_weight": (1.0, PREFERENCE), "kto_beta": (0.1, PREFERENCE),
    "fp32_reinforce": (True, PREFERENCE), "kl_impl": ("mse", PREFERENCE), "kl_div_beta": (0.1, PREFERENCE),
    "reinforce_leave_one_out": (False, PREFERENCE), "allow_chopped": (True, PREFERENCE),
    "precompute_model_name": (None, PREFERENCE),
    **{f"{split}_{kind}_data_paths": (None, PREFERENCE) for split in ("train", "valid", "test")
       for kind in ("label", "reward")},
    **{f"{sign}_{split}{kind}_data_paths": (None, PREFERENCE) for sign in ("pos", "neg")
       for split in ("train", "valid", "test") for kind in ("", "_label")},
    "serve_model_weights": (False, ONLINE), "weight_server_port": (6000, ONLINE),
    "online_dataserver_ips": ("localhost", ONLINE), "online_dataserver_ports": (10000, ONLINE),
    "num_unique_layers": (None, SHARING), "param_sharing_style": ("grouped", SHARING),
    "log_gradient_noise_scale": (False, NOISE), "gradient_noise_scale_n_batches": (5, NOISE),
    "gradient_noise_scale_cpu_offload": (False, NOISE),
    "hysteresis": (2, MEGATRON_FP16), "dynamic_loss_scale": (None, MEGATRON_FP16), "loss_scale": (None, MEGATRON_FP16),
    "loss_scale_window": (1000.0, MEGATRON_FP16), "min_scale": (1.0, MEGATRON_FP16),
    "tensorboard": (None, DS_MONITOR), "wandb": (None, DS_MONITOR), "csv_monitor": (None, DS_MONITOR),
    "scheduler": (None, "DeepSpeed's learning-rate scheduler (the schedule here is the trainer's: lr_decay_style, "
                        "warmup, lr_decay_iters, min_lr)"),
    "curriculum_learning": (None, "DeepSpeed curriculum learning"), "curriculum_seqlen": (0, "curriculum learning"),
    "data_efficiency": (None, "DeepSpeed data efficiency"), "elasticity": (None, "DeepSpeed elasticity"),
    "compression_training": (None, "DeepSpeed compression training"),
    "autotuning": (None, "DeepSpeed autotuning"), "autotuning_run": (None, "DeepSpeed autotuning"),
    "sequence_parallel": (False, "sequence parallelism"),
    "use_qk_layernorm": (False, "QK LayerNorm"),
    "scalenorm_epsilon": (1.0e-8, "ScaleNorm"),
    "rpe_num_buckets": (32, "T5 relative position buckets (pos_emb: rpe)"),
    "rpe_max_distance": (128, "T5 relative position buckets (pos_emb: rpe)"),
    "opt_pos_emb_offset": (0, "OPT's learned position offset"),
    "soft_prompt_tuning": (None, "soft prompt tuning"),
    "rmsnorm_fusion": (False, "apex's fused RMSNorm kernel"),
    "use_flashattn_swiglu": (False, "flash-attn's fused SwiGLU kernel"),
    "rotary_save_freqs_buffer": (False, "saving the rotary frequencies in checkpoints"),
    "fused_kernels_build_path": (None, "GPT-NeoX's fused CUDA kernels (kernels here are Triton, built on use)"),
    "use_cpu_initialization": (False, "initialising weights on the CPU"),
    "lazy_mpu_init": (False, "lazy model-parallel initialisation"),
    "lr_decay_fraction": (None, "lr_decay_fraction (set lr_decay_iters)"),
    "train_epochs": (None, "training by epochs (set train_iters)"),
    "pack_impl": ("packed", "GPT-NeoX's unpacked / pack_until_overflow sample packing"),
    "s3_path": (None, "checkpoint upload to S3"), "s3_chunk_size": (104857600, "checkpoint upload to S3"),
    "checkpoint_scale": ("linear", "log-spaced checkpoint schedules (use extra_save_iters)"),
    "z_loss": (0.0, "the z-loss auxiliary term"),
    "char_level_ppl": (False, "character-level perplexity in evaluation"),
    "return_logits": (False, "returning logits from text generation"),
    "peak_theoretical_tflops": (None, "GPT-NeoX's MFU key (set peak_tflops_per_gpu)"),
    "wandb_run_name": (None, "naming the wandb run (wandb names it here)"),
    "short_seq_prob": (0.1, "Megatron's short-sequence sampling"),
    "adlr_autoresume": (False, "ADLR autoresume"), "adlr_autoresume_interval": (1000, "ADLR autoresume"),
    "onnx_safe": (False, "ONNX export"),
    "deepscale": (False, "the deprecated deepscale flag"), "deepscale_config": (None, "the deprecated deepscale flag"),
    "do_train": (None, "GPT-NeoX's do_train / do_valid / do_test switches"),
    "do_valid": (None, "GPT-NeoX's do_train / do_valid / do_test switches"),
    "do_test": (None, "GPT-NeoX's do_train / do_valid / do_test switches"),
    "zero_reduce_scatter": (None, "GPT-NeoX's copies of zero_optimization entries (set them in zero_optimization)"),
    "zero_contiguous_gradients": (None, "GPT-NeoX's copies of zero_optimization entries (set them in "
                                        "zero_optimization)"),
    "zero_reduce_bucket_size": (None, "GPT-NeoX's copies of zero_optimization entries (set them in "
                                      "zero_optimization)"),
    "zero_allgather_bucket_size": (None, "GPT-NeoX's copies of zero_optimization entries (set them in "
                                         "zero_optimization)"),
}

# GPT-NeoX writes these into the configs it saves; they describe a run and ask for nothing.
METADATA_KEYS = ("git_hash",)

# key -> {value: feature} for keys this project has, whose other GPT-NeoX values it lacks.
FEATURE_VALUES: Dict[str, Dict[str, str]] = {
    "norm": {"scalenorm": "ScaleNorm", "non_parametric_layernorm": "non-parametric LayerNorm",
             "te_rmsnorm": TE, "te_layernorm": TE},
    "pos_emb": {"sinusoidal": "sinusoidal position embeddings", "rpe": "T5 relative position buckets"},
    "activation": {name: f"the {name} activation" for name in ("geglu", "softsign", "mish", "reglu", "bilinear",
                                                               "glu")},
}
ATTENTION_TYPE_FEATURES = {"local": "GPT-NeoX's local attention type (Mistral's window is sliding_window_width)",
                           "sparse_fixed": SPARSE, "sparse_variable": SPARSE, "bigbird": SPARSE,
                           "bslongformer": SPARSE, "gmlp": GMLP, "amlp": GMLP, "rwkv": RWKV, "mamba": MAMBA}
OPTIMIZER_TYPE_FEATURES = {name: f"the {name} optimizer" for name in ("cpu_adam", "cpu_torch_adam", "sm3",
                                                                      "madgrad_wd", "sgd", "lion")}


def is_off(value, default) -> bool:
    """Does ``value`` leave the feature off, as GPT-NeoX's default does? (None is GPT-NeoX's "not set".)"""
    if value is None:
        return True
    if isinstance(value, bool) or isinstance(default, bool) or default is None:
        return value is default or (value is False and default is None)
    return type(value) is type(default) and value == default or (
        isinstance(value, (int, float)) and isinstance(default, (int, float)) and value == default)


def _attention_types(config) -> List[str]:
    """The type names of an attention_config in GPT-NeoX's [[types, repeat], ...] form (or an expanded list)."""
    names = []
    for entry in config if isinstance(config, (list, tuple)) else ():
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], (list, tuple)):
            names.extend(t for t in entry[0] if isinstance(t, str))
    return names


def scan(values: dict, origins: dict, fields=()) -> Tuple[List[str], List[str]]:
    """``(refusals, off_keys)`` for normalised config ``values``: one text per key or value asking for a feature
    this project lacks (with where it was given), and the feature keys at GPT-NeoX's default (dropped). Keys in
    ``fields`` (this project's own) are never feature keys."""
    def where(key):
        source = origins.get(key)
        return (f" ({source.file}:{source.line})" if source.line else f" ({source.file})") if source else ""

    def given(key, value):
        spelling = origins[key].spelling if key in origins else key
        return f"'{spelling}: {_text(value)}'"

    refusals, off = [], []
    for key, value in values.items():
        if key in fields:
            continue
        if key in METADATA_KEYS:
            off.append(key)
        elif key in FEATURE_KEYS:
            default, feature = FEATURE_KEYS[key]
            if is_off(value, default):
                off.append(key)
            else:
                refusals.append(f"{given(key, value)}{where(key)}: {feature}")
    for key, features in FEATURE_VALUES.items():
        value = values.get(key)
        if isinstance(value, str) and value in features:
            refusals.append(f"{given(key, value)}{where(key)}: {features[value]}")
    types = [t for t in dict.fromkeys(_attention_types(values.get("attention_config"))) if t in ATTENTION_TYPE_FEATURES]
    for name in types:
        refusals.append(f"attention_config type '{name}'{where('attention_config')}: {ATTENTION_TYPE_FEATURES[name]}")
    optimizer = values.get("optimizer")
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    if isinstance(kind, str) and kind.lower() in OPTIMIZER_TYPE_FEATURES:
        refusals.append(f"'optimizer.type: {kind}'{where('optimizer')}: {OPTIMIZER_TYPE_FEATURES[kind.lower()]}")
    return refusals, off


def _text(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def refusal_message(refusals: List[str]) -> str:
    return (f"not supported here, {len(refusals)} GPT-NeoX setting(s) for features this project does not have: "
            + "; ".join(refusals) + " (a feature key at GPT-NeoX's default, the feature off, is accepted)")
