"""The reference's training-free SepLLM config (``llama3_sepllm_a3_n256.yml`` and its siblings), loaded and checked.

The file is one YAML flow mapping with quoted keys, comments and anchors (``&PREFILL_LOC_WINS_ANCHOR`` /
``*PREFILL_LOC_WINS_ANCHOR``); the reference writes ``None`` for an empty list, which YAML reads as the string
``'None'`` and this loader reads as no value. Keys and their meaning are the reference's (SEPLLM_REFERENCE.md
§12.6); every key is implemented or refused here by name, before any model work:

- ``USE_BiPE`` and ``USE_SA_SOFTMAX`` / ``USE_SA_SOFTMAX_NO_DENO`` need training: refused when true.
- ``USE_SEP_ATTN_KERNEL_ACCELERATOR`` / ``RECOMPILE_SEP_ATTN_KERNEL`` are training-only: refused when true.
- ``prefill_k`` / ``generate_k`` are deprecated in the reference and never read: refused unless 0.
- At most one of ``USE_ORIGINAL_FULL_ATTEN``, ``USE_FIXED_SEP_INTERVALs``, ``streamingLLM`` may be true.

:func:`load_config` checks what the file alone can tell; :meth:`TrainingFreeConfig.resolve` checks it against
the model (``Layer_num``) and fills separator ids / the padding id from the tokenizer when absent, giving the
:class:`Settings` the attention reads.
"""
import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple, Union

from megatron.hf import rule  # the rule module (megatron/model/sepllm/rule.py), without the trainer's imports


def arg(default, doc: str):
    """A config key with its documentation (as the trainer's ``megatron.neox_arguments.field.arg``)."""
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults are not used here")
    return dataclasses.field(default=default, metadata={"doc": " ".join(doc.split())})


def suggest_key(key: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known key, or ''."""
    import difflib

    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return f" (did you mean '{lowered[key.lower()]}'? the keys are case-sensitive)"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""

MODE_KEYS = ("USE_ORIGINAL_FULL_ATTEN", "USE_FIXED_SEP_INTERVALs", "streamingLLM")
_NEEDS_TRAINING = {
    "USE_BiPE": "BiPE changes the positional encoding, so the model must be trained with it",
    "USE_SA_SOFTMAX": "Self-Adjusting softmax changes the attention's output scale, so the model must be "
                      "trained with it",
    "USE_SA_SOFTMAX_NO_DENO": "Self-Adjusting softmax changes the attention's output scale, so the model must "
                              "be trained with it",
    "USE_SEP_ATTN_KERNEL_ACCELERATOR": "the Sep-Attention kernel is the trainer's (the training-free path is "
                                       "mask-based, eager or sdpa)",
    "RECOMPILE_SEP_ATTN_KERNEL": "it belongs to the trainer's Sep-Attention kernel",
}


class TrainingFreeConfigError(ValueError):
    """A training-free SepLLM config that cannot be applied; the message names the key or file."""


@dataclass
class TrainingFreeConfig:
    """The reference's training-free keys, with their meaning in this project."""

    Layer_num: Optional[int] = arg(None, "Number of layers; must equal the model's (num_hidden_layers). "
                                         "Absent: the model's.")
    separator_token_ids: Optional[list] = arg(
        None, "Separator token ids. Absent: the tokenizer's ids of . , ? ! ; : space tab newline (as the trainer's "
              "checker derives them). Ignored by full attention, StreamingLLM and FixLLM.")
    PADDING_ID: Optional[int] = arg(
        None, "The padding token id, counted by BATCH_ADAPTIVE_INIT_POS. Absent: the tokenizer's pad id "
              "(else its eos id).")
    prefill_k: int = arg(0, "Deprecated in the reference and never read; must be 0.")
    generate_k: int = arg(0, "Deprecated in the reference and never read; must be 0.")
    prefill_local_window_size: int = arg(256, "Local window W of the first forward (prefill / scoring).")
    generate_local_window_size: int = arg(256, "Local window of later forwards (decode steps).")
    USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS: bool = arg(False, "Use prefill_loc_win_size_list, one window per layer.")
    USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS: bool = arg(False, "Use generate_win_loc_size_list, one per layer.")
    prefill_loc_win_size_list: Optional[list] = arg(None, "Per-layer prefill windows (length Layer_num).")
    generate_win_loc_size_list: Optional[list] = arg(None, "Per-layer decode windows (length Layer_num).")
    init_tok_max_idx: int = arg(2, "Largest initial-token index: init_tok_max_idx + 1 initial tokens; -1 none.")
    USE_ORIGINAL_FULL_ATTEN: bool = arg(False, "Run the stock model unchanged (every other key is ignored).")
    streamingLLM: bool = arg(False, "StreamingLLM: initial tokens and the local window only.")
    BATCH_ADAPTIVE_INIT_POS: bool = arg(
        False, "Initial tokens start after each row's PADDING_ID tokens (left-padded batches).")
    PRINT_KV_RATIO: bool = arg(False, "Print the KV-retention ratio and attention-map density.")
    print_ratio_intervals: int = arg(8000, "Print them every this many prefill forwards.")
    USE_SEP_ATTN_KERNEL_ACCELERATOR: bool = arg(False, "Training only: refused when true.")
    RECOMPILE_SEP_ATTN_KERNEL: bool = arg(False, "Training only: refused when true.")
    EXCLUDE_DIAGONAL: bool = arg(True, "Prefill window of W keys including the query (True) or W + 1 (False).")
    USE_BiPE: bool = arg(False, "Needs training: refused when true.")
    BiPE_seps: Optional[list] = arg(None, "Read only with USE_BiPE, which is refused: ignored.")
    USE_FIXED_SEP_INTERVALs: bool = arg(
        False, "FixLLM: every interval-th token (k - init_start + 1) % interval == 0 in place of the separators.")
    fixed_sep_intervals_list: Optional[list] = arg(None, "FixLLM's interval per layer (length Layer_num).")
    USE_SA_SOFTMAX: bool = arg(False, "Needs training: refused when true.")
    USE_SA_SOFTMAX_NO_DENO: bool = arg(False, "Needs training: refused when true.")
    SA_Numerator_Bias: float = arg(0.0, "Read only with Self-Adjusting softmax, which is refused: ignored.")
    SA_Denominator_Bias: float = arg(1e-10, "Read only with Self-Adjusting softmax, which is refused: ignored.")

    source: Optional[str] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def mode(self) -> str:
        """``full``, ``fixllm``, ``streamingllm`` or ``sepllm``."""
        if self.USE_ORIGINAL_FULL_ATTEN:
            return "full"
        if self.USE_FIXED_SEP_INTERVALs:
            return "fixllm"
        if self.streamingLLM:
            return "streamingllm"
        return "sepllm"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}

    def resolve(self, num_layers: int, tokenizer=None) -> "Settings":
        """The :class:`Settings` for a model of ``num_layers`` layers (``tokenizer``: an HF tokenizer, used only
        for separator / padding ids the config leaves out)."""
        where = self._where()
        self.check_layers(num_layers)
        mode = self.mode
        intervals = None
        if mode == "fixllm":
            intervals = tuple(_check_layer_list(where, "fixed_sep_intervals_list", self.fixed_sep_intervals_list,
                                                num_layers, "USE_FIXED_SEP_INTERVALs is true"))
        separators: Tuple[int, ...] = ()
        if mode == "sepllm":
            seps = self.separator_token_ids
            if seps is None:
                if tokenizer is None:
                    raise TrainingFreeConfigError(
                        f"{where}: separator_token_ids is not set and no tokenizer was given to derive it from")
                seps = hf_separator_ids(tokenizer)
                print(f"> SepLLM: separator_token_ids derived from the tokenizer: {seps}", flush=True)
            if list(seps) == [-1]:
                raise TrainingFreeConfigError(
                    f"{where}: separator_token_ids is [-1] (no separators) in SepLLM mode; set streamingLLM: True "
                    "for initial tokens + window only")
            separators = tuple(int(t) for t in seps)
        padding = self.PADDING_ID
        adaptive = bool(self.BATCH_ADAPTIVE_INIT_POS) and mode != "full"
        if padding is None and adaptive:
            padding = _tokenizer_padding_id(tokenizer)
            if padding is None:
                raise TrainingFreeConfigError(f"{where}: BATCH_ADAPTIVE_INIT_POS is true but PADDING_ID is not set "
                                              "and no tokenizer with a pad or eos id was given")
        return Settings(
            mode=mode, num_layers=num_layers,
            prefill_windows=() if mode == "full" else tuple(rule.layer_windows(self, num_layers, "prefill")),
            generate_windows=() if mode == "full" else tuple(rule.layer_windows(self, num_layers, "generate")),
            num_init=rule.num_initial_tokens(self.init_tok_max_idx), exclude_diagonal=bool(self.EXCLUDE_DIAGONAL),
            separator_ids=separators, padding_id=None if padding is None else int(padding), adaptive_init=adaptive,
            intervals=intervals, print_kv_ratio=bool(self.PRINT_KV_RATIO) and mode != "full",
            print_ratio_intervals=int(self.print_ratio_intervals))

    def check_layers(self, num_layers: int) -> None:
        """``Layer_num`` and the per-layer lists in use against a model of ``num_layers`` layers (needs only the
        model's config, so it can run before the weights load)."""
        where = self._where()
        layer_num = num_layers if self.Layer_num is None else self.Layer_num
        if layer_num != num_layers:
            raise TrainingFreeConfigError(f"{where}: Layer_num is {self.Layer_num} but the model has {num_layers} "
                                          "layers (num_hidden_layers)")
        if self.mode == "full":
            return  # the stock model runs unchanged; the reference ignores every other key
        for flag, key in (("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_loc_win_size_list"),
                          ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "generate_win_loc_size_list")):
            if getattr(self, flag):
                _check_layer_list(where, key, getattr(self, key), num_layers, f"{flag} is true")

    def _where(self) -> str:
        return f"training-free config {self.source}" if self.source else "training-free config"


@dataclass(frozen=True)
class Settings:
    """What the training-free attention reads: one resolved value per layer, nothing left to derive."""

    mode: str
    num_layers: int
    prefill_windows: Tuple[int, ...]
    generate_windows: Tuple[int, ...]
    num_init: int
    exclude_diagonal: bool
    separator_ids: Tuple[int, ...]
    padding_id: Optional[int]
    adaptive_init: bool
    intervals: Optional[Tuple[int, ...]]
    print_kv_ratio: bool
    print_ratio_intervals: int


ConfigLike = Union[str, os.PathLike, dict, TrainingFreeConfig]


def load_config(source: ConfigLike) -> TrainingFreeConfig:
    """A checked :class:`TrainingFreeConfig` from a YAML file path, a dict of the reference's keys, or a config."""
    if isinstance(source, TrainingFreeConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        values = _read_yaml(path)
        where = path
    elif isinstance(source, dict):
        values, where = dict(source), None
    else:
        raise TrainingFreeConfigError(f"a training-free config is a YAML path or a dict, got {type(source).__name__}")
    return from_dict(values, where)


def from_dict(values: dict, source: Optional[str] = None) -> TrainingFreeConfig:
    where = f"training-free config {source}" if source else "training-free config"
    known = {f.name: f for f in fields(TrainingFreeConfig) if f.name != "source"}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise TrainingFreeConfigError(f"{where}: unknown key '{key}'{suggest_key(str(key), known)}")
        kwargs[key] = _coerce(where, key, value, known[key].type)
    config = TrainingFreeConfig(**kwargs, source=source)
    _check_alone(config, where)
    return config


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise TrainingFreeConfigError(f"training-free config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise TrainingFreeConfigError(f"training-free config {path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise TrainingFreeConfigError(f"training-free config {path}: expected one mapping of keys, "
                                      f"got {type(values).__name__}")
    return values


def _coerce(where: str, key: str, value, annotation):
    """The value as the field's type; the reference's ``None`` (a YAML string) is no value."""
    if isinstance(value, str) and value.strip() in ("None", "none", "null", "~"):
        value = None
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind, optional = kinds[0], type(None) in typing.get_args(annotation)
    if value is None:
        if optional:
            return None
        raise TrainingFreeConfigError(f"{where}: key '{key}' needs a value")
    if kind is bool:
        if not isinstance(value, bool):
            raise TrainingFreeConfigError(f"{where}: key '{key}' must be True or False, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainingFreeConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainingFreeConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise TrainingFreeConfigError(f"{where}: key '{key}' must be a list of integers, got {value!r}")
        return list(value)
    raise AssertionError(f"no coercion for {annotation}")


def _check_alone(config: TrainingFreeConfig, where: str) -> None:
    """What the file alone can refuse."""
    for key, why in _NEEDS_TRAINING.items():
        if getattr(config, key):
            raise TrainingFreeConfigError(f"{where}: {key} is true, but {why}; set it False")
    for key in ("prefill_k", "generate_k"):
        if getattr(config, key) != 0:
            raise TrainingFreeConfigError(f"{where}: {key} is {getattr(config, key)}; it is deprecated in the "
                                          "reference and never read, keep 0")
    on = [key for key in MODE_KEYS if getattr(config, key)]
    if len(on) > 1:
        raise TrainingFreeConfigError(f"{where}: {' and '.join(on)} are both true; choose one mode")
    if config.Layer_num is not None and config.Layer_num < 1:
        raise TrainingFreeConfigError(f"{where}: Layer_num must be >= 1, got {config.Layer_num}")
    for key in ("prefill_local_window_size", "generate_local_window_size", "print_ratio_intervals"):
        if getattr(config, key) < 1:
            raise TrainingFreeConfigError(f"{where}: {key} must be >= 1, got {getattr(config, key)}")
    if config.init_tok_max_idx < -1:
        raise TrainingFreeConfigError(f"{where}: init_tok_max_idx must be >= -1 (-1 keeps no initial token), "
                                      f"got {config.init_tok_max_idx}")
    if config.separator_token_ids is not None and config.mode == "sepllm":
        seps = config.separator_token_ids
        if not seps or (list(seps) != [-1] and any(t < 0 for t in seps)):
            raise TrainingFreeConfigError(f"{where}: separator_token_ids must be non-negative token ids, got {seps}")
    if config.Layer_num is not None:
        # Lists in use are checked here too, so a wrong length stops before any model is loaded.
        for flag, key in (("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_loc_win_size_list"),
                          ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "generate_win_loc_size_list"),
                          ("USE_FIXED_SEP_INTERVALs", "fixed_sep_intervals_list")):
            if getattr(config, flag) and config.mode != "full":
                _check_layer_list(where, key, getattr(config, key), config.Layer_num, f"{flag} is true")


def _check_layer_list(where: str, key: str, values, num_layers: int, because: str) -> List[int]:
    if not isinstance(values, (list, tuple)):
        raise TrainingFreeConfigError(f"{where}: {because}, so {key} must be a list of {num_layers} integers, "
                                      f"got {values!r}")
    if len(values) != num_layers:
        raise TrainingFreeConfigError(f"{where}: {key} has {len(values)} entries but the model has {num_layers} "
                                      "layers (Layer_num)")
    bad = [v for v in values if v < 1]
    if bad:
        raise TrainingFreeConfigError(f"{where}: every entry of {key} must be >= 1, got {bad}")
    return [int(v) for v in values]


class _HFTokenizerView:
    """The two calls megatron.tokenizer.separators needs, over an HF tokenizer."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab = hf.get_vocab()

    def tokenize(self, text: str) -> List[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def token_to_id(self, token: str) -> Optional[int]:
        return self.vocab.get(token)


def hf_separator_ids(tokenizer) -> List[int]:
    """The trainer checker's separators (. , ? ! ; : space tab newline) for an HF tokenizer."""
    from megatron.tokenizer.separators import separator_ids

    return [int(t) for t in separator_ids(_HFTokenizerView(tokenizer))]


def _tokenizer_padding_id(tokenizer) -> Optional[int]:
    if tokenizer is None:
        return None
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


SAVED_CONFIG_NAME = "sepllm_config.yml"
CONFIG_JSON_FIELD = "sepllm_config"


def saved_config(model_dir: Optional[str], model_config=None) -> Optional[TrainingFreeConfig]:
    """The settings saved with a model: the ``sepllm_config`` field of its config.json (a mapping of the keys
    above), else a ``sepllm_config.yml`` file in ``model_dir``; None when there is neither."""
    embedded = getattr(model_config, CONFIG_JSON_FIELD, None) if model_config is not None else None
    if embedded is not None:
        if not isinstance(embedded, dict):
            raise TrainingFreeConfigError(f"config.json field '{CONFIG_JSON_FIELD}' must be a mapping of the "
                                          f"training-free keys, got {type(embedded).__name__}")
        return from_dict(embedded, f"config.json:{CONFIG_JSON_FIELD}" + (f" of {model_dir}" if model_dir else ""))
    if model_dir and os.path.isfile(os.path.join(model_dir, SAVED_CONFIG_NAME)):
        return load_config(os.path.join(model_dir, SAVED_CONFIG_NAME))
    return None


def write_saved_config(config: ConfigLike, model_dir: str) -> str:
    """Writes ``config`` as ``model_dir/sepllm_config.yml`` (complete before it gets its name); returns the path."""
    import yaml

    checked = load_config(config)
    path = os.path.join(model_dir, SAVED_CONFIG_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("# Training-free SepLLM settings read by megatron.hf.training_free.apply_sepllm\n")
        yaml.safe_dump(checked.to_dict(), handle, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
    return path
