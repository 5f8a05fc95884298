"""Training throughput of our trainer against HuggingFace GPTNeoXForCausalLM + torch.compile, same run.

Pythia-160M shape (12 layers, hidden 768, 12 heads, rotary 25 %, parallel residual, untied output layer,
vocab 50304), sequence 2048, bf16 mixed precision (fp32 master weights), AdamW, gradient clipping 1.0,
one GPU. Both sides train on the same random tokens (not zeros) for ``--warmup`` + ``--steps`` steps;
times are CUDA-event medians after warm-up (compilation happens in warm-up): per step for HF, per log
interval / interval length for ours (our loop synchronises the host only at log intervals).

Our side runs the real training loop (``megatron.training.Trainer.train``: LR schedule, DeepSpeed engine
step, bad-step guard, per-step flag all-reduce, logging) on the sequential path (``pipe_parallel_size``
0) and, with ``--pipe``, also on the one-stage pipeline path the reference configs use.

    python bench/bench_train_throughput.py --micro-batch 8 --steps 40 --warmup 20

Prints one table row per variant and the ratio ours / HF-compiled (target >= 1.0).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 50304
SHAPE = dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048,
             max_position_embeddings=2048)


def random_batches(n: int, micro_batch: int, seq: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, 50000, (micro_batch, seq + 1), generator=g).to(device) for _ in range(n)]


# ------------------------------------------------------------------------------------------ ours
class StepTimer:
    """CUDA events at step (or log-interval) boundaries; elapsed times between consecutive marks."""

    def __init__(self):
        self.events = []

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.events.append(ev)

    def intervals_ms(self, skip: int):
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(self.events[:-1], self.events[1:])]
        return times[skip:]


def ours_args(micro_batch: int, total: int, pipe: int, compile_model: bool, log_interval: int):
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(dict(
        SHAPE, pipe_parallel_size=pipe, model_parallel_size=1, pos_emb="rotary", rotary_pct=0.25,
        no_weight_tying=True, gpt_j_residual=True, init_method="small_init", output_layer_init_method="wang_init",
        hidden_dropout=0.0, attention_dropout=0.0, USE_ORIGINAL_FULL_ATTEN=True, torch_compile=compile_model,
        checkpoint_activations=False, bf16={"enabled": True},
        optimizer={"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
        min_lr=6e-5, lr_decay_style="cosine", warmup=0.01, lr_decay_iters=total, weight_decay=0.1,
        gradient_clipping=1.0, zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=1, train_iters=total, log_interval=log_interval, eval_interval=10**9,
        eval_iters=0, tokenizer_type="CharLevelTokenizer", padded_vocab_size=VOCAB, seed=1234,
        global_num_gpus=1))
    # The byte-level tokenizer only satisfies validation (no tokenizer file travels to the GPU machine);
    # the model gets Pythia's padded vocabulary.
    args.padded_vocab_size = VOCAB
    return args


def run_ours(micro_batch: int, steps: int, warmup: int, pipe: int, compile_model: bool, batches, log_interval: int):
    """Runs the trainer for warmup + steps iterations; per-step ms from the log-interval boundaries (the
    loop synchronises only there, as in a real run)."""
    from megatron import training
    from megatron.initialize import initialize_megatron
    from megatron.logging import TrainingLogger

    total = warmup + steps
    args = ours_args(micro_batch, total, pipe, compile_model, log_interval)
    topology, device = initialize_megatron(args)
    engine, scheduler, guard, is_pipe = training.setup_model_and_optimizer(args, topology, device)
    timer = StepTimer()
    logger = TrainingLogger(args, rank=1)  # rank 1: silent; the table below is the output
    real_log = logger.log_training
    losses = []

    def log_training(iteration, metrics, interval_iters, interval_s):
        timer.mark()
        losses.append(metrics.get("lm_loss"))
        return real_log(iteration, metrics, interval_iters, interval_s)

    logger.log_training = log_training
    trainer = training.Trainer(args, engine, scheduler, guard, is_pipe, device, eod_token=0, logger=logger)
    data = iter([{"text": b} for b in batches[:total]])
    code = trainer.train(data, None, 0, 0)
    assert code == 0, f"trainer exited with {code}"
    per_step = [ms / log_interval for ms in timer.intervals_ms(warmup // log_interval - 1)]
    del engine, trainer
    torch.cuda.empty_cache()
    return per_step, losses[-1]


# -------------------------------------------------------------------------------------------- HF
def run_hf(micro_batch: int, steps: int, warmup: int, compile_model: bool, batches):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048,
                        use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0,
                        attention_dropout=0.0, attn_implementation="sdpa")
    model = GPTNeoXForCausalLM(cfg).cuda().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = torch.compile(model) if compile_model else model

    def step(text):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=text[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), text[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timer = StepTimer()
    timer.mark()
    for i in range(warmup + steps):
        step(batches[i])
        timer.mark()
    ms = timer.intervals_ms(warmup)
    del model, opt, fwd
    torch.cuda.empty_cache()
    return ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=10, help="our loop synchronises only at log intervals")
    p.add_argument("--pipe", action="store_true", help="also time the one-stage pipeline path")
    p.add_argument("--no-compile-ours", action="store_true", help="run our model without torch_compile")
    p.add_argument("--skip-hf-eager", action="store_true")
    a = p.parse_args()
    if a.warmup % a.log_interval or a.steps % a.log_interval or a.warmup < a.log_interval:
        p.error("--warmup and --steps must be multiples of --log-interval (warmup >= one interval)")
    if not torch.cuda.is_available():
        print("bench_train_throughput needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    seq = SHAPE["seq_length"]
    batches = random_batches(a.warmup + a.steps, a.micro_batch, seq, "cuda")
    tokens = a.micro_batch * seq
    rows = []

    def add(name, ms, extra=""):
        med = statistics.median(ms)
        rows.append((name, med, tokens / (med / 1000.0), extra))
        print(f"  {name}: median {med:.1f} ms/step, {tokens / (med / 1000.0):,.0f} tokens/s {extra}", flush=True)

    t0 = time.time()
    ms, loss = run_ours(a.micro_batch, a.steps, a.warmup, 0, not a.no_compile_ours, batches, a.log_interval)
    add("ours sequential (pipe 0)", ms, f"last logged loss {loss:.3f}")
    if a.pipe:
        ms, loss = run_ours(a.micro_batch, a.steps, a.warmup, 1, not a.no_compile_ours, batches, a.log_interval)
        add("ours pipeline (pipe 1)", ms, f"last logged loss {loss:.3f}")
    add("HF GPTNeoX torch.compile", run_hf(a.micro_batch, a.steps, a.warmup, True, batches))
    if not a.skip_hf_eager:
        add("HF GPTNeoX eager", run_hf(a.micro_batch, a.steps, a.warmup, False, batches))
    hf_compiled = next(r for r in rows if r[0] == "HF GPTNeoX torch.compile")[2]
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | micro batch {a.micro_batch} x seq {seq} "
          f"| bf16 | {a.steps} timed steps after {a.warmup} warm-up | {time.time() - t0:.0f} s total")
    print(f"{'variant':<28} {'ms/step':>9} {'tokens/s':>12} {'vs HF compiled':>15}")
    for name, med, tps, _ in rows:
        print(f"{name:<28} {med:>9.1f} {tps:>12,.0f} {tps / hf_compiled:>14.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
