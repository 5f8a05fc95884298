"""preprocess_data.py: content, determinism across worker counts, input formats, bad inputs."""
import gzip
import json
import os

import numpy as np
import pytest

from data_prep import preprocess_data as pp
from megatron.data.indexed_dataset import make_dataset
from megatron.tokenizer import make_tokenizer
from megatron.tokenizer.corpus_reader import CorpusError

WORDS = ["Hello", "world.", "SepLLM,", "keeps", "separators;", "and", "a", "window!", "\n", "\t", "naïve"]


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 60)))) for _ in range(n)]


def _write_jsonl(path, docs, opener=open, **extra):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "title": f"doc {i}", **extra}) + "\n")


def _run(tmp_path, inputs, prefix="out", *extra, tokenizer=None):
    args = pp.get_args(["--input", ",".join(map(str, inputs)), "--output-prefix", str(tmp_path / prefix),
                        "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tokenizer), "--log-interval", "50",
                        *extra])
    return pp.preprocess(args, log=open(os.devnull, "w"))


def test_content_and_eod(tmp_path, pythia_tokenizer_path):
    docs = _docs(40) + [""]  # the empty document is skipped
    _write_jsonl(tmp_path / "a.jsonl", docs)
    stats = _run(tmp_path, [tmp_path / "a.jsonl"], "out", "--append-eod", tokenizer=pythia_tokenizer_path)
    tok = make_tokenizer("HFTokenizer", str(pythia_tokenizer_path))
    kept = [d for d in docs if tok.tokenize(d)]
    ds = make_dataset(str(tmp_path / "out_text_document"))
    assert stats["documents"] == len(ds) == len(kept) and stats["empty"] == len(docs) - len(kept)
    assert ds.dtype == np.uint16 and ds.doc_idx.tolist() == list(range(len(kept) + 1))
    for i, d in enumerate(kept):
        assert ds[i].tolist() == tok.tokenize(d) + [0]


def test_deterministic_across_workers(tmp_path, pythia_tokenizer_path):
    _write_jsonl(tmp_path / "a.jsonl", _docs(300, seed=1))
    _write_jsonl(tmp_path / "b.jsonl", _docs(90, seed=2))
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    pp._BATCH_DOCS, saved = 7, pp._BATCH_DOCS  # many small batches, so out-of-order completion is possible
    try:
        _run(tmp_path, inputs, "w1", "--append-eod", "--workers", "1", tokenizer=pythia_tokenizer_path)
        _run(tmp_path, inputs, "w2", "--append-eod", "--workers", "2", tokenizer=pythia_tokenizer_path)
    finally:
        pp._BATCH_DOCS = saved
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        b = (tmp_path / f"w2_text_document{ext}").read_bytes()
        assert a == b and len(a) > 100
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_formats_keys_and_num_docs(tmp_path, pythia_tokenizer_path):
    import zstandard

    docs = _docs(12, seed=3)
    _write_jsonl(tmp_path / "a.jsonl.gz", docs[:4], opener=gzip.open)
    with open(tmp_path / "b.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as w:
            for i, d in enumerate(docs[4:8]):
                w.write((json.dumps({"text": d, "title": f"doc {i + 4}"}) + "\n").encode())
    (tmp_path / "c.txt").write_text("A whole book.\nIn one file.")
    inputs = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst", tmp_path / "c.txt"]
    tok = make_tokenizer("HFTokenizer", str(pythia_tokenizer_path))
    _run(tmp_path, inputs, "all", tokenizer=pythia_tokenizer_path)
    ds = make_dataset(str(tmp_path / "all_text_document"))
    want = [d for d in docs[:8] if d] + ["A whole book.\nIn one file."]
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(d) for d in want]
    _run(tmp_path, inputs[:1], "keys", "--jsonl-keys", "text", "title", "--num-docs", "3", tokenizer=pythia_tokenizer_path)
    titles = make_dataset(str(tmp_path / "keys_title_document"))
    assert [titles[i].tolist() for i in range(len(titles))] == [tok.tokenize(f"doc {i}") for i in range(3)]


def test_ftfy(tmp_path, pythia_tokenizer_path):
    _write_jsonl(tmp_path / "m.jsonl", ["The Mona Lisa doesnâ€™t have eyebrows."])
    _run(tmp_path, [tmp_path / "m.jsonl"], "f", "--ftfy", tokenizer=pythia_tokenizer_path)
    tok = make_tokenizer("HFTokenizer", str(pythia_tokenizer_path))
    assert tok.detokenize(make_dataset(str(tmp_path / "f_text_document"))[0]) == "The Mona Lisa doesn't have eyebrows."


def test_empty_input_file(tmp_path, pythia_tokenizer_path):
    _write_jsonl(tmp_path / "a.jsonl", ["fine"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match=r"empty\.jsonl contains no documents"):
        _run(tmp_path, [tmp_path / "a.jsonl", tmp_path / "empty.jsonl"], tokenizer=pythia_tokenizer_path)
    assert not (tmp_path / "out_text_document.bin").exists()


@pytest.mark.parametrize("line, message", [
    ("{broken", r"bad\.jsonl:2: not valid JSON"),
    ('{"body": "x"}', r"bad\.jsonl:2: no key 'text'"),
    ('{"text": 5}', r"bad\.jsonl:2: key 'text' holds int"),
])
def test_bad_record_leaves_no_output(tmp_path, pythia_tokenizer_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "good"}) + "\n" + line + "\n")
    with pytest.raises(CorpusError, match=message):
        _run(tmp_path, [tmp_path / "bad.jsonl"], tokenizer=pythia_tokenizer_path)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_cli_errors(tmp_path, pythia_tokenizer_path, capsys):
    with pytest.raises(SystemExit):
        pp.main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer-type", "HFTokenizer", "--vocab-file", str(pythia_tokenizer_path)])
    with pytest.raises(SystemExit):
        pp.get_args(["--input", "a", "--output-prefix", "o", "--tokenizer-type", "HFTokenizer", "--workers", "0"])
