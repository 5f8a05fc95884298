"""`arg()`: a dataclass field that carries its own documentation and role.

Every configuration field is declared with `arg(default, doc)` so that the docstring is available at
runtime (for `docs/configuration.md`, for error messages and for the test that every field is
documented). `role` tells the loader who may set the field:

- ``"user"``: a YAML key a user may write;
- ``"derived"``: computed from other keys (a user may still give it where GPT-NeoX allows it, e.g.
  `precision`), recorded in the resolved config;
- ``"internal"``: set by the launcher or on the rank (`rank`, `data_parallel_size`, ...); rejected in
  user YAML files, accepted in the resolved config that `deepy.py` hands to the ranks.
"""
import copy
from dataclasses import field

ROLES = ("user", "derived", "internal")


def arg(default, doc: str, *, role: str = "user", choices=None):
    """Declare a documented configuration field.

    Mutable defaults (lists, dicts) are deep-copied per instance so two `NeoXArgs` never share them.
    `choices`, when given, is the closed set of accepted values (checked on load).
    """
    if role not in ROLES:
        raise ValueError(f"arg(): role must be one of {ROLES}, got {role!r}")
    metadata = {"doc": " ".join(doc.split()), "role": role, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata)
    return field(default=default, metadata=metadata)
