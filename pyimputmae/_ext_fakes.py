"""Fake (meta) kernels of the compiled kernel-level ops (``csrc/ops.cpp``), registered when the
extension loads.

The user-facing custom ops have fakes of their own, so ``torch.compile`` of the library never needs
these; they let ``FakeTensorMode`` and ``torch.library.opcheck`` run the compiled ops themselves
(the op tests check each schema, its aliasing and these output shapes against the real kernels).
Each gives the real kernel's outputs: shapes, dtypes, contiguous strides.
"""

from __future__ import annotations

import math

import torch

from .reference.masked_mse import accumulation_dtype, gradient_dtype
from .reference.patch_embed import check_patch_input

_registered: list[bool] = []


def _patch_embed_forward(x, weight, bias, pos, keep, patch):
    grid = check_patch_input(x, patch)
    rows = keep.shape[1] if keep is not None else math.prod(grid)
    return weight.new_empty((x.shape[0], rows, weight.shape[0]))


def _patch_embed_backward(grad_out, x, weight, keep, patch, need_x, need_weight):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _select_keep(present, lengths, keeps, rng):
    B, L = present.shape[0], sum(lengths)
    return (present.new_empty((B, sum(keeps)), dtype=torch.int64), present.new_empty((B, L), dtype=torch.bool),
            present.new_empty((B, L), dtype=torch.int32))


def _gather_visible(tokens, ids_keep, mask):
    return tokens.new_empty((tokens.shape[0], ids_keep.shape[1], tokens.shape[2]))


def _unshuffle_fill(x, ids_keep, mask, mask_token, inverse=None):
    return x.new_empty((x.shape[0], mask.shape[1], x.shape[2]))


def _hidden_sum(grad, mask):
    return grad.new_empty((grad.shape[2],))


def _fill_backward(grad, ids_keep, mask):
    return _gather_visible(grad, ids_keep, mask), _hidden_sum(grad, mask)


def _masked_mse_forward(pred, x, weight, patch, norm_pix):
    return (pred.new_empty((), dtype=accumulation_dtype(pred.dtype)),
            torch.empty_like(pred, dtype=gradient_dtype(pred.dtype), memory_format=torch.contiguous_format))


def _scale_grad_(grad, scale):
    return None


FAKES = {"patch_embed_forward": _patch_embed_forward, "patch_embed_backward": _patch_embed_backward,
         "select_keep": _select_keep, "gather_visible": _gather_visible, "unshuffle_fill": _unshuffle_fill,
         "hidden_sum": _hidden_sum, "fill_backward": _fill_backward, "masked_mse_forward": _masked_mse_forward,
         "scale_grad_": _scale_grad_}


def register() -> None:
    """Register the fakes once (the extension's ops must be loaded)."""
    if _registered:
        return
    _registered.append(True)
    for name, fake in FAKES.items():
        torch.library.register_fake(f"pyimputmae::{name}", fake)
