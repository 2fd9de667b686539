"""Masked MSE with the gradient computed in the forward pass (``pyimputmae::masked_mse``).

Spec: ``pyimputmae.reference.masked_mse``. The forward returns the loss and keeps ``d loss / d pred``;
the backward scales that saved gradient in place by the incoming gradient (a kernel that reads
it on the device and returns at once when it is 1), so no ``(pred − target)`` tensor and no
second pass over ``pred`` exist. For fp16 ``pred`` the kept gradient is fp32
(``reference.masked_mse.gradient_dtype``) and the backward rounds it to fp16 after scaling.
A repeated backward through the same graph (``retain_graph=True``) rescales out of place from the
first call's scale.
"""

from __future__ import annotations

import torch

from ..reference.masked_mse import accumulation_dtype, gradient_dtype, mse_weights
from ..reference.patch_embed import check_patch_input, patch_size
from ._common import backend_for, call, check_backend_arg, check_same_device, eager_function, kernels


@torch.library.custom_op("pyimputmae::masked_mse", mutates_args=())
def _masked_mse(
    pred: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch: int, norm_pix: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return backend_for("masked_mse", pred.device, backend, pred, x).masked_mse_forward(pred, x, weight, patch, norm_pix)


@_masked_mse.register_fake
def _(pred, x, weight, patch, norm_pix, backend):
    loss = pred.new_empty((), dtype=accumulation_dtype(pred.dtype))
    return loss, torch.empty_like(pred, dtype=gradient_dtype(pred.dtype))


@torch.library.custom_op("pyimputmae::scale_grad", mutates_args=("grad",))
def _scale_grad(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    backend_for("masked_mse", grad.device, backend, grad).scale_grad_(grad, scale)


@_scale_grad.register_fake
def _(grad, scale, backend):
    return None


#: what a traced backward calls the kernels through (``_common.kernels``)
_OPS = {"scale_grad_": _scale_grad}


def _setup(ctx, inputs, output):
    ctx.kernels = kernels(inputs[-1], _OPS)  # a backend name or module (_common)
    # held as an attribute, not through save_for_backward: the backward scales it in place
    ctx.grad, ctx.applied, ctx.pred_dtype = output[1], None, inputs[0].dtype
    ctx.mark_non_differentiable(output[1])
    # the gradient output takes no gradient: without this, autograd would allocate a zero tensor
    # of pred's size for it on every backward (twice the memory the op needs)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:  # nothing flows back into the loss (no materialised zero gradient)
        return None, None, None, None, None, None
    scale = grad_loss.reshape(1).to(accumulation_dtype(ctx.grad.dtype))
    if ctx.applied is None:
        # the usual single backward: scale the saved gradient in place, no extra pass when scale == 1
        ctx.kernels.scale_grad_(ctx.grad, scale)
        ctx.applied, ctx.version = scale, ctx.grad._version
        # fp16 pred: the gradient was kept in fp32 (gradient_dtype) and is rounded once, after scaling
        return ctx.grad.to(ctx.pred_dtype), None, None, None, None, None
    # a repeated backward through the same graph (retain_graph=True, gradcheck): the saved gradient
    # already carries the first scale; undo it out of place (NaN, not a silent error, if that was 0).
    # The first backward handed that tensor itself to autograd, which may keep it (or a view of it) as
    # a .grad and change it in place (accumulation, clipping): then it no longer holds the gradient.
    if ctx.grad._version != ctx.version:
        raise RuntimeError(
            "masked_mse: a second backward through the same graph, after the gradient the first one "
            "returned was changed in place (accumulated into a .grad, clipped, ...); it can no longer "
            "be computed from the saved gradient. Recompute the loss for each backward.")
    ratio = torch.where(ctx.applied != 0, scale / ctx.applied, torch.full_like(scale, float("nan")))
    return (ctx.grad * ratio.to(ctx.grad.dtype)).to(ctx.pred_dtype), None, None, None, None, None


_masked_mse.register_autograd(_backward, setup_context=_setup)
_MaskedMSEEager = eager_function("masked_mse", "masked_mse_forward", _setup, _backward)


def masked_mse(
    pred: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    present: torch.Tensor | None = None,
    *,
    patch: int,
    norm_pix: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean squared error over the hidden patches of the present rows, target patchified on the fly.

    pred: ``(B, L, P)``; x: ``(B, C, *S)`` raw input with ``L = Π S_i/p`` and ``P = C·p^k``;
    mask: ``(B, L)`` (1 = hidden, counted); present: ``(B,)`` → fp32 scalar (fp64 for fp64 pred)
    ``Σ mask·present·mean_p(pred − target)² / Σ mask·present``, 0 with a zero gradient when nothing
    is counted. fp32 accumulation for every dtype; no gradient to ``x``.

    The gradient is computed in the forward and lives on the loss's graph (it is what backward
    returns, so no second buffer exists); like any tensor the graph holds, it is freed with the loss:
    in a training loop, drop or detach the loss after ``backward()`` rather than holding it through
    the next forward.
    """
    backend = check_backend_arg(backend)
    patch = patch_size(patch)
    grid = check_patch_input(x, patch)
    B, C, k = x.shape[0], x.shape[1], len(grid)
    L = 1
    for g in grid:
        L *= g
    P = C * patch**k
    if pred.shape != (B, L, P):
        raise ValueError(f"pred must be (B, L, P) = ({B}, {L}, {P}) for input {tuple(x.shape)} and patch {patch}, "
                         f"got {tuple(pred.shape)}")
    if mask.shape != (B, L):
        raise ValueError(f"mask must be (B, L) = ({B}, {L}), got {tuple(mask.shape)}")
    if present is not None and present.shape != (B,):
        raise ValueError(f"present must be (B,) = ({B},), got {tuple(present.shape)}")
    if norm_pix and P < 2:
        raise ValueError("norm_pix needs at least 2 values per patch")
    check_same_device("pred", pred.device, x=x, mask=mask, present=present)
    if not x.is_floating_point():  # an integer target (uint8 pixels): its values, in the accumulation dtype
        x = x.to(accumulation_dtype(pred.dtype))
    return call(_masked_mse, _MaskedMSEEager, "masked_mse", backend, pred.contiguous(), x.detach().contiguous(),
                mse_weights(mask, present).contiguous(), patch, norm_pix)[0]
