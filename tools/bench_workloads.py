"""The workloads of ``tools/bench.py``: :class:`Workload` (one op at one size and dtype: inputs,
byte/FLOP counts, our implementation, its baselines), the correctness guard's comparison with
eager, and the builder of each op's workload."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_baselines import (
    embed_conv,
    embed_eager,
    embed_keep_conv,
    embed_keep_eager,
    masked_mse_eager,
    masking_fill_eager,
)
from bench_config import CHECK_TOL, DTYPES, SIZES
from bench_timing import Context

# ---------------------------------------------------------------------------------------------
# Workloads: inputs, byte/FLOP counts and the implementations of one op at one size and dtype
# ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """One op at one size and dtype. Every implementation returns a tensor or a tuple whose first
    item is differentiated (``fwd+bwd``) w.r.t. ``grad_inputs`` with incoming ``grad_output``."""

    op: str
    dtype: str
    shape: dict
    bytes: dict[str, int]  # per pass: what the op must move (section 5)
    ours: Callable[[str], Any]  # backend name → output
    eager: Callable  # plain-PyTorch function of eager_args (torch.compile'd for "compile")
    eager_args: tuple
    grad_inputs: tuple[torch.Tensor, ...]
    grad_output: torch.Tensor | None = None  # None: scalar output, incoming gradient 1
    flops: dict[str, float] | None = None
    conv: Callable[[], Any] | None = None
    check: Callable[[str, Any, tuple], str] | None = None  # replaces the comparison with eager
    _expected: tuple | None = field(default=None, repr=False)


def _primary(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_once(w: Workload, forward: Callable[[], Any]) -> tuple[Any, tuple]:
    """One forward and backward; the gradients come back instead of accumulating in .grad."""
    out = forward()
    return out, torch.autograd.grad(_primary(out), w.grad_inputs, w.grad_output)


def pass_fn(w: Workload, forward: Callable[[], Any], pass_: str) -> Callable[[], Any]:
    if pass_ == "fwd":
        return forward
    return lambda: torch.autograd.grad(_primary(forward()), w.grad_inputs, w.grad_output)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    if got.shape != ref.shape:
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def compare_with_eager(w: Workload, name: str, out: Any, grads: tuple) -> str:
    if w._expected is None:
        w._expected = run_once(w, lambda: w.eager(*w.eager_args))
    ref_out, ref_grads = w._expected
    tol = CHECK_TOL[w.dtype]
    pairs = [("output", _primary(out), _primary(ref_out))]
    pairs += [(f"grad[{i}]", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
    for what, got, ref in pairs:
        err = rel_error(got, ref)
        if not err <= tol:  # also catches NaN
            return f"MISMATCH {what}: max|d|/max|eager| = {err:.2e} > {tol:g}"
    return "ok"


def _tensor(shape, dtype, device, requires_grad=False, scale=1.0) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def build_masked_mse(ctx: Context, dtype: str, norm_pix: bool) -> Workload:
    from pyimputmae.ops import masked_mse

    s = SIZES[ctx.size]["mse"]
    B, C, S, p = s["B"], s["C"], s["S"], s["p"]
    L, P = (S // p) ** 3, C * p**3
    dt, dev = DTYPES[dtype], ctx.device
    x = _tensor((B, C, S, S, S), dt, dev)
    pred = _tensor((B, L, P), dt, dev, requires_grad=True)
    mask = torch.rand(B, L, device=dev) < 0.5
    mask_f = mask.to(dt)
    tensor_bytes = pred.numel() * pred.element_size()
    x_bytes = x.numel() * x.element_size()
    return Workload(
        op="masked_mse_normpix" if norm_pix else "masked_mse",
        dtype=dtype,
        shape={"pred": [B, L, P], "x": [B, C, S, S, S], "patch": p},
        # fwd (a loss alone): read pred + x; fwd+bwd: + write grad (incoming gradient 1: no pass)
        bytes={"fwd": tensor_bytes + x_bytes, "fwd+bwd": 2 * tensor_bytes + x_bytes},
        ours=lambda b: masked_mse(pred, x, mask, patch=p, norm_pix=norm_pix, backend=b),
        eager=masked_mse_eager,
        eager_args=(pred, x, mask_f, p, norm_pix),
        grad_inputs=(pred,),
    )


def build_masking_fill(ctx: Context, dtype: str) -> Workload:
    from pyimputmae.ops import random_masking, unshuffle_fill
    from pyimputmae.reference.masking import keep_counts

    s = SIZES[ctx.size]["masking"]
    B, lengths, E = s["B"], list(s["lengths"]), s["E"]
    M, L = len(lengths), sum(lengths)
    keeps = keep_counts(lengths, 0.5)
    K = sum(keeps)
    dt, dev = DTYPES[dtype], ctx.device
    tokens = _tensor((B, L, E), dt, dev, requires_grad=True)
    mask_token = _tensor((E,), dt, dev, requires_grad=True)
    present = torch.rand(B, M, device=dev) >= 0.3  # ~30% of modalities missing, as in the anchor
    rng = torch.tensor([20250809, 0], dtype=torch.int64, device=dev)
    grad_out = _tensor((B, L, E), dt, dev)

    lengths_t = torch.tensor(lengths, device=dev)
    seg_offset = torch.repeat_interleave(torch.arange(M, device=dev), lengths_t).to(torch.float32) * 2.0
    starts = [sum(lengths[:m]) for m in range(M)]
    keep_cols = torch.cat([torch.arange(o, o + k, device=dev) for o, k in zip(starts, keeps)])
    missing_tok = torch.repeat_interleave(~present, lengths_t, dim=1)
    missing_vis = torch.repeat_interleave(~present, torch.tensor(keeps, device=dev), dim=1)

    def ours(backend: str):
        visible, ids_keep, mask = random_masking(tokens, lengths, 0.5, present, rng, backend=backend)
        return unshuffle_fill(visible, ids_keep, mask, mask_token, backend=backend), mask

    reference_mask: list[torch.Tensor] = []

    @torch.no_grad()
    def check(name: str, out: Any, grads: tuple) -> str:
        """Selections differ between implementations (Philox vs torch.rand): check the contract."""
        full, mask = out
        hidden = mask.unsqueeze(-1)
        if not torch.equal(torch.where(hidden, tokens, full), tokens.detach()):
            return "MISMATCH visible tokens are not in their places"
        if not torch.equal(torch.where(hidden, full, mask_token), mask_token.detach().expand_as(full)):
            return "MISMATCH hidden positions do not hold mask_token"
        for m, (o, n, k) in enumerate(zip(starts, lengths, keeps)):
            want = torch.where(present[:, m], n - k, n)
            if not torch.equal(mask[:, o:o + n].sum(1), want):
                return f"MISMATCH segment {m} does not hide exactly L_m − K_m tokens (all when missing)"
        tol = CHECK_TOL[dtype]
        if not rel_error(grads[0], torch.where(hidden, 0, grad_out)) <= tol:
            return "MISMATCH grad tokens"
        want_gt = (grad_out.float() * hidden).sum((0, 1))
        if not rel_error(grads[1], want_gt) <= tol:
            return "MISMATCH grad mask_token"
        if name in ("ext", "triton"):  # same (seed, offset) → the identical mask on every backend
            if not reference_mask:
                reference_mask.append(ours("reference")[1])
            if not torch.equal(mask, reference_mask[0]):
                return "MISMATCH mask differs from the reference backend's for the same rng"
        return "ok"

    fwd_bytes = B * E * DTYPES[dtype].itemsize * (3 * K + L)  # read K, write K visible, read K, write L
    return Workload(
        op="masking_fill",
        dtype=dtype,
        shape={"tokens": [B, L, E], "lengths": lengths, "keeps": keeps},
        bytes={"fwd": fwd_bytes, "fwd+bwd": 2 * fwd_bytes},
        ours=ours,
        eager=masking_fill_eager,
        eager_args=(tokens, mask_token, seg_offset, keep_cols, missing_tok, missing_vis),
        grad_inputs=(tokens, mask_token),
        grad_output=grad_out,
        check=check,
    )


def build_patch_embed(ctx: Context, dtype: str, keep_half: bool) -> Workload:
    from pyimputmae.ops import patch_embed

    s = SIZES[ctx.size]["patch"]
    B, C, S, p, E = s["B"], s["C"], s["S"], s["p"], s["E"]
    L, Fdim = (S // p) ** 3, C * p**3
    dt, dev = DTYPES[dtype], ctx.device
    x = _tensor((B, C, S, S, S), dt, dev)  # raw input: no gradient, as in pre-training
    weight = _tensor((E, Fdim), dt, dev, requires_grad=True, scale=Fdim**-0.5)
    bias = _tensor((E,), dt, dev, requires_grad=True, scale=0.1)
    keep = None
    N = L
    if keep_half:  # sorted like random_masking's ids_keep
        N = L // 2
        keep = torch.rand(B, L, device=dev).argsort(1)[:, :N].sort(1).values
    grad_out = _tensor((B, N, E), dt, dev)
    es = x.element_size()
    x_read = x.numel() * es * N // L
    w_bytes = weight.numel() * es
    out_bytes = B * N * E * es
    fwd = x_read + w_bytes + out_bytes  # read (kept) input + weight, write output
    bwd = out_bytes + x_read + w_bytes  # read grad_out + (kept) input, write grad_weight
    gemm = 2.0 * B * N * E * Fdim
    if keep_half:
        eager, args = embed_keep_eager, (x, weight, bias, keep, p)
        conv = lambda: embed_keep_conv(x, weight, bias, keep, p)
    else:
        eager, args = embed_eager, (x, weight, bias, p)
        conv = lambda: embed_conv(x, weight, bias, p)
    return Workload(
        op="patch_embed3d_keep50" if keep_half else "patch_embed3d",
        dtype=dtype,
        shape={"x": [B, C, S, S, S], "patch": p, "E": E, "tokens": N},
        bytes={"fwd": fwd, "fwd+bwd": fwd + bwd},
        flops={"fwd": gemm, "fwd+bwd": 2 * gemm},  # + grad_weight GEMM; no grad to the raw input
        ours=lambda b: patch_embed(x, weight, bias, keep=keep, patch=p, backend=b),
        eager=eager,
        eager_args=args,
        grad_inputs=(weight, bias),
        grad_output=grad_out,
        conv=conv,
    )
