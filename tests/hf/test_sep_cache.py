"""SepCache: kept tokens vs a brute-force selection, PE shifting by hand, generation equivalence, errors."""
import math

import pytest
import torch

from megatron.hf.sep_cache import SepCache, apply_rotary, rope_cos_sin, rope_inv_freq

SEP = [7, 8]


def brute_force(rows, a, s, w, c, accumulate, use_max, prefill, pad=0):
    """Pure-Python SepCache over ``rows`` (lists of ids): returns the text indices kept per row."""
    kept = [[] for _ in rows]
    sep_len, cap = 0, c
    total = len(rows[0])
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]
    for start, end in steps:
        q = end - start
        full = start > 0 and len(kept[0]) + q >= cap  # SEPLLM_REFERENCE.md §12.3: append, then compress
        for r in range(len(rows)):
            kept[r].extend(range(start, end))
        if full:
            init_end = a + pad
            new = []
            for r, row in enumerate(rows):
                past = kept[r][init_end + sep_len: len(kept[r]) - w]
                new.append([i for i in past if row[i] in SEP])
            n = min(len(x) for x in new)
            for r in range(len(rows)):
                old = kept[r][init_end:init_end + sep_len] if accumulate else []
                seps = old + new[r][:n]
                if use_max:
                    seps = seps[-s:] if s else []
                kept[r] = kept[r][:init_end] + seps + kept[r][-w:]
            sep_len = len(seps)
            if not use_max and sep_len > s:
                cap = c + sep_len - s
    return kept


def drive(cache, ids, prefill, layers=1, dim=4):
    """Feeds ``ids`` through ``cache`` (prefill then one token per step) with dummy KVs."""
    bsz, total = ids.shape
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]
    for start, end in steps:
        chunk = ids[:, start:end]
        cache.prepare_step(chunk)
        for layer in range(layers):
            kv = torch.randn(bsz, 1, end - start, dim)
            cache.update(kv, kv.clone(), layer)
        for layer in range(layers):
            assert cache.physical_length(layer) <= cache.layers[layer].cache_size or start == 0


@pytest.mark.parametrize("accumulate,use_max", [(True, True), (True, False), (False, True), (False, False)])
def test_kept_tokens_equal_brute_force(accumulate, use_max):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 12, (2, 90), generator=g)  # no PADDING_ID (0): no padding offset
    a, s, w, c = 2, 3, 4, 12
    cache = SepCache(init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c, SEP_ACCUMULATION=accumulate,
                     USE_MAX_SEP_CACHE=use_max, separator_token_ids=SEP, PADDING_ID=0, layer_num=1)
    drive(cache, ids, prefill=10)
    expected = brute_force(ids.tolist(), a, s, w, c, accumulate, use_max, prefill=10)
    got = cache.layers[0].text_pos.tolist()
    assert got == expected
    assert cache.layers[0].compressions > 3
    assert cache.get_seq_length() == 90
    kept, seen = cache.kept_and_seen()[0]
    assert kept == len(expected[0]) and seen == 90


def test_per_layer_sizes_and_sep_padding_in_batch():
    ids = torch.tensor([[1, 2, 3, 7, 4, 5, 6, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
                        [1, 2, 3, 7, 8, 7, 6, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]])
    cache = SepCache(init_cache_size=[1, 2], sep_cache_size=4, local_size=2, cache_size=[8, 9],
                     SEP_PADDING_IN_BATCH=True, separator_token_ids=SEP, layer_num=2)
    drive(cache, ids, prefill=8, layers=2)
    # layer 0 first compresses at token 8 (8 cached + 1 >= c): after appending it, the past window is slots
    # 1..6 (row 0 has one separator, row 1 three); row 0 is padded with the newest non-separators there.
    first = cache.layers[0].text_pos.tolist()
    assert [t for t in first[1] if ids[1, t] in SEP][:3] == [3, 4, 5]
    assert first[0][:4] == [0, 3, 5, 6]  # sep 3 plus fillers 5, 6 (newest in the past window)
    assert cache.physical_length(0) != cache.physical_length(1) or cache.layers[1].init_size == 2


def test_pe_shift_positions_by_hand():
    """Keys are rotated at their slot; after compression every kept key sits at 0..len-1."""
    rot_dim, base = 4, 100.0
    cache = SepCache(init_cache_size=1, sep_cache_size=1, local_size=2, cache_size=5, separator_token_ids=SEP,
                     APPLY_PE_SHIFT=True, pe_dim=rot_dim, base=base, USE_MAX_SEP_CACHE=True, layer_num=1)
    raw = torch.randn(1, 1, 7, 6)  # un-rotated keys of 7 tokens (6 dims, 4 rotated)
    ids = torch.tensor([[1, 2, 7, 3, 4, 5, 6]])
    inv = rope_inv_freq(rot_dim, base)
    for t in range(7):
        if t < 3:
            if t == 0:
                cache.prepare_step(ids[:, :3])
                pos = cache.step_positions(0)
                assert pos.tolist() == [[0, 1, 2]]
                cos, sin = rope_cos_sin(pos, inv)
                cache.update(apply_rotary(raw[:, :, :3], cos, sin), raw[:, :, :3], 0)
            continue
        cache.prepare_step(ids[:, t:t + 1])
        pos = cache.step_positions(0)
        cos, sin = rope_cos_sin(pos, inv)
        cache.update(apply_rotary(raw[:, :, t:t + 1], cos, sin), raw[:, :, t:t + 1], 0)
    # by hand (§12.3: a step that finds cached + 1 >= c appends, then compresses): a=1, s=1, w=2, c=5.
    # [0,1,2] +3; token 4 (4 cached): [0..4] -> init [0], separator 2 (id 7) of the past window [1,2],
    # local [3,4] => [0,2,3,4]; token 5: [0,2,3,4,5] -> past [3] has none => [0,2,4,5]; token 6 => [0,2,5,6]
    layer = cache.layers[0]
    assert layer.text_pos.tolist() == [[0, 2, 5, 6]]
    assert layer.rot_pos.tolist() == [[0, 1, 2, 3]]
    assert layer.compressions == 3
    cos, sin = rope_cos_sin(torch.arange(4).unsqueeze(0), inv)
    expected = apply_rotary(raw[:, :, [0, 2, 5, 6]], cos, sin)
    assert torch.allclose(layer.keys, expected, atol=1e-5)
    assert torch.equal(layer.values, raw[:, :, [0, 2, 5, 6]])


def test_external_cos_sin_tables_match_inside():
    rot_dim, base = 4, 50.0
    inv = rope_inv_freq(rot_dim, base)
    table_cos, table_sin = rope_cos_sin(torch.arange(64), inv)
    caches = [SepCache(init_cache_size=1, sep_cache_size=1, local_size=2, cache_size=5, separator_token_ids=SEP,
                       APPLY_PE_SHIFT=True, APPLY_PES_INSIDE=inside, partial_rotation_size=rot_dim, base=base,
                       layer_num=1) for inside in (True, False)]
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 12, 6)
    ids = torch.tensor([[1, 7, 2, 3, 8, 4, 5, 6, 7, 1, 2, 3]])
    for cache in caches:
        for t in range(12):
            cache.prepare_step(ids[:, t:t + 1])
            cache.update(keys[:, :, t:t + 1], keys[:, :, t:t + 1], 0, {"cos": table_cos, "sin": table_sin})
    assert torch.allclose(caches[0].layers[0].keys, caches[1].layers[0].keys, atol=1e-6)


def test_bad_sizes_and_missing_ids():
    with pytest.raises(ValueError, match="must be < cache_size = 10"):
        SepCache(init_cache_size=2, sep_cache_size=4, local_size=4, cache_size=10, separator_token_ids=SEP,
                 layer_num=1)
    with pytest.raises(ValueError, match="separator_token_ids is required"):
        SepCache(layer_num=1)
    with pytest.raises(ValueError, match="unknown model_type"):
        SepCache(model_type="bert", layer_num=1)
    cache = SepCache(model_type="pythia", layer_num=1)
    assert cache.PADDING_ID == 0 and 187 in cache.separator_token_ids
    with pytest.raises(ValueError, match="input_ids"):
        cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)
    padded = SepCache(init_cache_size=2, sep_cache_size=2, local_size=2, cache_size=8, separator_token_ids=SEP,
                      layer_num=1)
    padded.prepare_step(torch.tensor([[0, 0, 0, 1, 2]]), attention_mask=torch.tensor([[0, 0, 0, 1, 1]]))
    padded.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    with pytest.raises(ValueError, match="padding offset"):  # a + s + w + p = 2+2+2+3 >= 8
        for _ in range(4):
            padded.prepare_step(torch.tensor([[3]]))
            padded.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)
