"""GPU exactness tests of the Triton Sep-Attention kernel against the float32 dense-mask reference."""
import pytest
import torch

from megatron.model.sepllm.kernel import build_sep_metadata, dense_sep_mask, sep_attention, sep_attention_reference
from megatron.model.sepllm.kernel import settings
from tests.kernel.sep_cases import relative_error, random_flags, text_flags

pytestmark = pytest.mark.gpu

# The fused backward sums dQ in float32 by atomics, in an order that varies between runs: its dQ is compared
# with this norm-wise bound where the split backward is compared bit for bit (an order change can move a bf16
# rounding of a few elements by one unit).
FUSED_DQ_REPEAT_TOL = 1e-3


@pytest.fixture(params=["split", "fused"])
def backward(request):
    """Runs the test with each backward (config key sep_attn_kernel_backward)."""
    settings.configure(settings.KernelSettings(backward=request.param))
    yield request.param
    settings.configure(None)


def _same(got, expected, backward):
    """(out, dq, dk, dv) equal bit for bit; dQ of the fused backward within FUSED_DQ_REPEAT_TOL."""
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        if name == "dq" and backward == "fused":
            assert relative_error(a, e) < FUSED_DQ_REPEAT_TOL, name
        else:
            assert torch.equal(a, e), name

# Norm-wise relative error bound of the issue (16-bit kernel vs float32 reference on the same inputs). Storing a
# bf16 tensor alone costs ~1.7e-3 of norm-wise relative error (8-bit mantissa), so in bf16 the kernel may also
# sit up to 25% above the error of the mask-based path run in bf16 (SDPA with the dense boolean mask).
TOL = 2e-3
BF16_SLACK = 1.25

SHAPES = [
    # (B, H, S, D, window, exclude_diagonal, n_init)
    (2, 4, 2048, 64, 64, True, 3),
    (2, 4, 2048, 64, 256, True, 3),
    (1, 4, 1000, 128, 64, True, 3),  # S not a multiple of any block
    (2, 2, 777, 64, 100, False, 4),
    (1, 2, 333, 128, 1, True, 0),  # window of one token, no initial tokens
    (1, 2, 500, 64, 600, True, 3),  # window >= S: causal (SDPA dispatch)
]


def _errors(outputs, reference):
    names = ("out", "dq", "dk", "dv")
    return {n: relative_error(a, e) for n, a, e in zip(names, outputs, reference)}


def _check(q, k, v, flags, init_start, n_init, window, excl):
    meta = build_sep_metadata(flags, init_start, n_init)
    out = sep_attention(q, k, v, flags, init_start, n_init, window, excl, meta=meta)
    g = torch.randn_like(out)
    got = (out,) + torch.autograd.grad(out, (q, k, v), g)
    ref = sep_attention_reference(q, k, v, flags, init_start, n_init, window, excl, compute_dtype=torch.float32)
    expected = (ref,) + torch.autograd.grad(ref, (q, k, v), g)
    errors = _errors(got, expected)
    mask = dense_sep_mask(flags, init_start, n_init, window, excl).unsqueeze(1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dense_errors = _errors((dense,) + torch.autograd.grad(dense, (q, k, v), g), expected)
    print(tuple(q.shape), q.dtype, f"W{window} E{int(excl)}", "kernel", {n: f"{e:.2e}" for n, e in errors.items()},
          "mask path", {n: f"{e:.2e}" for n, e in dense_errors.items()})
    bound = {n: max(TOL, BF16_SLACK * dense_errors[n]) if q.dtype == torch.bfloat16 else TOL for n in errors}
    bad = {n: (e, bound[n]) for n, e in errors.items() if not e < bound[n]}
    assert not bad, f"relative errors above their bounds (error, bound): {bad}"


def _inputs(shape, dtype, seed):
    bsz, heads, seq, dim = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(bsz, heads, seq, dim, device="cuda", dtype=dtype, generator=gen).requires_grad_(True)
            for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SHAPES)
def test_kernel_matches_reference_random_flags(case, dtype, backward):
    bsz, heads, seq, dim, window, excl, n_init = case
    q, k, v = _inputs((bsz, heads, seq, dim), dtype, seed=seq + dim)
    flags = random_flags(bsz, seq, p=0.15, seed=seq, device="cuda")
    init_start = torch.arange(bsz, device="cuda") * 3  # different initial offsets per row
    _check(q, k, v, flags, init_start, n_init, window, excl)


@pytest.mark.parametrize("window", [64, 256])
def test_kernel_matches_reference_text_flags(pythia_tokenizer_path, window, backward):
    flags = text_flags(pythia_tokenizer_path, 2, 2048, device="cuda")
    q, k, v = _inputs((2, 4, 2048, 64), torch.bfloat16, seed=window)
    _check(q, k, v, flags, torch.zeros(2, dtype=torch.long, device="cuda"), 3, window, True)


def test_extreme_separator_densities(backward):
    for p in (0.0, 1.0):
        flags = random_flags(1, 700, p=p, seed=1, device="cuda")
        q, k, v = _inputs((1, 2, 700, 64), torch.bfloat16, seed=int(p * 10))
        _check(q, k, v, flags, torch.zeros(1, dtype=torch.long, device="cuda"), 3, 32, True)


def test_no_quadratic_memory(backward):
    """The kernel path's extra memory grows linearly: quadrupling S must not grow it 16-fold."""
    extra = []
    for seq in (4096, 16384):
        q, k, v = _inputs((1, 4, seq, 64), torch.bfloat16, seed=seq)
        flags = random_flags(1, seq, seed=3, device="cuda")
        init_start = torch.zeros(1, dtype=torch.long, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = sep_attention(q, k, v, flags, init_start, 3, 256)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v, out
    assert extra[1] < 6 * extra[0], f"peak extra memory {extra} grows faster than linearly"


def test_kernel_matches_reference_prepared_text_tokens(backward):
    """Real-text flags from the benchmark's token file (bench/bench_sep_attention.py --prepare-text), if present."""
    import numpy as np
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "data" / "sep_bench" / "tokens.npy"
    if not path.exists():
        pytest.skip(f"{path} not prepared")
    from tests.kernel.sep_cases import PYTHIA_SEPARATOR_IDS

    ids = torch.from_numpy(np.load(path)[: 2 * 4096].astype(np.int64)).view(2, 4096).cuda()
    flags = torch.isin(ids, torch.tensor(PYTHIA_SEPARATOR_IDS, device="cuda"))
    q, k, v = _inputs((2, 4, 4096, 128), torch.bfloat16, seed=11)
    _check(q, k, v, flags, torch.zeros(2, dtype=torch.long, device="cuda"), 3, 256, True)


@pytest.mark.parametrize("gather", ["off", "on"])
def test_gathered_and_indirect_compact_paths(gather):
    """Both ways of reading the listed K/V (indirect rows, contiguous gathered copy) meet the exactness bound,
    with either backward."""
    q, k, v = _inputs((2, 4, 2048, 128), torch.bfloat16, seed=21)
    flags = random_flags(2, 2048, p=0.15, seed=22, device="cuda")
    for backward in ("split", "fused"):
        settings.configure(settings.KernelSettings(gather=gather, backward=backward))
        try:
            _check(q, k, v, flags, torch.tensor([0, 5], device="cuda"), 3, 256, True)
        finally:
            settings.configure(None)


def test_direct_launch_equals_triton_launch(monkeypatch, backward):
    """The cached direct launch gives bit-identical outputs and gradients to triton's own launch path (the
    fused backward's dQ to its atomics' summation order)."""
    from megatron.model.sepllm.kernel import op

    q, k, v = _inputs((2, 4, 1000, 64), torch.bfloat16, seed=31)
    flags = random_flags(2, 1000, p=0.15, seed=32, device="cuda")
    init_start = torch.zeros(2, dtype=torch.long, device="cuda")
    g = torch.randn_like(q)

    def run():
        out = sep_attention(q, k, v, flags, init_start, 3, 64)
        return (out,) + torch.autograd.grad(out, (q, k, v), g)

    used = (op._FWD, op._DQ, op._DKDV_C, op._DKDV_B) if backward == "split" else (op._FWD, op._FUSED_B, op._FUSED_C)
    monkeypatch.setattr(op.KernelLauncher, "failed", False)
    try:
        settings.configure(settings.KernelSettings(fast_launch=True, backward=backward))
        run()
        fast = run()  # second call of the same specialisation: direct launches
        assert all(len(launcher.compiled) > 0 for launcher in used)
        assert not op.KernelLauncher.failed
        settings.configure(settings.KernelSettings(fast_launch=False, backward=backward))
        slow = run()
    finally:
        settings.configure(None)
    _same(fast, slow, backward)


def test_inside_torch_compile_graph(backward):
    """The custom op composes with torch.compile (one graph, no break) and matches eager, forward and backward."""
    q, k, v = _inputs((2, 4, 777, 64), torch.bfloat16, seed=41)
    flags = random_flags(2, 777, p=0.15, seed=42, device="cuda")
    init_start = torch.zeros(2, dtype=torch.long, device="cuda")
    meta = build_sep_metadata(flags, init_start, 3)

    def layer(a, b, c):
        return sep_attention(a * 1.0, b, c, flags, init_start, 3, 64, meta=meta).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    eager_loss = layer(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert relative_error(loss, eager_loss) < 1e-3
    for a, e in zip(grads, eager_grads):
        assert relative_error(a, e) < 1e-2


@pytest.mark.parametrize("given_meta", [True, False])
def test_cuda_graph_capture_and_replay(backward, given_meta):
    """Forward and backward launch no host synchronisation: they can be captured and replayed as a CUDA graph,
    with the metadata given, or built by the op inside the graph (meta=None, as the layer calls it; the warm-up
    call left a cache entry for the same flag tensor, which the capture must not use), so new separator flags
    copied into the captured flag tensor are followed on replay."""
    q, k, v = _inputs((1, 4, 1024, 64), torch.bfloat16, seed=51)
    flags = random_flags(1, 1024, p=0.15, seed=52, device="cuda")
    init_start = torch.zeros(1, dtype=torch.long, device="cuda")
    meta = build_sep_metadata(flags, init_start, 3) if given_meta else None
    g = torch.randn_like(q)

    def step():
        out = sep_attention(q, k, v, flags, init_start, 3, 64, meta=meta)
        return (out,) + torch.autograd.grad(out, (q, k, v), g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    gen = torch.Generator(device="cuda").manual_seed(53)
    for t in (q, k, v):
        t.data.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=gen))  # new inputs, same buffers
    if not given_meta:
        flags.copy_(random_flags(1, 1024, p=0.3, seed=54, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    _same(captured, expected, backward)
