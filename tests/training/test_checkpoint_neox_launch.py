"""A GPT-NeoX-layout checkpoint resumes here, in real deepy.py launches (CPU, gloo, ZeRO 1, one pipeline stage:
GPT-NeoX's default layout).

The first run writes GPT-NeoX's current tensor names (checkpoint_tensor_names: current), which the test checks
against GPT-NeoX's list. The GPT-NeoX checkpoint is synthesised from that run at its step 2: DeepSpeed's files
(the ZeRO optimizer shards and DeepSpeed's keys, which GPT-NeoX writes through the same DeepSpeed version) are
kept; layer tensors get GPT-NeoX's current names (mlp.linear1 / linear2); the client state becomes exactly the
one GPT-NeoX's save_ds_checkpoint hands DeepSpeed (neox_checkpoint.py, source commit NEOX_COMMIT); this
project's files (layout.json, configs/resolved_config.yml, rng_state/) are gone. A full resume from it must
reproduce the uninterrupted run's losses, and a no_load_optim resume its first loss (the weights).
"""
import os
import shutil

import pytest
import torch

from launch_utils import write_tiny_corpus
from neox_checkpoint import DEEPSPEED_KEYS, NEOX_ARGS, NEOX_LOAD_KEYS, neox_layer_states
from test_launch import run, tb_losses

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

KEYS = dict(pipe_parallel_size=1, zero_optimization={"stage": 1}, train_micro_batch_size_per_gpu=2,
            gradient_accumulation_steps=1)
MLP_NOW = {"mlp.dense_h_to_4h.": "mlp.linear1.", "mlp.dense_4h_to_h.": "mlp.linear2."}
# GPT-NeoX's AnnealingLR.load_state_dict reads these from DeepSpeed's 'lr_scheduler' entry
ANNEALING_LR_KEYS = {"start_lr", "min_lr", "warmup_iter", "end_iter", "decay_style", "num_iters"}


def as_neox_checkpoint(ours: str, target: str) -> None:
    """``ours`` (a global_step<N> of this project) rewritten as GPT-NeoX at NEOX_COMMIT would have written it."""
    os.makedirs(os.path.join(target, "configs"))
    blob = torch.load(os.path.join(ours, "mp_rank_00_model_states.pt"), weights_only=False)
    sd = {key: blob[key] for key in NEOX_LOAD_KEYS}
    torch.save(dict({key: blob[key] for key in DEEPSPEED_KEYS}, **sd),
               os.path.join(target, "mp_rank_00_model_states.pt"))
    for name in os.listdir(ours):
        path = os.path.join(ours, name)
        if name.startswith("layer_"):
            state = torch.load(path, weights_only=False)
            renamed = {}
            for key, value in state.items():
                for old, new in MLP_NOW.items():
                    key = new + key[len(old):] if key.startswith(old) else key
                renamed[key] = value
            torch.save(renamed, os.path.join(target, name))
        elif name.endswith("optim_states.pt"):
            shutil.copyfile(path, os.path.join(target, name))
    for name in os.listdir(os.path.join(ours, "configs")):
        if name != "resolved_config.yml":  # GPT-NeoX copies the user's config files only
            shutil.copyfile(os.path.join(ours, "configs", name), os.path.join(target, "configs", name))
    with open(os.path.join(os.path.dirname(target), "latest"), "w") as f:
        f.write(os.path.basename(target))


def test_neox_checkpoint_resumes(tmp_path):
    import yaml

    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    first, _ = run(tmp_path, "first", 1, data_path=corpus, train_iters=4, checkpoint_factor=2,
                   checkpoint_tensor_names="current", **KEYS)
    reference = tb_losses(first / "tb")
    step2 = first / "ckpt" / "global_step2"

    # Our checkpoint holds everything GPT-NeoX's load_checkpoint reads, with the values its args check wants.
    blob = torch.load(step2 / "mp_rank_00_model_states.pt", weights_only=False)
    resolved = yaml.safe_load((step2 / "configs" / "resolved_config.yml").read_text())
    assert set(NEOX_LOAD_KEYS) | set(DEEPSPEED_KEYS) <= set(blob)
    assert blob["args"] == {k: resolved[k] for k in NEOX_ARGS} and blob["iteration"] == 2
    assert set(blob["lr_scheduler"]) >= ANNEALING_LR_KEYS and blob["lr_scheduler"]["num_iters"] == 2
    neox_names = {idx: set(state) for idx, state in neox_layer_states(2, 8, 16).items()}
    assert {idx: set(torch.load(step2 / f"layer_{idx:02d}-model_00-model_states.pt", weights_only=False))
            for idx in neox_names} == neox_names  # the module state GPT-NeoX's strict load expects

    neox = tmp_path / "neox" / "global_step2"
    as_neox_checkpoint(str(step2), str(neox))
    assert not (neox / "layout.json").exists() and not (neox / "rng_state").exists()

    # Full resume, optimizer state included: the losses of the uninterrupted run.
    resumed, out = run(tmp_path, "resumed", 1, data_path=corpus, train_iters=4, load=str(tmp_path / "neox"), **KEYS)
    assert "loaded checkpoint" in out and "at iteration 2" in out, out[-3000:]
    got = tb_losses(resumed / "tb")
    assert sorted(got) == [3, 4] and all(got[i] == reference[i] for i in (3, 4)), (got, reference)

    # Weights only (no_load_optim): the first loss is the weights' loss on the same batch.
    fresh, out = run(tmp_path, "fresh", 1, data_path=corpus, train_iters=3, load=str(tmp_path / "neox"),
                     no_load_optim=True, **KEYS)
    assert tb_losses(fresh / "tb")[3] == reference[3]

    # A config whose model does not match stops before launch, naming the first tensor and both shapes.
    bad, out = run(tmp_path, "bad", 1, expect_rc=2, data_path=corpus, train_iters=4, load=str(tmp_path / "neox"),
                   intermediate_size=128, **KEYS)
    assert (f"layer_02-model_00-model_states.pt: tensor 'mlp.linear1.weight' of layer 2 has shape [256, 64] in the "
            "checkpoint, but the model this config builds has [128, 64]") in out, out[-3000:]
