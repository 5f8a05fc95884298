"""Per-rank start-up helpers: the port a launcher-less rank picks, and the DeepSpeed shared-memory name."""
import pytest
import torch

from megatron import initialize


def test_taken_port_is_picked_again_only_when_ours(monkeypatch):
    calls = []

    def init_distributed(dist_backend, auto_mpi_discovery):
        calls.append(initialize.os.environ["MASTER_PORT"])
        if len(calls) == 1:
            raise torch.distributed.DistNetworkError("The server socket has failed to listen ... EADDRINUSE")

    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    monkeypatch.setenv("MASTER_PORT", "1")
    ports = iter(["2", "3"])
    monkeypatch.setattr(initialize, "free_local_port", lambda: next(ports))
    initialize._init_process_group("gloo", own_port=True)
    assert calls == ["1", "2"]
    # A port the launcher or the user chose is theirs: the error is theirs to see.
    calls.clear()
    with pytest.raises(torch.distributed.DistNetworkError):
        initialize._init_process_group("gloo", own_port=False)
    assert calls == ["2"]


def test_single_process_env_says_whether_it_chose_the_port(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert initialize._default_single_process_env() is True
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert initialize._default_single_process_env() is False and initialize.os.environ["MASTER_PORT"] == "29500"


def test_shm_path_is_deepspeeds_name(monkeypatch):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4242"}
    uid = initialize.os.getuid()
    assert initialize.deepspeed_shm_path(3, env) == f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_4242_3"
