"""Chunked streaming: many tokens per forward, with the NLL of every token and the kept KVs of the token-by-token
stream (``tools/streaming_eval.py``'s reference loop, one forward per token).

Why a chunk can be one forward:

* full cache (``DynamicCache``): a causal forward over (cache + chunk) is what the chunk's tokens see one by one.
* SepCache: between two compressions the cache only appends, so the tokens of that stretch see exactly (cache +
  their causal prefix of the chunk). A chunk therefore ends before the next compression: with ``L`` slots held, a
  step of ``q`` tokens compresses when ``L + q >= c``, so ``q <= c - 1 - L``. The token that finds ``c - 1``
  slots compresses on arrival; :meth:`SepCache.compress_due` does that compression first (the same kept slots,
  the same PE re-rotation), and the chunk starts with that token. PE shifting needs nothing else: inside one
  stretch the slots do not move and the chunk's tokens sit at consecutive slots (``step_positions``).
* StreamingLLM (a separator-free SepCache with ``cache_size == init + local + 1``, what ``make_cache`` builds):
  it evicts on every step once full, so no stretch is longer than one token. A chunk runs with its own
  attention (:func:`window_attention`): each query ``t`` sees the initial keys and the keys ``t - w .. t``
  (``w = local - 1``). With PE shifting the token-by-token query sits at slot ``min(t, a + w)``, a window key
  ``t - d`` at ``slot - d`` (its text distance) and an initial key ``j`` at slot ``j``: the window scores use
  text positions, the initial keys' scores a query rotated to its slot. After the chunk the cache keeps what
  the token-by-token cache holds between steps (:meth:`SepCache.compress_all`). Only stock families whose
  attention goes through ``transformers``' attention interface take this path (``WINDOW_FAMILIES``); others
  step one token at a time (still exact).

The first forward of a stream is one token (the sepllm_gpt_neox export treats its first forward as a prefill,
with its prefill window).
"""
from contextlib import contextmanager
from typing import Optional

import torch

from .sep_cache import apply_rotary

WINDOW_ATTENTION = "sepllm_stream_window"
WINDOW_FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox")

_active = {"cache": None}


def is_window_cache(cache) -> bool:
    """A separator-free SepCache that compresses at every step once full (StreamingLLM's eviction)."""
    return bool(getattr(cache, "is_sep_cache", False)) and not cache.separator_token_ids and all(
        layer.cache_size == layer.init_size + layer.local_size + 1 for layer in cache.layers)


def uses_stock_shift(model, cache) -> bool:
    """A stock model rotates at the positions it is given; PE shifting gives it the cache slots."""
    return bool(getattr(cache, "is_sep_cache", False)) and cache.APPLY_PE_SHIFT and \
        getattr(model.config, "model_type", "") != "sepllm_gpt_neox"


def window_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``transformers`` attention-interface function of a StreamingLLM chunk (see the module docstring).

    ``key``/``value``: every slot of this layer's SepCache after the chunk was appended; the slots' text and
    rotation positions come from the cache. Returns ``([B, q, H, D], None)``.
    """
    cache = _active["cache"]
    layer = cache.layers[module.layer_idx]
    bsz, heads, q, _ = query.shape
    rep = heads // key.shape[1]
    keys = key.float().repeat_interleave(rep, 1) if rep > 1 else key.float()
    values = value.float().repeat_interleave(rep, 1) if rep > 1 else value.float()
    text, rot = layer.text_pos, layer.rot_pos  # [B, L]
    t_q, p_q = text[:, -q:], rot[:, -q:]
    a, w = layer.init_size, layer.local_size - 1
    n_init = min(a, text.shape[1])
    query = query.float()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if cache.APPLY_PE_SHIFT:
        keys = apply_rotary(keys, *cache._cos_sin(text - rot))  # every key at its text position
        q_text = apply_rotary(query, *cache._cos_sin(t_q - p_q))
        q_slot = apply_rotary(query, *cache._cos_sin(t_q.clamp(max=a + w) - p_q))
    else:  # keys and queries already sit at text positions
        q_text = q_slot = query
    scores = torch.matmul(q_text, keys.transpose(-1, -2)) * scaling
    if cache.APPLY_PE_SHIFT and n_init:
        scores[..., :n_init] = torch.matmul(q_slot, keys[:, :, :n_init].transpose(-1, -2)) * scaling
    dist = t_q.unsqueeze(-1) - text.unsqueeze(1)  # [B, q, L]
    allowed = (dist >= 0) & ((text < a).unsqueeze(1) | (dist <= w))
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out.transpose(1, 2).to(value.dtype), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(WINDOW_ATTENTION, window_attention)


@contextmanager
def _window_attention_on(model, cache):
    config = model.config
    before = config._attn_implementation
    _register()
    _active["cache"] = cache
    config._attn_implementation = WINDOW_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        _active["cache"] = None


class ChunkedStepper:
    """Plans and runs the forwards of a chunked stream over one persistent cache.

    ``plan(budget)`` does the compression due now and returns how many tokens (1..budget) the next forward may
    take; ``forward(ids [1, q])`` runs it and returns the logits ``[1, q, V]``.
    """

    def __init__(self, model, cache, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {max_tokens}")
        self.model, self.cache, self.max_tokens = model, cache, int(max_tokens)
        self.stock_shift = uses_stock_shift(model, cache)
        sep = bool(getattr(cache, "is_sep_cache", False))
        family = getattr(model.config, "model_type", "")
        if not sep:
            self.mode = "full"
        elif not is_window_cache(cache):
            self.mode = "stretch"
        elif family in WINDOW_FAMILIES and not getattr(model.config, "sliding_window", None):
            self.mode = "window"
        else:
            self.mode = "single"  # no exact multi-token step for this model: one token per forward

    def seen(self) -> int:
        return int(self.cache.get_seq_length())

    def plan(self, budget: int) -> int:
        budget = min(int(budget), self.max_tokens)
        if budget < 1:
            raise ValueError("ChunkedStepper.plan: nothing to feed")
        if self.seen() == 0 or self.mode == "single":
            return 1
        if self.mode == "full":
            return budget
        self.cache.compress_due(1)
        if self.mode == "window":
            return budget
        room = min(layer.cache_size - 1 - layer.length() for layer in self.cache.layers)
        return max(1, min(budget, room))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        if self.mode != "window" or ids.shape[1] == 1 and self.seen() == 0:
            kwargs = {}
            if self.stock_shift:
                cache.prepare_step(ids)
                kwargs["position_ids"] = cache.step_positions(0)
            return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs).logits
        start, q = self.seen(), ids.shape[1]
        cache.prepare_step(ids, prefill=True)  # compressions are done by plan() and below
        with _window_attention_on(model, cache):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                           position_ids=cache.step_positions(0)).logits
        for layer in cache.layers:
            # The token-by-token stream compresses at every step t >= c - 1; plan() did the chunk's first.
            layer.compressions += max(0, start + q - max(start + 1, layer.cache_size - 1))
        if max(layer.length() for layer in cache.layers) > min(layer.cache_size - 1 for layer in cache.layers):
            cache.compress_all()
        return logits


def step_summary(stepper: Optional[ChunkedStepper]) -> dict:
    return {} if stepper is None else {"chunk_mode": stepper.mode, "chunk_tokens": stepper.max_tokens}
