#!/usr/bin/env python
"""Import a HuggingFace model directory (GPTNeoXForCausalLM, LlamaForCausalLM, MistralForCausalLM) as a trainer
checkpoint plus the YAML that describes it.

    python tools/ckpts/convert_hf_to_neox.py --hf_dir hf/pythia-160m-deduped --output_dir imports/pythia-160m \
        [--layout pipeline|sequential] [--vocab_file tokenizer.json] [--seq_length N]

The output is a save directory (``latest``, ``global_step0/``, ``model.yml``, the tokenizer) to name as ``load``
with ``finetune: true``. The conversion is :mod:`megatron.hf.import_hf` (docs/hf_import.md).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the package it fronts sits two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.cli import OneLineParser  # noqa: E402
from megatron.hf.export_config import ConversionError  # noqa: E402
from megatron.hf.import_hf import LAYOUTS, import_hf  # noqa: E402

__all__ = ["ConversionError", "import_hf", "main", "parse_args"]



def parse_args(argv=None):
    parser = OneLineParser(tool="convert_hf_to_neox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", required=True, help="HuggingFace model directory (config.json, weights, "
                                                        "tokenizer)")
    parser.add_argument("--output_dir", required=True,
                        help="new save directory (or a previous import, replaced) for latest, global_step0/, "
                             "model.yml and the tokenizer")
    parser.add_argument("--layout", default="pipeline", choices=LAYOUTS,
                        help="pipeline: layer_XX-model_00-model_states.pt files (pipe_parallel_size 1); "
                             "sequential: one mp_rank_00_model_states.pt (pipe_parallel_size 0)")
    parser.add_argument("--vocab_file", default=None,
                        help="tokenizer to train with instead of the directory's tokenizer.json / tokenizer.model")
    parser.add_argument("--seq_length", type=int, default=None,
                        help="seq_length written into model.yml (default: max_position_embeddings)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = import_hf(args.hf_dir, args.output_dir, args.layout, args.vocab_file, args.seq_length)
    except ConversionError as err:
        print(f"convert_hf_to_neox: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}/global_step0 and {path}/model.yml; train from it with load: {path} and finetune: true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
