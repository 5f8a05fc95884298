"""Mask-based training-free SepLLM / StreamingLLM / FixLLM on tiny stock models of every supported family:
logits equal a brute-force masked eager attention (loop-built masks fed to the stock model), decode steps equal one
forward over the whole sequence, USE_ORIGINAL_FULL_ATTEN is the stock model bit for bit."""
import pytest
import torch
from transformers import AttentionInterface

from megatron.hf.training_free import apply_sepllm, kv_ratio_printer, remove_sepllm
from tests.hf.training_free_models import (FAMILIES, PAD, additive, brute_mask, random_ids, sepllm_config,
                                           tiny_model)

SEQ = 18
MODES = {
    "sepllm": {},
    "streamingllm": {"streamingLLM": True, "separator_token_ids": [-1]},
    "fixllm": {"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [3, 3]},
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_equal_brute_force(family, mode, impl, monkeypatch):
    """Left padding with BATCH_ADAPTIVE_INIT_POS in one row; padding keys hidden; logits of real tokens compared."""
    model = tiny_model(family, impl)
    # The same weights (same seed), stock attention. Stock Falcon with ALiBi differs between its own eager and sdpa
    # paths (eager adds the ALiBi bias twice), so that family's twin runs the implementation under test.
    brute_model = tiny_model(family, impl if family == "falcon_alibi" else "eager")
    ids = random_ids(2, SEQ, seed=3, pad_left=[0, 3])
    padding = (ids != PAD).long()
    cfg = sepllm_config(BATCH_ADAPTIVE_INIT_POS=True, **MODES[mode])
    allowed = additive(brute_mask(ids, 2, 4, mode=mode, adaptive=True, interval=3, valid=padding))
    brute_kwargs = {"attention_mask": allowed}
    if family == "falcon_alibi":
        # Falcon builds ALiBi from a 2D mask, so its 4D mask goes in where the model makes it; the model adds ALiBi.
        import transformers.models.falcon.modeling_falcon as falcon

        monkeypatch.setattr(falcon, "create_causal_mask", lambda *a, **k: allowed)
        brute_kwargs = {"attention_mask": padding}
    with torch.no_grad():
        expected = brute_model(ids, **brute_kwargs).logits
        monkeypatch.undo()
        apply_sepllm(model, cfg)
        got = model(ids, attention_mask=padding).logits
    real = padding.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


def _brute_attention(masks):
    """An eager attention over the per-layer loop masks ``masks[layer_idx]`` ``[B, S, S]`` (GQA repeated)."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask = masks[module.layer_idx][:, None]
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ key.transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_per_layer_windows_and_intervals_equal_brute_force(family):
    """Different windows per layer (the HT layout: full first and last layer) and FixLLM intervals per layer,
    against a brute-force attention registered through transformers' AttentionInterface."""
    layers = 3
    ids = random_ids(2, SEQ, seed=9)
    cases = [
        ("sepllm", dict(USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[64, 3, 64],
                        init_tok_max_idx=2), [(64, None), (3, None), (64, None)], 3),
        ("fixllm", dict(USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[2, 5, 4]),
         [(4, 2), (4, 5), (4, 4)], 2),
    ]
    for mode, overrides, per_layer, num_init in cases:
        masks = [brute_mask(ids, num_init, w, mode=mode, interval=i) for w, i in per_layer]
        name = f"brute_sepllm_{family}_{mode}"
        AttentionInterface.register(name, _brute_attention(masks))
        brute_model = tiny_model(family, "eager", layers=layers)
        brute_model.set_attn_implementation(name)
        model = tiny_model(family, "sdpa", layers=layers)
        with torch.no_grad():
            expected = brute_model(ids).logits
            apply_sepllm(model, sepllm_config(layers, **overrides))
            got = model(ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=mode)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_equal_one_forward_over_the_sequence(family, impl):
    """Prefill 10 tokens, then 6 single-token steps on the model's own cache (generate windows, initial tokens
    after left padding kept from the prefill): each step's logits equal the whole sequence's forward."""
    model = tiny_model(family, impl)
    ids = random_ids(2, 16, seed=5, pad_left=[2, 0])
    padding = (ids != PAD).long()
    apply_sepllm(model, sepllm_config(BATCH_ADAPTIVE_INIT_POS=True, prefill_local_window_size=3,
                                      generate_local_window_size=3))
    with torch.no_grad():
        whole = model(ids, attention_mask=padding).logits
        out = model(ids[:, :10], attention_mask=padding[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(10, 16):
            out = model(ids[:, t:t + 1], attention_mask=padding[:, :t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    real = padding.bool()
    torch.testing.assert_close(stepped[real], whole[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_generate_equals_greedy_recomputation(family):
    """generate() (its own cache, growing padding mask) picks the tokens a full forward per step would."""
    model = tiny_model(family, "sdpa")
    apply_sepllm(model, sepllm_config(prefill_local_window_size=3, generate_local_window_size=3))
    ids = random_ids(1, 9, seed=8)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
        seq = ids
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=-1)
    assert torch.equal(generated, seq)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_attention_config_is_the_stock_model_bit_for_bit(family, impl):
    model = tiny_model(family, impl)
    ids = random_ids(2, SEQ, seed=2, pad_left=[0, 2])
    padding = (ids != PAD).long()
    with torch.no_grad():
        stock = model(ids, attention_mask=padding).logits
        stock_gen = model.generate(ids, attention_mask=padding, max_new_tokens=4, do_sample=False, pad_token_id=0)
        apply_sepllm(model, sepllm_config(USE_ORIGINAL_FULL_ATTEN=True, separator_token_ids=[-1],
                                          BATCH_ADAPTIVE_INIT_POS=True, PRINT_KV_RATIO=True))
        assert torch.equal(model(ids, attention_mask=padding).logits, stock)
        assert torch.equal(model.generate(ids, attention_mask=padding, max_new_tokens=4, do_sample=False,
                                          pad_token_id=0), stock_gen)


def test_remove_restores_the_stock_model_and_reapplying_replaces():
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, SEQ, seed=4)
    with torch.no_grad():
        stock = model(ids).logits
        apply_sepllm(model, sepllm_config())
        apply_sepllm(model, sepllm_config(prefill_local_window_size=2))  # replaces, does not stack
        narrow = model(ids).logits
        remove_sepllm(model)
        assert torch.equal(model(ids).logits, stock)
        apply_sepllm(model, sepllm_config(prefill_local_window_size=2))
        assert torch.equal(model(ids).logits, narrow)


def test_kv_ratio_printed_every_interval_with_the_reference_counts(capsys):
    """PRINT_KV_RATIO: at every print_ratio_intervals-th prefill, four lines; the values are the loop masks' last
    rows and entries summed over layers, of the batches before that prefill (the reference's one-batch lag)."""
    model = tiny_model("qwen2", "sdpa")
    apply_sepllm(model, sepllm_config(PRINT_KV_RATIO=True, print_ratio_intervals=2))
    batches = [random_ids(2, SEQ, seed=s) for s in (11, 12, 13)]
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Kept/Total" in line]
    assert len(lines) == 4  # printed at the 2nd prefill only
    first = brute_mask(batches[0], 2, 4)
    kv_kept = 2 * int(first[:, -1, :].sum())  # two layers, one window
    map_kept = 2 * int(first.sum())
    assert f"for this batch: ({kv_kept}, {2 * 2 * SEQ})" in lines[0]
    assert f"for all the inputs: ({kv_kept}, {2 * 2 * SEQ})" in lines[1]
    assert f"entries for this batch: ({map_kept}, {2 * 2 * (1 + SEQ) * SEQ // 2})" in lines[2]
    summary = kv_ratio_printer(model).summary()  # all three batches, the current one included
    kept = sum(2 * int(brute_mask(ids, 2, 4)[:, -1, :].sum()) for ids in batches)
    assert summary["kv_kept"] == kept and summary["kv_total"] == 3 * 2 * 2 * SEQ


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_decode_steps_use_the_generate_window(family):
    """Prefill window 2, generate window 5: rows of the prefill use the first, rows of decode steps the second
    (the reference's decode rule keeps the newest W keys, the query included), against a loop-built mask."""
    model = tiny_model(family, "sdpa")
    brute_model = tiny_model(family, "eager")
    ids = random_ids(1, 14, seed=21)
    prefill, w_prefill, w_gen = 8, 2, 5
    rows_prefill = brute_mask(ids, 2, w_prefill)
    rows_generate = brute_mask(ids, 2, w_gen)
    allowed = torch.cat([rows_prefill[:, :prefill], rows_generate[:, prefill:]], dim=1)
    apply_sepllm(model, sepllm_config(prefill_local_window_size=w_prefill, generate_local_window_size=w_gen))
    with torch.no_grad():
        expected = brute_model(ids, attention_mask=additive(allowed)).logits
        out = model(ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)
