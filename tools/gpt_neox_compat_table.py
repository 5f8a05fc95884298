#!/usr/bin/env python
"""Which of GPT-NeoX's shipped configs load here: the table of docs/gpt_neox_compat.md.

    git -C gpt-neox archive HEAD configs | tar -x -C /tmp/neox      # or any checkout of GPT-NeoX
    python tools/gpt_neox_compat_table.py --configs /tmp/neox/configs --commit <sha> --output docs/gpt_neox_compat.md

The configs are the ones GPT-NeoX's README and issue 11 count: ``configs/*.yml``, ``pythia/``, ``llama*/`` and
``mistral/``. Each is loaded as ``deepy.py train.py`` would load it, up to the launch itself (derivation,
validation, the SepLLM checker, and the pre-flight: data files, token ids, DeepSpeed's config parser), on a
simulated node of 8 GPUs, so fp16 and GPU counts are judged as on a real one. Paths are set aside: every
data, tokenizer, save/load, tensorboard and log path is replaced by a small local stand-in of the same kind
(a dataset, a tokenizer of the config's ``tokenizer_type``, an empty save directory as ``load`` and ``save``);
nothing else is changed. A setup file that sets no model (``local_setup.yml``, ``text_generation.yml``, ...)
is loaded after ``125M.yml``, as GPT-NeoX's README pairs them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import HelpFormatter  # noqa: E402

# The folders of GPT-NeoX's configs/ that issue 11 counts (49 files at ea7aefd8).
SELECTION = ("*.yml", "pythia/*.yml", "llama*/*.yml", "mistral/*.yml")
# How GPT-NeoX's READMEs combine the files: a setup file that sets no model goes after 125M.yml (README:
# `125M.yml local_setup.yml`); llama/README.md: `llama/7B.yml llama/train_config.yml local_setup.yml`, the
# training settings every llama*/ and mistral/ model file leaves out (none of them sets train_iters).
MODEL_FOR_SETUP = "125M.yml"
LLAMA_MODEL, LLAMA_TRAINING = "llama/7B.yml", "llama/train_config.yml"
MODEL_KEYS = ("num_layers", "hidden_size")
SIMULATED_GPUS = 8


@dataclasses.dataclass
class Row:
    config: str  # path relative to the configs folder
    loads: bool
    detail: str  # what the loaded config trains, or the one-line reason it does not load


def shipped_configs(folder: Path) -> list:
    found = set()
    for pattern in SELECTION:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found, key=lambda p: (p.parent != folder, str(p.relative_to(folder))))


class StandIns:
    """Local files standing in for a config's paths: one dataset, one tokenizer per type, fresh directories."""

    def __init__(self, root: Path):
        self.root = root
        self.root_text = str(root)
        self._tokenizers = {}
        self._count = 0
        self.dataset = self._dataset()

    def _dataset(self) -> str:
        import numpy as np

        from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

        prefix = self.root / "data" / "standin_text_document"
        prefix.parent.mkdir(parents=True)
        builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
        for _ in range(64):  # enough documents for any split GPT-NeoX's configs give
            builder.add_item([2, 3, 2, 0])
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
        return str(prefix)

    def fresh_dir(self, name: str) -> str:
        self._count += 1
        return str(self.root / f"{name}{self._count}")

    def tokenizer(self, kind: str) -> dict:
        """The tokenizer keys (vocab_file, merge_file) for ``tokenizer_type`` ``kind``."""
        if kind not in self._tokenizers:
            self._tokenizers[kind] = self._make_tokenizer(kind)
        return self._tokenizers[kind]

    def _make_tokenizer(self, kind: str) -> dict:
        folder = self.root / "tokenizers" / kind
        folder.mkdir(parents=True)
        words = ["<|endoftext|>", "<|padding|>", "a", "b"]
        if kind == "HFTokenizer":
            from tokenizers import Tokenizer, models, pre_tokenizers

            tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            path = folder / "tokenizer.json"
            tok.save(str(path))
            return {"vocab_file": str(path)}
        if kind == "GPT2BPETokenizer":
            vocab, merges = folder / "vocab.json", folder / "merges.txt"
            vocab.write_text(json.dumps({w: i for i, w in enumerate(words + ["ab"])}))
            merges.write_text("#version: 0.2\na b\n")
            return {"vocab_file": str(vocab), "merge_file": str(merges)}
        if kind == "SPMTokenizer":
            import sentencepiece as spm

            prefix = folder / "tokenizer"
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(["a b ab ba aab bba"] * 20), model_prefix=str(prefix), vocab_size=12,
                model_type="bpe", user_defined_symbols=["<|endoftext|>"], minloglevel=2)
            return {"vocab_file": f"{prefix}.model"}
        return {}  # the other types read no file


def _merged_values(paths) -> dict:
    from megatron.neox_arguments.loading import merge_sources, read_yaml_keys

    return merge_sources([(str(p), read_yaml_keys(str(p))) for p in paths])[0]


def path_overrides(values: dict, standins: StandIns) -> dict:
    """Replacements for every path the merged config gives (and the data and tokenizer it needs to train)."""
    from megatron.neox_arguments import NeoXArgs

    default_type = NeoXArgs.fields()["tokenizer_type"].default
    out = dict(standins.tokenizer(values.get("tokenizer_type") or default_type))
    split_keys = [f"{split}_data_paths" for split in ("train", "valid", "test") if values.get(f"{split}_data_paths")]
    for key in split_keys:
        out[key] = [standins.dataset] * len(values[key])
    if values.get("data_path") or not split_keys:
        out["data_path"] = standins.dataset
    if values.get("load") or values.get("save"):
        # load == save: the save directory before its first checkpoint, as in GPT-NeoX's local_setup.yml.
        out["save"] = standins.fresh_dir("checkpoints")
        if values.get("load"):
            out["load"] = out["save"]
    for key in ("tensorboard_dir", "log_dir"):
        if values.get(key):
            out[key] = standins.fresh_dir(key)
    return out


def describe(args) -> str:
    attention = "full attention" if args.attention_variant == "full" else args.attention_variant
    extra = f", {args.activation}" if args.activation != "gelu" else ""
    extra += f", {args.norm}" if args.norm != "layernorm" else ""
    if args.num_kv_heads != args.num_attention_heads:
        extra += f", {args.num_kv_heads} KV heads"
    return (f"{args.num_layers} layers x {args.hidden_size}, {attention}{extra}, {args.precision}, ZeRO "
            f"{args.zero_stage}, data parallel {args.data_parallel_size} x pipeline {args.pipe_stages}"
            + (f" x tensor {args.model_parallel_size}" if args.model_parallel_size > 1 else ""))


def load_row(folder: Path, config: Path, standins: StandIns) -> Row:
    from megatron.checkpoint_layout import check_resume_before_launch
    from megatron.neox_arguments import ConfigError, Environment, NeoXArgs
    from megatron.neox_arguments.loading import normalise_key
    from megatron.neox_arguments.preflight import check_before_launch

    name = str(config.relative_to(folder))
    try:
        own = {normalise_key(k) for k in _merged_values([config])}
        paths = [config]
        if name == LLAMA_TRAINING:
            paths = [folder / LLAMA_MODEL, config]
        elif not own & set(MODEL_KEYS):
            paths = [folder / MODEL_FOR_SETUP, config]
        elif "train_iters" not in own and (folder / LLAMA_TRAINING).is_file():
            paths = [config, folder / LLAMA_TRAINING]
        paths = [p for p in paths if p.is_file()]
        overrides = path_overrides(_merged_values(paths), standins)
        overrides["user_script"] = str(Path(__file__).resolve().parents[1] / "train.py")
        env = Environment(cuda_device_count=SIMULATED_GPUS, environ={})
        with contextlib.redirect_stdout(io.StringIO()):  # the SepLLM checker's and the tokenizer's prints
            args = NeoXArgs.from_ymls(paths, overrides=overrides, env=env)
            check_before_launch(args, log=lambda *a, **k: None)
            check_resume_before_launch(args)
    except ConfigError as err:
        message = " ".join(str(err).split()).replace(f"{folder}{os.sep}", "").replace(standins.root_text, "<stand-in>")
        return Row(name, False, message + _with(paths, config, folder))
    return Row(name, True, describe(args) + _with(paths, config, folder))


def _with(paths, config, folder) -> str:
    others = [str(p.relative_to(folder)) for p in paths if p != config]
    return f" (loaded with {', '.join(others)})" if others else ""


def compat_rows(folder) -> list:
    folder = Path(folder).resolve()
    configs = shipped_configs(folder)
    if not configs:
        raise SystemExit(f"gpt_neox_compat_table.py: no GPT-NeoX configs ({', '.join(SELECTION)}) under {folder}")
    with tempfile.TemporaryDirectory(prefix="neox-compat-") as tmp:
        standins = StandIns(Path(tmp))
        return [load_row(folder, config, standins) for config in configs]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(rows, commit: str) -> str:
    loaded = sum(r.loads for r in rows)
    lines = [f"Of GPT-NeoX's {len(rows)} shipped configs (`configs/*.yml`, `pythia/`, `llama*/`, `mistral/` at "
             f"GPT-NeoX {commit}), **{loaded} load**; {len(rows) - loaded} do not, each for the reason given.", "",
             "| config | loads | what it trains / why not |", "| --- | --- | --- |"]
    lines += [f"| `{r.config}` | {'yes' if r.loads else 'no'} | {_cell(r.detail)} |" for r in rows]
    return "\n".join(lines) + "\n"


BEGIN = "<!-- BEGIN compat table: generated by tools/gpt_neox_compat_table.py -->"
END = "<!-- END compat table -->"


def write_into(doc: Path, table: str) -> None:
    """Replace the generated part of ``doc`` (between BEGIN and END), written under a temporary name first."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"gpt_neox_compat_table.py: {doc} has no '{BEGIN}' ... '{END}' block to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = doc.with_name(f".{doc.name}.tmp.{os.getpid()}")
    tmp.write_text(f"{head}{BEGIN}\n{table}{END}{tail}", encoding="utf-8")
    os.replace(tmp, doc)


def checkout_commit(folder) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(commit not given)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--configs", required=True, help="GPT-NeoX's configs/ folder (a checkout or an export)")
    parser.add_argument("--commit", default=None, help="the GPT-NeoX commit the folder is from, named in the table "
                                                       "(default: the folder's git HEAD, when it is in a checkout)")
    parser.add_argument("--output", default=None, help="markdown file whose generated block is replaced "
                                                       "(docs/gpt_neox_compat.md); without it the table is printed")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # DeepSpeed's parser logs every config it reads
    rows = compat_rows(args.configs)
    table = render(rows, args.commit or checkout_commit(args.configs))
    if args.output:
        write_into(Path(args.output), table)
        print(f"{sum(r.loads for r in rows)} of {len(rows)} configs load; table written to {args.output}")
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
