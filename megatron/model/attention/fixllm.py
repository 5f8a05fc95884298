"""FixLLM training attention (``USE_FIXED_SEP_INTERVALs: True``): initial tokens, the local window and, in place
of the separators, every ``interval``-th key of the layer (``fixed_sep_intervals_list``), by the rule module's
:func:`~megatron.model.sepllm.rule.fixed_interval_flags`; the computation is the mask-based path."""
import torch

from megatron.model.attention.sepllm_mask import _MASKS, SepLLMMaskAttention
from megatron.model.sepllm import rule


class FixLLMAttention(SepLLMMaskAttention):
    """``"fixllm"``: ``allowed(q, k) = k <= q and (initial(k) or (k - s + 1) % n == 0 or q - k <= W - E)``."""

    def __init__(self, neox_args, layer_number: int):
        super().__init__(neox_args, layer_number)
        self.interval = int(neox_args.fixed_sep_intervals_list[layer_number])

    def allowed_mask(self, meta) -> torch.Tensor:
        s = self.settings

        def build():
            positions = torch.arange(meta.sep_flags.shape[1], device=meta.sep_flags.device)
            flags = rule.fixed_interval_flags(positions, meta.init_start, self.interval)
            return rule.dense_mask(flags, meta.init_start, s.num_init, s.window, s.exclude_diagonal).unsqueeze(1)

        key = ("fixllm", self.interval, s.window, s.num_init, s.exclude_diagonal)
        return _MASKS.get((meta.sep_flags, meta.init_start), key, build)
