"""Fixtures of the model tests: a one-process DeepSpeed/gloo group."""
import os

import pytest

from megatron.net_ports import free_local_port


@pytest.fixture(scope="session")
def ds_dist():
    """DeepSpeed's communication backend on gloo with one rank (PipelineModule needs it)."""
    import deepspeed
    import deepspeed.comm as dist

    if not dist.is_initialized():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_local_port())), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        from megatron.initialize import release_deepspeed_shm

        release_deepspeed_shm(0)
    yield dist
