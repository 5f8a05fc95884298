"""Export a trainer checkpoint (``<save>/global_stepN``) to a HuggingFace model directory.

The command line is ``tools/ckpts/convert_neox_to_hf.py``; this module is the conversion.

* The model is described by the checkpoint's resolved config (:mod:`megatron.hf.export_config`).
* Weights are read by :class:`megatron.checkpoint_io.CheckpointReader` (pipeline layer files, the sequential
  ``mp_rank_XX`` files, ZeRO-3 shards). Tensor-parallel shards are merged by the one table of
  :mod:`megatron.checkpoint_partition`: column-parallel weights/biases on dim 0 (the fused QKV by heads),
  row-parallel weights on dim 1, row-parallel biases summed with the parallel (GPT-J) residual (every rank adds
  its bias before the all-reduce) and taken once otherwise, norms replicated, embeddings on dim 0.
* Every tensor's shape is checked against the config on every dimension (hidden, ffn, vocabulary, positions,
  number of blocks); a mismatch names the file, the tensor, both shapes and the config key.
* ``neox`` writes a stock ``GPTNeoXForCausalLM`` (full attention only); ``llama`` a stock ``LlamaForCausalLM`` or
  ``MistralForCausalLM`` (full attention only, :mod:`megatron.hf.export_llama`); ``sepllm_gpt_neox`` writes every
  SepLLM/SA/BiPE key plus self-contained modeling code (config, model, SepCache and a verbatim copy of the
  trainer's ``rule.py``) for ``trust_remote_code=True``.
* Nothing that is not a previous export is replaced (:func:`check_output_dir`). The export is assembled in a
  temporary directory beside ``--output_dir`` and renamed at the end; files and directories get the umask's
  permissions like any other output.
"""
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from megatron.checkpoint_io import CheckpointReader
from megatron.atomic_files import install_directory
from megatron.hf.export_config import (ARCHITECTURES, DTYPE_NAMES, ConversionError, export_args, export_dtype,
                                       make_neox_config, sepllm_config_dict, supported_by_gpt_neox)

HF_SOURCE_DIR = Path(__file__).resolve().parent
RULE_SOURCE = HF_SOURCE_DIR.parent / "model" / "sepllm" / "rule.py"
EXPORT_CODE_FILES = ("configuration_sepllm_gpt_neox.py", "modeling_sepllm_gpt_neox.py", "sep_cache.py",
                     "attention_math.py")
EXPORT_MARKER = ".sepllm_export.json"
LAYER_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
               "post_attention_layernorm.bias")


# ---------------------------------------------------------------------------------------- state dict
def _take(states: List[Dict], key: str, where: str) -> List[torch.Tensor]:
    for sd in states:
        if key not in sd:
            raise ConversionError(f"{where}: tensor '{key}' is missing (keys: {sorted(sd)[:12]}...)")
    return [sd[key] for sd in states]


def merge_block(reader: CheckpointReader, idx: int, args) -> Dict[str, torch.Tensor]:
    """Pipeline layer ``idx`` merged across TP ranks (:mod:`megatron.checkpoint_partition`); a block's names are
    HF GPT-NeoX's within a layer."""
    from megatron.checkpoint_partition import merge_layer, written_by_gpt_neox

    return merge_layer(reader.layer(idx), args, reader.source(idx), written_by_gpt_neox(reader.input_dir))


def zero_biases(sd: Dict[str, torch.Tensor], args) -> None:
    """A layer trained without a bias is the HF layer with a zero bias; HF GPT-NeoX norms and MLPs always
    have one (attention biases are switched off in the HF config instead)."""
    missing = []
    if not args.use_bias_in_norms:
        missing += [n for n in sd if n.endswith("layernorm.weight") or n == "gpt_neox.final_layer_norm.weight"]
    if not args.use_bias_in_mlp:
        missing += [n for n in sd if n.endswith("mlp.dense_h_to_4h.weight") or n.endswith("mlp.dense_4h_to_h.weight")]
    for weight in missing:
        bias = weight[: -len("weight")] + "bias"
        if bias not in sd:
            sd[bias] = torch.zeros(sd[weight].shape[0], dtype=sd[weight].dtype)


def check_block_count(reader: CheckpointReader, args) -> None:
    """Blocks sit at pipeline indices 2..L+1 with a parameterless gap at L+2; their count must be num_layers."""
    indices = set(reader.layer_indices())
    blocks = 0
    while blocks + 2 in indices:
        blocks += 1
    too_many = args.num_layers + 2 in indices
    too_few = max(indices, default=0) < args.num_layers + 3
    # A gap inside 2..L+1 with the final norm in place is a missing layer file, which the reader names.
    if too_many or too_few:
        raise ConversionError(f"{reader.input_dir} holds {blocks} transformer blocks (pipeline layers 2..{blocks + 1}) "
                              f"but the config has num_layers={args.num_layers}")


def build_state_dict(reader: CheckpointReader, args) -> Dict[str, torch.Tensor]:
    """HF GPT-NeoX state dict from the checkpoint, shape-checked against ``args`` (a resolved NeoXArgs)."""
    check_block_count(reader, args)
    num_layers = args.num_layers
    sd: Dict[str, torch.Tensor] = {}
    where: Dict[str, str] = {}
    emb = merge_block(reader, 0, args)
    sd["gpt_neox.embed_in.weight"] = _take([emb], "word_embeddings.weight", reader.source(0))[0]
    where["gpt_neox.embed_in.weight"] = reader.source(0)
    if args.USE_BiPE or args.pos_emb == "learned":
        sd["gpt_neox.position_embeddings.weight"] = _take([emb], "position_embeddings.weight", reader.source(0))[0]
        where["gpt_neox.position_embeddings.weight"] = reader.source(0)
    for i in range(num_layers):
        for key, value in merge_block(reader, i + 2, args).items():
            sd[f"gpt_neox.layers.{i}.{key}"] = value
            where[f"gpt_neox.layers.{i}.{key}"] = reader.source(i + 2)
    norm = merge_block(reader, num_layers + 3, args)
    for part in ("weight", "bias") if args.use_bias_in_norms else ("weight",):
        sd[f"gpt_neox.final_layer_norm.{part}"] = _take([norm], f"norm.{part}", reader.source(num_layers + 3))[0]
        where[f"gpt_neox.final_layer_norm.{part}"] = reader.source(num_layers + 3)
    head = reader.layer(num_layers + 4, required=args.no_weight_tying)
    if head is not None and "final_linear.weight" in head[0]:
        sd["embed_out.weight"] = _take([merge_block(reader, num_layers + 4, args)], "final_linear.weight",
                                       reader.source(num_layers + 4))[0]
        where["embed_out.weight"] = reader.source(num_layers + 4)
    else:
        sd["embed_out.weight"] = sd["gpt_neox.embed_in.weight"].clone()
        where["embed_out.weight"] = where["gpt_neox.embed_in.weight"]
    zero_biases(sd, args)
    check_shapes(sd, where, args)
    return sd


def expected_shapes(args, vocab_rows: int) -> Dict[str, tuple]:
    """HF tensor name -> (shape, config keys of each dimension)."""
    h, ffn = args.hidden_size, args.mlp_inner_size
    H = f"hidden_size={h}"
    F = (f"intermediate_size={ffn}" if ffn == args.intermediate_size
         else f"mlp_inner_size={ffn} from intermediate_size={args.intermediate_size}")
    V = f"padded_vocab_size={vocab_rows}"
    out = {"gpt_neox.embed_in.weight": ((vocab_rows, h), (V, H)),
           "embed_out.weight": ((vocab_rows, h), (V, H)),
           "gpt_neox.final_layer_norm.weight": ((h,), (H,)),
           "gpt_neox.final_layer_norm.bias": ((h,), (H,)),
           "gpt_neox.position_embeddings.weight": ((args.max_position_embeddings, h),
                                                   (f"max_position_embeddings={args.max_position_embeddings}", H))}
    for i in range(args.num_layers):
        p = f"gpt_neox.layers.{i}."
        out.update({p + "attention.query_key_value.weight": ((3 * h, h), (f"3 x {H}", H)),
                    p + "attention.query_key_value.bias": ((3 * h,), (f"3 x {H}",)),
                    p + "attention.dense.weight": ((h, h), (H, H)),
                    p + "attention.dense.bias": ((h,), (H,)),
                    p + "mlp.dense_h_to_4h.weight": ((ffn, h), (F, H)),
                    p + "mlp.dense_h_to_4h.bias": ((ffn,), (F,)),
                    p + "mlp.dense_4h_to_h.weight": ((h, ffn), (H, F)),
                    p + "mlp.dense_4h_to_h.bias": ((h,), (H,))})
        for norm in LAYER_NORMS:
            out[p + norm] = ((h,), (H,))
    return out


def reader_dir(where: Dict[str, str]) -> str:
    return os.path.dirname(where["gpt_neox.embed_in.weight"])


def check_shapes(sd: Dict[str, torch.Tensor], where: Dict[str, str], args) -> None:
    """Every tensor must match the config on every dimension; the error names file, tensor, shapes and key."""
    rows = sd["gpt_neox.embed_in.weight"].shape[0]
    vocab_rows = args.padded_vocab_size if args.padded_vocab_size is not None else rows
    optional = {"gpt_neox.position_embeddings.weight"}  # required (and taken) where the config uses it
    if not args.use_bias_in_attn_linear:
        optional |= {f"gpt_neox.layers.{i}.attention.{m}.bias" for i in range(args.num_layers)
                     for m in ("query_key_value", "dense")}
    for name, (shape, keys) in expected_shapes(args, vocab_rows).items():
        if name not in sd:
            if name in optional:
                continue
            layer = name.split(".")[2] if name.startswith("gpt_neox.layers.") else None
            source = where.get(f"gpt_neox.layers.{layer}.attention.dense.weight") if layer else None
            raise ConversionError(f"{source or reader_dir(where)}: tensor {name} is missing (the config has "
                                  f"use_bias_in_norms={args.use_bias_in_norms}, use_bias_in_mlp={args.use_bias_in_mlp}, "
                                  f"use_bias_in_attn_linear={args.use_bias_in_attn_linear})")
        got = tuple(sd[name].shape)
        if got != shape:
            bad = [k for dim, k in enumerate(keys) if dim >= len(got) or got[dim] != shape[dim]] or list(keys)
            raise ConversionError(f"{where[name]}: tensor {name} has shape {got} but the config implies {shape} "
                                  f"({', '.join(bad)})")


# ---------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(args):
    """The run's tokenizer as an HF fast tokenizer (HFTokenizer ``tokenizer.json`` only), else ``None``."""
    if args.tokenizer_type != "HFTokenizer" or not args.vocab_file or not str(args.vocab_file).endswith(".json"):
        return None  # GPT-2 BPE / SentencePiece / char-level vocabularies are not exported as fast tokenizers
    if not os.path.isfile(args.vocab_file):
        raise ConversionError(f"vocab_file {args.vocab_file} (from the config) does not exist")
    from transformers import GPTNeoXTokenizerFast

    return GPTNeoXTokenizerFast(tokenizer_file=str(args.vocab_file))


# ---------------------------------------------------------------------------------------- output dir
def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(out: Path, input_dir: str, overwrite: bool = False) -> None:
    """Refuses any existing ``out`` but a previous export (its marker file) or an empty directory; ``overwrite``
    also allows other directories, never one holding checkpoints, the input or the working directory."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ConversionError(f"--output_dir {out} exists and is not a directory; refusing to replace it "
                              f"(give a new directory)")
    entries = os.listdir(out)
    checkpoints = sorted(e for e in entries if e == "latest" or e.startswith("global_step"))
    if checkpoints:
        raise ConversionError(f"--output_dir {out} holds training checkpoints ({', '.join(checkpoints[:3])}); "
                              f"refusing to replace it, even with --overwrite")
    for other, what in ((Path(input_dir).resolve(), "the checkpoint being exported"),
                        (Path.cwd().resolve(), "the working directory")):
        if _inside(other, out):
            raise ConversionError(f"--output_dir {out} contains {what} ({other}); refusing to replace it, "
                                  f"even with --overwrite")
    if not entries or EXPORT_MARKER in entries or overwrite:
        return
    raise ConversionError(f"--output_dir {out} is a non-empty directory that is not a previous export (no "
                          f"{EXPORT_MARKER}); refusing to replace it: give a new directory, or --overwrite")


def _private_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, process-wide)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(tmp: Path) -> None:
    """safetensors writes its file 0600; an export is shared like any other output, so the umask decides."""
    mode = 0o666 & ~_umask()
    for path in tmp.iterdir():
        if path.is_file():
            os.chmod(path, mode)


# ---------------------------------------------------------------------------------------- export
def export(input_dir: str, config_files: Optional[List[str]], output_dir: str, precision: str = "auto",
           architecture: str = "sepllm_gpt_neox", save_tokenizer: bool = True,
           rule_source: Optional[Path] = None, overwrite: bool = False,
           log: Callable[[str], None] = print) -> str:
    """Converts and writes the export; returns ``output_dir``. Raises :class:`ConversionError` on bad input."""
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"unknown --architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if not os.path.isdir(input_dir):
        raise ConversionError(f"--input_dir {input_dir} is not a directory (give <save>/global_stepN)")
    latest = os.path.join(input_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as handle:
            tag = handle.read().strip()
        raise ConversionError(f"--input_dir {input_dir} is a save directory; give one of its checkpoints, e.g. "
                              f"{os.path.join(input_dir, tag or 'global_stepN')} ('latest' names {tag!r})")
    out = Path(output_dir).absolute()
    check_output_dir(out, input_dir, overwrite)
    args, user, source = export_args(input_dir, config_files, log)
    dtype = export_dtype(args, precision)
    # A --config_file may point at the tokenizer where it is now; model keys are already known to agree.
    tokenizer = load_tokenizer(user or args) if save_tokenizer else None
    if save_tokenizer and (user or args).tokenizer_type == "HFTokenizer" and (user or args).vocab_file is None:
        raise ConversionError(f"the run's tokenizer (vocab_file) is not available here: give --config_file with "
                              f"vocab_file, or --no_save_tokenizer")
    if architecture != "llama":
        supported_by_gpt_neox(args)  # before the weights are read: a Llama-family model is refused by name
    reader = CheckpointReader(input_dir, args.num_layers)
    dtype_name = DTYPE_NAMES[dtype]
    if architecture == "llama":
        from megatron.hf.export_llama import build_llama_state_dict, make_llama_config

        sd = build_llama_state_dict(reader, args)
        vocab_size = sd["model.embed_tokens.weight"].shape[0]
    else:
        sd = build_state_dict(reader, args)
        vocab_size = sd["gpt_neox.embed_in.weight"].shape[0]
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    stock = architecture in ("neox", "llama")
    if stock:
        config = make_llama_config(args, vocab_size) if architecture == "llama" else make_neox_config(args, vocab_size)
        config.dtype = dtype_name  # transformers 5 name (torch_dtype is deprecated)
    else:
        config = sepllm_config_dict(args, vocab_size)
        config["torch_dtype"] = config["dtype"] = dtype_name
    rule = Path(rule_source) if rule_source else RULE_SOURCE
    if not stock and not rule.is_file():
        raise ConversionError(f"the SepLLM rule {rule} is missing; the export needs a verbatim copy")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_name(out, "tmp")
    os.mkdir(tmp)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's private 0700
    try:
        if stock:
            config.save_pretrained(tmp)
        else:
            with open(tmp / "config.json", "w") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
            for name in EXPORT_CODE_FILES:
                shutil.copyfile(HF_SOURCE_DIR / name, tmp / name)
            shutil.copyfile(rule, tmp / "rule.py")
        if architecture == "llama":
            from megatron.hf.export_llama import training_free_settings

            settings = training_free_settings(args)
            if settings is not None:  # SepLLM / StreamingLLM / FixLLM: the stock model plus its attention rule
                from megatron.hf.training_free import write_saved_config

                write_saved_config(settings, str(tmp))
        from safetensors.torch import save_file

        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        with open(tmp / EXPORT_MARKER, "w") as handle:
            json.dump({"written_by": "megatron.hf.export", "input_dir": os.path.abspath(input_dir),
                       "config": source, "architecture": architecture, "dtype": dtype_name,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, handle, indent=2)
        _public(tmp)
        check_output_dir(out, input_dir, overwrite)  # again: something may have appeared there meanwhile
        install_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seps = config.get("separator_token_ids") if isinstance(config, dict) else None
    log(f"config from {source}: dtype {dtype_name}, vocab {vocab_size}"
        + (f", separator_token_ids {seps}, PADDING_ID {config['PADDING_ID']}" if seps is not None else ""))
    return str(out)
