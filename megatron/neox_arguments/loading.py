"""Reading YAML config files: normalisation, aliases, duplicate and unknown-key detection.

GPT-NeoX configs are YAML (often in JSON-like flow style with comments). Top-level keys treat `-` and
`_` alike (`num-layers` == `num_layers`); a few GPT-NeoX aliases map onto one field. Any key that ends up
given twice -- in one file or across files, under either spelling or an alias -- is an error naming
both places, because silently keeping one of them hides a real conflict.
"""
import difflib
import os
from dataclasses import dataclass

import yaml

from .errors import ConfigError

# GPT-NeoX spellings that name the same setting as one of our fields.
ALIASES = {
    "gas": "gradient_accumulation_steps",
    "batch_size": "train_micro_batch_size_per_gpu",
    "clip_grad": "gradient_clipping",
    "save_interval": "checkpoint_factor",
}


@dataclass(frozen=True)
class KeySource:
    """Where a key came from, for error messages."""

    file: str
    line: int
    spelling: str

    def describe(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} (as '{self.spelling}')"


def normalise_key(key) -> str:
    """Top-level key as stored: `-` -> `_`, then GPT-NeoX aliases. Case is kept (SepLLM keys are mixed-case)."""
    if not isinstance(key, str):
        raise ConfigError(f"config key {key!r} is not a string")
    name = key.replace("-", "_")
    return ALIASES.get(name, name)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys inside nested mappings (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error_message(path: str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        return f"broken YAML in {path}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"broken YAML in {path}: {problem}"


def read_yaml_keys(path: str) -> list:
    """Return `[(raw_key, value, line)]` for the top-level mapping of one YAML file, in file order."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                              f"found a {root.id} at line {root.start_mark.line + 1}")
        items = []
        for key_node, value_node in root.value:
            key = loader.construct_object(key_node, deep=True)
            value = loader.construct_object(value_node, deep=True)
            items.append((key, value, key_node.start_mark.line + 1))
        return items
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error_message(path, err)) from None
    finally:
        loader.dispose()


def merge_sources(sources: list) -> tuple:
    """Merge `[(name, [(raw_key, value, line)])]` into one dict, refusing any key given twice.

    Returns `(merged, origins)`: the normalised key -> value dict and key -> `KeySource`.
    """
    merged, origins = {}, {}
    for name, items in sources:
        for raw_key, value, line in items:
            key = normalise_key(raw_key)
            here = KeySource(name, line, str(raw_key))
            if key in origins:
                raise ConfigError(
                    f"key '{key}' is given twice: in {origins[key].describe()} and in {here.describe()}; "
                    f"keep one of them")
            merged[key] = value
            origins[key] = here
    return merged, origins


def suggest_key(key: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known key, or '' when nothing is close."""
    known = list(known)
    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return f" (did you mean '{lowered[key.lower()]}'? SepLLM keys are case-sensitive)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        close = [lowered[m] for m in difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)]
    return f" (did you mean '{close[0]}'?)" if close else ""
