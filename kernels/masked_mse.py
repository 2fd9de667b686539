"""Triton masked MSE: loss and gradient in one pass, the target patchified on the fly.

Spec: ``pyimputmae.reference.masked_mse.masked_mse_forward_reference`` and ``scale_grad_`` in
``pyimputmae.reference.backend``.

Three launches: ``Σw`` (one program: a few thousand weights, kept on the device); the main pass,
where a program takes ``BLOCK_R`` consecutive patches, reads ``pred`` and the target patch straight
from the raw input ``x`` (addresses from ``kernels.patch_embed``), writes
``grad = 2·w·(pred − target)/(P·Σw)`` in pred's dtype (fp32 for fp16) and one partial loss; then a one-program
fixed-order sum of the partials (deterministic, no atomics). Rows with ``w = 0`` load nothing and
write zeros (so a NaN in a row that does not count stays out of the gradient, where the reference
would spread it). Every byte of pred and of the target is read once and every gradient byte
written once: when a patch fits in registers (``P ≤ MAX_TILE``, every size of the paper and the
benchmarks) also with ``norm_pix``, whose per-patch mean and unbiased variance are taken from the
registers; bigger patches loop over ``P`` and, with ``norm_pix``, read the target three times.
Accumulation in fp32, or fp64 for fp64 ``pred``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast_rn, check_sizes, device_guard, interpreting, loop_bound, num_sms
from .patch_embed import patch_feature_offsets, patch_geometry, patch_row_offsets, vector_width

NORM_PIX_EPS = 1e-6
MAX_TILE = 4096  # elements of one program's (rows × features) tile on a GPU: 32 per thread at 4 warps
MAX_TILE_INTERPRET = 1024


@triton.jit
def _sqrt(x, ACC_FP64: tl.constexpr):
    if ACC_FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _weight_sum_kernel(den_ptr, w_ptr, n, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """den = Σ w over all ``n`` weights, in one program (fixed order)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros([BLOCK], dtype=acc_dtype)
    for i0 in range(0, loop_bound(n), BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + i, mask=i < n, other=0.0).to(acc_dtype)
    tl.store(den_ptr, tl.sum(acc, axis=0))


@triton.jit
def _load_target(x_ptr, row_off, f, live, P, D, H, W, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 VEC: tl.constexpr, ACC_FP64: tl.constexpr):
    """Target block ``(rows, features)`` of the live rows, zero elsewhere, in the accumulation dtype."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    feat = patch_feature_offsets(f, D, H, W, PD, PH, PW, VEC)
    ok = live[:, None] & (f < P)[None, :]
    return tl.load(x_ptr + row_off[:, None] + feat[None, :], mask=ok, other=0.0).to(acc_dtype), ok


@triton.jit
def _masked_mse_kernel(
    grad_ptr, partial_ptr, pred_ptr, x_ptr, w_ptr, den_ptr,
    n_rows, L, P, sample, D, H, W, GH, GW,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr,
    NORM_PIX: tl.constexpr, ACC_FP64: tl.constexpr, SINGLE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Rows ``r = b·L + l`` in ``[pid·BLOCK_R, (pid+1)·BLOCK_R)``: grad of every row, one loss partial
    ``Σ_r w_r·Σ_p (pred − target)²``. SINGLE: the whole patch is one ``BLOCK_P`` block."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    b = r // L
    w = tl.load(w_ptr + r, mask=r_ok, other=0.0).to(acc_dtype)
    live = r_ok & (w != 0)
    den = tl.load(den_ptr)
    den = tl.where(den > 0, den, 1.0)
    scale = w * (2.0 / (P * den))
    row_off = tl.multiple_of(patch_row_offsets(b, r - b * L, sample, H, W, GH, GW, PD, PH, PW), VEC)
    grad_row = grad_ptr + r * P
    pred_row = pred_ptr + r * P
    if SINGLE:
        f = tl.arange(0, BLOCK_P)
        t, ok = _load_target(x_ptr, row_off, f, live, P, D, H, W, PD, PH, PW, VEC, ACC_FP64)
        if NORM_PIX:
            mean = tl.sum(t, axis=1) / P
            dev = tl.where(ok, t - mean[:, None], 0.0)
            std = _sqrt(tl.sum(dev * dev, axis=1) / (P - 1) + EPS, ACC_FP64)
            t = dev / std[:, None]
        pred = tl.load(pred_row[:, None] + f[None, :], mask=ok, other=0.0).to(acc_dtype)
        diff = pred - t
        tl.store(grad_row[:, None] + f[None, :], cast_rn(diff * scale[:, None], grad_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & (f < P)[None, :])
        sq = tl.sum(diff * diff, axis=1)
    else:
        if NORM_PIX:
            total = tl.zeros([BLOCK_R], dtype=acc_dtype)
            for p0 in range(0, loop_bound(P), BLOCK_P):
                t, ok = _load_target(x_ptr, row_off, p0 + tl.arange(0, BLOCK_P), live, P, D, H, W,
                                     PD, PH, PW, VEC, ACC_FP64)
                total += tl.sum(t, axis=1)
            mean = total / P
            total = tl.zeros([BLOCK_R], dtype=acc_dtype)
            for p0 in range(0, loop_bound(P), BLOCK_P):
                t, ok = _load_target(x_ptr, row_off, p0 + tl.arange(0, BLOCK_P), live, P, D, H, W,
                                     PD, PH, PW, VEC, ACC_FP64)
                dev = tl.where(ok, t - mean[:, None], 0.0)
                total += tl.sum(dev * dev, axis=1)
            std = _sqrt(total / (P - 1) + EPS, ACC_FP64)
        sq = tl.zeros([BLOCK_R], dtype=acc_dtype)
        for p0 in range(0, loop_bound(P), BLOCK_P):
            f = p0 + tl.arange(0, BLOCK_P)
            t, ok = _load_target(x_ptr, row_off, f, live, P, D, H, W, PD, PH, PW, VEC, ACC_FP64)
            if NORM_PIX:
                t = tl.where(ok, t - mean[:, None], 0.0) / std[:, None]
            pred = tl.load(pred_row[:, None] + f[None, :], mask=ok, other=0.0).to(acc_dtype)
            diff = pred - t
            tl.store(grad_row[:, None] + f[None, :], cast_rn(diff * scale[:, None], grad_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & (f < P)[None, :])
            sq += tl.sum(diff * diff, axis=1)
    tl.store(partial_ptr + pid, tl.sum(w * sq, axis=0))


@triton.jit
def _loss_kernel(loss_ptr, partial_ptr, den_ptr, n_part, P, BLOCK: tl.constexpr):
    """loss = Σ partials / (P·Σw), in one program (fixed order); 0 when Σw = 0 (the partials are 0)."""
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for i0 in range(0, loop_bound(n_part), BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + i, mask=i < n_part, other=0.0)
    den = tl.load(den_ptr)
    den = tl.where(den > 0, den, 1.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0) / (P * den))


@triton.jit
def _scale_grad_kernel(grad_ptr, scale_ptr, n, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= scale in place, grid-stride; every program returns at once when scale == 1."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    s = cast_rn(tl.load(scale_ptr), grad_ptr.dtype.element_ty)
    if s != 1:
        s_acc = s.to(acc_dtype)
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(loop_bound(pid * BLOCK), loop_bound(n), loop_bound(step)):
            i = start + tl.arange(0, BLOCK)
            ok = i < n
            g = tl.load(grad_ptr + i, mask=ok, other=0.0)
            tl.store(grad_ptr + i, cast_rn(g.to(acc_dtype) * s_acc, grad_ptr.dtype.element_ty), mask=ok)


def _tile(P: int) -> tuple[bool, int, int, int]:
    """(SINGLE, BLOCK_R, BLOCK_P, num_warps) for patches of ``P`` features."""
    max_tile = MAX_TILE_INTERPRET if interpreting() else MAX_TILE
    block_p = triton.next_power_of_2(P)
    if block_p <= max_tile:
        block_r = max(1, min(max_tile // block_p, 16))
        single = True
    else:
        block_p, block_r, single = max_tile, 1, False
    return single, block_r, block_p, (8 if block_r * block_p >= 8192 else 4)


def masked_mse_forward(
    pred: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch: int, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred: ``(B, L, P)``; x: ``(B, C, *S)`` raw input; weight: ``(B, L)`` fp32 (mask·present) →
    loss: 0-d fp32 (fp64 for fp64 pred); grad: ``(B, L, P)`` in pred's dtype (fp32 for fp16 pred),
    ``2·w·(pred − target)/(P·Σw)``, zero when ``Σw = 0``."""
    geo = patch_geometry(x, patch)
    B, L, P = pred.shape
    if (B, L, P) != (x.shape[0], geo["L"], geo["F"]):
        raise ValueError(f"pred must be (B, L, P) = ({x.shape[0]}, {geo['L']}, {geo['F']}) for input "
                         f"{tuple(x.shape)} and patch {patch}, got {tuple(pred.shape)}")
    if weight.shape != (B, L):
        raise ValueError(f"weight must be (B, L) = ({B}, {L}), got {tuple(weight.shape)}")
    if norm_pix and P < 2:
        raise ValueError("norm_pix needs at least 2 values per patch (unbiased variance)")
    n_rows = B * L
    check_sizes("masked_mse", **{"B*L": n_rows})  # before the (B, L, P) gradient is allocated
    acc_fp64 = pred.dtype == torch.float64
    acc_dtype = torch.float64 if acc_fp64 else torch.float32
    # fp16 keeps its gradient in fp32 (see reference.masked_mse.gradient_dtype): its range cannot hold it
    grad = torch.empty_like(pred, dtype=torch.float32 if pred.dtype == torch.float16 else pred.dtype)
    loss = torch.empty((), dtype=acc_dtype, device=pred.device)
    den = torch.empty(1, dtype=acc_dtype, device=pred.device)
    single, block_r, block_p, warps = _tile(P)
    n_prog = triton.cdiv(n_rows, block_r)
    partial = torch.empty(max(n_prog, 1), dtype=acc_dtype, device=pred.device)
    block = 256 if interpreting() else 1024
    with device_guard(pred):
        _weight_sum_kernel[(1,)](den, weight, n_rows, ACC_FP64=acc_fp64, BLOCK=block, num_warps=4)
        if n_rows > 0 and P > 0:
            _masked_mse_kernel[(n_prog,)](
                grad, partial, pred, x, weight, den,
                n_rows, L, P, geo["sample"], geo["D"], geo["H"], geo["W"], geo["GH"], geo["GW"],
                PD=geo["PD"], PH=geo["PH"], PW=geo["PW"], VEC=vector_width(geo["PW"], block_p),
                NORM_PIX=norm_pix, ACC_FP64=acc_fp64, SINGLE=single, EPS=NORM_PIX_EPS,
                BLOCK_R=block_r, BLOCK_P=block_p, num_warps=warps,
            )
        else:
            n_prog = 0
        _loss_kernel[(1,)](loss, partial, den, n_prog, P, BLOCK=block, num_warps=4)
    return loss, grad


def scale_grad_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale[0] in place (the product taken as the reference does: scale cast to grad's dtype);
    scale is read on the device and the kernel returns at once when it is 1 (no host sync)."""
    n = grad.numel()
    if n == 0:
        return
    block = 256 if interpreting() else 2048
    grid = (max(1, min(triton.cdiv(n, block), 8 * num_sms(grad))),)
    with device_guard(grad):
        _scale_grad_kernel[grid](grad, scale, n, ACC_FP64=grad.dtype == torch.float64, BLOCK=block,
                                 num_warps=8 if block >= 2048 else 4)
