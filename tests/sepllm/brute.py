"""Brute-force twins of the SepLLM rule, written from the reference text (loops, no shared code)."""
import math

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


def fixed_kept(k, start, interval):
    """FixLLM's kept key (SEPLLM_REFERENCE.md section 12.6): every interval-th token from the row's start."""
    return k >= start and (k - start + 1) % interval == 0


def row_start(row, adaptive, seq):
    """The row's first initial-token position: its padding count (clamped into the row) when adaptive."""
    return min(sum(1 for t in row if t == PAD), seq - 1) if adaptive else 0


def prefill_mask(ids, num_init, window, exclude_diagonal=True, seps=SEPS, adaptive=False, interval=None):
    """``[B, S, S]`` allowed-mask by loops over the predicate of section 3.3; ``interval`` replaces the
    separators by FixLLM's fixed-interval tokens."""
    bsz, seq = ids.shape
    rows = ids.tolist()
    e = int(exclude_diagonal)
    out = torch.zeros(bsz, seq, seq, dtype=torch.bool)
    for b in range(bsz):
        inits = init_positions(rows[b], num_init, adaptive, rows, seq)
        start = row_start(rows[b], adaptive, seq)
        for q in range(seq):
            for k in range(q + 1):
                middle = fixed_kept(k, start, interval) if interval else rows[b][k] in seps
                out[b, q, k] = (k in inits) or middle or (q - k <= window - e)
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


# A tiny model in SepLLM kernel mode; every SepLLM/SA key keeps its declared (the reference's) default.
BASE = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=64, padded_vocab_size=128,
            pos_emb="rotary", attention_dropout=0.0, separator_token_ids=list(SEPS))


def args(**overrides):
    """The resolved configuration (``NeoXArgs``, derived and validated) of BASE with ``overrides``."""
    from megatron.neox_arguments import Environment, NeoXArgs

    return NeoXArgs.from_dict({**BASE, **overrides}, env=Environment(cuda_device_count=0, environ={}))


def unvalidated(**overrides):
    """The resolved configuration of BASE, then ``overrides`` set as they are: the values the SepLLM
    checker itself is given to judge, before validation could refuse or rewrite them."""
    config = args()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise KeyError(f"{key!r} is not a configuration field")
        setattr(config, key, value)
    return config
