"""Splits, weights, sample counts and dataset construction from the configuration; bad input named."""
import numpy as np
import pytest

from megatron.data import data_utils
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.data_utils import (
    build_train_valid_test_datasets_from_args,
    get_normalized_weights_and_num_samples,
    get_train_valid_test_split_,
    samples_per_split,
)
from corpus_utils import data_config, write_corpus as _write_corpus


def write_corpus(prefix, n_docs, seed, max_len=60):
    return _write_corpus(prefix, n_docs, seed, max_len)


def make_args(**overrides):
    keys = dict(train_iters=10, eval_interval=5, eval_iters=2, train_batch_size=4, train_micro_batch_size_per_gpu=2,
                seed=1234, split="969,30,1")
    return data_config(world_size=2, **{**keys, **overrides})


@pytest.mark.parametrize(
    "split, size, expected",
    [
        ("969,30,1", 1000, [0, 969, 999, 1000]),
        ("969, 30, 1", 100000, [0, 96900, 99900, 100000]),
        ("1,1,1", 7, [0, 3, 5, 7]),  # rounding error taken off every boundary but the first
        ("1/1/1", 7, [0, 3, 5, 7]),
        ("1", 10, [0, 10, 10, 10]),
        ("98,2", 50, [0, 49, 50, 50]),
        ("969,30,1", 10, [0, 10, 10, 10]),
        ("0,1,0", 5, [0, 0, 5, 5]),
    ],
)
def test_split_boundaries_as_gpt_neox(split, size, expected):
    assert get_train_valid_test_split_(split, size) == expected


def test_bad_split_strings():
    with pytest.raises(ValueError, match="split: cannot parse 'a,b'"):
        get_train_valid_test_split_("a,b", 10)
    with pytest.raises(ValueError, match="not all be 0"):
        get_train_valid_test_split_("0,0,0", 10)
    with pytest.raises(ValueError, match=">= 0"):
        get_train_valid_test_split_("1,-1,1", 10)


def test_weights_and_sample_counts():
    weights, counts = get_normalized_weights_and_num_samples([2, 1, 1], 1000)
    assert weights == [0.5, 0.25, 0.25] and counts == [503, 252, 252]
    with pytest.raises(ValueError, match="train_data_weights"):
        get_normalized_weights_and_num_samples([0, 0], 10, key="train_data_weights")
    # GPT-NeoX: valid covers every evaluation (train_iters // eval_interval + 1 of them).
    assert samples_per_split(make_args(train_iters=100, eval_interval=30, eval_iters=5, train_batch_size=8)) == [
        800, (100 // 30 + 1) * 5 * 8, 40
    ]


def test_split_datasets_use_contiguous_document_ranges(tmp_path, capsys):
    prefix = write_corpus(tmp_path / "corpus", 200, seed=1)
    args = make_args(data_path=prefix, split="90,8,2")
    train, valid, test = build_train_valid_test_datasets_from_args(args)
    np.testing.assert_array_equal(train.documents, np.arange(0, 180))
    np.testing.assert_array_equal(valid.documents, np.arange(180, 196))
    np.testing.assert_array_equal(test.documents, np.arange(196, 200))
    n_train, n_valid, n_test = samples_per_split(args)
    assert (train.name, valid.name, test.name) == ("train", "valid", "test")
    assert (tmp_path / f"corpus_train_indexmap_{n_train}ns_16sl_1234s_packedpi_ac_doc_idx.npy").exists()
    assert (tmp_path / f"corpus_valid_indexmap_{n_valid}ns_16sl_1234s_packedpi_ac_shuffle_idx.npy").exists()
    assert (tmp_path / f"corpus_test_indexmap_{n_test}ns_16sl_1234s_packedpi_ac_sample_idx.npy").exists()
    assert set(np.asarray(train.doc_idx).tolist()) <= set(range(180))
    assert len(train) >= n_train - 1 and len(valid) >= n_valid - 1
    # GPT-NeoX's cache names do not include the split: a changed split meets the old train index. Ours
    # records the documents it was built over, so it is rebuilt with a notice.
    capsys.readouterr()
    train, _, _ = build_train_valid_test_datasets_from_args(make_args(data_path=prefix, split="1,0,0"))
    assert "corpus_train_indexmap_" in capsys.readouterr().out.split("was built from other data")[0]
    assert set(np.asarray(train.doc_idx).tolist()) == set(range(200))
    # A cache without that record (GPT-NeoX's) is not replaced: the mismatch is detected and named.
    build_train_valid_test_datasets_from_args(args)
    for record in tmp_path.glob("corpus_*_source.json"):
        record.unlink()
    with pytest.raises(ValueError, match=r"corpus_train_indexmap_.*_doc_idx.npy: 180 entries"):
        build_train_valid_test_datasets_from_args(make_args(data_path=prefix, split="1,0,0"))
    # An empty split gives None.
    other = write_corpus(tmp_path / "other", 30, seed=9)
    _, valid, test = build_train_valid_test_datasets_from_args(make_args(data_path=other, split="1,0,0"))
    assert valid is None and test is None


def test_weighted_paths_blend(tmp_path):
    a = write_corpus(tmp_path / "a", 50, seed=2)
    b = write_corpus(tmp_path / "b", 80, seed=3)
    args = make_args(train_data_paths=[a, b], train_data_weights=[3, 1], valid_data_paths=[b],
                     test_data_paths=[])
    train, valid, test = build_train_valid_test_datasets_from_args(args)
    assert isinstance(train, BlendableDataset) and test is None
    n_train = samples_per_split(args)[0]
    counts = get_normalized_weights_and_num_samples([3, 1], n_train)[1]
    assert (tmp_path / f"a_train_0_indexmap_{counts[0]}ns_16sl_1234s_packedpi_ac_doc_idx.npy").exists()
    assert (tmp_path / f"b_train_1_indexmap_{counts[1]}ns_16sl_1234s_packedpi_ac_doc_idx.npy").exists()
    assert [d.name for d in valid.datasets] == ["valid_0"]
    first = np.bincount(train.dataset_index[:n_train], minlength=2)
    assert abs(first[0] - 0.75 * n_train) < 1 and abs(first[1] - 0.25 * n_train) < 2
    sample = train[0]["text"]
    assert sample.shape == (17,) and sample.dtype == np.int64


def test_weight_by_num_documents(tmp_path):
    a = write_corpus(tmp_path / "a", 20, seed=4)
    b = write_corpus(tmp_path / "b", 180, seed=5)
    args = make_args(train_data_paths=[a, b], weight_by_num_documents=True, weighted_sampler_alpha=0.3)
    train, _, _ = build_train_valid_test_datasets_from_args(args)
    expected = data_utils.weights_by_num_docs([20, 180], 0.3)
    np.testing.assert_allclose(train.weights, expected)
    assert expected[0] > 0.1  # small group upsampled relative to its 10% share of documents


def test_bad_inputs_name_the_key_or_file(tmp_path):
    a = write_corpus(tmp_path / "a", 10, seed=6)
    # Validation refuses these before launch; a rank still names them if the resolved config it is given
    # (or the data on its node) differs from what the launcher checked.
    args = make_args(train_data_paths=[a, a])
    args.train_data_weights = [1]
    with pytest.raises(ValueError, match="train_data_weights has 1 entries but train_data_paths has 2"):
        build_train_valid_test_datasets_from_args(args)
    args = make_args(train_data_paths=[a], valid_data_paths=[a])
    args.valid_data_weights = [1, 2]
    with pytest.raises(ValueError, match="valid_data_weights has 2 entries but valid_data_paths has 1"):
        build_train_valid_test_datasets_from_args(args)
    missing = str(tmp_path / "nope")
    args = make_args(train_data_paths=[a], valid_data_paths=[a])
    args.valid_data_paths = [missing]
    with pytest.raises(FileNotFoundError, match=r"valid_data_paths: data file\(s\) not found: .*nope.bin"):
        build_train_valid_test_datasets_from_args(args)
    args = make_args(data_path=a)
    args.data_path = missing
    with pytest.raises(FileNotFoundError, match=r"data_path: .*nope.idx"):
        build_train_valid_test_datasets_from_args(args)
    with pytest.raises(ValueError, match="set data_path"):
        build_train_valid_test_datasets_from_args(make_args())
