"""Tiny random stock models of every supported family (built from configs, no hub), and brute-force SepLLM masks
written from the reference's predicate with loops (tests/sepllm/brute.py), for the training-free tests."""
import torch
from transformers import AutoModelForCausalLM, FalconConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

from tests.sepllm import brute

VOCAB = 48
SEPS = [3, 7]  # tests/sepllm/brute.SEPS
PAD = brute.PAD
FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox", "falcon", "falcon_alibi"]


def family_config(name: str, layers: int = 2, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256)
    if name == "llama":
        return LlamaConfig(num_key_value_heads=2, intermediate_size=48, **common)
    if name == "mistral":
        return MistralConfig(num_key_value_heads=2, intermediate_size=48, sliding_window=None, **common)
    if name == "qwen2":
        return Qwen2Config(num_key_value_heads=2, intermediate_size=48, **common)
    if name == "gpt_neox":
        return GPTNeoXConfig(intermediate_size=48, rotary_pct=0.5, **common)
    if name in ("falcon", "falcon_alibi"):
        return FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            new_decoder_architecture=False, multi_query=True, alibi=name == "falcon_alibi",
                            bias=True)
    raise ValueError(name)


def tiny_model(name: str, impl: str = "eager", layers: int = 2, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, layers, vocab), attn_implementation=impl).eval()
    with torch.no_grad():  # biases and norms off their defaults, so a misplaced mask cannot cancel out
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_ids(bsz: int, seq: int, seed: int, pad_left=None):
    gen = torch.Generator().manual_seed(seed)
    return brute.random_ids(bsz, seq, gen, pad_left=pad_left)  # ids < 12: about one in six a separator


def brute_mask(ids, num_init, window, exclude_diagonal=True, mode="sepllm", adaptive=False, interval=None,
               valid=None):
    """``[B, S, S]`` allowed mask by loops, padding keys hidden (the diagonal kept), as the rule module promises."""
    seps = SEPS if mode == "sepllm" else []
    mask = brute.prefill_mask(ids, num_init, window, exclude_diagonal, seps=seps, adaptive=adaptive,
                              interval=interval if mode == "fixllm" else None)
    if valid is not None:
        bsz, seq = ids.shape
        for b in range(bsz):
            for q in range(seq):
                for k in range(seq):
                    if not bool(valid[b, k]) and k != q:
                        mask[b, q, k] = False
    return mask


def additive(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` float32 mask for a stock eager model (0 where allowed, the dtype's min elsewhere)."""
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]


def sepllm_config(layers: int = 2, **overrides):
    cfg = dict(Layer_num=layers, separator_token_ids=list(SEPS), PADDING_ID=PAD, prefill_local_window_size=4,
               generate_local_window_size=4, init_tok_max_idx=1, BATCH_ADAPTIVE_INIT_POS=False, PRINT_KV_RATIO=False)
    cfg.update(overrides)
    return cfg
