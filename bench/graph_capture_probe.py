"""Which ways of running the Sep-Attention kernel's fwd+bwd can be captured as one CUDA graph (GPU only).

Each variant runs in its own process (a failed capture can leave the CUDA context unusable) on B2 H12 S2048 D64
W64 bf16 with random separator flags: three warm-up calls on a side stream, one capture, three replays, and the
gradients of the replay compared with eager ones. Prints one line a variant: ``ok`` with the replayed ms per
call, or the first line of the error. Variants:

  sdpa             dense causal SDPA through autograd (the control: torch documents whole-network capture)
  autograd         ``sep_attention`` (the eager ``autograd.Function``), capture_error_mode "global"
  autograd_thread  the same, capture_error_mode "thread_local"
  autograd_eager_load  the same as ``autograd`` with CUDA_MODULE_LOADING=EAGER (no lazy module load in capture)
  autograd_fused   ``autograd`` with the fused backward (``sep_attn_kernel_backward: fused``)
  custom_op        the torch.library custom op with its registered autograd (what torch.compile records)
  ops              ``sep_forward`` + ``sep_backward`` called directly, no autograd engine

    python3 bench/graph_capture_probe.py              # every variant
    python3 bench/graph_capture_probe.py --variant ops
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

VARIANTS = ("sdpa", "autograd", "autograd_thread", "autograd_eager_load", "autograd_fused", "custom_op", "ops")


def run_variant(name: str) -> str:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron.model.sepllm.kernel import build_sep_metadata, sep_attention, settings
    from megatron.model.sepllm.kernel.op import launch_constants, sep_attn_fwd_op, sep_backward, sep_forward

    if name == "autograd_fused":
        settings.configure(settings.KernelSettings(backward="fused"))
    bsz, heads, seq, dim, window, n_init = 2, 12, 2048, 64, 64, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(bsz, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    flags = torch.rand(bsz, seq, device="cuda", generator=gen) < 0.15
    init_start = torch.zeros(bsz, dtype=torch.long, device="cuda")
    meta = build_sep_metadata(flags, init_start, n_init)
    lo_off, scale = launch_constants(window, dim)
    grads = [torch.empty_like(t) for t in (q, k, v)]

    def autograd_run(attn):
        def run():
            out = attn(q, k, v)
            for buf, g in zip(grads, torch.autograd.grad(out, (q, k, v), dout)):
                buf.copy_(g)
        return run

    if name == "sdpa":
        run = autograd_run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))
    elif name.startswith("autograd"):
        run = autograd_run(lambda a, b, c: sep_attention(a, b, c, flags, init_start, n_init, window, meta=meta))
    elif name == "custom_op":
        run = autograd_run(lambda a, b, c: sep_attn_fwd_op(a, b, c, meta.positions, meta.cum, lo_off, scale)[0])
    else:
        def run():
            out, lse = sep_forward(q, k, v, meta.positions, meta.cum, lo_off, scale)
            for buf, g in zip(grads, sep_backward(dout, q, k, v, out, lse, meta.positions, meta.cum, lo_off, scale)):
                buf.copy_(g)
    mode = "thread_local" if name == "autograd_thread" else "global"
    run()
    torch.cuda.synchronize()
    eager = [g.clone() for g in grads]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for g in grads:
        g.zero_()
    with torch.cuda.graph(graph, capture_error_mode=mode):
        run()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads, eager))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return f"ok {start.elapsed_time(end) / 20:.3f} ms per replay; replayed grads vs eager: rel {diff:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(run_variant(args.variant), flush=True)
        return
    for name in VARIANTS:
        env = dict(os.environ)
        if name == "autograd_eager_load":
            env["CUDA_MODULE_LOADING"] = "EAGER"
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", name], env=env,
                                  capture_output=True, text=True, timeout=180)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
            errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
            result = lines[-1] if lines else (errors[0] if errors else f"rc {proc.returncode}, no message")
        except subprocess.TimeoutExpired:
            result = "timed out after 180 s"
        print(f"{name:20s} {result}", flush=True)


if __name__ == "__main__":
    main()
