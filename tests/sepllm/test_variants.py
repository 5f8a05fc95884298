"""Every SepLLM attention variant against float64 brute-force attention over the loop-built mask."""
import pytest
import torch

from megatron.model.attention.sep_kernel_mode import SepKernelModeAttention
from megatron.model.attention.sa_softmax import SASoftmaxAttention
from megatron.model.attention.sepllm_mask import SepLLMMaskAttention
from megatron.model.attention.streaming import StreamingLLMAttention
from megatron.model.positional_embeddings import alibi_slopes
from megatron.model.sepllm import rule
from megatron.model.sepllm.meta import build_attn_meta
from tests.sepllm import brute
from tests.sepllm.brute import SEPS

B, H, S, D = 2, 2, 40, 16


def _qkv(seed, dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _ids(seed, pads=None):
    return brute.random_ids(B, S, torch.Generator().manual_seed(seed), pad_left=pads)


@pytest.mark.parametrize("cls", [SepLLMMaskAttention, SepKernelModeAttention])
@pytest.mark.parametrize("num_init,window,excl,adaptive", [
    (0, 1, True, False), (3, 5, True, False), (3, 5, False, True), (3, 64, True, False)])
def test_forward_matches_brute_force(cls, num_init, window, excl, adaptive):
    args = brute.args(init_tok_max_idx=num_init - 1, prefill_local_window_size=window, EXCLUDE_DIAGONAL=excl,
                      BATCH_ADAPTIVE_INIT_POS=adaptive)
    ids = _ids(window, pads=[4, 0] if adaptive else None)
    q, k, v = _qkv(1)
    with torch.no_grad():  # the kernel class runs eager FlexAttention on CPU without gradients
        out = cls(args, 0)(q, k, v, build_attn_meta(ids, None, args))
    want = brute.attention(q, k, v, brute.prefill_mask(ids, num_init, window, excl, adaptive=adaptive))
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [SepLLMMaskAttention, SepKernelModeAttention])
def test_per_layer_windows_with_repeats(cls):
    windows = [100, 4, 4, 1, 100]
    args = brute.args(num_layers=5, USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=windows)
    ids = _ids(3)
    meta = build_attn_meta(ids, None, args)
    layers = [cls(args, i) for i in range(5)]  # all built before any runs (late-binding check)
    q, k, v = _qkv(2)
    with torch.no_grad():
        outs = [layer(q, k, v, meta) for layer in layers]
    for w, out in zip(windows, outs):
        want = brute.attention(q, k, v, brute.prefill_mask(ids, 3, w))
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_streaming_ignores_separators():
    args = brute.args(streamingLLM=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, prefill_local_window_size=6)
    ids = _ids(4)
    q, k, v = _qkv(3)
    out = StreamingLLMAttention(args, 0)(q, k, v, build_attn_meta(ids, None, args))
    want = brute.attention(q, k, v, brute.prefill_mask(ids, 3, 6, seps=[]))
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_mask_path_gradients_match_float64():
    args = brute.args(prefill_local_window_size=5, USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    ids = _ids(5)
    q, k, v = _qkv(4, grad=True)
    weight = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(9))
    (SepLLMMaskAttention(args, 0)(q, k, v, build_attn_meta(ids, None, args)) * weight).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (brute.attention(q64, k64, v64, brute.prefill_mask(ids, 3, 5)) * weight.double()).sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_kernel_class_trains_on_cpu_through_mask_path(capsys):
    args = brute.args(prefill_local_window_size=5)
    ids = _ids(6)
    q, k, v = _qkv(5, grad=True)
    out = SepKernelModeAttention(args, 0)(q, k, v, build_attn_meta(ids, None, args))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out.detach().double(), brute.attention(q, k, v, brute.prefill_mask(ids, 3, 5)),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [SepLLMMaskAttention, SepKernelModeAttention])
@pytest.mark.parametrize("use_bipe", [False, True])
def test_alibi_plain_and_bipe(cls, use_bipe):
    args = brute.args(pos_emb="alibi", prefill_local_window_size=6, USE_BiPE=use_bipe,
                      BiPE_seps=list(SEPS) if use_bipe else None)
    ids = _ids(7)
    q, k, v = _qkv(6)
    with torch.no_grad():
        out = cls(args, 0)(q, k, v, build_attn_meta(ids, None, args))
    pos = brute.bipe(ids)[1] if use_bipe else torch.arange(S).expand(B, S)
    want = brute.attention(q, k, v, brute.prefill_mask(ids, 3, 6), bias=brute.alibi(alibi_slopes(H), pos))
    torch.testing.assert_close(out.double(), want, atol=5e-6, rtol=1e-5)


def _sa_reference(q, k, v, mask, normalised, eps_n, eps_d):
    """The section 6 formula row by row in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T / D ** 0.5
            for i in range(S):
                row = s[i]
                allowed = mask[b, i]
                p = torch.softmax(row.masked_fill(~allowed, float("-inf")), dim=0)
                tri = torch.where(torch.arange(S) <= i, row, torch.zeros_like(row))
                if normalised:
                    m = min(0.0, float(tri.min()))
                    big = max(0.0, float(tri.max()) + eps_d) + eps_d
                    p = p * (row - m + eps_n) / (big - m)
                else:
                    p = p * row
                p = torch.where(torch.arange(S) <= i, p, torch.zeros_like(p))
                out[b, h, i] = p @ v[b, h]
    return out


@pytest.mark.parametrize("normalised", [True, False])
def test_sa_softmax_matches_float64_formula(normalised):
    args = brute.args(USE_SEP_ATTN_KERNEL_ACCELERATOR=False, USE_SA_SOFTMAX=normalised,
                      USE_SA_SOFTMAX_NO_DENO=not normalised, SA_Numerator_Bias=1e-3, SA_Denominator_Bias=1e-2,
                      prefill_local_window_size=5)
    ids = _ids(8)
    q, k, v = _qkv(7)
    out = SASoftmaxAttention(args, 0)(q, k, v, build_attn_meta(ids, None, args))
    want = _sa_reference(q, k, v, brute.prefill_mask(ids, 3, 5), normalised, 1e-3, 1e-2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)


def test_sa_softmax_keeps_the_run_dtype():
    args = brute.args(USE_SEP_ATTN_KERNEL_ACCELERATOR=False, USE_SA_SOFTMAX=True, prefill_local_window_size=5)
    q, k, v = _qkv(8, dtype=torch.bfloat16, grad=True)
    out = SASoftmaxAttention(args, 0)(q, k, v, build_attn_meta(_ids(9), None, args))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16


def test_sa_needs_exactly_one_flag():
    with pytest.raises(ValueError, match="USE_SA_SOFTMAX"):
        SASoftmaxAttention(brute.args(), 0)


def test_meta_streaming_full_and_windows():
    ids = _ids(10)
    full = build_attn_meta(ids, None, brute.args(USE_ORIGINAL_FULL_ATTEN=True))
    assert not full.sep_flags.any() and not full.init_start.any()
    meta = build_attn_meta(ids, None, brute.args())
    assert torch.equal(meta.sep_flags, rule.separator_flags(ids, SEPS))
    with pytest.raises(ValueError, match="window must be >= 1"):
        SepLLMMaskAttention(brute.unvalidated(prefill_local_window_size=0), 0)  # the layer's own guard


def test_compiled_layers_see_each_micro_batch_own_separators():
    """With torch_compile each layer is compiled on its own and the layers of one micro-batch share a mask
    cache. A later layer traced while the cache holds the current batch must not bake that cached mask into
    its graph: every later micro-batch (new separator positions, same shapes) matches the brute force."""
    args = brute.args(init_tok_max_idx=2, prefill_local_window_size=5)
    layers = [torch.compile(SepLLMMaskAttention(args, i), backend="eager") for i in range(2)]
    q, k, v = _qkv(3)
    for seed in (11, 12, 13):
        ids = _ids(seed)
        meta = build_attn_meta(ids, None, args)
        want = brute.attention(q, k, v, brute.prefill_mask(ids, 3, 5, True))
        with torch.no_grad():
            for layer in layers:
                torch.testing.assert_close(layer(q, k, v, meta).double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_fixllm_per_layer_intervals_match_brute_force(adaptive):
    """USE_FIXED_SEP_INTERVALs: each layer keeps every n-th key of its own interval instead of the separators."""
    from megatron.model.attention import build_core_attention

    intervals = [3, 5]
    args = brute.args(USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=intervals, prefill_local_window_size=4,
                      BATCH_ADAPTIVE_INIT_POS=adaptive)
    assert args.attention_variant == "fixllm" and not args.USE_SEP_ATTN_KERNEL_ACCELERATOR
    ids = _ids(6, pads=[3, 0] if adaptive else None)
    meta = build_attn_meta(ids, None, args)
    q, k, v = _qkv(4)
    for layer, interval in enumerate(intervals):
        out = build_core_attention(args, layer)(q, k, v, meta)
        want = brute.attention(q, k, v, brute.prefill_mask(ids, 3, 4, adaptive=adaptive, interval=interval))
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)


def test_fixllm_kv_statistics_count_the_interval_keys():
    from megatron.model.sepllm.stats import kv_statistics

    args = brute.args(USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[2, 7], prefill_local_window_size=4)
    ids = _ids(7)
    stats = kv_statistics(ids, args)
    for layer, interval in enumerate([2, 7]):
        mask = brute.prefill_mask(ids, 3, 4, interval=interval)
        assert stats[f"kv_ratio/layer_{layer:02d}"] == rule.ratio(int(mask[:, -1].sum()), B * S)
        assert stats[f"attn_density/layer_{layer:02d}"] == rule.ratio(int(mask.sum()), B * (1 + S) * S // 2)
