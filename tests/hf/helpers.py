"""Shared helpers of the HF tests: tiny trainer models, checkpoints of both layouts, exports."""
import os
from pathlib import Path

import torch
import yaml

from megatron.hf.export import export

SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def base_config(vocab_file, **overrides):
    """A tiny Pythia-shaped config (2 layers, hidden 32) in GPT-NeoX YAML key form."""
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
               pos_emb="rotary", rotary_pct=0.5, gpt_j_residual=True, no_weight_tying=True, norm="layernorm",
               tokenizer_type="HFTokenizer", vocab_file=str(vocab_file), train_micro_batch_size_per_gpu=1,
               precision="fp32", USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    cfg.update(overrides)
    return cfg


def build_trainer_model(cfg, seed=0):
    from megatron.model.layer_list import build_sequential_model
    from megatron.neox_arguments import NeoXArgs

    args = NeoXArgs.from_dict(dict(cfg))
    torch.manual_seed(seed)
    model = build_sequential_model(args).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return args, model


def trainer_logits(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model((ids, pos, None)).float()


def save_checkpoint(model, cfg, ckpt_dir: Path, layout="sequential", tp=1, resolved_args=None):
    """Writes ``ckpt_dir`` in the documented layout (tp > 1 splits the tensors like Megatron's TP ranks);
    ``resolved_args`` (a NeoXArgs) adds ``configs/resolved_config.yml`` as training writes it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "configs").mkdir(exist_ok=True)
    with open(ckpt_dir / "configs" / "model.yml", "w") as handle:
        yaml.safe_dump(cfg, handle)
    if resolved_args is not None:
        resolved_args.save_resolved(str(ckpt_dir / "configs" / "resolved_config.yml"))
    sd = model.state_dict()
    if layout == "sequential":
        torch.save({"module": sd, "iteration": 1}, ckpt_dir / "mp_rank_00_model_states.pt")
        return ckpt_dir
    layers = {}
    for key, value in sd.items():
        _, idx, name = key.split(".", 2)
        layers.setdefault(int(idx), {})[name] = value
    for idx, state in layers.items():
        for rank in range(tp):
            torch.save(split_tp(state, rank, tp, cfg.get("gpt_j_residual", False)),
                       ckpt_dir / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
    torch.save({"module": None, "iteration": 1}, ckpt_dir / "mp_rank_00_model_states.pt")
    return ckpt_dir


def split_tp(state, rank, tp, parallel_residual):
    """One TP rank's shard: column-parallel on dim 0, row-parallel on dim 1, row biases split/replicated."""
    out = {}
    for name, t in state.items():
        if any(name.startswith(p) for p in ("attention.query_key_value", "mlp.dense_h_to_4h", "word_embeddings",
                                             "final_linear")):
            out[name] = t.chunk(tp, 0)[rank].clone()
        elif name in ("attention.dense.weight", "mlp.dense_4h_to_h.weight"):
            out[name] = t.chunk(tp, 1)[rank].clone()
        elif name in ("attention.dense.bias", "mlp.dense_4h_to_h.bias"):
            out[name] = (t / tp).clone() if parallel_residual else t.clone()
        else:
            out[name] = t.clone()
    return out


def make_export(tmp_path: Path, cfg, architecture="sepllm_gpt_neox", layout="sequential", tp=1, seed=0,
                precision="fp32"):
    args, model = build_trainer_model(cfg, seed)
    ckpt = save_checkpoint(model, cfg, tmp_path / f"ckpt_{layout}", layout, tp)
    out = export(str(ckpt), None, str(tmp_path / f"hf_{architecture}"), precision, architecture, True)
    return model, out


def random_ids(bsz, seq, seed=1, vocab=300, sep_rate=0.2):
    """Random token ids with many separators (and no id 0, the Pythia padding id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (bsz, seq), generator=g)
    seps = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (bsz, seq), generator=g)]
    return torch.where(torch.rand(bsz, seq, generator=g) < sep_rate, seps, ids)
