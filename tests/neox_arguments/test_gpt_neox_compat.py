"""GPT-NeoX configs mean what they meant (issue 11, item 1): fp16.type, load == save before the first checkpoint,
a config's missing hostfile, GPT-NeoX keys for features this project lacks (all named at once), and the
compatibility table's tool on a few of GPT-NeoX's configs (fixtures/gpt_neox/, copied at ea7aefd8)."""
import pytest

import deepy
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.compat import launch_notes
from megatron.neox_arguments.gpt_neox_features import FEATURE_KEYS, METADATA_KEYS, scan
from megatron.neox_arguments.loading import ALIASES, read_yaml_keys

from .helpers import FIXTURES, Recorder, cpu, gpus, make_dataset, small, write

NEOX = FIXTURES / "gpt_neox"


def pythia_1b_fp16():
    return {key: value for key, value, _ in read_yaml_keys(str(NEOX / "pythia" / "1B.yml"))}["fp16"]


def test_fp16_type_follows_gpt_neox_rule():
    # pythia/1B.yml: enabled true, type bfloat16. GPT-NeoX since 056e9caf: enabled decides, type is not read.
    section = pythia_1b_fp16()
    assert section["type"] == "bfloat16" and section["enabled"] is True
    args = NeoXArgs.from_dict(small(fp16=section), env=gpus(1))
    assert args.precision == "fp16"
    ds = args.deepspeed_config()
    assert "type" not in ds["fp16"] and ds["fp16"]["auto_cast"] is True and "bf16" not in ds
    assert any("'fp16.type' is 'bfloat16' but this config trains fp16" in n for n in launch_notes(args))
    # GPT-NeoX's own default section, and a section without 'enabled' (off in GPT-NeoX and DeepSpeed alike).
    args = NeoXArgs.from_dict(small(fp16={"type": "fp16", "enabled": True}), env=gpus(1))
    assert args.precision == "fp16" and not any("fp16.type" in n for n in launch_notes(args))
    assert NeoXArgs.from_dict(small(fp16={"type": "fp16"}), env=cpu()).precision == "fp32"
    assert NeoXArgs.from_dict(small(fp16={"loss_scale": 0}), env=cpu()).precision == "fp32"
    assert NeoXArgs.from_dict(small(bf16={"enabled": True}), env=cpu()).precision == "bfloat16"
    with pytest.raises(ConfigError, match=r"key 'fp16.type' is 'bf16'; GPT-NeoX writes one of \['fp16', 'bfloat16'\]"):
        NeoXArgs.from_dict(small(fp16={"enabled": True, "type": "bf16"}), env=gpus(1))


def training(tmp_path, **extra):
    keys = dict(user_script="/somewhere/train.py", train_iters=10, lr=1e-3, data_path=make_dataset(tmp_path),
                tokenizer_type="CharLevelTokenizer")
    return small(**dict(keys, **extra))


def test_load_same_as_save_before_first_checkpoint(tmp_path):
    ckpt = str(tmp_path / "checkpoints")
    for _ in ("not created yet", "created, empty"):
        args = NeoXArgs.from_dict(training(tmp_path, load=ckpt, save=ckpt), env=cpu())
        assert args.load is None and args.load_was_empty == ckpt
        assert f"note: 'load' {ckpt} is the 'save' directory and holds no checkpoint yet" in launch_notes(args)[0]
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
    # Another directory: a typo must not train from scratch.
    with pytest.raises(ConfigError, match=r"key 'load': load=.*checkpoints: no checkpoint there"):
        NeoXArgs.from_dict(training(tmp_path, load=ckpt, save=str(tmp_path / "elsewhere")), env=cpu())
    # Not training: nothing to start from.
    with pytest.raises(ConfigError, match="no checkpoint there"):
        NeoXArgs.from_dict(training(tmp_path, load=ckpt, save=ckpt, user_script="/somewhere/generate.py"), env=cpu())
    # Something of a checkpoint there (a step directory 'latest' does not name): today's error, not a fresh start.
    (tmp_path / "checkpoints" / "global_step4").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint there"):
        NeoXArgs.from_dict(training(tmp_path, load=ckpt, save=ckpt), env=cpu())
    (tmp_path / "checkpoints" / "latest").write_text("global_step4")
    args = NeoXArgs.from_dict(training(tmp_path, load=ckpt, save=ckpt), env=cpu())
    assert args.load == ckpt and args.load_was_empty is None


def test_interrupted_first_save_is_not_a_fresh_directory(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "global_step2.tmp").mkdir(parents=True)
    with pytest.raises(ConfigError, match="global_step2.tmp are incomplete saves"):
        NeoXArgs.from_dict(training(tmp_path, load=str(ckpt), save=str(ckpt)), env=cpu())


def test_missing_hostfile_in_config_means_local(tmp_path):
    cfg = write(tmp_path / "run.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + "\nhostfile: /mock_path\n")
    args = NeoXArgs.from_ymls([cfg], env=cpu())
    assert args.hostfile is None and args.global_num_gpus == 1
    assert args.missing_hostfile == f"/mock_path (key 'hostfile' in {cfg}:7 (as 'hostfile'))"
    assert launch_notes(args)[0].startswith("warning: hostfile /mock_path (key 'hostfile' in ")
    # On the command line (deepy.py passes it as an override) a missing hostfile stays an error.
    with pytest.raises(ConfigError, match="hostfile not found: /mock_path"):
        NeoXArgs.from_ymls([cfg], overrides={"hostfile": "/mock_path"}, env=cpu())
    with pytest.raises(ConfigError, match="hostfile not found: /nowhere"):
        NeoXArgs.from_dict(small(hostfile="/nowhere"), env=cpu())


def test_deepy_warns_and_launches_locally(tmp_path, capsys):
    data = make_dataset(tmp_path)
    cfg = write(tmp_path / "run.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + f"""
train_iters: 10
optimizer: {{type: Adam, params: {{lr: 0.001}}}}
data_path: {data}
tokenizer_type: CharLevelTokenizer
hostfile: /mock_path
""")
    script = write(tmp_path / "train.py", "print('rank')\n")
    rec = Recorder()
    assert deepy.main([script, cfg, "--resolved_config", str(tmp_path / "r.yml")], runner=rec, env=cpu()) == 0
    assert "--hostfile" not in rec.calls[0]
    assert "deepy.py: warning: hostfile /mock_path" in capsys.readouterr().err
    assert deepy.main([script, cfg, "--hostfile", "/mock_path", "--resolved_config", str(tmp_path / "r2.yml")],
                      runner=rec, env=cpu()) == 2
    assert "configuration error: hostfile not found: /mock_path" in capsys.readouterr().err


def test_unsupported_features_are_named_all_at_once(tmp_path):
    cfg = write(tmp_path / "neox.yml", "\n".join(f"{k}: {v}" for k, v in small().items()) + """
moe-num-experts: 8
use_comet: true
norm: scalenorm
attention_config: [[["sparse_fixed"], 1], [["global"], 1]]
optimizer: {type: lion, params: {lr: 0.001}}
num_layerz: 3
""")
    with pytest.raises(ConfigError) as err:
        NeoXArgs.from_ymls([cfg], env=cpu())
    message = str(err.value)
    assert message.startswith("not supported here, 5 GPT-NeoX setting(s) for features this project does not have")
    for part in (f"'moe-num-experts: 8' ({cfg}:7): Mixture of Experts", "'use_comet: true'", "comet logging",
                 "'norm: \"scalenorm\"'", "ScaleNorm", "attention_config type 'sparse_fixed'",
                 "DeepSpeed sparse attention", "'optimizer.type: lion'", "unknown key 'num_layerz'"):
        assert part in message, part
    assert "\n" not in message


def test_feature_keys_at_gpt_neox_default_are_accepted():
    args = NeoXArgs.from_dict(small(use_comet=False, moe_num_experts=1, te_mha=False, profile=None,
                                    mamba_selective_fp32_params=True, git_hash="1a2b3c"), env=cpu())
    assert args.gpt_neox_keys_off == ["git_hash", "mamba_selective_fp32_params", "moe_num_experts", "profile",
                                      "te_mha", "use_comet"]
    assert "use_comet" not in args.user_keys and "gpt_neox_keys_off" not in args.user_keys
    assert any(n.startswith("note: GPT-NeoX key(s) git_hash, mamba_selective_fp32_params") for n in launch_notes(args))
    with pytest.raises(ConfigError, match=r"'te_mha: true': Transformer Engine"):
        NeoXArgs.from_dict(small(te_mha=True), env=cpu())
    with pytest.raises(ConfigError, match=r"'moe_num_experts: 2': Mixture of Experts"):
        NeoXArgs.from_dict(small(moe_num_experts=2), env=cpu())


def test_every_gpt_neox_key_is_a_field_or_a_named_feature():
    """fixtures/gpt_neox_arg_names.txt: GPT-NeoX's NeoXArgs fields at ea7aefd8."""
    names = [line.strip() for line in (FIXTURES / "gpt_neox_arg_names.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(names) > 300
    fields = set(NeoXArgs.fields())
    assert not set(FEATURE_KEYS) & fields, "a key this project implements is still listed as a missing feature"
    # Even so, a field is read as the field: scan never refuses one.
    assert scan({"num_layers": 3, "use_comet": True}, {}, {"num_layers"})[0] == ["'use_comet: true': comet logging"]
    assert scan({"use_comet": True}, {}, {"use_comet"}) == ([], [])
    missing = [n for n in names if n not in fields and ALIASES.get(n) not in fields and n not in FEATURE_KEYS
               and n not in METADATA_KEYS]
    assert not missing, f"GPT-NeoX keys neither implemented nor in gpt_neox_features.FEATURE_KEYS: {missing}"


def test_pass_through_section_in_deepspeed_extra_args():
    # GPT-NeoX's 19M.yml: "deepspeed_extra_args": {"comms_logger": {...}}.
    logger = {"enabled": True, "verbose": True, "prof_all": True, "debug": False}
    args = NeoXArgs.from_dict(small(deepspeed_extra_args={"comms_logger": logger}), env=cpu())
    assert args.deepspeed_config()["comms_logger"] == logger
    with pytest.raises(ConfigError, match="'deepspeed_extra_args.comms_logger' is a key of this config"):
        NeoXArgs.from_dict(small(comms_logger=logger, deepspeed_extra_args={"comms_logger": logger}), env=cpu())
    with pytest.raises(ConfigError, match="'deepspeed_extra_args.train_batch_size' is a key of this config"):
        NeoXArgs.from_dict(small(deepspeed_extra_args={"train_batch_size": 8}), env=cpu())


def test_compat_table_on_gpt_neox_configs(tmp_path):
    from tools.gpt_neox_compat_table import BEGIN, END, compat_rows, render, write_into

    rows = {r.config: r for r in compat_rows(NEOX)}
    assert sorted(rows) == ["125M-dmoe.yml", "125M.yml", "local_setup.yml", "pythia/1B.yml", "sparse.yml"]
    assert rows["125M.yml"].loads
    assert rows["125M.yml"].detail.startswith("12 layers x 768, full attention, fp16, ZeRO 1")
    assert rows["local_setup.yml"].loads and rows["local_setup.yml"].detail.endswith("(loaded with 125M.yml)")
    assert rows["pythia/1B.yml"].loads
    assert ", fp16, ZeRO 0, data parallel 8 x pipeline 1" in rows["pythia/1B.yml"].detail
    moe = rows["125M-dmoe.yml"]
    assert not moe.loads and "'moe_num_experts: 8' (125M-dmoe.yml:22): Mixture of Experts" in moe.detail
    sparse = rows["sparse.yml"]
    assert not sparse.loads and "DeepSpeed sparse attention" in sparse.detail and "type 'local'" in sparse.detail
    table = render(list(rows.values()), "abc1234")
    assert "at GPT-NeoX abc1234), **3 load**; 2 do not" in table
    write(tmp_path / "compat.md", f"# title\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    write_into(tmp_path / "compat.md", table)
    text = (tmp_path / "compat.md").read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{END}\n\nafter\n") and "old" not in text
    assert table in text
