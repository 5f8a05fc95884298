"""``pip install .`` (not editable) gives a working install: the package imports from outside the checkout,
the converter runs as its console entry and as ``python -m``, and the export it writes matches the trainer."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf.helpers import build_trainer_model, save_checkpoint, trainer_logits

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tracked_copy(dest: Path) -> Path:
    """The files a clean clone has (tracked, or new and not ignored): what `pip install .` sees in CI."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           stdout=subprocess.PIPE, text=True).stdout.splitlines()
    for name in names:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = _tracked_copy(tmp / "src")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, cwd=tmp)
    shutil.rmtree(src)  # nothing of the checkout is left to import from
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR")}
    env["PYTHONPATH"] = str(site)
    env["HOME"] = str(tmp)
    return site, env, tmp


def _run(cmd, env, cwd):
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def test_package_imports_outside_the_checkout(installed):
    site, env, tmp = installed
    out = _run([sys.executable, "-c", "import megatron, megatron.hf.export, tools.ckpts.convert_neox_to_hf as c; "
                "print(megatron.__file__); print(c.__file__)"], env, tmp)
    assert all(line.startswith(str(site)) for line in out.split()), out
    # The C++ index builder's source is in the package and builds into the user's cache.
    out = _run([sys.executable, "-c", "from megatron.data.helpers import compile_cpp_helpers as c; "
                "print(c().__file__)"], env, tmp)
    assert str(tmp / ".cache" / "sepllm-neox") in out


def test_installed_converter_exports_what_the_trainer_computes(installed):
    site, env, tmp = installed
    from megatron.neox_arguments import NeoXArgs

    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
               pos_emb="rotary", rotary_pct=0.5, gpt_j_residual=True, no_weight_tying=True,
               tokenizer_type="CharLevelTokenizer", USE_ORIGINAL_FULL_ATTEN=True, precision="fp32",
               train_micro_batch_size_per_gpu=1)
    args, model = build_trainer_model(cfg)
    ckpt = save_checkpoint(model, cfg, tmp / "save" / "global_step1", resolved_args=NeoXArgs.from_dict(dict(cfg)))
    entry = site / "bin" / "sepllm-convert-neox-to-hf"
    _run([sys.executable, str(entry), "--help"], env, tmp)
    _run([sys.executable, "-m", "tools.ckpts.convert_neox_to_hf", "--input_dir", str(ckpt), "--output_dir",
          str(tmp / "hf"), "--precision", "fp32", "--architecture", "neox", "--no_save_tokenizer"], env, tmp)
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(str(tmp / "hf")).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), trainer_logits(model, ids), rtol=1e-5, atol=1e-5)
