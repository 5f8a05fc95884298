"""SepCache with BiPE exports (rotary and ALiBi inter-segment positions, learned intra table): a SepCache that
never compresses generates what the full cache generates; after compressions the positions fed for new tokens
(and kept with the keys) are those of ``rule.bipe_positions`` over the whole uncompressed history; PE shifting
with BiPE is rejected."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron.hf.sep_cache import SepCache
from megatron.model.sepllm.rule import bipe_positions
from tests.hf.helpers import SEPS, base_config, make_export, random_ids

BIPE = dict(USE_BiPE=True, BiPE_seps=SEPS, separator_token_ids=SEPS, prefill_local_window_size=64,
            generate_local_window_size=64)  # windows >= length: plain causal, so the caches must agree


@pytest.fixture(scope="module")
def bipe_models(tmp_path_factory, pythia_tokenizer_path):
    tmp = tmp_path_factory.mktemp("bipe_sepcache")
    models = {}
    for name, extra in (("rotary", {}), ("alibi", {"pos_emb": "alibi"})):
        _, out = make_export(tmp / name, base_config(pythia_tokenizer_path, **BIPE, **extra), "sepllm_gpt_neox")
        models[name] = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return models


def _record_positions(model):
    """Wraps the model's per-forward metadata to record the positions fed for each step's new tokens."""
    inner = model.gpt_neox
    original = inner._step_meta
    seen = {"inter": [], "intra": []}

    def wrapped(*args, **kwargs):
        meta = original(*args, **kwargs)
        seen["inter"].append(meta.rope_pos.clone())
        seen["intra"].append(meta.embed_pos.clone())
        return meta

    inner._step_meta = wrapped
    return seen, lambda: setattr(inner, "_step_meta", original)


def _small_cache(model, **kwargs):
    return SepCache.from_model_config(model.config, init_cache_size=2, sep_cache_size=3, local_size=4,
                                      cache_size=12, separator_token_ids=SEPS, PADDING_ID=0, **kwargs)


@pytest.mark.parametrize("pe", ["rotary", "alibi"])
def test_never_compressing_sep_cache_equals_full_cache(bipe_models, pe):
    model = bipe_models[pe]
    ids = random_ids(2, 10, seed=5)
    ids[0, :3] = 0  # left padding in row 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    cache = SepCache.from_model_config(model.config, cache_size=10_000, separator_token_ids=SEPS, PADDING_ID=0)
    got = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-5)
    assert cache.layers[0].compressions == 0


@pytest.mark.parametrize("pe", ["rotary", "alibi"])
def test_positions_after_compression_equal_uncompressed_history(bipe_models, pe):
    model = bipe_models[pe]
    ids = random_ids(2, 8, seed=9, sep_rate=0.3)
    cache = _small_cache(model)
    seen, restore = _record_positions(model)
    try:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    finally:
        restore()
    assert cache.layers[0].compressions >= 3
    assert all(layer.length() <= layer.cache_size for layer in cache.layers)
    fed = out[:, :-1]  # every token that went through the model
    intra, inter = bipe_positions(fed, SEPS)
    assert int(inter[:, -1].min()) > 0  # the history really has separators
    assert torch.equal(torch.cat(seen["inter"], -1), inter)
    assert torch.equal(torch.cat(seen["intra"], -1), intra)
    for layer in cache.layers:  # kept keys keep the (inter) positions they were rotated / biased with
        assert torch.equal(layer.rot_pos, torch.gather(inter, 1, layer.text_pos))


def test_positions_by_hand_with_compression(bipe_models):
    model = bipe_models["rotary"]
    cache = SepCache.from_model_config(model.config, init_cache_size=1, sep_cache_size=1, local_size=2,
                                       cache_size=5, separator_token_ids=SEPS, PADDING_ID=0)
    tokens = [5, 15, 6, 7, 13, 8, 9, 15, 10, 11, 12]  # 15 and 13 are separators
    inter = [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # separators strictly before
    intra = [0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2]  # offset after the last separator strictly before
    ref_intra, ref_inter = bipe_positions(torch.tensor([tokens]), SEPS)
    assert ref_intra.tolist() == [intra] and ref_inter.tolist() == [inter]
    seen, restore = _record_positions(model)
    try:
        with torch.no_grad():
            model(torch.tensor([tokens[:4]]), past_key_values=cache, use_cache=True)
            for tok in tokens[4:]:
                model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
    finally:
        restore()
    assert cache.layers[0].compressions >= 2
    assert torch.cat(seen["inter"], -1).tolist() == [inter]
    assert torch.cat(seen["intra"], -1).tolist() == [intra]
    kept = cache.layers[0].text_pos[0].tolist()
    assert 0 not in kept[1:] and len(kept) < len(tokens)  # evicted tokens are gone
    assert cache.layers[0].rot_pos[0].tolist() == [inter[t] for t in kept]


def test_pe_shift_with_bipe_is_rejected(bipe_models):
    model = bipe_models["rotary"]
    cache = _small_cache(model, APPLY_PE_SHIFT=True)
    with pytest.raises(ValueError, match="APPLY_PE_SHIFT.*USE_BiPE"):
        model.generate(random_ids(1, 6), past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    bare = SepCache(init_cache_size=1, sep_cache_size=1, local_size=2, cache_size=5, separator_token_ids=SEPS,
                    APPLY_PE_SHIFT=True, pe_dim=4, layer_num=1)
    with pytest.raises(ValueError, match="APPLY_PE_SHIFT"):
        bare.prepare_step(torch.tensor([[1, 2]]), positions=torch.tensor([[0, 0]]))
