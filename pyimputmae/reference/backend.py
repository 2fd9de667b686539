"""The ``reference`` backend: the kernel-level functions of ``csrc/ops.cpp`` in plain PyTorch.

Same signatures and results as the C++, CUDA and Triton backends (see ``pyimputmae._backends``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .masked_mse import accumulation_dtype, masked_mse_forward_reference
from .masking import gather_visible_reference, select_keep_reference, unshuffle_fill_reference
from .patch_embed import check_patch_input, patch_embed_reference, patchify, unpatchify


def patch_embed_forward(x, weight, bias, pos, keep, patch: int) -> torch.Tensor:
    return patch_embed_reference(x, weight, bias, pos, keep, patch)


def patch_embed_backward(grad_out, x, weight, keep, patch: int, need_x: bool, need_weight: bool):
    """grad_out: ``(B, N, E)`` in weight's dtype → ``(grad_x in x's dtype or empty, grad_weight in
    weight's dtype or empty)``; fp32 accumulation (fp64 for fp64); patches rounded to weight's dtype."""
    grid = check_patch_input(x, patch)
    E, F = weight.shape
    grad_x, grad_weight = x.new_empty(0), weight.new_empty(0)
    acc = accumulation_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    if need_weight:
        cols = patchify(x, patch)
        if keep is not None:
            cols = torch.gather(cols, 1, keep.unsqueeze(-1).expand(-1, -1, F))
        grad_weight = (g.reshape(-1, E).t() @ cols.reshape(-1, F).to(weight.dtype).to(acc)).to(weight.dtype)
    if need_x:
        gcols = g @ weight.to(acc)  # (B, N, F)
        if keep is not None:
            full = gcols.new_zeros(x.shape[0], int(torch.tensor(grid).prod()), F)
            # add: a patch kept twice gets both rows' gradients (autograd of the reference's gather)
            gcols = full.scatter_add_(1, keep.unsqueeze(-1).expand(-1, -1, F), gcols)
        grad_x = unpatchify(gcols, x.shape[1], grid, patch).to(x.dtype)
    return grad_x, grad_weight


def select_keep(present, lengths: Sequence[int], keeps: Sequence[int], rng):
    return select_keep_reference(present, lengths, keeps, rng)


def gather_visible(tokens, ids_keep, mask) -> torch.Tensor:
    return gather_visible_reference(tokens, ids_keep, mask)


def unshuffle_fill(x, ids_keep, mask, mask_token) -> torch.Tensor:
    """mask_token: ``(E,)``, or None for zeros (the gather's backward)."""
    if mask_token is None:
        mask_token = x.new_zeros(x.shape[-1])
    return unshuffle_fill_reference(x, ids_keep, mask, mask_token)


def hidden_sum(grad, mask) -> torch.Tensor:
    """grad: ``(B, L, E)``, mask: ``(B, L)`` bool → ``(E,)`` in grad's dtype, fp32 accumulation (fp64 for fp64)."""
    acc = accumulation_dtype(grad.dtype)
    return (grad.to(acc) * mask.unsqueeze(-1)).sum((0, 1)).to(grad.dtype)


def fill_backward(grad, ids_keep, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a fill's ``x`` and ``mask_token``: ``(gather_visible, hidden_sum)`` of grad."""
    return gather_visible(grad, ids_keep, mask), hidden_sum(grad, mask)


def masked_mse_forward(pred, x, weight, patch: int, norm_pix: bool):
    return masked_mse_forward_reference(pred, x, weight, patch, norm_pix)


def scale_grad_(grad, scale) -> None:
    """grad *= scale (in place); a no-op when scale == 1 (checked on the device, no sync)."""
    grad.mul_(scale.to(grad.dtype))


def _layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The LayerNorm's arithmetic: float32 for 16-bit and float32 inputs, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def layer_norm_forward(x, weight, bias, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x: ``(M, D)``; weight, bias: ``(D,)`` → ``(M, D)`` in ``out_dtype``: the LayerNorm computed in
    float32 (float64 for a float64 x), as CUDA autocast runs ``layer_norm``, rounded once."""
    ln = _layer_norm_dtype(x)
    out = torch.native_layer_norm(x.to(ln), (x.shape[1],), weight.to(ln), bias.to(ln), eps)[0]
    return out.to(out_dtype)


def layer_norm_backward(x, weight, bias, eps: float, grad_out, xn_dtype: torch.dtype | None, need_x: bool,
                        need_params: bool):
    """The LayerNorm's backward, recomputing its forward from ``x (M, D)``; grad_out: ``(M, D)``, the
    gradient of the output (None when nothing needs it) → (``grad_x`` in x's dtype if ``need_x``, the
    forward's output again in ``xn_dtype`` if given, ``grad_weight`` and ``grad_bias`` ``(D,)`` in the
    LayerNorm's dtype if ``need_params``), None for what was not asked."""
    ln, D = _layer_norm_dtype(x), x.shape[1]
    xl, w, b = x.to(ln), weight.to(ln), bias.to(ln)
    out, mean, rstd = torch.native_layer_norm(xl, (D,), w, b, eps)
    xn = out.to(xn_dtype) if xn_dtype is not None else None
    del out
    if not (need_x or need_params):
        return None, xn, None, None
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad_out.to(ln), xl, (D,), mean, rstd, w, b,
                                                           [need_x, need_params, need_params])
    return (None if gx is None else gx.to(x.dtype)), xn, gw, gb
