"""`NeoXArgs`: the one configuration object, combining every topic's dataclass in a flat namespace."""
import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass

import yaml

from megatron.atomic_files import atomic_write_text

from .coerce import coerce_value
from .data_args import DataArgs
from .deepspeed_args import DeepSpeedArgs
from .deepspeed_config import build_deepspeed_config, uses_deepspeed_optimizer
from .derive import derive_all
from . import gpt_neox_features
from .environment import Environment, detect_environment
from .errors import ConfigError
from .launcher_args import LauncherArgs
from .loading import merge_sources, normalise_key, read_yaml_keys, suggest_key
from .logging_args import LoggingArgs
from .model_args import ModelArgs
from .optimizer_args import LRScheduleArgs, OptimizerArgs
from .parallelism_args import ParallelismArgs
from .runtime_args import RuntimeArgs
from .sepllm_args import AdjustSoftmaxArgs, SepKernelArgs, SepLLMArgs
from .textgen_args import TextGenArgs
from .tokenizer_args import TokenizerArgs
from .training_args import TrainingArgs
from .validate import validate_all

# Later bases come first in the MRO; order only affects the field order of the resolved config.
_TOPICS = (ModelArgs, TokenizerArgs, DataArgs, OptimizerArgs, LRScheduleArgs, TrainingArgs, LoggingArgs,
           ParallelismArgs, DeepSpeedArgs, SepLLMArgs, AdjustSoftmaxArgs, SepKernelArgs, LauncherArgs, TextGenArgs,
           RuntimeArgs)


@dataclass
class NeoXArgs(RuntimeArgs, TextGenArgs, LauncherArgs, SepKernelArgs, AdjustSoftmaxArgs, SepLLMArgs, DeepSpeedArgs,
               ParallelismArgs, LoggingArgs, TrainingArgs, LRScheduleArgs, OptimizerArgs, DataArgs,
               TokenizerArgs, ModelArgs):
    """All configuration of a run. Build it with `from_ymls`, `from_dict` or (on a rank) `consume_neox_args`."""

    # ---------------------------------------------------------------- field metadata
    @classmethod
    def fields(cls) -> dict:
        """Field name -> dataclasses.Field."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def _annotations(cls) -> dict:
        if "_hints" not in cls.__dict__:
            cls._hints = typing.get_type_hints(cls)
        return cls._hints

    # ---------------------------------------------------------------- construction
    @classmethod
    def _build(cls, values: dict, origins: dict, given=None, env: Environment = None, on_rank: bool = False,
               host_resolver=None) -> "NeoXArgs":
        """Type-check `values` (normalised keys), construct, derive and validate. Internal keys are allowed here;
        `from_ymls` refuses them in files before calling this."""
        fields = cls.fields()
        hints = cls._annotations()
        refusals, off = gpt_neox_features.scan(values, origins, fields)
        if off:
            values = {k: v for k, v in values.items() if k not in off}
            values["gpt_neox_keys_off"] = sorted(set(off) | set(values.get("gpt_neox_keys_off") or ()))
            given = (set(values) if given is None else set(given)) - set(off) - {"gpt_neox_keys_off"}
        user_fields = [n for n, f in fields.items() if f.metadata["role"] != "internal"]
        unknown = [f"unknown key '{key}'" + (f" in {origins[key].describe()}" if key in origins else "")
                   + suggest_key(key, user_fields) for key in values
                   if key not in fields and key not in gpt_neox_features.FEATURE_KEYS]
        # Every problem of this kind at once: a GPT-NeoX config often has several.
        if refusals or unknown:
            raise ConfigError("; ".join(([gpt_neox_features.refusal_message(refusals)] if refusals else []) + unknown))
        kwargs = {}
        for key, value in values.items():
            where = origins[key].describe() if key in origins else ""
            meta = fields[key].metadata
            kwargs[key] = coerce_value(key, value, hints[key], meta["choices"], where)
        args = cls(**kwargs)
        if given is None:
            given = set(values)
        if args.user_keys is None:
            args.user_keys = sorted(given)
        args._finish(set(given), env or detect_environment(), on_rank, host_resolver)
        return args

    def _finish(self, given: set, env: Environment, on_rank: bool, host_resolver=None):
        derive_all(self, given, env, on_rank=on_rank)
        self._sepllm_changes = validate_all(self, env, on_rank=on_rank, host_resolver=host_resolver)

    @classmethod
    def from_dict(cls, d: dict, env: Environment = None, host_resolver=None) -> "NeoXArgs":
        """Build from already-merged keys (GPT-NeoX spellings accepted), derive and validate.

        Internal keys (e.g. `padded_vocab_size`, `user_script`) are accepted here, which tests use.
        """
        values, spellings = {}, {}
        for raw_key, value in d.items():
            key = normalise_key(raw_key)
            if key in values:
                raise ConfigError(f"key '{key}' is given twice (as '{spellings[key]}' and as '{raw_key}')")
            values[key] = value
            spellings[key] = raw_key
        return cls._build(values, {}, env=env, host_resolver=host_resolver)

    @classmethod
    def from_ymls(cls, paths, overrides: dict = None, env: Environment = None, host_resolver=None) -> "NeoXArgs":
        """Load YAML files (merged in order; a key given twice is an error), apply `overrides`, derive, validate.

        `overrides` (e.g. deepy.py's command-line options or a test's data paths) win over the files and
        may also set internal keys such as `user_script`.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        sources = [(p, read_yaml_keys(p)) for p in paths]
        values, origins = merge_sources(sources)
        fields = cls.fields()
        for key in values:
            if key in fields and fields[key].metadata["role"] == "internal":
                raise ConfigError(f"key '{key}' in {origins[key].describe()} is set by the launcher / on each "
                                  f"rank, not in a config file")
        given = set(values)
        for raw_key, value in (overrides or {}).items():
            key = normalise_key(raw_key)
            values[key] = value
            origins.pop(key, None)
            given.add(key)
        _fall_back_from_missing_hostfile(values, origins)
        abs_paths = [os.path.abspath(p) for p in paths]
        values.setdefault("config_paths", abs_paths)
        values.setdefault("config_files", _read_config_texts(abs_paths))
        given -= {"config_paths", "config_files"}
        return cls._build(values, origins, given=given, env=env, host_resolver=host_resolver)

    @classmethod
    def from_resolved(cls, path: str, env: Environment = None, overrides: dict = None) -> "NeoXArgs":
        """Read a config written by `save_resolved` and re-derive / re-validate it for this process.

        `overrides` replace resolved values before derivation (the exporter clears the run's data paths,
        which a model export does not need and which may not exist where it runs)."""
        if not os.path.isfile(path):
            raise ConfigError(f"resolved config not found: {path} (--neox_config_file)")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ConfigError(f"broken resolved config {path}: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"resolved config {path} is not a mapping")
        values["neox_config_file"] = os.path.abspath(path)
        given = set(values.get("user_keys") or values)
        for raw_key, value in (overrides or {}).items():
            values[normalise_key(raw_key)] = value
        return cls._build(values, {}, given=given, env=env, on_rank=True)

    @classmethod
    def consume_neox_args(cls, argv=None, env: Environment = None) -> "NeoXArgs":
        """On a rank: read `--neox_config_file PATH` from argv (DeepSpeed adds `--local_rank`, ignored) and
        RANK / LOCAL_RANK / WORLD_SIZE from the environment; re-run derivation and validation. `--help`
        prints how the script is started and exits."""
        parser = argparse.ArgumentParser(
            description="A per-rank entry point: deepy.py resolves the configuration and starts this script on "
                        "every rank. Start it as `python deepy.py SCRIPT config.yml [more.yml ...]` (see "
                        "`python deepy.py --help`), not directly.")
        parser.add_argument("--neox_config_file", required=False, metavar="PATH",
                            help="the resolved configuration deepy.py wrote (resolved_config.yml)")
        parser.add_argument("--local_rank", type=int, default=None,
                            help="added by DeepSpeed's launcher and ignored: the rank is read from LOCAL_RANK")
        known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        if not known.neox_config_file:
            raise ConfigError("missing --neox_config_file PATH: start this script through deepy.py "
                              "(python deepy.py train.py config.yml ...)")
        return cls.from_resolved(known.neox_config_file, env=env)

    # ---------------------------------------------------------------- outputs
    def to_dict(self) -> dict:
        """Every field (user, derived and internal) as plain data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config dict derived from these arguments."""
        return build_deepspeed_config(self)

    @property
    def deepspeed_builds_optimizer(self) -> bool:
        """True when the DeepSpeed config carries the optimizer (the training loop then passes none)."""
        return uses_deepspeed_optimizer(self)

    def save_resolved(self, path: str) -> str:
        """Write the resolved config as YAML atomically (tmp file + os.replace); return the absolute path."""
        text = yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, default_flow_style=None)
        return atomic_write_text(path, text, suffix=".yml")

    def summary(self) -> str:
        """Human-readable `key: value` lines of the non-default values, for the launch log."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config_files":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                lines.append(f"  {f.name}: {json.dumps(_plain(value))}")
        return "\n".join(lines)


def _fall_back_from_missing_hostfile(values: dict, origins: dict):
    """A config file's ``hostfile`` naming no file means this machine only, as in DeepSpeed's runner (which
    warns and uses local resources); GPT-NeoX's 125M.yml ships ``hostfile: /mock_path``. A ``--hostfile`` on the
    command line (an override, so without an origin) must exist: parse_hostfile refuses it by name."""
    path = values.get("hostfile")
    if "hostfile" in origins and isinstance(path, str) and not os.path.isfile(path):
        values["hostfile"] = None
        values["missing_hostfile"] = f"{path} (key 'hostfile' in {origins['hostfile'].describe()})"


def _plain(value):
    """Tuples -> lists, recursively, so the YAML dump is safe_load-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_config_texts(paths) -> dict:
    texts = {}
    for p in paths:
        name = os.path.basename(p)
        if name in texts:
            # Two configs with one file name from different folders: keep both under distinct names.
            name = f"{len(texts):02d}_{name}"
        with open(p, encoding="utf-8") as f:
            texts[name] = f.read()
    return texts
