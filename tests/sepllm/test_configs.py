"""Every sample config loads, passes validation (the checker included) and trains 3 steps, shrunken, on CPU.

The fast test builds the model in-process (``build_sequential_model``) and runs 3 Adam steps per config;
the slow test launches a few configs through ``deepy.py train.py`` like a user.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
MODES = sorted((CONFIGS / "sepllm").glob("*.yml"))
PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]
SHRINK = 16  # windows are divided by this so that they stay below the shrunken sequence length
SEQ = 64


def _model_file(mode: Path) -> Path:
    return CONFIGS / "models" / ("pythia-1.4b.yml" if "-1.4b-" in mode.name else "pythia-160m.yml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny mmap dataset of Pythia ids with ~20 % separators."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "tiny_text_document")
    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        ids = rng.integers(33, 250, int(rng.integers(20, 120)))  # valid for the Pythia and char-level vocabularies
        ids[rng.random(ids.shape) < 0.2] = rng.choice(PYTHIA_SEPS)
        builder.add_item(ids.tolist() + [0])
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def shrink_overrides(mode: Path, corpus: str, tokenizer: Path, layers: int) -> dict:
    """Overrides that keep a config's attention layout but make it CPU-sized."""
    raw = yaml.safe_load(mode.read_text())
    out = {
        "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ, "max_position_embeddings": SEQ,
        "num_layers": layers, "attention_config": [[["global"], layers]],
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 3,
        "lr_decay_iters": 3, "fp16": None, "precision": "fp32", "zero_optimization": {"stage": 0},
        "checkpoint_activations": False, "partition_activations": False, "data_path": corpus,
        "vocab_file": str(tokenizer), "eval_interval": 1000, "eval_iters": 1, "log_interval": 1,
        "distributed_backend": "gloo", "print_ratio_intervals": 1,
    }
    for key in ("prefill_local_window_size", "generate_local_window_size"):
        if key in raw:
            out[key] = max(1, raw[key] // SHRINK)
    for key in ("prefill_loc_win_size_list", "generate_win_loc_size_list"):
        if key in raw:
            out[key] = [max(1, raw[key][i] // SHRINK) for i in keep_layers(len(raw[key]), layers)]
    return out


def keep_layers(total: int, layers: int) -> list:
    """Which original layers a shrunken model keeps: first, second, middle, last (H/HT/HMT stay visible)."""
    if layers >= total:
        return list(range(total))
    picks = [0, 1, total // 2 - 1, total - 1][:layers] if layers <= 4 else list(range(layers - 1)) + [total - 1]
    return sorted(set(picks))


def load(mode: Path, corpus: str, tokenizer: Path, layers: int = 4, char_level: bool = False):
    """The composed config (model + mode + Pile data + local launch), shrunken; ``char_level`` swaps the
    50k-token Pythia vocabulary for the byte-level one so that CPU steps are cheap (the Pythia separator
    ids are all below 256, so the SepLLM layout is unchanged)."""
    from megatron.neox_arguments import NeoXArgs

    files = [_model_file(mode), mode, CONFIGS / "data" / "pile-deduped.yml", CONFIGS / "launch" / "local.yml"]
    over = shrink_overrides(mode, corpus, tokenizer, layers)
    if char_level:
        over.update(tokenizer_type="CharLevelTokenizer", vocab_file=None)
    return NeoXArgs.from_ymls([str(f) for f in files], overrides=over)


@pytest.mark.parametrize("mode", MODES, ids=[m.stem for m in MODES])
def test_config_loads_and_trains_three_steps(mode, corpus, pythia_tokenizer_path):
    from megatron.model.layer_list import build_sequential_model

    load(mode, corpus, pythia_tokenizer_path)  # as written: Pythia tokenizer
    args = load(mode, corpus, pythia_tokenizer_path, char_level=True)
    variant = args.attention_variant
    expected = ("full" if "vanilla" in mode.name else "streamingllm" if "streaming" in mode.name else
                "sa_softmax" if mode.name.startswith("sa-") else
                "sepllm_mask" if "NOkernel" in mode.name else "sep_kernel")
    assert variant == expected
    if variant in ("sep_kernel", "sepllm_mask"):
        assert args.separator_token_ids == PYTHIA_SEPS
    torch.manual_seed(0)
    model = build_sequential_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(33, 250, (2, SEQ + 1), generator=gen)
    tokens[torch.rand(tokens.shape, generator=gen) < 0.2] = 13
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    losses = []
    for _ in range(3):
        logits = model((inputs, positions, None))
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sepllm-160m-n64H-NOkernel", "sepllm-160m-n64HT-kernel-recompile_alibiBiPE",
                                  "streamingllm-160m-n64", "sa-160m-softmax"])
def test_config_trains_through_deepy(name, corpus, pythia_tokenizer_path, tmp_path):
    mode = CONFIGS / "sepllm" / f"{name}.yml"
    over = shrink_overrides(mode, corpus, pythia_tokenizer_path, 2)
    run_cfg = tmp_path / "run.yml"
    run_cfg.write_text(yaml.safe_dump({**over, "save": str(tmp_path / "ckpt"), "checkpoint_factor": 3}))
    # A key may appear in only one composed file, so the shrunken values are merged with the model, mode and
    # data files here into one run file.
    merged = {}
    for f in (_model_file(mode), mode, CONFIGS / "data" / "pile-deduped.yml"):
        merged.update(yaml.safe_load(f.read_text()))
    merged = {k.replace("-", "_"): v for k, v in merged.items()}
    merged.update(yaml.safe_load(run_cfg.read_text()))
    merged = {k: v for k, v in merged.items() if v is not None}
    single = tmp_path / "merged.yml"
    single.write_text(yaml.safe_dump(merged))
    cmd = [sys.executable, str(REPO / "deepy.py"), "--num_gpus", "1", "train.py", str(single)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "iteration        3/" in proc.stdout or "iteration 3/" in proc.stdout.replace("  ", " "), proc.stdout[-3000:]
    assert (tmp_path / "ckpt" / "latest").exists()
