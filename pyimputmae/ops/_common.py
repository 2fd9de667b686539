"""Shared helpers of the user-facing ops: backend dispatch inside a custom op, autocast."""

from __future__ import annotations

from types import ModuleType

import torch

from .. import _backends


def backend_for(family: str, device: torch.device, requested: str) -> ModuleType:
    """The kernel module that runs ``family`` on ``device`` (see ``pyimputmae._backends``)."""
    return _backends.module(_backends.resolve(family, device, requested))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None. Custom ops are opaque to
    autocast, so the wrappers cast their floating inputs themselves, as F.linear would."""
    dev = device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def check_backend_arg(backend: str) -> str:
    return _backends.canonical(backend)
