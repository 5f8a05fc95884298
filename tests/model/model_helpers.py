"""Small configurations and helpers shared by the model tests (imported as ``model_helpers``)."""
import torch

BASE = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
    padded_vocab_size=128, pos_emb="rotary", rotary_pct=0.25, rotary_emb_base=10000, gpt_j_residual=True,
    norm="layernorm", layernorm_epsilon=1e-5, no_weight_tying=True, init_method="small_init",
    output_layer_init_method="wang_init", hidden_dropout=0.0, attention_dropout=0.0,
    USE_ORIGINAL_FULL_ATTEN=True, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, train_micro_batch_size_per_gpu=2,
)


def make_args(**overrides):
    """A validated ``NeoXArgs`` for a tiny GPT-NeoX model (keys as YAML would give them)."""
    from megatron.neox_arguments import NeoXArgs

    return NeoXArgs.from_dict({**BASE, **overrides})


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Replaces every parameter by random values so norms/biases are not the trivial 1/0 of a fresh init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
