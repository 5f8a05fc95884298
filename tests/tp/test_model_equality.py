"""The model at tensor-parallel size 2 (and 4) computes what the size-1 model computes: logits, loss and every
gradient (each rank's shard of the size-1 gradient), for both residuals, tied and untied output, grouped-query
attention with the gated MLP, and every attention mode. Dropout off, same seed; fp32, 1e-5 relative."""
import pytest
import torch

import tp_harness as h

pytestmark = pytest.mark.deepspeed

CASES = {
    "full_parallel_residual_untied": {"USE_ORIGINAL_FULL_ATTEN": True},
    "full_sequential_residual_tied": {"USE_ORIGINAL_FULL_ATTEN": True, "gpt_j_residual": False,
                                      "no_weight_tying": False},
    "full_gpt_j_tied_learned_pos": {"USE_ORIGINAL_FULL_ATTEN": True, "gpt_j_tied": True, "pos_emb": "learned"},
    "full_alibi": {"USE_ORIGINAL_FULL_ATTEN": True, "pos_emb": "alibi"},
    "gqa_swiglu_bias": {"USE_ORIGINAL_FULL_ATTEN": True, "num_kv_heads": 2, "activation": "swiglu",
                        "mlp_multiple_of": 16, "intermediate_size": 160, "norm": "rmsnorm",
                        "use_bias_in_attn_linear": True, "use_bias_in_mlp": True},
    "gqa8_kv4_swiglu": {"USE_ORIGINAL_FULL_ATTEN": True, "num_attention_heads": 8, "num_kv_heads": 4,
                        "activation": "swiglu", "mlp_multiple_of": 16, "intermediate_size": 160, "norm": "rmsnorm"},
    **{mode: "mode" for mode in ("sepllm_mask", "sepllm_kernel", "streamingllm", "fixllm", "sa_softmax",
                                 "sa_softmax_no_deno", "bipe_rotary", "bipe_alibi")},
}


def case_keys(name):
    keys = CASES[name]
    return h.mode_keys(name) if keys == "mode" else dict(keys)


def _forward_backward(model, ids, parallel: bool):
    from megatron import mpu
    from megatron.model.loss import lm_loss

    model.zero_grad(set_to_none=True)
    pos = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
    logits = model((ids[:, :-1], pos))
    mask = torch.ones_like(ids[:, 1:], dtype=torch.float32)
    mask[0, :3] = 0.0
    loss = lm_loss(logits, ids[:, 1:], mask)
    loss.backward()
    full = mpu.gather_from_model_parallel_region(logits.detach()) if parallel else logits.detach()
    return full, loss.detach()


def _compare_cases(rank, world, tp, names, tol):
    from megatron import mpu
    from megatron.model import build_sequential_model

    topo = None
    for name in names:
        keys = case_keys(name)
        mpu.destroy_model_parallel()
        torch.manual_seed(7)
        ref = build_sequential_model(h.make_args(1, world, **keys), parallel_output=False)
        ids = h.tokens(2, 25, 128, seed=3)
        # The size-1 model runs before the grid exists (the loss and tied logits read the current grid).
        ref_logits, ref_loss = _forward_backward(ref, ids, parallel=False)
        topo = h.init_grid(tp)
        torch.manual_seed(7)
        model = build_sequential_model(h.make_args(tp, world, **keys), parallel_output=True)
        logits, loss = _forward_backward(model, ids, parallel=True)
        errors = {"logits": h.rel_err(logits, ref_logits), "loss": h.rel_err(loss, ref_loss)}
        ref_params = dict(ref.named_parameters())
        tp_rank = mpu.get_model_parallel_rank()
        for pname, p in model.named_parameters():
            full = ref_params[pname]
            errors[f"{pname}.value"] = h.rel_err(p, h.shard_like(full, p, tp, tp_rank))
            if p.grad is None and full.grad is None:  # unused in both (gpt_j_tied: post_attention_layernorm)
                continue
            errors[f"{pname}.grad"] = h.rel_err(p.grad, h.shard_like(full.grad, p, tp, tp_rank))
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"{name} rank {rank}: {bad}"
        # Only whole heads were split: the sharded QKV matches its reference shard exactly at init.
    del topo


@pytest.mark.parametrize("tp", [2])
def test_tp_equals_size_one_every_case(tp):
    h.run_ranks(_compare_cases, tp, tp, list(CASES), 1e-5)


def test_tp4_equals_size_one():
    h.run_ranks(_compare_cases, 4, 4, ["gqa8_kv4_swiglu", "sepllm_mask", "bipe_alibi"], 1e-5)


def _untied_and_tied_gather(rank, world):
    """``parallel_output=False`` gives every rank the whole vocabulary (generation, evaluation tools)."""
    from megatron import mpu
    from megatron.model import build_sequential_model

    for tied in (False, True):
        keys = {"USE_ORIGINAL_FULL_ATTEN": True, "no_weight_tying": not tied}
        mpu.destroy_model_parallel()
        torch.manual_seed(5)
        ref = build_sequential_model(h.make_args(1, world, **keys))
        ids = h.tokens(2, 24, 128, seed=1)
        pos = torch.arange(24).expand(2, -1)
        with torch.no_grad():
            want = ref((ids, pos))
        h.init_grid(world)
        torch.manual_seed(5)
        model = build_sequential_model(h.make_args(world, world, **keys), parallel_output=False)
        with torch.no_grad():
            out = model((ids, pos))
        assert out.shape == want.shape == (2, 24, 128)
        assert h.rel_err(out, want) <= 1e-5, (tied, h.rel_err(out, want))


def test_unparallel_output_is_gathered():
    h.run_ranks(_untied_and_tied_gather, 2)


def _one_reduce_twin(rank, world):
    """The parallel residual's single all-reduce (dropout off) against its twin, each branch reduced by its own
    row-parallel layer: same logits and gradients on random weights and tokens."""
    from megatron.model import build_sequential_model
    from megatron.model.transformer import ParallelTransformerLayer

    h.init_grid(world)
    for keys in ({"USE_ORIGINAL_FULL_ATTEN": True, "use_bias_in_attn_linear": True},
                 {**h.mode_keys("sepllm_mask"), "activation": "swiglu", "mlp_multiple_of": 16,
                  "intermediate_size": 160, "num_kv_heads": 2}):
        results = []
        for one_reduce in (True, False):
            torch.manual_seed(9)
            model = build_sequential_model(h.make_args(world, world, **keys), parallel_output=True)
            layers = [m for m in model.modules() if isinstance(m, ParallelTransformerLayer)]
            assert layers and all(m.one_reduce for m in layers)
            for m in layers:
                m.one_reduce = one_reduce
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
            logits, loss = _forward_backward(model, h.tokens(2, 25, 128, seed=4), parallel=True)
            results.append((logits, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (a, ga), (b, gb) = results
        assert h.rel_err(a, b) < 1e-5 and all(h.rel_err(x, y) < 1e-5 for x, y in zip(ga, gb))


def test_parallel_residual_single_reduce_equals_two():
    h.run_ranks(_one_reduce_twin, 2)


def _recompute(rank, world):
    """Attention dropout at TP=2 under activation checkpointing: the recomputed blocks draw the masks their forward
    drew: the same gradients as without checkpointing."""
    from megatron import mpu
    from megatron.model import build_sequential_model

    h.init_grid(world)
    grads = []
    for interval in (0, 1):
        keys = {"USE_ORIGINAL_FULL_ATTEN": True, "attention_dropout": 0.3, "gpt_j_residual": False,
                "checkpoint_activations": interval > 0, "checkpoint_num_layers": max(interval, 1)}
        torch.manual_seed(21)
        mpu.model_parallel_seed(21, mpu.get_model_parallel_rank(), world, "cpu")
        model = build_sequential_model(h.make_args(world, world, **keys), parallel_output=True)
        model.train()
        logits, loss = _forward_backward(model, h.tokens(2, 25, 128, seed=6), parallel=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_attention_dropout_replayed_in_recomputation():
    h.run_ranks(_recompute, 2)
