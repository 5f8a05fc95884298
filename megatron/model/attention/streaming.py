"""StreamingLLM training attention (``streamingLLM: True``): initial tokens + local window only.

Separators are forced off (the checker sets ``separator_token_ids`` to ``[-1]``; this class ignores the
separator flags as well, so the pattern holds even if metadata carried some), every layer uses the
scalar ``prefill_local_window_size``; the computation is the mask-based path.
"""
from megatron.model.attention.sepllm_mask import SepLLMMaskAttention
from megatron.model.sepllm.rule import keeps_separators


class StreamingLLMAttention(SepLLMMaskAttention):
    """``"streamingllm"``: ``allowed(q, k) = k <= q and (k < a or q - k <= W - E)``."""

    use_separators = keeps_separators("streamingllm")
