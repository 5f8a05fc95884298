"""The Sep-Attention kernel's launch settings, from the resolved config.

Config keys (``sep_attn_kernel_blocks``, ``sep_attn_kernel_gather``, ``sep_attn_kernel_fast_launch``,
``sep_attn_kernel_backward``) are the source; the environment variables ``SEP_ATTN_BLOCKS``, ``SEP_ATTN_GATHER``,
``SEP_ATTN_FAST_LAUNCH`` and ``SEP_ATTN_BACKWARD`` may override them for experiments. Derivation reads the environment once (``env_overrides``), so the values a
run used are in its resolved config and its checkpoints.

The op reads one process-wide :data:`ACTIVE` set by :func:`configure` when a model's kernel attention is
built: the kernel runs as a ``torch.library`` custom op (so that torch.compile and CUDA graphs hold it as one
node), whose arguments can only be tensors and scalars, and every layer of the process's model shares it.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from megatron.neox_arguments.kernel_knobs import BACKWARD_MODES, GATHER_MODES, parse_blocks


@dataclass(frozen=True)
class KernelSettings:
    blocks: Dict[int, Dict[str, Tuple[int, int, int, int]]] = field(default_factory=dict)  # overrides of the table
    gather: str = "auto"  # copy listed K/V into contiguous buffers: auto (from op._GATHER_MIN_SEQ), on, off
    fast_launch: bool = True  # call compiled kernels directly after triton's first launch
    backward: str = "split"  # split: dQ + two dK/dV kernels (deterministic); fused: one pass, dQ by atomics

    def __post_init__(self):
        if self.gather not in GATHER_MODES:
            raise ValueError(f"sep_attn_kernel_gather must be one of {', '.join(GATHER_MODES)}, got {self.gather!r}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"sep_attn_kernel_backward must be one of {', '.join(BACKWARD_MODES)}, "
                             f"got {self.backward!r}")

    @classmethod
    def from_args(cls, neox_args) -> "KernelSettings":
        return cls(parse_blocks(neox_args.sep_attn_kernel_blocks, "key 'sep_attn_kernel_blocks'"),
                   neox_args.sep_attn_kernel_gather, bool(neox_args.sep_attn_kernel_fast_launch),
                   neox_args.sep_attn_kernel_backward)


ACTIVE = KernelSettings()


def configure(settings: Optional[KernelSettings]) -> KernelSettings:
    """Makes ``settings`` (None: the defaults) the ones every later launch reads; returns them."""
    global ACTIVE
    ACTIVE = settings or KernelSettings()
    return ACTIVE
