"""HF -> trainer import (tools/ckpts/convert_hf_to_neox.py): tiny random GPTNeoX / Llama / Mistral directories
round-trip through the exporter bit for bit, the imported weights give the HF logits in the trainer's model, a
post-training launch's first loss equals the HF model's on the same batch, GPT-NeoX's finetune semantics, and
bad input (unsupported architecture, shapes that contradict the config) stops with one line naming it."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from megatron.hf.export import export
from megatron.hf.export_config import ConversionError
from megatron.hf.import_config import vocab_multiple
from megatron.hf.import_hf import check_against_trainer, import_hf, trainer_layer_shapes
from tests.hf.helpers import random_ids, trainer_logits

VOCAB = 50304  # Pythia's padded vocabulary: the 20B tokenizer's 50277 tokens rounded up to 128

CASES = {  # name: (HF class, config kwargs, layout, exporter architecture); Pythia's released weights are fp16
    "pythia_fp16_pipeline": ("GPTNeoX", dict(intermediate_size=96, rotary_pct=0.5, use_parallel_residual=True,
                                             tie_word_embeddings=False, dtype=torch.float16), "pipeline", "neox"),
    "neox_tied_nobias_sequential": ("GPTNeoX", dict(intermediate_size=128, rotary_pct=0.25,
                                                    use_parallel_residual=False, tie_word_embeddings=True,
                                                    attention_bias=False, rotary_emb_base=5000), "sequential",
                                    "neox"),
    "llama_bias_sequential": ("Llama", dict(num_key_value_heads=4, intermediate_size=40, attention_bias=True,
                                            mlp_bias=True, rope_theta=5000.0, tie_word_embeddings=False),
                              "sequential", "llama"),
    "mistral_gqa_window_pipeline": ("Mistral", dict(num_key_value_heads=2, intermediate_size=48, sliding_window=9,
                                                    tie_word_embeddings=False), "pipeline", "llama"),
}


def make_hf_dir(path, tokenizer, family="GPTNeoX", seed=0, dtype=torch.float32, **overrides):
    """A tiny random HF model directory (the 20B tokenizer beside it), non-trivial norms and biases, saved in
    ``dtype``; the returned model is fp32 with the saved values."""
    import transformers

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    kwargs.update(overrides)
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(str(path))
    shutil.copyfile(tokenizer, path / "tokenizer.json")
    return model.float()


def load_trainer_model(save_dir):
    """The trainer's model of the imported YAML in fp32 with the imported weights (strict load)."""
    from megatron.checkpoint_io import CheckpointReader
    from megatron.model.layer_list import build_sequential_model
    from megatron.neox_arguments import Environment, NeoXArgs

    step = save_dir / "global_step0"
    args = NeoXArgs.from_resolved(str(step / "configs" / "resolved_config.yml"),
                                  env=Environment(1, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}))
    model = build_sequential_model(args).float().eval()  # an fp16 config validates with a (claimed) GPU
    reader = CheckpointReader(str(step), args.num_layers)
    model.load_state_dict({f"sequential.{idx}.{name}": value for idx in reader.layer_indices()
                           for name, value in reader.layer(idx)[0].items()})
    return args, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bitwise_and_the_trainer_computes_the_hf_logits(tmp_path, pythia_tokenizer_path, case):
    from safetensors.torch import load_file

    from megatron.checkpoint_io import CheckpointReader

    family, overrides, layout, architecture = CASES[case]
    hf = make_hf_dir(tmp_path / "hf", pythia_tokenizer_path, family, **overrides)
    out = tmp_path / "imported"
    import_hf(str(tmp_path / "hf"), str(out), layout, log=lambda _: None)
    assert (out / "latest").read_text() == "global_step0"
    names = {p.name for p in (out / "global_step0").iterdir()}
    assert ("layer_02-model_00-model_states.pt" in names) == (layout == "pipeline")
    assert yaml.safe_load((out / "model.yml").read_text())["pipe_parallel_size"] == (layout == "pipeline")
    resolved = yaml.safe_load((out / "global_step0" / "configs" / "resolved_config.yml").read_text())
    dtype = overrides.get("dtype", torch.float32)
    assert resolved["precision"] == {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    reader = CheckpointReader(str(out / "global_step0"), hf.config.num_hidden_layers)
    assert {t.dtype for idx in reader.layer_indices() for t in reader.layer(idx)[0].values()} == {dtype}

    back = export(str(out / "global_step0"), None, str(tmp_path / "back"), "auto", architecture, True,
                  log=lambda _: None)
    original, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(f"{back}/model.safetensors")
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    extra = set(exported) - set(original)  # the tied output layer, written out by the exporter
    assert extra <= {"embed_out.weight", "lm_head.weight"} and bool(extra) == hf.config.tie_word_embeddings
    before, after = hf.config.to_dict(), json.loads(open(f"{back}/config.json").read())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "layer_norm_eps", "rms_norm_eps",
                "use_parallel_residual", "attention_bias", "mlp_bias", "num_key_value_heads", "sliding_window",
                "architectures"):
        assert after.get(key) == before.get(key), key

    _, trainer = load_trainer_model(out)
    ids = random_ids(2, 24, vocab=VOCAB)
    with torch.no_grad():
        want = hf(ids).logits
    assert (trainer_logits(trainer, ids) - want).abs().max().item() < 1e-5


def test_previous_import_is_replaced_other_directories_are_not(tmp_path, pythia_tokenizer_path):
    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path)
    out = tmp_path / "imported"
    import_hf(str(tmp_path / "hf"), str(out), log=lambda _: None)
    import_hf(str(tmp_path / "hf"), str(out), "sequential", log=lambda _: None)  # a previous import: replaced
    assert not (out / "global_step0" / "layer_02-model_00-model_states.pt").exists()
    (out / "global_step5").mkdir()  # trained into since: no longer only ours
    with pytest.raises(ConversionError, match="previous import but also holds global_step5"):
        import_hf(str(tmp_path / "hf"), str(out), log=lambda _: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConversionError, match="not a previous import"):
        import_hf(str(tmp_path / "hf"), str(mine), log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_architecture_is_one_line_naming_it(tmp_path, pythia_tokenizer_path, capsys):
    from tools.ckpts.convert_hf_to_neox import main

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["--hf_dir", str(hf), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "architectures ['GPT2LMHeadModel']" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,tensor,key", [
    (dict(intermediate_size=128), "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "intermediate_size=128"),
    (dict(hidden_size=64), "gpt_neox.embed_in.weight", "hidden_size=64"),
    (dict(vocab_size=50432), "gpt_neox.embed_in.weight", "padded_vocab_size=50432"),
])
def test_shapes_that_contradict_the_config_name_tensor_and_key(tmp_path, pythia_tokenizer_path, edit, tensor, key):
    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path, intermediate_size=96)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **edit)))
    with pytest.raises(ConversionError) as err:
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"), log=lambda _: None)
    message = str(err.value)
    assert "\n" not in message and f"tensor {tensor} has shape" in message and key in message, message
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("family,edit,key", [
    ("GPTNeoX", dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    ("Llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_parameters.rope_type='linear'"),
    ("Llama", dict(head_dim=16), "head_dim=16"),
])
def test_settings_the_trainer_cannot_build_are_refused_by_key(tmp_path, pythia_tokenizer_path, family, edit, key):
    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path, family, intermediate_size=48)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **edit)))
    with pytest.raises(ConversionError, match="config.json: " + key.replace("(", r"\(").replace(".", r"\.")):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"), log=lambda _: None)


def test_unexpected_tensor_is_named(tmp_path, pythia_tokenizer_path):
    from safetensors.torch import load_file, save_file

    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path)
    weights = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(weights))
    sd["gpt_neox.layers.2.attention.dense.weight"] = sd["gpt_neox.layers.1.attention.dense.weight"].clone()
    save_file(sd, str(weights))
    with pytest.raises(ConversionError, match=r"tensor gpt_neox\.layers\.2\.attention\.dense\.weight is not part .*"
                                              r"num_layers=2"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"), log=lambda _: None)


def test_vocab_multiple_pads_the_tokenizer_exactly_to_the_model_rows(tmp_path):
    for tokens, rows in [(50277, 50304), (32000, 32000), (50277, 50280), (100, 257), (50254, 50432), (7, 7)]:
        m = vocab_multiple(tokens, rows, "tok.json")
        assert -(-tokens // m) * m == rows, (tokens, rows, m)  # the trainer's padding rule
    assert vocab_multiple(50277, 50304, "tok.json") == 128  # GPT-NeoX's default where it fits
    with pytest.raises(ConversionError, match="has 50305 tokens but the model's vocab_size"):
        vocab_multiple(50305, 50304, "tok.json")


def test_converted_layers_are_checked_against_the_trainer_model(pythia_tokenizer_path):
    from megatron.neox_arguments import NeoXArgs
    from tests.hf.helpers import base_config

    args = NeoXArgs.from_dict(base_config(pythia_tokenizer_path, USE_ORIGINAL_FULL_ATTEN=True))
    layers = {idx: {name: torch.zeros(shape) for name, shape in state.items()}
              for idx, state in trainer_layer_shapes(args).items()}
    check_against_trainer(layers, args)
    del layers[2]["attention.dense.bias"]
    with pytest.raises(ConversionError, match="layer 2: tensor attention.dense.bias is missing"):
        check_against_trainer(layers, args)


# ------------------------------------------------------------------------------------- finetune semantics
class RecordingEngine:
    """engine.load_checkpoint as DeepSpeed answers it: the mp_rank_00 file minus module (and optimizer)."""

    def __init__(self):
        self.calls = []

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states, load_module_only):
        self.calls.append(dict(optimizer=load_optimizer_states, scheduler=load_lr_scheduler_states,
                               module_only=load_module_only))
        path = f"{load_dir}/{tag}/mp_rank_00_model_states.pt"
        blob = torch.load(path, weights_only=False)
        return path, {k: v for k, v in blob.items() if k not in ("module", "optimizer")}


def test_finetune_loads_weights_only_as_gpt_neox(tmp_path, pythia_tokenizer_path):
    from megatron import checkpointing as ck
    from megatron.checkpoint_io import CheckpointError
    from megatron.neox_arguments import Environment, NeoXArgs

    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path)
    out = tmp_path / "imported"
    import_hf(str(tmp_path / "hf"), str(out), log=lambda _: None)
    args = NeoXArgs.from_ymls([str(out / "model.yml")], overrides=dict(
        load=str(out), finetune=True, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
        zero_optimization={"stage": 0}, precision="fp32"), env=Environment(0, {"WORLD_SIZE": "1", "RANK": "0"}))
    engine = RecordingEngine()
    torch.manual_seed(3)
    fresh = torch.rand(2)
    torch.manual_seed(3)
    # what training.py passes for finetune: no optimizer, no scheduler
    assert ck.load_checkpoint(args, engine, load_optimizer_states=False) == (0, 0)
    assert engine.calls == [dict(optimizer=False, scheduler=False, module_only=True)]
    assert torch.equal(torch.rand(2), fresh)  # the run's own RNG streams
    args.finetune = False
    with pytest.raises(CheckpointError, match="holds no optimizer state.*finetune: true"):
        ck.load_checkpoint(args, engine)


# --------------------------------------------------------------------------------------- post-training launch
@pytest.mark.slow
@pytest.mark.deepspeed
def test_post_training_first_step_loss_equals_the_hf_loss(tmp_path, pythia_tokenizer_path):
    """One launch through deepy.py with ``load`` at the import and ``finetune: true``: iteration 1's loss (before
    any update) is the HF model's loss on the same batch. Every document is the same ``seq_length`` tokens, so
    every sample, whatever the shuffle, is that document followed by its first token."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from tests.training.launch_utils import FIXTURES, losses_by_iteration, run_deepy

    hf = make_hf_dir(tmp_path / "hf", pythia_tokenizer_path, seed=2)
    out = tmp_path / "imported"
    import_hf(str(tmp_path / "hf"), str(out), log=lambda _: None)
    seq = 64
    doc = torch.cat([random_ids(1, seq - 1, seed=5, vocab=50277)[0], torch.tensor([0])])  # ends with <|endoftext|>
    prefix = str(tmp_path / "corpus")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(400):  # enough for the 5 % validation and test splits of tiny_train.yml
        builder.add_item(doc.tolist())
        builder.end_document()
    builder.finalize(prefix + ".idx")
    run = tmp_path / "run.yml"
    run.write_text(yaml.safe_dump(dict(data_path=prefix, load=str(out), finetune=True, save=str(tmp_path / "save"),
                                       train_iters=1, checkpoint_factor=1, train_micro_batch_size_per_gpu=2,
                                       gradient_accumulation_steps=1, zero_optimization={"stage": 0})))
    rc, log = run_deepy([out / "model.yml", FIXTURES / "tiny_train.yml", run], 1, log_path=tmp_path / "train.log")
    assert rc == 0, log[-4000:]
    assert "attention: full causal attention" in log and f"loaded checkpoint from {out} at iteration 0" in log
    trained = float(losses_by_iteration(log)[1])

    tokens = torch.cat([doc, doc[:1]]).unsqueeze(0)
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits.float()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert abs(trained - want) <= 2e-6 * want, (trained, want)  # the console prints 7 significant digits
    assert (tmp_path / "save" / "global_step1").is_dir()


def test_post_training_example_composes_with_an_import(tmp_path, pythia_tokenizer_path):
    """configs/post_training/pythia-160m-sepllm-n64.yml after an import's model.yml, as its header commands run
    them (a simulated 8-GPU node; a tiny Pythia-shaped model in place of the 160M download)."""
    from megatron.neox_arguments import Environment, NeoXArgs
    from tests.training.launch_utils import REPO, write_tiny_corpus

    make_hf_dir(tmp_path / "hf", pythia_tokenizer_path, hidden_size=64, max_position_embeddings=128)
    corpus = write_tiny_corpus(str(tmp_path / "corpus"))  # in place of the Pile
    out = tmp_path / "imported"
    import_hf(str(tmp_path / "hf"), str(out), log=lambda _: None)
    example = REPO / "configs" / "post_training" / "pythia-160m-sepllm-n64.yml"
    args = NeoXArgs.from_ymls([str(out / "model.yml"), str(example)], overrides=dict(load=str(out), data_path=corpus),
                              env=Environment(8, {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0"}))
    assert args.finetune and args.attention_variant == "sep_kernel" and args.prefill_local_window_size == 64
    assert args.train_batch_size == 1024 and args.padded_vocab_size == VOCAB and args.precision == "fp16"
    assert "imports/pythia-160m-deduped" in example.read_text()  # the path its header's import command writes
