#!/usr/bin/env python
"""Export a trainer checkpoint (``<save>/global_stepN``) to a HuggingFace model directory.

    python tools/ckpts/convert_neox_to_hf.py --input_dir <save>/global_stepN [--config_file cfg.yml ...] \
        --output_dir out/ --precision auto|fp16|bf16|fp32 --architecture sepllm_gpt_neox|neox|llama \
        [--no_save_tokenizer] [--overwrite]

The model is described by the checkpoint's own resolved config (``global_stepN/configs/resolved_config.yml``);
``--config_file`` is checked against it. The conversion is :mod:`megatron.hf.export` (docs/hf_export.md).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the package it fronts sits two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import OneLineParser  # noqa: E402
from megatron.hf.export import export  # noqa: E402
from megatron.hf.export_config import ARCHITECTURES, PRECISIONS, ConversionError  # noqa: E402

__all__ = ["ConversionError", "export", "main", "parse_args"]



def parse_args(argv=None):
    parser = OneLineParser(tool="convert_neox_to_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="<save>/global_stepN")
    parser.add_argument("--config_file", nargs="*", default=None,
                        help="YAML file(s) of the run, checked against the checkpoint's resolved config "
                             "(default: the checkpoint's own)")
    parser.add_argument("--output_dir", required=True,
                        help="new directory, or a previous export (replaced)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="dtype of the exported weights; auto keeps the training precision")
    parser.add_argument("--architecture", default="sepllm_gpt_neox", choices=ARCHITECTURES,
                        help="sepllm_gpt_neox: the SepLLM model class shipped in the export (trust_remote_code); "
                             "neox: a stock GPTNeoXForCausalLM; llama: a stock LlamaForCausalLM, or "
                             "MistralForCausalLM with sliding_window_width (both for full-attention models only)")
    parser.add_argument("--no_save_tokenizer", action="store_true",
                        help="do not copy the training tokenizer into the export")
    parser.add_argument("--overwrite", action="store_true",
                        help="also replace a non-empty directory that is not an export (never one holding "
                             "checkpoints)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = export(args.input_dir, args.config_file, args.output_dir, args.precision, args.architecture,
                      not args.no_save_tokenizer, overwrite=args.overwrite)
    except ConversionError as err:
        print(f"convert_neox_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.architecture} model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
