"""Multi-process helpers of the tensor-parallel tests: forked gloo ranks, DeepSpeed's grid, tiny models.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each starting DeepSpeed's gloo backend and calling
``fn(rank, world, *args)``; a failure in any rank fails the test with that rank's traceback. Spawn, not fork: in
the whole suite the pytest process already holds a gloo group (tests/model's ``ds_dist``), and a forked child
that inherits it segfaulted in ``destroy_process_group``. Functions must therefore live at module level (pickled
by name) and must not close over test fixtures.
"""
import os
import socket
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
for _p in (TESTS / "golden", TESTS / "training"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from golden_utils import CHAR_SEPARATORS, MODES  # noqa: E402  (the attention modes' keys: one source)

TINY = dict(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24, max_position_embeddings=24,
    padded_vocab_size=128, pos_emb="rotary", rotary_pct=0.5, rotary_emb_base=10000, gpt_j_residual=True,
    norm="layernorm", layernorm_epsilon=1e-5, no_weight_tying=True, init_method="small_init",
    output_layer_init_method="wang_init", hidden_dropout=0.0, attention_dropout=0.0,
    train_micro_batch_size_per_gpu=2, seed=1234,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    from megatron import mpu

    try:
        fn(rank, world, *args)
    finally:
        mpu.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    torch.multiprocessing.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                                          start_method="spawn")


def make_args(tp: int, world: int, pp: int = 0, **overrides):
    from megatron.neox_arguments import NeoXArgs

    keys = {**TINY, "model_parallel_size": tp, "pipe_parallel_size": pp, "num_gpus": world, **overrides}
    return NeoXArgs.from_dict(keys)


def mode_keys(mode: str) -> dict:
    """The golden runs' keys of an attention mode (their windows scaled to the tiny sequence)."""
    keys = dict(MODES[mode])
    if "prefill_loc_win_size_list" in keys:
        keys["prefill_loc_win_size_list"] = [24, 6]
        keys["generate_win_loc_size_list"] = [24, 6]
    for key in ("prefill_local_window_size", "generate_local_window_size"):
        if key in keys and keys[key] > 24:
            keys[key] = 24
    return keys


def init_grid(tp: int, pp: int = 1):
    """DeepSpeed's topology and grid over the whole world, tensor parallel fastest."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron import mpu

    world = torch.distributed.get_world_size()
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    mpu.initialize_model_parallel(topo)
    return topo


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random ids with separators sprinkled in (so SepLLM masks are not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    seps = torch.tensor(CHAR_SEPARATORS)[torch.randint(0, len(CHAR_SEPARATORS), (batch, seq), generator=gen)]
    return torch.where(torch.rand(batch, seq, generator=gen) < 0.25, seps, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for two zero tensors)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def shard_like(full: torch.Tensor, param, world: int, rank: int) -> torch.Tensor:
    """This rank's part of the size-1 model's ``full`` tensor for the tensor-parallel parameter ``param``."""
    from megatron.mpu import partition

    if not getattr(param, "model_parallel", False) or world == 1:
        return full
    return partition.shard(full, param.partition_dim, param.partition_sizes, world, rank)
