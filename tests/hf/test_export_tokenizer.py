"""The export's tokenizer loads with stock AutoTokenizer without the remote-code question, and is the training
tokenizer (same ids)."""
import subprocess
import sys

from tests.hf.helpers import base_config, make_export
from tests.training.launch_utils import launch_env

SCRIPT = """
import sys
from tokenizers import Tokenizer
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code={trust})
ref = Tokenizer.from_file(sys.argv[2])
text = "the cat sat on the mat. a dog ran, and\\tthe bird sang!\\n"
assert tok.encode(text) == ref.encode(text).ids, (tok.encode(text), ref.encode(text).ids)
print("LOADED", type(tok).__name__)
"""


def test_export_tokenizer_loads_with_stock_autotokenizer_and_no_question(tmp_path, pythia_tokenizer_path):
    _, out = make_export(tmp_path, base_config(pythia_tokenizer_path), "sepllm_gpt_neox")
    for trust in (False, True):
        proc = subprocess.run([sys.executable, "-c", SCRIPT.format(trust=trust), str(out), str(pythia_tokenizer_path)],
                              cwd=tmp_path, env=launch_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "LOADED GPTNeoXTokenizer" in proc.stdout
        assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
