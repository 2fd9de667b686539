"""Reference N-d patch embedding: the spec of ``pyimputmae.ops.patch_embed``.

A patch's features are ordered ``(c, i, j, l)`` like the weight of ``nn.Conv{k}d(C, E, p,
stride=p)``, and patches are numbered row-major over the patch grid, so with every patch kept
the result equals ``conv(x).flatten(2).transpose(1, 2) (+ pos)``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F


def patch_size(patch: int) -> int:
    """``patch`` as a Python int (a numpy integer or a 0-d integer tensor too): what the kernels take."""
    try:
        return operator.index(patch)
    except TypeError:
        raise TypeError(f"patch size must be an integer, got {patch!r} ({type(patch).__name__})") from None


def check_patch_input(x: torch.Tensor, patch: int) -> tuple[int, ...]:
    """Validate ``x: (B, C, *S)`` against the patch size; return the patch grid ``S // p``."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            f"patch input must be (B, C, *S) with 1 to 3 spatial dims, got shape {tuple(x.shape)}"
        )
    if patch < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    spatial = tuple(x.shape[2:])
    for axis, size in enumerate(spatial):
        if size % patch:
            raise ValueError(
                f"spatial size {size} (axis {axis + 2} of input shape {tuple(x.shape)}) "
                f"is not divisible by the patch size {patch}"
            )
    return tuple(s // patch for s in spatial)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x: (B, C, *S)`` → ``(B, L, C·p^k)``: patches row-major, features ``(c, i, j, l)``."""
    grid = check_patch_input(x, patch)
    B, C, k = x.shape[0], x.shape[1], len(grid)
    split = [B, C]
    for g in grid:
        split += [g, patch]
    # (B, C, G1, p, G2, p, ...) → (B, G1, G2, ..., C, p, p, ...)
    perm = [0] + [2 + 2 * a for a in range(k)] + [1] + [3 + 2 * a for a in range(k)]
    return x.reshape(split).permute(perm).reshape(B, math.prod(grid), C * patch**k)


def unpatchify(patches: torch.Tensor, channels: int, grid: tuple[int, ...], patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, C·p^k)`` → ``(B, C, *(g·p for g in grid))``."""
    B, k = patches.shape[0], len(grid)
    t = patches.reshape([B, *grid, channels] + [patch] * k)
    # (B, G1, .., Gk, C, p, .., p) → (B, C, G1, p, G2, p, ...)
    perm = [0, k + 1]
    for a in range(k):
        perm += [1 + a, k + 2 + a]
    return t.permute(perm).reshape([B, channels, *(g * patch for g in grid)])


def patch_embed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    keep: torch.Tensor | None,
    patch: int,
) -> torch.Tensor:
    """Embed the patches of ``x``.

    x: ``(B, C, *S)``; weight: ``(E, C·p^k)``; bias: ``(E,)``; pos: ``(L, E)``;
    keep: ``(B, K)`` int64 patch indices in ``[0, L)`` → ``(B, L, E)``, or ``(B, K, E)`` with keep,
    in weight's dtype. x may have another float dtype than the weight (fp32 input, bf16 weights
    under autocast): the patches read are rounded to weight's dtype, and only they are read.
    Differentiable in x, weight, bias and pos through plain autograd.
    """
    patches = patchify(x, patch)  # (B, L, F)
    if keep is not None:
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    out = F.linear(patches.to(weight.dtype), weight, bias)
    if pos is not None:
        out = out + (pos[keep] if keep is not None else pos)
    return out
