"""Mask-based training-free SepLLM on a stock ``transformers`` model, through forward hooks (no model file copied).

Two kinds of hook, both removable:

- on the base model (``model.base_model``), before its forward: read this step's ``input_ids``, 2D padding
  mask and cache; extend the token history kept on the cache; decide the phase (the first forward of a cache, or
  any forward without one, is a prefill; later ones are decode steps);
- on every attention module, before its forward: replace the 4D ``attention_mask`` the stock model built (causal,
  padding, Mistral's sliding window; ALiBi for Falcon) by its intersection with this layer's SepLLM mask, in the
  same format (boolean for sdpa, additive float for eager). The model's own eager / sdpa attention then runs as
  it is.

The SepLLM mask is the rule module's (``megatron/model/sepllm/rule.py``): initial tokens, separators found in the
token history (or FixLLM's fixed-interval tokens, or none for StreamingLLM), the layer's prefill window on a
prefill and its generate window on decode steps, ``EXCLUDE_DIAGONAL`` on prefill, ``BATCH_ADAPTIVE_INIT_POS``
from the prefill's padding, and padding keys hidden. Layers with equal settings share one mask per forward. Keys
are placed at the positions the cache reports (``Cache.get_mask_sizes``), so sliding-window and static caches
line up. Like the reference, this changes only the mask: every KV stays in the cache (a SepCache is what evicts).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megatron.hf import rule  # the rule module, without the trainer's imports

from .config import Settings
from .kv_ratio import KVRatioPrinter, mask_counts

STREAM_ATTR = "_sepllm_training_free_stream"


class TrainingFreeUsageError(ValueError):
    """A call the patched model cannot serve; the message says which argument."""


@dataclass
class _Stream:
    """The token history of one cache (one generation), kept on the cache object."""

    ids: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool, False at padding
    init_start: torch.Tensor  # [B]
    init_limit: Optional[int]

    def select(self, index: torch.Tensor) -> "_Stream":
        index = index.to(self.ids.device)
        return _Stream(self.ids[index], self.valid[index], self.init_start[index], self.init_limit)


@dataclass
class _Step:
    stream: _Stream
    q_len: int
    phase: str  # "prefill" or "generate"
    sep_flags: Optional[torch.Tensor]  # [B, T] (SepLLM mode)
    masks: Dict
    counts: Optional[List]


class TrainingFreeSepLLM:
    """The hooks that make one model run SepLLM attention with ``settings``; :meth:`remove` restores it."""

    def __init__(self, model, settings: Settings, attention_modules: List):
        self.model = model
        self.settings = settings
        self.kv_ratio = KVRatioPrinter(settings.print_ratio_intervals) if settings.print_kv_ratio else None
        self._step: Optional[_Step] = None
        base = model.base_model
        self._handles = [base.register_forward_pre_hook(self._begin_step, with_kwargs=True),
                         base.register_forward_hook(self._end_step, with_kwargs=True)]
        for module in attention_modules:
            self._handles.append(module.register_forward_pre_hook(self._layer_mask, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- per forward -----------------------------------------------------------------------------------
    def _begin_step(self, module, args, kwargs):
        if len(args) > 1:
            raise TrainingFreeUsageError("with apply_sepllm, pass the base model's arguments after input_ids by "
                                         "keyword (attention_mask=..., cache=...)")
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            raise TrainingFreeUsageError("the training-free SepLLM model needs input_ids (separators and the "
                                         "token history are read from them); inputs_embeds alone are not enough")
        padding = kwargs.get("attention_mask")
        if padding is not None and padding.dim() != 2:
            raise TrainingFreeUsageError(f"the training-free SepLLM model builds its own mask from a 2D padding "
                                         f"mask; got attention_mask of shape {tuple(padding.shape)}")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "is_sep_cache", False):
            raise TrainingFreeUsageError("a SepCache and apply_sepllm's mask are two ways to run SepLLM; use one "
                                         "(remove_sepllm(model) before generating with a SepCache)")
        bsz, q_len = input_ids.shape
        past = int(cache.get_seq_length()) if cache is not None else 0
        s = self.settings
        if past == 0:
            phase = "prefill"
            if s.adaptive_init:
                init_start, init_limit = rule.adaptive_init_start(input_ids, s.padding_id), q_len
            else:
                init_start, init_limit = torch.zeros(bsz, dtype=torch.long, device=input_ids.device), None
            history_ids = input_ids[:, :0]
            history_valid = torch.zeros(bsz, 0, dtype=torch.bool, device=input_ids.device)
        else:
            phase = "generate"
            stream = getattr(cache, STREAM_ATTR, None)
            if stream is None or stream.ids.shape[1] != past:
                seen = None if stream is None else stream.ids.shape[1]
                raise TrainingFreeUsageError(
                    f"the cache holds {past} tokens but the SepLLM model saw {seen} of them: a cache must be filled "
                    "by the patched model from its first token (pass the cache its own outputs returned)")
            if stream.ids.shape[0] != bsz:
                raise TrainingFreeUsageError(f"batch size changed from {stream.ids.shape[0]} to {bsz} within "
                                             "one cache")
            init_start, init_limit = stream.init_start, stream.init_limit
            history_ids, history_valid = stream.ids, stream.valid
        total = past + q_len
        ids = torch.cat([history_ids, input_ids], dim=-1)
        if padding is None:
            valid = torch.cat([history_valid, torch.ones_like(input_ids, dtype=torch.bool)], dim=-1)
        elif padding.shape[1] == total:
            valid = padding.bool()
        elif padding.shape[1] == q_len:
            valid = torch.cat([history_valid, padding.bool()], dim=-1)
        else:
            raise TrainingFreeUsageError(f"attention_mask has {padding.shape[1]} columns; expected {total} (past + "
                                         f"new tokens) or {q_len} (new tokens)")
        stream = _Stream(ids, valid, init_start, init_limit)
        if cache is not None:
            _attach(cache, stream)
        flags = rule.separator_flags(ids, s.separator_ids) if s.mode == "sepllm" else None
        if self.kv_ratio is not None and phase == "prefill":
            self.kv_ratio.start_prefill()
        self._step = _Step(stream, q_len, phase, flags, {}, [0, 0, 0, 0] if self.kv_ratio else None)
        return None

    def _end_step(self, module, args, kwargs, output):
        step, self._step = self._step, None
        if step is None:
            return None
        cache = getattr(output, "cache", None) if not isinstance(output, tuple) else None
        if cache is None and not isinstance(output, tuple):
            cache = getattr(output, "past_key_values", None)
        if cache is not None and getattr(cache, STREAM_ATTR, None) is None:
            _attach(cache, step.stream)  # a cache the model created inside this forward
        if self.kv_ratio is not None:
            self.kv_ratio.record(step.counts)
        return None

    # -- per layer -------------------------------------------------------------------------------------
    def _layer_mask(self, module, args, kwargs):
        step = self._step
        if step is None:
            raise TrainingFreeUsageError("an attention layer ran outside the base model's forward; call the model "
                                         "(or model.base_model), not a layer, with apply_sepllm")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        q_len = hidden.shape[1]
        layer = int(module.layer_idx)
        cache = next((kwargs[k] for k in ("cache", "layer_past", "past_key_values") if kwargs.get(k) is not None),
                     None)
        kv_len, kv_offset = cache.get_mask_sizes(q_len, layer) if cache is not None else (q_len, 0)
        kv_len, kv_offset = int(kv_len), int(kv_offset)
        stock = kwargs.get("attention_mask")
        if stock is not None and stock.shape[-1] != kv_len:
            raise TrainingFreeUsageError(f"layer {layer}: the model's mask has {stock.shape[-1]} key columns but its "
                                         f"cache reports {kv_len}; this cache type is not supported")
        allowed = self._allowed(step, layer, kv_len, kv_offset)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _intersect(stock, allowed, hidden.dtype)
        return args, kwargs

    def _allowed(self, step: _Step, layer: int, kv_len: int, kv_offset: int) -> torch.Tensor:
        """``[B, q, kv]`` allowed mask of ``layer`` for this step (shared by layers with equal settings)."""
        s = self.settings
        prefill = step.phase == "prefill"
        window = (s.prefill_windows if prefill else s.generate_windows)[layer]
        exclude = s.exclude_diagonal if prefill else True  # decode: the newest W keys, the query included
        interval = s.intervals[layer] if s.mode == "fixllm" else None
        key = (window, exclude, interval, kv_len, kv_offset)
        if key not in step.masks:
            step.masks[key] = self._build(step, window, exclude, interval, kv_len, kv_offset)
        allowed, counts = step.masks[key]
        if step.counts is not None:
            step.counts = [a + b for a, b in zip(step.counts, counts)]
        return allowed

    def _build(self, step: _Step, window: int, exclude: bool, interval: Optional[int], kv_len: int, kv_offset: int):
        s, stream = self.settings, step.stream
        total = stream.ids.shape[1]
        device = stream.ids.device
        if kv_offset + kv_len < total:
            raise TrainingFreeUsageError(f"the cache shows keys {kv_offset}..{kv_offset + kv_len - 1} but {total} "
                                         "tokens were fed; keys would be missing")
        k_pos = torch.arange(kv_offset, kv_offset + kv_len, device=device)
        seen = k_pos < total  # a static cache has empty slots beyond the history
        column = k_pos.clamp(max=total - 1)
        if s.mode == "sepllm":
            flags = step.sep_flags[:, column]
        elif s.mode == "fixllm":
            flags = rule.fixed_interval_flags(k_pos, stream.init_start, interval)
        else:
            flags = torch.zeros(stream.ids.shape[0], kv_len, dtype=torch.bool, device=device)
        q_pos = torch.arange(total - step.q_len, total, device=device)
        allowed = rule.dense_mask(flags & seen, stream.init_start, s.num_init, window, exclude, q_pos,
                                  stream.valid[:, column] & seen, stream.init_limit, k_positions=k_pos)
        counts = mask_counts(allowed, total) if step.counts is not None else None
        return allowed, counts


def _intersect(stock: Optional[torch.Tensor], allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stock 4D mask restricted to ``allowed`` ``[B, q, kv]``, in the stock mask's format."""
    allowed = allowed.unsqueeze(1)
    if stock is None:  # sdpa's plain causal case, where the stock model passes no mask at all
        return allowed
    if stock.dtype == torch.bool:
        return stock & allowed
    return torch.where(allowed, stock, torch.finfo(stock.dtype).min)  # either side may broadcast the batch


def _attach(cache, stream: _Stream) -> None:
    """Keeps ``stream`` on ``cache``; beam search's reordering of the cache reorders the history too."""
    setattr(cache, STREAM_ATTR, stream)
    if getattr(cache, "_sepllm_training_free_reorder", False):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx):
        original(beam_idx)
        current = getattr(cache, STREAM_ATTR, None)
        if current is not None:
            setattr(cache, STREAM_ATTR, current.select(beam_idx))

    cache.reorder_cache = reorder_cache
    cache._sepllm_training_free_reorder = True
