"""Forward+backward timing of SepLLM attention implementations against dense causal SDPA, in one run.

Compared per case (all bf16, same q/k/v, same separator flags):
  sdpa      dense causal ``scaled_dot_product_attention`` (FlashAttention backend): the baseline;
  mask      the mask-based path: SDPA with a boolean ``B x 1 x S x S`` mask built from the SepLLM rule;
  flex128   the reference design: FlexAttention with a ``mask_mod`` that looks the dense mask up, 128x128 blocks;
  kernel    this project's Sep-Attention kernel (metadata built once, outside the timed region, as in training).
Separator flags come from real English text tokenised with the Pythia tokenizer (token ids in a ``.npy`` made by
``--prepare-text``) and from random flags with p = 0.15. Prints each time in ms, the ratio to SDPA, the kept
fraction of causal entries, and the kernel's peak extra memory.

Two timing methods, the same for every path:
  per-call   each fwd+bwd alone between two CUDA events with a synchronise after it (median): host launch time
             that the GPU waits for is counted;
  b2b        back to back, as in training: ``--b2b-iters`` fwd+bwd calls after warm-up between one pair of CUDA
             events, no synchronise in between (mean per call); host work overlaps the GPU's.
``host us`` is the CPU time to issue one kernel fwd+bwd (and SDPA's), measured around the back-to-back loop.

The first table's kernel columns use the first backward of ``--backward``. A second table compares, on the same
inputs, every backward of ``--backward`` (``split``: dQ + two dK/dV kernels; ``fused``: one pass, dQ by atomics;
config key ``sep_attn_kernel_backward``), eager (b2b as above) and, with ``--graphs``, captured once as a CUDA
graph of the whole fwd+bwd and replayed back to back (``graph``: no host work per call), each as a ratio to
SDPA eager b2b and (graphed) to SDPA graphed. SDPA's graph is captured through autograd; the kernel's captures
the op's forward and backward functions (the launches its autograd Function issues, without the engine).
``bench/graph_capture_probe.py`` captures the kernel each way (autograd Function, custom op, these functions):
on an H200 all three captured and replayed in the same time (docs/sep_attention_kernel.md, round 4). ``--blocks`` takes the tile table of
``python -m megatron.model.sepllm.kernel.tune --json`` (the format of the key ``sep_attn_kernel_blocks``).

    python bench/bench_sep_attention.py --prepare-text data/sep_bench/tokens.npy \
        --tokenizer ../shared/data/20B_tokenizer.json /usr/share/common-licenses/*      # on a CPU machine
    python bench/bench_sep_attention.py --tokens data/sep_bench/tokens.npy               # on the GPU machine
    python bench/bench_sep_attention.py --no-flex --graphs --backward split,fused        # old vs new backward
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.model.sepllm.kernel import build_sep_metadata, dense_sep_mask, sep_attention, settings  # noqa: E402
from megatron.model.sepllm.kernel.op import launch_constants, sep_backward, sep_forward  # noqa: E402
from megatron.neox_arguments.kernel_knobs import BACKWARD_MODES, parse_blocks  # noqa: E402

PYTHIA_SEPARATOR_IDS = (15, 13, 32, 2, 28, 27, 209, 186, 187)
N_INIT = 3
CASES = [  # (B, H, S, D, W)
    (8, 12, 2048, 64, 64),
    (8, 12, 2048, 64, 256),
    (2, 12, 8192, 64, 256),
    (1, 16, 32768, 128, 256),
]


def prepare_text(out_path: str, tokenizer_path: str, text_files: list[str]) -> None:
    """Tokenises the given text files (concatenated) into an int32 ``.npy`` of token ids."""
    from tokenizers import Tokenizer

    if not text_files:
        raise SystemExit("--prepare-text needs at least one text file")
    tok = Tokenizer.from_file(tokenizer_path)
    ids: list[int] = []
    for path in text_files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids.extend(tok.encode(f.read()).ids)
        ids.append(0)  # <|endoftext|> between documents, as in packed training data
    arr = np.asarray(ids, dtype=np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, out_path)
    frac = np.isin(arr, PYTHIA_SEPARATOR_IDS).mean()
    print(f"wrote {out_path}: {arr.size} tokens, separator fraction {frac:.3f}")


def text_flags(tokens: np.ndarray, bsz: int, seq: int, device) -> torch.Tensor:
    """``[bsz, seq]`` separator flags from consecutive windows of the token stream (wrapping around)."""
    need = bsz * seq
    reps = need // tokens.size + 1
    stream = np.tile(tokens, reps)[:need].reshape(bsz, seq)
    ids = torch.from_numpy(stream.astype(np.int64)).to(device)
    return torch.isin(ids, torch.tensor(PYTHIA_SEPARATOR_IDS, device=device))


def kept_fraction(meta, seq: int, window: int) -> float:
    """Fraction of the causal entries the rule keeps (E = 1), from the metadata only."""
    lo_off = window - 1
    q = torch.arange(seq, device=meta.cum.device)
    band = torch.clamp(q, max=lo_off) + 1
    compact = meta.cum.long().gather(1, torch.clamp(q - lo_off, 0, seq).expand(meta.cum.shape[0], seq))
    kept = (band.unsqueeze(0) + compact).sum().item()
    return kept / (meta.cum.shape[0] * seq * (seq + 1) / 2)


def time_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_b2b_ms(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(GPU ms per call, host us per call) of ``iters`` back-to-back calls after ``warmup`` calls, no sync between."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, host


_PROFILED: list = []


def host_profile(fn, title: str, calls: int = 50, top: int = 18) -> None:
    """cProfile of ``calls`` back-to-back calls: where the host time of one fwd+bwd goes (tottime order)."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    print(f"## host profile, {title}: {calls} fwd+bwd calls\n{text.getvalue()}", flush=True)


def time_graphed_b2b_ms(fn, iters: int) -> float:
    """GPU ms per call of ``fn`` captured once as a CUDA graph and replayed ``iters`` times back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, fills caches) outside the capture, as torch documents
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / iters


def with_backward(mode: str, blocks: dict):
    """Makes ``mode`` the kernel's backward (and ``blocks`` its tile overrides) for the launches that follow."""
    settings.configure(settings.KernelSettings(blocks=blocks, backward=mode))


def fwd_bwd(attn, q, k, v, dout):
    def run():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def op_fwd_bwd(q, k, v, dout, meta, window: int):
    """The kernel's forward and backward launches without autograd (what ``_SepAttentionFn`` calls)."""
    lo_off, scale = launch_constants(window, q.shape[-1])

    def run():
        out, lse = sep_forward(q, k, v, meta.positions, meta.cum, lo_off, scale)
        sep_backward(dout, q, k, v, out, lse, meta.positions, meta.cum, lo_off, scale)
    return run


def _flex_functions():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return create_block_mask, torch.compile(flex_attention, dynamic=False)


_FLEX_BUFFERS: dict = {}


def bench_case(case, flags, label, args, flex) -> dict:
    bsz, heads, seq, dim, window = case
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(seq + window)
    q, k, v = (torch.randn(bsz, heads, seq, dim, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    dout = torch.randn_like(q)
    init_start = torch.zeros(bsz, dtype=torch.long, device=dev)
    row = {"case": f"B{bsz} H{heads} S{seq} D{dim} W{window}", "flags": label}
    meta = build_sep_metadata(flags, init_start, N_INIT)
    row["sep_frac"] = flags.float().mean().item()
    row["kept"] = kept_fraction(meta, seq, window)
    row["meta_ms"] = time_ms(lambda: build_sep_metadata(flags, init_start, N_INIT), 3, 20)
    sdpa_run = fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, dout)
    row["sdpa"] = time_ms(sdpa_run, args.warmup, args.iters)
    row["sdpa_b2b"], row["sdpa_host_us"] = time_b2b_ms(sdpa_run, args.warmup, args.b2b_iters)

    kernel = lambda a, b, c: sep_attention(a, b, c, flags, init_start, N_INIT, window, meta=meta)  # noqa: E731
    if args.graphs:
        row["sdpa_graph"] = time_graphed_b2b_ms(sdpa_run, args.b2b_iters)
    grads = {}
    for mode in args.backward:
        with_backward(mode, args.blocks)
        run = fwd_bwd(kernel, q, k, v, dout)
        row[f"{mode}_b2b"], row[f"{mode}_host_us"] = time_b2b_ms(run, args.warmup, args.b2b_iters)
        if args.graphs:
            row[f"{mode}_graph"] = time_graphed_b2b_ms(op_fwd_bwd(q, k, v, dout, meta, window), args.b2b_iters)
        out = kernel(q, k, v)
        grads[mode] = (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)
    first = args.backward[0]
    for mode in args.backward[1:]:  # each backward against the first: same forward, gradients to bf16 rounding
        row[f"{mode}_vs_{first}"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                        for a, b in zip(grads[mode], grads[first]))
    del grads
    with_backward(first, args.blocks)  # the first table's kernel columns
    row["kernel"] = time_ms(fwd_bwd(kernel, q, k, v, dout), args.warmup, args.iters)
    row["kernel_b2b"], row["kernel_host_us"] = time_b2b_ms(fwd_bwd(kernel, q, k, v, dout), args.warmup,
                                                           args.b2b_iters)
    if args.host_profile and not _PROFILED:
        _PROFILED.append(row["case"])
        for mode in args.backward:
            with_backward(mode, args.blocks)
            host_profile(fwd_bwd(kernel, q, k, v, dout), f"kernel ({mode} backward) {row['case']} {label}")
        with_backward(first, args.blocks)
        host_profile(sdpa_run, f"sdpa {row['case']} {label}")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(kernel, q, k, v, dout)()
    torch.cuda.synchronize()
    row["kernel_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    mask = None
    try:
        mask = dense_sep_mask(flags, init_start, N_INIT, window).unsqueeze(1)
        if args.check:
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask) \
                    if seq <= 8192 else None
                if ref is not None:
                    got = kernel(q, k, v).float()
                    row["rel_err"] = ((got - ref).norm() / ref.norm()).item()
                    del ref, got
        mask_run = fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, dout)
        row["mask"] = time_ms(mask_run, args.warmup, args.iters)
        row["mask_b2b"], _ = time_b2b_ms(mask_run, 1, max(3, args.b2b_iters // 4))
    except torch.OutOfMemoryError:
        row["mask"] = row["mask_b2b"] = float("nan")
    torch.cuda.empty_cache()

    if flex is not None and mask is not None:
        create_block_mask, flex_attention = flex
        try:
            # One lookup buffer per shape, refilled in place: the compiled kernel keeps its guards and is
            # compiled once per shape, not once per flag pattern.
            key = tuple(mask.shape)
            if key not in _FLEX_BUFFERS:
                buf = torch.empty(bsz, seq, seq, dtype=torch.bool, device=dev)

                def mask_mod(b, h, q_idx, kv_idx, buf=buf):
                    return buf[b, q_idx, kv_idx]

                _FLEX_BUFFERS.clear()  # free the previous shape's buffer first
                _FLEX_BUFFERS[key] = (buf, mask_mod)
            buf, mask_mod = _FLEX_BUFFERS[key]
            buf.copy_(mask[:, 0])
            t0 = time.perf_counter()
            block_mask = create_block_mask(mask_mod, bsz, 1, seq, seq, device=dev, BLOCK_SIZE=128)
            torch.cuda.synchronize()
            row["flex_mask_ms"] = (time.perf_counter() - t0) * 1e3
            row["flex128"] = time_ms(fwd_bwd(lambda a, b, c: flex_attention(a, b, c, block_mask=block_mask),
                                             q, k, v, dout), 2, max(3, args.iters // 2))
        except torch.OutOfMemoryError:
            row["flex128"] = float("nan")
    del mask
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-text", metavar="OUT_NPY", help="tokenise text files into OUT_NPY and exit")
    parser.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                            "20B_tokenizer.json"))
    parser.add_argument("text_files", nargs="*")
    parser.add_argument("--tokens", default="data/sep_bench/tokens.npy", help="token ids (.npy) for real flags")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--b2b-iters", type=int, default=50, help="calls in the back-to-back timing")
    parser.add_argument("--host-profile", action="store_true", help="cProfile the host side of the first case")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention reference design")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the kernel-vs-mask check")
    parser.add_argument("--cases", default="all", help="comma-separated case indices (0-3) or 'all'")
    parser.add_argument("--backward", default="split,fused",
                        help=f"kernel backwards to compare, comma-separated ({', '.join(BACKWARD_MODES)}); the first "
                             "one fills the first table")
    parser.add_argument("--graphs", action="store_true", help="also time fwd+bwd captured as a CUDA graph")
    parser.add_argument("--blocks", help="tile overrides: JSON text or a file (tune --json output)")
    args = parser.parse_args()
    args.backward = args.backward.split(",")
    bad = [m for m in args.backward if m not in BACKWARD_MODES]
    if bad or not args.backward:
        raise SystemExit(f"--backward: {bad or args.backward} not in {', '.join(BACKWARD_MODES)}")
    if args.blocks and os.path.exists(args.blocks):
        with open(args.blocks) as f:
            args.blocks = f.read()
    try:
        args.blocks = parse_blocks(args.blocks, "--blocks")
    except ValueError as err:
        raise SystemExit(str(err)) from None

    if args.prepare_text:
        prepare_text(args.prepare_text, args.tokenizer, args.text_files)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_sep_attention.py needs a CUDA GPU")
    if not os.path.exists(args.tokens):
        raise SystemExit(f"--tokens {args.tokens} not found; make it with --prepare-text on a machine with text")
    tokens = np.load(args.tokens)
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    flex = None if args.no_flex else _flex_functions()
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} bf16 fwd+bwd; per-call: medians of "
          f"{args.iters} synchronised calls (flex: {max(3, args.iters // 2)}); b2b: mean of {args.b2b_iters} "
          f"back-to-back calls; n_init={N_INIT}, E=1; kernel columns: {args.backward[0]} backward")
    header = ("case", "flags", "sep%", "kept", "sdpa ms", "mask ms", "flex128 ms", "kernel ms", "kernel/sdpa",
              "mask/sdpa", "flex/sdpa", "sdpa b2b ms", "mask b2b ms", "kernel b2b ms", "kernel/sdpa b2b",
              "host us sdpa", "host us kernel", "meta ms", "kern MB", "rel err")
    print(" | ".join(header))
    rows = []
    for case in cases:
        bsz, _, seq, _, _ = case
        for label in ("text", "random"):
            flags = text_flags(tokens, bsz, seq, "cuda") if label == "text" else \
                (torch.rand(bsz, seq, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)) < 0.15)
            r = bench_case(case, flags, label, args, flex)
            cells = (r["case"], r["flags"], f"{100 * r['sep_frac']:.1f}", f"{r['kept']:.3f}", f"{r['sdpa']:.3f}",
                     f"{r['mask']:.3f}", f"{r.get('flex128', math.nan):.3f}", f"{r['kernel']:.3f}",
                     f"{r['kernel'] / r['sdpa']:.3f}", f"{r['mask'] / r['sdpa']:.2f}",
                     f"{r.get('flex128', math.nan) / r['sdpa']:.2f}", f"{r['sdpa_b2b']:.3f}",
                     f"{r['mask_b2b']:.3f}", f"{r['kernel_b2b']:.3f}", f"{r['kernel_b2b'] / r['sdpa_b2b']:.3f}",
                     f"{r['sdpa_host_us']:.0f}", f"{r['kernel_host_us']:.0f}", f"{r['meta_ms']:.3f}",
                     f"{r['kernel_mem_mb']:.0f}", f"{r.get('rel_err', math.nan):.1e}")
            print(" | ".join(cells), flush=True)
            rows.append(r)
    print_backward_table(rows, args)


def print_backward_table(rows: list, args) -> None:
    """Old vs new backward, eager vs graphed: kernel fwd+bwd per call and its ratio to SDPA, same inputs."""
    modes, first = args.backward, args.backward[0]
    print(f"\n# backward and CUDA graphs: b2b = eager back-to-back ({args.b2b_iters} calls); graph = one capture of "
          f"fwd+bwd replayed {args.b2b_iters} times; ratios over SDPA eager b2b, and graph over SDPA graph; "
          f"tiles {args.blocks or 'default table'}")
    header = ["case", "flags", "sdpa b2b ms"] + (["sdpa graph ms"] if args.graphs else [])
    for m in modes:
        header += [f"{m} b2b ms", f"{m}/sdpa b2b", f"{m} host us"]
        if args.graphs:
            header += [f"{m} graph ms", f"{m}/sdpa graph"]
    header += [f"{m} vs {first} err" for m in modes[1:]]
    print(" | ".join(header))
    for r in rows:
        cells = [r["case"], r["flags"], f"{r['sdpa_b2b']:.3f}"] + ([f"{r['sdpa_graph']:.3f}"] if args.graphs else [])
        for m in modes:
            cells += [f"{r[m + '_b2b']:.3f}", f"{r[m + '_b2b'] / r['sdpa_b2b']:.3f}", f"{r[m + '_host_us']:.0f}"]
            if args.graphs:
                cells += [f"{r[m + '_graph']:.3f}", f"{r[m + '_graph'] / r['sdpa_graph']:.3f}"]
        cells += [f"{r[m + '_vs_' + first]:.1e}" for m in modes[1:]]
        print(" | ".join(cells), flush=True)

if __name__ == "__main__":
    main()
