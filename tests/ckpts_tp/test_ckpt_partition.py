"""The tensor-parallel table of megatron/checkpoint_partition.py: split and merge are inverse on random tensors
(bitwise, every rule, TP 2 and 4), the table agrees with the model_parallel / partition_dim / partition_sizes flags
the mpu layers put on a built TP=2 model, and a size-1 model split by the table computes, at TP=2, the logits of
the size-1 model (biases and norms perturbed, so a wrong bias or norm rule shows), while the TP=2 model's shards
merged by the table give back the size-1 state bit for bit."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))
import tp_harness as h  # noqa: E402

from megatron import checkpoint_partition as cp  # noqa: E402
from megatron.checkpoint_io import CheckpointError  # noqa: E402

ARGS = SimpleNamespace(num_attention_heads=8, num_kv_heads=2, hidden_size=32, mlp_inner_size=48, gpt_j_residual=True)
NAMES = ("word_embeddings.weight", "position_embeddings.weight", "input_layernorm.weight", "norm.scale",
         "attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight",
         "attention.dense.bias", "mlp.linear1.weight", "mlp.linear2.weight", "mlp.linear2.bias",
         "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight", "final_linear.weight")
SHAPES = {"word_embeddings.weight": (64, 32), "position_embeddings.weight": (16, 32), "input_layernorm.weight": (32,),
          "norm.scale": (32,), "attention.query_key_value.weight": (48, 32), "attention.query_key_value.bias": (48,),
          "attention.dense.weight": (32, 32), "attention.dense.bias": (32,), "mlp.linear1.weight": (96, 32),
          "mlp.linear2.weight": (32, 48), "mlp.linear2.bias": (32,), "mlp.dense_h_to_4h.weight": (48, 32),
          "mlp.dense_4h_to_h.weight": (32, 48), "final_linear.weight": (64, 32)}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("gpt_neox", [False, True])
def test_split_then_merge_is_identity(tp, gpt_neox):
    gen = torch.Generator().manual_seed(tp)
    for name in NAMES:
        full = torch.randn(SHAPES[name], generator=gen)
        rule = cp.tensor_rule(name, ARGS, gpt_neox)
        shards = cp.split(full, rule, tp, name)
        assert len(shards) == tp
        assert torch.equal(cp.merge(shards, rule, name), full), name
        assert [tuple(s.shape) for s in cp.split(cp.merge(shards, rule, name), rule, tp, name)] == \
            [tuple(s.shape) for s in shards]


def test_rules_by_hand():
    """The GQA QKV [q | k | v] (q 32 rows, k and v 8): rank r holds q rows 16r.., k rows 32+4r.., v rows 40+4r..;
    a GPT-NeoX parallel-residual bias is the sum of the ranks' copies, this trainer's is one copy."""
    full = torch.arange(48.0)
    qkv = cp.split(full, cp.tensor_rule("attention.query_key_value.bias", ARGS), 2, "qkv")
    assert qkv[1].tolist() == list(range(16, 32)) + list(range(36, 40)) + list(range(44, 48))
    gated = cp.split(torch.arange(96.0), cp.tensor_rule("mlp.linear1.bias", ARGS), 2, "linear1")
    assert gated[0].tolist() == list(range(0, 24)) + list(range(48, 72))
    row = cp.split(torch.arange(6.0).reshape(1, 6), cp.tensor_rule("attention.dense.weight", ARGS), 2, "dense")
    assert row[1].tolist() == [[3.0, 4.0, 5.0]]
    bias = torch.tensor([1.0, 2.0])
    assert cp.merge([bias, bias], cp.tensor_rule("attention.dense.bias", ARGS, gpt_neox=True), "b").tolist() == [2, 4]
    assert cp.merge([bias, bias], cp.tensor_rule("attention.dense.bias", ARGS), "b").tolist() == [1, 2]
    sequential = SimpleNamespace(**{**vars(ARGS), "gpt_j_residual": False})
    assert cp.tensor_rule("attention.dense.bias", sequential, gpt_neox=True).kind == cp.REPLICATED
    assert cp.resize_vocab(torch.ones(3, 2), 5)[3:].eq(0).all() and cp.resize_vocab(torch.ones(5, 2), 3).shape == (3, 2)


def test_bad_input_is_named():
    with pytest.raises(CheckpointError, match="tensor 'attention.rotary_emb.inv_freq' has no tensor-parallel rule"):
        cp.tensor_rule("attention.rotary_emb.inv_freq", ARGS)
    with pytest.raises(CheckpointError, match="tensor 'mlp.dense_h_to_4h.weight': .*not divisible .* size 5"):
        cp.split(torch.zeros(48, 32), cp.tensor_rule("mlp.dense_h_to_4h.weight", ARGS), 5, "mlp.dense_h_to_4h.weight")
    with pytest.raises(CheckpointError, match="different shapes"):
        cp.merge([torch.zeros(2), torch.zeros(3)], cp.Rule(cp.COLUMN), "x")
    with pytest.raises(CheckpointError, match="has 40 rows, the config implies 48"):
        cp.split(torch.zeros(40, 32), cp.tensor_rule("attention.query_key_value.weight", ARGS), 2, "qkv")


# ------------------------------------------------------------------------------- against the built model
CASES = {"gelu_parallel_residual_untied": {"USE_ORIGINAL_FULL_ATTEN": True},
         "gqa_swiglu_bias_sequential_tied": {"USE_ORIGINAL_FULL_ATTEN": True, "num_kv_heads": 2, "activation": "swiglu",
                                             "mlp_multiple_of": 16, "intermediate_size": 160, "norm": "rmsnorm",
                                             "use_bias_in_attn_linear": True, "use_bias_in_mlp": True,
                                             "gpt_j_residual": False, "no_weight_tying": False,
                                             "pos_emb": "learned"}}


def _layers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        _, idx, name = key.split(".", 2)
        out.setdefault(int(idx), {})[name] = value
    return out


def _flat(layers: dict) -> dict:
    return {f"sequential.{idx}.{name}": t for idx, state in layers.items() for name, t in state.items()}


def _agree(rank, world):
    from megatron import mpu
    from megatron.model import build_sequential_model

    for name, keys in CASES.items():
        mpu.destroy_model_parallel()
        torch.manual_seed(11)
        ref_args = h.make_args(1, world, **keys)
        ref = build_sequential_model(ref_args, parallel_output=False).eval()
        with torch.no_grad():  # non-trivial norms and biases: a wrong rule for them changes the logits
            for pname, p in ref.named_parameters():
                if "norm" in pname or pname.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        ids = h.tokens(2, 24, 128, seed=3)
        pos = torch.arange(24).expand(2, -1)
        with torch.no_grad():
            want = ref((ids, pos))
        h.init_grid(world)
        args = h.make_args(world, world, **keys)
        model = build_sequential_model(args, parallel_output=False).eval()
        full = _layers(ref.state_dict())
        for pname, p in model.named_parameters():
            _, idx, tname = pname.split(".", 2)
            rule = cp.tensor_rule(tname, args)
            flagged = bool(getattr(p, "model_parallel", False))
            assert flagged == (rule.partition_dim is not None), (name, pname, rule)
            if flagged:
                size = full[int(idx)][tname].shape[rule.partition_dim]
                assert (p.partition_dim, tuple(p.partition_sizes)) == (rule.partition_dim, cp._segments(rule, size, tname)), \
                    (name, pname, rule, p.partition_dim, p.partition_sizes)
        tp_rank = mpu.get_model_parallel_rank()
        mine = {idx: cp.split_layer(state, args, world)[tp_rank] for idx, state in full.items()}
        model.load_state_dict(_flat(mine), strict=True)
        with torch.no_grad():
            got = model((ids, pos))
        assert h.rel_err(got, want) <= 1e-5, (name, rank, h.rel_err(got, want))
        every = [None] * world
        torch.distributed.all_gather_object(every, _layers(model.state_dict()))
        merged = {idx: cp.merge_layer([ranks[idx] for ranks in every], args) for idx in full}
        for idx, state in full.items():
            assert set(merged[idx]) == set(state), (name, idx)
            for tname, tensor in state.items():
                assert torch.equal(merged[idx][tname], tensor), (name, idx, tname)


@pytest.mark.deepspeed
def test_table_agrees_with_the_mpu_layers_and_their_forward():
    h.run_ranks(_agree, 2)


def test_universal_checkpoint_info_classifies_every_parameter_as_the_table_does():
    """DeepSpeed's converter takes a parameter matching no pattern for column-parallel (dim 0): every parameter
    lands in the category of its rule, and no pattern matches nothing (the converter refuses unused ones)."""
    import re

    from deepspeed.checkpoint import constants as ds

    for keys in CASES.values():
        args = h.make_args(1, 1, **keys)
        from megatron.model import build_sequential_model

        names = [n for n, _ in build_sequential_model(args).named_parameters()]
        info = cp.universal_checkpoint_info(args, names)
        categories = {"replicated": info[ds.TP_REPLICATED_PARAMETER_PATTERNS],
                      "row": info[ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS],
                      "vocab": info[ds.VOCABULARY_PARAMETER_PATTERNS],
                      "fused": [p for s in info[ds.PARAMETER_WITH_SUB_PARAMS] for p in s["patterns"]]}
        for patterns in categories.values():
            assert all(any(re.match(p, n) for n in names) for p in patterns), patterns
        for name in names:
            kind = cp.tensor_rule(name.split(".", 2)[2], args).kind
            found = [c for c, patterns in categories.items() if any(re.match(p, name) for p in patterns)]
            assert found == ([] if kind == cp.COLUMN else [kind]), (name, kind, found)
        for sub in info[ds.PARAMETER_WITH_SUB_PARAMS]:
            assert info[ds.SUB_PARAM_SHARD_WIDTHS][sub["patterns"][0]] == [[n] for n in sub["shape"][0]]
