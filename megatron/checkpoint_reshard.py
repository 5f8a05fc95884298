"""A checkpoint written again for another tensor-parallel (TP) and pipeline size: the model weights, the client
state, the configs, and a resolved config that says the new sizes (``tools/ckpts/reshard.py`` is the command).

* Every pipeline layer is read through :class:`megatron.checkpoint_io.CheckpointReader` (either layout, any TP
  size), merged and split again by the table of :mod:`megatron.checkpoint_partition`, and written as DeepSpeed
  writes it: ``layer_XX-model_YY-model_states.pt`` per layer and TP rank plus ``mp_rank_XX_model_states.pt`` per
  pipeline x TP rank (client state, ``module: None``) for ``--pp >= 1``; ``mp_rank_YY_model_states.pt`` per TP
  rank with ``sequential.<idx>.`` keys for ``--pp 0``.
* The resolved config is the checkpoint's own, re-derived with ``model_parallel_size`` / ``pipe_parallel_size``
  set (the same data-parallel size): so the vocabulary is padded again to ``make_vocab_size_divisible_by x TP``
  by the run's tokenizer, and the vocabulary tensors are trimmed (padding rows past the new size dropped) or
  padded with zero rows to it.
* No optimizer state is written (it is split by TP rank in DeepSpeed's own format); the checkpoint says so, and
  a resume asks for ``no_load_optim`` or ``finetune``. Per-rank RNG files are not carried (a resume takes rank
  0's streams from GPT-NeoX's client-state keys).
* The output is a new save directory (``latest`` and ``global_stepN/``) assembled under a temporary name and
  renamed when complete; an existing one is replaced only when this tool wrote it (its marker file).
"""
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from megatron.checkpoint_io import CheckpointError, CheckpointReader

RESHARD_MARKER = ".reshard.json"


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(out: Path, ckpt_dir: str) -> None:
    """Refuses an ``out`` that exists and is not a previous reshard's output (or an empty directory), and one that
    holds or is held by the input checkpoint."""
    source = Path(ckpt_dir).resolve()
    if _inside(source, out.resolve()) or _inside(out.resolve(), source):
        raise CheckpointError(f"--output_dir {out} overlaps the input checkpoint {source}; give a new directory")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"--output_dir {out} exists and is not a directory; refusing to replace it")
    entries = os.listdir(out)
    if entries and RESHARD_MARKER not in entries:
        raise CheckpointError(f"--output_dir {out} exists and was not written by reshard.py (no {RESHARD_MARKER}); "
                              "refusing to replace it: give a new directory")


def input_checkpoint(input_dir: str) -> str:
    """The ``global_stepN`` directory that ``input_dir`` names (itself, or its save directory's ``latest``)."""
    from megatron.checkpointing import resolve_checkpoint

    try:
        load_dir, tag = resolve_checkpoint(input_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"--input_dir: {exc}") from None
    return os.path.join(load_dir, tag)


def resharded_args(ckpt_dir: str, tp: int, pp: int, vocab_file: Optional[str] = None):
    """The checkpoint's resolved config re-derived for TP ``tp`` and ``pp`` pipeline stages (same data-parallel
    size), with the vocabulary padded again by the tokenizer."""
    from megatron.hf.export_config import _RUN_ONLY, _environment, _quiet
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.errors import ConfigError
    from megatron.checkpoint_layout import RESOLVED_CONFIG, read_saved_config

    saved = read_saved_config(ckpt_dir)
    if saved is None:
        raise CheckpointError(f"{ckpt_dir} has no {RESOLVED_CONFIG} (a GPT-NeoX checkpoint?): reshard.py needs the "
                              "config the run resolved")
    for key, value in (("--tp", tp), ("--pp", pp)):
        if value < (1 if key == "--tp" else 0):
            raise CheckpointError(f"{key} {value}: must be >= {1 if key == '--tp' else 0}")
    for key in ("num_attention_heads", "num_kv_heads", "hidden_size"):
        if saved.get(key) is not None and int(saved[key]) % tp:
            raise CheckpointError(f"--tp {tp}: key '{key}' is {saved[key]} in {ckpt_dir}/{RESOLVED_CONFIG}, which "
                                  f"{tp} tensor-parallel ranks cannot split")
    vocab = vocab_file or saved.get("vocab_file")
    if saved.get("tokenizer_type") != "CharLevelTokenizer" and (not vocab or not os.path.isfile(vocab)):
        raise CheckpointError(f"the run's tokenizer vocab_file {vocab} does not exist here: reshard.py pads the "
                              f"vocabulary to make_vocab_size_divisible_by x {tp} from it; give --vocab_file")
    world = int(saved.get("data_parallel_size") or 1) * tp * max(pp, 1)
    # What the weights do not need and may be missing here (data, hostfile) is left out of the derivation, as the
    # exporter does, then put back as the run had it: the record of what trained the weights.
    overrides = dict(_RUN_ONLY)
    overrides.update(model_parallel_size=tp, pipe_parallel_size=pp, padded_vocab_size=None, vocab_file=vocab)
    try:
        args = _quiet(lambda: NeoXArgs.from_resolved(os.path.join(ckpt_dir, RESOLVED_CONFIG),
                                                     env=_environment(world), overrides=overrides))
    except ConfigError as err:
        raise CheckpointError(f"--tp {tp} --pp {pp}: the checkpoint's config does not resolve for these sizes: "
                              f"{err}") from None
    for key in _RUN_ONLY:
        setattr(args, key, saved.get(key))
    if args.padded_vocab_size is None:
        raise CheckpointError(f"--tp {tp}: the vocabulary could not be padded (tokenizer {args.tokenizer_type}, "
                              f"vocab_file {vocab})")
    return saved, args


def _full_layers(reader: CheckpointReader, saved_args) -> Dict[int, Dict[str, torch.Tensor]]:
    from megatron.checkpoint_partition import merge_layer

    return {idx: merge_layer(reader.layer(idx), saved_args, reader.source(idx)) for idx in reader.layer_indices()}


def _saved_args(ckpt_dir: str):
    """The checkpoint's own resolved config as NeoXArgs (its tensors' rules: heads, residual, MLP)."""
    from megatron.hf.export_config import checkpoint_args

    return checkpoint_args(ckpt_dir, log=lambda _line: None)


def _client_state(ckpt_dir: str, args, mp_files: int) -> dict:
    from megatron import checkpoint_neox

    state = checkpoint_neox.read_client_state(ckpt_dir)
    state.update(optimizer=None, mp_world_size=mp_files, world_size=int(args.global_num_gpus),
                 args=checkpoint_neox.args_record(args))
    dims = state.get("checkpoint_parallel_dimensions")
    if isinstance(dims, dict):
        dims = dict(dims)
        dims.update(tp_degree=int(args.model_parallel_size), pp_degree=max(int(args.pipe_parallel_size), 1))
        state["checkpoint_parallel_dimensions"] = dims
    return state


def _write(ckpt: Path, shards: Dict[int, List[Dict[str, torch.Tensor]]], client: dict, args) -> None:
    from megatron.model.neox_names import to_current_names

    tp, pp = int(args.model_parallel_size), int(args.pipe_parallel_size)
    if args.checkpoint_tensor_names == "current":
        for per_rank in shards.values():
            for state in per_rank:
                to_current_names(state, "mlp.")
    if pp >= 1:
        for idx, per_rank in sorted(shards.items()):
            for rank, state in enumerate(per_rank):
                torch.save(state, ckpt / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
        for mp in range(tp * pp):
            torch.save(dict(client, module=None), ckpt / f"mp_rank_{mp:02d}_model_states.pt")
        return
    for rank in range(tp):
        module = {f"sequential.{idx}.{name}": t for idx, per_rank in sorted(shards.items())
                  for name, t in per_rank[rank].items()}
        torch.save(dict(client, module=module), ckpt / f"mp_rank_{rank:02d}_model_states.pt")


def reshard(input_dir: str, output_dir: str, tp: int, pp: int, vocab_file: Optional[str] = None,
            log: Callable[[str], None] = print) -> str:
    """Writes ``output_dir`` (a save directory) holding the checkpoint ``input_dir`` names at ``tp`` / ``pp``;
    returns the new ``global_stepN`` path. Bad input raises :class:`CheckpointError` before anything is written."""
    from megatron import checkpoint_layout
    from megatron.checkpoint_partition import split_layer
    from megatron.atomic_files import install_directory
    from megatron.checkpointing import LATEST_FILE, NO_OPTIMIZER_MARKER, atomic_write_text, fsync_tree

    ckpt_dir = input_checkpoint(input_dir)
    out = Path(output_dir).absolute()
    check_output_dir(out, ckpt_dir)
    saved, args = resharded_args(ckpt_dir, tp, pp, vocab_file)
    layout = checkpoint_layout.read_layout(ckpt_dir, saved)
    checkpoint_layout.check_files(ckpt_dir, layout, saved)
    source_args = _saved_args(ckpt_dir)
    reader = CheckpointReader(ckpt_dir, int(source_args.num_layers))
    full = _full_layers(reader, source_args)
    shards = {idx: split_layer(state, args, tp, vocab_rows=int(args.padded_vocab_size),
                               where=f"layer {idx} of {ckpt_dir}") for idx, state in full.items()}
    tag = os.path.basename(ckpt_dir)
    mp_files = tp * max(pp, 1)
    client = _client_state(ckpt_dir, args, mp_files)
    zero = int(layout.zero_stage) if layout is not None and layout.zero_stage != 3 else 0  # ZeRO-3 shards: gathered
    new_layout = checkpoint_layout.Layout(world_size=int(args.global_num_gpus),
                                          data_parallel_size=int(args.data_parallel_size), pipe_parallel_size=pp,
                                          model_parallel_size=tp, zero_stage=zero)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.reshard-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        ckpt = tmp / tag
        ckpt.mkdir()
        _write(ckpt, shards, client, args)
        (ckpt / "configs").mkdir()
        for name in sorted(os.listdir(os.path.join(ckpt_dir, "configs"))):
            src = os.path.join(ckpt_dir, "configs", name)
            if os.path.isfile(src) and name != os.path.basename(checkpoint_layout.RESOLVED_CONFIG):
                shutil.copyfile(src, ckpt / "configs" / name)
        args.save_resolved(str(ckpt / checkpoint_layout.RESOLVED_CONFIG))
        checkpoint_layout.write_layout(str(ckpt), new_layout)
        (ckpt / NO_OPTIMIZER_MARKER).write_text(
            f"resharded by tools/ckpts/reshard.py from {ckpt_dir} to model parallel {tp}, pipeline {pp}: model "
            "weights only; resume with no_load_optim: true or finetune: true\n")
        with open(tmp / RESHARD_MARKER, "w") as handle:
            json.dump({"written_by": "megatron.checkpoint_reshard", "input": ckpt_dir, "model_parallel_size": tp,
                       "pipe_parallel_size": pp, "padded_vocab_size": int(args.padded_vocab_size),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, handle, indent=1)
        fsync_tree(str(tmp))
        atomic_write_text(str(tmp / LATEST_FILE), tag)
        check_output_dir(out, ckpt_dir)  # again: something may have appeared there meanwhile
        install_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    before = layout.describe() if layout is not None else "an unknown layout"
    log(f"resharded {ckpt_dir} ({before}, padded vocabulary {saved.get('padded_vocab_size')}) to model parallel "
        f"{tp}, {'sequential model' if pp == 0 else f'pipeline stages {pp}'} (padded vocabulary "
        f"{args.padded_vocab_size}): {out / tag}")
    return str(out / tag)
