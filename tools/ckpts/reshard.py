#!/usr/bin/env python
r"""Write a trainer checkpoint again for another tensor-parallel and pipeline size (model weights).

    python tools/ckpts/reshard.py --input_dir <save>/global_stepN --output_dir <new save dir> --tp N --pp M \
        [--vocab_file tokenizer.json]

--tp is the new model-parallel-size, --pp the new pipe-parallel-size (0: the sequential model's single
mp_rank_XX file per TP rank; >= 1: a layer file per layer and TP rank). The output is a save directory (latest,
global_stepN/) whose resolved config has the new sizes and the vocabulary padded to make-vocab-size-divisible-by
x N; it holds no optimizer state, so resume from it with no_load_optim: true (same iteration) or finetune: true.
The conversion is megatron.checkpoint_reshard; the split rules are megatron.checkpoint_partition's
(docs/training.md, "Tensor-parallel checkpoints").
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the package it fronts sits two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.checkpoint_io import CheckpointError  # noqa: E402
from megatron.checkpoint_reshard import reshard  # noqa: E402
from megatron.cli import OneLineParser  # noqa: E402

__all__ = ["CheckpointError", "main", "parse_args", "reshard"]



def parse_args(argv=None):
    parser = OneLineParser(tool="reshard", description=__doc__)
    parser.add_argument("--input_dir", required=True,
                        help="<save>/global_stepN, or a save directory (its 'latest' checkpoint); never modified")
    parser.add_argument("--output_dir", required=True,
                        help="new save directory (or a previous reshard.py output, replaced)")
    parser.add_argument("--tp", type=int, required=True, help="new model-parallel-size (tensor-parallel ranks)")
    parser.add_argument("--pp", type=int, required=True,
                        help="new pipe-parallel-size: 0 for the sequential model, >= 1 pipeline stages")
    parser.add_argument("--vocab_file", default=None,
                        help="the run's tokenizer where it is now, if it moved (default: the resolved config's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reshard(args.input_dir, args.output_dir, args.tp, args.pp, args.vocab_file)
    except CheckpointError as err:
        print(f"reshard: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
