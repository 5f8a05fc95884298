"""Checks deepy.py makes once before launch that read more than the configuration itself.

`validate_all` runs on the launcher and again on every rank and stays cheap; these read the data files and
ask DeepSpeed's parser, so they run once, on the launcher (`check_before_launch`), and turn what would be a
rank traceback after the model is built into one `configuration error` line:

- every dataset the config names is opened and validated by the loader's own rule
  (`megatron.data.indexed_dataset.MMapIndex.validate_against`), and its token ids are checked against
  the padded vocabulary (`megatron.data.token_ids`, cached next to the data);
- the prompt file of ``text_gen_type: input-file`` exists;
- DeepSpeed's config parser reads the derived DeepSpeed config (its errors shown on one line), and every
  `deepspeed_extra_args` key must be one it reads, with a value of the kind of DeepSpeed's default for it
  (DeepSpeed ignores unknown keys and crashes on wrong types only in the engine).
"""
import collections.abc
import difflib

from .errors import ConfigError
from .validate import _is_training


def data_prefixes(args):
    """(key, prefix) of every dataset the config names, in config order."""
    out = [("data_path", args.data_path)] if args.data_path is not None else []
    for split in ("train", "valid", "test"):
        out += [(f"{split}_data_paths", p) for p in getattr(args, f"{split}_data_paths") or []]
    return out


def vocab_source(args) -> str:
    return f"tokenizer_type {args.tokenizer_type}" + (f", vocab_file {args.vocab_file}" if args.vocab_file else "")


def check_data_files(args, log=print):
    from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndex, data_file_path, index_file_path
    from megatron.data.token_ids import check_token_ids

    for key, prefix in dict.fromkeys(data_prefixes(args)):
        try:
            index = MMapIndex(index_file_path(prefix))
            index.validate_against(data_file_path(prefix))
            if args.padded_vocab_size is not None:
                check_token_ids(prefix, args.padded_vocab_size, key, vocab_source(args), log=log)
        except IndexedDatasetError as err:
            message = str(err)
            raise ConfigError(message if message.startswith("key '") else f"key '{key}': {message}") from None
        # The ranks would stop on these only after building the model.
        if int(index.sizes.sum(dtype="int64")) == 0:
            raise ConfigError(f"key '{key}': dataset {prefix} holds no tokens ({len(index)} sequences)")
        if key == "data_path" and _is_training(args):
            from megatron.data.data_utils import get_train_valid_test_split_

            bounds = get_train_valid_test_split_(args.split, len(index))
            if bounds[1] == bounds[0]:
                raise ConfigError(f"key 'split' is {args.split!r}: over the {len(index)} documents of "
                                  f"data_path {prefix} it leaves the training split no documents")


class _ReadRecorder(dict):
    """A dict that remembers which keys were read and the default each read offered.

    DeepSpeedConfig reads its top-level keys with get / [] / in / keys(); a shallow copy (which
    DeepSpeedConfig makes) shares the record.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = {}

    def get(self, key, default=None):
        self.reads.setdefault(key, default)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.setdefault(key, None)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads.setdefault(key, None)
        return super().__contains__(key)

    def keys(self):
        recorder = self

        class _Keys(collections.abc.KeysView):
            def __contains__(self, key):
                return recorder.__contains__(key)

        return _Keys(self)


def deepspeed_reads(config: dict) -> dict:
    """Top-level key -> default for every key DeepSpeed's config parser reads from `config`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _ReadRecorder(config)
    DeepSpeedConfig(recorder)
    return recorder.reads


def _kind_mismatch(value, default) -> str:
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return "" if isinstance(value, str) else "a string"
    if isinstance(default, dict):
        return "" if isinstance(value, dict) else "a mapping"
    return ""


def _one_line(err) -> str:
    """DeepSpeed's pydantic errors span several lines and end in a URL; the launcher prints one line."""
    errors = getattr(err, "errors", None)
    if callable(errors) and getattr(err, "title", None):
        try:
            parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in errors()]
            return f"{err.title}: " + "; ".join(parts)
        except (TypeError, KeyError):
            pass
    return " ".join(str(err).split())


def check_deepspeed_config(args):
    """DeepSpeed's parser on the derived config, and every deepspeed_extra_args key against what it reads."""
    config = args.deepspeed_config()
    # DeepSpeed checks the batch product against the world size of *this* process (1), so it sees the batch of
    # one data-parallel rank; derivation already checked the real product.
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    try:
        reads = deepspeed_reads(config)
    except ImportError as err:
        raise ConfigError(f"DeepSpeed cannot be imported ({err}); deepy.py launches through DeepSpeed's runner, "
                          f"install it as the README says") from None
    except Exception as err:  # assertion, pydantic and DeepSpeed's own errors
        raise ConfigError(f"DeepSpeed rejects the derived DeepSpeed config: {_one_line(err)}") from None
    for key, value in (args.deepspeed_extra_args or {}).items():
        if key not in reads:
            close = difflib.get_close_matches(key, list(reads), n=1)
            raise ConfigError(f"key 'deepspeed_extra_args.{key}' is not a key DeepSpeed's config reads"
                              + (f" (did you mean '{close[0]}'?)" if close else "")
                              + "; DeepSpeed would ignore it")
        want = _kind_mismatch(value, reads[key])
        if want:
            raise ConfigError(f"key 'deepspeed_extra_args.{key}' is {value!r}; DeepSpeed expects {want} "
                              f"(its default is {reads[key]!r})")


def check_prompt_file(args):
    """``text_gen_type: input-file`` reads ``sample_input_file``: a missing file would stop generate.py only after
    the ranks started and the model was loaded."""
    import os

    if args.text_gen_type != "input-file":
        return
    if not args.sample_input_file:
        raise ConfigError("key 'text_gen_type' is input-file, which reads prompts from 'sample_input_file'; "
                          "it is not set")
    if not os.path.isfile(args.sample_input_file):
        raise ConfigError(f"key 'sample_input_file': prompt file {args.sample_input_file} does not exist")


def check_before_launch(args, log=None):
    """Raise ConfigError for bad data files, a missing prompt file or deepspeed_extra_args (see the module
    docstring)."""
    log = log or (lambda line: print(f"deepy.py: {line}", flush=True))
    check_deepspeed_config(args)
    check_prompt_file(args)
    check_data_files(args, log=log)
