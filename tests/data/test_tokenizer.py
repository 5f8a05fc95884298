"""Tokenizers from the config, vocabulary padding, and the BPE trainer."""
import json

import numpy as np
import pytest

from megatron.tokenizer import TokenizerError, _vocab_size_with_padding, build_tokenizer, make_tokenizer
from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer
from corpus_utils import data_config

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\nHowever little known the feelings or views of such a man may be; "
        "on his first entering a neighbourhood!  Is it not? Yes: it is.\t\n") * 20


@pytest.fixture(scope="module")
def trained_tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_bpe_tokenizer([TEXT, TEXT.upper()], vocab_size=400), str(path))
    return path


def _args(**keys):
    return data_config(**{"tokenizer_type": "HFTokenizer", "make_vocab_size_divisible_by": 128, **keys})


def test_pythia_hf_tokenizer(pythia_tokenizer_path):
    args = _args(vocab_file=str(pythia_tokenizer_path))
    args.padded_vocab_size = None  # derivation already built it once; build_tokenizer sets it again
    tok = build_tokenizer(args)
    assert (tok.vocab_size, tok.eod, tok.pad) == (50277, 0, 1)
    assert args.padded_vocab_size == 50304
    assert tok.tokenize("Hello world") == [12092, 1533]
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.tokenize_batch(["Hello world", "a"]) == [tok.tokenize("Hello world"), tok.tokenize("a")]


def test_vocab_padding():
    tensor_parallel = _args(tokenizer_type="CharLevelTokenizer")
    tensor_parallel.model_parallel_size = 2  # GPT-NeoX's formula: a multiple of 128 x 2
    assert _vocab_size_with_padding(50277, tensor_parallel) == 50432
    assert _vocab_size_with_padding(512, _args(tokenizer_type="CharLevelTokenizer")) == 512
    assert _vocab_size_with_padding(513, _args(tokenizer_type="CharLevelTokenizer", make_vocab_size_divisible_by=8)) \
        == 520


def test_trained_tokenizer_is_neox_style(trained_tokenizer_path):
    tok = make_tokenizer("HFTokenizer", str(trained_tokenizer_path))
    assert (tok.eod, tok.pad) == (0, 1)
    assert tok.vocab_size == 400
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert tok.detokenize(tok.tokenize("naïve café ☃")) == "naïve café ☃"  # byte fallback: nothing unknown
    assert len(tok.tokenize(TEXT)) < 0.6 * len(TEXT)  # merges were learned
    cfg = json.loads(open(trained_tokenizer_path).read())
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel" and cfg["pre_tokenizer"]["add_prefix_space"] is False


def test_trainer_is_deterministic(tmp_path):
    a = train_bpe_tokenizer([TEXT], vocab_size=350).to_str()
    b = train_bpe_tokenizer([TEXT], vocab_size=350).to_str()
    assert a == b


def _gpt2_files(tmp_path, trained_tokenizer_path):
    model = json.loads(open(trained_tokenizer_path).read())["model"]
    vocab = dict(model["vocab"])
    vocab.pop("<|padding|>", None)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_gpt2_bpe_matches_hf_twin(tmp_path, trained_tokenizer_path):
    vocab, merges = _gpt2_files(tmp_path, trained_tokenizer_path)
    gpt2 = make_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    hf = make_tokenizer("HFTokenizer", str(trained_tokenizer_path))
    rng = np.random.default_rng(0)
    words = TEXT.split(" ")
    for _ in range(20):
        s = " ".join(rng.choice(words, size=int(rng.integers(1, 30))))
        assert gpt2.tokenize(s) == hf.tokenize(s)
        assert gpt2.detokenize(gpt2.tokenize(s)) == s
    assert gpt2.eod == 0 and gpt2.pad == 0 and gpt2.vocab_size == 399


def test_spm_tokenizer(tmp_path):
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"), vocab_size=60,
                                   user_defined_symbols=["<|endoftext|>"], minloglevel=2)
    tok = make_tokenizer("SPMTokenizer", str(tmp_path / "m.model"))
    assert tok.vocab_size == 60
    assert tok.eod == tok.token_to_id("<|endoftext|>") and tok.eod > 2
    assert tok.detokenize(tok.tokenize("a single man")) == "a single man"


def test_char_level():
    args = _args(tokenizer_type="CharLevelTokenizer")
    args.padded_vocab_size = None
    tok = build_tokenizer(args)
    assert tok.vocab_size == 512 and args.padded_vocab_size == 512 and tok.eod == 0
    assert tok.tokenize("hé") == [104, 195, 169] and tok.detokenize([104, 195, 169]) == "hé"


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0", "model": {"type": "Nope"}}', ""])
def test_unparsable_tokenizer_file(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(TokenizerError, match=r"bad\.json is not a valid HuggingFace tokenizer\.json"):
        make_tokenizer("HFTokenizer", str(bad))


def test_bad_tokenizer_config(tmp_path):
    # The configuration refuses these before a tokenizer is built; the tokenizers name them as well.
    with pytest.raises(TokenizerError, match="vocab-file is required"):
        make_tokenizer("HFTokenizer")
    with pytest.raises(TokenizerError, match=r"vocab-file .*missing\.json does not exist"):
        make_tokenizer("HFTokenizer", str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="'Tiktoken' is not one of"):
        make_tokenizer("Tiktoken")
    (tmp_path / "v.json").write_text("[1, 2]")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(TokenizerError, match="must map token strings"):
        make_tokenizer("GPT2BPETokenizer", str(tmp_path / "v.json"), str(tmp_path / "m.txt"))
    (tmp_path / "s.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match=r"s\.model is not a SentencePiece model"):
        make_tokenizer("SPMTokenizer", str(tmp_path / "s.model"))
