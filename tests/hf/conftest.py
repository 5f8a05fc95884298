"""HF tests run tiny models: one intra-op thread avoids OpenMP spin contention on the shared 2-core CI box
(a 32-wide gelu took 15 ms with 2 threads under load, 10 us with one)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
