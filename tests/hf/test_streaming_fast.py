"""The chunked streaming path (megatron/hf/streaming_fast.py) against the token-by-token one: the NLL of every
token to fp32 tolerance, the same records, and the same kept KVs (positions, ids, keys) at the end, for stock
Llama and GPT-NeoX and the sepllm_gpt_neox export, SepCache with and without PE shift, StreamingLLM and the
full cache, at several sizes (tiny ones compress every few tokens)."""
import io

import pytest
import torch

from tests.hf import training_free_models as tf
from tools.streaming_eval import make_cache, stream_perplexity

TIMING = ("seconds", "tokens_per_s", "chunk_tokens_per_s", "chunk_mode", "chunk_tokens")
SEP_IDS = tf.SEPS


def books(seed: int, lengths=(70, 45)):
    """Two books (the cache persists across them), about one token in six a separator."""
    return [tf.random_ids(1, n, seed + k)[0] for k, n in enumerate(lengths)]


def run(model, cache_args, chunk_tokens, tokens, chunk=9, num_eval_tokens=None):
    cache = make_cache(model, **cache_args)
    nll = io.StringIO()
    records = stream_perplexity(model, tokens, cache, chunk=chunk, nll_file=nll, chunk_tokens=chunk_tokens,
                                num_eval_tokens=num_eval_tokens)
    return [float(v) for v in nll.getvalue().split()], records, cache


def assert_same_stream(model, cache_args, tokens, chunk_tokens=16, **kwargs):
    slow_nll, slow_rec, slow_cache = run(model, cache_args, 1, tokens, **kwargs)
    fast_nll, fast_rec, fast_cache = run(model, cache_args, chunk_tokens, tokens, **kwargs)
    assert len(fast_nll) == len(slow_nll)
    torch.testing.assert_close(torch.tensor(fast_nll), torch.tensor(slow_nll), rtol=1e-4, atol=1e-5)
    strip = [[{k: v for k, v in r.items() if k not in TIMING and k not in ("ppl", "running_ppl", "kv_ratio")}
              for r in recs] for recs in (slow_rec, fast_rec)]
    assert strip[0] == strip[1]  # tokens, kept slots, KV bytes, compressions at every record
    for a, b in zip(slow_cache.layers, fast_cache.layers):
        if getattr(slow_cache, "is_sep_cache", False):
            for name in ("stream_pos", "ids", "text_pos", "rot_pos"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert a.compressions == b.compressions and a.sep_len == b.sep_len
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-4, atol=1e-5)
    return fast_rec


SEP_SIZES = [(1, 1, 2, 6), (2, 3, 4, 12), (3, 4, 16, 30)]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("pe_shift", [True, False])
def test_sepcache_chunked_equals_token_by_token(family, pe_shift):
    model = tf.tiny_model(family, "sdpa", vocab=tf.VOCAB)
    tokens = books(3)
    for k, (a, s, w, c) in enumerate(SEP_SIZES):
        args = dict(kind="sepcache", init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c,
                    pe_shift=pe_shift, separator_token_ids=SEP_IDS)
        rec = assert_same_stream(model, args, tokens, chunk_tokens=(5, 16, 64)[k])
        assert rec[-1]["compressions"] > 2 and rec[-1]["chunk_mode"] == "stretch"


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("pe_shift", [True, False])
def test_streamingllm_chunked_equals_token_by_token(family, pe_shift):
    model = tf.tiny_model(family, "sdpa", vocab=tf.VOCAB)
    tokens = books(5)
    for a, w, chunk_tokens in ((1, 3, 8), (4, 12, 32), (2, 6, 5)):
        args = dict(kind="streaming", init_cache_size=a, local_size=w, cache_size=a + w, pe_shift=pe_shift)
        rec = assert_same_stream(model, args, tokens, chunk_tokens=chunk_tokens)
        assert rec[-1]["chunk_mode"] == "window" and rec[-1]["kv_slots"] == a + w + 1


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_full_cache_chunked_equals_token_by_token(family):
    model = tf.tiny_model(family, "sdpa", vocab=tf.VOCAB)
    rec = assert_same_stream(model, dict(kind="full"), books(7), chunk_tokens=32, num_eval_tokens=90)
    assert rec[-1]["tokens"] == 90 and rec[-1]["kv_slots"] == 90  # every fed token stays


@pytest.fixture(scope="module")
def sepllm_export(tmp_path_factory, pythia_tokenizer_path):
    from tests.hf.helpers import base_config, make_export

    cfg = base_config(pythia_tokenizer_path, separator_token_ids=[3, 7], prefill_local_window_size=5,
                      generate_local_window_size=4)
    _, out = make_export(tmp_path_factory.mktemp("fast_stream"), cfg, "sepllm_gpt_neox")
    return out


def test_sepllm_gpt_neox_export_chunked_equals_token_by_token(sepllm_export):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sepllm_export, trust_remote_code=True).eval()
    tokens = books(11, (60, 30))
    for pe_shift in (True, False):
        args = dict(kind="sepcache", init_cache_size=2, sep_cache_size=2, local_size=4, cache_size=12,
                    pe_shift=pe_shift, separator_token_ids=SEP_IDS)
        assert assert_same_stream(model, args, tokens, chunk_tokens=16)[-1]["chunk_mode"] == "stretch"
    assert_same_stream(model, dict(kind="full"), tokens, chunk_tokens=16)
    rec = assert_same_stream(model, dict(kind="streaming", init_cache_size=2, local_size=5, cache_size=7,
                                         pe_shift=True), tokens, chunk_tokens=16)
    assert rec[-1]["chunk_mode"] == "single"  # its own attention: one token per forward, still exact


def test_chunks_really_are_chunks_and_bad_size_is_refused():
    from megatron.hf.streaming_fast import ChunkedStepper

    model = tf.tiny_model("llama", "sdpa", vocab=tf.VOCAB)
    cache = make_cache(model, "sepcache", 2, 3, 4, 30, pe_shift=True, separator_token_ids=SEP_IDS)
    stepper = ChunkedStepper(model, cache, 64)
    tokens = tf.random_ids(1, 40, 1)
    sizes, i = [], 0
    while i < 40:
        q = stepper.plan(40 - i)
        stepper.forward(tokens[:, i:i + q])
        sizes.append(q)
        i += q
    assert sizes[:2] == [1, 28]  # one prefill token, then up to c - 1 slots
    assert max(sizes) == 28 and len(sizes) < 10
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        ChunkedStepper(model, cache, 0)


def test_cli_chunk_tokens_writes_the_reference_outputs(sepllm_export, tmp_path, capsys):
    from tests.hf.test_streaming_and_cli import _book
    from tools.streaming_eval import main

    book = _book(tmp_path / "book.txt")
    ref = ["--model_name_or_path", sepllm_export, "--init_cache_size", "2", "--sep_cache_size", "4", "--local_size",
           "8", "--cache_size", "20", "--enable_kv_cache_manager", "True", "--enable_SepLLM", "True",
           "--enable_StreamingLLM", "False", "--enable_pos_shift", "True", "--num_eval_tokens", "70",
           "--dataset_name", str(book), "--no_progress", "--chunk", "32"]
    logs = []
    for extra in ([], ["--chunk_tokens", "64"]):
        out = tmp_path / f"out{len(logs)}"
        assert main(ref + extra + ["--output_dir", str(out)]) == 0
        logs.append(torch.tensor([float(v) for v in (out / "log.txt").read_text().split()]))
    assert len(logs[0]) == 70
    torch.testing.assert_close(logs[1], logs[0], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(ref + ["--chunk_tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chunk_tokens must be >= 1, got 0" in err[0]


def test_time_limit_stops_at_a_record_boundary():
    model = tf.tiny_model("gpt_neox", "sdpa", vocab=tf.VOCAB)
    cache = make_cache(model, "full")
    records = stream_perplexity(model, books(2), cache, chunk=10, chunk_tokens=8, time_limit_s=0.0)
    assert records[-1]["tokens"] == 10 and records[-1]["stopped_at_time_limit_s"] == 0.0
