"""Train/valid/test datasets and data iterators from the configuration (GPT-NeoX's data keys).

Two ways to name the data, as in GPT-NeoX:
- `data_path` + `split` ("969,30,1"): one indexed dataset cut into contiguous document ranges;
- `train_data_paths` / `valid_data_paths` / `test_data_paths` with `*_data_weights`: one GPT2Dataset per
  path, blended by weight (each gets ceil(samples x weight x 1.005) samples, GPT-NeoX's margin).

`build_train_valid_test_data_iterators(neox_args)` is the entry point the trainer calls on every rank.
"""
from __future__ import annotations

import inspect
import math
import os
from itertools import zip_longest

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.gpt2_dataset import GPT2Dataset, print_rank_0
from megatron.data.samplers import DistributedBatchSampler


# --------------------------------------------------------------------------------------------------
# Splits and weights
# --------------------------------------------------------------------------------------------------
def get_train_valid_test_split_(splits_string: str, size: int) -> list[int]:
    """Document boundaries [0, a, b, size] for a "train,valid,test" split string (',' or '/' separated).

    Same arithmetic as GPT-NeoX: weights normalised, each range rounded, the rounding error taken off
    every boundary after the first so the last one is exactly `size`.
    """
    text = str(splits_string)
    sep = "," if "," in text else ("/" if "/" in text else None)
    try:
        splits = [float(s) for s in (text.split(sep) if sep else [text])]
    except ValueError:
        raise ValueError(f"split: cannot parse {splits_string!r}; expected e.g. '969,30,1'") from None
    if any(s < 0 or not math.isfinite(s) for s in splits):
        raise ValueError(f"split: values must be finite and >= 0, got {splits_string!r}")
    splits = (splits + [0.0, 0.0, 0.0])[:3]
    total = sum(splits)
    if total <= 0.0:
        raise ValueError(f"split: values must not all be 0, got {splits_string!r}")
    splits = [s / total for s in splits]
    index = [0]
    for s in splits:
        index.append(index[-1] + int(round(s * float(size))))
    diff = index[-1] - size
    for i in range(1, len(index)):
        index[i] -= diff
    assert index[-1] == size
    return index


def get_normalized_weights_and_num_samples(weights, num_samples: int, key: str = "weights"):
    """Normalised weights and per-dataset sample counts ceil(num_samples * w * 1.005) (GPT-NeoX)."""
    weights = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0.0:
        raise ValueError(f"{key}: weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    # The 0.5% margin leaves samples to spare where the blend does not split exactly by weight.
    return weights, [int(math.ceil(num_samples * w * 1.005)) for w in weights]


def weights_by_num_docs(num_docs, alpha: float = 0.3):
    """GPT-NeoX's `weight_by_num_documents`: p(L) ~ |L|^alpha, times (1 - unbiased share), normalised."""
    total = sum(num_docs)
    unbiased = [n / total for n in num_docs]
    probs = [p**alpha for p in unbiased]
    probs = [p / sum(probs) for p in probs]
    weights = [p * (1 - u) for p, u in zip(probs, unbiased)]
    return [w / sum(weights) for w in weights]


def samples_per_split(neox_args) -> list[int]:
    """[train, valid, test] sample counts as GPT-NeoX: valid covers every evaluation of the run."""
    train_iters = int(neox_args.train_iters)
    batch = int(neox_args.train_batch_size)
    eval_iters = int(neox_args.eval_iters)
    eval_interval = int(neox_args.eval_interval)
    if eval_interval < 1:
        raise ValueError(f"eval_interval must be >= 1, got {eval_interval}")
    return [
        train_iters * batch,
        (train_iters // eval_interval + 1) * eval_iters * batch,
        eval_iters * batch,
    ]


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def _check_data_prefix(prefix: str, key: str) -> None:
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{key}: data file(s) not found: {', '.join(missing)} (from prefix {prefix!r})")


def open_indexed_dataset(prefix: str, data_impl: str = "mmap", skip_warmup: bool = True, key: str = "data_path"):
    """Open `<prefix>.bin/.idx` through megatron.data.indexed_dataset, naming the config key on failure."""
    _check_data_prefix(prefix, key)
    from megatron.data import indexed_dataset  # the mmap format module, owned by the data-format part

    make = indexed_dataset.make_dataset
    kwargs = {"skip_warmup": skip_warmup} if "skip_warmup" in inspect.signature(make).parameters else {}
    dataset = make(prefix, data_impl, **kwargs)
    if dataset is None:
        raise ValueError(f"{key}: could not open {prefix!r} as a {data_impl!r} indexed dataset")
    return dataset


def check_dataset_token_ids(prefix: str, neox_args, key: str) -> None:
    """Token ids of `prefix` against padded_vocab_size, once per dataset at load (every rank calls this).

    The launcher scanned the data before launch and cached the result, so this usually reads a small json;
    where it finds no cache (another node's copy of the data) the builder rank scans while the others wait.
    """
    if neox_args.padded_vocab_size is None:
        return
    from megatron.data.gpt2_dataset import barrier, is_index_builder
    from megatron.data.token_ids import check_token_ids, token_id_range

    if is_index_builder(neox_args.use_shared_fs):
        token_id_range(prefix, log=print_rank_0)
    barrier()
    source = f"tokenizer_type {neox_args.tokenizer_type}"
    check_token_ids(prefix, int(neox_args.padded_vocab_size), key, source, log=print_rank_0)


def build_the_dataset(prefix, name, num_samples, neox_args, key, build_index_mappings=True):
    """One GPT2Dataset over all documents of `prefix`."""
    indexed = open_indexed_dataset(prefix, neox_args.data_impl, not neox_args.mmap_warmup, key)
    check_dataset_token_ids(prefix, neox_args, key)
    documents = np.arange(0, indexed.sizes.shape[0], dtype=np.int32)
    return GPT2Dataset(
        name, prefix, documents, indexed, num_samples, neox_args.seq_length, neox_args.seed,
        build_index_mappings=build_index_mappings, use_shared_fs=neox_args.use_shared_fs,
        index_cache_naming=neox_args.index_cache_naming,
    )


def build_train_valid_test_datasets(data_prefix, splits_string, num_samples, neox_args):
    """Split one dataset into contiguous document ranges; a split with no documents is None."""
    indexed = open_indexed_dataset(data_prefix, neox_args.data_impl, not neox_args.mmap_warmup, "data_path")
    check_dataset_token_ids(data_prefix, neox_args, "data_path")
    total_docs = indexed.sizes.shape[0]
    bounds = get_train_valid_test_split_(splits_string, total_docs)
    datasets = []
    for i, name in enumerate(("train", "valid", "test")):
        print_rank_0(f"    {name}: document indices in [{bounds[i]}, {bounds[i + 1]}) of {total_docs}")
        if bounds[i + 1] > bounds[i] and num_samples[i] > 0:
            documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
            datasets.append(GPT2Dataset(
                name, data_prefix, documents, indexed, num_samples[i], neox_args.seq_length,
                neox_args.seed, use_shared_fs=neox_args.use_shared_fs,
                index_cache_naming=neox_args.index_cache_naming,
            ))
        else:
            datasets.append(None)
    return tuple(datasets)


def _paths_and_weights(neox_args, split: str):
    key = f"{split}_data_paths"
    paths = list(getattr(neox_args, key) or [])
    weights = getattr(neox_args, f"{split}_data_weights")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(
            f"{split}_data_weights has {len(weights)} entries but {key} has {len(paths)}; give one weight per path"
        )
    return paths, list(weights)


def build_weighted_datasets(neox_args, num_samples):
    """(train, valid, test) BlendableDatasets (or None) from the explicit per-split path lists."""
    per_split = [_paths_and_weights(neox_args, s) for s in ("train", "valid", "test")]
    for split, (paths, _) in zip(("train", "valid", "test"), per_split):
        for p in paths:
            _check_data_prefix(p, f"{split}_data_paths")

    def build(weights_per_split, build_index_mappings):
        result = []
        for s, (split, (paths, _)) in enumerate(zip(("train", "valid", "test"), per_split)):
            if not paths or num_samples[s] <= 0:
                result.append([])
                continue
            _, counts = get_normalized_weights_and_num_samples(
                weights_per_split[s], num_samples[s], key=f"{split}_data_weights"
            )
            result.append([
                build_the_dataset(p, f"{split}_{i}", counts[i], neox_args, f"{split}_data_paths",
                                  build_index_mappings=build_index_mappings)
                for i, p in enumerate(paths)
            ])
        return result

    weights = [w for _, w in per_split]
    if neox_args.weight_by_num_documents:
        # GPT-NeoX: weights from document counts replace the configured ones.
        alpha = float(neox_args.weighted_sampler_alpha)
        probes = build(weights, build_index_mappings=False)
        weights = [
            weights_by_num_docs([d.indexed_dataset.sizes.shape[0] for d in ds], alpha) if ds else w
            for ds, w in zip(probes, weights)
        ]
    built = build(weights, build_index_mappings=True)
    return tuple(BlendableDataset(ds, w) if ds else None for ds, w in zip(built, weights))


def build_train_valid_test_datasets_from_args(neox_args):
    """The three datasets (None where a split is empty), from data_path/split or the per-split paths."""
    num_samples = samples_per_split(neox_args)
    if neox_args.train_data_paths:
        return build_weighted_datasets(neox_args, num_samples)
    if neox_args.data_path:
        return build_train_valid_test_datasets(neox_args.data_path, neox_args.split, num_samples, neox_args)
    raise ValueError("no training data configured: set data_path (with split) or train_data_paths")


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
def data_parallel_rank_and_size(neox_args) -> tuple[int, int]:
    """This process's data-parallel rank and the data-parallel size.

    From the run's process grid (``megatron.mpu``, built once from the topology) when it exists; otherwise
    (tools, tests without process groups) from GPT-NeoX's layout (pipe, data, model; model fastest):
    global rank = (pipe * dp + data) * mp + model.
    """
    from megatron import mpu

    dp = int(neox_args.data_parallel_size)
    if mpu.model_parallel_is_initialized():
        if mpu.get_data_parallel_world_size() != dp:
            raise ValueError(f"data_parallel_size {dp} of the config != the process grid's "
                             f"{mpu.get_data_parallel_world_size()}")
        return mpu.get_data_parallel_rank(), dp
    mp = int(neox_args.model_parallel_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        pp = int(neox_args.pipe_stages)
        if world != dp * mp * pp:
            raise ValueError(
                f"world size {world} != data_parallel_size {dp} x model_parallel_size {mp} x "
                f"pipe_stages {pp}"
            )
    else:
        rank = int(neox_args.rank or 0)
    return (rank // mp) % dp, dp


def make_data_loader(dataset, consumed_samples: int, neox_args):
    """DataLoader over `dataset` for this data-parallel rank, starting at `consumed_samples` (global)."""
    if dataset is None:
        return None
    dp_rank, dp_size = data_parallel_rank_and_size(neox_args)
    sampler = DistributedBatchSampler(
        num_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=int(neox_args.train_micro_batch_size_per_gpu),
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=int(neox_args.num_workers),
        pin_memory=torch.cuda.is_available(),
    )


def build_train_valid_test_data_iterators(neox_args):
    """(train_iter, valid_iter, test_iter), each yielding {"text": LongTensor[micro_batch, seq_length + 1]}.

    Call on every rank (index building has a barrier). The train iterator starts at
    neox_args.iteration * train_batch_size consumed samples; the valid iterator continues across
    evaluations as GPT-NeoX's does (its sample count covers every evaluation) and, on resume, starts
    after the (iteration // eval_interval) evaluations already run; the test iterator starts at 0.
    A split without data, or with no iterations to run, gives None.
    """
    print_rank_0("> building train, validation, and test datasets ...")
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets_from_args(neox_args)

    iteration = int(neox_args.iteration or 0)
    batch = int(neox_args.train_batch_size)
    train_consumed = iteration * batch
    valid_consumed = (iteration // int(neox_args.eval_interval)) * int(neox_args.eval_iters) * batch

    def iterator(dataset, consumed, enabled):
        loader = make_data_loader(dataset, consumed, neox_args) if enabled else None
        return iter(loader) if loader is not None else None

    eval_on = int(neox_args.eval_iters) > 0
    return (
        iterator(train_ds, train_consumed, int(neox_args.train_iters) > 0),
        iterator(valid_ds, valid_consumed, eval_on),
        iterator(test_ds, 0, eval_on),
    )
