"""Checking settings read from dicts and files against the dataclass that holds them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


def reject_unknown(cls: type, keys: Iterable[str], what: str) -> None:
    """Raise ``ValueError("unknown <what> [...]; known: [...]")`` when ``keys`` name something that is
    not a field of the dataclass ``cls`` (a typo in a config file must not be ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
