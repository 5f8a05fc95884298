"""Tensor parallelism: the traffic of one training micro-batch against the formula (CPU), and tokens/s at TP=1/2/4
for the Pythia-1.4B shape with the share of step time in TP collectives (GPU).

CPU (gloo, no GPU needed): one forward + backward of the trainer's model and loss (vocab-parallel logits) at
TP=2 and TP=4 on a small Pythia-shaped model, every collective of the tensor-parallel region counted (the
functions of ``megatron/mpu/mappings.py``, through which all of them go) and compared with Megatron's count:
per layer two all-reduces forward (attention and MLP outputs; one for both with the parallel residual, as
GPT-NeoX's) and two backward (their inputs), each ``B*S*h`` elements, plus the embedding's all-reduce forward
and the output layer's input all-reduce backward (``B*S*h`` each) and the vocab-parallel cross entropy's three
``B*S`` all-reduces (max, target logit, sum of exps). No all-gather: the logits are never gathered.

    python bench/bench_tp.py --device cpu

GPU (one process per GPU, nccl): the real training loop (``Trainer.train``, DeepSpeed engine, bf16 with fp32
master weights, AdamW, clipping 1.0, sequential path, ZeRO 0), Pythia-1.4B (24 layers, hidden 2048, 16 heads,
rotary 25 %, parallel residual, untied, vocab 50304), sequence 2048, random tokens; per-step times are CUDA-event
medians after warm-up at the log-interval boundaries; then a few steps under torch.profiler give the share of GPU
time in NCCL kernels.

    python bench/bench_tp.py --device cuda --tp 1 2 4 --micro-batch 4 --steps 20 --warmup 10
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PYTHIA_1B4 = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                  max_position_embeddings=2048)
CPU_SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=128, max_position_embeddings=128)
VOCAB = 50304


def model_args(shape: dict, tp: int, world: int, micro_batch: int, total: int, log_interval: int, bf16: bool,
               parallel_residual: bool = True):
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(dict(
        shape, pipe_parallel_size=0, model_parallel_size=tp, pos_emb="rotary", rotary_pct=0.25,
        no_weight_tying=True, gpt_j_residual=parallel_residual, init_method="small_init", output_layer_init_method="wang_init",
        hidden_dropout=0.0, attention_dropout=0.0, USE_ORIGINAL_FULL_ATTEN=True, checkpoint_activations=False,
        bf16={"enabled": bf16}, optimizer={"type": "Adam", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
        min_lr=2e-5, lr_decay_style="cosine", warmup=0.01, lr_decay_iters=total, weight_decay=0.1,
        gradient_clipping=1.0, zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=1, train_iters=total, log_interval=log_interval, eval_interval=10**9,
        eval_iters=0, tokenizer_type="CharLevelTokenizer", padded_vocab_size=VOCAB, seed=1234, num_gpus=world))
    args.padded_vocab_size = VOCAB
    return args


# ------------------------------------------------------------------------------------------- CPU counts
class CountingDist:
    """Stands in for ``torch.distributed`` inside megatron/mpu/mappings.py: counts calls and elements."""

    def __init__(self, real):
        self.real = real
        self.calls = {"all_reduce": [], "all_gather": []}

    def all_reduce(self, tensor, *args, **kwargs):
        self.calls["all_reduce"].append(tensor.numel())
        return self.real.all_reduce(tensor, *args, **kwargs)

    def all_gather(self, parts, tensor, *args, **kwargs):
        self.calls["all_gather"].append(tensor.numel())
        return self.real.all_gather(parts, tensor, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def expected_counts(layers: int, batch: int, seq: int, hidden: int, parallel_residual: bool) -> dict:
    """Megatron's count; the parallel residual (GPT-J) sums both branches in one forward all-reduce per layer."""
    bsh, bs = batch * seq * hidden, batch * seq
    per_layer = 3 if parallel_residual else 4
    big = per_layer * layers + 2
    return {"all_reduce_calls": big + 3, "all_reduce_elements": big * bsh + 3 * bs, "all_gather_calls": 0,
            "formula": f"({per_layer} L + 2) x B*S*h + 3 x B*S = ({per_layer * layers} + 2) x {bsh} + 3 x {bs}"}


def _count_worker(rank, world, port, micro_batch, parallel_residual, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron import mpu
    from megatron.model import build_sequential_model
    from megatron.model.loss import lm_loss
    from megatron.mpu import mappings

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    mpu.initialize_model_parallel(PipeModelDataParallelTopology(num_pp=1, num_mp=world, num_dp=1))
    args = model_args(CPU_SHAPE, world, world, micro_batch, 1, 1, bf16=False, parallel_residual=parallel_residual)
    torch.manual_seed(0)
    model = build_sequential_model(args, parallel_output=True)
    seq = int(args.seq_length)
    text = torch.randint(0, 50000, (micro_batch, seq + 1), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq).expand(micro_batch, -1)
    counter = CountingDist(mappings.dist)
    mappings.dist = counter
    try:
        loss = lm_loss(model((text[:, :-1], pos)), text[:, 1:], torch.ones(micro_batch, seq))
        forward_calls = len(counter.calls["all_reduce"])
        loss.backward()
    finally:
        mappings.dist = counter.real
    if rank == 0:
        calls = counter.calls
        result = {"tp": world, "forward_all_reduces": forward_calls,
                  "backward_all_reduces": len(calls["all_reduce"]) - forward_calls,
                  "all_reduce_calls": len(calls["all_reduce"]), "all_reduce_elements": sum(calls["all_reduce"]),
                  "all_gather_calls": len(calls["all_gather"]),
                  "bytes_fp32": 4 * (sum(calls["all_reduce"]) + sum(calls["all_gather"]))}
        Path(out_path).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def run_cpu(micro_batch: int) -> None:
    from megatron.net_ports import free_local_port

    layers, hidden, seq = CPU_SHAPE["num_layers"], CPU_SHAPE["hidden_size"], CPU_SHAPE["seq_length"]
    print(f"CPU, gloo: {layers} layers, hidden {hidden}, {CPU_SHAPE['num_attention_heads']} heads, B={micro_batch}, "
          f"S={seq}, vocab {VOCAB}, untied; one micro-batch forward + backward")
    print("| residual | TP | all-reduces fwd | bwd | total | elements | expected | all-gathers | bytes (fp32) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok, formulas = True, []
    for parallel_residual in (False, True):
        want = expected_counts(layers, micro_batch, seq, hidden, parallel_residual)
        name = "parallel" if parallel_residual else "sequential"
        formulas.append(f"{name}: {want['formula']} = {want['all_reduce_elements']} elements in "
                        f"{want['all_reduce_calls']} all-reduces, no all-gather")
        for tp in (2, 4):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "counts.json")
                torch.multiprocessing.start_processes(
                    _count_worker, args=(tp, free_local_port(), micro_batch, parallel_residual, out), nprocs=tp,
                    join=True, start_method="spawn")  # fork inherits a caller's process group (pytest's)
                got = json.loads(Path(out).read_text())
            match = (got["all_reduce_calls"] == want["all_reduce_calls"]
                     and got["all_reduce_elements"] == want["all_reduce_elements"] and got["all_gather_calls"] == 0)
            ok &= match
            print(f"| {name} | {tp} | {got['forward_all_reduces']} | {got['backward_all_reduces']} | "
                  f"{got['all_reduce_calls']} | {got['all_reduce_elements']} | {want['all_reduce_elements']} | "
                  f"{got['all_gather_calls']} | {got['bytes_fp32']} |")
    for line in formulas:
        print("formula, " + line)
    print("traffic matches the formula" if ok else "TRAFFIC DIFFERS FROM THE FORMULA")
    if not ok:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------- GPU speed
def _gpu_worker(rank, world, port, opts, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from megatron import training
    from megatron.initialize import initialize_megatron
    from megatron.logging import TrainingLogger

    micro, steps, warmup, log_interval = opts["micro_batch"], opts["steps"], opts["warmup"], opts["log_interval"]
    total = warmup + steps
    args = model_args(PYTHIA_1B4, world, world, micro, total + opts["profile_steps"], log_interval, bf16=True)
    topology, device = initialize_megatron(args)
    engine, scheduler, guard, is_pipe = training.setup_model_and_optimizer(args, topology, device)
    seq = int(args.seq_length)
    gen = torch.Generator().manual_seed(0)  # every TP rank reads the same tokens
    batches = [{"text": torch.randint(0, 50000, (micro, seq + 1), generator=gen)}
               for _ in range(total + opts["profile_steps"])]
    marks = []
    logger = TrainingLogger(args, rank=1)  # silent; the table is the output
    real_log = logger.log_training

    def log_training(iteration, metrics, interval_iters, interval_s):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append(ev)
        return real_log(iteration, metrics, interval_iters, interval_s)

    logger.log_training = log_training
    args.train_iters = total
    trainer = training.Trainer(args, engine, scheduler, guard, is_pipe, device, eod_token=0, logger=logger)
    assert trainer.train(iter(batches[:total]), None, 0, 0) == 0
    torch.cuda.synchronize()
    per_step = [a.elapsed_time(b) / log_interval for a, b in zip(marks[:-1], marks[1:])][warmup // log_interval - 1:]
    # NCCL share: a few more steps under the profiler (kernel time of nccl* kernels / all CUDA kernel time).
    from torch.profiler import ProfilerActivity, profile

    data = iter(batches[total:])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(opts["profile_steps"]):
            training.train_step_sequential(engine, data, args, 0, device)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.self_device_time_total for e in events)
    nccl_us = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower())
    if rank == 0:
        ms = statistics.median(per_step)
        Path(out_path).write_text(json.dumps({
            "tp": world, "ms_per_step": ms, "tokens_per_s": micro * seq / (ms / 1000.0),
            "nccl_share": nccl_us / total_us if total_us else 0.0,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}))


def run_gpu(opts) -> None:
    from megatron.net_ports import free_local_port

    have = torch.cuda.device_count()
    print(f"GPU: Pythia-1.4B shape, micro batch {opts['micro_batch']} x {PYTHIA_1B4['seq_length']}, bf16, ZeRO 0, "
          f"sequential path, {have} GPU(s) visible ({torch.cuda.get_device_name(0) if have else '-'})")
    print("| TP | ms/step | tokens/s | share of GPU time in NCCL | max memory GiB |")
    print("|---|---|---|---|---|")
    for tp in opts["tp"]:
        if tp > have:
            print(f"| {tp} | skipped: {have} GPU(s) | | | |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "speed.json")
            torch.multiprocessing.start_processes(_gpu_worker, args=(tp, free_local_port(), opts, out), nprocs=tp,
                                                  join=True, start_method="spawn")
            got = json.loads(Path(out).read_text())
        print(f"| {tp} | {got['ms_per_step']:.1f} | {got['tokens_per_s']:.0f} | {100 * got['nccl_share']:.1f} % | "
              f"{got['max_memory_gib']:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 2 on CPU, 4 on GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    ns = parser.parse_args(argv)
    if ns.device == "cpu":
        run_cpu(ns.micro_batch or 2)
        return
    if ns.warmup % ns.log_interval or ns.steps % ns.log_interval or ns.warmup < ns.log_interval:
        raise SystemExit("--warmup and --steps must be multiples of --log-interval (warmup >= one interval)")
    run_gpu({"tp": ns.tp, "micro_batch": ns.micro_batch or 4, "steps": ns.steps, "warmup": ns.warmup,
             "log_interval": ns.log_interval, "profile_steps": ns.profile_steps})


if __name__ == "__main__":
    main()
