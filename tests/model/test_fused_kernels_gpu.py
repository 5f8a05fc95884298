"""Triton fused rotary vs its PyTorch twin on GPU (forward and backward, strided q/k, per-row positions)."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [16, 64])
def test_fused_rotary_matches_reference(dtype, rot):
    from megatron.fused_kernels import fused_apply_rotary, rotary_reference
    from megatron.model.positional_embeddings import rotary_inv_freq

    torch.manual_seed(0)
    B, S, H, D = 3, 257, 12, 64
    qkv = torch.randn(B, S, H, 3, D, device="cuda", dtype=dtype, requires_grad=True)
    q, k = qkv[:, :, :, 0], qkv[:, :, :, 1]  # strided views, as the attention layer passes them
    pos = torch.randint(0, 4096, (B, S), device="cuda")
    inv_freq = rotary_inv_freq(rot, 10000.0).cuda()
    fq, fk = fused_apply_rotary(q, k, pos, inv_freq)
    rq, rk = rotary_reference(q, pos, inv_freq), rotary_reference(k, pos, inv_freq)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fq, rq, **tol)
    torch.testing.assert_close(fk, rk, **tol)
    gq, gk = torch.randn_like(fq), torch.randn_like(fk)
    (g_fused,) = torch.autograd.grad((fq * gq).sum() + (fk * gk).sum(), qkv)
    (g_ref,) = torch.autograd.grad((rq * gq).sum() + (rk * gk).sum(), qkv)
    torch.testing.assert_close(g_fused, g_ref, **tol)
    assert torch.count_nonzero(g_fused[:, :, :, 2]) == 0  # v untouched


def test_model_with_rope_fusion_matches_pytorch_path():
    from megatron.model import build_sequential_model
    from model_helpers import make_args

    shape = dict(hidden_size=256, seq_length=128, max_position_embeddings=128, padded_vocab_size=512)
    torch.manual_seed(0)
    plain = build_sequential_model(make_args(**shape)).cuda()
    fused = build_sequential_model(make_args(**shape, rope_fusion=True)).cuda()
    fused.load_state_dict(plain.state_dict())
    assert fused.sequential[2].attention.fused_rotary is not None
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    pos = torch.arange(128, device="cuda").expand(2, -1)
    torch.testing.assert_close(fused((ids, pos)), plain((ids, pos)), rtol=1e-4, atol=1e-4)
