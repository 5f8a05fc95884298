"""End-to-end training throughput: Pythia-160M shape, SepLLM n64 (Sep-Attention kernel) vs full attention.

Both modes run in one process on the same real-text token windows, same model, same optimizer (plain torch
AdamW, bf16 autocast over float32 weights), same step count; the script prints tokens/s per mode and the
ratio SepLLM / full at each sequence length. The model is a self-contained GPT-NeoX-shaped network (12 layers,
hidden 768, 12 heads, rotary on 25% of the head dim, parallel residual, untied 50304-token output layer), so
the benchmark measures the attention swap alone, independent of the framework's trainer.

    python bench/bench_e2e_sepllm.py --tokens data/sep_bench/tokens.npy     # token file: see bench_sep_attention.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.model.sepllm.kernel import build_sep_metadata, sep_attention  # noqa: E402

PYTHIA_SEPARATOR_IDS = (15, 13, 32, 2, 28, 27, 209, 186, 187)


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first ``rot_dim`` channels of each head (rotate-half convention)."""

    def __init__(self, rot_dim: int, base: float = 10000.0):
        super().__init__()
        self.rot_dim = rot_dim
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim), persistent=False)

    def tables(self, seq: int, device, dtype):
        """cos/sin tables ``[S, rot_dim]``, computed once per forward and shared by every layer."""
        freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [B, H, S, D]
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        half = self.rot_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Layer(nn.Module):
    """One GPT-NeoX layer with the parallel (GPT-J) residual: x + Attn(LN1(x)) + MLP(LN2(x))."""

    def __init__(self, hidden: int, heads: int, rotary: Rotary):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(hidden, eps=1e-5)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=1e-5)
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.dense_4h_to_h = nn.Linear(4 * hidden, hidden)
        self.rotary = rotary

    def forward(self, x, attend, cos, sin):
        bsz, seq, hidden = x.shape
        qkv = self.query_key_value(self.input_layernorm(x)).view(bsz, seq, self.heads, 3, hidden // self.heads)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [B, H, S, D]
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        ctx = attend(q, k, v).transpose(1, 2).reshape(bsz, seq, hidden)
        mlp = self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x))))
        return x + self.dense(ctx) + mlp


class TinyNeoX(nn.Module):
    def __init__(self, layers=12, hidden=768, heads=12, vocab=50304, rotary_pct=0.25):
        super().__init__()
        rotary = Rotary(int(hidden // heads * rotary_pct))
        self.rotary = rotary
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, heads, rotary) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.final_linear = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, attend):
        x = self.word_embeddings(ids)
        cos, sin = self.rotary.tables(ids.shape[1], ids.device, torch.get_autocast_dtype("cuda"))
        for layer in self.layers:
            x = layer(x, attend, cos, sin)
        return self.final_linear(self.norm(x))


def make_attend(mode: str, ids: torch.Tensor, window: int, n_init: int):
    """The attention callable of one micro-batch; SepLLM metadata is built here once for all layers."""
    if mode == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    flags = torch.isin(ids, torch.tensor(PYTHIA_SEPARATOR_IDS, device=ids.device))
    init_start = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    meta = build_sep_metadata(flags, init_start, n_init)
    return lambda q, k, v: sep_attention(q, k, v, flags, init_start, n_init, window, meta=meta)


def run_mode(mode, batches, args) -> tuple[float, float]:
    torch.manual_seed(0)
    model = TinyNeoX().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    times, losses = [], []
    for step, batch in enumerate(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        inp, tgt = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inp, make_attend(mode, inp, args.window, args.n_init))
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
        losses.append(loss.item())
    tokens = batches[0].shape[0] * (batches[0].shape[1] - 1)
    del model, opt
    torch.cuda.empty_cache()
    return tokens / statistics.median(times), losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/sep_bench/tokens.npy")
    parser.add_argument("--seqs", default="2048:8,8192:2", help="seq:micro_batch pairs")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e_sepllm.py needs a CUDA GPU")
    if not os.path.exists(args.tokens):
        raise SystemExit(f"--tokens {args.tokens} not found (make it with bench/bench_sep_attention.py --prepare-text)")
    tokens = np.load(args.tokens).astype(np.int64)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; Pythia-160M shape, bf16 autocast, AdamW; "
          f"SepLLM n{args.window} a={args.n_init}; median step of {args.steps - args.warmup}")
    print("seq | micro-batch | full tok/s | sepllm tok/s | sepllm/full | loss full | loss sepllm")
    for pair in args.seqs.split(","):
        seq, mbs = (int(x) for x in pair.split(":"))
        need = mbs * (seq + 1)
        batches = []
        for step in range(args.steps):
            off = (step * need) % max(1, tokens.size - need)
            window = np.resize(tokens[off:], need) if tokens.size < off + need else tokens[off: off + need]
            batches.append(torch.from_numpy(window.reshape(mbs, seq + 1)).cuda())
        full_tps, full_loss = run_mode("full", batches, args)
        sep_tps, sep_loss = run_mode("sepllm", batches, args)
        print(f"{seq} | {mbs} | {full_tps:,.0f} | {sep_tps:,.0f} | {sep_tps / full_tps:.3f} | {full_loss:.3f} | "
              f"{sep_loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
