"""Fused N-d patch embedding (``pyimputmae::patch_embed``): spec in ``pyimputmae.reference.patch_embed``."""

from __future__ import annotations

import math

import torch

from ..reference.masked_mse import accumulation_dtype
from ..reference.patch_embed import check_patch_input, patch_size
from ._common import (
    autocast_dtype,
    backend_for,
    call,
    check_backend_arg,
    check_indices,
    check_same_device,
    eager_function,
    kernels,
)


@torch.library.custom_op("pyimputmae::patch_embed", mutates_args=())
def _patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    keep: torch.Tensor | None,
    patch: int,
    backend: str,
) -> torch.Tensor:
    mod = backend_for("patch_embed", x.device, backend, x, weight)
    return mod.patch_embed_forward(x, weight, bias, pos, keep, patch)


@_patch_embed.register_fake
def _(x, weight, bias, pos, keep, patch, backend):
    n = keep.shape[1] if keep is not None else math.prod(s // patch for s in x.shape[2:])
    return weight.new_empty(x.shape[0], n, weight.shape[0])


@torch.library.custom_op("pyimputmae::patch_embed_grad", mutates_args=())
def _patch_embed_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    patch: int,
    need_x: bool,
    need_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    mod = backend_for("patch_embed", grad_out.device, backend, grad_out, x)
    return mod.patch_embed_backward(grad_out.contiguous(), x, weight, keep, patch, need_x, need_weight)


@_patch_embed_backward.register_fake
def _(grad_out, x, weight, keep, patch, need_x, need_weight, backend):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return gx, gw


#: what a traced backward calls the kernels through (``_common.kernels``)
_OPS = {"patch_embed_backward": _patch_embed_backward}


def _setup(ctx, inputs, output):
    x, weight, bias, pos, keep, patch, spec = inputs  # spec: a backend name or module (_common)
    ctx.save_for_backward(x, weight, keep)
    ctx.patch, ctx.kernels = patch, kernels(spec, _OPS)
    ctx.has_bias, ctx.pos_rows = bias is not None, (pos.shape[0] if pos is not None else 0)


def _backward(ctx, grad):
    x, weight, keep = ctx.saved_tensors
    need_x, need_w, need_b, need_pos = ctx.needs_input_grad[:4]
    gx = gw = gb = gpos = None
    if need_x or need_w:
        gx, gw = ctx.kernels.patch_embed_backward(grad.contiguous(), x, weight, keep, ctx.patch, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    E = grad.shape[-1]
    acc = accumulation_dtype(grad.dtype)
    if need_b and ctx.has_bias:
        gb = grad.sum((0, 1), dtype=acc).to(grad.dtype)
    if need_pos and ctx.pos_rows:
        if keep is None:
            gpos = grad.sum(0, dtype=acc)  # (L, E); zeros for an empty batch
        else:
            flat = grad.reshape(-1, E).to(acc)
            gpos = flat.new_zeros(ctx.pos_rows, E).index_add_(0, keep.reshape(-1), flat)
        gpos = gpos.to(grad.dtype)
    return gx, gw, gb, gpos, None, None, None


_patch_embed.register_autograd(_backward, setup_context=_setup)
_PatchEmbedEager = eager_function("patch_embed", "patch_embed_forward", _setup, _backward)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    *,
    patch: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Embed the ``p^k`` patches of ``x`` with one GEMM, reading only the kept patches.

    x: ``(B, C, *S)`` with ``k = len(S)`` in {1, 2, 3}, every ``S_i`` divisible by ``patch``;
    weight: ``(E, C·p^k)`` (an ``nn.Conv{k}d`` weight flattened); bias: ``(E,)``; pos: ``(L, E)``;
    keep: ``(B, K)`` int64 patch indices → ``(B, L, E)``, or ``(B, K, E)`` with ``keep``.
    Equals ``conv(x).flatten(2).transpose(1, 2) (+ pos)``. Differentiable in x, weight, bias, pos.
    Runs in autocast's dtype when autocast is on (the patches read are rounded to it; the result and
    the weight gradient are in it, x's gradient in x's dtype), else in x's dtype — in the weight's for
    an integer x (uint8 pixels are read as numbers, like ``conv(x.to(weight.dtype))``).
    """
    backend = check_backend_arg(backend)
    patch = patch_size(patch)
    grid = check_patch_input(x, patch)
    check_same_device("x", x.device, weight=weight, bias=bias, pos=pos, keep=keep)
    C, k, L = x.shape[1], len(grid), math.prod(grid)
    if weight.dim() != 2 or weight.shape[1] != C * patch**k:
        raise ValueError(f"weight must be (E, C·p^k) = (E, {C * patch**k}) for input {tuple(x.shape)} and patch "
                         f"{patch}, got {tuple(weight.shape)}")
    E = weight.shape[0]
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"bias must be ({E},), got {tuple(bias.shape)}")
    if pos is not None and pos.shape != (L, E):
        raise ValueError(f"pos must be (L, E) = ({L}, {E}), got {tuple(pos.shape)}")
    if keep is not None:
        if keep.dim() != 2 or keep.shape[0] != x.shape[0] or keep.dtype != torch.int64:
            raise ValueError(f"keep must be (B, K) int64 with B = {x.shape[0]}, got {tuple(keep.shape)} {keep.dtype}")
        check_indices("keep", keep, L, f"the patch grid of input {tuple(x.shape)} with patch {patch} has {L} patches")
        keep = keep.contiguous()
    # The compute dtype: autocast's, else x's (the weight's for an integer x). x itself is not cast
    # when it is float32, float64, float16 or bfloat16: the kernels round the patches they read to the
    # weight's dtype, so under autocast only the kept patches are read and no half-precision copy of the
    # whole input is made or saved.
    dtype = autocast_dtype(x.device) or (x.dtype if x.is_floating_point() else weight.dtype)
    weight = weight.to(dtype)
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = x.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    pos = pos.to(dtype) if pos is not None else None
    return call(_patch_embed, _PatchEmbedEager, "patch_embed", backend, x.contiguous(), weight.contiguous(),
                bias.contiguous() if bias is not None else None, pos.contiguous() if pos is not None else None, keep,
                patch)
