"""Derived values, computed in one place (`derive_all`), in dependency order.

Each step reads user keys and fills the derived/internal fields: optimizer type and lr, precision,
ZeRO stage, model defaults, attention layout, world size, data-parallel size, batch sizes, schedule
lengths, padded vocabulary, distributed backend. A step raises ConfigError when the inputs admit no
consistent value (e.g. batch sizes that do not multiply out).
"""
import collections
import dataclasses
import os

from .deepspeed_args import BF16_KEYS, FP16_KEYS, FP16_TYPES, PRECISION_ALIASES, PRECISIONS
from .errors import ConfigError
from .hostfile import parse_hostfile, select_resources
from .kernel_knobs import BACKWARD_MODES, ENV_KEYS, env_overrides, parse_blocks
from .loading import suggest_key
from .model_args import ATTENTION_TYPES, GATED_ACTIVATIONS
from .optimizer_args import OPTIMIZER_TYPES


def derive_optimizer(args, given):
    opt = args.optimizer
    if opt is None:
        return
    unknown = [k for k in opt if k not in ("type", "params")]
    if unknown:
        raise ConfigError(f"key 'optimizer' has unknown entries {unknown}; expected {{type, params}}")
    if "type" in opt:
        kind = str(opt["type"]).lower()
        if kind not in OPTIMIZER_TYPES:
            raise ConfigError(f"key 'optimizer.type' is {opt['type']!r}; expected one of {list(OPTIMIZER_TYPES)} "
                              f"(case-insensitive)")
        args.optimizer_type = kind
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"key 'optimizer.params' must be a mapping, got {params!r}")
    if "lr" in params:
        try:
            lr = float(params["lr"])
        except (TypeError, ValueError):
            raise ConfigError(f"key 'optimizer.params.lr' is {params['lr']!r}; expected a number") from None
        if "lr" in given and args.lr is not None and args.lr != lr:
            raise ConfigError(f"key 'lr' ({args.lr}) disagrees with 'optimizer.params.lr' ({lr}); give one of them")
        args.lr = lr


def _section_enabled(name, section):
    """Is a fp16/bf16 section on? GPT-NeoX's rule (megatron/neox_arguments/arguments.py at ea7aefd8, "derive
    precision"): a section is on when its ``enabled`` is true, as in DeepSpeed, whose ``enabled`` defaults to
    false. GPT-NeoX's extra ``fp16: true`` entry and ``fp16.type`` do not decide it (``type`` did until
    GPT-NeoX 056e9caf: ``"type": "bfloat16"`` meant bf16; compat.fp16_type_notes says so at launch)."""
    if section is None:
        return False
    if isinstance(section, bool):
        return section
    allowed = (FP16_KEYS + ("type",) if name == "fp16" else BF16_KEYS) + (name,)
    for key in section:
        if key not in allowed:
            raise ConfigError(f"key '{name}.{key}' is unknown{suggest_key(key, allowed)}; "
                              f"accepted: {list(allowed)}")
    if name == "fp16" and "type" in section and section["type"] not in FP16_TYPES:
        raise ConfigError(f"key 'fp16.type' is {section['type']!r}; GPT-NeoX writes one of {list(FP16_TYPES)} "
                          f"there (it does not decide the precision: fp16.enabled does)")
    return bool(section.get("enabled", False))


def derive_precision(args, given):
    fp16_on = _section_enabled("fp16", args.fp16)
    bf16_on = _section_enabled("bf16", args.bf16)
    if fp16_on and bf16_on:
        raise ConfigError("keys 'fp16' and 'bf16' are both enabled; enable at most one")
    from_sections = "fp16" if fp16_on else "bfloat16" if bf16_on else None
    if args.precision is not None:
        requested = PRECISION_ALIASES.get(str(args.precision), str(args.precision))
        if requested not in PRECISIONS:
            raise ConfigError(f"key 'precision' is {args.precision!r}; expected one of {list(PRECISIONS)} (or bf16)")
        if from_sections is not None and from_sections != requested:
            raise ConfigError(f"key 'precision' is {args.precision!r} but the "
                              f"'{'fp16' if fp16_on else 'bf16'}' section is enabled")
        args.precision = requested
    else:
        args.precision = from_sections or "fp32"
    # A precision chosen by name alone still needs its DeepSpeed section.
    if args.precision == "fp16" and not fp16_on:
        args.fp16 = dict(args.fp16 or {}, enabled=True)
    if args.precision == "bfloat16" and not bf16_on:
        args.bf16 = {"enabled": True} if not isinstance(args.bf16, dict) else dict(args.bf16, enabled=True)


def derive_zero(args, given):
    zero = args.zero_optimization
    if zero is None:
        args.zero_stage = 0 if args.zero_stage is None else args.zero_stage
        return
    if not isinstance(zero, dict):
        raise ConfigError(f"key 'zero_optimization' must be a mapping, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"key 'zero_optimization.stage' is {stage!r}; expected 0, 1, 2 or 3")
    args.zero_stage = stage


def expand_attention_config(config, num_layers):
    """[[["global"], 12]] -> ["global"] * 12, checking types and the total against num_layers."""
    if config is None:
        return ["global"] * num_layers
    layers = []
    for entry in config:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (list, tuple))
                and isinstance(entry[1], int)):
            raise ConfigError(f"key 'attention_config' entry {entry!r} must look like [[\"global\"], N]")
        types, repeat = entry
        for t in types:
            if t not in ATTENTION_TYPES:
                raise ConfigError(f"key 'attention_config' has attention type {t!r}; this project supports "
                                  f"{list(ATTENTION_TYPES)} (SepLLM modes are chosen by the SepLLM keys)")
        layers.extend(list(types) * repeat)
    if len(layers) != num_layers:
        raise ConfigError(f"key 'attention_config' describes {len(layers)} layers but num_layers is {num_layers}")
    return layers


def sepllm_keys() -> frozenset:
    """The keys of the SepLLM fork (SepLLM and Self-Adjusting softmax): a config that sets one of them is a
    SepLLM config and follows the reference's rules and defaults."""
    from .sepllm_args import AdjustSoftmaxArgs, SepLLMArgs

    return frozenset(f.name for cls in (SepLLMArgs, AdjustSoftmaxArgs) for f in dataclasses.fields(cls))


def derive_attention_mode(args, given):
    """A config that sets no SepLLM key is a GPT-NeoX config: its ``attention_config`` (global / flash) means
    full causal attention. The fork's default ``USE_SEP_ATTN_KERNEL_ACCELERATOR: true`` would otherwise turn
    every GPT-NeoX config, Pythia's included, into SepLLM training without a word."""
    if given & sepllm_keys():
        return
    args.USE_ORIGINAL_FULL_ATTEN = True
    args.USE_SEP_ATTN_KERNEL_ACCELERATOR = False


def describe_attention(args) -> str:
    """One line for the launch log: the attention every layer runs, and where that comes from."""
    variant = args.attention_variant
    if variant == "full":
        why = "" if set(args.user_keys or ()) & sepllm_keys() else " (no SepLLM key set: a GPT-NeoX config)"
        return f"attention: full causal attention on all {args.num_layers} layers{why}"
    if args.USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS and args.prefill_loc_win_size_list:
        windows = args.prefill_loc_win_size_list
        groups = collections.OrderedDict()
        for layer, window in enumerate(windows):
            groups.setdefault(window, []).append(str(layer))
        window_text = "windows " + "; ".join(f"{w} on layers {','.join(ls)}" for w, ls in groups.items())
    else:
        window_text = f"window {args.prefill_local_window_size} on all {args.num_layers} layers"
    initial = args.init_tok_max_idx + 1
    return f"attention: {variant}, {initial} initial token(s), {window_text}"


def mlp_widths(intermediate_size: int, gated: bool, multiple_of: int):
    """``(input projection width, activation width)`` of GPT-NeoX's ParallelMLP (megatron/model/transformer.py
    at ea7aefd8): a gated MLP scales ``f`` by 2/3 (equal parameters) and gates half of it; the projection is
    rounded up to a multiple of ``2 * multiple_of``, the activation to a multiple of ``multiple_of``."""
    ffn, ffn_in = intermediate_size, intermediate_size
    if gated:
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    twice = 2 * multiple_of
    return twice * ((ffn + twice - 1) // twice), multiple_of * ((ffn_in + multiple_of - 1) // multiple_of)


def derive_mlp(args, given):
    """``mlp_inner_size`` by GPT-NeoX's rule; sizes it would build inconsistently (its forward then fails on a
    shape mismatch) are refused here, naming the keys."""
    if args.intermediate_size is None:
        return
    if args.mlp_multiple_of < 1:
        raise ConfigError(f"key 'mlp_multiple_of' must be >= 1, got {args.mlp_multiple_of}")
    gated = args.activation in GATED_ACTIVATIONS
    projection, inner = mlp_widths(args.intermediate_size, gated, args.mlp_multiple_of)
    if projection != (2 * inner if gated else inner):
        raise ConfigError(
            f"intermediate_size={args.intermediate_size} with activation {args.activation} and mlp_multiple_of="
            f"{args.mlp_multiple_of} gives GPT-NeoX's MLP an input projection of {projection} and an activation of "
            f"{inner} ({'half the projection expected' if gated else 'the same width expected'}); GPT-NeoX's "
            f"forward fails on these sizes. Give an intermediate_size or mlp_multiple_of that agree")
    _set_derived(args, given, "mlp_inner_size", inner)


def derive_model(args, given):
    if args.max_position_embeddings is None and args.seq_length is not None:
        args.max_position_embeddings = args.seq_length
    if args.intermediate_size is None and args.hidden_size is not None:
        args.intermediate_size = 4 * args.hidden_size
    derive_mlp(args, given)
    if args.num_kv_heads is None:
        args.num_kv_heads = args.num_attention_heads
    if args.num_layers is not None:
        config = args.attention_config
        # Already-expanded lists (a resolved config read back on a rank) are kept as they are.
        if not (isinstance(config, list) and config and all(isinstance(t, str) for t in config)):
            args.attention_config = expand_attention_config(config, args.num_layers)
        elif len(config) != args.num_layers:
            raise ConfigError(f"key 'attention_config' has {len(config)} entries but num_layers is {args.num_layers}")
    args.is_pipe_parallel = args.pipe_parallel_size >= 1
    _set_derived(args, given, "pipe_stages", max(args.pipe_parallel_size, 1))
    _set_derived(args, given, "attention_variant", attention_variant(args))


def attention_variant(args) -> str:
    """The core attention: the rule the mode flags select (``rule.attention_mode``), with the SepLLM mask run by
    the Sep-Attention kernel (``sep_kernel``) when ``USE_SEP_ATTN_KERNEL_ACCELERATOR`` is set; the checker turns
    the kernel flag off beside the other modes."""
    from megatron.model.sepllm.rule import attention_mode  # torch is imported by validation anyway

    mode = attention_mode(args)
    if mode == "sepllm_mask" and args.USE_SEP_ATTN_KERNEL_ACCELERATOR:
        return "sep_kernel"
    return mode


def _set_derived(args, given, key, value):
    """Set a value only derivation decides; one the user gave must agree with it."""
    current = getattr(args, key)
    if key in given and current is not None and current != value:
        raise ConfigError(f"key '{key}' is given as {current!r} but is derived as {value!r} from the other keys; "
                          f"leave it out")
    setattr(args, key, value)


def launch_resources(args, env):
    """Host -> slot list the launcher will use (hostfile, local GPUs, or local CPU processes)."""
    if args.hostfile:
        pool = parse_hostfile(args.hostfile)
        return select_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus,
                                source=f"hostfile {args.hostfile}")
    if args.num_nodes not in (None, -1, 1):
        raise ConfigError(f"key 'num_nodes' is {args.num_nodes} but no 'hostfile' is given (one node only)")
    if env.has_cuda:
        if args.num_gpus is not None and args.num_gpus > env.cuda_device_count:
            raise ConfigError(f"key 'num_gpus' is {args.num_gpus} but only {env.cuda_device_count} GPU(s) are visible")
        pool = collections.OrderedDict(localhost=env.cuda_device_count)
        return select_resources(pool, args.include, args.exclude, -1, args.num_gpus, source="local GPUs")
    # No GPU: DeepSpeed starts `num_gpus` CPU processes (gloo).
    pool = collections.OrderedDict(localhost=args.num_gpus or 1)
    return select_resources(pool, args.include, args.exclude, -1, None, source="local CPU processes")


def derive_launcher(args, given):
    """GPT-NeoX's pairing: the Slurm / MPI launchers start ranks whose numbers come from their own variables,
    and those modes go through the multi-node runner even for one host (GPT-NeoX's get_deepspeed_main_args);
    without a hostfile DeepSpeed would take that to mean pdsh to localhost, so then they run locally."""
    if args.launcher == "slurm":
        args.deepspeed_slurm = True
    if args.launcher in ("openmpi", "mvapich"):
        args.deepspeed_mpi = True
    if (args.deepspeed_slurm or args.deepspeed_mpi) and args.hostfile:
        args.force_multi = True


def _with_launcher_rank_env(args, env):
    """A rank that srun / mpirun started reads its numbers from their variables (megatron/rank_env.py)."""
    from megatron.rank_env import RankEnvError, launcher_rank_env

    try:
        extra = launcher_rank_env(args, env.environ)
    except RankEnvError as err:
        raise ConfigError(str(err)) from None
    return dataclasses.replace(env, environ={**env.environ, **extra}) if extra else env


def derive_world(args, given, env, on_rank):
    if on_rank:
        env = _with_launcher_rank_env(args, env)
    world = env.int_env("WORLD_SIZE")
    if on_rank or world is not None:
        args.world_size = world if world is not None else (args.global_num_gpus or 1)
        args.rank = env.int_env("RANK") if env.int_env("RANK") is not None else (args.rank or 0)
        args.local_rank = env.int_env("LOCAL_RANK") if env.int_env("LOCAL_RANK") is not None else (args.local_rank or 0)
        args.global_num_gpus = args.world_size
        args._resources = {}  # a rank starts no hosts (nor does a launcher inside a launched job)
    else:
        resources = launch_resources(args, env)
        args._resources = resources
        args.global_num_gpus = sum(len(slots) for slots in resources.values())
    if args.model_parallel_size < 1:
        raise ConfigError(f"key 'model_parallel_size' must be >= 1, got {args.model_parallel_size}")
    model_ranks = args.pipe_stages * args.model_parallel_size
    if args.global_num_gpus % model_ranks:
        raise ConfigError(f"world size {args.global_num_gpus} (global_num_gpus) is not divisible by "
                          f"pipe_parallel_size x model_parallel_size = {args.pipe_stages} x "
                          f"{args.model_parallel_size}")
    args.data_parallel_size = args.global_num_gpus // model_ranks


def derive_batch(args, given):
    """Any two of (global, micro, accumulation) give the third; all three must multiply out."""
    dp = args.data_parallel_size
    glob, micro, accum = args.train_batch_size, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps
    for key, value in (("train_batch_size", glob), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", accum)):
        if value is not None and value < 1:
            raise ConfigError(f"key '{key}' must be >= 1, got {value}")
    if glob is not None and micro is not None and accum is not None:
        if glob != micro * accum * dp:
            raise ConfigError(f"inconsistent batch sizes: train_batch_size={glob} but train_micro_batch_size_per_gpu"
                              f"={micro} x gradient_accumulation_steps={accum} x data_parallel_size={dp} = "
                              f"{micro * accum * dp}")
    elif glob is not None and micro is not None:
        if glob % (micro * dp):
            raise ConfigError(f"train_batch_size={glob} is not divisible by train_micro_batch_size_per_gpu={micro} "
                              f"x data_parallel_size={dp}")
        accum = glob // (micro * dp)
    elif glob is not None and accum is not None:
        if glob % (accum * dp):
            raise ConfigError(f"train_batch_size={glob} is not divisible by gradient_accumulation_steps={accum} "
                              f"x data_parallel_size={dp}")
        micro = glob // (accum * dp)
    elif glob is not None:
        accum = 1
        if glob % dp:
            raise ConfigError(f"train_batch_size={glob} is not divisible by data_parallel_size={dp}")
        micro = glob // dp
    else:
        micro = micro if micro is not None else 1
        accum = accum if accum is not None else 1
        glob = micro * accum * dp
    args.train_batch_size, args.train_micro_batch_size_per_gpu, args.gradient_accumulation_steps = glob, micro, accum


def derive_schedule(args, given):
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if "warmup_iters" in given and args.warmup_iters is not None:
        if "warmup" in given:
            raise ConfigError(f"keys 'warmup' ({args.warmup}) and 'warmup_iters' ({args.warmup_iters}) are both "
                              f"given; give one of them")
    elif args.lr_decay_iters is not None:
        args.warmup_iters = warmup_iterations(args.warmup, args.lr_decay_iters)


def warmup_iterations(warmup: float, lr_decay_iters: int) -> float:
    """The warmup length in iterations. A fraction stays unrounded: GPT-NeoX's AnnealingLR is given
    ``warmup * lr_decay_iters`` as a float, and rounding would change its schedule whenever that product
    is not whole. A whole number above 1 is a number of iterations (a project extension; 1.0 stays
    GPT-NeoX's "all of lr_decay_iters")."""
    if warmup < 0:
        raise ConfigError(f"key 'warmup' must be >= 0 (a fraction of lr_decay_iters, or iterations), got {warmup!r}")
    if warmup <= 1:
        return float(warmup) * lr_decay_iters
    if float(warmup) != int(warmup):
        raise ConfigError(f"key 'warmup' is {warmup!r}: values above 1 are iteration counts and must be whole "
                          "numbers")
    return float(int(warmup))


def _tokenizer_files_exist(args):
    from .tokenizer_args import NEEDS_MERGE_FILE, NEEDS_VOCAB_FILE

    if args.tokenizer_type in NEEDS_VOCAB_FILE and not (args.vocab_file and os.path.isfile(args.vocab_file)):
        return False
    if args.tokenizer_type in NEEDS_MERGE_FILE and not (args.merge_file and os.path.isfile(args.merge_file)):
        return False
    return True


def derive_vocab(args, given):
    """padded_vocab_size from megatron.tokenizer.build_tokenizer (lazy) when the tokenizer can be built."""
    if not _tokenizer_files_exist(args):
        return
    try:
        from megatron.tokenizer import build_tokenizer
        from megatron.tokenizer.tokenizer import TokenizerError
    except ImportError as err:
        # Only the tokenizer package itself being absent (or not yet providing build_tokenizer) is tolerated.
        if err.name not in ("megatron.tokenizer", "megatron.tokenizer.tokenizer"):
            raise
        return
    try:
        build_tokenizer(args)
    except (TokenizerError, OSError) as err:
        raise ConfigError(f"key 'vocab_file' (tokenizer_type {args.tokenizer_type}): {err}") from None


def derive_load(args, on_rank):
    """GPT-NeoX's local_setup.yml sets ``load`` and ``save`` to one directory, so the first run finds nothing to
    load: training then starts from iteration 0 (``load`` cleared, the directory recorded for the notice). Only
    for ``load == save``: another empty directory stays validate_checkpoints' error. Settled once, on the
    launcher: a rank reads the outcome from the resolved config."""
    from .validate import _is_training

    if on_rank or args.load is None or args.save is None or not _is_training(args):
        return
    if os.path.realpath(args.load) != os.path.realpath(args.save):
        return
    from megatron.checkpointing import holds_no_checkpoint  # the loader's notion of a save directory

    if holds_no_checkpoint(args.load):
        args.load_was_empty, args.load = args.load, None


def derive_backend(args, env):
    if args.distributed_backend == "nccl" and not env.has_cuda:
        args.distributed_backend = "gloo"


def derive_kernel_settings(args, env, on_rank):
    """$SEP_ATTN_BLOCKS / $SEP_ATTN_GATHER / $SEP_ATTN_FAST_LAUNCH / $SEP_ATTN_BACKWARD override the kernel keys (experiments). They
    are read once, where the configuration is resolved (the launcher): a rank takes the values its resolved
    config records, with the variables that set them. The tile table is checked here."""
    overrides = {} if on_rank else env_overrides(env.environ)
    for key, value in overrides.items():
        setattr(args, key, value)
    if not on_rank:
        args.sep_attn_kernel_env = sorted(var for var, key in ENV_KEYS.items() if key in overrides) or None
    if args.sep_attn_kernel_gather not in ("auto", "on", "off"):
        raise ConfigError(f"key 'sep_attn_kernel_gather' must be auto, on or off, got {args.sep_attn_kernel_gather!r}"
                          + (" (from $SEP_ATTN_GATHER: auto, 1 or 0)" if "sep_attn_kernel_gather" in overrides else ""))
    if args.sep_attn_kernel_backward not in BACKWARD_MODES:
        raise ConfigError(f"key 'sep_attn_kernel_backward' must be split or fused, got {args.sep_attn_kernel_backward!r}"
                          + (" (from $SEP_ATTN_BACKWARD)" if "sep_attn_kernel_backward" in overrides else ""))
    if not isinstance(args.sep_attn_kernel_fast_launch, bool):
        raise ConfigError(f"$SEP_ATTN_FAST_LAUNCH must be 0 or 1, got {args.sep_attn_kernel_fast_launch!r}")
    try:
        parse_blocks(args.sep_attn_kernel_blocks, "key 'sep_attn_kernel_blocks'"
                     + (" (from $SEP_ATTN_BLOCKS)" if "sep_attn_kernel_blocks" in overrides else ""))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def derive_all(args, given, env, on_rank=False):
    """Fill every derived value of `args` (a NeoXArgs) from the user keys and the environment."""
    derive_optimizer(args, given)
    derive_precision(args, given)
    derive_zero(args, given)
    derive_attention_mode(args, given)
    derive_model(args, given)
    derive_launcher(args, given)
    derive_world(args, given, env, on_rank)
    derive_batch(args, given)
    derive_schedule(args, given)
    derive_vocab(args, given)
    derive_load(args, on_rank)
    derive_backend(args, env)
    derive_kernel_settings(args, env, on_rank)
