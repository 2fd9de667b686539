"""What a backend's ``select_keep`` computed beside the pair it returned, for the fills that take that pair.

A fill needs, per position, the slot whose row lands there: the inverse of ``ids_keep``. The
selection knows it as it chooses, so a backend's ``select_keep`` stores it here and its
``unshuffle_fill`` / ``fill_backward`` look it up instead of rebuilding it — but only for the very
``ids_keep`` and ``mask`` objects the selection returned, unmodified since (their version counters).
Any other pair (user-made, edited in place, another mask object) finds nothing and builds its own.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary


class SelectionCache:
    """``ids_keep`` → (mask, both version counters, value); an entry lives only as long as ``ids_keep``."""

    def __init__(self) -> None:
        self._entries = WeakIdKeyDictionary()

    def remember(self, ids_keep: torch.Tensor, mask: torch.Tensor, value: torch.Tensor) -> None:
        """Keep ``value`` for the pair (not for inference tensors, which have no version counter)."""
        if not ids_keep.is_inference():
            self._entries[ids_keep] = (mask, ids_keep._version, mask._version, value)

    def lookup(self, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The value kept for this very pair when neither tensor was modified since; else None."""
        entry = self._entries.get(ids_keep)
        if entry is None:
            return None
        known_mask, ids_version, mask_version, value = entry
        if known_mask is not mask or ids_keep._version != ids_version or mask._version != mask_version:
            return None
        return value
