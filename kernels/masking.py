"""Triton kernels of random per-modality masking and the MASK_TOKEN fill.

Spec: ``pyimputmae.reference.masking`` (and ``hidden_sum`` in ``pyimputmae.reference.backend``).

- ``select_keep``: one program per (row, segment). Every token of the segment gets its Philox key
  (``kernels.philox``); the token is kept when its rank ``#{s: (key_s, s) < (key_t, t)}`` is below
  ``K_m``: an exact-k choice without a sort. The pairwise comparison runs in
  ``BLOCK_T × BLOCK_S`` tiles, so registers stay bounded for segments of any length. The kept
  tokens' slots come from a running ``tl.cumsum``, so ``ids_keep`` is sorted within the segment.
- ``gather_visible``: copy of the kept rows, zero where the named position is hidden.
- ``unshuffle_fill``: a tiny int32 inverse-index pass (which visible slot lands on position l),
  then one pass that writes every output row once: ``mask_token``, the visible row, or zero.
  ``select_keep`` writes that inverse map as it chooses (the slot of every position it keeps):
  a fill given ``select_keep``'s own, unmodified ``ids_keep`` and ``mask`` (``random_masking``
  then ``unshuffle_fill``, in the forward and again in the backward) uses it and is one launch
  instead of three (a memset, the inverse pass, the fill). On a GPU each launch costs ~10 µs of
  host time: a dozen of them, at the large size, is about as long as the kernels' memory traffic.
- ``hidden_sum``: per-block partial sums, then a fixed-order sum (deterministic).
- ``fill_backward``: the gradients of a fill, ``gather_visible`` of the incoming gradient and its
  ``hidden_sum``. Given ``select_keep``'s own pair it is one pass over the gradient that copies each
  kept row to its slot (zero where hidden) and sums the hidden ones, then the fixed-order sum: two
  launches instead of three. A fill with no ``mask_token`` (the gather's backward) writes zeros at the
  hidden positions without a token tensor.

Bool tensors travel as uint8 views (one byte per element, 0/1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._selection_cache import SelectionCache
from ._utils import cast_rn, check_grid_y, check_sizes, device_guard, interpreting, loop_bound
from .philox import load_rng, token_keys

SEGMENTS_PER_LAUNCH = 4  # segment lengths travel as scalar arguments, four per launch

#: the inverse map ``(B, L)`` int32 (``k + 1`` at the position ``ids_keep[b, k]`` names, 0 elsewhere;
#: every ``k`` once) that ``select_keep`` wrote with the pair it returned
_INVERSES = SelectionCache()


@triton.jit
def _select_keep_kernel(
    ids_ptr,
    mask_ptr,
    inv_ptr,
    present_ptr,
    rng_ptr,
    L,
    K,
    M,
    seg_base,
    tok_base,
    vis_base,
    n0,
    n1,
    n2,
    n3,
    k0,
    k1,
    k2,
    k3,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (row, seg): segment ``seg_base + seg`` of batch row ``row``.

    ids: ``(B, K)`` int64; mask: ``(B, L)`` uint8 (1 = hidden); inv: ``(B, L)`` int32, the inverse
    map (``slot + 1`` at every kept position, hidden or not: a missing segment's too; 0 elsewhere);
    present: ``(B, M)`` uint8.
    Segment ``i`` of this launch has ``n_i`` tokens and ``k_i`` visible slots; this launch's first
    segment starts at token ``tok_base`` and visible slot ``vis_base``.
    """
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    n = tl.where(seg == 0, n0, tl.where(seg == 1, n1, tl.where(seg == 2, n2, n3)))
    n_keep = tl.where(seg == 0, k0, tl.where(seg == 1, k1, tl.where(seg == 2, k2, k3)))
    start = tok_base + tl.where(seg > 0, n0, 0) + tl.where(seg > 1, n1, 0) + tl.where(seg > 2, n2, 0)
    vis = vis_base + tl.where(seg > 0, k0, 0) + tl.where(seg > 1, k1, 0) + tl.where(seg > 2, k2, 0)
    have = tl.load(present_ptr + row * M + seg_base + seg) != 0
    seed, off_lo, off_hi = load_rng(rng_ptr)

    kept_before = 0
    for t0 in range(0, loop_bound(n), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_seg = t < n
        if have:
            key_t = token_keys(start + t, row, seed, off_lo, off_hi)
            rank = tl.zeros([BLOCK_T], dtype=tl.int32)
            for s0 in range(0, loop_bound(n), BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                key_s = token_keys(start + s, row, seed, off_lo, off_hi)
                # (key_s, s) < (key_t, t), keys compared as unsigned 32-bit numbers
                before = (key_s[None, :] < key_t[:, None]) | (
                    (key_s[None, :] == key_t[:, None]) & (s[None, :] < t[:, None])
                )
                before = before & (s[None, :] < n)
                rank += tl.sum(before.to(tl.int32), axis=1)
        else:
            rank = t  # a missing segment keeps (the slots of) its first K_m positions
        chosen = (rank < n_keep) & in_seg
        c = chosen.to(tl.int32)
        slot = kept_before + tl.cumsum(c, axis=0) - c
        tl.store(ids_ptr + row * K + vis + slot, (start + t).to(tl.int64), mask=chosen)
        hidden = ~(chosen & have)
        tl.store(mask_ptr + row * L + start + t, hidden.to(tl.uint8), mask=in_seg)
        tl.store(inv_ptr + row * L + start + t, tl.where(chosen, vis + slot + 1, 0).to(tl.int32), mask=in_seg)
        kept_before += tl.sum(c, axis=0)


@triton.jit
def _gather_visible_kernel(
    out_ptr, tokens_ptr, ids_ptr, mask_ptr, rows, K, L, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr
):
    """out ``(B·K, E)``: row r = (b, k) copies ``tokens[b, ids[b, k]]``, zero where that position is hidden."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    r_ok = r < rows
    e_ok = e < E
    b = r // K
    pos = tl.load(ids_ptr + r, mask=r_ok, other=0)
    # an id outside [0, L) is masked out of every access (its row is zero) and reported under TRITON_DEBUG=1
    in_range = (pos >= 0) & (pos < L)
    tl.device_assert(in_range, "gather_visible: ids_keep out of [0, L)", mask=r_ok)
    named = r_ok & in_range
    hidden = tl.load(mask_ptr + b * L + pos, mask=named, other=1) != 0
    src = (b * L + pos) * E
    vals = tl.load(tokens_ptr + src[:, None] + e[None, :], mask=(named & ~hidden)[:, None] & e_ok[None, :], other=0)
    tl.store(out_ptr + r[:, None] * E + e[None, :], vals, mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def _inverse_index_kernel(inv_ptr, ids_ptr, mask_ptr, n_ids, K, L, BLOCK: tl.constexpr):
    """inv ``(B, L)`` int32, zero-initialised: ``inv[b, ids[b, k]] = k + 1`` where that position is visible."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    r_ok = r < n_ids
    b = r // K
    k = r - b * K
    pos = tl.load(ids_ptr + r, mask=r_ok, other=0)
    # an id outside [0, L) is masked out of every access (ignored) and reported under TRITON_DEBUG=1
    in_range = (pos >= 0) & (pos < L)
    tl.device_assert(in_range, "unshuffle_fill: ids_keep out of [0, L)", mask=r_ok)
    named = r_ok & in_range
    hidden = tl.load(mask_ptr + b * L + pos, mask=named, other=1) != 0
    tl.store(inv_ptr + b * L + pos, (k + 1).to(tl.int32), mask=named & ~hidden)


@triton.jit
def _unshuffle_fill_kernel(
    out_ptr, x_ptr, inv_ptr, mask_ptr, token_ptr, rows, K, L, E,
    HAS_TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out ``(B·L, E)``: mask_token (zero without one) where hidden, ``x[b, inv - 1]`` where visible
    and named, else zero."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    r_ok = r < rows
    e_ok = e < E
    b = r // L
    hidden = tl.load(mask_ptr + r, mask=r_ok, other=0) != 0
    slot = tl.load(inv_ptr + r, mask=r_ok, other=0).to(tl.int64) - 1
    visible = r_ok & ~hidden & (slot >= 0)
    vals = tl.load(x_ptr + ((b * K + slot) * E)[:, None] + e[None, :], mask=visible[:, None] & e_ok[None, :], other=0)
    if HAS_TOKEN:
        token = tl.load(token_ptr + e, mask=e_ok, other=0)
        vals = tl.where(hidden[:, None], token[None, :], vals)
    tl.store(out_ptr + r[:, None] * E + e[None, :], vals, mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def _hidden_sum_partial_kernel(
    partial_ptr,
    grad_ptr,
    mask_ptr,
    gx_ptr,
    inv_ptr,
    rows,
    K,
    L,
    E,
    rows_per_group,
    WRITE_X: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """partial ``(G, E)``: group g sums the hidden rows ``[g·rows_per_group, (g+1)·rows_per_group)``
    of grad ``(B·L, E)``.

    ``WRITE_X`` (a fill's backward, for ``select_keep``'s own inverse map, which names every slot
    once): the same pass also writes gx ``(B·K, E)``, row ``b·K + inv - 1`` = the gradient's row,
    zero where hidden. Without it only the hidden rows are read, and gx and inv are not touched."""
    g = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=acc_dtype)
    first = g * rows_per_group
    last = tl.minimum(first + rows_per_group, rows)
    for r0 in range(loop_bound(first), loop_bound(last), BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < last
        hidden = tl.load(mask_ptr + r, mask=r_ok, other=0) != 0
        if WRITE_X:
            slot = tl.load(inv_ptr + r, mask=r_ok, other=0).to(tl.int64) - 1
            vals = tl.load(grad_ptr + r[:, None] * E + e[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0)
            acc += tl.where(hidden[:, None], vals, 0).to(acc_dtype)
            dst = ((r // L) * K + slot) * E
            tl.store(gx_ptr + dst[:, None] + e[None, :], tl.where(hidden[:, None], 0, vals),
                     mask=(r_ok & (slot >= 0))[:, None] & e_ok[None, :])
        else:
            vals = tl.load(grad_ptr + r[:, None] * E + e[None, :], mask=(r_ok & hidden)[:, None] & e_ok[None, :],
                           other=0)
            acc += vals.to(acc_dtype)
    tl.store(partial_ptr + g * E + e, tl.sum(acc, axis=0), mask=e_ok)


@triton.jit
def _sum_rows_kernel(out_ptr, partial_ptr, G, E, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr):
    """out ``(E,)`` = Σ_g partial[g] in a fixed order, cast to out's dtype."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc = tl.zeros([BLOCK_G, BLOCK_E], dtype=partial_ptr.dtype.element_ty)
    for g0 in range(0, loop_bound(G), BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        acc += tl.load(partial_ptr + g[:, None] * E + e[None, :], mask=(g < G)[:, None] & e_ok[None, :], other=0)
    tl.store(out_ptr + e, cast_rn(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=e_ok)


def _row_blocks(E: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_E) of the copy kernels: 32 rows × 128 features of 16-byte vectors on a GPU
    (a block of 1 for E = 0, where nothing is launched)."""
    width = triton.next_power_of_2(max(E, 1))
    if interpreting():
        return 8, min(16, width)
    return 32, min(128, width)


def select_keep(
    present: torch.Tensor, lengths: Sequence[int], keeps: Sequence[int], rng: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """present: ``(B, M)`` bool; rng: ``(2,)`` int64 ``(seed, offset)`` on the device →
    ``ids_keep: (B, K)`` int64, ``mask: (B, L)`` bool (True = hidden)."""
    lengths, keeps = [int(n) for n in lengths], [int(k) for k in keeps]
    B, M = present.shape
    if len(lengths) != M or len(keeps) != M:
        raise ValueError(f"present has {M} segments but {len(lengths)} lengths and {len(keeps)} keep counts")
    for m, (n, k) in enumerate(zip(lengths, keeps)):
        if n < 1 or not 0 <= k <= n:
            raise ValueError(f"segment {m}: length {n} and keep count {k} need 0 <= keep <= length, length >= 1")
    if rng.shape != (2,) or rng.dtype != torch.int64 or rng.device != present.device:
        raise ValueError(f"rng must be a (2,) int64 tensor on {present.device}, got {tuple(rng.shape)} "
                         f"{rng.dtype} on {rng.device}")
    L, K = sum(lengths), sum(keeps)
    check_sizes("select_keep", L=L, K=K)
    ids_keep = torch.empty(B, K, dtype=torch.int64, device=present.device)
    mask = torch.empty(B, L, dtype=torch.bool, device=present.device)
    if B == 0:
        return ids_keep, mask
    inverse = torch.empty(B, L, dtype=torch.int32, device=present.device)
    block_t, block_s = (32, 32) if interpreting() else (64, 64)
    present_u8 = present.contiguous().view(torch.uint8)
    tok_base = vis_base = 0
    with device_guard(present):
        for m0 in range(0, M, SEGMENTS_PER_LAUNCH):
            ns = lengths[m0:m0 + SEGMENTS_PER_LAUNCH]
            ks = keeps[m0:m0 + SEGMENTS_PER_LAUNCH]
            pad = [0] * (SEGMENTS_PER_LAUNCH - len(ns))
            _select_keep_kernel[(B, len(ns))](
                ids_keep, mask.view(torch.uint8), inverse, present_u8, rng, L, K, M, m0, tok_base, vis_base,
                *(ns + pad), *(ks + pad), BLOCK_T=block_t, BLOCK_S=block_s, num_warps=4,
            )
            tok_base += sum(ns)
            vis_base += sum(ks)
    _INVERSES.remember(ids_keep, mask, inverse)
    return ids_keep, mask


def gather_visible(tokens: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens: ``(B, L, E)``; ids_keep: ``(B, K)``; mask: ``(B, L)`` bool → ``(B, K, E)``:
    ``tokens[b, ids_keep[b, k]]``, zero where that position is hidden."""
    B, L, E = tokens.shape
    K = ids_keep.shape[1]
    check_sizes("gather_visible", L=L, K=K, E=E)
    block_r, block_e = _row_blocks(E)
    check_grid_y("gather_visible", "E", E, block_e)
    out = torch.empty(B, K, E, dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(B * K, block_r), triton.cdiv(E, block_e))
    with device_guard(tokens):
        _gather_visible_kernel[grid](
            out, tokens, ids_keep, mask.view(torch.uint8), B * K, K, L, E,
            BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4,
        )
    return out


def unshuffle_fill(
    x: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None
) -> torch.Tensor:
    """x: ``(B, K, E)``; ids_keep: ``(B, K)``; mask: ``(B, L)`` bool; mask_token: ``(E,)`` or None
    (zeros) → ``(B, L, E)``.

    Hidden positions hold ``mask_token``; ``out[b, ids_keep[b, k]] = x[b, k]`` where that position is
    visible; a visible position no id names is zero. If several ids name the same visible position,
    one of their rows lands there (the reference would add them; ``random_masking`` never does that).
    """
    B, K, E = x.shape
    L = mask.shape[1]
    check_sizes("unshuffle_fill", L=L, K=K, E=E)
    block_r, block_e = _row_blocks(E)
    check_grid_y("unshuffle_fill", "E", E, block_e)
    out = torch.empty(B, L, E, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    mask_u8 = mask.view(torch.uint8)
    inv = _INVERSES.lookup(ids_keep, mask)
    with device_guard(x):
        if inv is None:
            inv = torch.zeros(B, L, dtype=torch.int32, device=x.device)
            if K > 0:
                block_ids = 64 if interpreting() else 1024
                _inverse_index_kernel[(triton.cdiv(B * K, block_ids),)](
                    inv, ids_keep, mask_u8, B * K, K, L, BLOCK=block_ids, num_warps=4
                )
        grid = (triton.cdiv(B * L, block_r), triton.cdiv(E, block_e))
        token = out if mask_token is None else mask_token.to(x.dtype)  # (not read without a token)
        _unshuffle_fill_kernel[grid](
            out, x, inv, mask_u8, token, B * L, K, L, E,
            HAS_TOKEN=mask_token is not None, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4,
        )
    return out


def _sum_hidden(out: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, name: str,
                gx: torch.Tensor | None = None, inv: torch.Tensor | None = None) -> None:
    """out ``(E,)`` = the sum of grad ``(B, L, E)``'s hidden rows: per-group partials, then their
    fixed-order sum (deterministic). With gx ``(B, K, E)`` and ``select_keep``'s inverse map ``inv``
    (a fill's backward), the partials' pass also writes gx (``_hidden_sum_partial_kernel``)."""
    B, L, E = grad.shape
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    rows = B * L
    if interpreting():
        block_r, block_e, target_groups = 8, min(16, triton.next_power_of_2(E)), 4
    else:
        block_r, block_e = 32, min(128, triton.next_power_of_2(E))
        target_groups = max(1, 1024 // triton.cdiv(E, block_e))  # a few programs per SM
    groups = max(1, min(target_groups, triton.cdiv(rows, 4 * block_r)))
    rows_per_group = triton.cdiv(triton.cdiv(max(rows, 1), groups), block_r) * block_r
    groups = triton.cdiv(max(rows, 1), rows_per_group)
    check_grid_y(name, "E", E, block_e)
    partial = torch.empty(groups, E, dtype=acc_dtype, device=grad.device)
    write_x = gx is not None
    if write_x:
        # writing gx halves the row block: each row is also stored, to an address read from the map,
        # and for sm_90 32 rows took 164 registers for fp32 (254 for fp64), 16 rows 87-92 (148-152)
        block_r, K = block_r // 2, gx.shape[1]
    else:
        gx, inv, K = grad, grad, 0  # (not read)
    with device_guard(grad):
        _hidden_sum_partial_kernel[(groups, triton.cdiv(E, block_e))](
            partial, grad, mask.view(torch.uint8), gx, inv, rows, K, L, E, rows_per_group, WRITE_X=write_x,
            ACC_FP64=acc_dtype == torch.float64, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4,
        )
        _sum_rows_kernel[(triton.cdiv(E, block_e),)](
            out, partial, groups, E, BLOCK_G=8 if interpreting() else 32, BLOCK_E=block_e, num_warps=4
        )


def hidden_sum(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grad: ``(B, L, E)``; mask: ``(B, L)`` bool → ``(E,)`` in grad's dtype: the sum of the hidden
    rows, accumulated in fp32 (fp64 for fp64), deterministic."""
    E = grad.shape[2]
    check_sizes("hidden_sum", E=E)
    out = torch.empty(E, dtype=grad.dtype, device=grad.device)
    if E > 0:
        _sum_hidden(out, grad, mask, "hidden_sum")
    return out


def fill_backward(grad: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: ``(B, L, E)`` (the gradient of a fill's output); ids_keep: ``(B, K)``; mask: ``(B, L)`` bool
    → ``(gather_visible(grad, ids_keep, mask), hidden_sum(grad, mask))``: ``(B, K, E)`` and ``(E,)``.

    For ``select_keep``'s own, unmodified pair (``_INVERSES``) one pass over ``grad`` does
    both; any other pair takes the two functions."""
    inv = _INVERSES.lookup(ids_keep, mask)
    if inv is None:
        return gather_visible(grad, ids_keep, mask), hidden_sum(grad, mask)
    B, L, E = grad.shape
    K = ids_keep.shape[1]
    check_sizes("fill_backward", L=L, K=K, E=E)
    gx = torch.empty(B, K, E, dtype=grad.dtype, device=grad.device)
    gt = torch.empty(E, dtype=grad.dtype, device=grad.device)
    if E > 0:
        _sum_hidden(gt, grad, mask, "fill_backward", gx, inv)
    return gx, gt
