"""Import a HuggingFace model directory as a trainer checkpoint (``tools/ckpts/convert_hf_to_neox.py``).

``--output_dir`` becomes a save directory that ``load`` can name, written as the trainer writes its own:

    <output_dir>/latest                       "global_step0", written last
    <output_dir>/model.yml                    the model's GPT-NeoX YAML keys (megatron.hf.import_config)
    <output_dir>/tokenizer.json               the HF directory's tokenizer (or tokenizer.model), named by model.yml
    <output_dir>/global_step0/                layer_XX-model_00-model_states.pt files + mp_rank_00_model_states.pt
                                              (layout "pipeline"), or the sequential mp_rank_00 file alone;
                                              configs/ (model.yml, resolved_config.yml), layout.json, and the
                                              no-optimizer marker: the weights load with ``finetune: true``
                                              (GPT-NeoX: weights only, fresh optimizer, iteration 0)

Tensors keep their HF dtype and values (no arithmetic: QKV rows and MLP halves are only rearranged), so the
exporter gives the HF tensors back bit for bit. Before anything is written every HF tensor is checked against the
shapes the YAML implies (the exporter's own tables, naming the key) and the converted layers against the
trainer's model built on the meta device from the same YAML (names and shapes, as a strict load needs them).

Mapping (the inverse of :mod:`megatron.hf.export` / :mod:`megatron.hf.export_llama`): GPT-NeoX names are the
trainer's (``gpt_neox.layers.i.X`` -> layer ``i + 2`` ``X``; QKV rows per head ``[q_h; k_h; v_h]`` in both);
Llama's ``q/k/v_proj`` become ``attention.query_key_value`` in the trainer's layout (per head for multi-head
attention, ``[q | k | v]`` with fewer key/value heads), ``[up_proj; gate_proj]`` ``mlp.linear1``, ``down_proj``
``mlp.linear2``, norm ``weight`` the RMSNorm ``scale``.
"""
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import yaml

from megatron.atomic_files import install_directory
from megatron.hf.export_config import ConversionError
from megatron.hf.import_config import (PRECISION_OF_DTYPE, architecture_of, choose_tokenizer, load_hf_config,
                                       model_keys, vocab_multiple)

LAYOUTS = ("pipeline", "sequential")
IMPORT_MARKER = ".hf_import.json"
MODEL_YAML = "model.yml"
TAG_ITERATION = 0
# Buffers older HF checkpoints carry that are not weights (causal-mask tables, rotary frequencies).
HF_BUFFERS = re.compile(r".*(\.attention\.bias|\.attention\.masked_bias|rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------------------------------- reading
def _load_file(path: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise assorted types for truncated files
        raise ConversionError(f"weights file {path} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_hf_weights(hf_dir: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors, file of each tensor)`` from ``model.safetensors``, ``pytorch_model.bin`` or their sharded
    ``*.index.json`` form."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        files = []
        if os.path.isfile(os.path.join(hf_dir, single)):
            files = [os.path.join(hf_dir, single)]
        elif os.path.isfile(os.path.join(hf_dir, index)):
            try:
                with open(os.path.join(hf_dir, index), encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as err:
                raise ConversionError(f"{os.path.join(hf_dir, index)} has no readable weight_map ({err})") from None
            files = [os.path.join(hf_dir, s) for s in shards]
        if files:
            tensors, where = {}, {}
            for path in files:
                for name, tensor in _load_file(path).items():
                    tensors[name], where[name] = tensor, path
            return tensors, where
    raise ConversionError(f"--hf_dir {hf_dir} holds no model.safetensors, pytorch_model.bin or sharded index")


# ---------------------------------------------------------------------------------------- checking
def _expected(arch: str, args, vocab_rows: int) -> Dict[str, tuple]:
    """HF name -> (shape, config keys) the YAML implies: the exporter's tables, one source of the layout."""
    if arch == "gpt_neox":
        from megatron.hf.export import expected_shapes

        table = expected_shapes(args, vocab_rows)
        table.pop("gpt_neox.position_embeddings.weight")
        optional = ()
        if not args.use_bias_in_attn_linear:
            optional = ("attention.query_key_value.bias", "attention.dense.bias")
        head = "embed_out.weight"
    else:
        from megatron.hf.export_llama import expected_llama_shapes

        table = expected_llama_shapes(args, vocab_rows)
        optional = tuple(f"{m}.bias" for m, on in (("self_attn.q_proj", args.use_bias_in_attn_linear),
                                                   ("self_attn.k_proj", args.use_bias_in_attn_linear),
                                                   ("self_attn.v_proj", args.use_bias_in_attn_linear),
                                                   ("self_attn.o_proj", args.use_bias_in_attn_linear),
                                                   ("mlp.up_proj", args.use_bias_in_mlp),
                                                   ("mlp.gate_proj", args.use_bias_in_mlp),
                                                   ("mlp.down_proj", args.use_bias_in_mlp)) if not on)
        head = "lm_head.weight"
    if not args.no_weight_tying:
        table.pop(head)
    return {k: v for k, v in table.items() if not k.endswith(optional)}


def check_hf_tensors(sd: Dict[str, torch.Tensor], where: Dict[str, str], arch: str, args, hf_dir: str) -> None:
    """Every tensor the model needs is there with the shape the YAML implies; nothing unexplained is left over."""
    expected = _expected(arch, args, args.padded_vocab_size)
    tied_head = "embed_out.weight" if arch == "gpt_neox" else "lm_head.weight"  # saved by some tied models
    for name in sorted(sd):
        if name in expected or HF_BUFFERS.match(name) or (name == tied_head and not args.no_weight_tying):
            continue
        raise ConversionError(f"{where[name]}: tensor {name} is not part of the model config.json describes "
                              f"(num_layers={args.num_layers}, use_bias_in_attn_linear={args.use_bias_in_attn_linear}"
                              + (f", use_bias_in_mlp={args.use_bias_in_mlp}" if arch != "gpt_neox" else "") + ")")
    for name, (shape, keys) in expected.items():
        if name not in sd:
            raise ConversionError(f"{hf_dir}: tensor {name} is missing; config.json describes a model that has it "
                                  f"(num_layers={args.num_layers})")
        got = tuple(sd[name].shape)
        if got != tuple(shape):
            bad = [k for dim, k in enumerate(keys) if dim >= len(got) or got[dim] != shape[dim]] or list(keys)
            raise ConversionError(f"{where[name]}: tensor {name} has shape {got} but the YAML written from "
                                  f"config.json implies {tuple(shape)} ({', '.join(bad)})")


def trainer_layer_shapes(args) -> Dict[int, Dict[str, tuple]]:
    """Pipeline layer index -> {tensor name: shape} of the trainer's model for ``args``, built on the meta device
    (no memory): the names and shapes a strict load of the checkpoint needs."""
    from megatron.model.layer_list import build_sequential_model

    with torch.device("meta"):
        model = build_sequential_model(args)
    layers: Dict[int, Dict[str, tuple]] = {}
    for key, tensor in model.state_dict().items():
        _, idx, name = key.split(".", 2)
        layers.setdefault(int(idx), {})[name] = tuple(tensor.shape)
    return layers


def check_against_trainer(layers: Dict[int, Dict[str, torch.Tensor]], args) -> None:
    want = trainer_layer_shapes(args)
    for idx in sorted(set(want) | set(layers)):
        have, need = layers.get(idx, {}), want.get(idx, {})
        for name in sorted(set(have) | set(need)):
            if name not in need or name not in have:
                raise ConversionError(f"layer {idx}: tensor {name} is {'extra' if name in have else 'missing'} for "
                                      f"the trainer's model of this YAML (activation={args.activation}, "
                                      f"norm={args.norm}, no_weight_tying={args.no_weight_tying})")
            if tuple(have[name].shape) != need[name]:
                raise ConversionError(f"layer {idx}: tensor {name} has shape {tuple(have[name].shape)} but the "
                                      f"trainer's model of this YAML has {need[name]}")


# ---------------------------------------------------------------------------------------- mapping
def _gpt_neox_layers(sd, args) -> Dict[int, Dict[str, torch.Tensor]]:
    L = args.num_layers
    layers = {0: {"word_embeddings.weight": sd["gpt_neox.embed_in.weight"]}}
    for i in range(L):
        prefix = f"gpt_neox.layers.{i}."
        layers[i + 2] = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not HF_BUFFERS.match(k)}
    layers[L + 3] = {"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                     "norm.bias": sd["gpt_neox.final_layer_norm.bias"]}
    if args.no_weight_tying:
        layers[L + 4] = {"final_linear.weight": sd["embed_out.weight"]}
    return layers


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args) -> torch.Tensor:
    """The trainer's QKV rows: per head ``[q_h; k_h; v_h]`` for multi-head attention, else ``[q | k | v]``."""
    if args.num_kv_heads != args.num_attention_heads:
        return torch.cat([q, k, v], dim=0)
    heads, d = args.num_attention_heads, args.hidden_size // args.num_attention_heads
    per_head = torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], dim=1)
    return per_head.reshape(3 * heads * d, *q.shape[1:])


def _llama_layers(sd, args) -> Dict[int, Dict[str, torch.Tensor]]:
    L = args.num_layers
    layers = {0: {"word_embeddings.weight": sd["model.embed_tokens.weight"]}}
    for i in range(L):
        p = f"model.layers.{i}."
        block = {"input_layernorm.scale": sd[p + "input_layernorm.weight"],
                 "post_attention_layernorm.scale": sd[p + "post_attention_layernorm.weight"]}
        parts = ("weight", "bias") if args.use_bias_in_attn_linear else ("weight",)
        for part in parts:
            block[f"attention.query_key_value.{part}"] = _qkv(*(sd[f"{p}self_attn.{n}_proj.{part}"] for n in "qkv"),
                                                              args)
            block[f"attention.dense.{part}"] = sd[f"{p}self_attn.o_proj.{part}"]
        for part in ("weight", "bias") if args.use_bias_in_mlp else ("weight",):
            block[f"mlp.linear1.{part}"] = torch.cat([sd[f"{p}mlp.up_proj.{part}"], sd[f"{p}mlp.gate_proj.{part}"]], 0)
            block[f"mlp.linear2.{part}"] = sd[f"{p}mlp.down_proj.{part}"]
        layers[i + 2] = block
    layers[L + 3] = {"norm.scale": sd["model.norm.weight"]}
    if args.no_weight_tying:
        layers[L + 4] = {"final_linear.weight": sd["lm_head.weight"]}
    return layers


def trainer_layers(sd: Dict[str, torch.Tensor], arch: str, args) -> Dict[int, Dict[str, torch.Tensor]]:
    """Pipeline layer index -> the trainer's state dict of that layer (contiguous tensors, HF dtype)."""
    layers = _gpt_neox_layers(sd, args) if arch == "gpt_neox" else _llama_layers(sd, args)
    return {idx: {k: v.contiguous() for k, v in state.items()} for idx, state in layers.items()}


# ---------------------------------------------------------------------------------------- output dir
def _written_names(tokenizer_name: str) -> set:
    return {"latest", f"global_step{TAG_ITERATION}", MODEL_YAML, tokenizer_name, IMPORT_MARKER}


def check_output_dir(out: Path, hf_dir: str, tokenizer_name: str) -> None:
    """``out`` must be new, empty, or a previous import holding nothing else (it is then replaced)."""
    hf = Path(hf_dir).resolve()
    if out.resolve() == hf or hf in out.resolve().parents or out.resolve() in hf.parents:
        raise ConversionError(f"--output_dir {out} and --hf_dir {hf_dir} overlap; give a directory of its own")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ConversionError(f"--output_dir {out} exists and is not a directory; refusing to replace it")
    entries = set(os.listdir(out))
    if not entries:
        return
    if IMPORT_MARKER not in entries:
        raise ConversionError(f"--output_dir {out} is a non-empty directory that is not a previous import (no "
                              f"{IMPORT_MARKER}); refusing to replace it: give a new directory")
    others = sorted(entries - _written_names(tokenizer_name))
    if others:
        raise ConversionError(f"--output_dir {out} is a previous import but also holds {', '.join(others[:3])} "
                              f"(training output?); refusing to replace it: give a new directory")


# ---------------------------------------------------------------------------------------- writing
def _resolved_args(yaml_path: str, tokenizer_path: str, precision: str):
    """The YAML as the trainer resolves it on one rank, with the HF tokenizer (the copy is not in place yet) and
    the weights' precision (a model file carries no training precision of its own)."""
    from megatron.hf.export_config import _environment, _quiet
    from megatron.neox_arguments import ConfigError, NeoXArgs

    try:
        return _quiet(lambda: NeoXArgs.from_ymls([yaml_path], overrides={
            "vocab_file": tokenizer_path, "precision": precision, "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1}, env=_environment(1)))
    except ConfigError as err:
        raise ConversionError(f"the YAML written from config.json does not resolve: {err}") from None


def _header(hf_dir: str, arch: str) -> str:
    return (f"# Written by tools/ckpts/convert_hf_to_neox.py from {os.path.abspath(hf_dir)} ({arch}).\n"
            "# The model's shape, norm, rotary and bias keys and its tokenizer: compose with a training config\n"
            "# (e.g. configs/post_training/pythia-160m-sepllm-n64.yml) that sets load: <this directory> and\n"
            "# finetune: true. No SepLLM key here: alone it trains full attention, as the HF model computes.\n")


def _write_checkpoint(ckpt: Path, layers, layout: str, args, yaml_text: str) -> None:
    from megatron.checkpoint_layout import Layout, write_layout
    from megatron.checkpointing import NO_OPTIMIZER_MARKER

    ckpt.mkdir()
    # The trainer's client state (iteration 0, no samples consumed) and the engine keys DeepSpeed's load reads:
    # module and dp_world_size always, the step counters and world sizes when it loads more than the module.
    state = {"iteration": TAG_ITERATION, "consumed_train_samples": 0, "world_size": 1, "optimizer": None,
             "lr_scheduler": None, "global_steps": 0, "global_samples": 0, "skipped_steps": 0,
             "dp_world_size": 1, "mp_world_size": 1}
    if layout == "pipeline":
        for idx, tensors in sorted(layers.items()):
            torch.save(tensors, ckpt / f"layer_{idx:02d}-model_00-model_states.pt")
        state["module"] = None
    else:
        state["module"] = {f"sequential.{idx}.{name}": t for idx, tensors in sorted(layers.items())
                           for name, t in tensors.items()}
    torch.save(state, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "configs").mkdir()
    (ckpt / "configs" / MODEL_YAML).write_text(yaml_text)
    args.save_resolved(str(ckpt / "configs" / "resolved_config.yml"))
    write_layout(str(ckpt), Layout(world_size=1, data_parallel_size=1, pipe_parallel_size=int(args.pipe_parallel_size),
                                   model_parallel_size=1, zero_stage=0))
    (ckpt / NO_OPTIMIZER_MARKER).write_text("imported from HuggingFace weights: no optimizer state; load it with "
                                            "finetune: true (or no_load_optim: true)\n")


def import_hf(hf_dir: str, output_dir: str, layout: str = "pipeline", vocab_file: Optional[str] = None,
              seq_length: Optional[int] = None, log: Callable[[str], None] = print) -> str:
    """Converts ``hf_dir`` into the save directory ``output_dir`` (module docstring); returns its path.
    Raises :class:`ConversionError` (one line) on bad input, before anything is written."""
    from megatron.checkpointing import LATEST_FILE, atomic_write_text, checkpoint_tag, fsync_tree

    if layout not in LAYOUTS:
        raise ConversionError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf_dir {hf_dir} is not a directory")
    arch = architecture_of(hf_dir)
    config = load_hf_config(hf_dir, arch)
    keys = model_keys(hf_dir, arch, config, seq_length)
    tokenizer = choose_tokenizer(hf_dir, vocab_file)
    tokenizer_name = "tokenizer.json" if tokenizer.tokenizer_type == "HFTokenizer" else "tokenizer.model"
    out = Path(output_dir).absolute()
    check_output_dir(out, hf_dir, tokenizer_name)
    keys.update(tokenizer_type=tokenizer.tokenizer_type, vocab_file=str(out / tokenizer_name),
                make_vocab_size_divisible_by=vocab_multiple(tokenizer.vocab_size, int(config.vocab_size),
                                                            tokenizer.path),
                pipe_parallel_size=1 if layout == "pipeline" else 0, model_parallel_size=1)
    sd, where = read_hf_weights(hf_dir)
    first = next(iter(sd.values()), None)
    dtypes = {str(t.dtype).replace("torch.", "") for n, t in sd.items() if not HF_BUFFERS.match(n)}
    if first is None or len(dtypes) != 1 or next(iter(dtypes)) not in PRECISION_OF_DTYPE:
        raise ConversionError(f"{hf_dir}: weights must share one dtype of {sorted(PRECISION_OF_DTYPE)}, found "
                              f"{sorted(dtypes)}")
    precision = PRECISION_OF_DTYPE[next(iter(dtypes))]
    yaml_text = _header(hf_dir, arch) + yaml.safe_dump(dict(keys), sort_keys=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        (tmp / MODEL_YAML).write_text(yaml_text)
        args = _resolved_args(str(tmp / MODEL_YAML), tokenizer.path, precision)
        if args.padded_vocab_size != int(config.vocab_size):
            raise ConversionError(f"the trainer pads tokenizer {tokenizer.path} to {args.padded_vocab_size} rows, "
                                  f"config.json has vocab_size={config.vocab_size}")
        check_hf_tensors(sd, where, arch, args, hf_dir)
        layers = trainer_layers(sd, arch, args)
        check_against_trainer(layers, args)
        args.vocab_file = str(out / tokenizer_name)  # where the copy will be once installed
        shutil.copyfile(tokenizer.path, tmp / tokenizer_name)
        _write_checkpoint(tmp / checkpoint_tag(TAG_ITERATION), layers, layout, args, yaml_text)
        with open(tmp / IMPORT_MARKER, "w") as handle:
            json.dump({"written_by": "megatron.hf.import_hf", "hf_dir": os.path.abspath(hf_dir),
                       "architecture": arch, "layout": layout, "dtype": next(iter(dtypes)),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, handle, indent=2)
        fsync_tree(str(tmp))
        atomic_write_text(str(tmp / LATEST_FILE), checkpoint_tag(TAG_ITERATION))  # last, as the trainer does
        check_output_dir(out, hf_dir, tokenizer_name)  # again: something may have appeared there meanwhile
        install_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"imported {arch} from {hf_dir}: {args.num_layers} layers, hidden {args.hidden_size}, vocab "
        f"{args.padded_vocab_size} ({tokenizer.tokenizer_type} {tokenizer.vocab_size} tokens, "
        f"make_vocab_size_divisible_by {keys['make_vocab_size_divisible_by']}), {precision}, {layout} layout")
    return str(out)
