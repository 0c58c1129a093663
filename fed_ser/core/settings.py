"""Settings groups declared once: a dataclass per ``conf/`` group, read from Hydra or from a plain mapping.

A group of ``conf/`` (``attack``, ``shadow``, ``data``, ``features``) is one dataclass: its fields are
the group's keys with their types and defaults, a nested dataclass is a nested block
(``attack.feature_space``), and its ``__post_init__`` refuses values of the right type that make
no sense, with one line naming the key. The same dataclass is Hydra's structured schema
``<group>/schema`` (:mod:`fed_ser.experiments.config` registers it: an unknown key or a value of
the wrong type is refused at composition, naming the key) and the typed object the code reads,
through :func:`read_settings`. The flat run settings follow the same rule with flat keys
(:class:`fed_ser.run.settings.RunSettings`).

Pure Python, below everything: the attacks read their own settings with it (``attacks`` may import
the core only), the experiments theirs.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def read_settings(cls: type[T], values: Mapping[str, Any], key: str) -> T:
    """``values`` (a Hydra node or a plain mapping) as the dataclass ``cls``, whose keys sit under ``key``
    (``""``: at the top level).

    Nested dataclasses, lists, tuples and dicts are converted as the fields' annotations say and
    absent keys take their defaults (a test may give a few keys only). A key ``cls`` does not
    declare, a value of another type, or one the dataclass's own checks refuse is a ValueError whose
    message starts with the full key (``attack.feature_space.workers: ...``).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{key}: expected a block of settings, got {values!r}")
    full = (lambda name: f"{key}.{name}") if key else str
    declared = [f for f in fields(cls) if f.init]
    names = {f.name for f in declared}
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise ValueError(f"{full(unknown[0])}: no such setting (known: {', '.join(full(n) for n in sorted(names))})")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in declared:
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{full(f.name)}: not set")
            continue
        try:
            value = values[f.name]
        except Exception as exc:  # a Hydra node's own error: a mandatory value left '???', an interpolation that fails
            raise ValueError(f"{full(f.name)}: {str(exc).splitlines()[0]}") from None
        kwargs[f.name] = _convert(value, hints[f.name], full(f.name))
    return cls(**kwargs)


def _convert(value: Any, typ: Any, key: str) -> Any:
    """``value`` as the annotation ``typ`` says, or a ValueError naming ``key``."""
    origin, args = get_origin(typ), get_args(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{key}: a setting has one type (or None), not {typ}")
        return _convert(value, inner[0], key)
    if value is None:
        raise ValueError(f"{key}: must be set, got null")
    if is_dataclass(typ):
        return read_settings(typ, value, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: settings of type {typ} are not supported")
