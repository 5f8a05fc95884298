"""The ``sepllm_gpt_neox`` HuggingFace model: GPT-NeoX with SepLLM attention (copied into every SepLLM export).

Parameter names are HF GPT-NeoX's (``gpt_neox.embed_in``, ``gpt_neox.layers.N.attention.query_key_value``, ...,
``embed_out``), so the converter writes the same tensors for ``neox`` and ``sepllm_gpt_neox`` exports.

Attention is mask-based, like the trainer's reference path: every layer computes dense scores and applies the
SepLLM rule (``rule.py``, the trainer's single source of truth, copied verbatim beside this file), with the
prefill windows for the first forward and the generate windows for decode steps, the padding mask respected at
decode time too, StreamingLLM, Self-Adjusting softmax (both variants), BiPE (rotary or ALiBi) and plain full
attention. With the default ``DynamicCache`` every KV stays in memory (the mask does the sparsity); with a
:class:`SepCache` the cache itself keeps only initial, separator and local-window KVs and the layers attend to
everything it kept.

Per-forward metadata (separator flags, positions, initial-token starts) is computed once in the model and
shared by every layer; the token-id history that decode masks need is kept on the cache object.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention_math import alibi_slopes, sa_probabilities
from .configuration_sepllm_gpt_neox import SepLLMGPTNeoXConfig
from .rule import adaptive_init_start, attention_mode, bipe_next_offsets, bipe_positions, dense_mask, \
    fixed_interval_flags, is_initial, keeps_separators, kv_ratio_totals, layer_windows, num_initial_tokens, \
    separator_flags, visible
from .rule import ratio as kv_ratio
from .sep_cache import SepCache, apply_rotary, rope_cos_sin, rope_inv_freq

# transformers renamed the cache field of model outputs (past_key_values -> cache) during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"



@dataclass
class StepMeta:
    """What every layer of one forward needs, computed once by the model."""

    q_len: int
    past: int  # tokens before this step (logical; SepCache layers use their physical length)
    rope_pos: torch.Tensor  # [B, q] positions of the new tokens (rotary / ALiBi)
    key_pos: Optional[torch.Tensor]  # [B, past + q] positions of all keys (ALiBi)
    sep_flags: torch.Tensor  # [B, past + q]
    key_valid: torch.Tensor  # [B, past + q]
    init_start: torch.Tensor  # [B]
    init_limit: Optional[int]
    phase: str  # "prefill" or "generate"
    sep_cache: Optional[SepCache]
    embed_pos: Optional[torch.Tensor] = None  # [B, q] learned-embedding positions (BiPE intra / absolute)


class SepLLMGPTNeoXAttention(nn.Module):
    """Fused-QKV GPT-NeoX attention with the SepLLM mask (or a SepCache) and the SA softmax variants."""

    def __init__(self, config: SepLLMGPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.rotary_ndims = config.rotary_ndims
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.num_init = num_initial_tokens(config.init_tok_max_idx)
        self.prefill_window = layer_windows(config, config.num_hidden_layers, "prefill")[layer_idx]
        self.generate_window = layer_windows(config, config.num_hidden_layers, "generate")[layer_idx]
        # FixLLM: this layer's interval; its fixed-interval keys take the separators' place.
        self.interval = int(config.fixed_sep_intervals_list[layer_idx]) if config.USE_FIXED_SEP_INTERVALs else None

    def _mask(self, meta: StepMeta, masks: Dict, kv_len: int) -> torch.Tensor:
        """Allowed mask ``[B, q, kv]`` for this layer; layers with equal windows share it within a forward."""
        cfg = self.config
        q_pos = torch.arange(kv_len - meta.q_len, kv_len, device=meta.key_valid.device)
        if meta.sep_cache is not None:
            return self._sepcache_mask(meta, masks, kv_len)
        if cfg.USE_ORIGINAL_FULL_ATTEN:
            key, window, exclude = ("full",), kv_len, True
        elif meta.phase == "prefill":
            key, window, exclude = ("win", self.prefill_window, cfg.EXCLUDE_DIAGONAL), self.prefill_window, \
                cfg.EXCLUDE_DIAGONAL
        else:
            key, window, exclude = ("win", self.generate_window, True), self.generate_window, True
        if self.interval is not None:
            key = key + ("fixllm", self.interval)
        if key not in masks:
            if cfg.USE_ORIGINAL_FULL_ATTEN:
                flags = torch.zeros_like(meta.key_valid)
                start, num_init, limit = torch.zeros_like(meta.init_start), 0, None
            else:
                flags, start, num_init, limit = meta.sep_flags, meta.init_start, self.num_init, meta.init_limit
                if self.interval is not None:
                    positions = torch.arange(kv_len, device=flags.device)
                    flags = fixed_interval_flags(positions, start, self.interval)
            masks[key] = dense_mask(flags, start, num_init, int(window), bool(exclude), q_pos, meta.key_valid,
                                    limit)
        return masks[key]

    def _sepcache_mask(self, meta: StepMeta, masks: Dict, kv_len: int) -> torch.Tensor:
        """The trained rule over the slots a SepCache kept, at their stream positions: inside the cache the
        model still sees only initial tokens, separators and its own window, so a cache that never compresses
        equals the model's own cache."""
        cfg = self.config
        if cfg.USE_ORIGINAL_FULL_ATTEN:
            window, exclude = None, True
        elif meta.phase == "prefill":
            window, exclude = self.prefill_window, bool(cfg.EXCLUDE_DIAGONAL)
        else:
            window, exclude = self.generate_window, True
        # Layers with equal sizes keep the same slots, so equal windows share one mask per forward.
        key = ("sepcache", kv_len, meta.sep_cache.uniform_sizes or self.layer_idx, window, exclude)
        if key not in masks:
            layer = meta.sep_cache.layers[self.layer_idx]
            k_pos = layer.stream_pos  # [B, kv]
            q_pos = k_pos[:, -meta.q_len:]
            if window is None:
                init_k = sep_k = torch.zeros_like(layer.valid)
                window = int(k_pos.max()) + 2
            else:
                init_k = is_initial(k_pos, meta.init_start.view(-1, 1), self.num_init,
                                    None if meta.init_limit is None else meta.init_limit)
                sepllm = not cfg.streamingLLM
                sep_k = separator_flags(layer.ids, cfg.separator_token_ids) if sepllm else \
                    torch.zeros_like(layer.valid)
            q_col, k_row = q_pos.unsqueeze(-1), k_pos.unsqueeze(1)
            allowed = visible(q_col, k_row, init_k.unsqueeze(1), sep_k.unsqueeze(1), int(window), exclude)
            masks[key] = allowed & (meta.key_valid.unsqueeze(1) | (q_col == k_row))
        return masks[key]

    def forward(self, hidden_states: torch.Tensor, meta: StepMeta, cache: Optional[Cache], masks: Dict,
                inv_freq: Optional[torch.Tensor], slopes: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(bsz, q_len, self.num_heads, 3 * self.head_size)
        qkv = qkv.transpose(1, 2)
        query, key, value = qkv.chunk(3, dim=-1)
        rope_pos = meta.rope_pos
        if meta.sep_cache is not None:
            rope_pos = meta.sep_cache.step_positions(self.layer_idx)
            key_valid = meta.sep_cache.step_key_valid(self.layer_idx)
        if inv_freq is not None:
            cos, sin = rope_cos_sin(rope_pos, inv_freq)
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        kv_len = key.shape[-2]
        if meta.sep_cache is not None:
            meta_layer = StepMeta(q_len, kv_len - q_len, rope_pos, None, meta.sep_flags, key_valid,
                                  meta.init_start, meta.init_limit, meta.phase, meta.sep_cache)
            allowed = self._mask(meta_layer, masks, kv_len)
            key_pos = self._sepcache_key_pos(meta.sep_cache)
        else:
            allowed = self._mask(meta, masks, kv_len)
            key_pos = meta.key_pos
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) / math.sqrt(self.head_size)
        if slopes is not None:
            rel = (rope_pos.unsqueeze(-1) - key_pos.unsqueeze(1)).clamp(min=0).float()  # [B, q, kv]
            scores = scores - slopes.view(1, -1, 1, 1) * rel.unsqueeze(1)
        allowed4 = allowed.unsqueeze(1)
        if self.config.USE_SA_SOFTMAX or self.config.USE_SA_SOFTMAX_NO_DENO:
            probs = self._self_adjust(scores, allowed4, kv_len, q_len)
        else:
            probs = torch.softmax(scores.masked_fill(~allowed4, torch.finfo(scores.dtype).min), dim=-1)
            probs = probs * allowed4  # rows are never empty (the diagonal is always kept)
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.dense(out)

    def _sepcache_key_pos(self, cache: SepCache) -> torch.Tensor:
        return cache.layers[self.layer_idx].rot_pos

    def _self_adjust(self, scores, allowed, kv_len, q_len):
        """Self-Adjusting softmax (SEPLLM_REFERENCE.md section 6): the trainer's formula (attention_math.py),
        with the causal triangle of queries that sit at the end of the keys."""
        cfg = self.config
        q_idx = torch.arange(kv_len - q_len, kv_len, device=scores.device).view(-1, 1)
        causal = torch.arange(kv_len, device=scores.device).view(1, -1) <= q_idx  # [q, kv]
        return sa_probabilities(scores, allowed, bool(cfg.USE_SA_SOFTMAX), cfg.SA_Numerator_Bias,
                                cfg.SA_Denominator_Bias, causal=causal)


def _mask_belongs(key, attention: "SepLLMGPTNeoXAttention") -> bool:
    """Whether the shared mask cached under ``key`` is the one ``attention`` used in this forward."""
    cfg = attention.config
    if key[0] == "sepcache":
        windows = (None,) if cfg.USE_ORIGINAL_FULL_ATTEN else (attention.prefill_window, attention.generate_window)
        return (key[2] is True or key[2] == attention.layer_idx) and key[3] in windows
    if key[0] == "full":
        return bool(cfg.USE_ORIGINAL_FULL_ATTEN)
    if attention.interval is not None and key[-2:] != ("fixllm", attention.interval):
        return False
    return not cfg.USE_ORIGINAL_FULL_ATTEN and key[1] in (attention.prefill_window, attention.generate_window)


class SepLLMGPTNeoXMLP(nn.Module):
    def __init__(self, config: SepLLMGPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class SepLLMGPTNeoXLayer(nn.Module):
    def __init__(self, config: SepLLMGPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SepLLMGPTNeoXAttention(config, layer_idx)
        self.mlp = SepLLMGPTNeoXMLP(config)

    def forward(self, hidden, meta, cache, masks, inv_freq, slopes):
        attn = self.attention(self.input_layernorm(hidden), meta, cache, masks, inv_freq, slopes)
        if self.use_parallel_residual:
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class SepLLMGPTNeoXPreTrainedModel(PreTrainedModel):
    config_class = SepLLMGPTNeoXConfig
    base_model_prefix = "gpt_neox"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SepLLMGPTNeoXLayer"]
    _keys_to_ignore_on_load_unexpected = [r"attention.bias", r"attention.masked_bias", r"rotary_emb.inv_freq"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


def _refuse_position_ids(kwargs) -> None:
    """Positions follow from the padding mask and the SepCache's slots (forward has no ``position_ids``, so
    ``generate`` builds none); explicit ones would be ignored, so they are refused."""
    if kwargs.get("position_ids") is not None:
        raise ValueError("sepllm_gpt_neox computes positions from attention_mask (left padding) and the SepCache's "
                         "slots; do not pass position_ids")


class SepLLMGPTNeoXModel(SepLLMGPTNeoXPreTrainedModel):
    def __init__(self, config: SepLLMGPTNeoXConfig):
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.USE_BiPE or config.pos_emb == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([SepLLMGPTNeoXLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # No buffers for the rotary / ALiBi tables: from_pretrained may build the module on the meta device
        # and leave non-persistent buffers uninitialised. They are recomputed per forward (tiny).
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def _step_meta(self, input_ids, attention_mask, cache) -> StepMeta:
        """Updates the stream state kept on the cache and returns this forward's metadata."""
        cfg = self.config
        bsz, q = input_ids.shape
        # Duck-typed: the export's own sep_cache.py and megatron.hf.sep_cache define distinct classes.
        sep_cache = cache if getattr(cache, "is_sep_cache", False) else None
        if sep_cache is not None and cfg.USE_FIXED_SEP_INTERVALs:
            raise ValueError("a SepCache keeps separators, but this model is FixLLM (USE_FIXED_SEP_INTERVALs): it "
                             "keeps fixed-interval tokens instead; generate with the model's own cache")
        if sep_cache is not None and cfg.USE_BiPE and sep_cache.APPLY_PE_SHIFT:
            raise ValueError("SepCache APPLY_PE_SHIFT=True cannot be used with a USE_BiPE=True model: PE shifting "
                             "has no defined meaning for BiPE's bilevel positions; create the SepCache with "
                             "APPLY_PE_SHIFT=False")
        state = getattr(cache, "_sepllm_state", None) if cache is not None else None
        past = 0 if cache is None else cache.get_seq_length()
        if past == 0 or state is None:
            state = {"ids": input_ids[:, :0], "valid": torch.zeros(bsz, 0, dtype=torch.bool,
                                                                  device=input_ids.device)}
            state["prefill_len"] = q
            adaptive = cfg.BATCH_ADAPTIVE_INIT_POS and not cfg.USE_ORIGINAL_FULL_ATTEN
            state["init_start"] = adaptive_init_start(input_ids, cfg.PADDING_ID) if adaptive else \
                torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
            state["init_limit"] = q if adaptive else None
            past = 0
        if attention_mask is None:
            new_valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            new_valid = attention_mask[:, -q:].bool()
        bipe = None
        if sep_cache is not None:
            # Only the new tokens' metadata is needed: the cache holds the kept keys' ids and flags.
            ids_all, valid_all = input_ids, new_valid
            if cfg.USE_BiPE:
                # BiPE positions continue from per-row state (the next token's intra / inter offsets), so
                # they equal those of the uncompressed history although evicted tokens are gone.
                offsets = state.get("bipe_next") if past > 0 else None
                bipe = bipe_positions(input_ids, cfg.BiPE_seps, offsets)
                state["bipe_next"] = bipe_next_offsets(input_ids, cfg.BiPE_seps, *bipe)
            sep_cache.prepare_step(input_ids, attention_mask, positions=None if bipe is None else bipe[1])
        else:
            ids_all = torch.cat([state["ids"], input_ids], dim=-1)
            valid_all = torch.cat([state["valid"], new_valid], dim=-1)
        if cache is not None:
            state["ids"], state["valid"] = ids_all, valid_all
            cache._sepllm_state = state
        # Positions come from the padding mask (left padding shifts a row's positions), as HF generate
        # computes them, or from the SepCache's slots; forward therefore takes no ``position_ids``.
        if sep_cache is not None:
            pos_all = sep_cache.step_positions(0)
        else:
            pos_all = (torch.cumsum(valid_all.long(), -1) - 1).clamp(min=0)
        rope_new = pos_all[:, -q:]
        intra_new = rope_new
        if cfg.USE_BiPE:
            intra, inter = bipe if bipe is not None else bipe_positions(ids_all, cfg.BiPE_seps)
            pos_all, rope_new, intra_new = inter, inter[:, -q:], intra[:, -q:]
        # FixLLM's layers put fixed-interval flags in place of these (the mask's ``interval`` key).
        flags = separator_flags(ids_all, cfg.separator_token_ids) if keeps_separators(attention_mode(cfg)) else \
            torch.zeros_like(ids_all, dtype=torch.bool)
        return StepMeta(q, past, rope_new, pos_all, flags, valid_all, state["init_start"], state["init_limit"],
                        "prefill" if past == 0 else "generate", sep_cache, intra_new)

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, past_key_values=None,
                inputs_embeds=None, **kwargs):
        _refuse_position_ids(kwargs)
        if input_ids is None:
            raise ValueError("sepllm_gpt_neox needs input_ids (separators are recognised by token id); "
                             "inputs_embeds alone are not supported")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"sepllm_gpt_neox expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
        meta = self._step_meta(input_ids, attention_mask, cache)
        hidden = self.embed_in(input_ids)
        if hasattr(self, "position_embeddings"):
            hidden = hidden + self.position_embeddings(meta.embed_pos) * self.config.mup_rp_embedding_mult
        cfg = self.config
        inv_freq = rope_inv_freq(cfg.rotary_ndims, float(cfg.rotary_emb_base), hidden.device) \
            if cfg.pos_emb == "rotary" and cfg.rotary_ndims else None
        slopes = torch.tensor(alibi_slopes(cfg.num_attention_heads), dtype=torch.float32, device=hidden.device) \
            if cfg.pos_emb == "alibi" else None
        masks: Dict = {}
        for layer in self.layers:
            hidden = layer(hidden, meta, cache if use_cache or cache is not None else None, masks, inv_freq,
                           slopes)
        if cfg.PRINT_KV_RATIO:
            self._record_kv_ratio(masks, meta.phase)
        return self.final_layer_norm(hidden), cache

    def _record_kv_ratio(self, masks: Dict, phase: str) -> None:
        """``PRINT_KV_RATIO``: KV entries the last query row keeps over all keys (padding included, as the
        reference counts), summed over layers; printed every ``print_ratio_intervals`` prefill calls. Unlike the
        reference, each call is counted when it happens (no one-batch lag)."""
        kept = total = 0
        for layer in self.layers:
            mask = next((m for k, m in masks.items() if _mask_belongs(k, layer.attention)), None)
            if mask is None:
                continue
            kept += int(mask[:, -1, :].sum())
            total += kv_ratio_totals(mask.shape[0], mask.shape[-1])[0]
        stats = getattr(self, "_kv_stats", {"kept": 0, "total": 0, "calls": 0})
        stats["kept"] += kept
        stats["total"] += total
        if phase == "prefill":
            stats["calls"] += 1
            if stats["calls"] % max(int(self.config.print_ratio_intervals), 1) == 0:
                print(f"[sepllm_gpt_neox] Kept/Total tokens for all the inputs: ({stats['kept']}, "
                      f"{stats['total']}), ratio = {kv_ratio(stats['kept'], stats['total']):.4f}", flush=True)
        self._kv_stats = stats


class SepLLMGPTNeoXForCausalLM(SepLLMGPTNeoXPreTrainedModel, GenerationMixin):
    """``AutoModelForCausalLM`` entry of the ``sepllm_gpt_neox`` export."""

    def __init__(self, config: SepLLMGPTNeoXConfig):
        super().__init__(config)
        self.gpt_neox = SepLLMGPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.embed_out

    def set_output_embeddings(self, new_embeddings):
        self.embed_out = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, inputs_embeds=None, return_dict=None, **kwargs):
        _refuse_position_ids(kwargs)
        hidden, cache = self.gpt_neox(input_ids, attention_mask=attention_mask,
                                      cache=cache if cache is not None else past_key_values,
                                      use_cache=use_cache, inputs_embeds=inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.embed_out(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
