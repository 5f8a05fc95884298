"""End-to-end training throughput of the project's model: Pythia-160M shape, SepLLM n64 (Sep-Attention kernel) vs
full attention, same script, same run.

The model is the framework's own: ``NeoXArgs.from_dict`` + ``megatron.model.build_sequential_model`` (the layer
list ``GPT2ModelPipe.to_sequential()`` runs, no DeepSpeed). SepLLM mode selects the ``sep_kernel`` attention
variant (``megatron/model/attention/sep_kernel_mode.py``), which calls ``sep_attention`` on CUDA with per-micro-batch
metadata shared by all layers; full mode is ``USE_ORIGINAL_FULL_ATTEN`` (SDPA causal). One step = forward + float32
cross entropy + backward + fused torch AdamW + zero_grad, bf16 parameters, real-text token windows (separator
flags from the real Pythia separators). ``--compile on`` sets ``torch_compile: true`` (each transformer layer
compiled, as the trainer does; the kernel enters the graphs as the ``sepllm_kernel::sep_attn_fwd`` custom op);
``--compile both`` also runs eager. Times: CUDA events around each step,
no synchronise between steps, median over ``--steps`` after ``--warmup``.

    python bench/bench_e2e_sepllm.py --tokens data/sep_bench/tokens.npy     # token file: see bench_sep_attention.py
"""
import argparse
import gc
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PYTHIA_SEPARATOR_IDS = [15, 13, 32, 2, 28, 27, 209, 186, 187]

PYTHIA_160M = dict(num_layers=12, hidden_size=768, num_attention_heads=12, padded_vocab_size=50304,
                   pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000, gpt_j_residual=True,
                   norm="layernorm", layernorm_epsilon=1e-5, no_weight_tying=True, init_method="small_init",
                   output_layer_init_method="wang_init", hidden_dropout=0.0, attention_dropout=0.0,
                   checkpoint_activations=False)


def model_config(mode: str, seq: int, mbs: int, window: int, n_init: int, compile_layers: bool) -> dict:
    """Configuration keys of one benchmarked model (``mode`` full or sepllm)."""
    cfg = dict(PYTHIA_160M, seq_length=seq, max_position_embeddings=seq, train_micro_batch_size_per_gpu=mbs,
               torch_compile=compile_layers, PRINT_KV_RATIO=False)
    if mode == "full":
        cfg.update(USE_ORIGINAL_FULL_ATTEN=True)
    elif mode == "sepllm":
        cfg.update(USE_ORIGINAL_FULL_ATTEN=False, USE_SEP_ATTN_KERNEL_ACCELERATOR=True, streamingLLM=False,
                   separator_token_ids=PYTHIA_SEPARATOR_IDS, prefill_local_window_size=window,
                   generate_local_window_size=window, init_tok_max_idx=n_init - 1, EXCLUDE_DIAGONAL=True)
    else:
        raise ValueError(f"mode must be full or sepllm, got {mode!r}")
    return cfg


def run_mode(mode: str, batches, args, seq: int, mbs: int, compile_layers: bool) -> dict:
    from megatron.model import build_sequential_model
    from megatron.neox_arguments import NeoXArgs

    torch.manual_seed(0)
    neox_args = NeoXArgs.from_dict(model_config(mode, seq, mbs, args.window, args.n_init, compile_layers))
    model = build_sequential_model(neox_args).cuda().to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mbs, -1)
    torch._dynamo.utils.counters.clear()
    events, losses = [], []
    for step, batch in enumerate(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        inp, tgt = batch[:, :-1], batch[:, 1:]
        logits = model((inp, pos))
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        if step >= args.warmup:
            events.append((start, end))
        losses.append(loss.detach())
        if step < args.warmup:
            torch.cuda.synchronize()  # compile / autotune steps stay out of the timed queue
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    counters = torch._dynamo.utils.counters
    result = {"mode": mode, "compiled": compile_layers, "ms": ms, "tok_s": mbs * seq / (ms / 1e3),
              "loss": losses[-1].item(), "graph_breaks": sum(counters["graph_break"].values()),
              "unique_graphs": counters["stats"].get("unique_graphs", 0),
              "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    del model, opt, losses, events
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/sep_bench/tokens.npy")
    parser.add_argument("--seqs", default="2048:8,8192:2", help="seq:micro_batch pairs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--compile", choices=("on", "off", "both"), default="on",
                        help="torch_compile of the layers (as the trainer's torch_compile: true)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e_sepllm.py needs a CUDA GPU")
    if not os.path.exists(args.tokens):
        raise SystemExit(f"--tokens {args.tokens} not found (make it with bench/bench_sep_attention.py --prepare-text)")
    tokens = np.load(args.tokens).astype(np.int64)
    compile_modes = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; project model (build_sequential_model), "
          f"Pythia-160M shape, bf16 params, fused AdamW; SepLLM n{args.window} a={args.n_init} (sep_kernel) vs full; "
          f"median step of {args.steps} after {args.warmup}", flush=True)
    rows = []
    for pair in args.seqs.split(","):
        seq, mbs = (int(x) for x in pair.split(":"))
        need = mbs * (seq + 1)
        batches = []
        for step in range(args.warmup + args.steps):
            off = (step * need) % max(1, tokens.size - need)
            window = np.resize(tokens[off:], need) if tokens.size < off + need else tokens[off: off + need]
            batches.append(torch.from_numpy(window.reshape(mbs, seq + 1)).cuda())
        for compiled in compile_modes:
            full = run_mode("full", batches, args, seq, mbs, compiled)
            sep = run_mode("sepllm", batches, args, seq, mbs, compiled)
            for r in (full, sep):
                print(f"  {seq} {r['mode']:6s} compiled={r['compiled']}: {r['ms']:.2f} ms/step, {r['tok_s']:,.0f} tok/s, "
                      f"loss {r['loss']:.3f}, graph breaks {r['graph_breaks']}, graphs {r['unique_graphs']}, "
                      f"peak {r['peak_gib']:.1f} GiB", flush=True)
            rows.append((seq, mbs, compiled, full, sep))
    print("seq | micro-batch | layers compiled | full tok/s | sepllm tok/s | sepllm/full")
    for seq, mbs, compiled, full, sep in rows:
        print(f"{seq} | {mbs} | {'yes' if compiled else 'no'} | {full['tok_s']:,.0f} | {sep['tok_s']:,.0f} | "
              f"{sep['tok_s'] / full['tok_s']:.3f}", flush=True)


if __name__ == "__main__":
    main()
