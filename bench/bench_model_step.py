"""Model-only training-step benchmark: our GPT-NeoX model vs HF ``GPTNeoXForCausalLM`` (same shape, same run).

One step = forward + fp32 cross entropy + backward + fused AdamW step + zero_grad, bf16 parameters, on one GPU.
Plain torch (no DeepSpeed): our model is built with ``build_sequential_model``, the same layer list
``GPT2ModelPipe.to_sequential()`` runs. Variants: HF eager, HF ``torch.compile(model)``, ours eager, ours with
``rope_fusion`` (Triton rotary), ours with ``torch_compile: true`` (per-layer compile, what the trainer does),
ours with the whole model compiled. Times are CUDA-event medians over ``--steps`` steps after ``--warmup`` steps;
the last table prints tokens/s and each variant's ratio to HF compiled.

    python bench/bench_model_step.py --batch 8 --seq 2048 --steps 20
"""
import argparse
import gc
import json
import os
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PYTHIA_160M = dict(num_layers=12, hidden_size=768, num_attention_heads=12, padded_vocab_size=50304,
                   pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000, gpt_j_residual=True,
                   norm="layernorm", layernorm_epsilon=1e-5, no_weight_tying=True, init_method="small_init",
                   output_layer_init_method="wang_init", hidden_dropout=0.0, attention_dropout=0.0,
                   USE_ORIGINAL_FULL_ATTEN=True, checkpoint_activations=False)


def loss_of(logits, labels):
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


def ours(seq, **extra):
    from megatron.model import build_sequential_model

    args = SimpleNamespace(**PYTHIA_160M, seq_length=seq, max_position_embeddings=seq, **extra)
    model = build_sequential_model(args)
    return model, lambda m, ids, pos: m((ids, pos))


def hf(seq):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=seq, use_parallel_residual=True, tie_word_embeddings=False,
                        hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0)
    model = GPTNeoXForCausalLM(cfg)
    return model, lambda m, ids, pos: m(input_ids=ids).logits


def run_variant(name, build, compile_whole, batch, seq, warmup, steps):
    torch.manual_seed(0)
    model, call = build()
    model = model.cuda().to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    runner = torch.compile(model) if compile_whole else model
    ids = torch.randint(0, 50277, (batch, seq + 1), device="cuda")
    inp, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(batch, -1)
    times, losses = [], []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = loss_of(call(runner, inp, pos), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        if i >= warmup:
            times.append((start, end))
        losses.append(loss.detach())
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in times)
    result = {"variant": name, "ms_per_step": ms, "tokens_per_s": batch * seq / (ms / 1e3),
              "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    del model, runner, opt, losses
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_model_step.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    seq = a.seq
    variants = [
        ("hf_eager", lambda: hf(seq), False),
        ("hf_compiled", lambda: hf(seq), True),
        ("ours_eager", lambda: ours(seq), False),
        ("ours_rope_fusion", lambda: ours(seq, rope_fusion=True), False),
        ("ours_torch_compile", lambda: ours(seq, torch_compile=True), False),
        ("ours_compiled_whole", lambda: ours(seq), True),
    ]
    only = {v for v in a.only.split(",") if v}
    results = []
    for name, build, whole in variants:
        if only and name not in only:
            continue
        r = run_variant(name, build, whole, a.batch, seq, a.warmup, a.steps)
        print(json.dumps(r), flush=True)
        results.append(r)
    base = next((r["tokens_per_s"] for r in results if r["variant"] == "hf_compiled"), None)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} batch {a.batch} seq {seq} bf16")
    print(f"{'variant':22s} {'ms/step':>9s} {'tokens/s':>11s} {'vs hf_compiled':>15s} {'peak GiB':>9s}")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.3f}" if base else "-"
        print(f"{r['variant']:22s} {r['ms_per_step']:9.2f} {r['tokens_per_s']:11.0f} {ratio:>15s} "
              f"{r['peak_mem_gib']:9.1f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
