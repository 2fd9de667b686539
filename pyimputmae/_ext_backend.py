"""The ``ext`` backend: our compiled C++ (CPU) and CUDA kernels, through ``torch.ops.pyimputmae``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _extension
from ._selection_cache import SelectionCache

_extension.load()
_ops = torch.ops.pyimputmae

#: select_keep's third output, the fill's inverse map (B, L) int32 of the pair it returned: the slot
#: of each kept position, -2 elsewhere; a fill of that very pair passes it instead of building one
_INVERSES = SelectionCache()


def patch_embed_forward(x, weight, bias, pos, keep, patch: int) -> torch.Tensor:
    return _ops.patch_embed_forward(x, weight, bias, pos, keep, patch)


def patch_embed_backward(grad_out, x, weight, keep, patch: int, need_x: bool, need_weight: bool):
    return _ops.patch_embed_backward(grad_out, x, weight, keep, patch, need_x, need_weight)


def select_keep(present, lengths: Sequence[int], keeps: Sequence[int], rng):
    ids_keep, mask, inverse = _ops.select_keep(present, list(lengths), list(keeps), rng)
    _INVERSES.remember(ids_keep, mask, inverse)
    return ids_keep, mask


def gather_visible(tokens, ids_keep, mask) -> torch.Tensor:
    return _ops.gather_visible(tokens, ids_keep, mask)


def unshuffle_fill(x, ids_keep, mask, mask_token) -> torch.Tensor:
    """mask_token: ``(E,)``, or None for zeros (the gather's backward; the kernels write them)."""
    return _ops.unshuffle_fill(x, ids_keep, mask, mask_token, _INVERSES.lookup(ids_keep, mask))


def hidden_sum(grad, mask) -> torch.Tensor:
    return _ops.hidden_sum(grad, mask)


def fill_backward(grad, ids_keep, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a fill's ``x`` and ``mask_token``: ``(gather_visible, hidden_sum)`` of grad,
    from one call into the extension."""
    return _ops.fill_backward(grad, ids_keep, mask)


def masked_mse_forward(pred, x, weight, patch: int, norm_pix: bool):
    return _ops.masked_mse_forward(pred, x, weight, patch, norm_pix)


def scale_grad_(grad, scale) -> None:
    _ops.scale_grad_(grad, scale)
