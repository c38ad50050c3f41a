"""Frozen dataclass configs to and from plain JSON-able dicts, strictly (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, TypeVar

from sana.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as a dict of JSON values (enums by value, tuples as lists)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    return v


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, converting by the field types; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _convert(hints[k], v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where or cls.__name__}.{k}: {e}") from e
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _convert(tp: Any, v: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, v)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise TypeError(f"expected a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x) for x in v)
        if len(args) != len(v):
            raise ValueError(f"expected {len(args)} items, got {len(v)}")
        return tuple(_convert(a, x) for a, x in zip(args, v, strict=True))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(v)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v)
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError(f"expected true/false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise TypeError(f"expected a string, got {v!r}")
        return v
    return v


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def from_json(cls: type[T], text: str, where: str = "") -> T:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where or cls.__name__}: invalid JSON: {e}") from e
    return from_dict(cls, data, where)
