"""Data faults through real deepy.py launches: a re-tokenised corpus under old index caches, and token ids
the vocabulary cannot hold (stopped before any rank starts)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from launch_utils import FIXTURES, losses_by_iteration, run_deepy, write_run_config, write_tiny_corpus  # noqa: E402

BASE = [FIXTURES / "tiny_model.yml", FIXTURES / "tiny_train.yml"]


def train(tmp_path, name, corpus, iters=2):
    cfg = write_run_config(tmp_path / f"{name}.yml", data_path=corpus, train_iters=iters, pipe_parallel_size=1,
                           train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    return run_deepy(BASE + [cfg], 1, log_path=tmp_path / f"{name}.log")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_retokenised_corpus_rebuilds_its_index_caches(tmp_path):
    corpus = write_tiny_corpus(str(tmp_path / "corpus"), seed=0)
    rc, out = train(tmp_path, "first", corpus)
    assert rc == 0, out[-3000:]
    assert list(tmp_path.glob("corpus_train_indexmap_*_source.json"))
    # prepare_data.py --force with another tokenizer: the same documents, other lengths; the caches stay.
    write_tiny_corpus(corpus, seed=1)
    rc, out = train(tmp_path, "second", corpus)
    assert rc == 0, out[-3000:]
    assert "corpus_train_indexmap_4ns_64sl_1234s_packedpi_ac_* was built from other data" in out
    assert sorted(losses_by_iteration(out)) == [1, 2]


@pytest.mark.deepspeed
def test_token_ids_beyond_the_vocabulary_stop_before_any_rank(tmp_path):
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = str(tmp_path / "wide")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(50):
        builder.add_item([65 + i % 20] * 30 + ([700] if i == 37 else []) + [0])
        builder.end_document()
    builder.finalize(prefix + ".idx")
    rc, out = train(tmp_path, "wide", prefix)
    assert rc == 2, out[-3000:]
    line = [ln for ln in out.splitlines() if "configuration error" in ln]
    assert len(line) == 1 and "wide.bin holds token id 700 (first at sequence 37, token 30)" in line[0]
    assert "vocabulary of 512 ids" in line[0] and "Traceback" not in out and "deepspeed.launcher" not in out
