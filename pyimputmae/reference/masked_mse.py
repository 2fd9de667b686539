"""Reference masked MSE: the spec of ``pyimputmae.ops.masked_mse``.

``loss = Σ_b Σ_l w[b,l] · mean_p (pred − target)² / Σ w`` with ``w = mask · present``, and 0
(with a zero gradient, never NaN) when ``Σ w = 0``. The target is ``patchify(x)``, optionally
normalised per patch (``norm_pix``: ``(t − mean) / sqrt(var + 1e-6)`` with the unbiased
variance, as in MAE). No gradient flows into ``x``: it is the raw input being reconstructed.
"""

from __future__ import annotations

import torch

from .patch_embed import patchify

NORM_PIX_EPS = 1e-6


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half, bf16 and fp32 inputs; fp64 for fp64 (so gradcheck sees a smooth loss)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradient the forward keeps for a ``dtype`` pred: fp32 for fp16, else pred's own.

    fp16's range cannot hold it: ``2·w·(pred − target)/(P·Σw)`` is ~1e-7 at the paper's MRI size,
    below fp16's normal range (6e-5), and a loss scale (``torch.amp.GradScaler`` starts at 65,536,
    above fp16's largest value) applied to an fp16 copy afterwards cannot bring the lost digits back.
    Kept in fp32, it is scaled there and rounded to fp16 once, as autograd does for an fp32 loss.
    bf16 has fp32's exponent range and keeps its own dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def mse_weights(mask: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """``mask: (B, L)`` (bool/int/float), ``present: (B,)`` → fp32 weights ``(B, L)``."""
    w = mask.to(torch.float32)
    if present is not None:
        w = w * present.to(torch.float32).unsqueeze(1)
    return w


def patch_target(x: torch.Tensor, patch: int, norm_pix: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x: (B, C, *S)`` → target ``(B, L, P)`` in ``dtype``, normalised per patch when ``norm_pix``."""
    t = patchify(x, patch).to(dtype)
    if norm_pix:
        if t.shape[-1] < 2:
            raise ValueError("norm_pix needs at least 2 values per patch (unbiased variance)")
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + NORM_PIX_EPS)
    return t


def masked_mse_reference(
    pred: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    present: torch.Tensor | None,
    patch: int,
    norm_pix: bool = False,
) -> torch.Tensor:
    """pred: ``(B, L, P)``; x: ``(B, C, *S)`` with ``L = Π S/p``, ``P = C·p^k``; mask: ``(B, L)``;
    present: ``(B,)`` → fp32 scalar (fp64 for fp64 pred). Differentiable in pred through plain autograd."""
    acc = accumulation_dtype(pred.dtype)
    target = patch_target(x.detach(), patch, norm_pix, acc)
    w = mse_weights(mask, present).to(acc)
    per_patch = ((pred.to(acc) - target) ** 2).mean(-1)
    den = w.sum()
    return (per_patch * w).sum() / torch.where(den > 0, den, torch.ones_like(den))


def masked_mse_forward_reference(
    pred: torch.Tensor, x: torch.Tensor, w: torch.Tensor, patch: int, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and its gradient in one go, as every backend computes them.

    w: fp32 ``(B, L)`` weights → ``loss`` fp32 scalar (fp64 for fp64 pred), ``grad: (B, L, P)``
    in ``gradient_dtype(pred.dtype)`` (pred's dtype; fp32 for fp16) with
    ``grad = 2·w·(pred − target) / (P·Σw)`` (zero when ``Σw = 0``).
    """
    acc = accumulation_dtype(pred.dtype)
    target = patch_target(x, patch, norm_pix, acc)
    w = w.to(acc)
    diff = pred.to(acc) - target
    den = w.sum()
    den = torch.where(den > 0, den, torch.ones_like(den))
    loss = ((diff * diff).mean(-1) * w).sum() / den
    grad = diff * (w * (2.0 / (pred.shape[-1] * den))).unsqueeze(-1)
    return loss, grad.to(gradient_dtype(pred.dtype))
