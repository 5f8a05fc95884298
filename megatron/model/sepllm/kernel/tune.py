"""Picks the Sep-Attention kernels' tile sizes on the current GPU and profiles where the time goes.

    python -m megatron.model.sepllm.kernel.tune [--json OUT.json] [--dims 128] [--kernels fwd,dq]
    python -m megatron.model.sepllm.kernel.tune --profile-only

Times each of the four kernels (forward, dQ, compact dK/dV, band dK/dV) and the fused backward (``fused_b``:
its band tiles, ``fused_c``: its compact tiles, each timed as the whole fused backward with the other part at its
current tiles, zeroing and dQ conversion included) for every candidate launch configuration on the benchmark
shapes, prints the times and the per-kernel split of the best configuration
next to SDPA's forward and backward, and writes the best table as the JSON that the config key
``sep_attn_kernel_blocks`` (or, for an experiment, $SEP_ATTN_BLOCKS) accepts.
The compact K/V gather (on from S = 8192, see ``op._gather_compact``) is timed on its own and not included in
the forward / dQ times; the split line lists it.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from .metadata import build_sep_metadata
from .op import (
    _block_config,
    _gather_compact,
    launch_backward_dkdv_band,
    launch_backward_dkdv_compact,
    launch_backward_dq,
    launch_backward_fused,
    launch_forward,
    launch_gather,
)

SHAPES = {  # head dim -> [(B, H, S, W)]
    64: [(8, 12, 2048, 64), (2, 12, 8192, 256)],
    128: [(1, 16, 32768, 256)],
}
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3),
            (128, 64, 4, 4), (64, 64, 4, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2),
           (128, 64, 8, 2)],
    "dkdv_c": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (16, 128, 4, 3),
               (64, 128, 8, 2), (32, 64, 4, 2)],
    "dkdv_b": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (16, 128, 4, 3),
               (64, 64, 4, 2), (32, 64, 4, 2)],
    # The fused kernels hold dK, dV and a dQ product at once: candidates that compile for sm_90 without (or with
    # few) register spills.
    "fused_b": [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 3)],
    "fused_c": [(64, 64, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 8, 2)],
}

# Head dim 128 (long sequences, compact loops dominate): a shorter list around the FlashAttention-style tiles.
CANDIDATES_BY_DIM = {
    128: {
        "fwd": [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
        "dq": [(64, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        "dkdv_c": [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2)],
        "dkdv_b": [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
        "fused_b": [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2), (32, 64, 8, 3)],
        "fused_c": [(32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3), (64, 128, 8, 3), (32, 32, 4, 2)],
    },
}


def _bench(fn) -> float:
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=10, rep=40)
    except Exception as err:  # out of shared memory / registers for this tile: not a candidate here
        print(f"    skipped: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        return math.inf


def tune_shape(dim: int, bsz: int, heads: int, seq: int, window: int, candidates: dict) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(bsz, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))
    flags = torch.rand(bsz, seq, device="cuda", generator=gen) < 0.15
    meta = build_sep_metadata(flags, torch.zeros(bsz, dtype=torch.long, device="cuda"), 3)
    lo_off, scale = window - 1, dim ** -0.5
    pos, cum = meta.positions, meta.cum
    gathered = _gather_compact(seq)
    compact = launch_gather(k, v, pos, cum) if gathered else None
    kw = dict(gathered=gathered, compact=compact)
    cfg0 = _block_config(dim)
    out, lse = launch_forward(q, k, v, pos, cum, lo_off, scale, cfg0["fwd"], **kw)
    _, delta = launch_backward_dq(q, k, v, out, dout, lse, pos, cum, lo_off, scale, cfg0["dq"], **kw)
    dkc, dvc = launch_backward_dkdv_compact(q, k, v, dout, lse, delta, pos, cum, lo_off, scale, cfg0["dkdv_c"])
    runners = {
        "fwd": lambda c: launch_forward(q, k, v, pos, cum, lo_off, scale, c, **kw),
        "dq": lambda c: launch_backward_dq(q, k, v, out, dout, lse, pos, cum, lo_off, scale, c, **kw),
        "dkdv_c": lambda c: launch_backward_dkdv_compact(q, k, v, dout, lse, delta, pos, cum, lo_off, scale, c),
        "dkdv_b": lambda c: launch_backward_dkdv_band(q, k, v, dout, lse, delta, dkc, dvc, cum, lo_off, scale, c),
        "fused_b": lambda c: launch_backward_fused(q, k, v, out, dout, lse, pos, cum, lo_off, scale, c,
                                                   cfg0["fused_c"]),
        "fused_c": lambda c: launch_backward_fused(q, k, v, out, dout, lse, pos, cum, lo_off, scale,
                                                   cfg0["fused_b"], c),
    }
    gather_ms = _bench(lambda: launch_gather(k, v, pos, cum)) if gathered else 0.0
    times = {}
    for name, cands in candidates.items():
        times[name] = {}
        for cfg in cands:
            times[name][cfg] = _bench(lambda: runners[name](cfg))
            print(f"  D{dim} B{bsz} H{heads} S{seq} W{window} {name} {cfg}: {times[name][cfg]:.3f} ms", flush=True)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    sdpa_fwd = _bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    sdpa_bwd = _bench(lambda: torch.autograd.grad(o, (qs, ks, vs), dout, retain_graph=True))
    best = {n: min(t.values()) for n, t in times.items()}
    sdpa = sdpa_fwd + sdpa_bwd
    # gathered: once in forward, once in the split backward (the fused backward reads list tiles directly)
    split = sum(best[n] for n in ("fwd", "dq", "dkdv_c", "dkdv_b")) + (2 * gather_ms if gathered else 0.0)
    fused = best["fwd"] + min(best["fused_b"], best["fused_c"]) + (gather_ms if gathered else 0.0)
    print(f"  split of the best: {', '.join(f'{n} {t:.3f}' for n, t in best.items())}, gather {gather_ms:.3f} "
          f"| kernels total, split backward {split:.3f} (ratio {split / sdpa:.3f}), fused backward {fused:.3f} "
          f"(ratio {fused / sdpa:.3f}) | SDPA fwd {sdpa_fwd:.3f} bwd {sdpa_bwd:.3f} = {sdpa:.3f} ms", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the best table here (the format of the key sep_attn_kernel_blocks and of $SEP_ATTN_BLOCKS)")
    parser.add_argument("--profile-only", action="store_true",
                        help="time only the configuration in use (the per-kernel split), no search")
    parser.add_argument("--dims", default="64,128", help="head dims to tune (comma-separated)")
    parser.add_argument("--kernels", default=",".join(CANDIDATES), help="kernels to search (others: current)")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    table = {}
    searched = set(args.kernels.split(","))
    for dim, shapes in SHAPES.items():
        if str(dim) not in args.dims.split(","):
            continue
        total = {}
        pool = CANDIDATES_BY_DIM.get(dim, CANDIDATES)
        candidates = {n: pool[n] if (n in searched and not args.profile_only) else [_block_config(dim)[n]]
                      for n in CANDIDATES}
        for bsz, heads, seq, window in shapes:
            for name, per_cfg in tune_shape(dim, bsz, heads, seq, window, candidates).items():
                for cfg, t in per_cfg.items():
                    total.setdefault(name, {}).setdefault(cfg, 0.0)
                    total[name][cfg] += t
        table[str(dim)] = {name: list(min(per_cfg, key=per_cfg.get)) for name, per_cfg in total.items()}
        print(f"best for D{dim}: {table[str(dim)]}", flush=True)
    text = json.dumps(table)
    print("sep_attn_kernel_blocks: " + text + "   # config key; or SEP_ATTN_BLOCKS='" + text + "'")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
