"""Configuration of the ``sepllm_gpt_neox`` HuggingFace model (copied into every SepLLM export).

It carries the GPT-NeoX shape keys plus every SepLLM / Self-Adjusting-softmax / BiPE key with the reference's
exact, case-sensitive names (SEPLLM_REFERENCE.md §9.2), so an export's ``config.json`` documents the attention
the model was trained with.
"""
from transformers import PretrainedConfig

DEFAULT_SEPARATOR_IDS = [15, 13, 32, 2, 28, 27, 209, 186, 187]

# Key -> default (the reference converter's defaults where a YAML lacks the key).
SEPLLM_DEFAULTS = {
    "pos_emb": "rotary",
    "mup_rp_embedding_mult": 1.0,
    "separator_token_ids": DEFAULT_SEPARATOR_IDS,
    "PADDING_ID": 0,
    "prefill_local_window_size": 128,
    "generate_local_window_size": 128,
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False,
    "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": False,
    "prefill_loc_win_size_list": None,
    "generate_win_loc_size_list": None,
    "init_tok_max_idx": 2,
    "USE_ORIGINAL_FULL_ATTEN": False,
    "streamingLLM": False,
    "PRINT_KV_RATIO": False,
    "print_ratio_intervals": 100,
    "EXCLUDE_DIAGONAL": True,
    "USE_BiPE": False,
    "BiPE_seps": DEFAULT_SEPARATOR_IDS,
    "USE_SA_SOFTMAX": False,
    "USE_SA_SOFTMAX_NO_DENO": False,
    "SA_Numerator_Bias": 0.0,
    "SA_Denominator_Bias": 1e-10,
    "BATCH_ADAPTIVE_INIT_POS": False,
    "USE_FIXED_SEP_INTERVALs": False,
    "fixed_sep_intervals_list": None,
}


class SepLLMGPTNeoXConfig(PretrainedConfig):
    """GPT-NeoX shapes (``hidden_size``, ``num_hidden_layers``, ``rotary_pct``, ...) plus the SepLLM keys."""

    model_type = "sepllm_gpt_neox"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                 attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=2048,
                 initializer_range=0.02, layer_norm_eps=1e-5, use_cache=True, bos_token_id=0, eos_token_id=0,
                 tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True,
                 model_parallel_size=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        self.use_parallel_residual = use_parallel_residual
        self.attention_bias = attention_bias
        self.model_parallel_size = model_parallel_size
        for key, default in SEPLLM_DEFAULTS.items():
            value = kwargs.pop(key, default)
            setattr(self, key, list(value) if isinstance(value, (list, tuple)) else value)
        self.num_layers = kwargs.pop("num_layers", num_hidden_layers)
        if self.prefill_loc_win_size_list is None:
            self.prefill_loc_win_size_list = [self.prefill_local_window_size] * num_hidden_layers
        if self.generate_win_loc_size_list is None:
            self.generate_win_loc_size_list = [self.generate_local_window_size] * num_hidden_layers
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads "
                             f"{num_attention_heads}")
        if self.pos_emb not in ("rotary", "alibi", "learned", "none"):
            raise ValueError(f"pos_emb {self.pos_emb!r} is not supported by sepllm_gpt_neox "
                             "(rotary, alibi, learned, none)")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def rotary_ndims(self) -> int:
        return int(self.hidden_size // self.num_attention_heads * self.rotary_pct)
