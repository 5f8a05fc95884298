"""The SepLLM visibility rule: the single source of truth for every attention path.

Key ``k`` is visible to query ``q`` iff::

    k <= q  and  ( k is an initial token  or  the token at k is a separator  or  q - k <= W - E )

with ``a = init_tok_max_idx + 1`` initial tokens (``0`` = none), the separator ids (``[-1]`` = none),
the local window ``W`` of the layer and ``E = int(EXCLUDE_DIAGONAL)``. ``W >= S`` gives plain causal
attention, which is how the H/HT/HMT layouts express their full-attention layers.

Initial tokens of a row are the positions ``init_start[b] .. init_start[b] + a - 1`` (``init_start`` is 0
unless ``BATCH_ADAPTIVE_INIT_POS`` places them after the row's padding, see :func:`adaptive_init_start`),
bounded above by ``init_limit`` (the prefill length, so decode-time keys are never initial tokens).

This module is pure torch and imports nothing from ``megatron``: the HuggingFace export copies it
verbatim next to its modeling code. The mask-based attention, the FlexAttention ``mask_mod``, the
Sep-Attention kernel's tests, the HF model and the KV statistics all use it or are tested against it.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch

IntOrTensor = Union[int, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The predicate, elementwise on index tensors
# --------------------------------------------------------------------------------------------------
def is_initial(k_idx, init_start, num_init: int, init_limit=None):
    """True where key position ``k_idx`` is one of the row's ``num_init`` initial tokens.

    ``init_start`` broadcasts against ``k_idx``; ``init_limit`` (optional) excludes keys at or beyond it.
    """
    inside = (k_idx >= init_start) & (k_idx < init_start + num_init)
    if init_limit is not None:
        inside = inside & (k_idx < init_limit)
    return inside


def visible(q_idx, k_idx, is_init_k, is_sep_k, window: IntOrTensor, exclude_diagonal: bool = True):
    """The SepLLM predicate on broadcastable index / flag tensors (works inside a FlexAttention mask_mod).

    ``is_init_k`` / ``is_sep_k``: boolean flags of the key position; ``window``: the layer's W (>= 1).
    """
    in_window = (q_idx - k_idx) <= (window - int(bool(exclude_diagonal)))
    return (k_idx <= q_idx) & (is_init_k | is_sep_k | in_window)


def make_mask_mod(sep_flags: torch.Tensor, init_start: torch.Tensor, num_init: int, window: int,
                  exclude_diagonal: bool = True):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for one layer, built from per-token flags.

    Every argument is bound at call time of this factory (no late-binding closure over a loop variable),
    so each layer's mask_mod evaluates that layer's own window. No ``B x S x S`` tensor is created.
    """
    window = int(window)
    num_init = int(num_init)
    exclude_diagonal = bool(exclude_diagonal)

    def mask_mod(b, h, q_idx, kv_idx):
        init_k = is_initial(kv_idx, init_start[b], num_init)
        return visible(q_idx, kv_idx, init_k, sep_flags[b, kv_idx], window, exclude_diagonal)

    return mask_mod


def sliding_window_mask(seq_q: int, seq_k: int, width: int, device=None) -> torch.Tensor:
    """``[Sq, Sk]`` bool: Mistral's sliding window (GPT-NeoX's ``sliding_window_width``) as this rule with no
    initial tokens, no separators, window ``width`` and the diagonal counted (``E = 0``): the newest ``seq_q``
    queries each see themselves and the ``width`` keys before them, as flash-attn's ``window_size=(width, -1)``."""
    q_idx = torch.arange(seq_k - seq_q, seq_k, device=device).view(-1, 1)
    k_idx = torch.arange(seq_k, device=device).view(1, -1)
    none = torch.zeros((), dtype=torch.bool, device=device)
    return visible(q_idx, k_idx, none, none, int(width), exclude_diagonal=False)


# --------------------------------------------------------------------------------------------------
# Dense masks (reference paths, tests, HF prefill and decode)
# --------------------------------------------------------------------------------------------------
def dense_mask(sep_flags: torch.Tensor, init_start: torch.Tensor, num_init: int, window: int,
               exclude_diagonal: bool = True, q_positions: Optional[torch.Tensor] = None,
               key_valid: Optional[torch.Tensor] = None,
               init_limit: Optional[IntOrTensor] = None,
               k_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean allowed-mask ``[B, Sq, Sk]`` (True = query may attend to key).

    sep_flags: ``[B, Sk]`` bool, the key token is a separator (or FixLLM's :func:`fixed_interval_flags`).
    init_start: ``[B]`` int64, first initial-token position per row.
    q_positions: absolute positions of the query rows, ``[Sq]`` or ``[B, Sq]``; default ``0..Sk-1`` (prefill).
        For a decode step pass ``[T-1]`` with ``exclude_diagonal=True`` (the newest ``W`` keys, self included).
    key_valid: ``[B, Sk]`` bool, False at padding keys; padding keys are never visible (except to the
        padding query itself on the diagonal, which keeps every row non-empty; those rows are ignored).
    init_limit: keys at or beyond it are never initial (the prefill length during decode).
    k_positions: absolute positions of the key columns, ``[Sk]``; default ``0..Sk-1``. A cache that holds a
        window of the history (a sliding-window layer) or more slots than tokens (a static cache) passes its
        own; keys beyond the newest query are hidden by causality.
    """
    bsz, sk = sep_flags.shape
    device = sep_flags.device
    k_idx = torch.arange(sk, device=device) if k_positions is None else k_positions.to(device=device,
                                                                                        dtype=torch.long)
    if q_positions is None:
        q_positions = k_idx
    q_idx = q_positions.to(device=device, dtype=torch.long)
    if q_idx.dim() == 1:
        q_idx = q_idx.unsqueeze(0).expand(bsz, -1)
    q_col = q_idx.unsqueeze(-1)  # [B, Sq, 1]
    k_row = k_idx.view(1, 1, sk)
    init_k = is_initial(k_row, init_start.view(bsz, 1, 1).to(device), num_init,
                        None if init_limit is None else _as_column(init_limit, bsz, device))
    allowed = visible(q_col, k_row, init_k, sep_flags.view(bsz, 1, sk), window, exclude_diagonal)
    if key_valid is not None:
        allowed = allowed & (key_valid.view(bsz, 1, sk) | (q_col == k_row))
    return allowed


def decode_mask(sep_flags: torch.Tensor, init_start: torch.Tensor, num_init: int, window: int,
                key_valid: Optional[torch.Tensor] = None,
                init_limit: Optional[IntOrTensor] = None) -> torch.Tensor:
    """Allowed-mask ``[B, 1, T]`` of one decode step whose query is the newest of ``T`` tokens.

    Visible: initial tokens, separators and the last ``window`` keys (``k >= T - window``, self included),
    and, unlike the reference, never a padding key (``key_valid``).
    """
    total = sep_flags.shape[1]
    q_pos = torch.arange(total - 1, total, device=sep_flags.device)  # made on the device: no host copy
    return dense_mask(sep_flags, init_start, num_init, window, True, q_pos, key_valid, init_limit)


def _as_column(value: IntOrTensor, bsz: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device).view(-1, 1, 1).expand(bsz, 1, 1)
    return torch.full((bsz, 1, 1), int(value), device=device, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Per-token metadata
# --------------------------------------------------------------------------------------------------
def attention_mode(cfg) -> str:
    """The attention rule that the reference's mode flags select, from an object with its key names (NeoXArgs or
    an HF config): ``full``, ``streamingllm``, ``fixllm``, ``sa_softmax`` or ``sepllm_mask``. The checker refuses
    more than one mode flag; this priority gives the same answer before and after its rewrites. (Training may run
    ``sepllm_mask`` with the Sep-Attention kernel: derivation's ``attention_variant`` says so.)"""
    if cfg.USE_ORIGINAL_FULL_ATTEN:
        return "full"
    if cfg.streamingLLM:
        return "streamingllm"
    if cfg.USE_FIXED_SEP_INTERVALs:
        return "fixllm"
    if cfg.USE_SA_SOFTMAX or cfg.USE_SA_SOFTMAX_NO_DENO:
        return "sa_softmax"
    return "sepllm_mask"


def keeps_separators(variant: str) -> bool:
    """Whether separator tokens are kept keys in ``variant`` (an :func:`attention_mode` or ``sep_kernel``): not in full attention (nothing to select), not in
    StreamingLLM (initial tokens and the window only) and not in FixLLM (fixed-interval tokens take their place)."""
    return variant not in ("full", "streamingllm", "fixllm")


def separator_flags(input_ids: torch.Tensor, separator_ids: Optional[Sequence[int]]) -> torch.Tensor:
    """``[B, S]`` bool: the token is one of ``separator_ids`` (``None`` / ``[-1]`` = no separators)."""
    ids = [int(t) for t in (separator_ids or []) if int(t) >= 0]
    if not ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    # Comparisons with Python scalars: a device table would cost a host-to-device copy, which synchronises
    # the stream, on every micro-batch.
    flags = input_ids == ids[0]
    for token in ids[1:]:
        flags = flags | (input_ids == token)
    return flags


def fixed_interval_flags(positions: torch.Tensor, init_start: torch.Tensor, interval: int) -> torch.Tensor:
    """FixLLM (``USE_FIXED_SEP_INTERVALs``): the keys kept in place of the separators, ``[B, S]`` bool.

    Key ``k`` is kept iff ``k >= init_start`` and ``(k - init_start + 1) % interval == 0``: every
    ``interval``-th token counted from the row's first initial token (the reference's code for FixLLM is not
    public; this is the project's definition). ``positions``: the keys' positions, ``[S]`` or ``[B, S]``;
    ``init_start``: ``[B]``. The result takes the place of :func:`separator_flags` in :func:`visible`.
    """
    interval = int(interval)
    if interval < 1:
        raise ValueError(f"a FixLLM interval must be >= 1, got {interval} (fixed_sep_intervals_list)")
    start = init_start.view(-1, 1).to(device=positions.device, dtype=torch.long)
    offset = positions.to(torch.long).view(1, -1) if positions.dim() == 1 else positions.to(torch.long)
    offset = offset - start + 1
    return (offset >= 1) & (offset % interval == 0)


def num_initial_tokens(init_tok_max_idx: int) -> int:
    """``a = init_tok_max_idx + 1`` (``-1`` keeps no initial token)."""
    return max(int(init_tok_max_idx) + 1, 0)


def adaptive_init_start(input_ids: torch.Tensor, padding_id: int) -> torch.Tensor:
    """``BATCH_ADAPTIVE_INIT_POS``: per row, the number of ``padding_id`` tokens (all occurrences).

    The reference clamps every initial position ``p_b + i`` to ``[0, S - 1]``; keys never exceed
    ``S - 1`` in prefill, so clamping the start to ``S - 1`` selects exactly the same key set.
    """
    seq = input_ids.shape[-1]
    count = (input_ids == int(padding_id)).sum(dim=-1)
    return count.clamp(max=max(seq - 1, 0)).long()


def bipe_positions(input_ids: torch.Tensor, seps: Optional[Sequence[int]],
                   offsets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BiPE bilevel positions ``(intra, inter)``, both ``[B, S]`` int64.

    inter[t]: number of separators strictly before t (a separator closes its segment).
    intra[t]: t - (p + 1), p = last separator strictly before t (first token of a segment has 0).
    ``offsets = (intra0, inter0)`` (each ``[B]``) continue a history: the positions the first token of
    ``input_ids`` would have had in the full sequence (see :func:`bipe_next_offsets`); default zeros.
    """
    bsz, seq = input_ids.shape
    device = input_ids.device
    is_sep = separator_flags(input_ids, seps).long()
    if offsets is None:
        intra0 = torch.zeros(bsz, dtype=torch.long, device=device)
        inter0 = torch.zeros(bsz, dtype=torch.long, device=device)
    else:
        intra0, inter0 = (o.to(device=device, dtype=torch.long).view(bsz) for o in offsets)
    before = torch.cumsum(is_sep, dim=-1) - is_sep  # exclusive prefix sum
    inter = inter0.unsqueeze(-1) + before
    t = torch.arange(seq, device=device).unsqueeze(0).expand(bsz, seq)
    sep_at = torch.where(is_sep.bool(), t, torch.full_like(t, -1))
    last_incl = torch.cummax(sep_at, dim=-1).values
    last_before = torch.cat([torch.full_like(t[:, :1], -1), last_incl[:, :-1]], dim=-1)
    intra = torch.where(last_before >= 0, t - (last_before + 1), intra0.unsqueeze(-1) + t)
    return intra, inter


def bipe_next_offsets(input_ids: torch.Tensor, seps: Optional[Sequence[int]], intra: torch.Tensor,
                      inter: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``offsets`` for the token that follows ``input_ids`` (whose positions are intra/inter)."""
    last_sep = separator_flags(input_ids[:, -1:], seps).squeeze(-1)
    next_inter = inter[:, -1] + last_sep.long()
    next_intra = torch.where(last_sep, torch.zeros_like(intra[:, -1]), intra[:, -1] + 1)
    return next_intra, next_inter


# --------------------------------------------------------------------------------------------------
# Windows per layer
# --------------------------------------------------------------------------------------------------
def select_window(layer_number: int, scalar_window: Optional[int], use_per_layer: bool,
                  per_layer: Optional[Sequence[int]], num_layers: Optional[int] = None) -> int:
    """The window of one (0-based) layer: the per-layer list entry when enabled, else the scalar."""
    if use_per_layer:
        if per_layer is None:
            raise ValueError("per-layer windows are enabled but the window list is None")
        if num_layers is not None and len(per_layer) != num_layers:
            raise ValueError(f"the per-layer window list has {len(per_layer)} entries, "
                             f"num_layers is {num_layers}")
        if not 0 <= layer_number < len(per_layer):
            raise ValueError(f"layer {layer_number} has no entry in the per-layer window list "
                             f"(length {len(per_layer)})")
        return int(per_layer[layer_number])
    if scalar_window is None:
        raise ValueError("the local window size is None")
    return int(scalar_window)


def layer_windows(args, num_layers: int, phase: str = "prefill") -> List[int]:
    """Windows of every layer from an object with the reference's key names (NeoXArgs or an HF config).

    ``phase``: ``"prefill"`` (training and prefill) or ``"generate"`` (decode steps).
    """
    if phase == "prefill":
        keys = ("prefill_local_window_size", "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS",
                "prefill_loc_win_size_list")
    elif phase == "generate":
        keys = ("generate_local_window_size", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
                "generate_win_loc_size_list")
    else:
        raise ValueError(f"phase must be 'prefill' or 'generate', got {phase!r}")
    scalar, flag, lst = (getattr(args, key) for key in keys)
    return [select_window(i, scalar, bool(flag), lst, num_layers) for i in range(num_layers)]


# --------------------------------------------------------------------------------------------------
# KV retention and attention-map density, in closed form
# --------------------------------------------------------------------------------------------------
def kept_counts(sep_flags: torch.Tensor, init_start: torch.Tensor, num_init: int, window: int,
                exclude_diagonal: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row ``[B]``: (KV entries the last query keeps, allowed entries of the whole S x S mask).

    Closed form, O(B*S): a key k that is initial or a separator is seen by all queries q in [k, S-1];
    any other key only by the ``W - E + 1`` queries of its window (fewer near the end).
    """
    bsz, seq = sep_flags.shape
    k_idx = torch.arange(seq, device=sep_flags.device).unsqueeze(0)
    special = is_initial(k_idx, init_start.view(bsz, 1), num_init) | sep_flags
    span = int(window) - int(bool(exclude_diagonal))
    last_row = (special | ((seq - 1 - k_idx) <= span)).sum(dim=-1)
    remaining = seq - k_idx  # queries at or after k
    per_key = torch.where(special, remaining, remaining.clamp(max=max(span + 1, 0)))
    return last_row, per_key.sum(dim=-1)


def kv_ratio_totals(batch: int, seq: int) -> Tuple[int, int]:
    """The reference's denominators: (B * Sk for the last row, B * (1 + Sk) * Sq / 2 for the map)."""
    return batch * seq, batch * (1 + seq) * seq // 2


def ratio(kept: float, total: float) -> float:
    """The reference's smoothed ratio ``(kept + 1e-6) / (total + 1e-6)``."""
    return (kept + 1e-6) / (total + 1e-6)
