"""SepCache on stock Llama / Mistral / Qwen2 / GPT-NeoX / Falcon with no wrapper: a cache that never compresses
equals the full cache, compressed decoding equals a brute-force masked forward over the reference's selection,
PE shifting equals a forward over the kept tokens at slot positions, and the reference's update() API."""
import warnings

import pytest
import torch

from megatron.hf.sep_cache import SepCache, apply_rotary, rope_cos_sin, rope_inv_freq
from tests.hf import training_free_models as models

SEPS = [3, 5, 7]
VOCAB = 40


def family_config(name: str, layers: int = 2):
    return models.family_config(name, layers, vocab=VOCAB)


def tiny_model(name: str, impl: str = "eager", layers: int = 2):
    return models.tiny_model(name, impl, layers, vocab=VOCAB)


def ids_with_seps(bsz, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (bsz, seq), generator=g)
    seps = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (bsz, seq), generator=g)]
    return torch.where(torch.rand(bsz, seq, generator=g) < 0.3, seps, ids)


def greedy(model, ids, mask, n, cache=None):
    kwargs = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is the seed demo's spelling
        if cache is not None:
            kwargs["past_key_values"] = cache
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt_neox", "falcon"])
def test_generate_never_compressing_equals_full_and_compressing_stays_bounded(family, impl):
    model = tiny_model(family, impl)
    ids = ids_with_seps(2, 9, seed=1)
    ids[0, :2] = 0  # left padding
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        ref = greedy(model, ids, mask, 8)
        never = SepCache.from_model_config(model.config, cache_size=10_000, separator_token_ids=SEPS, PADDING_ID=0)
        assert torch.equal(greedy(model, ids, mask, 8, never), ref)
        assert never.get_seq_length() == ref.shape[1] - 1 and never.layers[0].compressions == 0
        small = SepCache.from_model_config(model.config, init_cache_size=2, sep_cache_size=2, local_size=3,
                                           cache_size=10, USE_MAX_SEP_CACHE=True, separator_token_ids=SEPS,
                                           PADDING_ID=0)
        out = greedy(model, ids, mask, 20, small)
    assert out.shape[1] == 29 and small.layers[0].compressions >= 5
    assert max(layer.length() for layer in small.layers) < 10


def reference_kept_sets(row, a, s, w, c, prefill):
    """Per step, the text positions the reference's SepCache (§12.3: append, then compress when cached + 1 >=
    c; USE_MAX_SEP_CACHE, accumulating) lets that step's query see; written without the cache's code."""
    kept, seps, sets = list(range(prefill)), [], {}
    for t in range(prefill, len(row)):
        full = len(kept) + 1 >= c
        kept.append(t)
        if full:
            past = kept[a + len(seps):len(kept) - w]
            seps = (seps + [i for i in past if row[i] in SEPS])[-s:]
            kept = kept[:a] + seps + kept[-w:]
        sets[t] = list(kept)
    return sets


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_compressed_decode_equals_brute_force_masked_forward(family):
    """After compression the stock model attends exactly to the reference's selection at text positions."""
    model = tiny_model(family, "eager")
    a, s, w, c, prefill = 2, 3, 4, 12, 5
    ids = ids_with_seps(1, 40, seed=3)
    cache = SepCache.from_model_config(model.config, init_cache_size=a, sep_cache_size=s, local_size=w,
                                       cache_size=c, USE_MAX_SEP_CACHE=True, separator_token_ids=SEPS)
    sets = reference_kept_sets(ids[0].tolist(), a, s, w, c, prefill)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits[0, -1]]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            assert cache.layers[0].text_pos[0].tolist() == sets[t]
            steps.append(out.logits[0, -1])
        # brute force: one forward over the whole text, row t seeing only sets[t] (causal rows before prefill)
        total = ids.shape[1]
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
        for t, kept in sets.items():
            allowed[t] = False
            allowed[t, kept] = True
        bias = torch.zeros(1, 1, total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
        full = model(input_ids=ids, attention_mask=bias).logits[0]
    assert cache.layers[0].compressions >= 5
    assert torch.allclose(torch.stack(steps), full[prefill - 1:], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_pe_shift_equals_a_forward_over_the_kept_tokens_at_slot_positions(family):
    """One layer: K/V depend only on the token and its rotary position, so with PE shifting the step's logits
    equal a plain forward over the kept tokens at positions 0..n-1. Holds both when the caller passes the
    cache's slots as position_ids and when the stock model rotates at its own text positions (generate)."""
    model = tiny_model(family, "eager", layers=1)
    ids = ids_with_seps(1, 30, seed=4)
    sizes = dict(init_cache_size=2, sep_cache_size=2, local_size=3, cache_size=9, USE_MAX_SEP_CACHE=True,
                 separator_token_ids=SEPS, APPLY_PE_SHIFT=True)
    given, own = (SepCache.from_model_config(model.config, **sizes) for _ in range(2))
    with torch.no_grad():
        for t in range(ids.shape[1]):
            tok = ids[:, t:t + 1] if t else ids[:, :1]
            given.prepare_step(tok)
            a = model(input_ids=tok, past_key_values=given, position_ids=given.step_positions(0)).logits[0, -1]
            b = model(input_ids=tok, past_key_values=own).logits[0, -1]
            kept = given.layers[0].text_pos[0]
            brute = model(input_ids=ids[:, kept], position_ids=torch.arange(kept.numel()).unsqueeze(0))
            assert torch.allclose(a, brute.logits[0, -1], atol=1e-5), t
            assert torch.allclose(b, brute.logits[0, -1], atol=1e-4), t
    assert given.layers[0].compressions >= 4 and own.layers[0].compressions == given.layers[0].compressions


def test_reference_update_api_pe_shift_form_and_layouts():
    """§12.5: keyword update with input_ids/PREFILLING_FLAG; the PE-shift form rotates keys and the query at
    their cache slots; k_seq_dim=1 stores the same; from_legacy_cache; partial_rotation_size."""
    torch.manual_seed(0)
    ids = ids_with_seps(1, 14, seed=5)
    raw_k, raw_v, raw_q = (torch.randn(1, 2, 14, 6) for _ in range(3))
    kw = dict(init_cache_size=1, sep_cache_size=2, local_size=3, cache_size=8, USE_MAX_SEP_CACHE=True,
              separator_token_ids=SEPS, PADDING_ID=0, APPLY_PE_SHIFT=True, layer_num=1)
    heads_first = SepCache.from_legacy_cache(None, **kw)
    seq_first = SepCache(k_seq_dim=1, v_seq_dim=1, **kw)
    inv = rope_inv_freq(4, 10000.0)
    for t in range(3, 15):
        start = 0 if t == 3 else t - 1
        sl = slice(start, t)
        k, v, q = heads_first.update(key_states=raw_k[:, :, sl], value_states=raw_v[:, :, sl],
                                     input_ids=ids[:, sl], layer_idx=0, PREFILLING_FLAG=t == 3,
                                     query_states=raw_q[:, :, sl], position_ids=torch.arange(start, t)[None],
                                     cache_kwargs={"partial_rotation_size": 4})
        k2, v2, q2 = seq_first.update(key_states=raw_k[:, :, sl].transpose(1, 2),
                                      value_states=raw_v[:, :, sl].transpose(1, 2), input_ids=ids[:, sl],
                                      layer_idx=0, PREFILLING_FLAG=t == 3,
                                      query_states=raw_q[:, :, sl].transpose(1, 2),
                                      cache_kwargs={"partial_rotation_size": 4})
        assert torch.allclose(k2.transpose(1, 2), k, atol=1e-6) and torch.equal(v2.transpose(1, 2), v)
        assert torch.allclose(q2.transpose(1, 2), q, atol=1e-6)
        kept = heads_first.layers[0].text_pos[0]
        slots = torch.arange(kept.numel()).unsqueeze(0)
        cos, sin = rope_cos_sin(slots, inv)
        assert torch.allclose(k, apply_rotary(raw_k[:, :, kept], cos, sin), atol=1e-5)
        assert torch.equal(v, raw_v[:, :, kept])
        n = t - start
        assert torch.allclose(q, apply_rotary(raw_q[:, :, sl], cos[:, -n:], sin[:, -n:]), atol=1e-5)
    assert heads_first.layers[0].compressions >= 3 and heads_first.get_seq_length() == 14


def test_reference_api_bad_calls_are_refused_by_name():
    cache = SepCache(init_cache_size=1, sep_cache_size=1, local_size=2, cache_size=6, separator_token_ids=SEPS,
                     layer_num=2)
    kv = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="input_ids must be"):
        cache.update(key_states=kv, value_states=kv, input_ids=torch.tensor([[1, 2, 3]]), layer_idx=0)
    cache.update(key_states=kv, value_states=kv, input_ids=torch.tensor([[1, 2]]), layer_idx=0)
    with pytest.raises(ValueError, match="other input_ids"):
        cache.update(key_states=kv, value_states=kv, input_ids=torch.tensor([[1, 9]]), layer_idx=1)
    with pytest.raises(ValueError, match="query_states is only taken with APPLY_PE_SHIFT"):
        cache.update(key_states=kv, value_states=kv, input_ids=torch.tensor([[1, 2]]), layer_idx=1,
                     query_states=kv)
    with pytest.raises(ValueError, match="layer_idx is required"):
        cache.update(kv, kv)
    with pytest.raises(ValueError, match="past_key_values must be None"):
        SepCache.from_legacy_cache(((kv, kv),), layer_num=1, model_type="llama")
    with pytest.raises(ValueError, match="k_seq_dim=3"):
        SepCache(k_seq_dim=3, layer_num=1, model_type="llama")
    for name in ("llama", "pythia", "falcon"):
        preset = SepCache(model_type=name, layer_num=1)
        assert preset.separator_token_ids and preset.PADDING_ID is not None


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_from_model_config_for_families_without_a_preset(family):
    config = family_config(family)
    cache = SepCache.from_model_config(config, separator_token_ids=SEPS, PADDING_ID=0)
    assert cache.layer_num == 2 and cache.pe_dim == 8 and cache.base == 10000.0
    with pytest.raises(ValueError, match=f"no separator preset for model_type '{family}'; pass separator_token_ids"):
        SepCache.from_model_config(config)
    model = tiny_model(family)
    with pytest.raises(ValueError, match="inputs_embeds only"), torch.no_grad():
        model(inputs_embeds=torch.zeros(1, 3, 32), past_key_values=cache)
    with pytest.raises(ValueError, match="'llama' separator preset is for another tokenizer"):
        SepCache.from_model_config(family_config("llama"))
    per_layer = SepCache.from_model_config(config, separator_token_ids=SEPS, local_size=[8, 16])
    with pytest.raises(ValueError, match="same init_cache_size/sep_cache_size/local_size/cache_size in every"), \
            torch.no_grad():
        model(input_ids=torch.tensor([[9, 10]]), past_key_values=per_layer)
