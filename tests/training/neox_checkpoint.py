"""A checkpoint in GPT-NeoX's exact layout, synthesised with torch.save.

Source: GPT-NeoX's megatron/checkpointing.py at commit NEOX_COMMIT. Its save_ds_checkpoint hands DeepSpeed
``client_state = {"iteration", "args": {8 model keys}, "random_rng_state", "np_rng_state", "torch_rng_state",
"cuda_rng_state", "rng_tracker_states"}`` and ``tag="global_step<N>"``; DeepSpeed (0.19.8 here, the version
both projects run) writes ``mp_rank_00_model_states.pt`` (its own keys, listed in DEEPSPEED_KEYS, plus the
client state), one ``layer_XX-model_00-model_states.pt`` per pipeline layer holding that layer's state dict,
the ZeRO shards, and ``latest``; GPT-NeoX then copies its config files into ``configs/``. Layer tensor names
are GPT-NeoX's own (megatron/model/transformer.py, word_embeddings.py, gpt2_model.py at that commit): since
0d4bdb96 every MLP is ``mlp.linear1`` / ``mlp.linear2``. Written here by hand, not from this project's model.
"""
import os
import random

import numpy as np
import torch

NEOX_COMMIT = "ea7aefd8f8e183256992d9fede4d7c71a46d67a5"

# DeepSpeed's keys in mp_rank_00_model_states.pt of a pipeline engine (engine._save_checkpoint, 0.19.8).
DEEPSPEED_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                  "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                  "checkpoint_parallel_dimensions", "ds_config", "ds_version")
# What GPT-NeoX's load_checkpoint reads from the client state (besides DeepSpeed's own keys).
NEOX_LOAD_KEYS = ("iteration", "args", "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
                  "rng_tracker_states")
NEOX_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
             "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "model_parallel_size")


def neox_layer_states(layers: int, hidden: int, vocab: int, ffn: int = None, gen=None) -> dict:
    """``{pipeline index: state dict}`` of an untied Pythia-shaped GPT-NeoX model (LayerNorm, biases, gelu)."""
    ffn = ffn or 4 * hidden
    gen = gen or torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    states = {0: {"word_embeddings.weight": t(vocab, hidden)}}
    for i in range(layers):
        states[2 + i] = {
            "input_layernorm.weight": 1 + t(hidden), "input_layernorm.bias": t(hidden),
            "attention.query_key_value.weight": t(3 * hidden, hidden), "attention.query_key_value.bias": t(3 * hidden),
            "attention.dense.weight": t(hidden, hidden), "attention.dense.bias": t(hidden),
            "post_attention_layernorm.weight": 1 + t(hidden), "post_attention_layernorm.bias": t(hidden),
            "mlp.linear1.weight": t(ffn, hidden), "mlp.linear1.bias": t(ffn),
            "mlp.linear2.weight": t(hidden, ffn), "mlp.linear2.bias": t(hidden)}
    states[layers + 3] = {"norm.weight": 1 + t(hidden), "norm.bias": t(hidden)}
    states[layers + 4] = {"final_linear.weight": t(vocab, hidden)}
    return states


def neox_client_state(iteration: int, args: dict, seed: int = 1234) -> dict:
    """GPT-NeoX's save_ds_checkpoint ``sd`` (RNG states as a CUDA run would have them)."""
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    cuda = torch.tensor(list(seed.to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)
    tracker = torch.tensor(list((seed + 2718).to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)
    return {"iteration": iteration, "args": {k: args[k] for k in NEOX_ARGS},
            "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda,
            "rng_tracker_states": {"model-parallel-rng": tracker}}


def deepspeed_keys(iteration: int, batch: int, zero_stage: int = 0, lr_scheduler: dict = None) -> dict:
    """DeepSpeed's own entries of a pipeline engine's mp_rank_00 file (data parallel 1, no optimizer kept)."""
    return {"module": None, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
            "lr_scheduler": lr_scheduler, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
            "global_steps": iteration, "global_samples": iteration * batch, "dp_world_size": 1, "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": {"train_batch_size": batch, "zero_optimization": {"stage": zero_stage}},
            "ds_version": "0.19.8"}


def write_neox_checkpoint(save_dir: str, iteration: int, layer_states: dict, mp_state: dict,
                          config_files: dict = None) -> str:
    """Writes ``<save_dir>/global_step<N>`` and ``latest`` as GPT-NeoX + DeepSpeed do; returns the step dir."""
    tag = f"global_step{iteration}"
    step = os.path.join(save_dir, tag)
    os.makedirs(os.path.join(step, "configs"), exist_ok=True)
    for idx, state in layer_states.items():
        torch.save(state, os.path.join(step, f"layer_{idx:02d}-model_00-model_states.pt"))
    torch.save(mp_state, os.path.join(step, "mp_rank_00_model_states.pt"))
    for name, text in (config_files or {"neox.yml": "{}\n"}).items():
        with open(os.path.join(step, "configs", name), "w") as f:
            f.write(text)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)
    return step
