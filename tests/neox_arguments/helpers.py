"""Shared helpers of the configuration tests: fake machines, tiny configs, fake datasets."""
import os
import textwrap
from pathlib import Path

import numpy as np

from megatron.neox_arguments import Environment

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A tiny full-attention model; the SepLLM checker turns the kernel flag off for full attention.
SMALL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 32,
    "padded_vocab_size": 128,
    "USE_ORIGINAL_FULL_ATTEN": True,
}


def cpu(**environ) -> Environment:
    """A machine without GPUs; `environ` becomes its environment variables."""
    return Environment(cuda_device_count=0, environ={k: str(v) for k, v in environ.items()})


def gpus(n: int, **environ) -> Environment:
    return Environment(cuda_device_count=n, environ={k: str(v) for k, v in environ.items()})


def small(**extra) -> dict:
    d = dict(SMALL)
    d.update(extra)
    return d


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def make_dataset(tmp_path: Path, name: str = "corpus_text_document", ids=(5, 17, 0, 99, 3, 0)) -> str:
    """A small valid .bin/.idx pair (deepy.py opens and scans the data before launch), one document per
    0-terminated run of `ids`; the default ids fit every vocabulary the tests use."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = tmp_path / "data" / name
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    doc = []
    for token in ids:
        doc.append(token)
        if token == 0:
            builder.add_item(doc)
            builder.end_document()
            doc = []
    if doc:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def fixture_with_paths(tmp_path: Path, name: str, data_prefix: str, tokenizer: str) -> str:
    """Copy a fixture config, filling in the data and tokenizer paths (the only edits allowed)."""
    text = (FIXTURES / name).read_text()
    text = text.replace("@DATA_PREFIX@", data_prefix).replace("@TOKENIZER@", os.fspath(tokenizer))
    out = tmp_path / name
    out.write_text(text)
    return str(out)


class Recorder:
    """A stand-in for DeepSpeed's runner: records each argv it is called with, launches nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        return 0
