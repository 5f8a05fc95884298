"""prepare_data.py default: the R lazy-load reader on hand-made blobs, .deb unpacking, and the whole pipeline
offline on a fake janeaustenr package; the real apt download is a slow test."""
import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest

from conftest import REPO_ROOT
from data_prep import default_corpus, prepare_data
from data_prep.debian_packages import PackageError, extract_deb
from data_prep.r_lazyload import RDataError, read_lazyload_db, unserialize
from megatron.data.indexed_dataset import make_dataset
from megatron.tokenizer import make_tokenizer

# ---- a minimal R XDR serialiser (independent twin of the reader) ---------------------------------


def _i(*v):
    return struct.pack(f">{len(v)}i", *v)


def r_header():
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def r_char(s):
    if s is None:
        return _i(9, -1)
    b = s.encode("utf-8")
    return _i(9 | ((1 << 3) << 12), len(b)) + b


def r_str(values, attrs=b""):
    return _i(16 | ((1 << 9) if attrs else 0), len(values)) + b"".join(r_char(v) for v in values) + attrs


def r_int(values, attrs=b""):
    return _i(13 | ((1 << 9) if attrs else 0), len(values), *values) + attrs


def r_lgl(values):
    return _i(10, len(values), *[(-(2 ** 31)) if v is None else int(v) for v in values])


def r_names_attr(names, sym_ref=None):
    # pairlist(names = <STRSXP>); the symbol is written once and then referenced (REFSXP).
    sym = _i(255 | (sym_ref << 8)) if sym_ref else _i(1) + r_char("names")
    return _i(2 | (1 << 10)) + sym + r_str(names) + _i(254)


def r_list(items, names=None, sym_ref=None):
    attrs = r_names_attr(names, sym_ref) if names is not None else b""
    return _i(19 | ((1 << 9) if attrs else 0), len(items)) + b"".join(items) + attrs


def make_lazyload_db(prefix, variables: dict):
    """Write prefix.rdb/.rdx holding character vectors, the way R's makeLazyLoadDB does."""
    rdb = b""
    offsets = []
    for value in variables.values():
        ser = r_header() + r_str(value)
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        offsets.append((len(rdb), len(blob)))
        rdb += blob
    names = list(variables)
    index = r_header() + r_list(
        [r_list([r_int(list(o)) for o in offsets], names=names),
         r_list([], names=[], sym_ref=1),
         r_lgl([True])],
        names=["variables", "references", "compressed"], sym_ref=1)
    with open(prefix + ".rdb", "wb") as f:
        f.write(rdb)
    with open(prefix + ".rdx", "wb") as f:
        f.write(gzip.compress(index))


def test_unserialize_hand_made_blob():
    blob = r_header() + r_list([r_str(["a", None, "é"]), r_int([1, -(2 ** 31), 3]), r_lgl([True, False, None])],
                               names=["s", "i", "l"])
    obj = unserialize(blob)
    assert obj.names == ["s", "i", "l"]
    assert list(obj[0]) == ["a", None, "é"] and list(obj[1]) == [1, None, 3] and list(obj[2]) == [True, False, None]


def test_unserialize_errors():
    with pytest.raises(RDataError, match="not an XDR"):
        unserialize(b"A\n" + _i(3))
    with pytest.raises(RDataError, match="truncated"):
        unserialize(r_header() + _i(16, 5) + r_char("only one"))
    with pytest.raises(RDataError, match="unsupported R object type 99"):
        unserialize(r_header() + _i(99))
    with pytest.raises(RDataError, match="reference 4"):
        unserialize(r_header() + _i(255 | (4 << 8)))


def test_lazyload_db_round_trip(tmp_path):
    novels = {"emma": ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome."], "persuasion": ["Chapter 1", "Sir Walter"]}
    make_lazyload_db(str(tmp_path / "Rdata"), novels)
    assert {k: list(v) for k, v in read_lazyload_db(str(tmp_path / "Rdata")).items()} == novels
    data = bytearray((tmp_path / "Rdata.rdb").read_bytes())
    data[10] ^= 0xFF
    (tmp_path / "Rdata.rdb").write_bytes(bytes(data))
    with pytest.raises(RDataError, match=r"Rdata\.rdb\[emma\]"):
        read_lazyload_db(str(tmp_path / "Rdata"))


def test_split_chapters_and_verses():
    lines = ["TITLE", "", "CHAPTER I", "one", "", "CHAPTER II", "two", "Chapter 3", "three"]
    assert default_corpus.split_chapters(lines) == ["TITLE\n\nCHAPTER I\none", "CHAPTER II\ntwo", "Chapter 3\nthree"]
    verses = ["Ge1:1 In the beginning.", "Ge1:2 And the earth", "was void.", "Ge2:1 Thus.", "1Sa1:1 Now there."]
    assert default_corpus.chapters_from_verse_lines(verses) == [
        "In the beginning.\nAnd the earth was void.", "Thus.", "Now there."]


# ---- a fake .deb --------------------------------------------------------------------------------


def _ar_member(name, data):
    hdr = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return hdr + data + (b"\n" if len(data) % 2 else b"")


def make_deb(path, files: dict):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.xz", buf.getvalue()))


def _fake_austen_deb(tmp_path, debs_dir, n_chapters=30):
    novels = {}
    for name, head in (("emma", "CHAPTER"), ("persuasion", "Chapter")):
        lines = [name.upper(), ""]
        for c in range(1, n_chapters + 1):
            lines += [f"{head} {c}", "", f"In chapter {c} of {name}, she said: yes; no? Indeed!", "\tThe end.", ""]
        novels[name] = lines
    db = tmp_path / "src" / "Rdata"
    db.parent.mkdir()
    make_lazyload_db(str(db), novels)
    os.makedirs(debs_dir, exist_ok=True)
    make_deb(os.path.join(debs_dir, "r-cran-janeaustenr_1.0.0-1_all.deb"), {
        default_corpus.AUSTEN_DB + ".rdb": (db.parent / "Rdata.rdb").read_bytes(),
        default_corpus.AUSTEN_DB + ".rdx": (db.parent / "Rdata.rdx").read_bytes(),
    })
    return novels


def test_extract_deb(tmp_path):
    make_deb(tmp_path / "p.deb", {"usr/lib/x": b"hello", "usr/share/y": b"!"})
    out = extract_deb(str(tmp_path / "p.deb"), str(tmp_path / "u"), ["usr/lib/x"])
    assert open(out["usr/lib/x"], "rb").read() == b"hello" and not (tmp_path / "u/usr/share/y").exists()
    with pytest.raises(PackageError, match="does not contain usr/lib/z"):
        extract_deb(str(tmp_path / "p.deb"), str(tmp_path / "u"), ["usr/lib/z"])
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(PackageError, match=r"bad\.deb is not a \.deb"):
        extract_deb(str(tmp_path / "bad.deb"), str(tmp_path / "u"), ["usr/lib/x"])


def test_prepare_default_offline(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    _fake_austen_deb(tmp_path, data_dir / "default" / "raw" / "debs")
    monkeypatch.setattr(prepare_data, "apt_available", lambda: True)
    out = prepare_data.prepare_default(str(data_dir), vocab_size=300, workers=1, with_bible=False)

    tok = make_tokenizer("HFTokenizer", out["tokenizer"])
    assert (tok.eod, tok.pad, tok.vocab_size) == (0, 1, 300)
    full = make_dataset(out["all"])
    assert len(full) == 60  # 30 chapters x 2 novels, each one document
    texts = [tok.detokenize(full[i][:-1]) for i in range(len(full))]
    assert all(full[i][-1] == tok.eod for i in range(len(full)))
    assert sum("Chapter 7\n" in t and "persuasion" in t for t in texts) == 1
    assert texts[0].startswith(("EMMA", "PERSUASION", "CHAPTER", "Chapter"))
    parts = {s: make_dataset(out[s]) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [58, 1, 1]
    np.testing.assert_array_equal(parts["valid"][0], full[48])
    np.testing.assert_array_equal(parts["test"][0], full[49])

    # Idempotent: a second run reuses every output.
    stamps = {p: os.path.getmtime(p) for p in (out["tokenizer"], out["all"] + ".bin", out["train"] + ".idx")}
    prepare_data.prepare_default(str(data_dir), vocab_size=300, workers=1, with_bible=False)
    assert stamps == {p: os.path.getmtime(p) for p in stamps}
    # A retrained tokenizer makes the token files stale: they are rebuilt, not reused.
    os.remove(out["tokenizer"])
    prepare_data.prepare_default(str(data_dir), vocab_size=280, workers=1, with_bible=False)
    assert make_tokenizer("HFTokenizer", out["tokenizer"]).vocab_size == 280
    assert os.path.getmtime(out["all"] + ".bin") >= os.path.getmtime(out["tokenizer"])
    assert int(make_dataset(out["all"]).sizes.sum()) > int(full.sizes.sum())  # smaller vocab, more tokens
    assert not [p for p in os.listdir(data_dir / "default") if ".tmp" in p]


def test_named_corpora_fail_clearly_offline(tmp_path, monkeypatch):
    def no_network(url, dest, timeout=60):
        raise default_corpus.CorpusSourceError(f"could not download {url}: no route to host")

    monkeypatch.setattr(default_corpus, "download", no_network)
    with pytest.raises(prepare_data.PrepareError, match="'enwik8' corpus needs internet"):
        prepare_data.prepare_enwik8(str(tmp_path), "CharLevelTokenizer", None, None, 1)
    with pytest.raises(prepare_data.PrepareError, match="'pile_pythia' corpus needs internet"):
        prepare_data.prepare_pile_pythia(str(tmp_path))
    assert not list(tmp_path.glob("*/*.bin"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_prepare_default_real_packages(tmp_path):
    """The real command: apt-get download of the Debian packages (network or a local mirror)."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / "data_prep/prepare_data.py"), "default",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "apt-get download" in r.stderr and "failed" in r.stderr:
        pytest.skip(f"package download unavailable here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    full = make_dataset(str(tmp_path / "default/default_text_document"))
    assert len(full) > 300 and int(full.sizes.sum()) > 1_000_000
    tok = make_tokenizer("HFTokenizer", str(tmp_path / "default/tokenizer.json"))
    text = "".join(tok.detokenize(full[i]) for i in range(len(full)))
    assert "It is a truth universally acknowledged" in text


def test_gutenberg_fallback_parsing():
    text = ("The First Book of Moses: Called Genesis\n\n1:1 In the beginning God created\nthe heaven.\n\n"
            "1:2 And the earth.\n\n2:1 Thus the heavens.\n\nThe Second Book of Moses: Called Exodus\n\n"
            "1:1 Now these are the names.\n\n1:2 Reuben.")
    assert default_corpus.chapters_from_gutenberg_kjv(text) == [
        "The First Book of Moses: Called Genesis\nIn the beginning God created the heaven.\nAnd the earth.",
        "Thus the heavens.",
        "The Second Book of Moses: Called Exodus\nNow these are the names.\nReuben."]
    book = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBODY\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense"
    assert default_corpus.strip_gutenberg(book) == "BODY"
