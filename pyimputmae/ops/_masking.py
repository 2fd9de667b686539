"""Random per-modality masking and MASK_TOKEN fill: spec in ``pyimputmae.reference.masking``.

``random_masking`` = ``select_keep`` (Philox keys, exact-k per segment, no argsort) +
``gather_visible``; ``unshuffle_fill`` puts visible tokens back and fills ``mask_token``. Their
backwards are each other: the gradient of a gather is a fill with a zero token (``mask_token=None``),
the gradient of a fill is a gather plus the sum of the hidden rows (``hidden_sum``) for the token,
both from one backend call (``fill_backward``) that a backend may fuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from ..reference.masking import keep_counts
from ._common import (
    autocast_dtype,
    backend_for,
    call,
    check_backend_arg,
    check_indices,
    check_same_device,
    eager_function,
    kernels,
    traced,
)


@torch.library.custom_op("pyimputmae::random_keep", mutates_args=())
def _select_keep(
    present: torch.Tensor, lengths: Sequence[int], keeps: Sequence[int], rng: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return backend_for("masking", present.device, backend).select_keep(present, list(lengths), list(keeps), rng)


@_select_keep.register_fake
def _(present, lengths, keeps, rng, backend):
    B = present.shape[0]
    return (present.new_empty(B, sum(keeps), dtype=torch.int64), present.new_empty(B, sum(lengths), dtype=torch.bool))


@torch.library.custom_op("pyimputmae::gather_kept", mutates_args=())
def _gather_visible(tokens: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    return backend_for("masking", tokens.device, backend, tokens).gather_visible(tokens, ids_keep, mask)


@_gather_visible.register_fake
def _(tokens, ids_keep, mask, backend):
    return tokens.new_empty(tokens.shape[0], ids_keep.shape[1], tokens.shape[2])


@torch.library.custom_op("pyimputmae::fill_masked", mutates_args=())
def _unshuffle_fill(
    x: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return backend_for("masking", x.device, backend, x).unshuffle_fill(x, ids_keep, mask, mask_token)


@_unshuffle_fill.register_fake
def _(x, ids_keep, mask, mask_token, backend):
    return x.new_empty(x.shape[0], mask.shape[1], x.shape[2])


@torch.library.custom_op("pyimputmae::masked_token_grad", mutates_args=())
def _hidden_sum(grad: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    return backend_for("masking", grad.device, backend, grad).hidden_sum(grad, mask)


@_hidden_sum.register_fake
def _(grad, mask, backend):
    return grad.new_empty(grad.shape[2])


def _fill_backward_ops(grad: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, backend: str):
    """A traced fill's backward: the gather and the hidden sum as two custom ops."""
    return _gather_visible(grad, ids_keep, mask, backend), _hidden_sum(grad, mask, backend)


#: what a traced backward calls the kernels through (``_common.kernels``)
_OPS = {"gather_visible": _gather_visible, "unshuffle_fill": _unshuffle_fill, "hidden_sum": _hidden_sum,
        "fill_backward": _fill_backward_ops}


def _gather_setup(ctx, inputs, output):
    _, ids_keep, mask, spec = inputs  # spec: the backend's name (custom op) or module (eager path)
    ctx.save_for_backward(ids_keep, mask)
    ctx.kernels = kernels(spec, _OPS)


def _gather_backward(ctx, grad):
    ids_keep, mask = ctx.saved_tensors
    return ctx.kernels.unshuffle_fill(grad.contiguous(), ids_keep, mask, None), None, None, None


_gather_visible.register_autograd(_gather_backward, setup_context=_gather_setup)
_GatherEager = eager_function("gather_kept", "gather_visible", _gather_setup, _gather_backward)


def _fill_setup(ctx, inputs, output):
    _, ids_keep, mask, _, spec = inputs
    ctx.save_for_backward(ids_keep, mask)
    ctx.kernels = kernels(spec, _OPS)


def _fill_backward(ctx, grad):
    ids_keep, mask = ctx.saved_tensors
    grad = grad.contiguous()
    need_x, need_token = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if need_x and need_token:
        gx, gt = ctx.kernels.fill_backward(grad, ids_keep, mask)
    else:
        gx = ctx.kernels.gather_visible(grad, ids_keep, mask) if need_x else None
        gt = ctx.kernels.hidden_sum(grad, mask) if need_token else None
    return gx, None, None, gt, None


_unshuffle_fill.register_autograd(_fill_backward, setup_context=_fill_setup)
_FillEager = eager_function("fill_masked", "unshuffle_fill", _fill_setup, _fill_backward)


def _select(present: torch.Tensor, lengths: list[int], keeps: list[int], rng: torch.Tensor, backend: str,
            module: ModuleType | None = None):
    """``select_keep`` on the traced path (the custom op) or the eager one (``module``'s function, by
    default the backend module chosen for ``present``'s device)."""
    present = present.to(torch.bool).contiguous()
    rng = rng.contiguous()  # (a strided view of a state is read as its two values; contiguous: itself)
    if traced():
        return _select_keep(present, lengths, keeps, rng, backend)
    module = module or backend_for("masking", present.device, backend)
    return module.select_keep(present, lengths, keeps, rng)


def _check_layout(B: int, L: int, lengths: Sequence[int], present: torch.Tensor) -> None:
    if sum(lengths) != L:
        raise ValueError(f"segment lengths {list(lengths)} sum to {sum(lengths)}, but the tokens have L = {L}")
    if present.shape != (B, len(lengths)):
        raise ValueError(f"present must be (B, M) = ({B}, {len(lengths)}), got {tuple(present.shape)}")


def random_keep(
    present: torch.Tensor,
    lengths: Sequence[int],
    ratios: Sequence[float] | float,
    rng: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the choice of :func:`random_masking`, before any token exists.

    present: ``(B, M)`` bool; rng: ``(2,)`` int64 device tensor → ``ids_keep: (B, K)`` int64,
    ``mask: (B, L)`` bool — identical to what ``random_masking`` returns for the same inputs.
    Lets a model embed only the visible patches (``patch_embed(..., keep=ids_keep[:, q_m:q_m+K_m] - o_m)``).
    """
    backend = check_backend_arg(backend)
    lengths = [int(n) for n in lengths]
    if present.dim() != 2 or present.shape[1] != len(lengths):
        raise ValueError(f"present must be (B, M) with M = {len(lengths)}, got {tuple(present.shape)}")
    if rng.shape != (2,) or rng.dtype != torch.int64:
        raise ValueError(f"rng must be a (2,) int64 tensor (seed, offset), got {tuple(rng.shape)} {rng.dtype}")
    if rng.device != present.device:
        raise ValueError(f"rng is on {rng.device} but present is on {present.device}: keep rng on the device")
    return _select(present, lengths, keep_counts(lengths, ratios), rng, backend)


def random_masking(
    tokens: torch.Tensor,
    lengths: Sequence[int],
    ratios: Sequence[float] | float,
    present: torch.Tensor,
    rng: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hide a random ``r_m`` of each present modality's tokens; hide missing modalities entirely.

    tokens: ``(B, L, E)``, ``L = Σ lengths``; ratios: one per segment (or one for all);
    present: ``(B, M)`` bool; rng: ``(2,)`` int64 device tensor ``(seed, offset)`` — the same pair
    gives the same mask on every backend and device; advance ``offset`` every step.
    → ``visible: (B, K, E)`` (zeros in a missing modality's slots), ``ids_keep: (B, K)`` int64
    positions (sorted within each segment), ``mask: (B, L)`` bool (True = hidden).
    Differentiable in tokens.
    """
    backend = check_backend_arg(backend)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, L, E), got {tuple(tokens.shape)}")
    B, L, _ = tokens.shape
    lengths = [int(n) for n in lengths]
    _check_layout(B, L, lengths, present)
    check_same_device("tokens", tokens.device, present=present)
    if rng.shape != (2,) or rng.dtype != torch.int64:
        raise ValueError(f"rng must be a (2,) int64 tensor (seed, offset), got {tuple(rng.shape)} {rng.dtype}")
    if rng.device != tokens.device:
        raise ValueError(f"rng is on {rng.device} but tokens are on {tokens.device}: keep rng on the device")
    tokens = tokens.contiguous()
    # one backend choice (for the tokens' dtype) serves the selection and the gather: a selection is the
    # same on every backend, and the choice is host time on every call
    module = None if traced() else backend_for("masking", tokens.device, backend, tokens)
    ids_keep, mask = _select(present, lengths, keep_counts(lengths, ratios), rng, backend, module)
    visible = call(_gather_visible, _GatherEager, "masking", backend, tokens, ids_keep, mask, module=module)
    return visible, ids_keep, mask


def unshuffle_fill(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Return visible tokens to their places and fill every hidden position with ``mask_token``.

    x: ``(B, K, E)``; ids_keep: ``(B, K)`` int64; mask: ``(B, L)`` bool; mask_token: ``(E,)`` →
    ``(B, L, E)``. Differentiable in x and mask_token.
    """
    backend = check_backend_arg(backend)
    if x.dim() != 3 or ids_keep.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, K, E) and ids_keep (B, K); got {tuple(x.shape)} and {tuple(ids_keep.shape)}")
    if mask.dim() != 2 or mask.shape[0] != x.shape[0]:
        raise ValueError(f"mask must be (B, L) with B = {x.shape[0]}, got {tuple(mask.shape)}")
    if mask_token.shape != (x.shape[2],):
        raise ValueError(f"mask_token must be (E,) = ({x.shape[2]},), got {tuple(mask_token.shape)}")
    check_same_device("x", x.device, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
    if ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64 (as random_masking and random_keep return it), got {ids_keep.dtype}")
    check_indices("ids_keep", ids_keep, mask.shape[1], f"mask has L = {mask.shape[1]} positions")
    dtype = autocast_dtype(x.device) or x.dtype
    return call(_unshuffle_fill, _FillEager, "masking", backend, x.to(dtype).contiguous(), ids_keep.contiguous(),
                mask.to(torch.bool).contiguous(), mask_token.to(dtype).contiguous())
