"""Per-layer SepLLM settings resolved once from the configuration, and this rank's ALiBi slopes."""
from dataclasses import dataclass
import torch

from megatron.model.sepllm import rule


@dataclass(frozen=True)
class LayerSettings:
    """What one attention layer needs from the configuration (0-based ``layer_number``)."""

    window: int
    num_init: int
    exclude_diagonal: bool
    use_alibi: bool
    num_heads: int
    attention_dropout: float

    @classmethod
    def from_args(cls, neox_args, layer_number: int) -> "LayerSettings":
        num_layers = int(neox_args.num_layers)
        if not 0 <= layer_number < num_layers:
            raise ValueError(f"layer_number {layer_number} outside 0..{num_layers - 1} (num_layers)")
        window = rule.layer_windows(neox_args, num_layers, "prefill")[layer_number]
        if window < 1:
            raise ValueError(f"layer {layer_number}: local window must be >= 1, got {window} "
                             "(prefill_local_window_size / prefill_loc_win_size_list)")
        return cls(
            window=window,
            num_init=rule.num_initial_tokens(neox_args.init_tok_max_idx),
            exclude_diagonal=bool(neox_args.EXCLUDE_DIAGONAL),
            use_alibi=neox_args.pos_emb == "alibi",
            num_heads=int(neox_args.num_attention_heads),
            attention_dropout=float(neox_args.attention_dropout),
        )


def local_alibi_slopes(num_heads_total: int, num_heads_local: int, device) -> torch.Tensor:
    """ALiBi slopes ``[H_local]`` of this model-parallel rank (all heads at model-parallel size 1)."""
    from megatron.model.positional_embeddings import alibi_slopes

    slopes = torch.as_tensor(alibi_slopes(num_heads_total), dtype=torch.float32)
    if num_heads_local != num_heads_total:
        from megatron import mpu

        rank = mpu.get_model_parallel_rank()
        slopes = slopes[rank * num_heads_local:(rank + 1) * num_heads_local]
    return slopes.to(device)
