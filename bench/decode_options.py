"""Command-line options shared by the decoding benchmarks (SepCache sizes, SDPA backend policy)."""
import argparse

import torch


def add_decode_options(parser: argparse.ArgumentParser, sizes_help: str, cudnn_cost: str) -> None:
    """``--sizes a,s,w,c`` and ``--allow_cudnn_sdpa``; ``cudnn_cost`` says what the cuDNN backend cost where it was
    measured."""
    parser.add_argument("--sizes", default="4,64,256,512", help=sizes_help)
    parser.add_argument("--allow_cudnn_sdpa", action="store_true",
                        help=f"keep PyTorch's cuDNN SDPA backend (it plans per KV length: {cudnn_cost} "
                             "when the cache length changes every step)")


def sepcache_sizes(parser: argparse.ArgumentParser, text: str) -> tuple:
    """``a,s,w,c`` as four ints with a + s + w < c, or the parser's one-line error."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or sizes[0] + sizes[1] + sizes[2] >= sizes[3]:
        parser.error(f"--sizes {text}: want a,s,w,c with a + s + w < c")
    return sizes


def apply_sdpa_policy(args) -> None:
    """On CUDA, turns cuDNN SDPA off unless asked: flash / memory-efficient kernels need no per-shape plan."""
    if torch.cuda.is_available() and not args.allow_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
