"""YAML loading: merge order, `-`/`_` normalisation, duplicates, unknown keys, broken YAML, types."""
import pytest

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.loading import normalise_key, suggest_key

from .helpers import cpu, small, write


def test_merge_normalises_dashes_and_aliases(tmp_path):
    a = write(tmp_path / "a.yml", """
        num-layers: 2
        hidden_size: 64
        num-attention-heads: 4
        seq-length: 32
        """)
    b = write(tmp_path / "b.yml", """
        {"padded_vocab_size": 128, "USE_ORIGINAL_FULL_ATTEN": true, "gas": 3,
         "train-micro-batch-size-per-gpu": 2, "hidden-dropout": 0, "clip_grad": 0.5}
        """)
    args = NeoXArgs.from_ymls([a, b], env=cpu())
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (2, 64, 4, 32)
    assert args.gradient_accumulation_steps == 3 and args.train_micro_batch_size_per_gpu == 2
    assert args.train_batch_size == 6
    assert args.hidden_dropout == 0.0 and isinstance(args.hidden_dropout, float)
    assert args.gradient_clipping == 0.5
    assert args.config_paths == [str(tmp_path / "a.yml"), str(tmp_path / "b.yml")]
    assert set(args.config_files) == {"a.yml", "b.yml"} and "num-layers: 2" in args.config_files["a.yml"]


def test_normalise_key_keeps_case():
    assert normalise_key("USE-BiPE") == "USE_BiPE"
    assert normalise_key("gas") == "gradient_accumulation_steps"


@pytest.mark.parametrize("first,second", [("num-layers", "num_layers"), ("num_layers", "num_layers"),
                                          ("gas", "gradient-accumulation-steps")])
def test_duplicate_across_files_names_both_files(tmp_path, first, second):
    a = write(tmp_path / "first.yml", f"{first}: 2\n")
    b = write(tmp_path / "second.yml", f"hidden_size: 64\n{second}: 3\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a, b], env=cpu())
    msg = str(err.value)
    assert "first.yml:1" in msg and "second.yml:2" in msg and f"'{first}'" in msg and f"'{second}'" in msg


def test_duplicate_within_one_file_after_normalisation(tmp_path):
    a = write(tmp_path / "a.yml", "num-layers: 2\nnum_layers: 2\n")
    with pytest.raises(ConfigError, match=r"num_layers.*a.yml:1.*a.yml:2"):
        NeoXArgs.from_ymls([a], env=cpu())


def test_duplicate_inside_nested_mapping(tmp_path):
    a = write(tmp_path / "a.yml", "optimizer:\n  type: Adam\n  type: AdamW\n")
    with pytest.raises(ConfigError, match=r"a.yml, line 3.*duplicate key 'type'"):
        NeoXArgs.from_ymls([a], env=cpu())


@pytest.mark.parametrize("bad,suggestion", [("num_layer", "num_layers"), ("use_bipe", "USE_BiPE"),
                                            ("seperator_token_ids", "separator_token_ids"),
                                            ("train-iter", "train_iters")])
def test_unknown_key_suggests_closest(tmp_path, bad, suggestion):
    a = write(tmp_path / "a.yml", f"hidden_size: 64\n{bad}: 1\n")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([a], env=cpu())
    msg = str(err.value)
    assert f"unknown key '{normalise_key(bad)}'" in msg and "a.yml:2" in msg and f"'{suggestion}'" in msg


def test_suggest_key_nothing_close():
    assert suggest_key("zzzzqqq", ["num_layers", "hidden_size"]) == ""


def test_broken_yaml_names_file_and_line(tmp_path):
    a = write(tmp_path / "broken.yml", "num_layers: 2\nhidden_size: [64\nseq_length: 32\n")
    with pytest.raises(ConfigError, match=r"broken YAML in .*broken.yml, line \d+"):
        NeoXArgs.from_ymls([a], env=cpu())


def test_top_level_must_be_mapping(tmp_path):
    a = write(tmp_path / "list.yml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yml.*mapping"):
        NeoXArgs.from_ymls([a], env=cpu())


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yml"):
        NeoXArgs.from_ymls([str(tmp_path / "nope.yml")], env=cpu())


def test_internal_key_rejected_in_yaml(tmp_path):
    a = write(tmp_path / "a.yml", "data_parallel_size: 4\n")
    with pytest.raises(ConfigError, match="'data_parallel_size' in .*a.yml:1.*launcher"):
        NeoXArgs.from_ymls([a], env=cpu())


def test_type_errors_name_key_and_value():
    with pytest.raises(ConfigError, match=r"key 'num_layers'.*'two'.*expected int"):
        NeoXArgs.from_dict(small(num_layers="two"), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'no_weight_tying'.*expected bool"):
        NeoXArgs.from_dict(small(no_weight_tying="yes"), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'pos_emb'.*'rotari'.*expected one of"):
        NeoXArgs.from_dict(small(pos_emb="rotari"), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'hidden_dropout' may not be null"):
        NeoXArgs.from_dict(small(hidden_dropout=None), env=cpu())
    with pytest.raises(ConfigError, match=r"key 'num_layers' is required"):
        NeoXArgs.from_dict(small(num_layers=None), env=cpu())


def test_numeric_strings_and_integral_floats_are_converted(tmp_path):
    # PyYAML reads 6e-4 (no dot) as a string; 5.0e+2 as a float.
    a = write(tmp_path / "a.yml", "min_lr: 6e-5\noptimizer: {type: AdamW, params: {lr: 6e-4}}\n"
                                  "train_iters: 5.0e+2\n")
    args = NeoXArgs.from_ymls([a], overrides=small(), env=cpu())
    assert args.min_lr == pytest.approx(6e-5) and args.lr == pytest.approx(6e-4)
    assert args.train_iters == 500 and isinstance(args.train_iters, int)
    with pytest.raises(ConfigError, match=r"key 'train_iters'.*2.5"):
        NeoXArgs.from_dict(small(train_iters=2.5), env=cpu())


def test_overrides_win_over_files(tmp_path):
    a = write(tmp_path / "a.yml", "num_layers: 8\n")
    args = NeoXArgs.from_ymls([a], overrides=small(num_layers=2), env=cpu())
    assert args.num_layers == 2
