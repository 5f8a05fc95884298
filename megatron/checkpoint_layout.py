"""The parallel layout a checkpoint was saved in, and whether a run in another layout can resume from it.

Each checkpoint records its layout in ``<save>/global_stepN/layout.json`` (world size, data / pipeline /
model parallel sizes, ZeRO stage); older checkpoints are read from their ``configs/resolved_config.yml``, and
GPT-NeoX's (which have neither) from the keys DeepSpeed wrote into them (:func:`layout_from_deepspeed`).

What DeepSpeed can restore:

* the same layout: everything (``engine.load_checkpoint``; resumes are bitwise exact);
* another data-parallel size under ZeRO stage 0, same pipeline structure: everything as well (only data-parallel
  rank 0 writes, every rank reads the same files);
* anything else with the optimizer state (ZeRO partitions over another data-parallel size, another ZeRO stage,
  another number of pipeline stages, pipeline <-> sequential): nothing. DeepSpeed either fails deep inside a
  rank or, worse, silently starts a fresh optimizer. Such a resume is refused before launch
  (:func:`check_resume_before_launch`), naming both layouts and the way out.

Weights alone (``no_load_optim`` / ``finetune``) load into any layout: :func:`load_weights_any_layout` reads the
checkpoint layer by layer through :class:`megatron.checkpoint_io.CheckpointReader` (pipeline layer files,
the sequential ``mp_rank_XX`` files or ZeRO-3 shards), merges its tensor-parallel shards and cuts them again for
this run's tensor-parallel size and padded vocabulary (:mod:`megatron.checkpoint_partition`), and copies each
tensor into this rank's part of the model, after checking its shape. Another tensor-parallel size with the
optimizer goes through DeepSpeed's universal checkpoint (``ds_to_universal``, then ``load_universal``), which
splits the ZeRO state by the tensor-parallel patterns every checkpoint records (``universal_checkpoint_info``,
from :mod:`megatron.checkpoint_partition`), on the sequential model; otherwise it is refused before launch,
naming both sizes, the weights-only keys and the ``reshard.py`` command.
"""
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch

from megatron import checkpoint_neox
from megatron.checkpoint_io import CheckpointError, CheckpointReader
from megatron.neox_arguments.errors import ConfigError

LAYOUT_FILE = "layout.json"
RESOLVED_CONFIG = os.path.join("configs", "resolved_config.yml")

# Keys that decide the shapes (or the meaning) of the weights: a checkpoint never loads into another value.
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
              "mlp_inner_size", "activation", "no_weight_tying", "padded_vocab_size")


@dataclass(frozen=True)
class Layout:
    world_size: int
    data_parallel_size: int
    pipe_parallel_size: int  # 0: the sequential model, >= 1: a PipelineModule with that many stages
    model_parallel_size: int
    zero_stage: int

    def describe(self) -> str:
        pipe = "sequential model" if self.pipe_parallel_size == 0 else f"pipeline stages {self.pipe_parallel_size}"
        return (f"world size {self.world_size} (data parallel {self.data_parallel_size}, {pipe}, "
                f"model parallel {self.model_parallel_size}, ZeRO stage {self.zero_stage})")


def layout_of(args) -> Layout:
    """The layout a run's resolved arguments describe (the launcher's derivation or a rank's: ``world_size`` is
    only known on a rank, ``global_num_gpus`` on both)."""
    return Layout(world_size=int(args.global_num_gpus), data_parallel_size=int(args.data_parallel_size),
                  pipe_parallel_size=int(args.pipe_parallel_size), model_parallel_size=int(args.model_parallel_size),
                  zero_stage=int(args.zero_stage))


def write_layout(ckpt_dir: str, layout: Layout) -> None:
    with open(os.path.join(ckpt_dir, LAYOUT_FILE), "w") as f:
        json.dump(asdict(layout), f, indent=1, sort_keys=True)
        f.write("\n")


def read_saved_config(ckpt_dir: str) -> Optional[dict]:
    """The checkpoint's resolved configuration as plain data; ``None`` when it has none (a GPT-NeoX checkpoint)."""
    path = os.path.join(ckpt_dir, RESOLVED_CONFIG)
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint config {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config {path} is not a mapping (damaged?)")
    return data


def layout_from_deepspeed(ckpt_dir: str, client_state: dict) -> Optional[Layout]:
    """The layout DeepSpeed's own keys describe (a GPT-NeoX checkpoint); ``None`` where they do not say."""
    dims = client_state.get("checkpoint_parallel_dimensions") or {}
    record = client_state.get("args") or {}
    dp = client_state.get("dp_world_size")
    tp = record.get("model_parallel_size", dims.get("tp_degree"))
    zero = ((client_state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    pipeline = any(CheckpointReader.LAYER_FILE.match(n) for n in os.listdir(ckpt_dir))
    pp = dims.get("pp_degree") if pipeline else 0
    if dp is None or tp is None or pp is None:
        return None
    return Layout(world_size=int(dp) * max(int(pp), 1) * int(tp), data_parallel_size=int(dp),
                  pipe_parallel_size=int(pp), model_parallel_size=int(tp), zero_stage=int(zero))


def read_layout(ckpt_dir: str, saved_config: Optional[dict] = None) -> Optional[Layout]:
    """The layout ``ckpt_dir`` was saved in: ``layout.json``, else the resolved config, else DeepSpeed's keys
    (a GPT-NeoX checkpoint); ``None`` if unknown."""
    path = os.path.join(ckpt_dir, LAYOUT_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return Layout(**{k: int(v) for k, v in json.load(f).items()})
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint layout file {path} is damaged ({exc})") from None
    config = read_saved_config(ckpt_dir) if saved_config is None else saved_config
    if config is None:
        try:
            return layout_from_deepspeed(ckpt_dir, checkpoint_neox.read_client_state(ckpt_dir))
        except CheckpointError:
            return None  # no client-state file: check_files names it
    fields = ("world_size", "data_parallel_size", "pipe_parallel_size", "model_parallel_size", "zero_stage")
    if not config or any(config.get(k) is None for k in fields):
        return None
    return Layout(**{k: int(config[k]) for k in fields})


def optimizer_state_refusal(saved: Layout, new: Layout) -> Optional[str]:
    """Why DeepSpeed cannot restore ``saved``'s optimizer state in ``new`` (``None``: it can)."""
    if saved.zero_stage != new.zero_stage:
        return f"the ZeRO stage changes ({saved.zero_stage} -> {new.zero_stage}) and with it the optimizer state's format"
    if saved.pipe_parallel_size != new.pipe_parallel_size:
        if 0 in (saved.pipe_parallel_size, new.pipe_parallel_size):
            return "pipeline and sequential checkpoints keep their optimizer state in different formats"
        return "the optimizer state is split by pipeline stage"
    if saved.model_parallel_size != new.model_parallel_size:
        return "the optimizer state is split by model-parallel rank"
    if saved.zero_stage > 0 and saved.data_parallel_size != new.data_parallel_size:
        return (f"ZeRO stage {saved.zero_stage} partitions the optimizer state over the {saved.data_parallel_size} "
                "data-parallel ranks and DeepSpeed cannot re-partition it")
    return None


def vocab_paddings_agree(saved_config: dict, args) -> bool:
    """Could the two padded vocabularies come from one tokenizer, each padded to its run's multiple of
    ``make_vocab_size_divisible_by x model_parallel_size``, the tensor-parallel size being all that changed?"""
    keys = ("padded_vocab_size", "make_vocab_size_divisible_by", "model_parallel_size")
    if any(saved_config.get(k) is None for k in keys) or args.padded_vocab_size is None:
        return False
    if int(saved_config["make_vocab_size_divisible_by"]) != int(args.make_vocab_size_divisible_by) \
            or int(saved_config["model_parallel_size"]) == int(args.model_parallel_size):
        return False
    saved_rows, new_rows = int(saved_config["padded_vocab_size"]), int(args.padded_vocab_size)
    saved_multiple = int(saved_config["make_vocab_size_divisible_by"]) * int(saved_config["model_parallel_size"])
    new_multiple = int(args.make_vocab_size_divisible_by) * int(args.model_parallel_size)
    # the unpadded size v satisfies rows - multiple < v <= rows for both
    return max(saved_rows - saved_multiple, new_rows - new_multiple) < min(saved_rows, new_rows)


def model_key_mismatch(args, saved_config: Optional[dict], ckpt_dir: str) -> Optional[str]:
    if saved_config is None:  # a GPT-NeoX checkpoint: its own record of the model keys, checked by its rule
        try:
            record = checkpoint_neox.read_client_state(ckpt_dir).get("args")
        except CheckpointError:
            return None  # no client-state file: check_files names it
        if record and (args.no_load_optim or args.finetune or _loads_universal(args)) \
                and record.get("model_parallel_size") not in (None, args.model_parallel_size):
            # Weights alone are resharded on load, a universal checkpoint by DeepSpeed (resume_plan checks it
            # can); the padding may differ by what the size changes.
            agree = vocab_paddings_agree(record, args)
            record = {k: v for k, v in record.items()
                      if k != "model_parallel_size" and (k != "padded_vocab_size" or not agree)}
        return checkpoint_neox.args_mismatch(args, record, ckpt_dir) if record else None
    for key in MODEL_KEYS:
        # padded_vocab_size is known only where the tokenizer could be built
        if saved_config is None or saved_config.get(key) is None or getattr(args, key) is None:
            continue
        if saved_config[key] != getattr(args, key):
            if key == "padded_vocab_size" and vocab_paddings_agree(saved_config, args):
                continue  # padded again for another tensor-parallel size: the rows are trimmed or added
            return (f"key '{key}' is {getattr(args, key)!r}, but checkpoint {ckpt_dir} was saved with "
                    f"{key}={saved_config[key]!r} (its {RESOLVED_CONFIG}); the weights cannot load into another shape")
    return None


def universal_command(ckpt_dir: str) -> str:
    """The conversion into DeepSpeed's universal format, whose ZeRO state any data-parallel size can load."""
    ckpt_dir = os.path.normpath(ckpt_dir)
    target = os.path.join(os.path.dirname(ckpt_dir) + "_universal", os.path.basename(ckpt_dir))
    return (f"python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {ckpt_dir} "
            f"--output_folder {target}, then set 'load: {target}' and 'checkpoint: {{load_universal: true}}'")


def _loads_universal(args) -> bool:
    return bool((args.checkpoint or {}).get("load_universal"))


def reshard_command(ckpt_dir: str, args) -> str:
    """The reshard.py call that writes ``ckpt_dir`` for this run's tensor-parallel and pipeline sizes."""
    ckpt_dir = os.path.normpath(ckpt_dir)
    tp, pp = int(args.model_parallel_size), int(args.pipe_parallel_size)
    target = f"{os.path.dirname(ckpt_dir)}_tp{tp}_pp{pp}"
    return f"python tools/ckpts/reshard.py --input_dir {ckpt_dir} --output_dir {target} --tp {tp} --pp {pp}"


def no_optimizer_note(ckpt_dir: str) -> Optional[str]:
    """What the checkpoint says about its missing optimizer state (no_save_optim, an import, a reshard), or None."""
    from megatron.checkpointing import NO_OPTIMIZER_MARKER

    path = os.path.join(ckpt_dir, NO_OPTIMIZER_MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return " ".join(f.read().split()) or "it holds no optimizer state"


def universal_tp_problem(ckpt_dir: str, saved: Layout, new: Layout, args) -> Optional[str]:
    """Why DeepSpeed's universal checkpoint cannot carry ``ckpt_dir`` into this run's tensor-parallel size (None: it
    can). ds_to_universal merges the tensor-parallel fragments by the ``universal_checkpoint_info`` this trainer
    records (megatron/checkpoint_partition.py); without it it would concatenate every tensor on dim 0."""
    from deepspeed.checkpoint import constants as ds

    try:
        info = checkpoint_neox.read_client_state(ckpt_dir).get(ds.UNIVERSAL_CHECKPOINT_INFO) or {}
    except CheckpointError:
        info = {}
    if ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS not in info:
        return ("it records no tensor-parallel patterns (universal_checkpoint_info: a checkpoint of GPT-NeoX or of an "
                "older version of this trainer), without which DeepSpeed would cut the row-parallel weights wrongly")
    if saved.pipe_parallel_size != 0 or new.pipe_parallel_size != 0:
        return ("DeepSpeed's universal checkpoint moves between tensor-parallel sizes here on the sequential model "
                "only (pipe_parallel_size: 0 on both sides: ds_to_universal reads no pipeline folder without a "
                "layer_01 file, which this model's parameter-free layer 1 does not write)")
    rows = info.get(ds.ORIGINAL_VOCAB_SIZE)
    if rows is not None and args.padded_vocab_size is not None and int(args.padded_vocab_size) < int(rows):
        return (f"its vocabulary is padded to {rows} rows and this run pads to {args.padded_vocab_size}: DeepSpeed "
                "adds padding rows, never drops them")
    return None


def _gpt_neox_summed_biases(args, saved_config: Optional[dict], saved: Optional[Layout]) -> bool:
    """A GPT-NeoX checkpoint whose ranks' row-parallel biases are summed by its model (megatron/checkpoint_partition.py):
    its shards must be converted, not loaded as they are."""
    return (saved_config is None and saved is not None and saved.model_parallel_size > 1 and bool(args.gpt_j_residual)
            and bool(args.use_bias_in_attn_linear or args.use_bias_in_mlp))


def resume_plan(args, ckpt_dir: str) -> Tuple[bool, Optional[Layout]]:
    """Checks a resume from ``ckpt_dir`` by ``args``; raises :class:`ConfigError` when it cannot work.

    Returns ``(same_layout, saved_layout)``: with a different layout only the weights are loaded.
    """
    weights_only = bool(args.no_load_optim or args.finetune)
    note = no_optimizer_note(ckpt_dir)
    if note and not weights_only:
        raise ConfigError(f"key 'load': checkpoint {ckpt_dir} holds no optimizer state ({note}); set "
                          "'no_load_optim: true' (a fresh optimizer, same iteration) or 'finetune: true'")
    saved_config = read_saved_config(ckpt_dir)
    problem = model_key_mismatch(args, saved_config, ckpt_dir)
    if problem:
        raise ConfigError(problem)
    saved = read_layout(ckpt_dir, saved_config)
    new = layout_of(args)
    tp_change = saved is not None and saved.model_parallel_size != new.model_parallel_size
    if _loads_universal(args):
        problem = universal_tp_problem(ckpt_dir, saved, new, args) if tp_change else None
        if problem:
            raise ConfigError(
                f"key 'checkpoint.load_universal': checkpoint {ckpt_dir} was saved with model_parallel_size="
                f"{saved.model_parallel_size} and this run has model_parallel_size={new.model_parallel_size}, but "
                f"{problem}. Load the weights with 'no_load_optim: true' or 'finetune: true' (they are resharded on "
                f"load), or reshard first: {reshard_command(ckpt_dir, args)}")
        if not os.path.isdir(os.path.join(ckpt_dir, "zero")):
            raise ConfigError(f"key 'checkpoint.load_universal' is true, but {ckpt_dir} is not a universal checkpoint "
                              f"(no zero/ folder); convert it: {universal_command(ckpt_dir)}")
        return True, saved  # DeepSpeed re-partitions the ZeRO state itself
    if _gpt_neox_summed_biases(args, saved_config, saved):
        if not weights_only:
            raise ConfigError(
                f"key 'load': checkpoint {ckpt_dir} is GPT-NeoX's, at model_parallel_size={saved.model_parallel_size} "
                "with gpt_j_residual and row-parallel biases: GPT-NeoX adds every rank's copy of those biases before "
                "the all-reduce, this trainer adds one copy after it, so the shards are converted when loaded, which "
                "only the weights-only load does: set 'no_load_optim: true' or 'finetune: true'")
        return False, saved
    if tp_change and not weights_only:
        raise ConfigError(
            f"key 'model_parallel_size' is {new.model_parallel_size}, but checkpoint {ckpt_dir} was saved with "
            f"model_parallel_size={saved.model_parallel_size} ({saved.describe()}; this run: {new.describe()}), and "
            "DeepSpeed cannot split its optimizer state into another tensor-parallel size. Resume the weights with a "
            "fresh optimizer ('no_load_optim: true' keeps the iteration count, 'finetune: true' restarts at 0; the "
            f"weights are resharded on load), or reshard the checkpoint first: {reshard_command(ckpt_dir, args)} "
            "(and load that with one of the two), or run at the saved size")
    if saved is None or saved == new:
        return True, saved
    refusal = optimizer_state_refusal(saved, new)
    if saved.zero_stage == 0 and new.zero_stage == 0 and refusal is None:
        return True, saved  # DeepSpeed itself reloads everything; only the data-parallel size differs
    if not (args.no_load_optim or args.finetune):
        dp_only = refusal is not None and refusal.startswith(f"ZeRO stage {saved.zero_stage} partitions")
        raise ConfigError(
            f"key 'load': checkpoint {ckpt_dir} was saved with {saved.describe()}; this run has {new.describe()}, and "
            f"{refusal or 'the layouts differ'}. Resume the weights with a fresh optimizer (set 'no_load_optim: "
            "true' to keep the iteration count, or 'finetune: true' to restart at iteration 0), "
            + (f"or keep the optimizer state by converting the checkpoint: {universal_command(ckpt_dir)}, "
               if dp_only else "") + "or run in the saved layout")
    return False, saved


# ------------------------------------------------------------------------------------ file integrity
def _pt_file_problem(path: str) -> Optional[str]:
    """A cheap look at one saved tensor file (torch.save writes zip archives, their directory at the end)."""
    size = os.path.getsize(path)
    if size == 0:
        return f"checkpoint file {path} is empty (truncated)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"checkpoint file {path} is truncated or corrupt ({size} bytes, no zip directory at its end)"
    return None


def expected_files(ckpt_dir: str, saved: Optional[Layout], saved_config: Optional[dict]) -> list:
    """Files a complete checkpoint of that layout must hold (only the ones its config, or the GPT-NeoX record
    of one, determines)."""
    if saved is not None and saved_config is None:
        try:
            saved_config = checkpoint_neox.read_client_state(ckpt_dir).get("args")
        except CheckpointError:
            saved_config = None
    if saved is None or saved_config is None or saved_config.get("num_layers") is None:
        return []
    layers = int(saved_config["num_layers"])
    names = []
    tp = saved.model_parallel_size
    for mp in range(tp):
        if saved.pipe_parallel_size >= 1:
            idx = [0] + list(range(2, layers + 2)) + [layers + 3]
            if saved_config.get("no_weight_tying"):
                idx.append(layers + 4)
            names += [f"layer_{i:02d}-model_{mp:02d}-model_states.pt" for i in idx]
        if saved.zero_stage == 3:
            names += [f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt" for dp in range(saved.data_parallel_size)]
    if saved.zero_stage != 3:
        # DeepSpeed's model rank runs over the pipeline stages times the tensor-parallel ranks (its grid's
        # ds_model_rank): a TP=2 x PP=2 run writes mp_rank_00..03.
        names += [f"mp_rank_{mp:02d}_model_states.pt" for mp in range(tp * max(saved.pipe_parallel_size, 1))]
    return [os.path.join(ckpt_dir, n) for n in names]


def check_files(ckpt_dir: str, saved: Optional[Layout] = None, saved_config: Optional[dict] = None) -> None:
    """Raises :class:`CheckpointError` naming the first missing, empty or truncated file of ``ckpt_dir``."""
    for path in expected_files(ckpt_dir, saved, saved_config):
        if not os.path.isfile(path):
            raise CheckpointError(f"missing checkpoint file {path}: the checkpoint is incomplete or damaged")
    for root, _, files in os.walk(ckpt_dir):
        for name in sorted(files):
            if name.endswith(".pt"):
                problem = _pt_file_problem(os.path.join(root, name))
                if problem:
                    raise CheckpointError(problem)


def check_resume_before_launch(args) -> None:
    """``deepy.py``'s check of ``load`` for training: damaged files, model keys and layout, as one
    :class:`ConfigError` line. (Evaluation and generation load weights only, through their own readers.)"""
    from megatron.neox_arguments.validate import TRAINING_SCRIPTS

    if args.load is None or args.user_script is None or os.path.basename(args.user_script) not in TRAINING_SCRIPTS:
        return
    from megatron.checkpointing import resolve_checkpoint

    try:
        load_dir, tag = resolve_checkpoint(args.load)
        ckpt_dir = os.path.join(load_dir, tag)
        resume_plan(args, ckpt_dir)
        saved_config = read_saved_config(ckpt_dir)
        saved = read_layout(ckpt_dir, saved_config)
        check_files(ckpt_dir, saved, saved_config)
        same_tp = saved is None or saved.model_parallel_size == int(args.model_parallel_size)
        # GPT-NeoX's: nothing but its tensors says what model it holds. Shards of another tensor-parallel size are
        # checked on the ranks, after the merge (weights only) or by DeepSpeed (universal).
        if saved_config is None and same_tp:
            problem = checkpoint_neox.first_tensor_mismatch(args, ckpt_dir)
            if problem:
                raise CheckpointError(problem)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"key 'load': {exc}") from None


# -------------------------------------------------------------------------------- weights, any layout
def _local_layers(module):
    """``(pipeline layer index, layer module)`` of the layers this rank holds."""
    if hasattr(module, "forward_funcs"):  # a PipelineModule: this stage's slice of the layer list
        start = int(module._local_start)
        return [(start + i, f) for i, f in enumerate(module.forward_funcs) if isinstance(f, torch.nn.Module)]
    return list(enumerate(module.sequential))


def _check_layer(own: dict, idx: int, state: dict, source: str, saved_config: Optional[dict], args) -> None:
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{source}: layer {idx} lacks tensor(s) {', '.join(missing[:4])} that the model built "
                              f"from this config has (num_layers={args.num_layers}: a checkpoint of another shape?)")
    for key, tensor in own.items():
        got = state[key]
        if tuple(got.shape) != tuple(tensor.shape):
            hint = ", ".join(f"{k}: checkpoint {saved_config.get(k)!r}, this run {getattr(args, k)!r}"
                             for k in MODEL_KEYS if saved_config and saved_config.get(k) is not None
                             and getattr(args, k) is not None and saved_config[k] != getattr(args, k))
            raise CheckpointError(
                f"{source}: tensor '{key}' of layer {idx} has shape {list(got.shape)} in the checkpoint, but this "
                f"run's model expects {list(tensor.shape)} (config keys hidden_size / num_attention_heads / "
                f"intermediate_size / vocabulary{'; differing: ' + hint if hint else ''})")


def _copy_layer(layer, idx: int, state: dict, source: str, saved_config: Optional[dict], args, write: bool) -> None:
    own = checkpoint_neox.translate_layer_state(layer, layer.state_dict())  # views of the parameters
    if not own:
        return
    state = checkpoint_neox.translate_layer_state(layer, state)
    _check_layer(own, idx, state, source, saved_config, args)
    if write:
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(dtype=tensor.dtype))


def load_weights_any_layout(engine, ckpt_dir: str, args) -> dict:
    """Copies the checkpoint's weights into this rank's part of ``engine.module`` whatever layout either has;
    the optimizer stays fresh (its fp32 master copies are refreshed from the weights). Returns the client state."""
    from megatron import mpu
    from megatron.checkpoint_partition import merge_layer, split_layer, written_by_gpt_neox

    saved_config = read_saved_config(ckpt_dir)
    reader = CheckpointReader(ckpt_dir, int(args.num_layers))
    tp, tp_rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    gpt_neox = written_by_gpt_neox(ckpt_dir)
    source_rules = args
    if saved_config is not None and saved_config.get("gpt_j_residual") is not None \
            and bool(saved_config["gpt_j_residual"]) != bool(args.gpt_j_residual):
        import copy

        source_rules = copy.copy(args)  # the saved model's residual decides how its shards merge
        source_rules.gpt_j_residual = bool(saved_config["gpt_j_residual"])
    zero3 = int(args.zero_stage) == 3
    for idx, layer in _local_layers(engine.module):
        if not layer.state_dict():  # a parameter-free step of the layer list
            continue
        source = ckpt_dir if reader.sequential else os.path.join(ckpt_dir, f"layer_{idx:02d}-model_00-model_states.pt")
        shards = reader.layer(idx)
        if reader.tp == 1 and tp == 1:
            state = shards[0]  # one padding for one size (the model keys agree): the tensors as they are
        else:  # merged and cut again for this run's size and padded vocabulary (megatron/checkpoint_partition.py)
            full = merge_layer(shards, source_rules, source, gpt_neox)
            state = split_layer(full, args, tp, vocab_rows=args.padded_vocab_size, where=source)[tp_rank]
        if zero3:
            import deepspeed

            # Partitioned parameters are whole only inside this context; rank 0's copy is broadcast on exit.
            with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
                _copy_layer(layer, idx, state, source, saved_config, args, write=torch.distributed.get_rank() == 0)
        else:
            _copy_layer(layer, idx, state, source, saved_config, args, write=True)
    if hasattr(engine.module, "_synchronize_tied_weights"):
        engine.module._synchronize_tied_weights()
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if callable(refresh):
        refresh()
    return checkpoint_neox.read_client_state(ckpt_dir)
