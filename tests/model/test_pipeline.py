"""GPT2ModelPipe as a DeepSpeed PipelineModule: GPT-NeoX layer layout, parameter names, to_sequential,
activation checkpointing."""
import pytest
import torch

from model_helpers import make_args, randomize_


@pytest.fixture(scope="module")
def GPT2ModelPipe(ds_dist):
    from megatron.model import GPT2ModelPipe

    return GPT2ModelPipe


def _inputs(args, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.padded_vocab_size, (batch, args.seq_length), generator=gen)
    return ids, torch.arange(args.seq_length).expand(batch, -1)


def test_layer_layout_and_parameter_names(GPT2ModelPipe):
    args = make_args(num_layers=3)
    model = GPT2ModelPipe(args)
    kinds = [getattr(f, "__name__", type(f).__name__) for f in model.forward_funcs]
    assert kinds == ["EmbeddingPipe", "pre_transformer_block"] + ["ParallelTransformerLayerPipe"] * 3 + [
        "post_transformer_block", "NormPipe", "ParallelLinearPipe"]
    names = {n for n, _ in model.named_parameters()}
    expected = {"0.word_embeddings.weight", "6.norm.weight", "6.norm.bias", "7.final_linear.weight"}
    for layer in (2, 3, 4):
        for sub in ("input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
                    "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            expected |= {f"{layer}.{sub}.weight", f"{layer}.{sub}.bias"}
    assert names == expected
    qkv = dict(model.named_parameters())["2.attention.query_key_value.weight"]
    assert qkv.shape == (3 * args.hidden_size, args.hidden_size)
    # Sequential keys are GPT-NeoX's `sequential.<idx>.` ones.
    seq_keys = set(model.to_sequential().state_dict())
    assert seq_keys == {f"sequential.{n}" for n in expected}


def test_tied_layout_shares_the_embedding(GPT2ModelPipe):
    args = make_args(no_weight_tying=False)
    model = GPT2ModelPipe(args)
    names = [n for n, _ in model.named_parameters()]
    assert "tied_modules.embed.word_embeddings.weight" in names
    assert not any("final_linear" in n for n in names)
    emb = model.tied_modules["embed"].word_embeddings.weight
    ids, pos = _inputs(args)
    hidden = model.forward_funcs[5](model.forward_funcs[4](  # final norm output, then the tied logits
        model.forward_funcs[3](model.forward_funcs[2](model.forward_funcs[1](model.forward_funcs[0]((ids, pos)))))))
    torch.testing.assert_close(model((ids, pos)), hidden @ emb.t())


@pytest.mark.parametrize("tied", [False, True])
def test_to_sequential_equals_pipeline(GPT2ModelPipe, tied):
    args = make_args(no_weight_tying=not tied)
    model = GPT2ModelPipe(args)
    randomize_(model, seed=3)
    seq = model.to_sequential()
    ids, pos = _inputs(args)
    out_pipe = model((ids, pos))
    out_seq = seq((ids, pos, None))  # a third (mask) element is accepted and ignored
    torch.testing.assert_close(out_seq, out_pipe, rtol=0, atol=0)
    assert sum(p.numel() for p in seq.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("num_layers_per_ckpt", [1, 2])
def test_activation_checkpointing_gives_identical_grads(GPT2ModelPipe, num_layers_per_ckpt):
    torch.manual_seed(0)
    plain = GPT2ModelPipe(make_args(num_layers=4, hidden_dropout=0.1))
    ckpt = GPT2ModelPipe(make_args(num_layers=4, hidden_dropout=0.1, checkpoint_activations=True,
                                   checkpoint_num_layers=num_layers_per_ckpt))
    assert ckpt.activation_checkpoint_interval == num_layers_per_ckpt
    ckpt.load_state_dict(plain.state_dict())
    ids, pos = _inputs(plain.neox_args)
    labels = (torch.roll(ids, -1, dims=1), torch.ones_like(ids))
    grads, calls = [], []
    for model in (plain, ckpt, plain.to_sequential(), ckpt.to_sequential()):
        count = [0]
        hooks = [m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
                 for m in model.modules() if type(m).__name__ == "ParallelTransformerLayerPipe"]
        model.zero_grad()
        torch.manual_seed(7)  # same dropout masks: recomputation must replay them exactly
        out = model((ids, pos))
        from megatron.model import cross_entropy

        cross_entropy(out, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(count[0])
        for h in hooks:
            h.remove()
    # Checkpointed blocks (indices 2-5 are the 4 transformer layers, blocks start at index 0, so both
    # intervals cover them exactly) run their layers' forward again in backward.
    assert calls == [4, 8, 4, 8]
    for other in grads[1:]:
        assert [g.shape for g in other.values()] == [g.shape for g in grads[0].values()]
        for a, b in zip(grads[0].values(), other.values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
