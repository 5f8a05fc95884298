"""Token ids against the padded vocabulary: chunked scan, cache keyed by the files, errors naming everything."""
import json
import os

import numpy as np
import pytest

from megatron.data import data_utils, token_ids
from megatron.data.indexed_dataset import IndexedDatasetError
from megatron.data.token_ids import TokenIdError, cache_path, check_token_ids, scan_token_range, token_id_range
from corpus_utils import data_config, write_docs


write = write_docs


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64])
def test_scan_in_chunks_matches_numpy(tmp_path, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    docs = [rng.integers(max(info.min, -1000), min(info.max, 1000) + 1, size=int(rng.integers(1, 50)))
            for _ in range(30)]
    prefix = write(tmp_path / "d", docs, dtype)
    flat = np.concatenate(docs)
    for chunk in (7, 1000, 1 << 25):  # chunk boundaries inside and across sequences
        r = scan_token_range(prefix, chunk=chunk)
        want_min = int(flat.min()) if info.min < 0 else 0
        assert (r.min_id, r.max_id, r.num_tokens) == (want_min, int(flat.max()), flat.size)


def test_empty_dataset_and_float_dtype(tmp_path):
    empty = write(tmp_path / "e", [])
    assert scan_token_range(empty).num_tokens == 0
    check_token_ids(empty, 10, "data_path")
    floats = write(tmp_path / "f", [np.array([1.0, 2.5])], np.float32)
    with pytest.raises(TokenIdError, match=r"f\.bin stores float32 values .*token ids must be integers"):
        scan_token_range(floats)


def test_error_names_file_id_position_vocab_and_key(tmp_path):
    docs = [np.full(10, 5), np.full(10, 7), np.array([1, 2, 3, 600, 4, 700])]
    prefix = write(tmp_path / "corpus", docs)
    check_token_ids(prefix, 701, "data_path")
    with pytest.raises(TokenIdError, match="holds token id 700 .*vocabulary of 700 ids"):  # ids run to vocab - 1
        check_token_ids(prefix, 700, "data_path")
    with pytest.raises(TokenIdError) as err:
        check_token_ids(prefix, 512, "train_data_paths", "tokenizer_type CharLevelTokenizer")
    message = str(err.value)
    assert message.startswith("key 'train_data_paths': data file ") and "corpus.bin holds token id 700" in message
    assert "(first at sequence 2, token 3)" in message and "vocabulary of 512 ids" in message
    assert "padded_vocab_size, from tokenizer_type CharLevelTokenizer" in message
    signed = write(tmp_path / "signed", [np.array([3, -2, 4])], np.int16)
    with pytest.raises(TokenIdError, match=r"holds token id -2 \(first at sequence 0, token 1\)"):
        check_token_ids(signed, 512, "data_path")


def test_scan_is_cached_until_the_data_changes(tmp_path, monkeypatch):
    prefix = write(tmp_path / "c", [np.arange(20)])
    lines = []
    assert token_id_range(prefix, log=lines.append).max_id == 19 and len(lines) == 1
    record = json.loads(open(cache_path(prefix)).read())
    assert record["range"]["max_id"] == 19 and record["files"]["bin"]["size"] == 40

    def no_scan(*a, **k):
        raise AssertionError("scanned again although the cache matches")

    monkeypatch.setattr(token_ids, "scan_token_range", no_scan)
    assert token_id_range(prefix).max_id == 19
    monkeypatch.undo()
    # prepare_data.py --force writes new files (new inode, size, mtime): the old result is not used.
    write(tmp_path / "c", [np.arange(20) + 1000])
    with pytest.raises(TokenIdError, match="holds token id 1019"):
        check_token_ids(prefix, 1000, "data_path")


def test_read_only_data_folder_caches_in_the_user_cache(tmp_path, monkeypatch):
    prefix = write(tmp_path / "c", [np.arange(5)])
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setattr(token_ids, "cache_path", lambda p: str(blocker / "x.json"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = []
    token_id_range(prefix, log=lines.append)
    assert str(tmp_path / "cache" / "sepllm" / "token_ids") in lines[0]
    monkeypatch.setattr(token_ids, "scan_token_range", lambda *a, **k: pytest.fail("not cached"))
    assert token_id_range(prefix).max_id == 4


def test_corrupt_pair_is_named_before_the_scan(tmp_path):
    prefix = write(tmp_path / "c", [np.arange(50)])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(60)
    with pytest.raises(IndexedDatasetError, match=r"c\.bin is 60 bytes but index .* says its sequences end at byte 100"):
        check_token_ids(prefix, 512, "data_path")


def _args(**overrides):
    keys = dict(train_iters=4, eval_interval=2, eval_iters=1, train_batch_size=2, train_micro_batch_size_per_gpu=2,
                seq_length=8, seed=1, split="1,0,0")
    return data_config(vocab=512, **{**keys, **overrides})


def test_the_loader_checks_every_dataset(tmp_path):
    good = write(tmp_path / "good", [np.arange(100) % 500] * 5)
    bad = write(tmp_path / "bad", [np.arange(100) % 500, np.array([1, 2, 50000])])
    data_utils.build_train_valid_test_datasets_from_args(_args(data_path=good))
    with pytest.raises(TokenIdError, match=r"key 'data_path': .*bad\.bin holds token id 50000 .*vocabulary of 512"):
        data_utils.build_train_valid_test_datasets_from_args(_args(data_path=bad))
    with pytest.raises(TokenIdError, match=r"key 'valid_data_paths': .*bad\.bin holds token id 50000"):
        data_utils.build_train_valid_test_datasets_from_args(_args(train_data_paths=[good], valid_data_paths=[bad]))
    assert not any(name.startswith("bad_") and name.endswith(".npy") for name in os.listdir(tmp_path))
