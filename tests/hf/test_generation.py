"""Generation: SepCache that never compresses == full cache (stock GPTNeoX and the export), decode masks of
the export equal its prefill mask, left padding, compression keeps memory bounded."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

from megatron.hf.sep_cache import SepCache
from tests.hf.helpers import SEPS, base_config, make_export, random_ids


@pytest.fixture(scope="module")
def exports(tmp_path_factory, pythia_tokenizer_path):
    tmp = tmp_path_factory.mktemp("gen")
    full = base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True)
    _, neox = make_export(tmp / "neox", full, "neox")
    _, sep_full = make_export(tmp / "sepfull", full, "sepllm_gpt_neox")
    sep = base_config(pythia_tokenizer_path, separator_token_ids=SEPS, prefill_local_window_size=4,
                      generate_local_window_size=4, BATCH_ADAPTIVE_INIT_POS=True)
    _, sepllm = make_export(tmp / "sep", sep, "sepllm_gpt_neox")
    return {"neox": neox, "sep_full": sep_full, "sepllm": sepllm}


def _greedy(model, ids, mask=None, cache=None, n=12):
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=0)
    if mask is not None:
        kwargs["attention_mask"] = mask
    if cache is not None:
        kwargs["cache"] = cache
    return model.generate(ids, **kwargs)


def _left_padded():
    ids = random_ids(2, 10, seed=5)
    ids[0, :3] = 0  # Pythia PADDING_ID
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def test_stock_gpt_neox_sep_cache_never_compressing_equals_full(exports):
    model = GPTNeoXForCausalLM.from_pretrained(exports["neox"], attn_implementation="eager").eval()
    ids, mask = _left_padded()
    ref = _greedy(model, ids, mask)
    cache = SepCache.from_model_config(model.config, cache_size=10_000, separator_token_ids=SEPS, PADDING_ID=0)
    got = _greedy(model, ids, mask, cache)
    assert torch.equal(got, ref)
    assert cache.layers[0].compressions == 0 and cache.get_seq_length() == ref.shape[1] - 1


def test_stock_gpt_neox_sep_cache_compresses_and_stays_bounded(exports):
    model = GPTNeoXForCausalLM.from_pretrained(exports["neox"], attn_implementation="eager").eval()
    ids = random_ids(1, 12, seed=6)
    cache = SepCache.from_model_config(model.config, init_cache_size=2, sep_cache_size=3, local_size=4,
                                       cache_size=12, USE_MAX_SEP_CACHE=True, APPLY_PE_SHIFT=True,
                                       separator_token_ids=SEPS, PADDING_ID=0)
    out = _greedy(model, ids, cache=cache, n=30)
    assert out.shape[1] == 42
    assert cache.layers[0].compressions >= 3
    assert all(layer.length() <= 12 for layer in cache.layers)
    assert cache.kv_ratio() < 0.35


def test_export_sep_cache_never_compressing_equals_full(exports):
    model = AutoModelForCausalLM.from_pretrained(exports["sep_full"], trust_remote_code=True).eval()
    ids, mask = _left_padded()
    ref = _greedy(model, ids, mask)
    cache = SepCache.from_model_config(model.config, cache_size=10_000, separator_token_ids=SEPS, PADDING_ID=0)
    got = _greedy(model, ids, mask, cache)
    assert torch.equal(got, ref)


def test_export_decode_steps_match_prefill_mask_with_left_padding(exports):
    """Cached decoding (decode mask, padding respected) gives the logits of one forward over everything."""
    model = AutoModelForCausalLM.from_pretrained(exports["sepllm"], trust_remote_code=True).eval()
    ids, mask = _left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], -1)
    with torch.no_grad():
        # one forward: the prefill mask with window 4 == the decode mask with window 4 (E = 1)
        logits = model(seq, attention_mask=full_mask, use_cache=False).logits
    for step, scores in enumerate(out.scores):
        pos = ids.shape[1] - 1 + step
        assert torch.allclose(scores, logits[:, pos], atol=1e-4)
    # the sparse decode masks do change the result compared with full attention
    model.config.USE_ORIGINAL_FULL_ATTEN = True
    with torch.no_grad():
        dense = model(seq, attention_mask=full_mask, use_cache=False).logits
    assert (dense[:, -1] - logits[:, -1]).abs().max() > 1e-3


def test_print_kv_ratio(exports, capsys):
    """PRINT_KV_RATIO prints the last-row kept/total KV of a window-4 model: a + separators + 4 of 40 keys."""
    model = AutoModelForCausalLM.from_pretrained(exports["sepllm"], trust_remote_code=True).eval()
    model.config.PRINT_KV_RATIO, model.config.print_ratio_intervals = True, 1
    ids = random_ids(1, 40, seed=8)
    with torch.no_grad():
        model(ids, use_cache=False)
    line = [l for l in capsys.readouterr().out.splitlines() if "Kept/Total" in l][-1]
    from megatron.model.sepllm.rule import separator_flags

    flags = separator_flags(ids, SEPS)[0]
    expected = int((flags[:36] | (torch.arange(36) < 3)).sum()) + 4
    assert f"({2 * expected}, 80)" in line


def test_sep_cache_on_a_trained_sepllm_export_keeps_the_trained_pattern(exports):
    """Window-4 SepLLM export: inside a SepCache that never compresses the trained rule (initial tokens,
    separators, window 4, left padding) still applies, so scores equal the model's own cache's; a compressing
    cache keeps at most cache_size slots."""
    model = AutoModelForCausalLM.from_pretrained(exports["sepllm"], trust_remote_code=True).eval()
    ids, mask = _left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        own = model.generate(ids, **kwargs)
        cache = SepCache.from_model_config(model.config, cache_size=10_000)
        assert cache.separator_token_ids == SEPS  # the export's trained separators, not the preset's 20
        got = model.generate(ids, cache=cache, **kwargs)
    assert torch.equal(got.sequences, own.sequences)
    for a, b in zip(got.scores, own.scores):
        assert torch.allclose(a, b, atol=1e-5)
    small = SepCache.from_model_config(model.config, init_cache_size=3, sep_cache_size=8, local_size=6,
                                       cache_size=24, USE_MAX_SEP_CACHE=True)
    with torch.no_grad():
        model.generate(ids, cache=small, **kwargs)
    assert small.layers[0].compressions >= 2 and all(layer.length() < 24 for layer in small.layers)


def test_export_refuses_position_ids_it_would_not_read(exports):
    """Positions come from the padding mask and the cache: explicit position_ids are refused by name, and
    generate (which builds position_ids only for a forward that takes them) passes none."""
    model = AutoModelForCausalLM.from_pretrained(exports["sepllm"], trust_remote_code=True).eval()
    ids = random_ids(1, 8, seed=9)
    with pytest.raises(ValueError, match="do not pass position_ids"), torch.no_grad():
        model(ids, position_ids=torch.arange(8).unsqueeze(0) + 5)
    with pytest.raises(ValueError, match="do not pass position_ids"), torch.no_grad():
        model.gpt_neox(ids, position_ids=torch.arange(8).unsqueeze(0))
    assert _greedy(model, ids, n=3).shape == (1, 11)
