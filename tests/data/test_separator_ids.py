"""SepLLM separator ids: Pythia's known list, the tool, and other tokenizers."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from megatron.tokenizer import SEPARATOR_CHARS, make_tokenizer, separator_ids
from megatron.tokenizer.train_tokenizer import save_tokenizer, train_bpe_tokenizer

PYTHIA_SEPARATORS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def test_pythia_separator_ids(pythia_tokenizer_path):
    tok = make_tokenizer("HFTokenizer", str(pythia_tokenizer_path))
    assert separator_ids(tok) == PYTHIA_SEPARATORS


def test_tool_prints_pythia_ids(pythia_tokenizer_path):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools/sepllm/get_separator_ids.py"),
                          "--vocab-file", str(pythia_tokenizer_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(PYTHIA_SEPARATORS)


def test_trained_tokenizer_separators_are_single_tokens(tmp_path):
    text = "One, two. Three? Four! Five; six: seven\teight\nnine " * 50
    path = tmp_path / "t.json"
    save_tokenizer(train_bpe_tokenizer([text], vocab_size=300), str(path))
    tok = make_tokenizer("HFTokenizer", str(path))
    ids = separator_ids(tok)
    assert len(set(ids)) == 9
    assert [tok.detokenize([i]) for i in ids] == list(SEPARATOR_CHARS)


def test_char_level_separators():
    assert separator_ids(make_tokenizer("CharLevelTokenizer")) == [ord(c) for c in SEPARATOR_CHARS]


def test_tokenizer_without_single_separator_token():
    class Words:
        def tokenize(self, text):
            return [7, 8]

        def token_to_id(self, tok):
            return None

    with pytest.raises(ValueError, match=r"no single token for separator '\.'"):
        separator_ids(Words())
