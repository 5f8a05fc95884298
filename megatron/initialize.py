"""Per-rank start-up: the process group, the device, the parallel topology and the random seeds."""
import os
import random

import numpy as np
import torch

from megatron.net_ports import free_local_port


def _default_single_process_env() -> bool:
    """Lets ``python train.py --neox_config_file ...`` run as one rank without a launcher. Returns whether
    this process picked ``MASTER_PORT`` itself (then it may pick another if the port is taken meanwhile)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return False
    os.environ["MASTER_PORT"] = str(free_local_port())
    return True


def _init_process_group(backend: str, own_port: bool, attempts: int = 5) -> None:
    """``deepspeed.init_distributed``; a port this process picked can be taken by another process between the
    probe and the listen (EADDRINUSE), so such a port is picked afresh a few times."""
    import deepspeed

    for attempt in range(attempts):
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
            return
        except torch.distributed.DistNetworkError as err:
            if not own_port or "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise
            os.environ["MASTER_PORT"] = str(free_local_port())


def build_topology(neox_args):
    """DeepSpeed's pipe x data x model grid for this job, from the sizes derivation settled (``pipe_stages``
    counts the sequential model, ``pipe_parallel_size`` 0, as one stage; ``data_parallel_size`` is what the
    world leaves). Ranks are numbered model fastest: ``rank = (pipe * dp + data) * tp + model``."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world = torch.distributed.get_world_size()
    pp, mp, dp = int(neox_args.pipe_stages), int(neox_args.model_parallel_size), int(neox_args.data_parallel_size)
    if world != pp * mp * dp:
        raise ValueError(f"world size {world} != pipe_stages ({pp}) x model_parallel_size ({mp}) x "
                         f"data_parallel_size ({dp}) of the resolved config")
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=mp, num_dp=dp)


def set_random_seed(seed: int, pipe_rank: int = 0) -> int:
    """Seeds python, numpy and torch (CPU and CUDA) as GPT-NeoX does: data-parallel replicas share a
    seed (their dropout masks are the same), pipeline stages are offset by 100 so stages differ."""
    if seed is None or int(seed) < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    seed = int(seed) + 100 * int(pipe_rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def deepspeed_shm_path(rank: int, environ=None) -> str:
    """The POSIX shared-memory file DeepSpeed's CPU all-reduce op (``ops/csrc/cpu/comm/shm.cpp``) creates
    for ``rank`` when every rank of the job is on one machine: ``<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``."""
    environ = os.environ if environ is None else environ
    name = f"{SHM_PREFIX}_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_{environ.get('MASTER_PORT', '')}_{int(rank)}"
    return os.path.join(SHM_DIR, name)


def release_deepspeed_shm(rank: int) -> bool:
    """Unlinks this rank's all-reduce segment once every rank has mapped it.

    DeepSpeed never unlinks it, so each run left ~66 MB per rank in ``/dev/shm`` (RAM) for good. Every
    peer maps the segment inside ``init_distributed``; after a barrier the name is no longer needed, and
    the mappings stay valid until the processes exit, when the kernel frees the memory. Returns whether a
    file was removed.
    """
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    try:
        os.unlink(deepspeed_shm_path(rank))
    except FileNotFoundError:
        return False
    return True


def choose_gloo_interface(environ=None):
    """Sets ``GLOO_SOCKET_IFNAME`` (unless the user did) to the interface this host's route to ``MASTER_ADDR``
    leaves by. Without it gloo binds to whatever the host name resolves to, which the other hosts may not
    reach (on loopback "nodes" and on machines whose name maps to 127.0.1.1). Returns the name chosen."""
    from megatron.rank_env import gloo_interface

    environ = os.environ if environ is None else environ
    if environ.get("GLOO_SOCKET_IFNAME") or int(environ.get("WORLD_SIZE", "1")) < 2 or not environ.get("MASTER_ADDR"):
        return None
    name = gloo_interface(environ["MASTER_ADDR"], int(environ.get("MASTER_PORT") or 29500))
    if name is not None:
        environ["GLOO_SOCKET_IFNAME"] = name
        if environ.get("LOCAL_RANK", "0") == "0" and not environ["MASTER_ADDR"].startswith("127."):
            print(f" > gloo binds interface {name} (the route to MASTER_ADDR {environ['MASTER_ADDR']})", flush=True)
    return name


def initialize_megatron(neox_args):
    """Starts the process group (nccl on GPU, gloo on CPU), picks the device, builds the topology and its
    process groups (``mpu.initialize_model_parallel``) and seeds every RNG (the model-parallel stream too). Sets ``rank``, ``local_rank`` and ``world_size`` on ``neox_args``; returns
    ``(topology, device)``."""
    from megatron.rank_env import launcher_rank_env

    # srun / mpirun started this rank without DeepSpeed's launcher: its variables become torch's.
    os.environ.update(launcher_rank_env(neox_args, os.environ))
    own_port = _default_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        choose_gloo_interface()
    if not torch.distributed.is_initialized():
        _init_process_group("nccl" if use_cuda else "gloo", own_port)
    release_deepspeed_shm(torch.distributed.get_rank())
    neox_args.rank = torch.distributed.get_rank()
    neox_args.local_rank = local_rank
    neox_args.world_size = torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    topology = build_topology(neox_args)
    from megatron import mpu

    # The one grid every layer, the data loader and DeepSpeed read (megatron/mpu/initialize.py).
    mpu.initialize_model_parallel(topology)
    coord = topology.get_coord(neox_args.rank)
    seed = set_random_seed(neox_args.seed, coord.pipe)
    mpu.model_parallel_seed(seed, coord.model, int(neox_args.model_parallel_size), device.type)
    return topology, device
