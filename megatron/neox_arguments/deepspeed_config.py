"""The DeepSpeed config dict, derived from NeoXArgs (never kept by hand next to it)."""
import copy

from .deepspeed_args import BF16_KEYS, FP16_KEYS
from .optimizer_args import DEEPSPEED_ONLY_OPTIMIZERS

# Top-level DeepSpeed sections passed through unchanged when the user gives them.
_DEFAULT_OFF = {"dump_state": False, "prescale_gradients": False, "gradient_predivide_factor": 1.0,
                "fp32_allreduce": False, "sparse_gradients": False}
PASS_THROUGH = ("amp", "flops_profiler", "comms_logger", "checkpoint", "data_types", "communication_data_type")


def _zero_section(args):
    zero = copy.deepcopy(args.zero_optimization) if args.zero_optimization else {}
    zero["stage"] = args.zero_stage
    # GPT-NeoX configs carry the old `cpu_offload` flag; DeepSpeed's current spelling is offload_optimizer.
    if "cpu_offload" in zero:
        if zero.pop("cpu_offload") and "offload_optimizer" not in zero:
            zero["offload_optimizer"] = {"device": "cpu"}
    return zero


def _fp16_section(args):
    section = dict(args.fp16 or {})
    out = {k: section[k] for k in FP16_KEYS if k in section}
    out["enabled"] = True
    return out


def _bf16_section(args):
    section = args.bf16 if isinstance(args.bf16, dict) else {}
    out = {k: section[k] for k in BF16_KEYS if k in section}
    out["enabled"] = True
    return out


def uses_deepspeed_optimizer(args) -> bool:
    """Does DeepSpeed build the optimizer (else the training loop passes its own torch optimizer)?"""
    return args.optimizer is not None and (args.optimizer_type in DEEPSPEED_ONLY_OPTIMIZERS
                                           or args.use_deepspeed_optimizer)


# DeepSpeed prints when global_steps % steps_per_print == 0 and has no "off" value that every engine path
# accepts (the pipeline engine's throughput log takes the modulo of None), so "off" is an interval no run
# reaches.
DEEPSPEED_PRINTS_OFF = 2**62


def build_deepspeed_config(args) -> dict:
    """DeepSpeed config for `deepspeed.initialize(config=...)`, from resolved args."""
    config = {
        "train_batch_size": args.train_batch_size,
        "train_micro_batch_size_per_gpu": args.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.gradient_clipping,
        "steps_per_print": args.steps_per_print if args.deepspeed_progress_log or args.wall_clock_breakdown
        else DEEPSPEED_PRINTS_OFF,
        "wall_clock_breakdown": args.wall_clock_breakdown,
        "zero_optimization": _zero_section(args),
    }
    # Optional engine flags are written only when they differ from DeepSpeed's defaults, so the config
    # stays valid across DeepSpeed versions that drop a flag (as 0.19 did with sparse_gradients).
    for key, default in _DEFAULT_OFF.items():
        if getattr(args, key) != default:
            config[key] = getattr(args, key)
    if args.precision == "fp16":
        config["fp16"] = _fp16_section(args)
    elif args.precision == "bfloat16":
        config["bf16"] = _bf16_section(args)
    if uses_deepspeed_optimizer(args):
        # DeepSpeed's optimizer names are case-sensitive CamelCase; keep the user's spelling.
        config["optimizer"] = {"type": args.optimizer["type"], "params": copy.deepcopy(args.optimizer.get("params", {}))}
        if args.lr is not None:
            config["optimizer"]["params"]["lr"] = args.lr
    for key in PASS_THROUGH:
        value = getattr(args, key)
        if value is not None:
            config[key] = copy.deepcopy(value)
    if args.deepspeed_extra_args:
        config.update(copy.deepcopy(args.deepspeed_extra_args))
    return config
