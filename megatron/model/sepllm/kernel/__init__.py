"""Sep-Attention kernel: SepLLM attention whose cost is proportional to the kept attention entries.

``build_sep_metadata`` once per micro-batch, then ``sep_attention`` in every layer. See
docs/sep_attention_kernel.md for the design and the H100 measurements.
"""
from .metadata import SepMetadata, build_sep_metadata
from .op import sep_attention
from .reference import dense_sep_mask, sep_attention_decomposed, sep_attention_reference

__all__ = [
    "SepMetadata",
    "build_sep_metadata",
    "sep_attention",
    "dense_sep_mask",
    "sep_attention_decomposed",
    "sep_attention_reference",
]
