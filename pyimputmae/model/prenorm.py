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

The LayerNorm runs on the ``layer_norm`` family's backend (``pyimputmae._backends``): PyTorch's
(``reference``: a float32 copy of the input, ``native_layer_norm``, the output rounded for the
matmul) or Triton's fused kernels (``kernels/layer_norm.py``: the same arithmetic without the
float32 copies; on CUDA once validated on a GPU, or asked for with ``PYIMPUTMAE_BACKEND``). The
backward computes the gradient of the normalised output first and then, in one call, the
LayerNorm's gradients and the normalised output again for the matmul's weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _backends
from ..reference import backend as _reference_backend


def _mm_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's when it is on for ``x``'s device, else the weight's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _layer_norm_backend(x: torch.Tensor) -> ModuleType:
    """The kernels of the sublayer's LayerNorm for ``x (..., D)``: the ``layer_norm`` family's backend
    (``pyimputmae._backends``: Triton's fused kernels on CUDA once validated there, else PyTorch's),
    PyTorch's where the Triton kernels do not take ``x`` (float64, ``D`` above their limit) and while
    ``torch.compile`` traces (Inductor fuses the casts around PyTorch's LayerNorm itself)."""
    if torch.compiler.is_compiling():
        return _reference_backend
    name = _backends.resolve("layer_norm", x.device, dtypes=(x.dtype,))
    backend = _backends.module(name)
    if name == "triton" and not backend.layer_norm_supports(x):
        return _reference_backend
    return backend


def _norm_backward(ln, grad_xn: Callable[[], torch.Tensor], x: torch.Tensor, norm_w: torch.Tensor,
                   norm_b: torch.Tensor, eps: float, xn_dtype: torch.dtype | None, needs: tuple[bool, bool, bool]):
    """The LayerNorm's backward through backend ``ln``, recomputing its output → (grad of x in x's dtype,
    the normalised ``(M, D)`` output in ``xn_dtype`` (None when not given), grads of the LayerNorm's
    weight and bias in their dtypes), None for what ``needs`` (x, weight, bias) does not ask.
    ``grad_xn()``: the ``(M, D)`` gradient of the LayerNorm's output, computed only when needed."""
    need_x, need_nw, need_nb = needs
    need_params = need_nw or need_nb
    gxn = grad_xn() if need_x or need_params else None
    gx, xn, gnw, gnb = ln.layer_norm_backward(x.reshape(-1, x.shape[-1]), norm_w, norm_b, eps, gxn, xn_dtype,
                                              need_x, need_params)
    del gxn
    gx = None if gx is None else gx.view(x.shape)
    return gx, xn, (_cast_back(gnw, norm_w) if need_nw else None), (_cast_back(gnb, norm_b) if need_nb else None)


def _cast_back(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class _NormLinear(torch.autograd.Function):
    """``F.linear(F.layer_norm(x), w, b)`` keeping only ``x`` (and the parameters) for backward."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, w, b):
        mm_dtype, ln = _mm_dtype(x, w), _layer_norm_backend(x)
        with torch.autocast(x.device.type, enabled=False):
            xn = ln.layer_norm_forward(x.reshape(-1, x.shape[-1]), norm_w, norm_b, eps, mm_dtype)
            out = F.linear(xn, w.to(mm_dtype), b.to(mm_dtype))
        ctx.save_for_backward(x, norm_w, norm_b, w, b)
        ctx.eps, ctx.mm_dtype, ctx.ln = eps, mm_dtype, ln
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_w, norm_b, w, b = ctx.saved_tensors
        mm_dtype = ctx.mm_dtype
        need_x, need_nw, need_nb, _, need_w, need_b = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, w.shape[0]).to(mm_dtype)
            gx, xn, gnw, gnb = _norm_backward(ctx.ln, lambda: g @ w.to(mm_dtype), x, norm_w, norm_b, ctx.eps,
                                              mm_dtype if need_w else None, (need_x, need_nw, need_nb))
            gw = g.t() @ xn if need_w else None
            gb = g.sum(0, dtype=b.dtype) if need_b else None
        return gx, gnw, gnb, None, _cast_back(gw, w), gb


class _NormMLP(torch.autograd.Function):
    """``fc2(gelu(fc1(layer_norm(x))))`` keeping ``x`` and the pre-activation ``fc1(...)`` for backward."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, eps, w1, b1, w2, b2):
        mm_dtype, ln = _mm_dtype(x, w1), _layer_norm_backend(x)
        with torch.autocast(x.device.type, enabled=False):
            xn = ln.layer_norm_forward(x.reshape(-1, x.shape[-1]), norm_w, norm_b, eps, mm_dtype)
            h = F.linear(xn, w1.to(mm_dtype), b1.to(mm_dtype))  # (M, mlp)
            del xn
            out = F.linear(F.gelu(h), w2.to(mm_dtype), b2.to(mm_dtype))
        ctx.save_for_backward(x, norm_w, norm_b, w1, b1, w2, b2, h)
        ctx.eps, ctx.mm_dtype, ctx.ln = eps, mm_dtype, ln
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable  # h was computed without a graph: second-order terms through it would be lost
    def backward(ctx, grad):
        x, norm_w, norm_b, w1, b1, w2, b2, h = ctx.saved_tensors
        mm_dtype = ctx.mm_dtype
        need_x, need_nw, need_nb, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            g = grad.reshape(-1, w2.shape[0]).to(mm_dtype)
            gw2 = g.t() @ F.gelu(h) if need_w2 else None  # the GELU output, recomputed and dropped at once
            gb2 = g.sum(0, dtype=b2.dtype) if need_b2 else None
            gh = torch.ops.aten.gelu_backward(g @ w2.to(mm_dtype), h)
            del g
            gx, xn, gnw, gnb = _norm_backward(ctx.ln, lambda: gh @ w1.to(mm_dtype), x, norm_w, norm_b, ctx.eps,
                                              mm_dtype if need_w1 else None, (need_x, need_nw, need_nb))
            gw1 = gh.t() @ xn if need_w1 else None
            gb1 = gh.sum(0, dtype=b1.dtype) if need_b1 else None
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
