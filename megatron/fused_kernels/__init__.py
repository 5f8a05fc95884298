"""Triton fused kernels with PyTorch reference twins (CPU always uses the PyTorch paths)."""
from .rotary import fused_apply_rotary, fused_rotary_available, rotary_reference  # noqa: F401
