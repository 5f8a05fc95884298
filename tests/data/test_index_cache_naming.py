"""Index caches shared with current GPT-NeoX (names ending `_packedpi_ac` since c7863673), the SepLLM reference
and Pythia-era GPT-NeoX (v2.0 names): either is read, the configured one is written; GPT-NeoX's preprocess_data
uses this package's builder."""
import os

import numpy as np
import pytest

from corpus_utils import data_config, write_corpus
from megatron.data import gpt2_dataset
from megatron.data.gpt2_dataset import GPT2Dataset, index_file_names
from megatron.data.indexed_dataset import make_builder, make_dataset


def neox_names(prefix, name, ns, sl, seed, current=True):
    """GPT-NeoX's _build_index_mappings file names (megatron/data/gpt2_dataset.py at ea7aefd8, packing_impl
    'packed', allow_chopped True); v2.0 stops after the seed."""
    stem = f"{prefix}_{name}_indexmap_{ns}ns_{sl}sl_{seed}s" + ("_packedpi_ac" if current else "")
    return {k: f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}


def index_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith("_idx.npy"))


def no_build(*_, **__):
    raise AssertionError("index rebuilt although a cache of either naming exists")


@pytest.fixture
def corpus(tmp_path):
    prefix = write_corpus(str(tmp_path / "pile_text_document"), 30, seed=2, max_len=50)
    return prefix, make_dataset(prefix), np.arange(30, dtype=np.int32)


def test_current_names_by_default_v2_on_request(tmp_path, corpus):
    prefix, ds, docs = corpus
    GPT2Dataset("train", prefix, docs, ds, 40, 16, 7)
    assert index_files(tmp_path) == sorted(os.path.basename(p) for p in neox_names(prefix, "train", 40, 16, 7).values())
    GPT2Dataset("valid", prefix, docs, ds, 40, 16, 7, index_cache_naming="v2.0")
    assert set(map(os.path.basename, neox_names(prefix, "valid", 40, 16, 7, current=False).values())) \
        <= set(index_files(tmp_path))
    assert index_file_names(prefix, "x", 1, 2, 3) == neox_names(prefix, "x", 1, 2, 3)


@pytest.mark.parametrize("existing, wanted", [("v2.0", "current"), ("current", "v2.0")])
def test_an_existing_cache_of_either_naming_is_used(tmp_path, corpus, monkeypatch, existing, wanted):
    prefix, ds, docs = corpus
    built = GPT2Dataset("train", prefix, docs, ds, 40, 16, 7, index_cache_naming=existing)
    before = index_files(tmp_path)
    monkeypatch.setattr(gpt2_dataset, "build_index_arrays", no_build)
    reused = GPT2Dataset("train", prefix, docs, ds, 40, 16, 7, index_cache_naming=wanted)
    assert index_files(tmp_path) == before  # nothing written under the other name
    np.testing.assert_array_equal(reused.shuffle_idx, built.shuffle_idx)
    np.testing.assert_array_equal(reused.doc_idx, built.doc_idx)


def test_a_stale_cache_of_the_other_naming_is_not_used(tmp_path, corpus, capsys):
    prefix, ds, _ = corpus
    GPT2Dataset("train", prefix, np.arange(0, 20, dtype=np.int32), ds, 40, 16, 7, index_cache_naming="v2.0")
    old = {k: os.path.getmtime(p) for k, p in neox_names(prefix, "train", 40, 16, 7, current=False).items()}
    # Same names, other documents (another split): the v2.0 set records other data, so the current set is built.
    g = GPT2Dataset("train", prefix, np.arange(20, 30, dtype=np.int32), ds, 40, 16, 7)
    assert all(os.path.isfile(p) for p in neox_names(prefix, "train", 40, 16, 7).values())
    assert set(np.asarray(g.doc_idx).tolist()) <= set(range(20, 30))
    assert old == {k: os.path.getmtime(p) for k, p in neox_names(prefix, "train", 40, 16, 7, current=False).items()}
    assert "packedpi_ac_* was built from other data" not in capsys.readouterr().out  # it did not exist


def test_config_key_reaches_the_datasets(tmp_path):
    from megatron.data.data_utils import build_train_valid_test_datasets_from_args
    from megatron.neox_arguments import ConfigError

    prefix = write_corpus(str(tmp_path / "c"), 60, seed=1, max_len=40)
    keys = dict(train_iters=4, eval_interval=4, eval_iters=1, train_batch_size=2, train_micro_batch_size_per_gpu=2,
                seed=5, split="1,0,0", data_path=prefix)
    build_train_valid_test_datasets_from_args(data_config(index_cache_naming="v2.0", **keys))
    assert index_files(tmp_path) == ["c_train_indexmap_8ns_16sl_5s_doc_idx.npy",
                                     "c_train_indexmap_8ns_16sl_5s_sample_idx.npy",
                                     "c_train_indexmap_8ns_16sl_5s_shuffle_idx.npy"]
    with pytest.raises(ConfigError, match="index_cache_naming"):
        data_config(index_cache_naming="v1", **keys)


def test_builder_dtype_as_gpt_neox_preprocess_uses_it(tmp_path):
    # GPT-NeoX's tools/datasets/preprocess_data.py: make_builder(bin, impl=..., vocab_size=tokenizer.vocab_size),
    # then add_item(np.array(ids, dtype=builder.dtype)), end_document(), finalize(idx).
    for vocab, dtype in ((50304, np.uint16), (128000, np.int32)):
        prefix = str(tmp_path / f"out_text_document_{vocab}")
        builder = make_builder(prefix + ".bin", impl="mmap", vocab_size=vocab)
        assert builder.dtype == dtype
        for ids in ([1, 2, 3], [vocab - 1]):
            builder.add_item(np.array(ids, dtype=builder.dtype))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        ds = make_dataset(prefix)
        assert ds.dtype == dtype and ds.get(1).tolist() == [vocab - 1]
