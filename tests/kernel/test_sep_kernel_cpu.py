"""CPU tests of the Sep-Attention kernel package: metadata, references, the decomposition, the CPU fallback."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.model.sepllm.kernel import (
    build_sep_metadata,
    dense_sep_mask,
    sep_attention,
    sep_attention_decomposed,
    sep_attention_reference,
)
from tests.kernel.sep_cases import relative_error, random_flags, text_flags


def _brute_force_mask(flags, init_start, n_init, window, exclude_diagonal):
    bsz, seq = flags.shape
    e = int(exclude_diagonal)
    out = torch.zeros(bsz, seq, seq, dtype=torch.bool)
    for b in range(bsz):
        for q in range(seq):
            for k in range(q + 1):
                init = int(init_start[b]) <= k < int(init_start[b]) + n_init
                out[b, q, k] = init or bool(flags[b, k]) or (q - k <= window - e)
    return out


@pytest.mark.parametrize("n_init,window,excl", [(3, 4, True), (0, 1, True), (2, 3, False), (3, 100, True)])
def test_dense_mask_is_the_rule(n_init, window, excl):
    flags = random_flags(2, 23, p=0.2, seed=1)
    init_start = torch.tensor([0, 5])
    got = dense_sep_mask(flags, init_start, n_init, window, excl)
    assert torch.equal(got, _brute_force_mask(flags, init_start, n_init, window, excl))


def test_metadata_lists_positions_and_counts():
    flags = random_flags(3, 300, p=0.15, seed=2)
    flags[2] = False  # a row without separators
    init_start = torch.tensor([0, 7, 298])  # the last row's initial tokens run past the end
    meta = build_sep_metadata(flags, init_start, n_init=3)
    assert meta.positions.shape == (3, 300) and meta.cum.shape == (3, 301)
    assert meta.positions.dtype == torch.int32 and meta.cum.dtype == torch.int32
    for b in range(3):
        listed = [k for k in range(300) if flags[b, k] or int(init_start[b]) <= k < int(init_start[b]) + 3]
        n = len(listed)
        assert int(meta.cum[b, -1]) == n
        assert meta.positions[b, :n].tolist() == listed
        assert meta.listed[b].nonzero().flatten().tolist() == listed
        expected_cum = [sum(1 for p in listed if p < x) for x in range(301)]
        assert meta.cum[b].tolist() == expected_cum


def test_metadata_shapes_do_not_depend_on_separator_count():
    a = build_sep_metadata(random_flags(2, 64, p=0.05, seed=3), torch.zeros(2, dtype=torch.long), 3)
    b = build_sep_metadata(random_flags(2, 64, p=0.6, seed=4), torch.zeros(2, dtype=torch.long), 3)
    assert [t.shape for t in a] == [t.shape for t in b]


def test_metadata_rejects_bad_shapes():
    with pytest.raises(ValueError, match="init_start"):
        build_sep_metadata(torch.zeros(2, 8, dtype=torch.bool), torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="sep_flags"):
        build_sep_metadata(torch.zeros(8, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 3)


CASES = [
    # (B, H, S, D, window, exclude_diagonal, n_init, separator probability)
    (2, 2, 97, 16, 8, True, 3, 0.15),
    (1, 3, 130, 32, 16, False, 2, 0.15),
    (2, 1, 64, 16, 1, True, 0, 0.3),
    (1, 2, 50, 16, 64, True, 3, 0.15),  # window >= S: causal
    (1, 1, 80, 16, 5, True, 4, 0.0),  # StreamingLLM pattern: no separators
    (1, 1, 40, 8, 3, True, 1, 1.0),  # every token a separator: causal
]


@pytest.mark.parametrize("case", CASES)
def test_decomposition_matches_dense_reference(case):
    bsz, heads, seq, dim, window, excl, n_init, p = case
    torch.manual_seed(0)
    q, k, v = (torch.randn(bsz, heads, seq, dim, dtype=torch.float64) for _ in range(3))
    flags = random_flags(bsz, seq, p=p, seed=5)
    init_start = torch.randint(0, 4, (bsz,))
    meta = build_sep_metadata(flags, init_start, n_init)
    ref = sep_attention_reference(q, k, v, flags, init_start, n_init, window, excl)
    got = sep_attention_decomposed(q, k, v, meta, window, excl)
    assert relative_error(got, ref) < 1e-6
    if p == 1.0 or window >= seq:
        causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert relative_error(ref, causal) < 1e-10


def test_decomposition_on_real_text_flags(pythia_tokenizer_path):
    flags = text_flags(pythia_tokenizer_path, 2, 256)
    frac = flags.float().mean().item()
    assert 0.08 < frac < 0.35, f"separator fraction of the sample text is {frac}"
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 256, 16, dtype=torch.float64) for _ in range(3))
    init_start = torch.zeros(2, dtype=torch.long)
    meta = build_sep_metadata(flags, init_start, 3)
    ref = sep_attention_reference(q, k, v, flags, init_start, 3, 32)
    assert relative_error(sep_attention_decomposed(q, k, v, meta, 32), ref) < 1e-6


def test_cpu_fallback_forward_and_backward():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 70, 16, requires_grad=True) for _ in range(3))
    flags = random_flags(2, 70, seed=6)
    init_start = torch.zeros(2, dtype=torch.long)
    out = sep_attention(q, k, v, flags, init_start, 3, 8)
    mask = _brute_force_mask(flags, init_start, 3, 8, True).unsqueeze(1)  # written from the definition
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert relative_error(out, sdpa) < 1e-5
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), g)
    for a, e in zip(grads, sdpa_grads):
        assert relative_error(a, e) < 1e-5


def test_sep_attention_rejects_bad_arguments():
    q = torch.randn(1, 1, 8, 16)
    flags = torch.zeros(1, 8, dtype=torch.bool)
    start = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="window"):
        sep_attention(q, q, q, flags, start, 3, 0)
    with pytest.raises(ValueError, match="sep_flags"):
        sep_attention(q, q, q, flags[:, :4], start, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        sep_attention(q, q[:, :, :4], q, flags, start, 3, 4)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from megatron.model.sepllm.kernel import build_sep_metadata, sep_attention_reference
    from megatron.model.sepllm.kernel.op import _SepAttentionFn, sep_attn_fwd_op
    torch.manual_seed(0)
    worst = 0.0
    cases = [  # (B, H, S, D, W, E, n_init, separator probability, path)
        (2, 2, 150, 16, 8, True, 3, 0.15, "fn"),
        (1, 2, 97, 32, 16, False, 2, 0.15, "op"),  # the torch.library custom op and its registered backward
        (1, 1, 60, 16, 70, True, 3, 0.15, "fn"),  # window >= S
        (1, 1, 400, 16, 8, True, 3, 0.3, "fn"),  # long enough for the unmasked compact tiles of every kernel
    ]
    # The fused backward (one pass, dQ by atomics) on its own edge cases: grouped K/V heads (the op repeats them
    # before the kernels; gradients flow back through the repeat), lengths one past / one short of the tiles
    # (D 16/32 tiles: fwd 64x32, fused band 32x64, fused compact 64x64), a one-token window, no initial tokens,
    # every token a separator.
    fused_cases = [  # (B, H, H_kv, S, D, W, E, n_init, separator probability)
        (1, 4, 2, 129, 16, 8, True, 3, 0.2),
        (2, 2, 1, 65, 32, 1, True, 0, 0.3),
        (1, 2, 2, 127, 16, 33, False, 2, 0.15),
        (1, 1, 1, 96, 16, 4, True, 3, 1.0),
    ]
    from megatron.model.sepllm.kernel import op, settings
    from megatron.model.sepllm.kernel.reference import expand_kv_heads

    worst_by = {}

    def check(label, q, k, v, flags, start, n_init, W, E, run):
        out = run()
        g = torch.randn_like(out)
        got = (out,) + torch.autograd.grad(out, (q, k, v), g)
        ref = sep_attention_reference(q, k, v, flags, start, n_init, W, E, compute_dtype=torch.float64)
        exp = (ref,) + torch.autograd.grad(ref, (q, k, v), g)
        for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
            err = float((a.detach().double() - e.detach().double()).norm() / e.double().norm())
            worst_by[f"{label} {name}"] = max(worst_by.get(f"{label} {name}", 0.0), err)

    for gather, backward in (("off", "split"), ("on", "split"), ("on", "fused")):
        # indirect row loads / listed K/V gathered into contiguous buffers; split / fused backward
        settings.configure(settings.KernelSettings(gather=gather, backward=backward))
        for (B, H, S, D, W, E, n_init, p, path) in cases:
            q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
            flags = torch.rand(B, S) < p
            start = torch.randint(0, 5, (B,))
            meta = build_sep_metadata(flags, start, n_init)
            args = (q, k, v, meta.positions, meta.cum, W - int(E), D ** -0.5)
            run = (lambda: _SepAttentionFn.apply(*args)) if path == "fn" else (lambda: sep_attn_fwd_op(*args)[0])
            check(f"{backward}/gather {gather} S{S}", q, k, v, flags, start, n_init, W, E, run)
    settings.configure(settings.KernelSettings(backward="fused"))
    for (B, H, H_kv, S, D, W, E, n_init, p) in fused_cases:
        q = torch.randn(B, H, S, D, requires_grad=True)
        k, v = (torch.randn(B, H_kv, S, D, requires_grad=True) for _ in range(2))
        flags = torch.rand(B, S) < p
        start = torch.randint(0, 5, (B,))
        meta = build_sep_metadata(flags, start, n_init)
        run = lambda: _SepAttentionFn.apply(q, expand_kv_heads(k, H), expand_kv_heads(v, H), meta.positions,
                                            meta.cum, W - int(E), D ** -0.5)
        check(f"fused S{S} H{H}/{H_kv} W{W}", q, k, v, flags, start, n_init, W, E, run)
    assert op._FUSED_B.fn is not None and op._FUSED_C.fn is not None, "the fused kernels never ran"
    settings.configure(None)
    worst = max(worst_by.values())
    # torch.compile with the flags-taking op: every call must use its own micro-batch's separators (no metadata
    # baked into the trace), forward and backward.
    from megatron.model.sepllm.kernel.op import sep_attn_fwd_flags_op
    fn = torch.compile(lambda q, k, v, f, s: sep_attn_fwd_flags_op(q, k, v, f, s, 3, 7, 0.25)[0], backend="eager",
                       fullgraph=True)
    for step in range(2):
        q, k, v = (torch.randn(1, 2, 90, 16, requires_grad=True) for _ in range(3))
        flags = torch.rand(1, 90) < (0.1 + 0.3 * step)
        start = torch.zeros(1, dtype=torch.long)
        out = fn(q, k, v, flags, start)
        g = torch.randn_like(out)
        got = (out,) + torch.autograd.grad(out, (q, k, v), g)
        ref = sep_attention_reference(q, k, v, flags, start, 3, 8, True, 0.25, compute_dtype=torch.float64)
        exp = (ref,) + torch.autograd.grad(ref, (q, k, v), g)
        for a, e in zip(got, exp):
            worst = max(worst, float((a.detach().double() - e.detach().double()).norm() / e.double().norm()))
    print("BY CASE", {key: f"{val:.1e}" for key, val in worst_by.items() if val >= 1e-5})
    print("WORST", worst)
    """
)


def test_triton_kernels_in_interpreter_mode():
    """Runs the Triton forward and backward kernels on CPU through TRITON_INTERPRET=1 (tiny shapes)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=repo)
    if proc.returncode != 0 and "only 0-dimensional arrays" in proc.stderr:
        pytest.skip("triton's interpreter cannot run with this numpy (scalar __index__ of a 1-element array)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 1e-5, f"interpreted kernel differs from the reference: relative error {worst}; " \
                         f"{proc.stdout.split('BY CASE')[-1].split('WORST')[0].strip()}"


def test_custom_op_fake_shapes_follow_the_inputs():
    """The custom op's fake kernels (what torch.compile traces) give the real outputs' shapes, dtypes, strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron.model.sepllm.kernel.op import sep_attn_bwd_op, sep_attn_fwd_op

    with FakeTensorMode():
        qkv = torch.empty(2, 33, 3, 4, 16, dtype=torch.bfloat16)  # [B, S, 3, H, D]: q/k/v are strided views
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        pos = torch.empty(2, 33, dtype=torch.int32)
        cum = torch.empty(2, 34, dtype=torch.int32)
        out, lse = sep_attn_fwd_op(q, k, v, pos, cum, 7, 0.25)
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == torch.empty_like(q).stride()
        assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32
        dq, dk, dv = sep_attn_bwd_op(out, q, k, v, out, lse, pos, cum, 7, 0.25)
        assert [t.shape for t in (dq, dk, dv)] == [q.shape] * 3
        odd = torch.empty(2, 4, 16, 33, dtype=torch.float16).transpose(2, 3)  # head dim not unit-stride
        out2, _ = sep_attn_fwd_op(odd, odd, odd, pos, cum, 7, 0.25)
        assert out2.is_contiguous()


class _FakeCompiled:
    """Stands in for triton's CompiledKernel: records direct launches."""

    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, object(), object()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *args):
        self.log.append(("direct", (g0, g1, g2), args))


class _FakeJit:
    """Stands in for a ``@triton.jit`` function: ``fn[grid](*args, **opts)`` compiles (logged) and launches."""

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages):
            self.log.append(("jit", grid, args))
            return _FakeCompiled(self.log)
        return launch


def test_kernel_launcher_caches_per_specialisation(monkeypatch):
    import types

    from megatron.model.sepllm.kernel import op

    fake_triton = types.ModuleType("triton")
    fake_triton.knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None,
                                                                           launch_exit_hook=None))
    monkeypatch.setitem(sys.modules, "triton", fake_triton)
    monkeypatch.setattr(op, "_current_raw_stream", lambda index: 0)
    monkeypatch.setattr(op.KernelLauncher, "failed", False)
    launcher = op.KernelLauncher("fake")
    launcher.fn = _FakeJit()
    buf = torch.zeros(64, dtype=torch.float16)
    a, b = buf[:16], buf[4:20]  # 16-byte aligned / misaligned (8-byte offset) views
    launcher((2, 3, 1), (a,), (5, 0.5, True), 4, 2)
    launcher((2, 3, 1), (buf[16:32],), (5, 0.5, True), 4, 2)  # another tensor, same dtype and alignment
    launcher((4, 3, 1), (b,), (5, 0.5, True), 4, 2)  # other alignment: triton compiles again
    launcher((4, 3, 1), (a,), (6, 0.5, True), 4, 2)  # other integer argument
    launcher((4, 3, 1), (a,), (5, 0.5, True), 8, 2)  # other launch option
    kinds = [entry[0] for entry in launcher.fn.log]
    assert kinds == ["jit", "direct", "jit", "jit", "jit"], kinds
    assert launcher.fn.log[1][1] == (2, 3, 1) and launcher.fn.log[1][2][0].data_ptr() == buf[16:].data_ptr()

    def broken_run(*args):
        raise TypeError("launcher signature changed")

    for compiled in launcher.compiled.values():
        monkeypatch.setattr(compiled, "run", broken_run)
    with pytest.warns(UserWarning, match="direct launch"):
        launcher((2, 3, 1), (a,), (5, 0.5, True), 4, 2)  # falls back to triton's path and stays there
    assert op.KernelLauncher.failed is True
    assert launcher.fn.log[-1][0] == "jit"
    launcher((2, 3, 1), (a,), (5, 0.5, True), 4, 2)
    assert launcher.fn.log[-1][0] == "jit"  # stays on triton's path, without a second warning

    from megatron.model.sepllm.kernel import settings

    monkeypatch.setattr(op.KernelLauncher, "failed", False)
    fresh = op.KernelLauncher("fake")
    fresh.fn = _FakeJit()
    settings.configure(settings.KernelSettings(fast_launch=False))
    try:
        fresh((2, 3, 1), (a,), (5, 0.5, True), 4, 2)
        fresh((2, 3, 1), (a,), (5, 0.5, True), 4, 2)
    finally:
        settings.configure(None)
    assert [entry[0] for entry in fresh.fn.log] == ["jit", "jit"]  # sep_attn_kernel_fast_launch: false


def test_kernel_settings_from_config_and_environment():
    """The kernel keys reach the op through the resolved config; $SEP_ATTN_* override them on the launcher only,
    are recorded, and bad values are one configuration error naming the key or variable."""
    from megatron.model.sepllm.kernel import op, settings
    from megatron.neox_arguments import ConfigError, Environment, NeoXArgs

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
                tokenizer_type="CharLevelTokenizer", train_micro_batch_size_per_gpu=1)

    def resolve(environ=None, **keys):
        return NeoXArgs.from_dict({**base, **keys}, env=Environment(cuda_device_count=0, environ=environ or {}))

    args = resolve(sep_attn_kernel_gather="off", sep_attn_kernel_blocks={"64": {"fwd": [32, 16, 2, 2]}},
                   sep_attn_kernel_backward="fused")
    assert args.sep_attn_kernel_env is None
    try:
        settings.configure(settings.KernelSettings.from_args(args))
        assert settings.ACTIVE.backward == "fused"
        assert not op._gather_compact(10 ** 6)
        assert op._block_config(64)["fwd"] == (32, 16, 2, 2) and op._block_config(64)["dq"] == op._DEFAULT_BLOCKS[64]["dq"]
        assert op._block_config(128) == op._DEFAULT_BLOCKS[128]
        settings.configure(None)
        assert settings.ACTIVE.backward == "split"  # the default
        assert op._gather_compact(op._GATHER_MIN_SEQ) and not op._gather_compact(op._GATHER_MIN_SEQ - 1)
        assert op._block_config(64)["fwd"] == op._DEFAULT_BLOCKS[64]["fwd"]
    finally:
        settings.configure(None)
    env = resolve({"SEP_ATTN_GATHER": "1", "SEP_ATTN_FAST_LAUNCH": "0",
                   "SEP_ATTN_BLOCKS": '{"128": {"fused_c": [64, 32, 4, 2]}}', "SEP_ATTN_BACKWARD": "fused"},
                  sep_attn_kernel_gather="off")
    assert (env.sep_attn_kernel_gather, env.sep_attn_kernel_fast_launch) == ("on", False)
    assert env.sep_attn_kernel_backward == "fused"
    assert env.sep_attn_kernel_blocks == {"128": {"fused_c": [64, 32, 4, 2]}}
    assert env.sep_attn_kernel_env == ["SEP_ATTN_BACKWARD", "SEP_ATTN_BLOCKS", "SEP_ATTN_FAST_LAUNCH",
                                       "SEP_ATTN_GATHER"]
    with pytest.raises(ConfigError, match=r"sep_attn_kernel_backward.*atomic.*SEP_ATTN_BACKWARD"):
        resolve({"SEP_ATTN_BACKWARD": "atomic"})
    with pytest.raises(ConfigError, match=r"sep_attn_kernel_backward"):
        resolve(sep_attn_kernel_backward="both")
    with pytest.raises(ConfigError, match=r"sep_attn_kernel_gather.*yes.*SEP_ATTN_GATHER"):
        resolve({"SEP_ATTN_GATHER": "yes"})
    with pytest.raises(ConfigError, match=r"key 'sep_attn_kernel_blocks'.*four positive integers"):
        resolve(sep_attn_kernel_blocks={"64": {"fwd": [32, 16]}})
    with pytest.raises(ConfigError, match=r"key 'sep_attn_kernel_blocks' \(from \$SEP_ATTN_BLOCKS\)"):
        resolve({"SEP_ATTN_BLOCKS": '{"64": {"bwd": [1, 1, 1, 1]}}'})


def test_metadata_cache_follows_tensor_identity_and_versions():
    from megatron.model.sepllm.kernel.op import MetadataCache

    cache = MetadataCache(size=2)
    flags = random_flags(2, 40, seed=7)
    start = torch.zeros(2, dtype=torch.long)
    first = cache.get(flags, start, 3)
    assert cache.get(flags, start, 3) is first  # same micro-batch: built once
    assert cache.get(flags, start, 2) is not first  # other n_init
    assert cache.get(flags.clone(), start, 3) is not first  # equal values, other tensor: rebuilt
    flags[0, 5] = not bool(flags[0, 5])  # in place: the version counter moves, the entry no longer matches
    fresh = cache.get(flags, start, 3)
    assert fresh is not first and torch.equal(fresh.listed[0], flags[0] | (torch.arange(40) < 3))
    assert len(cache.cache.entries) == 2


def test_new_separator_flags_need_no_recompile():
    """Under torch.compile the op is one opaque node: micro-batches with other separator positions (same shapes)
    reuse the compiled graph, and each gets its own mask (the results follow the flags)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(lambda q, k, v, f, s: sep_attention(q, k, v, f, s, 3, 6), backend=counter, fullgraph=True)
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    start = torch.zeros(1, dtype=torch.long)
    outs = []
    for seed in (1, 2, 3):
        flags = random_flags(1, 40, p=0.2, seed=seed)
        outs.append(fn(q, k, v, flags, start))
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=_brute_force_mask(flags, start, 3, 6, True).unsqueeze(1))
        assert relative_error(outs[-1], want) < 1e-5
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for new flags of the same shape"
    assert relative_error(outs[0], outs[1]) > 1e-3  # the flags did change the result

