"""prepare_data.py pg19: a deterministic whole-book split (no book in two splits), the datasets hold exactly
their split's books, a rebuild is skipped when nothing changed, and bad input is one line."""
import hashlib
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from data_prep import pg19_corpus
from data_prep.pg19_corpus import Pg19Error, build_pg19, split_books
from megatron.data.indexed_dataset import make_dataset
from megatron.tokenizer import make_tokenizer

WORDS = ("whale sea ship captain harpoon deck storm sail night morning letter river house garden "
         "carriage sister mother father friend road town").split()


def write_books(folder, n, seed=0):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?;")
                     for _ in range(rng.randint(20, 40))]
        name = f"{1000 + 37 * i}.txt"
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(f"BOOK {i}\n\n" + "\n".join(sentences) + "\n")
        names.append(name)
    return names


def test_split_is_deterministic_and_disjoint():
    names = [f"{n}.txt" for n in range(100, 180)]
    base = split_books(names, valid_books=4, test_books=5, seed=7)
    for trial in range(5):
        shuffled = names[:]
        random.Random(trial).shuffle(shuffled)
        assert split_books(shuffled, 4, 5, 7) == base  # listing order does not matter
    assert len(base["valid"]) == 4 and len(base["test"]) == 5 and len(base["train"]) == len(names) - 9
    sets = [set(base[s]) for s in ("train", "valid", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set.union(*sets) == set(names)
    # The rule, restated: the test books are the 5 smallest sha256("<seed>/<name>").
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"7/{n}".encode()).hexdigest())
    assert base["test"] == sorted(ranked[:5]) and base["valid"] == sorted(ranked[5:9])
    assert split_books(names, 4, 5, 8) != base  # the seed matters


def test_split_rejects_bad_counts():
    with pytest.raises(Pg19Error, match="cannot hold"):
        split_books(["a.txt", "b.txt"], 1, 1)
    with pytest.raises(Pg19Error, match="must be >= 1"):
        split_books(["a.txt", "b.txt", "c.txt"], 0, 1)


def _docs(prefix):
    data = make_dataset(prefix)
    return [tuple(int(t) for t in data[i]) for i in range(len(data))]


def test_build_holds_each_book_in_its_split_only(tmp_path):
    src = tmp_path / "books"
    names = write_books(src, 9)
    logs = []
    out = build_pg19(str(src), str(tmp_path / "data"), train_tokenizer=300, valid_books=2, test_books=2,
                     log=logs.append)
    manifest = pg19_corpus.read_manifest(out["dir"])
    split = {s: [b["book"] for b in manifest["books"][s]] for s in ("train", "valid", "test")}
    assert split == split_books(names, 2, 2)
    tok = make_tokenizer("HFTokenizer", out["tokenizer"])
    expected = {}
    for name in names:
        with open(src / name, encoding="utf-8") as f:
            expected[name] = tuple(tok.tokenize(f.read())) + (tok.eod,)
    for s in ("train", "valid", "test"):
        docs = _docs(out[s])
        assert docs == [expected[n] for n in split[s]]  # each split: exactly its books, in name order
        assert manifest["tokens"][s] == sum(len(d) for d in docs)
    # The tokenizer saw only the train books: it is what training on them alone gives.
    from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

    texts = [(src / n).read_text(encoding="utf-8") for n in split["train"]]
    save_tokenizer(train_bpe_tokenizer(texts, 300), str(tmp_path / "train_only.json"))
    assert (tmp_path / "train_only.json").read_bytes() == open(out["tokenizer"], "rb").read()

    # Nothing changed: nothing rebuilt.
    stamps = {s: os.path.getmtime(out[s] + ".bin") for s in ("train", "valid", "test")}
    build_pg19(str(src), str(tmp_path / "data"), train_tokenizer=300, valid_books=2, test_books=2,
               log=logs.append)
    assert "up to date" in logs[-1]
    assert stamps == {s: os.path.getmtime(out[s] + ".bin") for s in ("train", "valid", "test")}

    # Another machine, another folder: byte-identical outputs.
    other = build_pg19(str(src), str(tmp_path / "elsewhere"), train_tokenizer=300, valid_books=2, test_books=2,
                       log=logs.append)
    for s in ("train", "valid", "test"):
        for ext in (".bin", ".idx"):
            assert open(out[s] + ext, "rb").read() == open(other[s] + ext, "rb").read()


def test_vocab_file_defaults_beside_the_source(tmp_path):
    src = tmp_path / "pg19"
    write_books(src, 4)
    with pytest.raises(Pg19Error, match="20B_tokenizer.json is looked for beside the --source"):
        build_pg19(str(src), str(tmp_path / "data"), valid_books=1, test_books=1)
    with pytest.raises(Pg19Error, match="not a folder"):
        build_pg19(str(tmp_path / "missing"), str(tmp_path / "data"))


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, needle in ((["pg19"], "pg19 needs --source"),
                         (["pg19", "--source", str(empty)], "no non-empty .txt book")):
        r = subprocess.run([sys.executable, "data_prep/prepare_data.py", *argv, "--data-dir", str(tmp_path)],
                           cwd=REPO_ROOT, capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and needle in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
