"""Triton LayerNorm for the pre-norm sublayers (``pyimputmae.model.prenorm``): 16-bit in and out,
float32 inside.

Under CUDA bf16 autocast the PyTorch path of one pre-norm LayerNorm is a cast of the bf16 residual
stream to float32, ``native_layer_norm`` in float32 and a cast of its float32 output to bf16 for
the matmul after it: three kernels and three passes over float32 copies. Its backward (recomputing
the forward, as the sublayers do) is seven: the input cast, the LayerNorm, the output cast, the
gradient's cast to float32, the two kernels of ``native_layer_norm_backward`` and the cast of the
input gradient back. Here the forward is one kernel and the backward two, with the same arithmetic:

- :func:`layer_norm_forward`: ``x (M, D)`` in any of fp16 / bf16 / fp32, float32 statistics
  (two passes over the row in registers: mean, then the biased variance of ``x − mean``),
  ``(x − mean)·rstd·weight + bias`` in float32, written once in ``out_dtype`` (rounded to nearest).
- :func:`layer_norm_backward`: one pass over ``x`` and ``grad_out`` recomputes the statistics and
  writes any of ``grad_x`` (in x's dtype), the normalised output again (``xn``, in the dtype the
  matmul before it needs for its weight gradient) and fixed-order float32 partial sums of
  ``grad_weight = Σ grad_out·x̂`` and ``grad_bias = Σ grad_out`` per program; then one sum of the
  partials over the programs (PyTorch: ``(2, G, D).sum(1)``, deterministic).

The weight and bias are read in their own dtype and used in float32, as ``norm.weight.float()``.
Rows are independent: a program takes ``ROWS`` rows of ``D ≤ MAX_D`` values in registers; the
backward's programs stride over the row blocks so that the partials stay few (a few per SM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INDEX_LIMIT, cast_rn, check_sizes, device_guard, interpreting, loop_bound, num_sms

#: the widest row the kernels hold in registers; wider rows take the PyTorch path
MAX_D = 8192
#: the dtypes of x the kernels take (float32 statistics); float64 takes the PyTorch path
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: values of one program's (rows × D) tile on a GPU (forward; the backward, which holds four such
#: tiles, half of it), and under the interpreter
TILE = 4096
TILE_INTERPRET = 512


@triton.jit
def _stats(x, cols_ok, D, eps):
    """float32 rows ``x (ROWS, BLOCK_D)`` (zero outside ``cols_ok``) → (``x − mean`` zeroed outside, rstd)."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(cols_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc, 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _layer_norm_fwd_kernel(y_ptr, x_ptr, w_ptr, b_ptr, M, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid·ROWS, (pid+1)·ROWS)``: ``y = (x − mean)·rstd·w + b`` in y's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    ok = (rows < M)[:, None] & cols_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xc, rstd = _stats(x, cols_ok, D, eps)
    w = tl.load(w_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, cast_rn(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _layer_norm_bwd_kernel(
    dx_ptr, xn_ptr, part_ptr, x_ptr, dy_ptr, w_ptr, b_ptr,
    M, D, eps, n_iter, n_prog,
    WRITE_DX: tl.constexpr, WRITE_XN: tl.constexpr, WRITE_DWB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row blocks ``pid, pid + n_prog, …`` (``n_iter`` of them): recompute the statistics; write
    ``xn = x̂·w + b`` (WRITE_XN), ``dx = rstd·(w·dy − x̂·mean(x̂·w·dy) − mean(w·dy))`` (WRITE_DX), and
    this program's float32 partials ``Σ dy·x̂`` and ``Σ dy`` at ``part[0, pid]`` and ``part[1, pid]``
    (WRITE_DWB, a ``(2, n_prog, D)`` buffer)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    w = tl.load(w_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols_ok & WRITE_XN, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, loop_bound(n_iter)):
        rows = (pid + i * n_prog) * ROWS + tl.arange(0, ROWS)
        ok = (rows < M)[:, None] & cols_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xc, rstd = _stats(x, cols_ok, D, eps)
        # zero on the rows past M: their variance is 0 and, with eps = 0, rstd infinite (0·inf = NaN
        # would reach the weight gradient's sum through dy·x̂ although dy is 0 there)
        xhat = tl.where(ok, xc * rstd[:, None], 0.0)
        if WRITE_XN:
            tl.store(xn_ptr + offs, cast_rn(xhat * w[None, :] + b[None, :], xn_ptr.dtype.element_ty), mask=ok)
        if WRITE_DX or WRITE_DWB:
            dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if WRITE_DWB:
                dw += tl.sum(dy * xhat, axis=0)
                db += tl.sum(dy, axis=0)
            if WRITE_DX:
                wdy = dy * w[None, :]
                c1 = tl.sum(xhat * wdy, axis=1) / D
                c2 = tl.sum(wdy, axis=1) / D
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(dx_ptr + offs, cast_rn(dx, dx_ptr.dtype.element_ty), mask=ok)
    if WRITE_DWB:
        tl.store(part_ptr + pid * D + cols, dw, mask=cols_ok)
        tl.store(part_ptr + (n_prog + pid) * D + cols, db, mask=cols_ok)


def supports(x: torch.Tensor) -> bool:
    """Do the kernels take ``x (..., D)``: fp16 / bf16 / fp32 with ``D ≤ MAX_D`` and fewer than
    ``INDEX_LIMIT`` rows?"""
    return x.dtype in DTYPES and 0 < x.shape[-1] <= MAX_D and x.numel() // x.shape[-1] < INDEX_LIMIT


def _tile(D: int, backward: bool = False) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for rows of ``D`` values."""
    block_d = triton.next_power_of_2(D)
    tile = TILE_INTERPRET if interpreting() else TILE // 2 if backward else TILE
    rows = max(1, tile // block_d)
    return rows, block_d, (8 if rows * block_d > 4096 else 4)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, op: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be an (M, D) tensor, got shape {tuple(x.shape)}")
    M, D = x.shape
    if x.dtype not in DTYPES or not 0 < D <= MAX_D:
        raise ValueError(f"{op}: x must be float16, bfloat16 or float32 with 1 ≤ D ≤ {MAX_D}, "
                         f"got {x.dtype} with D = {D}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape != (D,) or not p.is_floating_point() or p.device != x.device:
            raise ValueError(f"{op}: {name} must be a floating ({D},) tensor on {x.device}, "
                             f"got {p.dtype} {tuple(p.shape)} on {p.device}")
    check_sizes(op, M=M)  # offsets are 64-bit: only the row count reaches the kernels as a 32-bit bound
    return M, D


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """x: ``(M, D)`` fp16 / bf16 / fp32; weight, bias: ``(D,)`` → ``(M, D)`` in ``out_dtype``:
    ``F.layer_norm(x.float(), (D,), weight.float(), bias.float(), eps).to(out_dtype)``."""
    M, D = _check(x, weight, bias, "layer_norm_forward")
    x = x.contiguous()
    y = torch.empty((M, D), dtype=out_dtype, device=x.device)
    if M == 0:
        return y
    rows, block_d, warps = _tile(D)
    with device_guard(x):
        _layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](y, x, weight.contiguous(), bias.contiguous(), M, D,
                                                        float(eps), ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return y


def layer_norm_backward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, grad_out: torch.Tensor | None,
    xn_dtype: torch.dtype | None, need_x: bool, need_params: bool, programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The LayerNorm's backward, recomputing its forward from ``x``.

    x: ``(M, D)`` as in :func:`layer_norm_forward`; grad_out: ``(M, D)`` any floating dtype (the
    gradient of the normalised output; may be None when neither ``need_x`` nor ``need_params``).
    → (``grad_x (M, D)`` in x's dtype if ``need_x``, the forward's output again ``(M, D)`` in
    ``xn_dtype`` if given, ``grad_weight`` and ``grad_bias`` ``(D,)`` float32 if ``need_params``),
    None for what was not asked. ``programs``: how many programs stride over the rows (default: a
    few per SM); the float32 partial sums are fixed-order for a given value.
    """
    M, D = _check(x, weight, bias, "layer_norm_backward")
    x = x.contiguous()
    need_dy = need_x or need_params
    if need_dy and (grad_out is None or grad_out.shape != (M, D) or not grad_out.is_floating_point()):
        raise ValueError(f"layer_norm_backward: grad_out must be a floating ({M}, {D}) tensor, got "
                         f"{None if grad_out is None else (grad_out.dtype, tuple(grad_out.shape))}")
    if grad_out is not None:
        grad_out = grad_out.contiguous()
    dx = torch.empty_like(x) if need_x else None
    xn = torch.empty((M, D), dtype=xn_dtype, device=x.device) if xn_dtype is not None else None
    rows, block_d, warps = _tile(D, backward=True)
    blocks = triton.cdiv(M, rows)
    n_prog = max(1, min(blocks, programs if programs is not None else 4 * num_sms(x)))
    part = torch.empty((2, n_prog, D), dtype=torch.float32, device=x.device) if need_params else None
    if M > 0 and (need_dy or xn is not None):
        with device_guard(x):
            _layer_norm_bwd_kernel[(n_prog,)](
                dx if dx is not None else x, xn if xn is not None else x, part if part is not None else x,
                x, grad_out if grad_out is not None else x, weight.contiguous(), bias.contiguous(),
                M, D, float(eps), triton.cdiv(blocks, n_prog), n_prog,
                WRITE_DX=need_x, WRITE_XN=xn is not None, WRITE_DWB=need_params,
                ROWS=rows, BLOCK_D=block_d, num_warps=warps,
            )
    elif part is not None:
        part.zero_()
    if part is None:
        return dx, xn, None, None
    sums = part.sum(1)
    return dx, xn, sums[0], sums[1]
