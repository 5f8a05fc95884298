"""SepCache: a ``transformers`` KV cache that physically keeps only initial, separator and local-window KVs.

Per layer the cache holds four regions, left to right (SEPLLM_REFERENCE.md §12.2):

1. initial ``[0, a + p)``: the first ``a`` tokens plus ``p`` = the largest left padding of any row;
2. separators harvested from evicted text (up to ``s``, or growing when ``USE_MAX_SEP_CACHE`` is off);
3. the past window: tokens that left the local window and are not compressed yet;
4. the local window: the newest ``w`` tokens.

Compression follows the reference's step (§12.3): a step of ``q`` new tokens that finds ``cached + q >= c``
compresses, and its own queries already attend to the compressed layout. The cache does it before appending,
keeping the newest ``w - q`` past slots, which selects exactly the reference's "append, then keep the newest
``w``"; so the mask the model built for this step fits, and a layer never holds more than ``c - 1`` KVs after a
decode step. Prefill never compresses. Which slots a compression keeps comes from the SepLLM rule module
(``rule.visible`` with the slots as positions: initial, separator, or inside the local window).

A token-id tensor (and a padding-valid tensor) runs alongside the KVs so separators can be recognised later.
The ids of a step come from ``update(..., input_ids=...)`` (the reference's form), from :meth:`SepCache.
prepare_step` (the ``sepllm_gpt_neox`` model and this project's tools call it), or, for a stock model that
passes none, from the ``input_ids`` argument of the model forward that is using this cache: the first cache
call of a forward (the mask builder's ``get_query_offset``, or ``update``) reads them from that frame. That is
what lets ``model(**inputs, past_key_values=SepCache(...))`` and ``generate(...)`` work on stock models.

Rotary / ALiBi positions default to text positions; a model whose positions are not the token index (BiPE's
inter-segment positions) passes them per step to :meth:`SepCache.prepare_step`. Keys keep the positions they
were rotated with.

PE shifting (``APPLY_PE_SHIFT``): positions are slots inside the cache, not text positions. Keys sit rotated at
``slot + offset``; after a compression every kept key is rotated by the change of its target (rotations
compose). The offset is 0 when the caller rotates at :meth:`SepCache.step_positions` (the ``sepllm_gpt_neox``
model, ``tools/streaming_eval.py``) or passes un-rotated ``query_states`` (the reference's form, the query comes
back rotated). A stock model inside ``generate`` rotates at its own text positions; the offset then is the
query's text position minus its slot, so query-key distances still equal slot distances. The rotation tables
come from ``base``/``pe_dim`` inside the cache (``APPLY_PES_INSIDE``) or from ``cache_kwargs['cos'/'sin']``
tables indexed by position.

This file depends only on torch, transformers and the rule and attention_math modules beside it: the HF export
copies them next to the modeling code.
"""
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .attention_math import rotary_cos_sin, rotary_inv_freq, rotate_prefix
from .rule import is_initial, separator_flags, visible
from .rule import ratio as smoothed_ratio

IntOrList = Union[int, Sequence[int]]

# Separator / padding presets of the training-free setting (SEPLLM_REFERENCE.md §12.1).
MODEL_TYPE_PRESETS: Dict[str, Dict[str, object]] = {
    "llama": {
        "separator_token_ids": [128000, 13, 11, 30, 0, 26, 25, 198, 220, 662, 1174, 949, 758, 2652, 551, 720,
                                256, 262],
        "PADDING_ID": 128009,
    },
    "pythia": {
        "separator_token_ids": [15, 13, 32, 2, 28, 27, 209, 186, 187, 964, 1157, 3736, 2195, 3706, 1163, 2490,
                                50276, 586, 4928, 50275],
        "PADDING_ID": 0,
    },
    "falcon": {
        "separator_token_ids": [25, 23, 42, 12, 38, 37, 193, 4610, 204, 258, 1212, 23787, 466],
        "PADDING_ID": 11,
    },
}
MODEL_TYPE_PRESETS["gpt_neox"] = MODEL_TYPE_PRESETS["pythia"]
MODEL_TYPE_PRESETS["sepllm_gpt_neox"] = MODEL_TYPE_PRESETS["pythia"]


rope_inv_freq = rotary_inv_freq  # the names this module's callers (and the reference's users) know
rope_cos_sin = rotary_cos_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` dims of ``x [B, H, L, D]`` by ``cos/sin [B, L, r]``."""
    return rotate_prefix(x, cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype))


def _per_layer(name: str, value: IntOrList, num_layers: int) -> List[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"SepCache: {name} has {len(value)} entries but layer_num is {num_layers}")
        return [int(v) for v in value]
    return [int(value)] * num_layers


class SepCacheLayer(DynamicLayer):
    """One layer's KVs plus the aligned token ids, padding flags and rotation positions.

    Storage is preallocated (capacity ``cache_size`` plus slack, grown when a long prefill needs more), so a
    decode step writes one slot instead of re-concatenating every tensor; ``keys``/``values`` are views of the
    filled part. Per-slot metadata lives in one int64 tensor ``[B, 5, capacity]``: ids, valid, rot_pos (the
    position the key is rotated at), text_pos (index among the row's real tokens) and stream_pos (index in the
    stream as fed, padding included: the position the SepLLM rule of a trained model uses).
    """

    SLACK = 16

    def __init__(self, init_size: int, sep_size: int, local_size: int, cache_size: int):
        super().__init__()
        self.init_size, self.sep_size, self.local_size = init_size, sep_size, local_size
        self.base_cache_size = cache_size
        self.cache_size = cache_size  # grows by the separator overflow when USE_MAX_SEP_CACHE is off
        self._kbuf: Optional[torch.Tensor] = None
        self._vbuf: Optional[torch.Tensor] = None
        self._meta: Optional[torch.Tensor] = None
        self._len = 0
        self.sep_len = 0
        self.compressions = 0

    # aligned per-slot metadata (read-only views)
    @property
    def ids(self) -> Optional[torch.Tensor]:
        return None if self._meta is None else self._meta[:, 0, :self._len]

    @property
    def valid(self) -> Optional[torch.Tensor]:
        return None if self._meta is None else self._meta[:, 1, :self._len].bool()

    @property
    def rot_pos(self) -> Optional[torch.Tensor]:
        return None if self._meta is None else self._meta[:, 2, :self._len]

    @property
    def text_pos(self) -> Optional[torch.Tensor]:
        return None if self._meta is None else self._meta[:, 3, :self._len]

    @property
    def stream_pos(self) -> Optional[torch.Tensor]:
        return None if self._meta is None else self._meta[:, 4, :self._len]

    def length(self) -> int:
        return self._len

    def get_seq_length(self, *args, **kwargs) -> int:  # physical length; the Cache reports seen tokens
        return self._len

    def get_mask_sizes(self, query, *args, **kwargs):
        q = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self._len + q, 0

    def get_max_length(self) -> int:
        return -1

    def _allocate(self, like_k, like_v, capacity: int):
        b, h, _, d = like_k.shape
        kbuf = like_k.new_empty(b, h, capacity, d)
        vbuf = like_v.new_empty(b, like_v.shape[1], capacity, like_v.shape[-1])
        meta = torch.empty(b, 5, capacity, dtype=torch.long, device=like_k.device)
        return kbuf, vbuf, meta

    def _refresh_views(self) -> None:
        self.keys = self._kbuf[:, :, :self._len]
        self.values = self._vbuf[:, :, :self._len]

    def append(self, keys, values, ids, valid, rot_pos, text_pos, stream_pos):
        q = keys.shape[-2]
        need = self._len + q
        if self._kbuf is None:
            self.device = keys.device
            self.is_initialized = True
            self._kbuf, self._vbuf, self._meta = self._allocate(keys, values, max(need, self.cache_size + self.SLACK))
        elif need > self._kbuf.shape[2]:
            kbuf, vbuf, meta = self._allocate(keys, values, max(need, 2 * self._kbuf.shape[2]))
            kbuf[:, :, :self._len] = self._kbuf[:, :, :self._len]
            vbuf[:, :, :self._len] = self._vbuf[:, :, :self._len]
            meta[:, :, :self._len] = self._meta[:, :, :self._len]
            self._kbuf, self._vbuf, self._meta = kbuf, vbuf, meta
        self._kbuf[:, :, self._len:need] = keys
        self._vbuf[:, :, self._len:need] = values
        self._meta[:, :, self._len:need] = torch.stack([ids.long(), valid.long(), rot_pos.long(), text_pos.long(),
                                                          stream_pos.long()], 1)
        self._len = need
        self._refresh_views()

    def gather(self, index: torch.Tensor) -> None:
        """Keeps the slots ``index [B, L']`` (per row) of every aligned tensor, in fresh buffers."""
        b, h, _, d = self.keys.shape
        n = index.shape[1]
        keys = torch.gather(self.keys, 2, index.view(b, 1, n, 1).expand(b, h, n, d))
        values = torch.gather(self.values, 2, index.view(b, 1, n, 1).expand(b, self.values.shape[1], n,
                                                                           self.values.shape[-1]))
        meta = torch.gather(self._meta[:, :, :self._len], 2, index.unsqueeze(1).expand(b, 5, n))
        # Fresh buffers also release a long prefill's memory.
        self._kbuf, self._vbuf, self._meta = self._allocate(keys, values, max(n, self.cache_size) + self.SLACK)
        self._kbuf[:, :, :n], self._vbuf[:, :, :n], self._meta[:, :, :n] = keys, values, meta
        self._len = n
        self._refresh_views()

    def set_keys(self, keys: torch.Tensor) -> None:
        self._kbuf[:, :, :self._len] = keys
        self._refresh_views()

    def set_rot_pos(self, positions: torch.Tensor) -> None:
        self._meta[:, 2, :self._len] = positions

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._len > 0:
            idx = beam_idx.to(self._kbuf.device)
            self._kbuf, self._vbuf = self._kbuf.index_select(0, idx), self._vbuf.index_select(0, idx)
            self._meta = self._meta.index_select(0, idx)
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("SepCache cannot be cropped (evicted tokens are gone); assisted decoding is unsupported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("SepCache cannot be expanded after prefill; create it per batch before generate()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def reset(self) -> None:
        raise ValueError("SepCache layers cannot be reset; create a new SepCache")


def _forward_inputs_of(cache) -> Optional[dict]:
    """``input_ids`` / ``attention_mask`` / ``position_ids`` (and the module) of the innermost running
    ``forward`` that holds ``cache`` as its ``cache`` or ``past_key_values`` argument, or None.

    Stock ``transformers`` models never pass token ids to the cache; their model forward has them. Only a few
    frames are walked, once per step.
    """
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "forward" and "input_ids" in code.co_varnames:
            local = frame.f_locals
            if local.get("cache") is cache or local.get("past_key_values") is cache:
                return {"module": local.get("self"), "input_ids": local.get("input_ids"),
                        "attention_mask": local.get("attention_mask"), "position_ids": local.get("position_ids")}
        frame = frame.f_back
    return None


class SepCache(Cache):
    """KV cache of SepLLM (training-free or trained): initial + separator + past window + local window.

    Args (each size an int or a per-layer list):
        init_cache_size (a), sep_cache_size (s), local_size (w), cache_size (c): ``a + s + w < c``.
        SEP_ACCUMULATION: keep earlier harvested separators (else only the newest harvest).
        USE_MAX_SEP_CACHE: keep at most ``s`` separators (else the separator region and ``c`` grow).
        SEP_PADDING_IN_BATCH: rows with fewer new separators are padded with the newest tokens of their past
            window (else every row keeps its oldest ``min`` count).
        separator_token_ids, PADDING_ID: or a ``model_type`` preset (llama, pythia/gpt_neox, falcon).
        APPLY_PE_SHIFT, APPLY_PES_INSIDE, pe_dim (rotary dims; default: the keys' head dim),
        partial_rotation_size (alias; also taken from ``cache_kwargs`` per call), base,
        max_position_embeddings: position shifting (see the module docstring); with PE shifting a cache_size
            above max_position_embeddings is refused (rotations are computed per position, no table is kept).
        k_seq_dim, v_seq_dim: the sequence dimension of the key / value tensors given to :meth:`update`
            (2 for ``[batch, heads, seq, head_dim]``); what ``update`` returns uses the same layout.
        layer_num: number of attention layers (required).
    """

    is_compileable = False
    is_sep_cache = True  # marker the sepllm_gpt_neox model checks (copies of this class are distinct types)

    def __init__(self, init_cache_size: IntOrList = 4, sep_cache_size: IntOrList = 64,
                 local_size: IntOrList = 256, cache_size: IntOrList = 512, SEP_ACCUMULATION: bool = True,
                 USE_MAX_SEP_CACHE: bool = False, SEP_PADDING_IN_BATCH: bool = False,
                 separator_token_ids: Optional[Sequence[int]] = None, PADDING_ID: Optional[int] = None,
                 model_type: Optional[str] = None, APPLY_PE_SHIFT: bool = False, APPLY_PES_INSIDE: bool = True,
                 pe_dim: Optional[int] = None, partial_rotation_size: Optional[int] = None,
                 base: float = 10000.0, max_position_embeddings: Optional[int] = None,
                 k_seq_dim: int = 2, v_seq_dim: int = 2, layer_num: Optional[int] = None):
        if layer_num is None or int(layer_num) < 1:
            raise ValueError(f"SepCache: layer_num must be the number of layers (>= 1), got {layer_num!r}")
        layer_num = int(layer_num)
        for name, dim in (("k_seq_dim", k_seq_dim), ("v_seq_dim", v_seq_dim)):
            if int(dim) not in (1, 2, -2):
                raise ValueError(f"SepCache: {name}={dim} is not a sequence dimension of a 4D key/value tensor "
                                 f"(2 for [batch, heads, seq, head_dim], 1 for [batch, seq, heads, head_dim])")
        if model_type is not None:
            if model_type not in MODEL_TYPE_PRESETS:
                raise ValueError(f"SepCache: unknown model_type {model_type!r}; presets: "
                                 f"{sorted(MODEL_TYPE_PRESETS)} (or pass separator_token_ids and PADDING_ID)")
            preset = MODEL_TYPE_PRESETS[model_type]
            separator_token_ids = separator_token_ids if separator_token_ids is not None \
                else preset["separator_token_ids"]
            PADDING_ID = PADDING_ID if PADDING_ID is not None else preset["PADDING_ID"]
        if separator_token_ids is None:
            raise ValueError("SepCache: separator_token_ids is required (or pass model_type=...)")
        sizes = [_per_layer(n, v, layer_num) for n, v in (("init_cache_size", init_cache_size),
                                                            ("sep_cache_size", sep_cache_size),
                                                            ("local_size", local_size),
                                                            ("cache_size", cache_size))]
        for i, (a, s, w, c) in enumerate(zip(*sizes)):
            if min(a, s, w) < 0 or w < 1:
                raise ValueError(f"SepCache layer {i}: sizes must be >= 0 and local_size >= 1 "
                                 f"(init={a}, sep={s}, local={w})")
            if a + s + w >= c:
                raise ValueError(f"SepCache layer {i}: init_cache_size + sep_cache_size + local_size = "
                                 f"{a}+{s}+{w} = {a + s + w} must be < cache_size = {c}")
        super().__init__(layers=[SepCacheLayer(a, s, w, c) for a, s, w, c in zip(*sizes)])
        self.layer_num = layer_num
        self.uniform_sizes = len({tuple(x) for x in zip(*sizes)}) == 1
        self.separator_token_ids = [int(t) for t in separator_token_ids if int(t) >= 0]
        self.PADDING_ID = PADDING_ID
        self.SEP_ACCUMULATION = bool(SEP_ACCUMULATION)
        self.USE_MAX_SEP_CACHE = bool(USE_MAX_SEP_CACHE)
        self.SEP_PADDING_IN_BATCH = bool(SEP_PADDING_IN_BATCH)
        self.APPLY_PE_SHIFT = bool(APPLY_PE_SHIFT)
        self.APPLY_PES_INSIDE = bool(APPLY_PES_INSIDE)
        self.pe_dim = partial_rotation_size if partial_rotation_size is not None else pe_dim
        self.base = float(base)
        self.max_position_embeddings = max_position_embeddings
        # Rotations are computed per position on the fly (no table to size); the limit only bounds the slots.
        limit = max_position_embeddings
        if self.APPLY_PE_SHIFT and limit is not None and max(sizes[3]) > int(limit):
            raise ValueError(f"SepCache: cache_size {max(sizes[3])} exceeds max_position_embeddings "
                             f"{max_position_embeddings}: with APPLY_PE_SHIFT the slots are the positions")
        self.k_seq_dim, self.v_seq_dim = int(k_seq_dim) % 4, int(v_seq_dim) % 4
        self._ext_cos: Optional[torch.Tensor] = None  # external tables [P, r] (APPLY_PES_INSIDE=False)
        self._ext_sin: Optional[torch.Tensor] = None
        self._pad_offset = 0
        self.has_padding = False  # read from the prefill's mask (generate never pads later steps)
        self._seen = 0
        self._next_text_pos: Optional[torch.Tensor] = None  # [B] position of the next real token per row
        self._pending: Optional[dict] = None

    @classmethod
    def from_legacy_cache(cls, past_key_values=None, **kwargs) -> "SepCache":
        """The reference's deprecated spelling of the constructor; only an empty ``past_key_values``."""
        if past_key_values is not None:
            raise ValueError("SepCache.from_legacy_cache: past_key_values must be None (a SepCache cannot be "
                             "rebuilt from legacy tuples: their token ids are unknown)")
        return cls(**kwargs)

    # ------------------------------------------------------------------ configuration from a model
    @classmethod
    def from_model_config(cls, config, **kwargs) -> "SepCache":
        """Fills ``layer_num``, the rotary settings (pe_dim, base) and, where the config has them, the
        separators and padding id from an HF config (Llama, Mistral, Qwen2, GPT-NeoX, Falcon, sepllm_gpt_neox).

        A trained SepLLM export's own ``separator_token_ids`` / ``PADDING_ID`` come first, then the
        ``model_type`` preset; families without a preset (Mistral, Qwen2) need ``separator_token_ids``.
        """
        layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        pct = getattr(config, "rotary_pct", None) or rope.get("partial_rotary_factor", 1.0)
        base = getattr(config, "rotary_emb_base", None) or rope.get("rope_theta", 10000.0)
        if kwargs.get("APPLY_PE_SHIFT"):
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"SepCache: APPLY_PE_SHIFT rotates keys with plain RoPE (base^(-2i/d)); the "
                                 f"model's rope_type {rope_type!r} scales its frequencies")
            if getattr(config, "alibi", False) or getattr(config, "pos_emb", "rotary") == "alibi":
                raise ValueError("SepCache: APPLY_PE_SHIFT needs rotary positions; this model uses ALiBi")
        kwargs.setdefault("layer_num", layers)
        kwargs.setdefault("pe_dim", int(head_dim * pct))
        kwargs.setdefault("base", base)
        if "separator_token_ids" not in kwargs and "model_type" not in kwargs:
            trained = getattr(config, "separator_token_ids", None)
            if trained and list(trained) != [-1]:
                kwargs["separator_token_ids"] = list(trained)
                kwargs.setdefault("PADDING_ID", getattr(config, "PADDING_ID", None))
            elif getattr(config, "model_type", None) in MODEL_TYPE_PRESETS:
                preset = MODEL_TYPE_PRESETS[config.model_type]["separator_token_ids"]
                vocab = getattr(config, "vocab_size", None)
                if vocab is not None and max(preset) >= int(vocab):
                    raise ValueError(f"SepCache.from_model_config: the {config.model_type!r} separator preset is "
                                     f"for another tokenizer (id {max(preset)} >= vocab_size {vocab}); pass "
                                     f"separator_token_ids= (and PADDING_ID=) for this model's tokenizer")
                kwargs["model_type"] = config.model_type
            else:
                raise ValueError(f"SepCache.from_model_config: no separator preset for model_type "
                                 f"{getattr(config, 'model_type', None)!r}; pass separator_token_ids= (and "
                                 f"PADDING_ID=) for its tokenizer, e.g. tools/sepllm/get_separator_ids.py")
        return cls(**kwargs)

    # ------------------------------------------------------------------ statistics
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (what ``generate`` treats as the past length), not the physical length."""
        return self._seen

    def physical_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Slot of this step's first query. The mask builder asks first in a forward, so a stock model's step
        begins here: compression must precede the mask."""
        self._begin_step_from_forward()
        return self.physical_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        self._begin_step_from_forward()
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def kept_and_seen(self) -> List[tuple]:
        """Per layer ``(kept KV slots, tokens seen)`` (the reference's kept/seen statistics)."""
        return [(layer.length(), self._seen) for layer in self.layers]

    def kv_ratio(self) -> float:
        kept = sum(k for k, _ in self.kept_and_seen())
        seen = self._seen * self.layer_num
        return smoothed_ratio(kept, seen)

    # ------------------------------------------------------------------ the step protocol
    def _begin_step_from_forward(self) -> bool:
        if self._pending is not None:
            return True
        found = _forward_inputs_of(self)
        if found is None:
            return False
        module, input_ids = found["module"], found["input_ids"]
        if not self.uniform_sizes:
            raise ValueError("SepCache: a stock model builds one attention mask for every layer, so its SepCache "
                             "needs the same init_cache_size/sep_cache_size/local_size/cache_size in every layer "
                             "(per-layer lists are for the sepllm_gpt_neox export)")
        config = getattr(module, "config", None)
        if getattr(config, "alibi", False):
            raise ValueError("SepCache: Falcon with alibi=True builds its ALiBi bias over every seen token, which "
                             "a compressed cache no longer holds; use a rotary Falcon (alibi=False)")
        if input_ids is None:
            raise ValueError("SepCache needs the token ids of every step (separators are recognised by id); the "
                             "model was called with inputs_embeds only")
        mask = found["attention_mask"]
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("SepCache: a stock model needs a 2D padding attention_mask [batch, seen + new] (or "
                             f"none), got {type(mask).__name__} of shape {getattr(mask, 'shape', None)}")
        self.prepare_step(input_ids, mask, model_positions=found["position_ids"])
        return True

    def prepare_step(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None, prefill: Optional[bool] = None,
                     model_positions: Optional[torch.Tensor] = None) -> None:
        """Registers the ids of the coming forward and compresses layers that reach ``cache_size``.

        attention_mask: ``[B, q]`` for the new tokens, or the full ``[B, seen + q]`` mask (its tail is used).
        positions: ``[B, q]`` rotary / ALiBi positions of the new tokens when they are not text positions (e.g.
            BiPE inter-segment positions); stored as the keys' positions. Not with ``APPLY_PE_SHIFT``.
        prefill: the reference's ``PREFILLING_FLAG`` (a prefilling step never compresses); default: first step.
        model_positions: ``[B or 1, q]`` positions a stock model rotates the new tokens at (its own choice).
        """
        if input_ids is None:
            raise ValueError("SepCache needs input_ids for every step (separators are recognised by id)")
        bsz, q = input_ids.shape
        if q == 0:
            raise ValueError("SepCache.prepare_step: empty input_ids")
        if positions is not None:
            if self.APPLY_PE_SHIFT:
                raise ValueError("SepCache: explicit positions (e.g. BiPE) cannot be combined with APPLY_PE_SHIFT "
                                 "(PE shifting places keys at cache slots)")
            if tuple(positions.shape) != (bsz, q):
                raise ValueError(f"SepCache.prepare_step: positions must be [B, q] = {[bsz, q]}, got "
                                 f"{list(positions.shape)}")
        device = input_ids.device
        if attention_mask is not None:
            valid = attention_mask[:, -q:].to(device=device).bool()
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        first = self._seen == 0
        prefill = first if prefill is None else bool(prefill)
        if first:
            if attention_mask is not None:
                self._pad_offset = int((~valid).sum(dim=-1).max().item())
                self.has_padding = self._pad_offset > 0
            elif self.PADDING_ID is not None:
                self._pad_offset = int((input_ids == int(self.PADDING_ID)).sum(dim=-1).max().item())
            self._next_text_pos = torch.zeros(bsz, dtype=torch.long, device=device)
        if model_positions is not None:
            model_positions = model_positions.to(device=device, dtype=torch.long).expand(bsz, q)
        compressed = [] if prefill else self._compress_due_layers(q)
        text_pos = (self._next_text_pos.unsqueeze(-1) + torch.cumsum(valid.long(), -1) - 1).clamp(min=0)
        text_pos = torch.where(valid, text_pos, torch.ones_like(text_pos))
        self._next_text_pos = self._next_text_pos + valid.long().sum(-1)
        stream_pos = torch.arange(self._seen, self._seen + q, device=device).unsqueeze(0).expand(bsz, q)
        rot_pos = text_pos if positions is None else positions.to(device=device, dtype=torch.long)
        self._pending = {"ids": input_ids.long(), "valid": valid, "text_pos": text_pos, "rot_pos": rot_pos,
                         "stream_pos": stream_pos, "model_pos": model_positions, "done": set()}
        if self.APPLY_PE_SHIFT:
            for i in compressed:
                self._shift_keys(self.layers[i], self._pe_offset(i))

    def _compress_due_layers(self, incoming: int) -> List[int]:
        """Compresses every layer that a step of ``incoming`` tokens finds full (``cached + q >= c``); returns
        their indices (their keys are not re-rotated yet)."""
        compressed = []
        for i, layer in enumerate(self.layers):
            if layer.length() + incoming >= layer.cache_size:
                self._compress(layer, incoming)
                compressed.append(i)
        return compressed

    def compress_due(self, incoming: int = 1) -> List[int]:
        """Does now, outside a step, the compression a step of ``incoming`` tokens would do on arrival (the
        same layers, the same kept slots); PE-shifted keys move to their new slots, as for a caller that
        rotates at :meth:`step_positions`. The chunked streaming path calls it so that the following
        multi-token step fits without compressing. Returns the compressed layers."""
        if self._pending is not None:
            raise ValueError("SepCache.compress_due: a step is in progress (prepare_step was called)")
        compressed = self._compress_due_layers(int(incoming)) if self._seen > 0 else []
        if self.APPLY_PE_SHIFT:
            for i in compressed:
                self._shift_keys(self.layers[i], torch.zeros(1, 1, dtype=torch.long))
        return compressed

    def compress_all(self) -> None:
        """Compresses every holding layer now, with no token arriving: initial slots, separators and the newest
        ``local_size`` slots stay (PE-shifted keys move to their new slots). This is the state a cache that
        evicts after every step (StreamingLLM's) holds between steps; ``compressions`` is not counted."""
        if self._pending is not None:
            raise ValueError("SepCache.compress_all: a step is in progress (prepare_step was called)")
        for layer in self.layers:
            if layer.length() == 0:
                continue
            count = layer.compressions
            self._compress(layer, 0)
            layer.compressions = count
            if self.APPLY_PE_SHIFT:
                self._shift_keys(layer, torch.zeros(1, 1, dtype=torch.long))

    def _pe_offset(self, layer_idx: int) -> torch.Tensor:
        """``[B, 1]``: text position minus slot of this step's first new token, where a stock model rotates
        at its own positions; 0 when the caller rotates at :meth:`step_positions`."""
        model_pos = self._pending["model_pos"]
        if model_pos is None:
            return torch.zeros(1, 1, dtype=torch.long, device=self._pending["ids"].device)
        return model_pos[:, :1] - self.layers[layer_idx].length()

    def step_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Rotary positions ``[B, q]`` of the pending tokens in this layer (cache slots when PE shifting, else
        the positions given to :meth:`prepare_step`, by default text positions)."""
        pending = self._require_pending()
        if not self.APPLY_PE_SHIFT:
            return pending["rot_pos"]
        q = pending["ids"].shape[1]
        start = self.layers[layer_idx].length()
        pos = torch.arange(start, start + q, device=pending["ids"].device)
        return pos.unsqueeze(0).expand(pending["ids"].shape[0], q)

    def step_key_valid(self, layer_idx: int = 0) -> torch.Tensor:
        """``[B, L + q]`` bool: which keys of this step's attention are real tokens (not padding)."""
        pending = self._require_pending()
        layer = self.layers[layer_idx]
        if layer.length() == 0:
            return pending["valid"]
        return torch.cat([layer.valid, pending["valid"]], dim=-1)

    def _require_pending(self) -> dict:
        if self._pending is None:
            raise ValueError("SepCache: no token ids for this step; pass update(..., input_ids=...) or call "
                             "prepare_step(input_ids, attention_mask) before the forward")
        return self._pending

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Optional[int] = None,
               cache_kwargs: Optional[dict] = None, input_ids: Optional[torch.Tensor] = None,
               PREFILLING_FLAG: Optional[bool] = None, query_states: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, kwargs: Optional[dict] = None):
        """Appends this step's KVs of ``layer_idx``; returns the layer's kept KVs.

        The reference's form: ``update(key_states=, value_states=, input_ids=, layer_idx=, PREFILLING_FLAG=)``;
        with ``APPLY_PE_SHIFT`` also ``query_states=`` (un-rotated, like ``key_states``) and ``position_ids=``,
        returning ``(keys, values, rotated query)``. Stock models call ``update(k, v, layer_idx)`` (``kwargs`` is
        the model's pass-through dict, unused); their step's ids come from their forward.
        """
        if layer_idx is None:
            raise ValueError("SepCache.update: layer_idx is required")
        if not 0 <= int(layer_idx) < self.layer_num:
            raise ValueError(f"SepCache.update: layer_idx {layer_idx} outside 0..{self.layer_num - 1}")
        layer_idx = int(layer_idx)
        cache_kwargs = cache_kwargs or {}
        key_states = key_states.movedim(self.k_seq_dim, 2) if self.k_seq_dim != 2 else key_states
        value_states = value_states.movedim(self.v_seq_dim, 2) if self.v_seq_dim != 2 else value_states
        if input_ids is None:
            input_ids = cache_kwargs.get("input_ids")
        if input_ids is not None:
            if input_ids.dim() != 2 or tuple(input_ids.shape) != (key_states.shape[0], key_states.shape[2]):
                raise ValueError(f"SepCache.update: input_ids must be [batch, new tokens] = "
                                 f"{[key_states.shape[0], key_states.shape[2]]}, got {list(input_ids.shape)}")
            if self._pending is None:
                self.prepare_step(input_ids, cache_kwargs.get("attention_mask"), prefill=PREFILLING_FLAG)
            elif not torch.equal(self._pending["ids"], input_ids.to(self._pending["ids"].device).long()):
                raise ValueError(f"SepCache.update: layer {layer_idx} got other input_ids than this step's "
                                 f"first layer")
        else:
            self._begin_step_from_forward()
        pending = self._require_pending()
        if key_states.shape[2] != pending["ids"].shape[1]:
            raise ValueError(f"SepCache.update: {key_states.shape[2]} new keys but this step has "
                             f"{pending['ids'].shape[1]} token ids")
        if cache_kwargs.get("cos") is not None and not self.APPLY_PES_INSIDE:
            self._ext_cos, self._ext_sin = cache_kwargs["cos"], cache_kwargs["sin"]
        if layer_idx in pending["done"]:
            raise ValueError(f"SepCache: layer {layer_idx} updated twice in one step; call prepare_step first")
        layer = self.layers[layer_idx]
        rot = self.step_positions(layer_idx)
        if pending["model_pos"] is not None and not self.APPLY_PE_SHIFT:
            rot = pending["model_pos"]
        elif pending["model_pos"] is not None:
            rot = rot + self._pe_offset(layer_idx)
        if cache_kwargs.get("partial_rotation_size"):
            self.pe_dim = int(cache_kwargs["partial_rotation_size"])
        elif self.pe_dim is None:
            self.pe_dim = key_states.shape[-1]  # no pe_dim given: the whole head is rotary
        query_out = None
        if query_states is not None:
            if not self.APPLY_PE_SHIFT:
                raise ValueError("SepCache.update: query_states is only taken with APPLY_PE_SHIFT=True (the cache "
                                 "then rotates the query and the new keys at their cache slots)")
            if position_ids is not None and tuple(position_ids.shape)[-1] != key_states.shape[2]:
                raise ValueError(f"SepCache.update: position_ids must be [batch, {key_states.shape[2]}], got "
                                 f"{list(position_ids.shape)}")
            rot_dim = self.pe_dim
            q_in = query_states.movedim(self.k_seq_dim, 2) if self.k_seq_dim != 2 else query_states
            cos, sin = self._cos_sin(rot, rot_dim)
            key_states = apply_rotary(key_states, cos, sin)
            if cache_kwargs.get("cos_q") is not None:  # the caller's own query tables [B or 1, q, r]
                cos, sin = cache_kwargs["cos_q"], cache_kwargs["sin_q"]
                cos, sin = (t if t.dim() == 3 else t.unsqueeze(0) for t in (cos, sin))
            query_out = apply_rotary(q_in, cos, sin)
            if self.k_seq_dim != 2:
                query_out = query_out.movedim(2, self.k_seq_dim)
        layer.append(key_states, value_states, pending["ids"], pending["valid"], rot, pending["text_pos"],
                     pending["stream_pos"])
        pending["done"].add(layer_idx)
        if len(pending["done"]) == self.layer_num:
            self._seen += pending["ids"].shape[1]
            self._pending = None
        keys = layer.keys if self.k_seq_dim == 2 else layer.keys.movedim(2, self.k_seq_dim)
        values = layer.values if self.v_seq_dim == 2 else layer.values.movedim(2, self.v_seq_dim)
        if query_out is not None:
            return keys, values, query_out
        return keys, values

    # ------------------------------------------------------------------ compression
    def keep_index(self, layer: SepCacheLayer, incoming: int = 0):
        """``(slots [B, L'], separator count)`` a compression of ``layer`` keeps before ``incoming`` new tokens
        arrive: initial, separators, the newest ``local_size - incoming`` slots, in slot order."""
        bsz, length = layer.ids.shape
        device = layer.ids.device
        init_end = min(layer.init_size + self._pad_offset, length)
        if layer.init_size + layer.sep_size + layer.local_size + self._pad_offset >= layer.base_cache_size:
            raise ValueError(f"SepCache: init_cache_size + sep_cache_size + local_size + padding offset = "
                             f"{layer.init_size}+{layer.sep_size}+{layer.local_size}+{self._pad_offset} must be "
                             f"< cache_size = {layer.base_cache_size}")
        sep_end = min(init_end + layer.sep_len, length)
        local = max(layer.local_size - incoming, 0)
        local_start = max(length - local, sep_end)
        arange = torch.arange(length, device=device)
        # The rule's predicate with slots as positions, seen from the newest slot of the step: initial slots,
        # separators, and the local window (the rule's window W - E covers slots past ``local_start``).
        last = torch.full((1, 1), length - 1 + incoming, device=device)
        init_k = is_initial(arange.view(1, -1), 0, init_end)
        sep_k = separator_flags(layer.ids, self.separator_token_ids) & layer.valid
        window = length + incoming - local_start
        kept = visible(last, arange.view(1, -1), init_k, sep_k, window, exclude_diagonal=True)
        # Separators the rule keeps in the past window are the new harvest, aligned across rows.
        past = (arange >= sep_end) & (arange < local_start)
        is_new_sep = kept & past.unsqueeze(0)
        counts = is_new_sep.sum(-1)
        if self.SEP_PADDING_IN_BATCH:
            n_new = int(counts.max().item()) if bsz else 0
            # Fill short rows with the newest non-separator tokens of their past window.
            filler_rank = torch.cumsum((past.unsqueeze(0) & ~is_new_sep).flip(-1).long(), -1).flip(-1)
            need = (n_new - counts).unsqueeze(-1)
            chosen = is_new_sep | (past.unsqueeze(0) & ~is_new_sep & (filler_rank <= need))
        else:
            n_new = int(counts.min().item()) if bsz else 0
            rank = torch.cumsum(is_new_sep.long(), -1)
            chosen = is_new_sep & (rank <= n_new)  # each row's oldest n_new separators
        # Slot order of the chosen ones: sort by (not chosen, slot) keeps slot order.
        new_idx = torch.sort(torch.where(chosen, arange.unsqueeze(0), arange.unsqueeze(0) + length), -1)
        new_idx = new_idx.values[:, :n_new]
        old_idx = arange[init_end:sep_end].unsqueeze(0).expand(bsz, -1)
        sep_idx = torch.cat([old_idx, new_idx], -1) if self.SEP_ACCUMULATION else new_idx
        if self.USE_MAX_SEP_CACHE and sep_idx.shape[1] > layer.sep_size:
            sep_idx = sep_idx[:, sep_idx.shape[1] - layer.sep_size:]  # keep the most recent s
        init_idx = arange[:init_end].unsqueeze(0).expand(bsz, -1)
        local_idx = arange[local_start:].unsqueeze(0).expand(bsz, -1)
        return torch.cat([init_idx, sep_idx, local_idx], -1), sep_idx.shape[1]

    def _compress(self, layer: SepCacheLayer, incoming: int = 0) -> None:
        index, sep_len = self.keep_index(layer, incoming)
        layer.gather(index)
        layer.sep_len = sep_len
        layer.compressions += 1
        if not self.USE_MAX_SEP_CACHE and sep_len > layer.sep_size:
            # The separator region outgrew s: the budget grows with it (reference behaviour).
            layer.cache_size = layer.base_cache_size + sep_len - layer.sep_size

    def _cos_sin(self, positions: torch.Tensor, rot_dim: Optional[int] = None):
        """cos/sin ``[B, L, r]`` for integer (possibly negative) positions, from the cache's own frequencies or
        the caller's tables."""
        if self.APPLY_PES_INSIDE:
            inv_freq = rope_inv_freq(int(rot_dim or self.pe_dim), self.base, positions.device)
            return rope_cos_sin(positions, inv_freq)
        if self._ext_cos is None:
            raise ValueError("SepCache: APPLY_PES_INSIDE=False needs cache_kwargs['cos'] and ['sin'] tables "
                             "[positions, rot_dim] passed to update()")
        table_cos = self._ext_cos.reshape(-1, self._ext_cos.shape[-1])
        table_sin = self._ext_sin.reshape(-1, self._ext_sin.shape[-1])
        cos = table_cos[positions.abs()].float()
        sin = table_sin[positions.abs()].float() * torch.sign(positions).unsqueeze(-1).float()
        return cos, sin

    def _shift_keys(self, layer: SepCacheLayer, offset: torch.Tensor) -> None:
        """Re-rotates every kept key from the position it was rotated at to ``slot + offset``."""
        bsz, length = layer.ids.shape
        target = torch.arange(length, device=layer.ids.device).unsqueeze(0) + offset.to(layer.ids.device)
        target = target.expand(bsz, -1)
        delta = target - layer.rot_pos
        cos, sin = self._cos_sin(delta)
        layer.set_keys(apply_rotary(layer.keys, cos, sin))
        layer.set_rot_pos(target)
