"""Real tensor-parallel checkpoints (deepy.py, CPU, gloo): a SepLLM run trained at TP=2 writes GPT-NeoX's layout
(layer_XX-model_YY and mp_rank_YY files, each with the client state, and the resolved config); its export equals
the export of the same run trained at TP=1 (the losses agree to 1e-5, the weights to 1e-4); reshard.py's TP=1
copy exports bit for bit the same; a TP=1 run resumes from the TP=2 checkpoint with no_load_optim, directly or
from the reshard, with the same losses, and without it is refused before launch naming both sizes."""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))
import tp_harness  # noqa: E402,F401  (puts tests/golden and tests/training on sys.path)
from golden_utils import BASE, MODES, tensorboard_losses  # noqa: E402
from launch_utils import REPO, deepy_command, launch_env, run_deepy, write_run_config, write_tiny_corpus  # noqa: E402

from megatron.checkpoint_reshard import reshard  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
MODE = "sepllm_mask"


def train(work_dir: Path, procs: int, corpus: str, **overrides):
    work_dir.mkdir(parents=True, exist_ok=True)
    keys = {**BASE, **MODES[MODE], "data_path": corpus, "tensorboard_dir": str(work_dir / "tb"),
            "save": str(work_dir / "ckpt"), "checkpoint_factor": 10, **overrides}
    cfg = write_run_config(work_dir / "run.yml", **keys)
    rc, out = run_deepy([cfg], procs, log_path=work_dir / "log.txt", timeout=600)
    assert rc == 0, out[-3000:]
    return tensorboard_losses(work_dir / "tb"), cfg


def export_tensors(ckpt: str, out: Path) -> dict:
    from safetensors.torch import load_file

    from megatron.hf.export import export

    path = export(ckpt, None, str(out), architecture="sepllm_gpt_neox", save_tokenizer=False, log=lambda _: None)
    return load_file(os.path.join(path, "model.safetensors"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_ckpt")
    corpus = write_tiny_corpus(str(tmp / "corpus"))
    one, _ = train(tmp / "tp1", 1, corpus, model_parallel_size=1)
    two, _ = train(tmp / "tp2", 2, corpus, model_parallel_size=2)
    return tmp, corpus, one, two


def test_tp2_checkpoint_layout_and_export_equal_tp1(runs):
    tmp, _, one, two = runs
    assert sorted(one) == sorted(two) and all(math.isclose(two[i], one[i], rel_tol=1e-5) for i in one), (one, two)
    step = tmp / "tp2" / "ckpt" / "global_step10"
    names = set(os.listdir(step))
    layers = [0, 2, 3, 5, 6]  # embedding, 2 blocks, final norm, output layer
    assert {f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in layers for r in (0, 1)} <= names
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names, sorted(names)
    for r in (0, 1):
        client = torch.load(step / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", weights_only=False)
        assert client["args"]["model_parallel_size"] == 2 and client["iteration"] == 10
    qkv = [torch.load(step / f"layer_02-model_{r:02d}-model_states.pt", weights_only=False)
           ["attention.query_key_value.weight"] for r in (0, 1)]
    assert qkv[0].shape == (96, 64)  # 2 of the 4 heads, [heads, 3, d] rows
    ref = export_tensors(str(tmp / "tp1" / "ckpt" / "global_step10"), tmp / "hf1")
    got = export_tensors(str(step), tmp / "hf2")
    whole = dict(got)
    assert sorted(ref) == sorted(got)
    # The key rows of the QKV bias add q.b_k to every score of a query, which the softmax cancels: their true
    # gradient is 0, and Adam turns the rounding noise of each run into lr-sized steps (measured: 0.6-1.1% apart
    # here, the query and value rows 2e-6). They are compared apart, with what noise of that size allows.
    keys_of_bias = {}
    for name in [k for k in ref if k.endswith("attention.query_key_value.bias")]:
        a, b = (t.view(4, 3, 16) for t in (got[name], ref[name]))  # [heads, q/k/v, d]
        keys_of_bias[name] = rel(a[:, 1], b[:, 1])
        got[name], ref[name] = a[:, 0::2].clone(), b[:, 0::2].clone()
    bad = {k: rel(got[k], ref[k]) for k in ref if not rel(got[k], ref[k]) <= 1e-4}
    assert not bad, bad
    assert all(v <= 0.05 for v in keys_of_bias.values()), keys_of_bias
    resharded = reshard(str(step), str(tmp / "tp2_as_tp1"), 1, 0, log=lambda _: None)
    again = export_tensors(resharded, tmp / "hf2r")
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_tp1_resumes_a_tp2_checkpoint(runs):
    tmp, corpus, _, two = runs
    step = str(tmp / "tp2" / "ckpt" / "global_step10")
    more = dict(train_iters=12, lr_decay_iters=12, override_lr_scheduler=True, model_parallel_size=1, save=None)
    refused = write_run_config(tmp / "refused.yml", **{**BASE, **MODES[MODE], "data_path": corpus, "load": step,
                                                        **more})
    import subprocess

    command = deepy_command([refused], 1)
    proc = subprocess.run(command[:2] + ["--dry_run"] + command[2:], cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert f"key 'model_parallel_size' is 1, but checkpoint {step} was saved with model_parallel_size=2" \
        in proc.stdout, proc.stdout[-2000:]
    direct, _ = train(tmp / "resume_direct", 1, corpus, load=step, no_load_optim=True, **more)
    resharded = reshard(step, str(tmp / "tp2_as_tp1_pipe"), 1, 1, log=lambda _: None)
    via, _ = train(tmp / "resume_resharded", 1, corpus, load=resharded, no_load_optim=True, **more)
    assert sorted(direct) == sorted(via) == [11, 12], (direct, via)
    assert all(math.isclose(direct[i], via[i], rel_tol=1e-6) for i in direct), (direct, via)
    assert abs(direct[11] - two[10]) < 0.1, (direct, two)  # it goes on from the trained weights
