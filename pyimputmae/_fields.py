"""Checking settings read from dicts and files against the dataclass that holds them.

:func:`reject_unknown` refuses keys that are not fields; :func:`check_fields` (in a config's
``__post_init__``) and :func:`check_types` (on a dict, before the dataclass is built) check every
value against the field's type hint and convert it where that is unambiguous, so a wrong value
fails where the configuration is built, with the setting named, not deep inside torch or a reader.

Conversions (anything else is a ``ValueError`` naming the setting, the value and what it must be):

- float: ints, and strings that read as a finite number — YAML 1.1 (PyYAML) reads ``1e-3``,
  without a dot, as the string ``"1e-3"``;
- int: floats with an integral value (``2.0``); ``2.5`` and strings such as ``"5"`` are refused;
- bool: ``True``/``False`` only (not 0/1, not strings);
- ``tuple[X, ...]`` / ``list[X]``: a list or tuple (a lone string or number is refused, so
  ``"age"`` never becomes ``("a", "g", "e")``); ``tuple[X, Y, Z]`` needs exactly that length;
- a dataclass: an instance (checked in turn) or a mapping of its fields (unknown or missing
  fields refused), returned as a checked dict for the caller to build.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def reject_unknown(cls: type, keys: Iterable[str], what: str) -> None:
    """Raise ``ValueError("unknown <what> [...]; known: [...]")`` when ``keys`` name something that is
    not a field of the dataclass ``cls`` (a typo in a config file must not be ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")


def check_fields(obj: Any, where: str) -> None:
    """Check every field of the dataclass instance ``obj`` against its type hint and store the
    converted values (frozen dataclasses too). ``where`` prefixes the field name in messages
    (``"training setting "``, ``"ModelConfig."``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = _convert(hints[f.name], value, where + f.name)
        if new is not value:
            object.__setattr__(obj, f.name, new)


def check_types(cls: Any, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` (keys that are fields of the dataclass ``cls``, or parameters of the function
    ``cls``; others are passed through for :func:`reject_unknown` to name) checked against their
    type hints and converted."""
    hints = _hints(cls)
    return {k: _convert(hints[k], v, where + k) if k in hints else v for k, v in values.items()}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Mismatch(ValueError):
    """A value that does not fit; ``nested`` when the outer type fitted and an element did not (a
    union then reports this error rather than its list of alternatives)."""

    def __init__(self, message: str, nested: bool = False) -> None:
        super().__init__(message)
        self.nested = nested


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null (None)"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_plural(args[0])} such as [{', '.join(['64'] * len(args))}]"
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if hint is dict or (origin is not None and issubclass(origin, Mapping)):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(hint, _describe(hint) + " values")


def _convert(hint: Any, value: Any, name: str) -> Any:
    try:
        return _convert_or_mismatch(hint, value, name)
    except _Mismatch as e:
        if e.nested:
            raise ValueError(str(e)) from None
        raise ValueError(f"{name} must be {_describe(hint)}, {_got(value)}{e}") from None


def _convert_or_mismatch(hint: Any, value: Any, name: str) -> Any:
    """``value`` as a ``hint``; ``_Mismatch`` (its text: an optional hint appended to the message)
    when it is not one, or a nested error already naming ``name[i]`` / ``name.field``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch("")
    if origin in (typing.Union, types.UnionType):
        advice = ""
        for member in args:
            try:
                return _convert_or_mismatch(member, value, name)
            except _Mismatch as e:
                if e.nested:
                    raise
                advice = advice or str(e)
        raise _Mismatch(advice)
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Mismatch("")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise _Mismatch("; write a whole number without quotes" if isinstance(value, str) else "")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            if not math.isfinite(float(value)):
                raise _Mismatch("; NaN and infinity are not settings")
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch("") from None
            if math.isfinite(number):
                return number
        raise _Mismatch("")
    if hint is str:
        if isinstance(value, str):
            return str(value)  # numpy's str_ too
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return os.fspath(value)  # a path setting given as a pathlib.Path
        raise _Mismatch("")
    if origin in (tuple, list):
        # any ordered collection: a list, a tuple, an array, a pandas Index or Series, dict keys
        if isinstance(value, (str, bytes, Mapping, set, frozenset)) or not isinstance(value, Iterable):
            one = args and args[-1] is Ellipsis and isinstance(value, (str, numbers.Number))
            raise _Mismatch("; write one value as a one-element list" if one else "")
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise _Mismatch("")
        types_ = args[:1] * len(items) if not args or args[-1] is Ellipsis or origin is list else args
        # a list of names may arrive as numbers (Entrez gene ids read from YAML): they are names
        items = [str(v) if t is str and isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                 else v for t, v in zip(types_, items)] if args else items
        converted = [_nested(t, v, f"{name}[{i}]") for i, (t, v) in enumerate(zip(types_, items))] if args else items
        return tuple(converted) if origin is tuple else converted
    if hint is dict or (origin is not None and isinstance(origin, type) and issubclass(origin, Mapping)):
        if not isinstance(value, Mapping):
            raise _Mismatch("")
        if not args:
            return dict(value)
        return {_nested(args[0], k, f"{name} key {k!r}"): _nested(args[1], v, f"{name}[{k!r}]")
                for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            check_fields(value, name + ".")
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch("")
        try:
            reject_unknown(hint, value, f"key(s) in {name}")
            missing = [f.name for f in dataclasses.fields(hint) if f.name not in value
                       and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if missing:
                raise ValueError(f"{name} needs {', '.join(missing)}")
            return check_types(hint, value, name + ".")
        except ValueError as e:
            raise _Mismatch(str(e), nested=True) from None
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch("")
    return value  # a hint this checker does not know (none today): left to the config's own checks


def _nested(hint: Any, value: Any, name: str) -> Any:
    """An element of a container: its error names the element and counts as nested."""
    try:
        return _convert(hint, value, name)
    except ValueError as e:
        raise _Mismatch(str(e), nested=True) from None
