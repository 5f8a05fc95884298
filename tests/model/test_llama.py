"""Llama-family models: GPT-NeoX's swiglu sizing, the gated MLP, grouped-query attention in every attention path
against brute-force per-head loops, Mistral's sliding window against a banded mask, and a SepLLM mode on a
Llama-shaped model against brute force."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron.neox_arguments import ConfigError
from model_helpers import make_args, randomize_
from tests.sepllm import brute

LLAMA = dict(pos_emb="rotary", rotary_pct=1, gpt_j_residual=False, norm="rmsnorm", rms_norm_epsilon=1e-5,
             use_bias_in_norms=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False, activation="swiglu",
             mlp_multiple_of=16, intermediate_size=160)

# (hidden_size, intermediate_size, mlp_multiple_of) of GPT-NeoX's shipped configs -> the MLP width. Where the
# config reproduces a published model, the width is that model's HF intermediate_size; codellama_*.yml give no
# intermediate_size and get GPT-NeoX's rule on 4h (worked by hand: 32768 -> 21845 -> 10922 -> 11008).
SHIPPED = {
    "llama/7B": (4096, 32768, 256, 11008), "llama/13B": (5120, 40960, 256, 13824),
    "llama/30B": (6656, 53248, 256, 17920), "llama/65B": (8192, 65536, 256, 22016),
    "llama2/7B": (4096, 32768, 256, 11008), "llama2/13B": (5120, 41472, 256, 13824),
    "llama2/70B": (8192, 86016, 256, 28672), "llama2/codellama_34B": (8192, None, 256, 11008),
    "llama2/codellama_7B": (4096, None, 256, 5632),
}


def sized(hidden, intermediate, multiple_of, **extra):
    keys = dict(hidden_size=hidden, num_attention_heads=32, activation="swiglu", mlp_multiple_of=multiple_of, **extra)
    if intermediate is not None:
        keys["intermediate_size"] = intermediate
    return make_args(**keys)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_swiglu_sizing_of_gpt_neox_shipped_configs(name):
    hidden, intermediate, multiple_of, width = SHIPPED[name]
    assert sized(hidden, intermediate, multiple_of).mlp_inner_size == width


def test_mistral_7b_sizes_are_refused_as_gpt_neox_cannot_build_them():
    """mistral/7B.yml: int(14336 * 2 / 3) = 9557 -> projection 9558, activation 4778: half of 9558 is 4779, and
    GPT-NeoX's forward fails on the mismatch."""
    with pytest.raises(ConfigError, match=r"intermediate_size=14336 .* projection of 9558 and an activation of 4778"):
        sized(4096, 14336, 1, num_kv_heads=8)
    assert sized(4096, 43008, 1, num_kv_heads=8).mlp_inner_size == 14336  # Mistral-7B's width: 3 x 14336


def test_gpt_neox_llama2_70b_model_keys_load():
    keys = dict(num_layers=80, hidden_size=8192, intermediate_size=86016, num_attention_heads=64, num_kv_heads=8,
                seq_length=4096, max_position_embeddings=4096, pos_emb="rotary", rotary_pct=1,
                rotary_emb_base=1000000, no_weight_tying=True, gpt_j_residual=False, output_layer_parallelism="column",
                norm="rmsnorm", rms_norm_epsilon=1.0e-5, attention_config=[[["flash"], 80]],
                scaled_upper_triang_masked_softmax_fusion=True, bias_gelu_fusion=False, use_bias_in_norms=False,
                use_bias_in_attn_linear=False, activation="swiglu", mlp_multiple_of=256, make_vocab_size_divisible_by=1)
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(dict(keys, padded_vocab_size=32000))
    assert (args.attention_variant, args.num_kv_heads, args.mlp_inner_size) == ("full", 8, 28672)


@pytest.mark.parametrize("keys,match", [
    (dict(num_kv_heads=3), "key 'num_kv_heads' is 3"),
    (dict(sliding_window_width=0), "key 'sliding_window_width' must be >= 1"),
    (dict(sliding_window_width=4, USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=[3]),
     "key 'sliding_window_width' .* prefill_local_window_size"),
    (dict(mlp_multiple_of=0), "key 'mlp_multiple_of' must be >= 1"),
])
def test_bad_llama_keys_are_refused_by_name(keys, match):
    with pytest.raises(ConfigError, match=match):
        make_args(**{**LLAMA, **keys})


def test_swiglu_mlp_is_silu_gate_times_up():
    from megatron.model.transformer import ParallelGatedMLP

    args = make_args(**LLAMA)
    mlp = ParallelGatedMLP(args, torch.nn.init.normal_, torch.nn.init.normal_)
    assert tuple(mlp.linear1.weight.shape) == (128, 64) and tuple(mlp.linear2.weight.shape) == (64, 64)
    x = torch.randn(2, 3, 64)
    up, gate = mlp.linear1.weight[:64], mlp.linear1.weight[64:]
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.linear2.weight.T
    torch.testing.assert_close(mlp(x), expected)


# ------------------------------------------------------------------------------ grouped-query attention
def brute_gqa(q, k, v, mask):
    """Per query head h, softmax attention against key/value head h // group, by a loop (float64)."""
    group = q.shape[1] // k.shape[1]
    outs = [brute.attention(q[:, h:h + 1], k[:, h // group:h // group + 1], v[:, h // group:h // group + 1], mask)
            for h in range(q.shape[1])]
    return torch.cat(outs, dim=1)


VARIANTS = {
    "full": dict(),
    "sepllm_mask": dict(USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=brute.SEPS, prefill_local_window_size=3,
                        init_tok_max_idx=1),
    "sep_kernel": dict(USE_ORIGINAL_FULL_ATTEN=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=True,
                       separator_token_ids=brute.SEPS, prefill_local_window_size=3, init_tok_max_idx=1),
    "streamingllm": dict(USE_ORIGINAL_FULL_ATTEN=False, streamingLLM=True, prefill_local_window_size=3,
                         init_tok_max_idx=1),
}


def _meta(ids, args):
    from megatron.model.sepllm.meta import build_attn_meta

    return build_attn_meta(ids, None, args)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_core_attention_matches_brute_force(variant, kv_heads):
    from megatron.model.attention import build_core_attention

    args = make_args(num_kv_heads=kv_heads, **VARIANTS[variant])
    assert args.attention_variant == variant
    gen = torch.Generator().manual_seed(kv_heads)
    ids = brute.random_ids(2, 16, gen)
    q = torch.randn(2, 4, 16, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 16, 16, generator=gen) for _ in range(2))
    if variant == "full":
        mask = torch.ones(16, 16, dtype=torch.bool).tril().expand(2, 16, 16)
    elif variant == "streamingllm":
        mask = brute.prefill_mask(ids, 2, 3, seps=[])
    else:
        mask = brute.prefill_mask(ids, 2, 3)
    core = build_core_attention(args, 0).eval()
    with torch.no_grad():
        got = core(q, k, v, _meta(ids, args))
    torch.testing.assert_close(got.double(), brute_gqa(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO"])
def test_gqa_self_adjusting_softmax_matches_per_head_loop(mode):
    """SA's weights (sa_probabilities, tested against the reference elsewhere) per query head h against key/value
    head h // group, by a loop."""
    from megatron.model.attention import build_core_attention
    from megatron.model.attention.sa_softmax import sa_probabilities

    args = make_args(num_kv_heads=2, USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=brute.SEPS,
                     prefill_local_window_size=3, **{mode: True})
    gen = torch.Generator().manual_seed(5)
    ids = brute.random_ids(2, 16, gen)
    q = torch.randn(2, 4, 16, 16, generator=gen)
    k, v = (torch.randn(2, 2, 16, 16, generator=gen) for _ in range(2))
    allowed = brute.prefill_mask(ids, 3, 3)
    expected = []
    for h in range(4):
        scores = q[:, h] @ k[:, h // 2].transpose(-1, -2) / 4.0
        probs = sa_probabilities(scores, allowed, mode == "USE_SA_SOFTMAX", args.SA_Numerator_Bias,
                                 args.SA_Denominator_Bias)
        expected.append(probs @ v[:, h // 2])
    core = build_core_attention(args, 0).eval()
    torch.testing.assert_close(core(q, k, v, _meta(ids, args)), torch.stack(expected, dim=1))


def test_gqa_kernel_reference_matches_brute_force():
    from megatron.model.sepllm.kernel import sep_attention

    gen = torch.Generator().manual_seed(2)
    ids = brute.random_ids(2, 16, gen)
    q = torch.randn(2, 4, 16, 16, generator=gen)
    k, v = (torch.randn(2, 2, 16, 16, generator=gen) for _ in range(2))
    flags = torch.isin(ids, torch.tensor(brute.SEPS))
    got = sep_attention(q, k, v, flags, torch.zeros(2, dtype=torch.long), 2, 3, True)
    torch.testing.assert_close(got.double(), brute_gqa(q, k, v, brute.prefill_mask(ids, 2, 3)), rtol=1e-5, atol=1e-5)


def test_gqa_layer_reads_gpt_neox_qkv_layout():
    """A GQA model equals the multi-head model whose per-head QKV rows repeat each key/value head for its group:
    the [all q | all k | all v] rows are read as GPT-NeoX's gqa_project writes them."""
    from megatron.model import build_sequential_model

    gqa = build_sequential_model(make_args(num_kv_heads=2, **LLAMA)).eval()
    randomize_(gqa)
    mha = build_sequential_model(make_args(**LLAMA)).eval()
    state = dict(gqa.state_dict())
    d = 16
    for name in [n for n in state if n.endswith("query_key_value.weight")]:
        q, k, v = state[name].split([64, 2 * d, 2 * d], dim=0)
        heads = [torch.cat([q[h * d:(h + 1) * d], k[(h // 2) * d:(h // 2 + 1) * d], v[(h // 2) * d:(h // 2 + 1) * d]])
                 for h in range(4)]
        state[name] = torch.cat(heads, dim=0)
    mha.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(gqa((ids, pos, None)), mha((ids, pos, None)))


# ------------------------------------------------------------------------------ sliding window
def test_sliding_window_mask_is_the_banded_mask():
    from megatron.model.sepllm.rule import sliding_window_mask

    for seq_q, seq_k, width in ((9, 9, 3), (4, 9, 2), (9, 9, 1)):
        expected = torch.zeros(seq_q, seq_k, dtype=torch.bool)
        for i in range(seq_q):
            qpos = seq_k - seq_q + i
            for j in range(seq_k):
                expected[i, j] = j <= qpos and qpos - j <= width
        assert torch.equal(sliding_window_mask(seq_q, seq_k, width), expected)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sliding_window_attention_matches_brute_force(kv_heads):
    from megatron.model.attention import build_core_attention

    args = make_args(num_kv_heads=kv_heads, sliding_window_width=4)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 16, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 16, 16, generator=gen) for _ in range(2))
    band = torch.tensor([[0 <= i - j <= 4 for j in range(16)] for i in range(16)]).expand(2, 16, 16)
    core = build_core_attention(args, 0).eval()
    with torch.no_grad():
        got = core(q, k, v, _meta(torch.ones(2, 16, dtype=torch.long), args))
    torch.testing.assert_close(got.double(), brute_gqa(q, k, v, band), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ SepLLM on a Llama-shaped model
class BruteAttention(torch.nn.Module):
    """Core attention by per-head loops over the brute-force SepLLM mask of the batch's ids."""

    def __init__(self, ids, num_init, window):
        super().__init__()
        self.mask = brute.prefill_mask(ids, num_init, window)

    def forward(self, q, k, v, meta):
        return brute_gqa(q, k, v, self.mask).to(q.dtype)


def test_sepllm_mode_on_llama_shaped_gqa_model_matches_brute_force():
    from megatron.model import build_sequential_model

    args = make_args(num_kv_heads=2, USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=brute.SEPS,
                     prefill_local_window_size=3, init_tok_max_idx=1, **LLAMA)
    model = build_sequential_model(args).eval()
    randomize_(model)
    ids = brute.random_ids(2, 16, torch.Generator().manual_seed(7))
    pos = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        got = model((ids, pos, None))
        for layer in model.sequential:
            if hasattr(layer, "attention"):
                layer.attention.core_attention = BruteAttention(ids, 2, 3)
        ref = model((ids, pos, None))
        for layer in model.sequential:
            if hasattr(layer, "attention"):
                layer.attention.core_attention = BruteAttention(ids, 0, 64)  # full causal: must differ
        full = model((ids, pos, None))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert (full - ref).abs().max().item() > 1e-3
    assert math.isfinite(got.abs().max().item())


def test_resume_refuses_a_checkpoint_of_other_kv_heads_or_mlp():
    from megatron.checkpoint_layout import model_key_mismatch

    args = make_args(num_kv_heads=2, **LLAMA)
    saved = args.to_dict()
    assert model_key_mismatch(args, saved, "ckpt") is None
    for key, value in (("num_kv_heads", 4), ("mlp_inner_size", 96), ("activation", "gelu")):
        assert f"key '{key}' is" in model_key_mismatch(args, dict(saved, **{key: value}), "ckpt")
