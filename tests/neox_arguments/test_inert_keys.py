"""No inert keys: every config field is read by some code outside the declarations, or is listed in
megatron/neox_arguments/compat.py as a no-op (with its reason) or as refused beyond its implemented value."""
import re
from pathlib import Path

import pytest

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.compat import NO_OP_KEYS, REFUSED_VALUES, no_op_notes

from .helpers import cpu, small

REPO = Path(__file__).resolve().parents[2]
# Field declarations and the generated key reference mention every name; validation reads keys to check
# them, which does not make them do anything. None of these is a consumer.
NOT_CONSUMERS = re.compile(r"megatron/neox_arguments/(\w+_args|reference_doc|compat|validate|preflight)\.py$")
# Keys whose whole job is a check made during validation.
VALIDATION_KEYS = ("check_hostfile_hosts",)


def _consumer_source() -> str:
    files = [p for p in (*REPO.glob("megatron/**/*.py"), *REPO.glob("tools/**/*.py"), *REPO.glob("*.py"))
             if not NOT_CONSUMERS.search(p.as_posix())]
    return "\n".join(p.read_text() for p in files)


def _is_read(name: str, source: str) -> bool:
    # Attribute access (args.name) or the name as a string (a table of keys, a dict lookup).
    return bool(re.search(r"\." + re.escape(name) + r"\b", source)
                or re.search(r"[\"']" + re.escape(name) + r"[\"']", source))


def test_every_field_is_read_or_listed():
    source = _consumer_source()
    listed = set(NO_OP_KEYS) | set(REFUSED_VALUES) | set(VALIDATION_KEYS)
    unread = sorted(name for name, f in NeoXArgs.fields().items()
                    if f.metadata["role"] != "internal" and name not in listed and not _is_read(name, source))
    assert not unread, (f"config fields no code reads: {unread}; implement them, or list them in "
                        "megatron/neox_arguments/compat.py with the reason")


def test_listed_keys_are_fields_and_not_also_implemented():
    fields = NeoXArgs.fields()
    for key in (*NO_OP_KEYS, *REFUSED_VALUES):
        assert key in fields, key
    assert not set(NO_OP_KEYS) & set(REFUSED_VALUES)
    for key, (value, _) in REFUSED_VALUES.items():
        assert fields[key].default == value, f"{key}: the implemented value must be the default"


@pytest.mark.parametrize("key", sorted(REFUSED_VALUES))
def test_refused_values_stop_validation_naming_the_key(key):
    value = {"activation_checkpointing": {"partition_activations": False},
             "output_layer_parallelism": "row"}.get(key, True)
    with pytest.raises(ConfigError, match=f"key '{key}' is .*not supported"):
        NeoXArgs.from_dict(small(**{key: value}), env=cpu())


def test_no_op_keys_load_and_are_noted_once():
    args = NeoXArgs.from_dict(small(bias_gelu_fusion=True, partition_activations=True), env=cpu())
    notes = no_op_notes(args)
    assert len(notes) == 2 and any("'bias_gelu_fusion'" in n for n in notes)
    assert no_op_notes(NeoXArgs.from_dict(small(), env=cpu())) == []
