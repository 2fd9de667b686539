"""Pre-norm sublayers that keep less for backward: LayerNorm → Linear, and LayerNorm → Linear → GELU → Linear.

Written with autograd under CUDA bf16 autocast, a pre-norm block keeps, per token: a float32 copy of
the residual stream for each LayerNorm (``layer_norm`` autocasts to float32, and keeps the copy it
normalised), the normalised values again in bf16 for the matmul after it, and in the MLP both the
hidden pre-activation and the GELU output (2·mlp values). :func:`norm_linear` and :func:`norm_mlp`
keep only their input (the residual stream itself, which the block holds anyway until it adds to
it) and the MLP's pre-activation. Backward recomputes the LayerNorm (a pass over D values per
token) and the GELU (a pass over mlp values), elementwise work beside the matmuls around it, and
never recomputes a matmul. By that count an encoder block of the authors' configuration (D = 256,
mlp = 1024, bf16) keeps 5 KiB per token instead of 9: the float32 LayerNorm copies (2 × 1 KiB), the
bf16 normalised copies (2 × 0.5 KiB) and the GELU output (2 KiB) go, the bf16 residual-stream input
of each sublayer (2 × 0.5 KiB) stays. ``tools/saved_activations.py`` measures the whole model.

Dtypes follow the autograd path under CUDA autocast: the LayerNorm runs in float32 (float64 for a
float64 input); the matmuls run in the autocast dtype when autocast is on for the input's device,
else in the weight's dtype, and give the output in that dtype. Gradients come back in the dtypes of
the tensors they belong to. Both functions take any leading shape: ``x: (..., D)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _dtypes(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """→ (LayerNorm dtype, matmul dtype) for input ``x`` and a matmul with ``weight``."""
    device = x.device.type
    mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return torch.promote_types(x.dtype, torch.float32), mm


def _normalise(x2: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float, dtype: torch.dtype):
    """x2: ``(M, D)`` → LayerNorm in ``dtype``: (input in ``dtype``, output ``(M, D)``, mean, rstd ``(M, 1)``)."""
    xl = x2.to(dtype)
    out, mean, rstd = torch.native_layer_norm(xl, (x2.shape[1],), norm_w.to(dtype), norm_b.to(dtype), eps)
    return xl, out, mean, rstd


def _norm_grads(grad_out: Callable[[], torch.Tensor], x: torch.Tensor, xl: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, needs: tuple[bool, bool, bool]):
    """The LayerNorm's backward → grads of (x, weight, bias), each in its tensor's dtype or None when
    not needed. ``grad_out()``: the ``(M, D)`` gradient of its output (computed only when needed);
    ``xl``, ``mean``, ``rstd``: from :func:`_normalise` of ``x``."""
    if not any(needs):
        return None, None, None
    lw, lb = norm_w.to(xl.dtype), norm_b.to(xl.dtype)
    gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(grad_out().to(xl.dtype), xl, (xl.shape[1],), mean,
                                                             rstd, lw, lb, list(needs))
    return (None if gx is None else gx.to(x.dtype).view(x.shape)), _cast_back(gnw, norm_w), _cast_back(gnb, norm_b)


def _cast_back(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class _NormLinear(torch.autograd.Function):
    """``F.linear(F.layer_norm(x), w, b)`` keeping only ``x`` (and the parameters) for backward."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, w, b):
        ln_dtype, mm_dtype = _dtypes(x, w)
        with torch.autocast(x.device.type, enabled=False):
            _, xn, _, _ = _normalise(x.reshape(-1, x.shape[-1]), norm_w, norm_b, eps, ln_dtype)
            out = F.linear(xn.to(mm_dtype), w.to(mm_dtype), b.to(mm_dtype))
        ctx.save_for_backward(x, norm_w, norm_b, w, b)
        ctx.eps, ctx.dtypes = eps, (ln_dtype, mm_dtype)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_w, norm_b, w, b = ctx.saved_tensors
        ln_dtype, mm_dtype = ctx.dtypes
        need_x, need_nw, need_nb, _, need_w, need_b = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, w.shape[0]).to(mm_dtype)
            xl, xn, mean, rstd = _normalise(x.reshape(-1, x.shape[-1]), norm_w, norm_b, ctx.eps, ln_dtype)
            gw = g.t() @ xn.to(mm_dtype) if need_w else None
            del xn  # from here on only the LayerNorm's input and statistics: less memory held in backward
            gb = g.sum(0, dtype=b.dtype) if need_b else None
            gx, gnw, gnb = _norm_grads(lambda: g @ w.to(mm_dtype), x, xl, mean, rstd, norm_w, norm_b,
                                       (need_x, need_nw, need_nb))
        return gx, gnw, gnb, None, _cast_back(gw, w), gb


class _NormMLP(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` keeping ``x`` and the pre-activation ``fc1(...)`` for backward."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, w1, b1, w2, b2):
        ln_dtype, mm_dtype = _dtypes(x, w1)
        with torch.autocast(x.device.type, enabled=False):
            _, xn, _, _ = _normalise(x.reshape(-1, x.shape[-1]), norm_w, norm_b, eps, ln_dtype)
            h = F.linear(xn.to(mm_dtype), w1.to(mm_dtype), b1.to(mm_dtype))  # (M, mlp)
            out = F.linear(F.gelu(h), w2.to(mm_dtype), b2.to(mm_dtype))
        ctx.save_for_backward(x, norm_w, norm_b, w1, b1, w2, b2, h)
        ctx.eps, ctx.dtypes = eps, (ln_dtype, mm_dtype)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable  # h was computed without a graph: second-order terms through it would be lost
    def backward(ctx, grad):
        x, norm_w, norm_b, w1, b1, w2, b2, h = ctx.saved_tensors
        ln_dtype, mm_dtype = ctx.dtypes
        need_x, need_nw, need_nb, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, w2.shape[0]).to(mm_dtype)
            gw2 = g.t() @ F.gelu(h) if need_w2 else None  # the GELU output, recomputed and dropped at once
            gb2 = g.sum(0, dtype=b2.dtype) if need_b2 else None
            gh = torch.ops.aten.gelu_backward(g @ w2.to(mm_dtype), h)
            xl, xn, mean, rstd = _normalise(x.reshape(-1, x.shape[-1]), norm_w, norm_b, ctx.eps, ln_dtype)
            gw1 = gh.t() @ xn.to(mm_dtype) if need_w1 else None
            del xn
            gb1 = gh.sum(0, dtype=b1.dtype) if need_b1 else None
            gx, gnw, gnb = _norm_grads(lambda: gh @ w1.to(mm_dtype), x, xl, mean, rstd, norm_w, norm_b,
                                       (need_x, need_nw, need_nb))
        return gx, gnw, gnb, None, _cast_back(gw1, w1), gb1, _cast_back(gw2, w2), gb2


def _complete(*modules: nn.Module) -> bool:
    """Do all these LayerNorms / Linears have a weight and a bias (what the fused functions take)?"""
    return all(getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None for m in modules)


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(x))``, keeping only ``x`` for backward. x: ``(..., D)`` → ``(..., linear.out_features)``.
    Gradients are first-order only. Without an affine LayerNorm or a Linear bias: the plain path."""
    if not _complete(norm, linear):
        return linear(norm(x))
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(gelu(fc1(norm(x))))`` (exact GELU), keeping ``x`` and ``fc1``'s output for backward.
    x: ``(..., D)`` → ``(..., fc2.out_features)``. Gradients are first-order only. Without an affine
    LayerNorm or Linear biases: the plain path."""
    if not _complete(norm, fc1, fc2):
        return fc2(F.gelu(fc1(norm(x))))
    return _NormMLP.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
