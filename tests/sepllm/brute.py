"""Brute-force twins of the SepLLM rule, written from the reference text (loops, no shared code)."""
import math
from types import SimpleNamespace

import torch

SEPS = [3, 7]  # separator ids used by the random property tests
PAD = 0


def random_ids(bsz, seq, gen, vocab=12, pad_left=None):
    """Random ids in [1, vocab) with ~20% separators; optional left padding (list of pad counts per row)."""
    ids = torch.randint(1, vocab, (bsz, seq), generator=gen)
    if pad_left is not None:
        for b, n in enumerate(pad_left):
            ids[b, :n] = PAD
    return ids


def init_positions(ids_row_list, num_init, adaptive, all_rows, seq):
    """The reference's initial-token set of one row (section 3.5 clamp included)."""
    if not adaptive:
        return set(range(num_init))
    pads = [sum(1 for t in row if t == PAD) for row in all_rows]
    p = sum(1 for t in ids_row_list if t == PAD)
    positions = [p + i for i in range(num_init)]
    if max(pads) + num_init > seq:
        positions = [min(max(x, 0), seq - 1) for x in positions]
    return set(positions)


def prefill_mask(ids, num_init, window, exclude_diagonal=True, seps=SEPS, adaptive=False):
    """``[B, S, S]`` allowed-mask by loops over the predicate of section 3.3."""
    bsz, seq = ids.shape
    rows = ids.tolist()
    e = int(exclude_diagonal)
    out = torch.zeros(bsz, seq, seq, dtype=torch.bool)
    for b in range(bsz):
        inits = init_positions(rows[b], num_init, adaptive, rows, seq)
        for q in range(seq):
            for k in range(q + 1):
                out[b, q, k] = (k in inits) or (rows[b][k] in seps) or (q - k <= window - e)
    return out


def decode_row(ids, prefill_len, num_init, window, seps=SEPS, adaptive=False, key_valid=None):
    """``[B, T]`` allowed keys of the newest token (section 3.4), padding keys hidden (the fix)."""
    bsz, total = ids.shape
    rows = ids.tolist()
    prefill_rows = [r[:prefill_len] for r in rows]
    out = torch.zeros(bsz, total, dtype=torch.bool)
    for b in range(bsz):
        inits = init_positions(prefill_rows[b], num_init, adaptive, prefill_rows, prefill_len)
        for k in range(total):
            ok = (k in inits) or (rows[b][k] in seps) or (k >= total - window)
            if key_valid is not None and not bool(key_valid[b, k]) and k != total - 1:
                ok = False
            out[b, k] = ok
    return out


def bipe(ids, seps=SEPS):
    """(intra, inter) by loops, section 7."""
    bsz, seq = ids.shape
    intra = torch.zeros(bsz, seq, dtype=torch.long)
    inter = torch.zeros(bsz, seq, dtype=torch.long)
    for b in range(bsz):
        last, count = -1, 0
        for t in range(seq):
            inter[b, t] = count
            intra[b, t] = t - (last + 1)
            if int(ids[b, t]) in seps:
                last, count = t, count + 1
    return intra, inter


def attention(q, k, v, mask, bias=None):
    """float64 softmax attention over ``mask`` ([B, S, S] or [B, H, S, S]) with an optional bias."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    mask = mask if mask.dim() == 4 else mask.unsqueeze(1)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def alibi(slopes, pos):
    """``[B, H, S, S]`` bias ``-slope_h * (pos[q] - pos[k])`` by loops."""
    bsz, seq = pos.shape
    out = torch.zeros(bsz, len(slopes), seq, seq, dtype=torch.float64)
    for b in range(bsz):
        for h, s in enumerate(slopes):
            for i in range(seq):
                for j in range(seq):
                    out[b, h, i, j] = -s * (int(pos[b, i]) - int(pos[b, j]))
    return out


def args(**overrides):
    """A configuration object with the reference's defaults for the SepLLM/SA keys."""
    base = dict(
        num_layers=2, num_attention_heads=2, seq_length=64, pos_emb="rotary", rope_fusion=False,
        attention_dropout=0.0, separator_token_ids=list(SEPS), PADDING_ID=0, prefill_k=0, generate_k=0,
        prefill_local_window_size=256, generate_local_window_size=256,
        USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=False, USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS=False,
        prefill_loc_win_size_list=None, generate_win_loc_size_list=None, init_tok_max_idx=2,
        USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=True,
        RECOMPILE_SEP_ATTN_KERNEL=False, BATCH_ADAPTIVE_INIT_POS=False, PRINT_KV_RATIO=False,
        print_ratio_intervals=8000, USE_BiPE=False, BiPE_seps=None, EXCLUDE_DIAGONAL=True,
        _DEFAULT_SPARSE_BLOCK_SIZE=128, USE_SA_SOFTMAX=False, USE_SA_SOFTMAX_NO_DENO=False,
        SA_Numerator_Bias=0.0, SA_Denominator_Bias=1e-10, attention_config=None, rank=0,
    )
    base.update(overrides)
    return SimpleNamespace(**base)
