"""Concatenate mmap datasets (same dtype) into one ``.bin``/``.idx`` pair.

    python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document

Sequences and documents keep their order (inputs in the order given). The output is written under
temporary names and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run by path (python tools/...): the checkout's package is two levels up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.cli import HelpFormatter  # noqa: E402
from megatron.data import indexed_dataset as ids  # noqa: E402


def merge(inputs: list[str], output_prefix: str) -> None:
    if not inputs:
        raise ids.IndexedDatasetError("no input datasets given")
    first = ids.make_dataset(inputs[0])  # validates; its dtype fixes the output's
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with ids.make_builder(ids.data_file_path(output_prefix), dtype=first.dtype) as builder:
        for prefix in inputs:
            builder.merge_file_(prefix)
        builder.finalize(ids.index_file_path(output_prefix))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes to concatenate, in order")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx (never over an existing dataset)")
    a = p.parse_args(argv)
    try:
        merge(a.input, a.output_prefix)
    except ids.IndexedDatasetError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
