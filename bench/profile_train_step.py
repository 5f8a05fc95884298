"""Profiles a few steps of our trainer (Pythia-160M shape, bf16, one GPU) with torch.profiler.

    python bench/profile_train_step.py --pipe 0     # sequential path
    python bench/profile_train_step.py --pipe 1     # one-stage pipeline path

Prints the operators with the most self CUDA time and the most CPU time, to find where a path loses time.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_throughput import SHAPE, ours_args, random_batches  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pipe", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    from megatron import training
    from megatron.initialize import initialize_megatron
    from megatron.logging import TrainingLogger

    warm, prof_steps = 10, 3
    args = ours_args(a.micro_batch, warm + prof_steps, a.pipe, True, 10)
    topology, device = initialize_megatron(args)
    engine, scheduler, guard, is_pipe = training.setup_model_and_optimizer(args, topology, device)
    batches = random_batches(warm + prof_steps, a.micro_batch, SHAPE["seq_length"], "cuda")
    trainer = training.Trainer(args, engine, scheduler, guard, is_pipe, device, 0, TrainingLogger(args, rank=1))
    args.train_iters = warm
    trainer.train(iter([{"text": b} for b in batches[:warm]]), None, 0, 0)
    args.train_iters = warm + prof_steps
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        trainer.train(iter([{"text": b} for b in batches[warm:]]), None, warm, 0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
