"""Saving and resuming training state.

Layout (docs/internals.md): ``<save>/global_step<N>/`` as DeepSpeed writes it, plus
``rng_state/rank_<R>.pt`` (each rank's python/numpy/torch/CUDA RNG states), ``configs/`` (the user's
YAMLs and the resolved configuration) and ``layout.json`` (the parallel layout, see
:mod:`megatron.checkpoint_layout`), and ``<save>/latest`` holding the tag.

Ordering is what makes a crash harmless: every rank writes its part into ``global_step<N>.tmp``, all ranks
meet, rank 0 adds the configs and the layout, flushes every file and directory to the disk, renames the
directory to ``global_step<N>`` and only then replaces ``latest`` atomically (temporary file, ``os.replace``,
directory flushed). So a ``global_step<N>`` directory is always complete, and ``latest`` never names one that
is not on the disk, even after a power loss. Leftovers of a killed save (``*.tmp`` names) are removed by the
next save. A save that fails (full disk) removes its partial directory and leaves the previous checkpoint and
``latest`` as they were (:class:`CheckpointSaveFailed`).
"""
import errno
import os
import random
import re
import shutil
from typing import Optional, Tuple

import numpy as np
import torch

from megatron.atomic_files import fsync_dir

LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
TMP_SUFFIX = ".tmp"  # global_step<N>.tmp: a checkpoint being written
REPLACED_SUFFIX = ".replaced.tmp"  # global_step<N>.replaced.tmp: an older copy of N being replaced by a new one
STALE_TOP = re.compile(r"^(global_step\d+(\.replaced)?\.tmp|latest\.tmp\.\d+)$")
STALE_INNER = re.compile(r"^(configs\.tmp\.\d+|.+\.pt\.tmp\.\d+)$")


def checkpoint_tag(iteration: int) -> str:
    return f"global_step{int(iteration)}"


# ----------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    """This rank's streams: python, numpy, torch, CUDA, and the model-parallel stream attention dropout draws from
    at tensor-parallel size > 1 (per TP rank, so it is saved in the per-rank file)."""
    from megatron.mpu.random import get_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "model_parallel": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.mpu.random import get_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("model_parallel"):  # absent in checkpoints written before tensor parallelism
        get_rng_tracker().set_states(state["model_parallel"])


def _rng_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng_state", f"rank_{rank:05d}.pt")


# ------------------------------------------------------------------------------------ atomic helpers
def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see either the old content or the new, never half. The
    temporary name ``<path>.tmp.<pid>`` is one the interrupted-save cleanup recognises as this module's."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_config_copies(neox_args, ckpt_dir: str) -> None:
    """Copies the user's YAMLs and the resolved configuration into ``<ckpt_dir>/configs``.

    ``neox_args.config_files`` is GPT-NeoX's ``{file name: YAML text}``; a list of paths works too.
    The folder is assembled under a temporary name and renamed into place.
    """
    final = os.path.join(ckpt_dir, "configs")
    tmp = f"{final}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = neox_args.config_files or {}
    if isinstance(files, dict):
        for name, text in files.items():
            with open(os.path.join(tmp, os.path.basename(name)), "w") as f:
                f.write(text)
    else:
        for path in files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    # NeoXArgs' own writer, the one deepy.py uses, so that the copy reads back with NeoXArgs.from_resolved
    # (the exporter's source) with every field, internal ones such as _DEFAULT_SPARSE_BLOCK_SIZE included.
    neox_args.save_resolved(os.path.join(tmp, "resolved_config.yml"))
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


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (a pickled broadcast; identity without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _first_failure(failure: Optional[str]) -> Optional[str]:
    """The first rank's failure message, on every rank (also the barrier that ends a write phase)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, failure)
        return next((f for f in every if f), None)
    return failure


def fsync_tree(path: str) -> None:
    """Flushes every file and directory under ``path`` (and ``path``) to the disk."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); the partial one is gone, ``latest`` unchanged."""


def _write_failure(exc: BaseException) -> Optional[str]:
    """The message of a failed write, or ``None`` for an exception that is not one (a bug: re-raised)."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else str(exc)
    text = str(exc)
    # torch reports a failed write as RuntimeError from its zip writer or from the C++ stream under it.
    if isinstance(exc, RuntimeError) and any(s in text for s in ("inline_container", "PytorchStreamWriter",
                                                                   "iostream error", "file write failed")):
        return f"write error ({text.splitlines()[0].strip()})"
    return None


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _model_bytes_estimate(neox_args, engine) -> int:
    """What one checkpoint of ``engine`` writes, summed over the ranks: the weights and Adam's two fp32 moments,
    plus fp32 master weights under mixed precision; data-parallel replicas write one copy. A collective."""
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())  # ZeRO-3: full size
    per_param = 2 + 4 + 8 if neox_args.precision in ("bf16", "fp16") else 4 + 8
    total = torch.tensor([float(numel * per_param)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = total.to(engine.device)
        torch.distributed.all_reduce(total)
    return int(total.item() / max(int(neox_args.data_parallel_size), 1))


def expected_checkpoint_bytes(neox_args, engine) -> int:
    """The size of the newest complete checkpoint in ``save``; the parameter-count estimate before the first.
    Every rank calls it (the estimate is a collective)."""
    estimate = _model_bytes_estimate(neox_args, engine)
    complete = complete_checkpoints(neox_args.save)
    return _dir_bytes(os.path.join(neox_args.save, complete[-1])) if complete else estimate


def disk_space_problem(save_dir: str, needed: int) -> Optional[str]:
    free = shutil.disk_usage(save_dir).free
    if free < needed:
        return (f"not enough disk space for a checkpoint in {save_dir}: {_mib(free)} free, about {_mib(needed)} "
                "needed (the size of the previous checkpoint, or of the weights and optimizer state)")
    return None


def _latest_tag(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save_checkpoint(neox_args, iteration: int, engine, consumed_train_samples: int,
                    client_state: Optional[dict] = None) -> str:
    """Saves ``global_step<iteration>`` under ``neox_args.save`` and then points ``latest`` at it.

    Every rank must call this (DeepSpeed's save is collective). The checkpoint is written as
    ``global_step<N>.tmp``, flushed to the disk and renamed when complete; then ``latest`` moves. Returns the
    checkpoint directory; raises :class:`CheckpointSaveFailed` on every rank when any rank could not write
    (the partial checkpoint is removed, the previous one and ``latest`` are untouched).
    """
    save_dir = neox_args.save
    if not save_dir:
        raise ValueError("save_checkpoint called but the config has no 'save' directory")
    tag = checkpoint_tag(iteration)
    tmp_tag = tag + TMP_SUFFIX
    ckpt_dir, tmp_dir = os.path.join(save_dir, tag), os.path.join(save_dir, tmp_tag)
    rank = _rank()
    needed = expected_checkpoint_bytes(neox_args, engine)
    problem = None
    if rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            remove_stale_temporaries(save_dir)
            problem = disk_space_problem(save_dir, needed)
        except OSError as exc:
            problem = f"cannot prepare the save directory {save_dir}: {_write_failure(exc)}"
    problem = _from_rank0(problem)
    if problem:
        raise CheckpointSaveFailed(f"{problem}; checkpoint {tag} not written, {_kept(save_dir)}")

    from megatron import checkpoint_neox

    # GPT-NeoX's keys (iteration, args, its five RNG entries) make the checkpoint resumable there too.
    from megatron.checkpoint_partition import universal_checkpoint_info

    state = {"iteration": int(iteration), "consumed_train_samples": int(consumed_train_samples),
             "world_size": int(neox_args.world_size), "args": checkpoint_neox.args_record(neox_args),
             # how ds_to_universal merges the tensor-parallel shards, so the optimizer state can change TP size
             "universal_checkpoint_info": universal_checkpoint_info(
                 neox_args, [name for name, _ in engine.module.named_parameters()])}
    if not neox_args.no_save_rng:
        state.update(checkpoint_neox.rng_entries())
    state.update(client_state or {})
    failure, in_engine = None, True
    try:
        engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=state, save_latest=False)
        in_engine = False
        # Every rank keeps its own RNG stream (pipeline stages are seeded differently); DeepSpeed's client
        # state is only written by one rank, so each rank writes its own file.
        if not neox_args.no_save_rng:
            atomic_torch_save(get_rng_state(), _rng_path(tmp_dir, rank))
    except (OSError, RuntimeError) as exc:
        failure = _write_failure(exc)
        if failure is None:
            raise
        failure = f"rank {rank} could not write checkpoint {tmp_dir}: {failure}"
        if in_engine:
            _barrier()  # the one that ends DeepSpeed's save, which this rank left early
    failure = _first_failure(failure)
    if failure is None and rank == 0:
        try:
            _finish(neox_args, save_dir, tag, tmp_dir, ckpt_dir)
        except OSError as exc:
            failure = f"could not complete checkpoint {tmp_dir}: {_write_failure(exc)}"
    failure = _from_rank0(failure)
    if failure:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _barrier()
        free = shutil.disk_usage(save_dir).free if os.path.isdir(save_dir) else 0
        raise CheckpointSaveFailed(f"{failure}; {_mib(free)} free on {save_dir} after removing the partial checkpoint, "
                                   f"about {_mib(needed)} needed; {_kept(save_dir)}")
    return ckpt_dir


def _kept(save_dir: str) -> str:
    latest = _latest_tag(save_dir)
    return f"'latest' still names {latest}" if latest else "no earlier checkpoint ('latest' absent)"


def _finish(neox_args, save_dir: str, tag: str, tmp_dir: str, ckpt_dir: str) -> None:
    """Rank 0, after every rank wrote its part: configs and layout, flush, rename into place, move ``latest``."""
    from megatron.checkpoint_layout import layout_of, write_layout

    if neox_args.no_save_optim:
        drop_optimizer_states(tmp_dir)
    write_config_copies(neox_args, tmp_dir)
    write_layout(tmp_dir, layout_of(neox_args))
    fsync_tree(tmp_dir)
    old = None
    if os.path.isdir(ckpt_dir):  # the same iteration saved again (a restart that re-reaches it)
        old = ckpt_dir + REPLACED_SUFFIX
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ckpt_dir, old)
    os.rename(tmp_dir, ckpt_dir)
    fsync_dir(save_dir)
    atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if neox_args.keep_last_n_checkpoints:
        prune_old_checkpoints(save_dir, neox_args.keep_last_n_checkpoints)


NO_OPTIMIZER_MARKER = "no_optimizer_states"
OPTIMIZER_FILE = re.compile(r".*optim_states\.pt$")  # ZeRO / bf16-optimizer shards
MODEL_STATES_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")  # holds the optimizer without ZeRO


def drop_optimizer_states(ckpt_dir: str) -> None:
    """``no_save_optim``: removes the optimizer state DeepSpeed wrote into a checkpoint being assembled, and
    leaves a marker so that a resume asks for ``no_load_optim`` instead of failing inside DeepSpeed."""
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if OPTIMIZER_FILE.match(name):
            os.remove(path)
        elif MODEL_STATES_FILE.match(name):
            blob = torch.load(path, map_location="cpu", weights_only=False)
            if blob.get("optimizer") is not None:
                blob["optimizer"] = None
                atomic_torch_save(blob, path)
    with open(os.path.join(ckpt_dir, NO_OPTIMIZER_MARKER), "w") as f:
        f.write("saved with no_save_optim: true; resume with no_load_optim: true or finetune: true\n")


def prune_old_checkpoints(save_dir: str, keep: int) -> list:
    """``keep_last_n_checkpoints``: deletes the oldest complete ``global_step<N>`` directories beyond ``keep``,
    never the one ``latest`` names; runs after the new checkpoint and ``latest`` are in place. Returns the
    removed tags."""
    latest = _latest_tag(save_dir)
    removable = [t for t in complete_checkpoints(save_dir) if t != latest]
    surplus = len(removable) + (1 if latest else 0) - keep
    removed = removable[:max(surplus, 0)]
    for tag in removed:
        shutil.rmtree(os.path.join(save_dir, tag))
    return removed


# ------------------------------------------------------------------------------------- temporaries
def complete_checkpoints(save_dir: str) -> list:
    """Tags of the complete checkpoints in ``save_dir``, oldest first. A ``global_step<N>`` directory is complete
    once it holds ``configs/``: rank 0 writes that last, after every rank's files (also in older versions)."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    tags = [n for n in names if TAG_PATTERN.match(n) and os.path.isdir(os.path.join(save_dir, n, "configs"))]
    return sorted(tags, key=lambda n: int(TAG_PATTERN.match(n).group(1)))


def stale_temporaries(save_dir: str) -> list:
    """What an interrupted save leaves: ``global_step<N>.tmp`` directories, ``latest.tmp.<pid>``, and
    ``configs.tmp.<pid>`` / ``*.pt.tmp.<pid>`` inside checkpoints. Only names this module writes."""
    found = []
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    for name in names:
        path = os.path.join(save_dir, name)
        if STALE_TOP.match(name):
            found.append(path)
        elif TAG_PATTERN.match(name) and os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                found += [os.path.join(root, n) for n in dirs + files if STALE_INNER.match(n)]
    return sorted(found)


def remove_stale_temporaries(save_dir: str) -> list:
    """Removes :func:`stale_temporaries`; a checkpoint moved aside to be replaced goes back if the copy that
    was to replace it never arrived. Returns what was removed."""
    removed = []
    for path in stale_temporaries(save_dir):
        if path.endswith(REPLACED_SUFFIX):
            original = path[: -len(REPLACED_SUFFIX)]
            if not os.path.exists(original):
                os.rename(path, original)
                continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(path)
    if removed:
        print(f"removed leftovers of an interrupted save: {', '.join(removed)}", flush=True)
    return removed


# ---------------------------------------------------------------------------------------------- load
def holds_no_checkpoint(path: str) -> bool:
    """True when ``path`` is a save directory before its first save: it does not exist yet, or holds no ``latest``
    file, no ``global_step<N>`` directory and nothing an interrupted save left (that is worth an error naming it),
    and is not itself a ``global_step<N>`` directory."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        return True
    if not os.path.isdir(path) or TAG_PATTERN.match(os.path.basename(path)):
        return False
    return (not os.path.exists(os.path.join(path, LATEST_FILE))
            and not any(TAG_PATTERN.match(n) for n in os.listdir(path)) and not stale_temporaries(path))


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
        if not tag:
            raise FileNotFoundError(f"load={load}: the '{LATEST_FILE}' file {latest} is empty{_newest_hint(load)}")
        if not os.path.isdir(os.path.join(load, tag)):
            raise FileNotFoundError(f"load={load}: 'latest' names checkpoint {tag!r}, but {os.path.join(load, tag)} "
                                    f"does not exist{_newest_hint(load)}")
        return load, tag
    base = os.path.basename(load)
    if TAG_PATTERN.match(base) and os.path.isdir(load):
        return os.path.dirname(load), base
    complete = complete_checkpoints(load)
    if complete:
        raise FileNotFoundError(
            f"load={load}: no '{LATEST_FILE}' file (a save was interrupted before it moved), but complete checkpoints "
            f"exist ({', '.join(complete)}); to resume from the newest set load: {os.path.join(load, complete[-1])}")
    partial = [os.path.basename(p) for p in stale_temporaries(load) if p.endswith(TMP_SUFFIX)]
    raise FileNotFoundError(f"load={load}: no checkpoint there (neither a '{LATEST_FILE}' file nor a "
                            "global_step<N> directory" + (f"; {', '.join(partial)} are incomplete saves, removed at "
                                                          "the next save" if partial else "") + ")")


def _newest_hint(load: str) -> str:
    complete = complete_checkpoints(load)
    return f"; the newest complete checkpoint is {os.path.join(load, complete[-1])} (set it as 'load')" if complete else ""


def load_checkpoint(neox_args, engine, load_optimizer_states: bool = True, scheduler=None) -> Tuple[int, int]:
    """Loads the checkpoint ``neox_args.load`` resolves to into ``engine``; restores this rank's RNG (unless
    ``no_load_rng``) and reconciles ``scheduler`` with the saved schedule (``override_lr_scheduler`` /
    ``use_checkpoint_lr_scheduler``).

    In the saved layout DeepSpeed loads everything; in another layout only the weights
    (:mod:`megatron.checkpoint_layout`, which also refuses what cannot work). Returns
    ``(iteration, consumed_train_samples)``.
    """
    from megatron import checkpoint_layout, checkpoint_neox
    from megatron.checkpoint_io import CheckpointError

    load_dir, tag = resolve_checkpoint(neox_args.load)
    ckpt_dir = os.path.join(load_dir, tag)
    note = checkpoint_layout.no_optimizer_note(ckpt_dir)
    if load_optimizer_states and note:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds no optimizer state ({note}); resume it with "
                              "no_load_optim: true (a fresh optimizer) or finetune: true")
    same_layout, _ = checkpoint_layout.resume_plan(neox_args, ckpt_dir)
    if same_layout:
        client_state = _deepspeed_load(engine, load_dir, tag, load_optimizer_states)
    else:
        client_state = checkpoint_layout.load_weights_any_layout(engine, ckpt_dir, neox_args)
    iteration = checkpoint_neox.iteration_of(client_state, ckpt_dir)
    # GPT-NeoX records no sample count: its data position is the iteration's
    consumed = int(client_state.get("consumed_train_samples", iteration * neox_args.train_batch_size))
    rng_file = _rng_path(ckpt_dir, _rank())
    if neox_args.no_load_rng or neox_args.finetune:
        pass  # the streams the seed gave this run stay (GPT-NeoX's finetune does not restore them either)
    elif same_layout and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif checkpoint_neox.restore_rng(client_state):
        pass  # rank 0's streams (GPT-NeoX's keys), rather than the fresh seed's, in another world size
    elif "rng_state" in client_state:  # written before the GPT-NeoX keys
        set_rng_state(client_state["rng_state"])
    if scheduler is not None and "lr_scheduler" in client_state:
        scheduler.reconcile(client_state["lr_scheduler"], override=neox_args.override_lr_scheduler,
                            use_checkpoint=neox_args.use_checkpoint_lr_scheduler)
    return iteration, consumed


def _deepspeed_load(engine, load_dir: str, tag: str, load_optimizer_states: bool) -> dict:
    """``engine.load_checkpoint``; a damaged checkpoint becomes one :class:`CheckpointError` naming the file
    (DeepSpeed's own errors are bare assertions and zip errors)."""
    from megatron import checkpoint_layout
    from megatron.checkpoint_io import CheckpointError

    ckpt_dir = os.path.join(load_dir, tag)
    try:
        # Without the optimizer, weights only (GPT-NeoX's load_module_only = not load_optim_and_scheduler): only
        # then does DeepSpeed refresh an fp16/bf16 optimizer's fp32 master copy from the loaded weights.
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                                    load_lr_scheduler_states=False,
                                                    load_module_only=not load_optimizer_states)
    except Exception as exc:  # diagnose, then re-raise what cannot be explained
        try:
            saved_config = checkpoint_layout.read_saved_config(ckpt_dir)
            checkpoint_layout.check_files(ckpt_dir, checkpoint_layout.read_layout(ckpt_dir, saved_config), saved_config)
        except CheckpointError as problem:
            raise problem from None  # the file named is the cause; DeepSpeed's trace would only bury it
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # load_state_dict puts the tensor and both shapes on its second line
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "(no message)")
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded: {type(exc).__name__}: {detail}") from exc
    if path is None or client_state is None:
        raise FileNotFoundError(f"load={ckpt_dir}: DeepSpeed found no loadable checkpoint for tag {tag!r}")
    return client_state


def checkpoint_iterations(neox_args) -> set:
    """The extra iterations at which to save (``extra_save_iters``)."""
    return {int(i) for i in (neox_args.extra_save_iters or [])}


def should_save(neox_args, iteration: int) -> bool:
    if not neox_args.save:
        return False
    factor = neox_args.checkpoint_factor
    if factor and iteration % int(factor) == 0:
        return True
    return iteration in checkpoint_iterations(neox_args)

