"""bench/fidelity.py's config generation: each mode's keys, resolved by the trainer's own configuration code
into the attention it names; the KV-budget derivation checked against the trainer's KV tracker; the log
parser and the table."""
import os
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import fidelity  # noqa: E402
import fidelity_plan as plan  # noqa: E402
import fidelity_report as report  # noqa: E402

from megatron.model.sepllm import rule  # noqa: E402
from megatron.neox_arguments import Environment, NeoXArgs  # noqa: E402

MODE_ONLY = {  # the keys a mode may set; everything else must be the same in every mode
    "USE_ORIGINAL_FULL_ATTEN", "USE_SEP_ATTN_KERNEL_ACCELERATOR", "prefill_local_window_size",
    "generate_local_window_size", "init_tok_max_idx", "streamingLLM", "BATCH_ADAPTIVE_INIT_POS", "PRINT_KV_RATIO",
    "print_ratio_intervals", "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
    "prefill_loc_win_size_list", "generate_win_loc_size_list", "USE_FIXED_SEP_INTERVALs", "fixed_sep_intervals_list",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer with the separator characters and three tiny splits, enough for the config to validate."""
    from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

    from data.corpus_utils import write_docs

    d = tmp_path_factory.mktemp("fidelity_corpus")
    text = "It is a truth, universally acknowledged; that a man: in possession! of a fortune? must be.\n\t" * 50
    tok = str(d / "tokenizer.json")
    save_tokenizer(train_bpe_tokenizer([text], 300), tok)
    rng = np.random.default_rng(0)
    paths = {s: write_docs(d / f"pg19_{s}_text_document", [rng.integers(0, 300, 3000) for _ in range(3)])
             for s in ("train", "valid", "test")}
    return dict(paths, tokenizer=tok)


def configs(preset, corpus, tmp_path, w=200, k=6):
    return {m: plan.run_config(m, 1234, preset, corpus, str(tmp_path / m), streaming_w=w, fixllm_int=k)
            for m in plan.MODES}


@pytest.mark.parametrize("name", ["cpu", "gpu160m", "smoke"])
def test_each_mode_sets_its_keys_and_nothing_else_differs(name, corpus, tmp_path):
    p = plan.PRESETS[name]
    c = configs(p, corpus, tmp_path)
    s, layers, n64, n128 = p.seq_length, p.num_layers, p.window("n64"), p.window("n128")
    kernel = name == "gpu160m"
    assert c["full"]["USE_ORIGINAL_FULL_ATTEN"] is True
    for mode, w in (("sepllm_n64", n64), ("sepllm_n128", n128)):
        assert (c[mode]["prefill_local_window_size"], c[mode]["generate_local_window_size"]) == (w, w)
        assert c[mode]["USE_ORIGINAL_FULL_ATTEN"] is False and c[mode]["streamingLLM"] is False
        assert c[mode]["USE_SEP_ATTN_KERNEL_ACCELERATOR"] is kernel
    assert n64 == 64 and n128 == 128
    ht = c["sepllm_n64ht"]
    assert ht["prefill_loc_win_size_list"] == [s] + [64] * (layers - 2) + [s] == ht["generate_win_loc_size_list"]
    assert ht["USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS"] and ht["USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS"]
    st = c["streamingllm"]
    assert st["streamingLLM"] is True and st["USE_SEP_ATTN_KERNEL_ACCELERATOR"] is False
    assert st["prefill_local_window_size"] == 200
    fx = c["fixllm"]
    assert fx["USE_FIXED_SEP_INTERVALs"] is True and fx["fixed_sep_intervals_list"] == [6] * layers
    for mode, cfg in c.items():
        if mode != "full":
            assert cfg["init_tok_max_idx"] == 2 and cfg["PRINT_KV_RATIO"] is True
        common = {k: v for k, v in cfg.items() if k not in MODE_ONLY and k != "save"}
        assert common == {k: v for k, v in c["full"].items() if k not in MODE_ONLY and k != "save"}, mode
        assert cfg["train_iters"] == p.train_iters and cfg["seed"] == 1234
        assert cfg["train_iters"] * cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] \
            * cfg["seq_length"] >= p.tokens_per_run


def _resolve(cfg, tmp_path, name, cuda=0):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = Environment(cuda_device_count=cuda, environ={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    return NeoXArgs.from_ymls([str(path)], env=env)


@pytest.mark.parametrize("name,cuda", [("cpu", 0), ("gpu160m", 1)])
def test_the_trainer_resolves_each_mode_to_its_attention(name, cuda, corpus, tmp_path, capsys):
    p = plan.PRESETS[name]
    c = configs(p, corpus, tmp_path)
    masked = "sep_kernel" if name == "gpu160m" else "sepllm_mask"
    expect = {"full": ("full", None), "sepllm_n64": (masked, [64] * p.num_layers),
              "sepllm_n128": (masked, [128] * p.num_layers),
              "sepllm_n64ht": (masked, [p.seq_length] + [64] * (p.num_layers - 2) + [p.seq_length]),
              "streamingllm": ("streamingllm", [200] * p.num_layers), "fixllm": ("fixllm", [64] * p.num_layers)}
    for mode, (variant, windows) in expect.items():
        args = _resolve(c[mode], tmp_path, mode, cuda)
        assert args.attention_variant == variant, mode
        assert args.train_iters == p.train_iters and args.seq_length == p.seq_length
        if windows is not None:
            assert rule.layer_windows(args, p.num_layers, "prefill") == windows, mode
            assert rule.layer_windows(args, p.num_layers, "generate") == windows, mode
            assert rule.num_initial_tokens(args.init_tok_max_idx) == 3
        if mode == "streamingllm":
            assert list(args.separator_token_ids) == [-1]
        elif mode == "fixllm":
            assert list(args.fixed_sep_intervals_list) == [6] * p.num_layers
        elif mode != "full":
            assert len(args.separator_token_ids) == 9  # . , ? ! ; : space tab newline of the run's tokenizer


def test_budget_modes_match_the_n64_kv_ratio_the_trainer_measures(corpus, tmp_path):
    from megatron.model.sepllm.stats import kv_statistics

    p = plan.PRESETS["cpu"]
    n64 = _resolve(plan.run_config("sepllm_n64", 1, p, corpus, str(tmp_path / "a")), tmp_path, "n64")
    seps = torch.tensor(n64.separator_token_ids)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 300, (4, p.seq_length), generator=g)
    sep_at = torch.rand(tokens.shape, generator=g) < 0.15
    tokens[sep_at] = seps[torch.randint(0, len(seps), (int(sep_at.sum()),), generator=g)]
    r = kv_statistics(tokens, n64)["kv_ratio"]
    assert 0.15 < r < 0.3
    w = plan.streaming_window(r, p.seq_length)
    st = _resolve(plan.run_config("streamingllm", 1, p, corpus, str(tmp_path / "b"), streaming_w=w), tmp_path, "st")
    r_st = kv_statistics(tokens, st)["kv_ratio"]
    assert abs(r_st - r) <= 0.5 / p.seq_length + 1e-9  # equal budgets, up to rounding to whole keys
    # FixLLM (key k kept iff (k + 1) % interval == 0 between the initial tokens and the window): counted by
    # hand and by the trainer's tracker.
    k = plan.fixllm_interval(r, p.seq_length, 64)
    s, a = p.seq_length, plan.NUM_INIT
    kept = a + 64 + sum(1 for key in range(a, s - 64) if (key + 1) % k == 0)
    assert abs(kept / s - r) < 0.1 * r
    fx = _resolve(plan.run_config("fixllm", 1, p, corpus, str(tmp_path / "c"), fixllm_int=k), tmp_path, "fx")
    assert fx.attention_variant == "fixllm"
    assert abs(kv_statistics(tokens, fx)["kv_ratio"] - kept / s) < 1e-9


def test_sep_cache_sizes_fit_the_sepcache_rule():
    for r in (0.05, 0.2, 0.3, 0.6, 1.0):
        for w in (64, 128):
            z = plan.sep_cache_sizes(r, 1024, w)
            assert z["init_cache_size"] + z["sep_cache_size"] + z["local_size"] < z["cache_size"]
            assert z["local_size"] == w and z["cache_size"] >= round(r * 1024)


def test_mode_selection_errors():
    assert plan.check_modes(["streamingllm", "full", "sepllm_n64"]) == ["full", "sepllm_n64", "streamingllm"]
    with pytest.raises(plan.PlanError, match="needs sepllm_n64"):
        plan.check_modes(["full", "streamingllm"])
    with pytest.raises(plan.PlanError, match="unknown"):
        plan.check_modes(["n64"])
    with pytest.raises(plan.PlanError, match="--preset"):
        plan.get_preset("tpu")


def test_train_log_parser_takes_the_last_value_of_a_resumed_run(tmp_path):
    lines = [
        "iteration        4/       8 | loss 7.000000E+00 | lr 1E-03 | tokens/s 100 | sepllm/cum_kv_ratio 0.25 | |#|",
        "iteration        8/       8 | loss 9.000000E+00 | lr 1E-03 | tokens/s 300 | sepllm/cum_kv_ratio 0.5 | |#|",
        "# resumed",
        "iteration        8/       8 | loss 6.500000E+00 | lr 1E-03 | tokens/s 200 | sepllm/cum_kv_ratio 0.2209 | |#|",
        "validation results at iteration 8 | lm_loss 6.742738E+00 | lm_loss_ppl 8.478789E+02",
        "test results at iteration 8 | lm_loss 6.649781E+00 | lm_loss_ppl 7.726153E+02",
    ]
    path = tmp_path / "train.log"
    path.write_text("\n".join(lines) + "\n")
    out = fidelity.parse_train_log(str(path), 512)
    assert out["loss_curve"] == [[2048, 7.0], [4096, 6.5]]
    assert out["kv_ratio"] == 0.2209 and out["val_loss"] == 6.742738 and out["test_loss"] == 6.649781
    assert out["val_iteration"] == 8 and out["tokens_per_s_median"] == 200


def test_table_has_every_mode_and_says_why_one_is_missing():
    p = plan.PRESETS["smoke"]
    seq = p.seq_length

    def done(mode, seed, val, kv):
        lc = {"lengths": {str(f * seq): {"ppl": 10.0 * f, "nll_by_position": [1.0] * 4} for f in (1, 2, 4)},
              "bucket": seq // 4}
        return {"mode": mode, "seed": seed, "status": "done",
                "train": {"val_loss": val, "kv_ratio": kv, "loss_curve": [[1, 2.0]]},
                "eval": {"long_context": lc, "streaming": {"ppl": 5.0, "ppl_beyond_trained": 6.0, "curve": []}}}

    results = {"plan": fidelity.plan_record(p, ["full", "sepllm_n64", "fixllm"], [1, 2]), "derived": {},
               "runs": {"a": done("full", 1, 4.0, None), "b": done("full", 2, 4.2, None),
                        "c": done("sepllm_n64", 1, 4.4, 0.3), "d": done("sepllm_n64", 2, 4.4, 0.3),
                        "e": {"mode": "fixllm", "seed": 1, "status": "skipped", "reason": "no FixLLM key"}}}
    rows = report.table(results).splitlines()
    assert len(rows) == 2 + 3 and all(r.count("|") == 10 for r in rows)
    assert "4.1 ± 0.14" in rows[2] and "2/2" in rows[2]
    assert "1.0732" in rows[3]  # 4.4 / 4.1
    assert "no FixLLM key" in rows[4] and "0/2" in rows[4]


FAKE_TRAINER = '''
import signal, sys, time
def stop(*_):
    print("saved checkpoint at the next step", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("iteration        1/       9 | loss 5.000000E+00 | tokens/s 10 |", flush=True)
time.sleep(60)
'''


def test_a_run_at_the_time_limit_is_stopped_with_a_checkpoint_and_its_log_kept(tmp_path):
    import time

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("earlier call\n")
    cfg = {"save": str(run_dir / "checkpoints")}
    t0 = time.time()
    out = fidelity.train(str(run_dir), cfg, deadline=time.time() + 3, launch=(str(script),))
    assert out["stopped"] and out["rc"] == 0 and time.time() - t0 < 30
    log = (run_dir / "train.log").read_text()
    assert log.startswith("earlier call\n") and "saved checkpoint at the next step" in log
    assert "load" not in yaml.safe_load((run_dir / "config.yml").read_text())  # no checkpoint yet: fresh start
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("global_step1")
    out = fidelity.train(str(run_dir), cfg, deadline=time.time() + 3, launch=(str(script),))
    assert yaml.safe_load((run_dir / "config.yml").read_text())["load"] == cfg["save"]  # resumes


class _CountingModel:
    """Uniform logits; records the length of every window it is given."""

    def __init__(self, vocab):
        self.vocab, self.lengths = vocab, []

    def __call__(self, input_ids, use_cache=False):
        self.lengths.append(input_ids.shape[-1])
        return type("Out", (), {"logits": torch.zeros(1, input_ids.shape[-1], self.vocab)})()


def test_long_context_scores_the_same_tokens_at_every_length():
    import fidelity_eval

    books = [torch.arange(0, 700) % 50, torch.arange(0, 300) % 50, torch.arange(0, 5000) % 50]
    spans = fidelity_eval.long_spans(books, 4 * 32, 5)
    assert [s.numel() for s in spans] == [129] * 5
    assert torch.equal(spans[0], books[0][:129]) and torch.equal(spans[1], books[1][:129])  # in turn from each book
    model = _CountingModel(50)
    out = fidelity_eval.long_context(model, books, 32, 5, "cpu")
    counts = {v["factor"]: v["tokens"] for v in out["lengths"].values()}
    assert counts == {1: 5 * 128, 2: 5 * 128, 4: 5 * 128}
    assert sorted(set(model.lengths)) == [32, 64, 128] and model.lengths.count(128) == 5
    for v in out["lengths"].values():  # uniform logits: every token costs log(vocab)
        assert abs(v["nll"] - np.log(50)) < 1e-6 and len(v["nll_by_position"]) == 4 * v["factor"]
    with pytest.raises(ValueError, match="spans"):
        fidelity_eval.long_spans(books, 4 * 32, 100)


def test_streaming_eval_in_chunks_gives_the_token_by_token_figures():
    """(c) runs in chunks: its perplexities and curve must be those of the reference's one-token-per-forward
    stream over the same cache."""
    import fidelity_eval

    from tests.hf import training_free_models as tf
    from tools.streaming_eval import make_cache, stream_perplexity

    model = tf.tiny_model("llama", "sdpa", vocab=tf.VOCAB)
    model.config.separator_token_ids = list(tf.SEPS)
    books = [tf.random_ids(1, n, 5 + k)[0] for k, n in enumerate((90, 60))]
    sizes = dict(init_cache_size=3, sep_cache_size=4, local_size=8, cache_size=20)
    out = fidelity_eval.streaming(model, books, "sepcache", sizes, tokens=140, chunk=16, seq_length=32)
    ref = stream_perplexity(model, books, make_cache(model, "sepcache", pe_shift=True,
                                                     separator_token_ids=list(tf.SEPS), **sizes),
                            chunk=16, num_eval_tokens=140)
    assert out["tokens"] == ref[-1]["tokens"] == 140 and out["chunk_mode"] == "stretch"
    assert out["ppl"] == pytest.approx(ref[-1]["ppl"], rel=1e-5)
    ends = [r["tokens"] for r in ref if not r.get("final")]
    assert [c["end"] for c in out["curve"]] == ends
    for c, r in zip(out["curve"], (r for r in ref if not r.get("final"))):
        assert c["nll"] == pytest.approx(np.log(r["ppl"]), rel=1e-5)
    assert out["kv_slots_at_end"] == ref[-1]["kv_slots"]
