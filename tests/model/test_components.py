"""Building blocks against reference formulas: init stds, RMSNorm, ALiBi, rotary positions, registry."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model.init_functions import get_init_methods, init_method_by_name
from megatron.model.norms import RMSNorm, get_norm
from megatron.model.positional_embeddings import (RotaryEmbedding, alibi_bias, alibi_slopes,
                                                  apply_rotary_pos_emb)
from model_helpers import make_args


@pytest.mark.parametrize("name,expected", [
    ("normal", lambda L, h: 0.02),
    ("scaled_normal", lambda L, h: 0.02 / math.sqrt(2 * L)),
    ("small_init", lambda L, h: math.sqrt(2 / (5 * h))),
    ("wang_init", lambda L, h: 2 / (L * math.sqrt(h))),
])
def test_init_std_formulas(name, expected):
    args = make_args(num_layers=12, hidden_size=768, init_method_std=0.02)
    torch.manual_seed(0)
    w = torch.empty(1024, 1024)
    init_method_by_name(name, args)(w)
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(expected(12, 768), rel=0.01)


def test_model_uses_configured_init():
    from megatron.model import build_sequential_model

    args = make_args(num_layers=4, hidden_size=256, num_attention_heads=4, init_method="small_init",
                     output_layer_init_method="wang_init")
    model = build_sequential_model(args)
    p = dict(model.named_parameters())
    small, wang = math.sqrt(2 / (5 * 256)), 2 / (4 * math.sqrt(256))
    assert p["sequential.2.attention.query_key_value.weight"].std().item() == pytest.approx(small, rel=0.03)
    assert p["sequential.3.mlp.dense_4h_to_h.weight"].std().item() == pytest.approx(wang, rel=0.03)
    assert p["sequential.2.attention.dense.weight"].std().item() == pytest.approx(wang, rel=0.03)
    assert p["sequential.0.word_embeddings.weight"].std().item() == pytest.approx(small, rel=0.03)
    assert torch.count_nonzero(p["sequential.2.attention.query_key_value.bias"]) == 0
    with pytest.raises(ValueError, match="init method 'bogus'"):
        init_method_by_name("bogus", make_args())


def test_rmsnorm_matches_gpt_neox_formula():
    """GPT-NeoX's RMSNorm since 4c9f1081: eps inside the square root (an eps large against the mean square
    tells it from the older ``x / (rms + eps)``)."""
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=0.5)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32) * 0.3
    ms = (x * x).sum(dim=-1, keepdim=True) / 32
    torch.testing.assert_close(norm(x), norm.scale * x / torch.sqrt(ms + 0.5))
    assert [n for n, _ in norm.named_parameters()] == ["scale"]
    factory, eps = get_norm(make_args(norm="rmsnorm", rms_norm_epsilon=1e-6, use_bias_in_norms=False))
    assert isinstance(factory(8, eps=eps), RMSNorm) and eps == 1e-6


@pytest.mark.parametrize("norm,bias_name", [("layernorm", "bias"), ("rmsnorm", "offset")])
@pytest.mark.parametrize("use_bias", [True, False])
def test_use_bias_in_norms_decides_the_norm_bias(norm, bias_name, use_bias):
    """GPT-NeoX's meaning: the key gives (or drops) LayerNorm's bias and RMSNorm's offset, in every norm of
    the model, the final one included."""
    from megatron.model import build_sequential_model

    model = build_sequential_model(make_args(norm=norm, use_bias_in_norms=use_bias))
    names = set(dict(model.named_parameters()))
    norm_layers = {n.rsplit(".", 1)[0] for n in names if "layernorm" in n or ".norm." in n}
    assert len(norm_layers) == 2 * 2 + 1  # two per block, the final norm
    assert all((f"{layer}.{bias_name}" in names) is use_bias for layer in norm_layers), sorted(names)
    if norm == "layernorm" and not use_bias:
        # Without the bias, a LayerNorm is exactly F.layer_norm with weight only.
        ln = model.sequential[2].input_layernorm
        x = torch.randn(2, 3, ln.normalized_shape[0])
        torch.testing.assert_close(ln(x), F.layer_norm(x, ln.normalized_shape, ln.weight, None, ln.eps))


def test_rmsnorm_model_builds_with_gpt_neox_parameter_names():
    """A model with norm: rmsnorm has GPT-NeoX's RMSNorm parameters (``scale``) and runs; the norm's formula
    itself is test_rmsnorm_matches_gpt_neox_formula."""
    from megatron.model import build_sequential_model

    model = build_sequential_model(make_args(norm="rmsnorm"))
    assert "sequential.2.input_layernorm.scale" in dict(model.named_parameters())
    ids = torch.randint(0, 128, (2, 16))
    out = model((ids, torch.arange(16).expand(2, -1)))
    assert out.shape[:2] == (2, 16) and torch.isfinite(out).all()


def test_alibi_slopes_12_heads():
    expected = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
                0.70710678, 0.35355339, 0.17677670, 0.08838835]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-6)
    assert alibi_slopes(8) == pytest.approx(expected[:8])


def test_alibi_full_attention_matches_explicit_softmax():
    from megatron.model.attention import FullAttention
    from megatron.model.sepllm.meta import AttnMeta

    torch.manual_seed(0)
    B, H, S, D = 2, 4, 8, 16
    attn = FullAttention(make_args(num_attention_heads=H, pos_emb="alibi", attention_dropout=0.0), 0)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    pos = torch.stack([torch.arange(S), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])])  # row 1: BiPE-like ids
    meta = AttnMeta(rope_pos=pos, sep_flags=torch.zeros(B, S, dtype=torch.bool), init_start=torch.zeros(B).long())
    slopes = torch.tensor(alibi_slopes(H))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    rel = (pos[:, None, :, None] - pos[:, None, None, :]).float()
    scores = scores - slopes.view(1, H, 1, 1) * rel
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    ref = scores.softmax(-1) @ v
    torch.testing.assert_close(attn(q, k, v, meta), ref, rtol=1e-5, atol=1e-5)
    assert alibi_bias(pos, slopes).shape == (B, H, S, S)


def _absolute_rotary_reference(x, dim, base):
    """Rotary with a cached absolute-position table, GPT-NeoX style (x: [B, S, H, D])."""
    seq = x.shape[1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(seq).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = x_rot[..., : dim // 2], x_rot[..., dim // 2:]
    return torch.cat((x_rot * cos + torch.cat((-x2, x1), -1) * sin, x_pass), dim=-1)


@pytest.mark.parametrize("dim", [16, 64])
def test_rotary_per_row_positions(dim):
    torch.manual_seed(0)
    B, S, H, D = 3, 12, 2, 64
    rope = RotaryEmbedding(dim, 10000.0)
    x = torch.randn(B, S, H, D)
    cos, sin = rope(torch.arange(S).expand(B, S), x.dtype)
    torch.testing.assert_close(apply_rotary_pos_emb(x, cos, sin), _absolute_rotary_reference(x, dim, 10000.0))
    # Row-specific positions: row b shifted by b equals the absolute rotary of a longer sequence, sliced.
    long = torch.randn(1, S + B, H, D)
    ref = _absolute_rotary_reference(long, dim, 10000.0)
    rows = torch.cat([long[:, b:b + S] for b in range(B)])
    pos = torch.stack([torch.arange(b, b + S) for b in range(B)])
    cos, sin = rope(pos, rows.dtype)
    out = apply_rotary_pos_emb(rows, cos, sin)
    for b in range(B):
        torch.testing.assert_close(out[b], ref[0, b:b + S], rtol=1e-5, atol=1e-5)


def test_attention_registry_selection_and_errors():
    from megatron.model.attention import ATTENTION_VARIANTS, FullAttention, build_core_attention, \
        get_attention_class

    assert ATTENTION_VARIANTS["full"] is FullAttention

    def variant(**flags):
        args = make_args(USE_ORIGINAL_FULL_ATTEN=False, separator_token_ids=[5, 7], **flags)
        return args.attention_variant, type(build_core_attention(args, 0)).__name__

    assert make_args().attention_variant == "full"
    assert variant(streamingLLM=True) == ("streamingllm", "StreamingLLMAttention")
    assert variant(USE_SA_SOFTMAX_NO_DENO=True) == ("sa_softmax", "SASoftmaxAttention")
    assert variant(USE_SEP_ATTN_KERNEL_ACCELERATOR=True) == ("sep_kernel", "SepKernelModeAttention")
    assert variant() == ("sepllm_mask", "SepLLMMaskAttention")
    with pytest.raises(ValueError, match="attention variant 'nope'"):
        get_attention_class("nope")


def test_full_attention_is_causal_sdpa():
    from megatron.model.attention import FullAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    attn = FullAttention(make_args(num_attention_heads=4, pos_emb="rotary", attention_dropout=0.0), 0)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), -1e30)
    torch.testing.assert_close(attn(q, k, v, None), scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)


def test_learned_positions_and_bad_input():
    from megatron.model import build_sequential_model

    model = build_sequential_model(make_args(pos_emb="learned"))
    names = dict(model.named_parameters())
    assert names["sequential.0.position_embeddings.weight"].shape == (16, 64)
    ids = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    out = model((ids, pos))
    shifted = model((ids, torch.roll(pos, 1, dims=1)))
    assert not torch.allclose(out, shifted)  # learned positions matter
    with pytest.raises(ValueError, match="input_ids must be"):
        model((ids[0], pos[0]))


def test_sepllm_variant_plugs_into_the_layer():
    """The mask-based SepLLM variant through our layer: a window covering the sequence is plain causal
    attention (same logits as `full`), a small window is not."""
    from megatron.model import build_sequential_model

    sep = dict(USE_ORIGINAL_FULL_ATTEN=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, separator_token_ids=[5, 7])
    torch.manual_seed(0)
    full = build_sequential_model(make_args())
    wide = build_sequential_model(make_args(**sep, prefill_local_window_size=16, generate_local_window_size=16))
    narrow = build_sequential_model(make_args(**sep, prefill_local_window_size=2, generate_local_window_size=2))
    assert type(narrow.sequential[2].attention.core_attention).__name__ == "SepLLMMaskAttention"
    wide.load_state_dict(full.state_dict())
    narrow.load_state_dict(full.state_dict())
    ids = torch.randint(8, 128, (2, 16))
    pos = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        ref = full((ids, pos))
        torch.testing.assert_close(wide((ids, pos)), ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(narrow((ids, pos)), ref, atol=1e-3)


def test_unknown_pos_emb_is_rejected():
    from megatron.model import gpt2_layer_specs

    args = make_args()
    args.pos_emb = "sinusoidal"  # past the config's own check of the key's choices
    with pytest.raises(ValueError, match="pos_emb 'sinusoidal'"):
        gpt2_layer_specs(args)
