"""The Sep-Attention kernel keys' values and the experiment variables that override them (parsing only: no
torch, so that configuration never imports the model). Used by derivation and by
``megatron.model.sepllm.kernel.settings``."""
import json
from typing import Dict, Tuple

GATHER_MODES = ("auto", "on", "off")
BACKWARD_MODES = ("split", "fused")
BLOCK_KERNELS = ("fwd", "dq", "dkdv_c", "dkdv_b", "fused_b", "fused_c")
ENV_KEYS = {"SEP_ATTN_BLOCKS": "sep_attn_kernel_blocks", "SEP_ATTN_GATHER": "sep_attn_kernel_gather",
            "SEP_ATTN_FAST_LAUNCH": "sep_attn_kernel_fast_launch", "SEP_ATTN_BACKWARD": "sep_attn_kernel_backward"}


def parse_blocks(value, where: str) -> Dict[int, Dict[str, Tuple[int, int, int, int]]]:
    """``{"64": {"fwd": [bm, bn, warps, stages], ...}, "128": {...}}`` (JSON text or a mapping) as
    ``{64: {"fwd": (bm, bn, warps, stages)}}``; ``where`` names the key or variable in errors."""
    if value is None:
        return {}
    try:
        data = json.loads(value) if isinstance(value, str) else value
        out = {}
        for dim, kernels in dict(data).items():
            if int(dim) not in (64, 128):
                raise ValueError(f"head-dim key {dim!r} is not 64 or 128")
            table = {}
            for name, cfg in dict(kernels).items():
                if name not in BLOCK_KERNELS:
                    raise ValueError(f"kernel {name!r} is not one of {', '.join(BLOCK_KERNELS)}")
                cfg = tuple(int(v) for v in cfg)
                if len(cfg) != 4 or min(cfg) < 1:
                    raise ValueError(f"{name} needs four positive integers [BLOCK_M, BLOCK_N, warps, stages]")
                table[name] = cfg
            out[int(dim)] = table
        return out
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{where} must be like {{\"64\": {{\"fwd\": [128, 64, 4, 3]}}}}, got {value!r}: "
                         f"{err}") from None


def env_overrides(environ) -> Dict[str, object]:
    """Config values from the experiment variables that are set: ``{key: value}``."""
    out = {}
    if environ.get("SEP_ATTN_BLOCKS"):
        out["sep_attn_kernel_blocks"] = json.loads(environ["SEP_ATTN_BLOCKS"]) \
            if _is_json(environ["SEP_ATTN_BLOCKS"]) else environ["SEP_ATTN_BLOCKS"]
    if environ.get("SEP_ATTN_GATHER"):
        raw = environ["SEP_ATTN_GATHER"]
        out["sep_attn_kernel_gather"] = {"1": "on", "0": "off"}.get(raw, raw)
    if environ.get("SEP_ATTN_FAST_LAUNCH"):
        raw = environ["SEP_ATTN_FAST_LAUNCH"]
        out["sep_attn_kernel_fast_launch"] = {"1": True, "0": False}.get(raw, raw)
    if environ.get("SEP_ATTN_BACKWARD"):
        out["sep_attn_kernel_backward"] = environ["SEP_ATTN_BACKWARD"]
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
