"""GPU paths of the kernel mode (compiled FlexAttention and the Sep-Attention kernel dispatch)."""
import pytest
import torch

from megatron.model.attention.sep_kernel_mode import SepKernelModeAttention
from megatron.model.sepllm.meta import build_attn_meta
from tests.sepllm import brute


def _setup(pos_emb, windows, seq=256, dtype=torch.bfloat16):
    layers = len(windows)
    args = brute.args(num_layers=layers, num_attention_heads=4, pos_emb=pos_emb, seq_length=seq,
                      USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=windows)
    gen = torch.Generator().manual_seed(0)
    ids = brute.random_ids(2, seq, gen).cuda()
    meta = build_attn_meta(ids, None, args)
    q, k, v = (torch.randn(2, 4, seq, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    return args, ids, meta, q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_kernel_mode_on_cuda_matches_float32_reference(pos_emb):
    windows = [512, 16, 16, 1]
    args, ids, meta, q, k, v = _setup(pos_emb, windows)
    for layer, window in enumerate(windows):
        out = SepKernelModeAttention(args, layer)(q, k, v, meta)
        out.float().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        mask = brute.prefill_mask(ids.cpu(), 3, window).cuda()
        bias = None
        if pos_emb == "alibi":
            from megatron.model.positional_embeddings import alibi_bias, alibi_slopes

            bias = alibi_bias(meta.rope_pos, torch.tensor(alibi_slopes(4), device="cuda"))
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        scores = qf @ kf.transpose(-1, -2) / 8.0 + (0 if bias is None else bias)
        ref = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), -1) @ vf
        ref.sum().backward()
        assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-2, (pos_emb, window)
        for got, want in zip(grads, (qf.grad, kf.grad, vf.grad)):
            assert (got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6) < 5e-2, (pos_emb, window)
