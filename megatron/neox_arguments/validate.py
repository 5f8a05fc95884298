"""Validation in one place (`validate_all`): every message names the key and the value.

Runs after derivation, in deepy.py before any rank starts and again on every rank
(`NeoXArgs.consume_neox_args`). Also calls the SepLLM argument checker, which may rewrite SepLLM fields.
"""
import dataclasses
import os

from .compat import refused_value
from .deepspeed_config import PASS_THROUGH
from .errors import ConfigError
from .optimizer_args import LR_DECAY_STYLES
from .tokenizer_args import NEEDS_MERGE_FILE, NEEDS_VOCAB_FILE

TRAINING_SCRIPTS = ("train.py",)
# The optimizer params megatron.training.build_optimizer passes to its torch AdamW.
TRAINER_OPTIMIZER_PARAMS = ("lr", "betas", "eps")


def _is_training(args):
    return args.user_script is not None and os.path.basename(args.user_script) in TRAINING_SCRIPTS


def _positive(args, *keys, allow_none=False):
    for key in keys:
        value = getattr(args, key)
        if value is None and allow_none:
            continue
        if value is None:
            raise ConfigError(f"key '{key}' is required")
        if value < 1:
            raise ConfigError(f"key '{key}' must be >= 1, got {value}")


def validate_model(args):
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"num_attention_heads={args.num_attention_heads} does not divide "
                          f"hidden_size={args.hidden_size}")
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(f"seq_length={args.seq_length} exceeds max_position_embeddings="
                          f"{args.max_position_embeddings}")
    if not 0.0 < args.rotary_pct <= 1.0:
        raise ConfigError(f"key 'rotary_pct' must be in (0, 1], got {args.rotary_pct}")
    if args.pos_emb == "rotary":
        rot_dims = int(args.hidden_size // args.num_attention_heads * args.rotary_pct)
        if rot_dims < 2 or rot_dims % 2:
            raise ConfigError(f"rotary_pct={args.rotary_pct} of head size {args.hidden_size // args.num_attention_heads}"
                              f" gives {rot_dims} rotary dims; need an even number >= 2")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, key) < 1.0:
            raise ConfigError(f"key '{key}' must be in [0, 1), got {getattr(args, key)}")
    _positive(args, "checkpoint_num_layers", "intermediate_size")
    validate_llama_keys(args)
    if args.padded_vocab_size is not None and args.padded_vocab_size < 1:
        raise ConfigError(f"key 'padded_vocab_size' must be >= 1, got {args.padded_vocab_size}")


def validate_llama_keys(args):
    """Grouped-query attention and Mistral's sliding window (GPT-NeoX's num_kv_heads, sliding_window_width)."""
    kv = args.num_kv_heads
    if kv < 1 or args.num_attention_heads % kv:
        raise ConfigError(f"key 'num_kv_heads' is {kv}; it must be >= 1 and divide num_attention_heads="
                          f"{args.num_attention_heads}")
    width = args.sliding_window_width
    if width is None:
        return
    if width < 1:
        raise ConfigError(f"key 'sliding_window_width' must be >= 1, got {width}")
    if args.attention_variant != "full":
        raise ConfigError(f"key 'sliding_window_width' ({width}) is a window of full attention, but this config "
                          f"trains {args.attention_variant} (SepLLM keys set), whose local window is "
                          f"prefill_local_window_size; give one of the two")


def validate_parallelism(args):
    if args.pipe_parallel_size < 0:
        raise ConfigError(f"key 'pipe_parallel_size' must be >= 0, got {args.pipe_parallel_size}")
    if args.model_parallel_size < 1:
        raise ConfigError(f"key 'model_parallel_size' must be >= 1, got {args.model_parallel_size}")
    validate_tensor_parallel(args)
    if args.pipe_parallel_size > args.num_layers:
        raise ConfigError(f"pipe_parallel_size={args.pipe_parallel_size} exceeds num_layers={args.num_layers}")
    if args.is_pipe_parallel and args.zero_stage >= 2:
        raise ConfigError(f"zero_optimization.stage={args.zero_stage} cannot be used with pipe_parallel_size="
                          f"{args.pipe_parallel_size} (DeepSpeed's pipeline engine supports ZeRO stage 0 and 1); "
                          f"set pipe_parallel_size: 0 for ZeRO 2/3")


def validate_tensor_parallel(args):
    """Every size split over the tensor-parallel ranks must split evenly (whole heads per rank), and the ZeRO
    stage must be one DeepSpeed combines with Megatron-style tensor parallelism here."""
    tp = args.model_parallel_size
    if tp == 1:
        return
    for key in ("num_attention_heads", "num_kv_heads", "hidden_size", "mlp_inner_size", "padded_vocab_size"):
        value = getattr(args, key)
        if value is not None and value % tp:
            raise ConfigError(f"key '{key}' is {value}, which is not divisible by model_parallel_size={tp} (each "
                              f"tensor-parallel rank holds an equal share)")
    if args.zero_stage >= 3:
        raise ConfigError(f"zero_optimization.stage={args.zero_stage} cannot be combined with model_parallel_size="
                          f"{tp}: ZeRO-3 gathers and re-partitions every parameter itself, which DeepSpeed does not "
                          f"do for the shards of Megatron-style tensor-parallel layers; use stage 0, 1 or 2")


def validate_schedule(args):
    training = _is_training(args)
    if training:
        _positive(args, "train_iters")
        if args.lr is None:
            raise ConfigError("no learning rate: set optimizer.params.lr (or 'lr')")
    _positive(args, "train_iters", "lr_decay_iters", allow_none=True)
    if args.lr is not None and args.lr < 0:
        raise ConfigError(f"learning rate must be >= 0, got lr={args.lr}")
    if args.lr is not None and args.min_lr > args.lr:
        raise ConfigError(f"min_lr={args.min_lr} exceeds lr={args.lr}")
    if args.warmup_iters is not None and args.warmup_iters < 0:
        raise ConfigError(f"key 'warmup_iters' must be >= 0, got {args.warmup_iters}")
    if args.warmup_iters is not None and args.lr_decay_iters is not None and args.warmup_iters > args.lr_decay_iters:
        raise ConfigError(f"the warmup ({args.warmup_iters:g} iterations, from 'warmup'/'warmup_iters') is longer "
                          f"than lr_decay_iters ({args.lr_decay_iters})")
    if args.override_lr_scheduler and args.use_checkpoint_lr_scheduler:
        raise ConfigError("keys 'override_lr_scheduler' and 'use_checkpoint_lr_scheduler' are both true; the schedule "
                          "of a resumed run comes from the config or from the checkpoint, not both")
    if args.lr_decay_style not in LR_DECAY_STYLES:
        raise ConfigError(f"key 'lr_decay_style' is {args.lr_decay_style!r}; expected one of {list(LR_DECAY_STYLES)}")
    _positive(args, "eval_interval", "log_interval", "steps_per_print")
    _positive(args, "checkpoint_factor", "exit_interval", "keep_last_n_checkpoints", allow_none=True)
    if args.eval_iters < 0:
        raise ConfigError(f"key 'eval_iters' must be >= 0, got {args.eval_iters}")
    if args.extra_save_iters is not None and not all(isinstance(i, int) and i >= 0 for i in args.extra_save_iters):
        raise ConfigError(f"key 'extra_save_iters' must be a list of iterations >= 0, got {args.extra_save_iters}")
    if args.max_consecutive_bad_steps < 1:
        raise ConfigError(f"key 'max_consecutive_bad_steps' must be >= 1, got {args.max_consecutive_bad_steps}")
    if args.gradient_clipping < 0:
        raise ConfigError(f"key 'gradient_clipping' must be >= 0, got {args.gradient_clipping}")
    if args.peak_tflops_per_gpu <= 0:
        raise ConfigError(f"key 'peak_tflops_per_gpu' must be > 0, got {args.peak_tflops_per_gpu}")
    # numpy's RandomState (the data index shuffle) takes seeds in [0, 2**32).
    if isinstance(args.seed, bool) or not 0 <= args.seed < 2**32:
        raise ConfigError(f"key 'seed' must be in [0, 2**32), got {args.seed}")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_optimizer(args):
    """The optimizer's params as the trainer's AdamW and DeepSpeed's optimizers take them, before a rank
    builds one (torch and DeepSpeed reject them only there, after the model is built)."""
    params = (args.optimizer or {}).get("params") or {}
    if "betas" in params:
        betas = params["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) for b in betas)
                and all(0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"key 'optimizer.params.betas' must be two numbers in [0, 1) like [0.9, 0.95], "
                              f"got {betas!r}")
    if "eps" in params and not (_number(params["eps"]) and params["eps"] > 0):
        raise ConfigError(f"key 'optimizer.params.eps' must be a number > 0, got {params['eps']!r}")
    if not args.deepspeed_builds_optimizer:
        unused = sorted(k for k in params if k not in TRAINER_OPTIMIZER_PARAMS)
        if unused:
            raise ConfigError(f"key 'optimizer.params.{unused[0]}' is not used by the trainer's {args.optimizer_type}"
                              f" (it takes {', '.join(TRAINER_OPTIMIZER_PARAMS)}; weight decay is the key "
                              f"'weight_decay'); remove it, or set use_deepspeed_optimizer: true for DeepSpeed's")
    if args.weight_decay < 0:
        raise ConfigError(f"key 'weight_decay' must be >= 0, got {args.weight_decay}")


def _check_dataset_prefix(key, prefix):
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        stem, ext = os.path.splitext(prefix)
        hint = (f" (a dataset is named by its prefix: {stem!r})"
                if ext in (".bin", ".idx") and os.path.isfile(stem + ".bin") and os.path.isfile(stem + ".idx") else "")
        raise ConfigError(f"key '{key}': dataset {prefix!r} is missing {', '.join(missing)}{hint}")


def _parse_split(split):
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"key 'split' is {split!r}; expected up to three non-negative numbers like '969, 30, 1'")
    return parts


def validate_data(args):
    if args.data_path is not None and args.train_data_paths is not None:
        raise ConfigError("keys 'data_path' and 'train_data_paths' are both given; use data_path (split by "
                          "'split') or train/valid/test_data_paths, not both")
    if _is_training(args) and args.data_path is None and not args.train_data_paths:
        raise ConfigError("no training data: set 'data_path' or 'train_data_paths'")
    if args.data_path is not None:
        _check_dataset_prefix("data_path", args.data_path)
        _parse_split(args.split)
        given = [k for k in ("valid_data_paths", "test_data_paths", "weight_by_num_documents") if getattr(args, k)]
        if given:
            raise ConfigError(f"key '{given[0]}' applies to train/valid/test_data_paths, but 'data_path' is given "
                              f"(split by 'split'); use one way of naming the data")
    if args.data_impl == "cached":
        raise ConfigError("key 'data_impl' is 'cached', which this project does not implement; use 'mmap' "
                          "(or 'infer', which reads mmap datasets)")
    for split in ("train", "valid", "test"):
        paths = getattr(args, f"{split}_data_paths")
        weights = getattr(args, f"{split}_data_weights")
        if paths is None:
            if weights is not None:
                raise ConfigError(f"key '{split}_data_weights' is given without '{split}_data_paths'")
            continue
        for prefix in paths:
            if not isinstance(prefix, str):
                raise ConfigError(f"key '{split}_data_paths' entry {prefix!r} is not a path")
            _check_dataset_prefix(f"{split}_data_paths", prefix)
        if weights is not None:
            if len(weights) != len(paths):
                raise ConfigError(f"key '{split}_data_weights' has {len(weights)} entries but '{split}_data_paths' "
                                  f"has {len(paths)}")
            if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights) \
                    or sum(weights) <= 0:
                raise ConfigError(f"key '{split}_data_weights' must be non-negative numbers with a positive sum, "
                                  f"got {weights}")
    if args.num_workers < 0:
        raise ConfigError(f"key 'num_workers' must be >= 0, got {args.num_workers}")


def validate_tokenizer(args):
    needs_files = _is_training(args) or args.data_path is not None or bool(args.train_data_paths)
    for key, types in (("vocab_file", NEEDS_VOCAB_FILE), ("merge_file", NEEDS_MERGE_FILE)):
        path = getattr(args, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"key '{key}': tokenizer file not found: {path}")
        if path is None and needs_files and args.tokenizer_type in types:
            raise ConfigError(f"tokenizer_type {args.tokenizer_type} needs key '{key}'")
    if args.make_vocab_size_divisible_by < 1:
        raise ConfigError(f"key 'make_vocab_size_divisible_by' must be >= 1, got {args.make_vocab_size_divisible_by}")


def validate_checkpoints(args):
    if args.load is None:
        return
    if not os.path.isdir(args.load):
        raise ConfigError(f"key 'load': checkpoint directory not found: {args.load} (remove 'load' to start fresh)")
    from megatron.checkpointing import resolve_checkpoint  # the loader's own rule, so both agree

    try:
        resolve_checkpoint(args.load)
    except FileNotFoundError as exc:
        raise ConfigError(f"key 'load': {exc}; remove 'load' to start fresh") from None


def validate_precision(args, env, on_rank):
    # On the launcher only a local run tells us about the devices the ranks will see.
    local = on_rank or args.hostfile is None
    if args.precision == "fp16" and local and not env.has_cuda:
        raise ConfigError("precision fp16 (key 'fp16' / 'precision') needs a CUDA GPU; on CPU use bf16 or fp32")
    if args.precision == "fp16":
        section = args.fp16 or {}
        if section.get("loss_scale", 0) < 0:
            raise ConfigError(f"key 'fp16.loss_scale' must be >= 0 (0 = dynamic), got {section['loss_scale']}")


def validate_deepspeed(args):
    if args.sparse_gradients:
        raise ConfigError("key 'sparse_gradients' is true, but DeepSpeed >= 0.19 removed sparse embedding-gradient "
                          "compression; remove the key")
    for key in ("optimizer", "amp", "flops_profiler", "activation_checkpointing", "comms_logger", "checkpoint",
                "data_types", "deepspeed_extra_args"):
        value = getattr(args, key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"key '{key}' must be a mapping, got {value!r}")
    extra = args.deepspeed_extra_args or {}
    if "scheduler" in extra:
        raise ConfigError("key 'deepspeed_extra_args.scheduler': the learning-rate schedule is the trainer's "
                          "(lr_decay_style, warmup, lr_decay_iters, min_lr), not DeepSpeed's")
    # A DeepSpeed key this config derives (batch sizes, ZeRO, precision, optimizer, ...) would override the
    # derived value on the ranks only, behind every check made here.
    own = {f.name for f in dataclasses.fields(args)}
    for key in extra:
        # A section passed through unchanged reaches DeepSpeed the same from either place (GPT-NeoX's 19M.yml puts
        # comms_logger here); given in both places, one would silently win.
        if key in PASS_THROUGH and getattr(args, key) is None:
            if not isinstance(extra[key], dict) and key != "communication_data_type":
                raise ConfigError(f"key 'deepspeed_extra_args.{key}' must be a mapping, got {extra[key]!r}")
            continue
        if key in own:
            raise ConfigError(f"key 'deepspeed_extra_args.{key}' is a key of this config: set '{key}' itself "
                              f"(deepspeed_extra_args is for DeepSpeed keys the config does not have)")


def validate_launcher(args, env, on_rank, host_resolver=None):
    for key in ("comment", "account"):
        if getattr(args, key) is not None and args.launcher != "slurm":
            raise ConfigError(f"key '{key}' is an srun option; it needs launcher: slurm (launcher is "
                              f"{args.launcher!r})")
    if on_rank or not args.hostfile or not args.check_hostfile_hosts:
        return
    from .hostfile import check_hosts_known, host_is_known, ssh_config_file

    ssh_config = ssh_config_file(env.environ)
    check_hosts_known(list(args._resources), args.hostfile, ssh_config=ssh_config,
                      resolver=host_resolver or (lambda host: host_is_known(host, ssh_config=ssh_config)))


def run_sepllm_checker(args):
    """Call the SepLLM argument checker (owned by the SepLLM attention module)."""
    from megatron.model.sepllm.checker import check_sepllm_args

    try:
        return check_sepllm_args(args) or []
    except ConfigError:
        raise
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"SepLLM argument check failed: {err}") from err


def validate_logging(args):
    """Per-parameter statistics (megatron/param_stats.py) are whole tensors only where the module's own
    parameters hold them; elsewhere they would be silently partial, so the keys are refused."""
    per_parameter = {"log_grad_norm": args.log_grad_norm, "log_grad_pct_zeros": args.log_grad_pct_zeros,
                     "log_optimizer_states": args.log_optimizer_states}
    for key, wanted in per_parameter.items():
        if wanted and (args.zero_stage != 0 or args.precision != "fp32"):
            raise ConfigError(f"key '{key}' (per-parameter values) needs unpartitioned fp32 gradients and optimizer "
                              f"states: ZeRO stage 0 and precision fp32, got stage {args.zero_stage} and "
                              f"{args.precision}; the global gradient norm is logged as grad_norm in every setting")
    if args.log_param_norm and args.zero_stage == 3:
        raise ConfigError("key 'log_param_norm' is not supported with ZeRO stage 3 (each rank holds a shard of every "
                          "parameter)")


def validate_compat(args):
    """Values of GPT-NeoX keys that ask for behaviour the project does not implement (compat.py)."""
    refused = refused_value(args)
    if refused is not None:
        key, value, reason = refused
        raise ConfigError(f"key '{key}' is {value!r}, which is not supported: {reason}")


def validate_all(args, env, on_rank=False, host_resolver=None):
    """Every check, in order; raises ConfigError on the first problem. Returns the SepLLM checker's change lines."""
    validate_model(args)
    validate_parallelism(args)
    validate_schedule(args)
    validate_optimizer(args)
    validate_data(args)
    validate_tokenizer(args)
    validate_checkpoints(args)
    validate_logging(args)
    validate_compat(args)
    validate_precision(args, env, on_rank)
    validate_deepspeed(args)
    validate_launcher(args, env, on_rank, host_resolver)
    return run_sepllm_checker(args)
