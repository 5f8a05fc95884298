"""Type checking of loaded values against the field annotations.

YAML gives us ints where a float is meant (`hidden-dropout: 0`), floats where an int is meant
(`allgather_bucket_size: 5.0e8` style values) and strings for numbers without a dot in the mantissa
(PyYAML reads `6e-4` as a string). Such values are converted when the conversion is exact; anything
else stops with the key, the value and the expected type.
"""
import typing

from .errors import ConfigError


def _unwrap(annotation):
    """Return `(allowed_types, optional)` for an annotation such as Optional[Union[dict, bool]]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = typing.get_args(annotation)
        optional = type(None) in args
        types = tuple(a for a in args if a is not type(None))
        return types, optional
    return (annotation,), False


def _to_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            as_float = float(value)
        except ValueError:
            return None
        return int(as_float) if as_float.is_integer() else None
    return None


def _to_float(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value, typ):
    """Converted value, or the sentinel `_FAIL`."""
    if typ is bool:
        return value if isinstance(value, bool) else _FAIL
    if typ is int:
        out = _to_int(value)
        return _FAIL if out is None else out
    if typ is float:
        out = _to_float(value)
        return _FAIL if out is None else out
    if typ is str:
        return value if isinstance(value, str) else _FAIL
    if typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        return _FAIL
    if typ is dict:
        return value if isinstance(value, dict) else _FAIL
    raise TypeError(f"unsupported field annotation {typ!r}")


_FAIL = object()


def coerce_value(key: str, value, annotation, choices=None, where: str = ""):
    """Check and convert one value; raise ConfigError naming key, value and expected type."""
    types, optional = _unwrap(annotation)
    where = f" ({where})" if where else ""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"key '{key}'{where} may not be null")
    for typ in types:
        out = _convert(value, typ)
        if out is not _FAIL:
            if choices is not None and out not in choices:
                raise ConfigError(f"key '{key}'{where} has value {value!r}; expected one of {list(choices)}")
            return out
    names = " or ".join(t.__name__ for t in types)
    raise ConfigError(f"key '{key}'{where} has value {value!r} of type {type(value).__name__}; expected {names}")
