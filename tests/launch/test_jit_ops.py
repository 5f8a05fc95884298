"""deepy.py builds the JIT ops before the ranks start (megatron/jit_ops.py); here they are cached already."""
import pytest

pytestmark = pytest.mark.deepspeed


def test_build_jit_ops_builds_what_the_ranks_load():
    import torch
    from megatron.jit_ops import build_jit_ops

    lines = []
    names = build_jit_ops(log=lines.append)
    assert "megatron_data_helpers" in names
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator all-reduces through its shm op
        assert "deepspeed_shm_comm" in names
    assert lines == [f"JIT ops ready in TORCH_EXTENSIONS_DIR: {', '.join(names)}"]
