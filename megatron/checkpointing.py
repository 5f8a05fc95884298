"""Saving and resuming training state.

Layout (docs/internals.md): ``<save>/global_step<N>/`` as DeepSpeed writes it, plus
``rng_state/rank_<R>.pt`` (each rank's python/numpy/torch/CUDA RNG states) and ``configs/`` (the user's
YAMLs and the resolved configuration), and ``<save>/latest`` holding the tag.

Ordering is what makes a crash harmless: every rank finishes its part of the checkpoint, all ranks meet
at a barrier, rank 0 copies the configs, and only then is ``latest`` replaced atomically (write a
temporary file, ``os.replace``). A run killed at any point before that still resumes from the previous
checkpoint; a run killed after it resumes from the new one.
"""
import dataclasses
import os
import random
import re
import shutil
from typing import Optional, Tuple

import numpy as np
import torch

LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


def checkpoint_tag(iteration: int) -> str:
    return f"global_step{int(iteration)}"


# ----------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng_state", f"rank_{rank:05d}.pt")


# ------------------------------------------------------------------------------------ atomic helpers
def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see either the old content or the new, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain(value):
    """A YAML-safe copy of a config value (callables and devices become their repr)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def resolved_config_dict(neox_args) -> dict:
    if hasattr(neox_args, "to_dict"):
        data = neox_args.to_dict()
    elif dataclasses.is_dataclass(neox_args):
        data = {f.name: getattr(neox_args, f.name) for f in dataclasses.fields(neox_args)}
    else:
        data = dict(vars(neox_args))
    return {k: _plain(v) for k, v in data.items() if not k.startswith("_")}


def write_config_copies(neox_args, ckpt_dir: str) -> None:
    """Copies the user's YAMLs and the resolved configuration into ``<ckpt_dir>/configs``.

    ``neox_args.config_files`` is GPT-NeoX's ``{file name: YAML text}``; a list of paths works too.
    The folder is assembled under a temporary name and renamed into place.
    """
    import yaml

    final = os.path.join(ckpt_dir, "configs")
    tmp = f"{final}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = getattr(neox_args, "config_files", None) or {}
    if isinstance(files, dict):
        for name, text in files.items():
            with open(os.path.join(tmp, os.path.basename(name)), "w") as f:
                f.write(text)
    else:
        for path in files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    if hasattr(neox_args, "save_resolved"):
        # NeoXArgs' own writer, the one deepy.py uses, so that the copy reads back with NeoXArgs.from_resolved
        # (the exporter's source) with every field, internal ones such as _DEFAULT_SPARSE_BLOCK_SIZE included.
        neox_args.save_resolved(os.path.join(tmp, "resolved_config.yml"))
    else:  # plain namespaces standing in for NeoXArgs in unit tests
        with open(os.path.join(tmp, "resolved_config.yml"), "w") as f:
            yaml.safe_dump(resolved_config_dict(neox_args), f, sort_keys=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------- save
def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def save_checkpoint(neox_args, iteration: int, engine, consumed_train_samples: int,
                    client_state: Optional[dict] = None) -> str:
    """Saves ``global_step<iteration>`` under ``neox_args.save`` and then points ``latest`` at it.

    Every rank must call this (DeepSpeed's save is collective). Returns the checkpoint directory.
    """
    save_dir = neox_args.save
    if not save_dir:
        raise ValueError("save_checkpoint called but the config has no 'save' directory")
    tag = checkpoint_tag(iteration)
    ckpt_dir = os.path.join(save_dir, tag)
    rank = _rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
    _barrier()
    state = {"iteration": int(iteration), "consumed_train_samples": int(consumed_train_samples),
             "world_size": int(getattr(neox_args, "world_size", 1) or 1), "rng_state": get_rng_state()}
    state.update(client_state or {})
    engine.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False)
    # Every rank keeps its own RNG stream (pipeline stages are seeded differently); DeepSpeed's client
    # state is only written by one rank, so each rank writes its own file.
    atomic_torch_save(get_rng_state(), _rng_path(ckpt_dir, rank))
    _barrier()
    if rank == 0:
        write_config_copies(neox_args, ckpt_dir)
        atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag)
    _barrier()
    return ckpt_dir


# ---------------------------------------------------------------------------------------------- load
def resolve_checkpoint(load: str) -> Tuple[str, str]:
    """``(directory, tag)`` for a ``load`` path: a save directory with ``latest``, or a
    ``global_step<N>`` directory itself. Raises ``FileNotFoundError`` naming the path otherwise."""
    if not load:
        raise ValueError("no 'load' directory configured")
    load = os.path.normpath(load)
    latest = os.path.join(load, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(load, tag)):
            raise FileNotFoundError(f"load={load}: 'latest' names checkpoint {tag!r}, but {os.path.join(load, tag)} "
                                    "does not exist")
        return load, tag
    base = os.path.basename(load)
    if TAG_PATTERN.match(base) and os.path.isdir(load):
        return os.path.dirname(load), base
    raise FileNotFoundError(f"load={load}: no checkpoint there (neither a '{LATEST_FILE}' file nor a "
                            "global_step<N> directory)")


def load_checkpoint(neox_args, engine, load_optimizer_states: bool = True) -> Tuple[int, int]:
    """Loads the checkpoint ``neox_args.load`` resolves to into ``engine``; restores this rank's RNG.

    Returns ``(iteration, consumed_train_samples)``.
    """
    load_dir, tag = resolve_checkpoint(neox_args.load)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                                load_lr_scheduler_states=False)
    if path is None or client_state is None:
        raise FileNotFoundError(f"load={neox_args.load}: DeepSpeed found no loadable checkpoint for tag {tag!r}")
    iteration = int(client_state["iteration"])
    consumed = int(client_state.get("consumed_train_samples", iteration * neox_args.train_batch_size))
    rng_file = _rng_path(os.path.join(load_dir, tag), _rank())
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif "rng_state" in client_state:
        # A different world size: fall back to rank 0's streams rather than the fresh seed's.
        set_rng_state(client_state["rng_state"])
    return iteration, consumed


def checkpoint_iterations(neox_args) -> set:
    """The extra iterations at which to save (``extra_save_iters``)."""
    return {int(i) for i in (getattr(neox_args, "extra_save_iters", None) or [])}


def should_save(neox_args, iteration: int) -> bool:
    if not getattr(neox_args, "save", None):
        return False
    factor = getattr(neox_args, "checkpoint_factor", None)
    if factor and iteration % int(factor) == 0:
        return True
    return iteration in checkpoint_iterations(neox_args)

