"""Sampler and data iterators: GPT-NeoX order, data-parallel slices, exact resume, rank-0 index build."""
import os

import numpy as np
import pytest
import torch

from megatron.data.data_utils import build_train_valid_test_data_iterators
from corpus_utils import data_config, write_corpus as _write_corpus
from megatron.data.samplers import DistributedBatchSampler
from megatron.net_ports import free_local_port


def write_corpus(prefix, n_docs, seed, max_len=80):
    return _write_corpus(prefix, n_docs, seed, max_len)


def make_args(data_path, rank=0, **overrides):
    """Rank ``rank`` of two data-parallel ranks; 2 micro-batches of 2 per iteration (8 samples)."""
    keys = dict(train_iters=12, eval_interval=4, eval_iters=2, train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=2, seed=1234, data_path=data_path, split="80,15,5", iteration=0)
    return data_config(world_size=2, rank=rank, **{**keys, **overrides})


def take(iterator, n):
    return [next(iterator)["text"] for _ in range(n)]


def test_sampler_order_slices_and_resume():
    s = DistributedBatchSampler(num_samples=50, consumed_samples=0, micro_batch_size=3, dp_rank=1, dp_size=2)
    it = iter(s)
    assert [next(it) for _ in range(3)] == [[3, 4, 5], [9, 10, 11], [15, 16, 17]]
    assert len(s) == 8  # 50 // 6, incomplete last step dropped
    # Resume at 12 consumed samples = global micro-step 2, no replay.
    r = DistributedBatchSampler(50, 12, 3, 1, 2)
    assert next(iter(r)) == [15, 16, 17]
    # All ranks together cover each global micro-step exactly, in order.
    for step in range(len(s)):
        merged = sum((DistributedBatchSampler(50, 0, 3, k, 2).step_indices(step) for k in range(2)), [])
        assert merged == list(range(step * 6, step * 6 + 6))
    # After the last full step the order starts again at step 0 (GPT-NeoX takes the start modulo length).
    it = iter(DistributedBatchSampler(50, 42, 3, 0, 2))
    assert next(it) == [42, 43, 44] and next(it) == [0, 1, 2]
    with pytest.raises(ValueError, match="consumed_samples=5 is not a non-negative multiple"):
        DistributedBatchSampler(50, 5, 3, 0, 2)
    with pytest.raises(ValueError, match="data-parallel rank 2"):
        DistributedBatchSampler(50, 0, 3, 2, 2)


def test_iterators_resume_exactly(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", 300, seed=0)
    runs = {}
    for rank in (0, 1):
        args = make_args(prefix, rank=rank)
        train, valid, test = build_train_valid_test_data_iterators(args)
        batches = take(train, 16)  # 8 iterations x 2 micro-batches
        assert all(b.dtype == torch.int64 and b.shape == (2, 17) for b in batches)
        runs[rank] = dict(train=batches, valid=take(valid, 12), test=take(test, 2))

    # Ranks see disjoint halves of each global micro-batch, together the dataset's order.
    from megatron.data.data_utils import build_train_valid_test_datasets_from_args

    train_ds = build_train_valid_test_datasets_from_args(make_args(prefix))[0]
    for step in (0, 5, 15):
        expected = torch.stack([torch.from_numpy(train_ds[step * 4 + j]["text"]) for j in range(4)])
        torch.testing.assert_close(torch.cat([runs[0]["train"][step], runs[1]["train"][step]]), expected)

    # Resume at iteration 3 (consumed 3 x 8 samples): the next batches are those of the uninterrupted
    # stream from micro-step 6 on, on every rank. Valid resumes after iteration // eval_interval evaluations.
    for rank in (0, 1):
        train, valid, test = build_train_valid_test_data_iterators(make_args(prefix, rank=rank, iteration=5))
        for got, want in zip(take(train, 6), runs[rank]["train"][10:16]):
            torch.testing.assert_close(got, want)
        evals_done = 5 // 4
        for got, want in zip(take(valid, 4), runs[rank]["valid"][evals_done * 2 * 2 :]):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(take(test, 1)[0], runs[rank]["test"][0])


def test_worker_processes_give_the_same_batches(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", 120, seed=1)
    a = take(build_train_valid_test_data_iterators(make_args(prefix))[0], 4)
    b = take(build_train_valid_test_data_iterators(make_args(prefix, num_workers=1))[0], 4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_no_iterations_means_no_iterator(tmp_path):
    prefix = write_corpus(tmp_path / "corpus", 60, seed=2)
    train, valid, test = build_train_valid_test_data_iterators(make_args(prefix, eval_iters=0))
    assert train is not None and valid is None and test is None


def _build_on_two_ranks(rank, port, prefixes, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from megatron.data import gpt2_dataset

        original = gpt2_dataset.build_index_arrays
        for use_shared_fs, prefix in zip((True, False), prefixes):
            built = []

            def counting(*a, **k):
                built.append(rank)
                return original(*a, **k)

            gpt2_dataset.build_index_arrays = counting
            train, _, _ = build_train_valid_test_data_iterators(make_args(prefix, use_shared_fs=use_shared_fs))
            tag = f"shared{int(use_shared_fs)}_rank{rank}"
            np.save(os.path.join(out_dir, f"{tag}_built.npy"), np.array(len(built)))
            np.save(os.path.join(out_dir, f"{tag}_batch.npy"), next(train)["text"].numpy())
    finally:
        torch.distributed.destroy_process_group()


def test_only_the_builder_rank_builds(tmp_path):
    prefixes = [write_corpus(tmp_path / f"corpus{i}", 100, seed=3) for i in range(2)]
    # fork: the children reuse this process's imports (spawn would re-import torch in each, ~6 s).
    torch.multiprocessing.start_processes(
        _build_on_two_ranks, args=(free_local_port(), prefixes, str(tmp_path)), nprocs=2, join=True,
        start_method="fork",
    )
    for shared in (1, 0):
        # Global rank 0 (shared fs) or local rank 0 (here the same process) builds; rank 1 only loads.
        assert int(np.load(tmp_path / f"shared{shared}_rank0_built.npy")) == 3
        assert int(np.load(tmp_path / f"shared{shared}_rank1_built.npy")) == 0
        r0 = np.load(tmp_path / f"shared{shared}_rank0_batch.npy")
        r1 = np.load(tmp_path / f"shared{shared}_rank1_batch.npy")
        assert r0.shape == r1.shape == (2, 17) and not np.array_equal(r0, r1)


def test_data_parallel_rank_follows_gpt_neox_topology():
    from megatron.data.data_utils import data_parallel_rank_and_size

    # Ranks laid out (pipe, data, model) with model fastest: rank = (pipe * dp + data) * mp + model; the
    # configuration allows model-parallel size 1 only, so here rank = pipe * dp + data.
    for pipe in range(2):
        for data in range(3):
            rank = pipe * 3 + data
            args = data_config(world_size=6, rank=rank, pipe_parallel_size=2)
            assert data_parallel_rank_and_size(args) == (data, 3)
