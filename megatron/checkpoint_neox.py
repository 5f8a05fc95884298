"""The keys GPT-NeoX keeps in a checkpoint's client state, written and read here so checkpoints move both ways.

GPT-NeoX (``megatron/checkpointing.py`` at ea7aefd8f8e183256992d9fede4d7c71a46d67a5) saves through DeepSpeed's
``engine.save_checkpoint(save, tag="global_step<N>", client_state=sd)`` with ``sd`` holding

* ``iteration``;
* ``args``: eight model keys (:data:`ARGS_KEYS`); its ``load_checkpoint`` asserts each equals the running
  config's value of the same name;
* unless ``no_save_rng``: ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``, ``cuda_rng_state`` and
  ``rng_tracker_states`` (DeepSpeed's model-parallel CUDA RNG tracker, ``{"model-parallel-rng": state}``);
  its ``load_checkpoint`` restores all five unless ``finetune`` or ``no_load_rng``, and exits if one is missing.

DeepSpeed adds its own keys (``module``, ``optimizer``, ``lr_scheduler`` from GPT-NeoX's ``AnnealingLR``,
``global_steps``, ``dp_world_size``, ``ds_config``, ...), the layer files and the ZeRO shards; both projects
use the same engine, so those are the same files when the DeepSpeed version and the ZeRO stage are.

A checkpoint without this project's ``configs/resolved_config.yml`` is taken for GPT-NeoX's: its ``args`` are
checked by GPT-NeoX's rule, its layout is read from DeepSpeed's keys, and each of its tensors is compared with
the model this config builds before anything starts (:func:`first_tensor_mismatch`).
"""
import os
import random
import struct
from typing import Dict, Optional

import numpy as np
import torch

from megatron.checkpoint_io import CheckpointError, load_state_file

# GPT-NeoX's save_ds_checkpoint: the `args` it records, in its order.
ARGS_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
             "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "model_parallel_size")
RNG_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states")
# deepspeed.checkpointing._MODEL_PARALLEL_RNG_TRACKER_NAME, and the offset model_parallel_cuda_manual_seed
# adds to the seed for it (GPT-NeoX seeds through DeepSpeed's function).
TRACKER_NAME = "model-parallel-rng"
TRACKER_SEED_OFFSET = 2718
CLIENT_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def args_record(neox_args) -> dict:
    """GPT-NeoX's ``args`` entry for this run."""
    return {key: getattr(neox_args, key) for key in ARGS_KEYS}


def cuda_generator_state(seed: int, offset: int = 0) -> torch.Tensor:
    """A CUDA generator's state as ``torch.cuda.get_rng_state`` returns it (Philox: the 64-bit seed, then the
    64-bit offset, little endian; 16 bytes)."""
    return torch.frombuffer(bytearray(struct.pack("<Qq", int(seed) % 2 ** 64, int(offset))), dtype=torch.uint8)


def rng_entries() -> dict:
    """This rank's RNG streams under GPT-NeoX's names.

    A run without CUDA has no CUDA stream; it records the state ``torch.cuda.manual_seed`` of this rank's seed
    gives (``torch.initial_seed()``, which initialize.set_random_seed set for every generator), so GPT-NeoX can
    restore it on a GPU. The tracker state is the model-parallel stream's (``megatron.mpu.random``) where that is a
    seeded CUDA stream (tensor-parallel size > 1 on GPU), else the one GPT-NeoX's seeding starts with (seed + 2718,
    TP rank 0).
    """
    from megatron.mpu.random import get_rng_tracker

    tracker = get_rng_tracker()  # a CUDA stream only: GPT-NeoX restores it with torch.cuda.set_rng_state
    seed = torch.initial_seed()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    else:
        cuda = cuda_generator_state(seed)
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda,
            "rng_tracker_states": tracker.get_states() if tracker.device_type == "cuda" else
            {TRACKER_NAME: cuda_generator_state(seed + TRACKER_SEED_OFFSET)}}


def restore_rng(client_state: dict) -> bool:
    """Sets the python, numpy, torch (and, on CUDA, the CUDA) streams from GPT-NeoX's keys; False when the
    checkpoint has none. The tracker state is not used: dropout here draws from the default streams."""
    if not all(key in client_state for key in RNG_KEYS[:3]):
        return False
    random.setstate(client_state["random_rng_state"])
    np.random.set_state(client_state["np_rng_state"])
    torch.set_rng_state(client_state["torch_rng_state"])
    if torch.cuda.is_available() and client_state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(client_state["cuda_rng_state"])
    return True


def client_state_file(ckpt_dir: str) -> str:
    for name in CLIENT_FILES:
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"missing checkpoint file {os.path.join(ckpt_dir, CLIENT_FILES[0])} "
                          "(it holds the iteration and the data position)")


def read_client_state(ckpt_dir: str) -> dict:
    """The checkpoint's client state and DeepSpeed's own keys, without the module and optimizer states (the
    file is memory-mapped, so a large optimizer state is not read)."""
    path = client_state_file(ckpt_dir)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be mapped; the plain reader names a damaged one
        blob = load_state_file(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold a state dict (damaged?)")
    return {k: v for k, v in blob.items() if k not in ("module", "optimizer")}


def iteration_of(client_state: dict, source: str) -> int:
    """GPT-NeoX's rule: ``iteration``, else ``total_iters`` (older Megatron checkpoints)."""
    for key in ("iteration", "total_iters"):
        if client_state.get(key) is not None:
            return int(client_state[key])
    raise CheckpointError(f"checkpoint {source} has no 'iteration' (nor 'total_iters'); its keys: "
                          f"{', '.join(sorted(map(str, client_state)))}")


def args_mismatch(neox_args, record: dict, ckpt_dir: str) -> Optional[str]:
    """GPT-NeoX's ``check_checkpoint_args``: every recorded key must equal the config's (a key this config does
    not know yet, ``padded_vocab_size`` before the tokenizer is built, is left to the tensor check)."""
    for key, saved in record.items():
        if key not in ARGS_KEYS:
            raise CheckpointError(f"checkpoint {ckpt_dir} records args key {key!r}, which GPT-NeoX never writes "
                                  f"(expected a subset of {', '.join(ARGS_KEYS)})")
        ours = getattr(neox_args, key)
        if ours is not None and saved != ours:
            return (f"key '{key}' is {ours!r}, but checkpoint {ckpt_dir} was saved with {key}={saved!r} (its "
                    "GPT-NeoX 'args'); GPT-NeoX refuses to load it into another value, and so does this trainer")
    return None


# -------------------------------------------------------------------------------- tensors vs the config
def expected_layer_modules(neox_args) -> Dict[int, torch.nn.Module]:
    """``{pipeline layer index: module}`` of the model this config builds, on the meta device (shapes only)."""
    from megatron.model.layer_list import gpt2_layer_specs

    modules = {}
    with torch.device("meta"):
        for idx, spec in enumerate(gpt2_layer_specs(neox_args)):
            if spec.function is None and spec.forward_fn is None:  # a tied receiver shares the owner's tensors
                modules[idx] = spec.typename(*spec.args, **spec.kwargs)
    return modules


def translate_layer_state(module: torch.nn.Module, state: dict) -> dict:
    """``state`` under ``module``'s own (attribute) names, through the load hooks ``load_state_dict`` runs: a
    checkpoint's tensors and ``module.state_dict()`` (which may write GPT-NeoX's current MLP names) compare in one
    naming."""
    state = dict(state)
    for prefix, sub in module.named_modules():
        for hook in sub._load_state_dict_pre_hooks.values():
            hook(state, prefix + "." if prefix else "", {}, True, [], [], [])
    return state


def first_tensor_mismatch(neox_args, ckpt_dir: str) -> Optional[str]:
    """The first tensor of ``ckpt_dir`` whose name or shape does not fit the model of ``neox_args``, as one
    line naming the file, the tensor and both shapes; ``None`` when every layer fits."""
    import copy

    from megatron.checkpoint_io import CheckpointReader

    view = neox_args
    if neox_args.padded_vocab_size is None:
        # Known on the ranks only (the tokenizer decides it), where the 'args' check compares it.
        record = read_client_state(ckpt_dir).get("args") or {}
        view = copy.copy(neox_args)
        view.padded_vocab_size = record.get("padded_vocab_size")
        if view.padded_vocab_size is None:
            return None
    from megatron.checkpoint_partition import tensor_rule

    reader = CheckpointReader(ckpt_dir, int(neox_args.num_layers))

    def shard_shape(key: str, shape: tuple) -> tuple:
        """A full tensor's shape on one of the checkpoint's tensor-parallel ranks (the table's partition dim)."""
        if reader.tp == 1:
            return shape
        dim = tensor_rule(key, view, gpt_neox=True).partition_dim
        return shape if dim is None else shape[:dim] + (shape[dim] // reader.tp,) + shape[dim + 1:]

    whole = copy.copy(view)
    whole.model_parallel_size = 1  # the full tensors (the launcher has no tensor-parallel group), cut by the table
    for idx, module in expected_layer_modules(whole).items():
        own = {k: shard_shape(k, tuple(v.shape))
               for k, v in translate_layer_state(module, module.state_dict()).items()}
        if not own:
            continue
        source = reader.source(idx)
        got = reader.layer(idx, required=False, file_names=True)  # messages name the file's tensors
        if got is None:
            return f"{source}: layer {idx} is missing; the model this config builds has {len(own)} tensor(s) there"
        state = translate_layer_state(module, got[0])
        as_saved = translate_layer_state(module, {k: k for k in got[0]})  # our name -> the file's
        for key, shape in own.items():
            if key not in state:
                return (f"{source}: tensor '{key}' of layer {idx} is missing (the checkpoint has "
                        f"{', '.join(sorted(got[0])[:6]) or 'no tensors'})")
            if tuple(state[key].shape) != shape:
                per_rank = f" on each of its {reader.tp} tensor-parallel ranks" if reader.tp > 1 else ""
                return (f"{source}: tensor '{as_saved[key]}' of layer {idx} has shape {list(state[key].shape)} in "
                        f"the checkpoint, but the model this config builds has {list(shape)}{per_rank}")
        extra = sorted(as_saved[k] for k in set(state) - set(own))
        if extra:
            return (f"{source}: tensor '{extra[0]}' of layer {idx} (shape {list(got[0][extra[0]].shape)}) is in the "
                    "checkpoint but not in the model this config builds")
    return None
