"""Triton N-d patch embedding: an implicit GEMM that reads the patches straight from the raw input.

Spec: ``pyimputmae.reference.patch_embed`` (forward) and ``pyimputmae.reference.backend`` (backward).

Every input is seen as 3-D: ``x: (B, C, D, H, W)`` with patch ``(PD, PH, PW)``; a 2-D input has
``D = PD = 1``, a 1-D input also ``H = PH = 1``. Patch ``g`` (row-major over the grid
``(GD, GH, GW)``) of row ``b`` starts at ``x[b, 0, gd·PD, gh·PH, gw·PW]`` and its feature
``f = (c, i, j, l)`` lies ``c·DHW + i·HW + j·W + l`` further on, so a GEMM tile's A operand is a
gather with computed addresses and the ``(B, L, C·p^k)`` patch matrix never exists.

- forward: tiles of ``BLOCK_M`` patches (kept ones only, with ``keep``) × ``BLOCK_N`` embedding dims,
  a loop over the ``F = C·p^k`` features in ``BLOCK_K`` chunks, ``tl.dot`` with fp32 accumulation,
  bias and ``pos[patch]`` in the epilogue. Every patch of a 16-bit 2-D/3-D input on sm_90+ takes a
  second forward kernel instead (:func:`_patch_embed_fwd_tma_kernel`): the same GEMM, its A operand
  loaded as whole boxes of x by the tensor-memory accelerator (TMA) rather than gathered element run
  by element run, and reordered in registers into (patch, feature) tiles.
- backward: ``grad_x`` = ``grad_out · weight`` (a GEMM over E) scattered to the computed addresses
  (each element of x belongs to exactly one patch; unread patches stay zero); ``grad_weight`` =
  ``grad_outᵀ · patches`` (a GEMM over the rows, split over the rows into deterministic fp32
  partials summed in a fixed order, so 3 × 16 output tiles still fill the GPU). Where the forward's
  TMA kernel applies, grad_weight has one too (:func:`_patch_embed_grad_w_tma_kernel`: the same x
  boxes, and the same patches' rows of ``grad_out`` as one box).

Operand modes (``DOT``): 0 = ``tl.dot`` on the input dtype (bf16/fp16 tensor cores); 1 = operands
cast to fp32 first (fp32 inputs, and every 16-bit input under ``TRITON_INTERPRET=1``, whose bf16 dot
is wrong); 2 = fp64 as a loop of outer products in fp64 (no ``tl.dot``: no fp64 tensor-core path;
slow, there for gradcheck and exactness, not speed). fp32 inputs use ``input_precision="tf32x3"``
on the GPU: tensor cores with about fp32 accuracy.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
import triton
import triton.language as tl

from ._utils import cast_rn, check_sizes, device_guard, interpreting, loop_bound, num_sms


@triton.jit
def patch_row_offsets(b, g, sample, H, W, GH, GW, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offset of ``x[b, 0, gd·PD, gh·PH, gw·PW]``, the first element of patch ``g`` of row ``b``."""
    g = tl.cast(g, tl.int64)
    gw = g % GW
    gh = (g // GW) % GH
    gd = g // (GW * GH)
    return tl.cast(b, tl.int64) * sample + (gd * PD * H + gh * PH) * W + gw * PW


@triton.jit
def feature_offsets(f, D, H, W, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offset of feature ``f = (c, i, j, l)`` (a scalar or a block) inside a patch."""
    f = tl.cast(f, tl.int64)
    l = f % PW
    j = (f // PW) % PH
    i = (f // (PW * PH)) % PD
    c = f // (PW * PH * PD)
    return c * D * H * W + (i * H + j) * W + l


@triton.jit
def chunk_offset(k0, D, H, W, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr):
    """:func:`feature_offsets` of a scalar feature ``k0`` that is a multiple of ``VEC``, written so that
    the compiler sees the result is a multiple of ``VEC`` too (``l = k0 mod PW`` as ``VEC``-steps;
    ``W`` is a multiple of 16 for every input that gets vector loads)."""
    f = tl.cast(k0, tl.int64)
    l = ((f // VEC) % (PW // VEC)) * VEC
    j = (f // PW) % PH
    i = (f // (PW * PH)) % PD
    c = f // (PW * PH * PD)
    return c * D * H * W + (i * H + j) * W + l


@triton.jit
def patch_feature_offsets(f, D, H, W, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr):
    """:func:`feature_offsets` of a block of features: runs of ``PW`` contiguous elements.

    ``VEC`` (the largest power of two dividing ``PW``, at most the block) tells the compiler that each
    run of ``VEC`` starts at a multiple of ``VEC``: ``W`` is a multiple of ``PW``, so it does.
    """
    offs = feature_offsets(f, D, H, W, PD, PH, PW)
    return tl.max_contiguous(tl.multiple_of(offs, VEC), VEC)


@triton.jit
def row_tile(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a ``(rows, cols)`` output → ``(r, c, r_ok, c_ok)``. The column tiles of
    one row block are neighbours in launch order, so its patches are read from HBM once."""
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(cols, BLOCK_N)
    r = (pid // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    return r, c, r < rows, c < cols


@triton.jit
def keep_in_range(g, L):
    """Whether each kept-patch index ``g`` lies in ``[0, L)``. An index outside is a caller's error
    that the launchers do not check on the GPU (that would synchronise the host): its row is masked
    out of every load and store of ``x``, ``pos`` and ``grad_x``, so it never touches memory outside
    them, and ``TRITON_DEBUG=1`` reports it as the CUDA kernels' ``CUDA_KERNEL_ASSERT`` does. (Rows
    past the end load ``g = 0``, in range.)"""
    ok = (g >= 0) & (g < L)
    tl.device_assert(ok, "patch_embed: keep index out of [0, L)")
    return ok


@triton.jit
def row_patches(r, r_ok, N, L, keep_ptr, HAS_KEEP: tl.constexpr):
    """Rows ``r = b·N + m`` of the embedded matrix → ``(b, g, ok)``: batch item, the patch it
    embeds (``keep[b, m]`` with ``keep``, else ``m``) and whether the row is read and written
    (``r_ok``, and ``g`` in ``[0, L)``: see :func:`keep_in_range`). One mask per row, computed
    before a GEMM's inner loop uses it in place of ``r_ok``."""
    b = r // N
    if HAS_KEEP:
        g = tl.load(keep_ptr + r, mask=r_ok, other=0)
        ok = r_ok & keep_in_range(g, L)
    else:
        g = r - b * N
        ok = r_ok
    return b, g, ok


@triton.jit
def _mma(acc, a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b on tensor cores: in the input dtype (DOT 0) or in fp32 (DOT 1)."""
    if DOT == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _patch_embed_fwd_kernel(
    out_ptr, x_ptr, w_ptr, bias_ptr, pos_ptr, keep_ptr,
    rows, N, L, E, F, sample, D, H, W, GH, GW,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_KEEP: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, SEPARABLE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out ``(B·N, E)``: row ``r = (b, m)`` embeds patch ``keep[b, m]`` (or ``m``) of row ``b``.

    SEPARABLE: ``BLOCK_K`` sits on a digit boundary of ``(c, i, j, l)``, so the offsets of chunk ``k0``
    are ``feature_offsets(k0)`` (a scalar) plus those of ``[0, BLOCK_K)``: the A pointers are built
    once and advanced by a scalar, the canonical form the software pipeliner handles best.
    """
    r, e, r_ok, e_ok = row_tile(rows, E, BLOCK_M, BLOCK_N)
    b, g, g_ok = row_patches(r, r_ok, N, L, keep_ptr, HAS_KEEP)  # g_ok: r_ok and keep in range
    row_off = tl.multiple_of(patch_row_offsets(b, g, sample, H, W, GH, GW, PD, PH, PW), VEC)
    if DOT == 2:
        # fp64: outer products, one feature at a time (tl.dot has no fp64 tensor-core path)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        for k in range(0, loop_bound(F)):
            a = tl.load(x_ptr + row_off + feature_offsets(k, D, H, W, PD, PH, PW), mask=g_ok, other=0.0)
            wk = tl.load(w_ptr + e.to(tl.int64) * F + k, mask=e_ok, other=0.0)
            acc += a.to(tl.float64)[:, None] * wk.to(tl.float64)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        t = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + row_off[:, None] + patch_feature_offsets(t, D, H, W, PD, PH, PW, VEC)[None, :]
        w_ptrs = w_ptr + e[None, :].to(tl.int64) * F + t[:, None]
        for k0 in range(0, loop_bound(F), BLOCK_K):
            if SEPARABLE:
                a_src = a_ptrs + chunk_offset(k0, D, H, W, PD, PH, PW, VEC)  # VEC divides BLOCK_K
            else:
                a_src = x_ptr + row_off[:, None] + patch_feature_offsets(k0 + t, D, H, W, PD, PH, PW, VEC)[None, :]
            if EVEN_K:
                a = tl.load(a_src, mask=g_ok[:, None], other=0.0)
                wt = tl.load(w_ptrs + k0, mask=e_ok[None, :], other=0.0)
            else:
                f_ok = (k0 + t) < F
                a = tl.load(a_src, mask=g_ok[:, None] & f_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs + k0, mask=f_ok[:, None] & e_ok[None, :], other=0.0)
            # x may be wider than the weight (fp32 input, bf16 weight): round the patches to its dtype
            acc = _mma(acc, cast_rn(a, w_ptr.dtype.element_ty), wt, DOT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + g.to(tl.int64)[:, None] * E + e[None, :], mask=g_ok[:, None] & e_ok[None, :], other=0.0)
        acc += pos.to(acc.dtype)
    tl.store(out_ptr + r[:, None] * E + e[None, :], cast_rn(acc, out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def box_tile(t, GD, GH, GW, BD: tl.constexpr, BH: tl.constexpr, NW: tl.constexpr):
    """Patch tile ``t`` of the TMA kernels, row-major over ``(B, GD/BD, GH/BH, GW/NW)`` → its batch item
    and first patch ``(b, gd0, gh0, gw0)``: ``BD·BH`` patch rows of ``NW`` patches from there."""
    tiles_w = GW // NW
    tiles_h = GH // BH
    tiles_d = GD // BD
    rest = t // tiles_w
    gw0 = (t % tiles_w) * NW
    gh0 = (rest % tiles_h) * BH
    rest = rest // tiles_h
    return rest // tiles_d, (rest % tiles_d) * BD, gh0, gw0


@triton.jit
def load_box_tile(x_desc, b, c, i, jb, gd0, gh0, gw0, C, GD, BD: tl.constexpr, BH: tl.constexpr,
                  BJ: tl.constexpr, NW: tl.constexpr, PW: tl.constexpr):
    """The ``(BD·BH·NW, BJ·PW)`` (patch, feature) tile of the patches from ``(b, gd0, gh0, gw0)`` and the
    features ``(c, i, jb·BJ .. jb·BJ + BJ, ·)``: one TMA box of ``x_desc``, reordered in registers."""
    a = x_desc.load([(b * C + c) * GD + gd0, i, gh0, jb * BJ, gw0 * PW])
    a = tl.reshape(a, [BD * BH, BJ, NW, PW])
    return tl.reshape(tl.permute(a, [0, 2, 1, 3]), [BD * BH * NW, BJ * PW])


@triton.jit
def _patch_embed_fwd_tma_kernel(
    out_ptr, x_desc, w_desc, bias_ptr, pos_ptr,
    E, L, C, GD, GH, GW,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BJ: tl.constexpr, BX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out ``(B·L, E)`` for every patch, the A operand loaded by the tensor-memory accelerator (TMA).

    ``x_desc`` views x ``(B, C, D, H, W)`` as ``(B·C·GD, PD, GH, PH, W)`` — plane ``(b, c, gd)``,
    depth ``i`` in the patch, patch row ``gh``, row ``j`` in the patch, column — and loads boxes
    ``(BD, 1, BH, BJ, BX)``: ``BD·BH`` patch rows of ``NW = BX/PW`` patches each, rows ``j`` of the
    patch's depth ``i`` and channel ``c``. Reordered in registers, a box is the ``(BM, BK)`` A tile of
    patches ``(gd, gh, gw)`` × features ``(j, l)``, and ``BK`` features ``(c, i, j0..j0+BJ, ·)`` are
    consecutive in ``weight``: step ``s`` of the K loop reads ``weight[:, s·BK:(s+1)·BK]`` (``w_desc``).
    Every tile lies inside one ``(b, c)`` volume: the launcher chooses ``BD | GD``, ``BH | GH``,
    ``BX | W``. Rows of the output are the tile's patches, ``b·L + (gd·GH + gh)·GW + gw``.
    """
    NW: tl.constexpr = BX // PW
    BM: tl.constexpr = BD * BH * NW
    BK: tl.constexpr = BJ * PW
    STEPS_J: tl.constexpr = PH // BJ
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(E, BLOCK_N)
    pid_m = pid // n_tiles  # the E tiles of one patch tile are neighbours in launch order
    e0 = (pid % n_tiles) * BLOCK_N
    b, gd0, gh0, gw0 = box_tile(pid_m, GD, GH, GW, BD, BH, NW)
    acc = tl.zeros([BM, BLOCK_N], dtype=tl.float32)
    for s in range(0, loop_bound(C * PD * STEPS_J)):
        ci = s // STEPS_J
        a = load_box_tile(x_desc, b, ci // PD, ci % PD, s % STEPS_J, gd0, gh0, gw0, C, GD, BD, BH, BJ, NW, PW)
        wt = w_desc.load([e0, s * BK])
        acc = _mma(acc, a, tl.trans(wt), DOT, PRECISION)
    m = tl.arange(0, BM)
    g = ((gd0 + m // (NW * BH)) * GH + gh0 + (m // NW) % BH) * GW + gw0 + m % NW
    e = e0 + tl.arange(0, BLOCK_N)
    e_ok = e < E
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + g.to(tl.int64)[:, None] * E + e[None, :], mask=e_ok[None, :], other=0.0)
        acc += pos.to(acc.dtype)
    row = b.to(tl.int64) * L + g
    tl.store(out_ptr + row[:, None] * E + e[None, :], cast_rn(acc, out_ptr.dtype.element_ty), mask=e_ok[None, :])


@triton.jit
def _patch_embed_grad_x_kernel(
    gx_ptr, gout_ptr, w_ptr, keep_ptr,
    rows, N, L, E, F, sample, D, H, W, GH, GW,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr, HAS_KEEP: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x at patch ``keep[b, m]`` (or ``m``), features ``f``: ``Σ_e grad_out[r, e]·weight[e, f]``."""
    r, f, r_ok, f_ok = row_tile(rows, F, BLOCK_M, BLOCK_N)
    b, g, g_ok = row_patches(r, r_ok, N, L, keep_ptr, HAS_KEEP)
    if DOT == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        for k in range(0, loop_bound(E)):
            go = tl.load(gout_ptr + r * E + k, mask=r_ok, other=0.0)
            wk = tl.load(w_ptr + tl.cast(k, tl.int64) * F + f, mask=f_ok, other=0.0)
            acc += go.to(tl.float64)[:, None] * wk.to(tl.float64)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, loop_bound(E), BLOCK_K):
            e = k0 + tl.arange(0, BLOCK_K)
            e_ok = e < E
            go = tl.load(gout_ptr + r[:, None] * E + e[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + e[:, None].to(tl.int64) * F + f[None, :], mask=e_ok[:, None] & f_ok[None, :],
                         other=0.0)
            acc = _mma(acc, go, wt, DOT, PRECISION)
    row_off = tl.multiple_of(patch_row_offsets(b, g, sample, H, W, GH, GW, PD, PH, PW), VEC)
    feat = patch_feature_offsets(f, D, H, W, PD, PH, PW, VEC)
    tl.store(gx_ptr + row_off[:, None] + feat[None, :], cast_rn(acc, gx_ptr.dtype.element_ty),
             mask=g_ok[:, None] & f_ok[None, :])


@triton.jit
def _patch_embed_grad_w_kernel(
    gw_ptr, gout_ptr, x_ptr, keep_ptr,
    rows, rows_per_split, N, L, E, F, sample, D, H, W, GH, GW,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, VEC: tl.constexpr, HAS_KEEP: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw ``(S, E, F)``: split ``s`` sums ``grad_out[r, e]·patch[r, f]`` over its rows
    ``[s·rows_per_split, (s+1)·rows_per_split)``."""
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    e_tiles = tl.cdiv(E, BLOCK_M)
    # the E tiles of one feature tile are neighbours in launch order: the patches are read once
    pid_n = pid // e_tiles
    pid_m = pid % e_tiles
    e = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    f = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e_ok = e < E
    f_ok = f < F
    feat = patch_feature_offsets(f, D, H, W, PD, PH, PW, VEC)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, rows)
    if DOT == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        for r in range(loop_bound(first), loop_bound(last)):
            b = r // N
            if HAS_KEEP:
                g = tl.load(keep_ptr + r)
                x_ok = f_ok & keep_in_range(g, L)
            else:
                g = r - b * N
                x_ok = f_ok
            go = tl.load(gout_ptr + r * E + e, mask=e_ok, other=0.0)
            xa = tl.load(x_ptr + patch_row_offsets(b, g, sample, H, W, GH, GW, PD, PH, PW) + feat, mask=x_ok,
                         other=0.0)
            acc += go.to(tl.float64)[:, None] * xa.to(tl.float64)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(loop_bound(first), loop_bound(last), BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < last
            b, g, g_ok = row_patches(r, r_ok, N, L, keep_ptr, HAS_KEEP)
            row_off = tl.multiple_of(patch_row_offsets(b, g, sample, H, W, GH, GW, PD, PH, PW), VEC)
            go_t = tl.load(gout_ptr + r[None, :] * E + e[:, None], mask=e_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(x_ptr + row_off[:, None] + feat[None, :], mask=g_ok[:, None] & f_ok[None, :], other=0.0)
            acc = _mma(acc, go_t, cast_rn(a, gout_ptr.dtype.element_ty), DOT, PRECISION)
    tl.store(gw_ptr + split * E * F + e[:, None].to(tl.int64) * F + f[None, :], cast_rn(acc, gw_ptr.dtype.element_ty),
             mask=e_ok[:, None] & f_ok[None, :])


@triton.jit
def _patch_embed_grad_w_tma_kernel(
    gw_ptr, x_desc, go_desc, E, F, C, GD, GH, GW, patch_tiles, tiles_per_split,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BJ: tl.constexpr, BX: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """gw ``(S, E, F)``: split ``s`` sums ``grad_out[r, e]·patch[r, f]`` over its patch tiles
    ``[s·tiles_per_split, (s+1)·tiles_per_split)`` of every patch, both operands loaded by the TMA.

    The boxes of :func:`_patch_embed_fwd_tma_kernel`: a program owns ``BK = BJ·PW`` consecutive
    features ``(c, i, j0..j0+BJ, ·)`` — one box position inside each patch — and ``BLOCK_E`` embedding
    dims, and walks the patch tiles: the x box, reordered in registers into the ``(BM, BK)``
    (patch, feature) tile, and the same ``BM`` patches' rows of ``grad_out``, viewed as
    ``(B·GD, GH, GW, E)`` and loaded as one ``(BD, BH, NW, BLOCK_E)`` box. It accumulates the
    transposed tile ``(BK, BLOCK_E)`` (the patches in registers are the A operand) and stores it
    transposed.
    """
    NW: tl.constexpr = BX // PW
    BM: tl.constexpr = BD * BH * NW
    BK: tl.constexpr = BJ * PW
    STEPS_J: tl.constexpr = PH // BJ
    pid = tl.program_id(0)
    split = tl.program_id(1)
    e_tiles = tl.cdiv(E, BLOCK_E)
    pid_f = pid // e_tiles  # the E tiles of one feature tile are neighbours: the x boxes are read together
    e0 = (pid % e_tiles) * BLOCK_E
    jb = pid_f % STEPS_J
    ci = pid_f // STEPS_J
    c = ci // PD
    i = ci % PD
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, patch_tiles)
    acc = tl.zeros([BK, BLOCK_E], dtype=tl.float32)
    for t in range(loop_bound(first), loop_bound(last)):
        b, gd0, gh0, gw0 = box_tile(t, GD, GH, GW, BD, BH, NW)
        a = load_box_tile(x_desc, b, c, i, jb, gd0, gh0, gw0, C, GD, BD, BH, BJ, NW, PW)
        go = tl.reshape(go_desc.load([b * GD + gd0, gh0, gw0, e0]), [BM, BLOCK_E])
        acc = _mma(acc, tl.trans(a), go, DOT, PRECISION)
    f = pid_f * BK + tl.arange(0, BK)
    e = e0 + tl.arange(0, BLOCK_E)
    dst = gw_ptr + split.to(tl.int64) * E * F + e[None, :].to(tl.int64) * F + f[:, None]
    tl.store(dst, cast_rn(acc, gw_ptr.dtype.element_ty), mask=(e < E)[None, :])


@triton.jit
def _sum_splits_kernel(out_ptr, part_ptr, n, S, BLOCK: tl.constexpr):
    """out ``(n,)`` = Σ_s part[s, :] in a fixed order, cast to out's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    src = i
    for _ in range(0, loop_bound(S)):
        acc += tl.load(part_ptr + src, mask=ok, other=0.0)
        src += n
    tl.store(out_ptr + i, cast_rn(acc, out_ptr.dtype.element_ty), mask=ok)


def patch_geometry(x: torch.Tensor, patch: int) -> dict:
    """``x: (B, C, *S)`` → the 3-D view of the kernels: sizes, patch shape, grid, ``L``, ``F``."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"patch input must be (B, C, *S) with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    if patch < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    spatial = tuple(x.shape[2:])
    for axis, size in enumerate(spatial):
        if size % patch:
            raise ValueError(f"spatial size {size} (axis {axis + 2} of input shape {tuple(x.shape)}) "
                             f"is not divisible by the patch size {patch}")
    k = len(spatial)
    D, H, W = (1,) * (3 - k) + spatial
    PD, PH, PW = (1,) * (3 - k) + (patch,) * k
    C = x.shape[1]
    grid = (D // PD, H // PH, W // PW)
    check_sizes(f"patch input {tuple(x.shape)}, patch {patch}", patches=math.prod(grid), features=C * PD * PH * PW)
    return dict(C=C, D=D, H=H, W=W, PD=PD, PH=PH, PW=PW, GD=grid[0], GH=grid[1], GW=grid[2], L=math.prod(grid),
                F=C * PD * PH * PW, sample=C * D * H * W)


def vector_width(pw: int, block: int) -> int:
    """Largest power of two dividing the contiguous run length ``pw``, at most 16 and ``block``."""
    return min(pw & -pw, 16, block)


def separable(block: int, radices: tuple[int, ...]) -> bool:
    """Is ``feature_offsets(f0 + t) == feature_offsets(f0) + feature_offsets(t)`` for every multiple
    ``f0`` of ``block`` and ``t < block``? True when ``block`` sits on a digit boundary of the mixed
    radix ``radices`` (least significant first: ``PW, PH, PD, C``), so adding ``t`` never carries."""
    low = 1
    for radix in radices:
        if block <= low * radix:
            return block % low == 0 and (low * radix) % block == 0
        low *= radix
    return True  # one chunk covers every feature


def _dot_mode(dtype: torch.dtype) -> tuple[int, str]:
    if dtype == torch.float64:
        return 2, "ieee"
    if dtype == torch.float32 or interpreting():
        return 1, "ieee" if interpreting() else "tf32x3"
    return 0, "ieee"


def _gemm_config(dtype: torch.dtype) -> dict:
    """Fixed tiles: small ones for the interpreter and for fp64 outer products; H100/H200 ones else.

    fp32 (tf32x3: three tensor-core products per tile, two fp32 operand copies) gets 128 × 64 × 32
    tiles: the 16-bit tile below spills up to 156 bytes per thread there, this one none, and needs
    64 KiB of shared memory instead of 192 (``tools/triton_compile_check.py`` reports both).
    """
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _forward_config(dtype: torch.dtype, rows: int, E: int, sms: int) -> dict:
    """Forward tiles, a fixed choice (no ``triton.autotune``: one launch path, the same under the
    interpreter and on the GPU, and nothing to bind but the kernel's own arguments).

    The H100/H200 GEMM tile of :func:`_gemm_config` (128 × 128 × 64, 8 warps, 3 stages); for the
    16-bit tensor-core path, 64-row tiles (4 warps) when 128-row ones would leave SMs idle.
    """
    cfg = _gemm_config(dtype)
    if _dot_mode(dtype)[0] != 0:  # fp32 / fp64 / the interpreter: one tile
        return cfg
    if triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(E, cfg["BLOCK_N"]) < sms:
        cfg = dict(cfg, BLOCK_M=64, num_warps=4)
    return cfg


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _largest_pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two that divides ``n`` (> 0) and is at most ``at_most`` (≥ 1)."""
    return min(n & -n, 1 << (at_most.bit_length() - 1))


def _patch_tiles(geo: dict, batch: int, BD: int, BH: int, BX: int) -> int:
    """Patch tiles of the TMA kernels: per sample GD/BD × GH/BH × GW/(BX/PW)."""
    return batch * (geo["GD"] // BD) * (geo["GH"] // BH) * (geo["GW"] // (BX // geo["PW"]))


def _tma_programs(geo: dict, batch: int, E: int, BD: int, BH: int, BX: int, block_n: int) -> int:
    """Programs of a forward TMA launch: patch tiles × embedding tiles."""
    return _patch_tiles(geo, batch, BD, BH, BX) * triton.cdiv(E, block_n)


def _x_descriptor(x: torch.Tensor, geo: dict, plan: dict):
    """x ``(B, C, D, H, W)`` as the TMA kernels view it, ``(B·C·GD, PD, GH, PH, W)``, in boxes
    ``(BD, 1, BH, BJ, BX)`` of ``plan``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    PD, PH, H, W = geo["PD"], geo["PH"], geo["H"], geo["W"]
    return TensorDescriptor(x, [x.shape[0] * geo["C"] * geo["GD"], PD, geo["GH"], PH, W],
                            [PD * H * W, H * W, PH * W, W, 1], [plan["BD"], 1, plan["BH"], plan["BJ"], plan["BX"]])


@functools.cache
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


#: the oldest triton the TMA kernel was checked with (interpreter, sm_90 machine code): 3.6; older ones
#: (torch < 2.11) keep the gather kernel — host-side descriptors and ``desc.load`` changed before it
TMA_MIN_TRITON = (3, 6)


@functools.cache
def triton_has_tma() -> bool:
    """Whether the installed triton is one the TMA kernel was checked with (:data:`TMA_MIN_TRITON`)."""
    try:
        version = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])
        importlib.import_module("triton.tools.tensor_descriptor")
    except (ValueError, ImportError):
        return False
    return version >= TMA_MIN_TRITON


def tma_capable(t: torch.Tensor) -> bool:
    """Whether ``t``'s device has the tensor-memory accelerator (sm_90 and later; the interpreter
    emulates it) and the installed triton the kernel's descriptors (:func:`triton_has_tma`).
    (``tools/triton_compile_check.py`` answers for its target instead.)"""
    if not triton_has_tma():
        return False
    if interpreting():
        return True
    if t.device.type != "cuda":
        return False
    return _major_capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9


def _tma_plan(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, geo: dict,
              config: dict | None, kernel: str = "forward") -> dict | None:
    """Tiles of :func:`_patch_embed_fwd_tma_kernel` (``kernel="forward"``) or of
    :func:`_patch_embed_grad_w_tma_kernel` (``"grad_weight"``; its ``BLOCK_N`` is ``BLOCK_E``, and
    ``grad_out`` has conditions of its own: :func:`_grad_weight_tma_plan`) for this call, or None where
    it does not apply.

    It applies to every patch (no ``keep``) of a 2-D or 3-D input whose dtype is the weight's, 16-bit
    (an fp32 input under autocast keeps the gather kernel: converting its tiles in registers made
    ptxas serialise the ``wgmma`` instructions, warning C7515, on triton 3.6 for sm_90), both
    contiguous and 16-byte aligned, on an sm_90+ GPU (or in the interpreter) with triton ≥ 3.6
    (:func:`tma_capable`), when the patch's sides ``PW``, ``PH`` are powers of two, a box row
    (``BX`` columns, at most 128 bytes: one swizzle span) holds whole patches, a K step
    ``BK = BJ·PW`` is 16 to 64 features and a tile holds ≥ 64 patches (16 in the interpreter).
    ``config``: None → this kernel wherever it applies; a dict → only with ``"TMA": True``, its
    ``BLOCK_M`` (the tile's patches to aim for), ``BLOCK_N``, ``num_warps``, ``num_stages``
    overriding the fixed choice. (The gradient's tile, ``BK × BLOCK_E``, takes 4 warps by default — at
    ``BK`` = 64 features, one warp group's 64 rows of ``wgmma``; a narrower ``BK``, e.g. 16 for
    patch 4, compiles to ``mma`` — and fills the GPU by splitting the patches, so it keeps 128-patch
    tiles where the forward takes 64.)"""
    if config is not None and not config.get("TMA"):
        return None
    config = config or {}
    if keep is not None or x.dim() == 3:
        return None
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not (x.is_contiguous() and weight.is_contiguous()) or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return None
    if not tma_capable(x):
        return None
    small = interpreting()
    PH, PW, W = geo["PH"], geo["PW"], geo["W"]
    GD, GH = geo["GD"], geo["GH"]
    if x.shape[0] * geo["C"] * GD >= 2**31:  # a TMA coordinate is 32-bit
        return None
    row_elems = 128 // x.element_size()
    if not (_pow2(PW) and _pow2(PH) and PW <= row_elems and W % 8 == 0):
        return None
    BX = _largest_pow2_divisor(W, row_elems)
    if BX % PW or BX < 16 // x.element_size():
        return None
    k_max = 16 if small else 64
    BJ = _largest_pow2_divisor(PH, max(1, k_max // PW))
    if not 16 <= BJ * PW <= 64:
        return None
    NW = BX // PW
    E = weight.shape[0]
    min_m = 16 if small else 64
    target = config.get("BLOCK_M", 16 if small else 128)
    # embedding dims per tile: 128 (16 in the interpreter), fewer for a narrow embedding
    block_n = config.get("BLOCK_N", 16 if small else min(128, max(16, triton.next_power_of_2(E))))
    if not (_pow2(block_n) and 16 <= block_n <= 256):
        raise ValueError(f"the TMA kernel's BLOCK_N must be a power of two from 16 to 256, got {block_n}")

    def tiles(aim: int) -> tuple[int, int]:
        BH = _largest_pow2_divisor(GH, max(1, aim // NW))
        BD = _largest_pow2_divisor(GD, max(1, aim // (NW * BH)))
        return BH, BD

    BH, BD = tiles(target)
    if not small and kernel == "forward" and "BLOCK_M" not in config and NW * BH * BD == 128:
        # 64-patch tiles when 128-patch ones would leave SMs idle
        if _tma_programs(geo, x.shape[0], E, BD, BH, BX, block_n) < num_sms(x):
            BH, BD = tiles(64)
    BM = NW * BH * BD
    if BM < min_m:
        return None
    warps = 1 if small else (8 if BM >= 128 and kernel == "forward" else 4)
    return dict(BD=BD, BH=BH, BJ=BJ, BX=BX, BLOCK_N=block_n, num_warps=config.get("num_warps", warps),
                num_stages=config.get("num_stages", 1 if small else 3))


def _forward_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor | None,
                 geo: dict, plan: dict, out: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_patch_embed_fwd_tma_kernel` with ``plan``'s tiles into ``out (B, L, E)``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, E, F = x.shape[0], weight.shape[0], weight.shape[1]
    BD, BH, BJ, BX, BN = plan["BD"], plan["BH"], plan["BJ"], plan["BX"], plan["BLOCK_N"]
    w_desc = TensorDescriptor(weight, [E, F], [F, 1], [BN, BJ * geo["PW"]])
    dot, precision = _dot_mode(weight.dtype)
    grid = (_tma_programs(geo, B, E, BD, BH, BX, BN),)
    with device_guard(x):
        _patch_embed_fwd_tma_kernel[grid](
            out, _x_descriptor(x, geo, plan), w_desc, bias if bias is not None else out,
            pos if pos is not None else out, E, geo["L"], geo["C"], geo["GD"], geo["GH"], geo["GW"],
            PD=geo["PD"], PH=geo["PH"], PW=geo["PW"], BD=BD, BH=BH, BJ=BJ, BX=BX, HAS_BIAS=bias is not None,
            HAS_POS=pos is not None, DOT=dot, PRECISION=precision, BLOCK_N=BN,
            num_warps=plan["num_warps"], num_stages=plan["num_stages"],
        )
    return out


def patch_embed_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    keep: torch.Tensor | None,
    patch: int,
    config: dict | None = None,
) -> torch.Tensor:
    """x: ``(B, C, *S)``; weight: ``(E, C·p^k)``; bias: ``(E,)``; pos: ``(L, E)``; keep: ``(B, K)`` int64
    → ``(B, L or K, E)`` in weight's dtype (bias and pos share it; x may be wider, its patches are
    rounded to it as they are read), fp32 accumulation (fp64 for fp64).

    Two kernels: every patch of a 16-bit 2-D/3-D input on an sm_90+ GPU goes through
    :func:`_patch_embed_fwd_tma_kernel` (TMA boxes, see :func:`_tma_plan` for where it applies); the
    rest, ``keep`` included, through the gather GEMM :func:`_patch_embed_fwd_kernel`. ``config``:
    tiles to use instead of the fixed choice — the gather kernel's (``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K``, ``num_warps``, ``num_stages``), or with ``"TMA": True`` the TMA kernel's where it
    applies (``tools/patch_embed_sweep.py`` times both on a GPU)."""
    geo = patch_geometry(x, patch)
    E, F = weight.shape
    if F != geo["F"]:
        raise ValueError(f"weight must be (E, {geo['F']}) for input {tuple(x.shape)} and patch {patch}, "
                         f"got {tuple(weight.shape)}")
    B = x.shape[0]
    N = keep.shape[1] if keep is not None else geo["L"]
    check_sizes("patch_embed_forward", E=E, N=N)
    out = torch.empty(B, N, E, dtype=weight.dtype, device=x.device)
    rows = B * N
    if out.numel() == 0:
        return out
    plan = _tma_plan(x, weight, keep, geo, config)
    if plan is not None:
        return _forward_tma(x, weight, bias, pos, geo, plan, out)
    if config is not None and config.get("TMA"):
        raise ValueError(f"config asks for the TMA kernel, which does not apply to x {tuple(x.shape)} {x.dtype}, "
                         f"weight {weight.dtype}, patch {patch}{', keep' if keep is not None else ''} on "
                         f"{x.device} (see kernels.patch_embed._tma_plan)")
    dot, precision = _dot_mode(weight.dtype)
    args = (
        out, x, weight, bias if bias is not None else x, pos if pos is not None else x,
        keep if keep is not None else x,
        rows, N, geo["L"], E, F, geo["sample"], geo["D"], geo["H"], geo["W"], geo["GH"], geo["GW"],
    )
    flags = dict(PD=geo["PD"], PH=geo["PH"], PW=geo["PW"], HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                 HAS_KEEP=keep is not None, DOT=dot, PRECISION=precision)
    radices = (geo["PW"], geo["PH"], geo["PD"], geo["C"])
    cfg = ({k: v for k, v in config.items() if k != "TMA"} if config is not None
           else _forward_config(weight.dtype, rows, E, num_sms(x)))
    block_k = cfg["BLOCK_K"]
    flags.update(VEC=vector_width(geo["PW"], block_k), SEPARABLE=separable(block_k, radices),
                 EVEN_K=F % block_k == 0)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(E, cfg["BLOCK_N"]),)
    with device_guard(x):
        _patch_embed_fwd_kernel[grid](*args, **flags, **cfg)
    return out


def patch_embed_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor | None,
    patch: int,
    need_x: bool,
    need_weight: bool,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out: ``(B, N, E)`` → ``(grad_x (B, C, *S) in x's dtype or empty(0), grad_weight (E, F) in
    weight's dtype or empty(0))``.

    Both are Triton GEMMs with fp32 accumulation (fp64 for fp64); grad_x is zero at patches no row
    of ``keep`` names. A patch named twice by ``keep`` gets one row's gradient, not their sum.
    grad_weight of every patch of a 16-bit 2-D/3-D input on an sm_90+ GPU loads both operands with
    the TMA (:func:`_patch_embed_grad_w_tma_kernel`, where :func:`_grad_weight_tma_plan` says it
    applies), the rest gathers the patches (:func:`_patch_embed_grad_w_kernel`). ``config``: None →
    that choice; ``{"TMA": True, ...}`` → the TMA kernel with :func:`_tma_plan`'s overrides
    (``BLOCK_N`` is the tile's embedding dims), a ValueError where it does not apply; any other dict
    (``{"TMA": False}``) → the gather kernel at its fixed tiles (unlike the forward's, the gather
    backward takes no tile overrides). ``tools/patch_embed_sweep.py`` times both on a GPU.
    """
    geo = patch_geometry(x, patch)
    E, F = weight.shape
    B = x.shape[0]
    N = keep.shape[1] if keep is not None else geo["L"]
    if tuple(grad_out.shape) != (B, N, E):
        raise ValueError(f"patch_embed_backward: grad_out must be (B, N, E) = ({B}, {N}, {E}), got shape "
                         f"{tuple(grad_out.shape)}")
    check_sizes("patch_embed_backward", E=E, N=N)
    rows = B * N
    grad_x, grad_weight = x.new_empty(0), weight.new_empty(0)
    grad_out = grad_out.to(weight.dtype).contiguous()
    dot, precision = _dot_mode(weight.dtype)
    cfg = _gemm_config(weight.dtype)
    keep_arg = keep if keep is not None else x
    dims = (N, geo["L"], E, F, geo["sample"], geo["D"], geo["H"], geo["W"], geo["GH"], geo["GW"])
    flags = dict(PD=geo["PD"], PH=geo["PH"], PW=geo["PW"], HAS_KEEP=keep is not None, DOT=dot, PRECISION=precision)
    plan = _grad_weight_tma_plan(grad_out, x, weight, keep, geo, config) if need_weight and rows > 0 else None
    if need_weight and rows > 0 and plan is None and config is not None and config.get("TMA"):
        raise ValueError(f"config asks for the TMA kernel, which does not apply to grad_weight of x {tuple(x.shape)} "
                         f"{x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, patch {patch}"
                         f"{', keep' if keep is not None else ''} on {x.device} "
                         "(see kernels.patch_embed._grad_weight_tma_plan)")
    with device_guard(x):
        if need_x:
            # without keep every element of x belongs to exactly one embedded patch: no zero fill needed
            grad_x = torch.zeros_like(x) if keep is not None or rows == 0 else torch.empty_like(x)
            if rows > 0:
                grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"]),)
                _patch_embed_grad_x_kernel[grid](
                    grad_x, grad_out, weight, keep_arg, rows, *dims,
                    VEC=vector_width(geo["PW"], cfg["BLOCK_N"]), **flags, **cfg,
                )
        if need_weight:
            if plan is not None:
                grad_weight = _grad_weight_tma(grad_out, x, weight, geo, plan)
            else:
                grad_weight = _grad_weight(grad_out, x, weight, keep_arg, rows, dims, flags, cfg, geo)
    return grad_x, grad_weight


def _splits(blocks: int, tiles: int, x: torch.Tensor) -> int:
    """Into how many parts a GEMM's reduction of ``blocks`` steps is split when its ``tiles`` output
    tiles alone cannot fill the GPU: about two programs per SM, each ≥ 4 steps, at most 32 parts."""
    if interpreting():
        return min(2, blocks)
    return max(1, min(blocks // 4, triton.cdiv(2 * num_sms(x), tiles), 32))


def _partials(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where a split reduction into ``out (E, F)`` writes: ``out`` itself for one part, else fp32
    (fp64 for fp64) partials ``(splits, E, F)`` that :func:`_sum_partials` adds in a fixed order."""
    if splits == 1:
        return out
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    return torch.empty(splits, *out.shape, dtype=acc_dtype, device=out.device)


def _sum_partials(out: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    if part is not out:
        n = out.numel()
        block = 256 if interpreting() else 1024
        _sum_splits_kernel[(triton.cdiv(n, block),)](out, part, n, part.shape[0], BLOCK=block, num_warps=4)
    return out


def _grad_weight(grad_out, x, weight, keep_arg, rows, dims, flags, cfg, geo) -> torch.Tensor:
    """``grad_outᵀ · patches``: split over the rows into fp32 partials when the E×F tiles alone
    cannot fill the GPU, then a fixed-order sum (deterministic, no atomics)."""
    E, F = weight.shape
    tiles = triton.cdiv(E, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"])
    row_blocks = max(1, triton.cdiv(rows, cfg["BLOCK_K"]))
    splits = _splits(row_blocks, tiles, x)
    rows_per_split = triton.cdiv(row_blocks, splits) * cfg["BLOCK_K"]
    splits = max(1, triton.cdiv(rows, rows_per_split))
    out = torch.empty(E, F, dtype=weight.dtype, device=x.device)
    part = _partials(out, splits)
    _patch_embed_grad_w_kernel[(tiles, splits)](
        part, grad_out, x, keep_arg, rows, rows_per_split, *dims,
        VEC=vector_width(geo["PW"], cfg["BLOCK_N"]), **flags, **cfg,
    )
    return _sum_partials(out, part)


def _grad_weight_tma_plan(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None,
                          geo: dict, config: dict | None) -> dict | None:
    """Tiles of :func:`_patch_embed_grad_w_tma_kernel`, or None where it does not apply: where the
    forward's TMA kernel does (:func:`_tma_plan`), with ``grad_out (B, L, E)`` (contiguous, as the
    backward makes it) in x's dtype, 16-byte aligned and with rows of a multiple of 16 bytes
    (``E % 8 == 0``: a TMA descriptor's strides)."""
    if grad_out.dtype != x.dtype or grad_out.data_ptr() % 16 or (weight.shape[0] * grad_out.element_size()) % 16:
        return None
    return _tma_plan(x, weight, keep, geo, config, kernel="grad_weight")


def _grad_weight_tma(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geo: dict,
                     plan: dict) -> torch.Tensor:
    """Launch :func:`_patch_embed_grad_w_tma_kernel` with ``plan``'s tiles: ``(E, F)`` in weight's dtype."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, (E, F) = x.shape[0], weight.shape
    PW, GD, GH, GW = geo["PW"], geo["GD"], geo["GH"], geo["GW"]
    BD, BH, BJ, BX, BE = plan["BD"], plan["BH"], plan["BJ"], plan["BX"], plan["BLOCK_N"]
    go_desc = TensorDescriptor(grad_out, [B * GD, GH, GW, E], [GH * GW * E, GW * E, E, 1], [BD, BH, BX // PW, BE])
    patch_tiles = _patch_tiles(geo, B, BD, BH, BX)
    tiles = triton.cdiv(E, BE) * (F // (BJ * PW))
    splits = _splits(patch_tiles, tiles, x)
    per_split = triton.cdiv(patch_tiles, splits)
    splits = triton.cdiv(patch_tiles, per_split)
    out = torch.empty(E, F, dtype=weight.dtype, device=x.device)
    part = _partials(out, splits)
    dot, precision = _dot_mode(weight.dtype)
    _patch_embed_grad_w_tma_kernel[(tiles, splits)](
        part, _x_descriptor(x, geo, plan), go_desc, E, F, geo["C"], GD, GH, GW, patch_tiles, per_split,
        PD=geo["PD"], PH=geo["PH"], PW=PW, BD=BD, BH=BH, BJ=BJ, BX=BX, DOT=dot, PRECISION=precision, BLOCK_E=BE,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    return _sum_partials(out, part)
