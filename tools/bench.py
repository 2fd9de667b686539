#!/usr/bin/env python3
"""Benchmarks of the fused ops against plain PyTorch, timed in one run on one device.

    python tools/bench.py --device cuda --size large --json out/bench_large.json [--quick]
    python tools/bench.py --device cpu --size paper --ops masked_mse --backends reference --quick

For every op of DESIGN.md section 5 (``masked_mse``, ``masked_mse_normpix``, ``masking_fill``,
``patch_embed3d``, ``patch_embed3d_keep50``), every dtype, every pass (``fwd``, ``fwd+bwd``): each
of our backends that can run on the device (``ext``, ``triton``, ``reference``; the others are
listed as skipped, with the reason) and the baselines ``eager`` (the same math as a user writes
it in plain PyTorch), ``compile`` (``torch.compile`` of eager) and ``conv`` (``F.conv3d`` with
kernel = stride, what ``nn.Conv3d`` runs; patch embedding only). Before timing, each variant's
outputs and gradients are compared with eager's on the bench inputs (``"check"``).

GB/s counts the bytes the op must move (section 5), whatever a variant actually moves;
``roofline_frac`` divides it by the device copy bandwidth measured in the same run (a large
``clone``, bytes read + written). Docs: docs/benchmarks.md. New measurements (e.g. the data
worker's ``store_load``) plug in through :func:`register`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_BACKENDS = ("ext", "triton", "reference")
BASELINES = ("eager", "compile", "conv")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max|ours − eager| / max|eager| allowed by the correctness guard: loose on purpose (TF32 GEMMs,
# other summation orders); it catches wrong results, not rounding
CHECK_TOL = {"fp32": 5e-3, "bf16": 5e-2, "fp16": 1e-2}

# DESIGN.md section 5. tiny: smoke tests and tests/bench only, not a reported size.
SIZES: dict[str, dict[str, dict]] = {
    "paper": {
        "mse": {"B": 96, "C": 1, "S": 64, "p": 16},  # MRI: L = 64, P = 4096
        "masking": {"B": 96, "lengths": (32, 24, 256, 64), "E": 256},
        "patch": {"B": 96, "C": 1, "S": 64, "p": 16, "E": 256},
    },
    "large": {
        "mse": {"B": 32, "C": 4, "S": 64, "p": 8},  # L = 512, P = 2048
        "masking": {"B": 64, "lengths": (256, 256, 256, 256), "E": 384},
        "patch": {"B": 32, "C": 4, "S": 64, "p": 8, "E": 384},
    },
    "tiny": {
        "mse": {"B": 4, "C": 1, "S": 16, "p": 4},
        "masking": {"B": 4, "lengths": (8, 6, 16, 8), "E": 32},
        "patch": {"B": 4, "C": 1, "S": 16, "p": 4, "E": 32},
    },
}


# ---------------------------------------------------------------------------------------------
# Baselines: the math as a user writes it today (facebookresearch/mae models_mae.py style)
# ---------------------------------------------------------------------------------------------

def patchify_eager(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x: (B, C, D, H, W)`` → ``(B, L, C·p³)``, patches row-major, features ``(c, i, j, l)``."""
    B, C, D, H, W = x.shape
    t = x.reshape(B, C, D // p, p, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return t.reshape(B, (D // p) * (H // p) * (W // p), C * p**3)


def embed_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """Patch embedding as reshape + F.linear: ``(B, C, D, H, W)`` → ``(B, L, E)``."""
    return F.linear(patchify_eager(x, p), weight, bias)


def embed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """Patch embedding as nn.Conv3d(C, E, p, stride=p) computes it → ``(B, L, E)``."""
    w = weight.view(weight.shape[0], x.shape[1], p, p, p)
    return F.conv3d(x, w, bias, stride=p).flatten(2).transpose(1, 2)


def keep_rows(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(B, L, E)``, ``keep: (B, K)`` → ``(B, K, E)``: MAE's gather of the visible tokens."""
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def embed_keep_eager(x, weight, bias, keep, p: int) -> torch.Tensor:
    """What users do today for ``keep``: embed every patch, then gather the kept ones."""
    return keep_rows(embed_eager(x, weight, bias, p), keep)


def embed_keep_conv(x, weight, bias, keep, p: int) -> torch.Tensor:
    return keep_rows(embed_conv(x, weight, bias, p), keep)


def masked_mse_eager(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """MAE's ``forward_loss``: mean over patch values, mean over hidden patches (mask: float, 1 = hidden)."""
    target = patchify_eager(x, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L): mean loss per patch
    return (loss * mask).sum() / mask.sum()


def masking_fill_eager(tokens, mask_token, seg_offset, keep_cols, missing_tok, missing_vis):
    """MAE-style per-modality masking (argsort of noise) and unshuffle with MASK_TOKEN fill.

    tokens: ``(B, L, E)``; mask_token: ``(E,)``; seg_offset: ``(L,)`` 2·segment id, so that each
    segment's noise lies in its own band and the sort keeps the segments in blocks; keep_cols:
    ``(K,)`` the first ``K_m`` columns of each block; missing_tok ``(B, L)`` / missing_vis
    ``(B, K)``: bool, the modality is missing → ``full: (B, L, E)``, ``mask: (B, L)`` bool.
    """
    B, L, E = tokens.shape
    noise = torch.rand(B, L, device=tokens.device) + seg_offset
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: the first K_m of each block are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, keep_cols]
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    visible = visible.masked_fill(missing_vis.unsqueeze(-1), 0.0)
    # (the encoders run on `visible` here)
    shuffled = mask_token.expand(B, L, E).clone()
    shuffled[:, keep_cols] = visible
    full = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, E))
    full = torch.where(missing_tok.unsqueeze(-1), mask_token, full)
    mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)  # 1 = hidden, as in MAE
    mask[:, keep_cols] = False
    mask = torch.gather(mask, 1, ids_restore) | missing_tok
    return full, mask


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


# ---------------------------------------------------------------------------------------------
# Context: device, timers, memory, measured limits
# ---------------------------------------------------------------------------------------------

class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[dict]:
    """Raise CompileTimeout in the main thread after ``seconds`` (SIGALRM); yields a state dict
    whose "fired" says whether it did (torch.compile may wrap the exception in its own)."""
    state = {"fired": False}
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield state
        return

    def handler(signum, frame):
        state["fired"] = True
        raise CompileTimeout(f"took over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Context:
    device: torch.device
    size: str
    quick: bool = False
    backends: tuple[str, ...] = OUR_BACKENDS
    explicit_backends: bool = False
    baselines: tuple[str, ...] = BASELINES
    passes: tuple[str, ...] = PASSES
    dtypes: tuple[str, ...] | None = None  # None: each op's default dtypes
    check: bool = True
    compile_timeout: float = 300.0
    min_run_time: float = 0.5
    threads: int = 1
    copy_gbps: float = math.nan
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    ext_broken: str | None = None  # set when loading the extension kills a child process

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of one call: CUDA events (do_bench) on GPU, Timer on CPU."""
        if self.cuda:
            return _time_cuda(fn, self.quick)
        from torch.utils import benchmark

        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        return timer.blocked_autorange(min_run_time=self.min_run_time).median * 1e3

    def peak_extra(self, fn: Callable[[], Any]) -> tuple[float | None, str]:
        """MiB allocated by one call beyond what existed before it (inputs excluded; outputs and
        gradients it returns included), and how that was measured."""
        gc.collect()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return peak / 2**20, "torch.cuda.max_memory_allocated"
        try:
            return _cpu_profiler_peak(fn) / 2**20, "torch.profiler memory events (torch CPU allocations)"
        except Exception:
            peak = _rss_peak(fn)
            method = "RSS high-water delta (approximate: freed and reused pages hide part of it)"
            return (peak / 2**20 if peak is not None else None), method

    def dtypes_for(self, default: Sequence[str], optional: Sequence[str]) -> list[str]:
        if self.dtypes is None:
            return list(default)
        return [d for d in self.dtypes if d in (*default, *optional)]

    def availability(self, name: str) -> tuple[bool, str]:
        from pyimputmae import _backends

        if name == "ext" and self.ext_broken:
            return False, self.ext_broken
        ok, why = _backends.availability(name, self.device)
        if ok and name == "triton" and not self.cuda and not self.explicit_backends:
            return False, "Triton interpreter on CPU is a correctness tool, not timed unless --backends names it"
        return ok, why


def _time_cuda(fn: Callable[[], Any], quick: bool) -> float:
    warmup, rep = (10, 40) if quick else (25, 200)  # milliseconds, as do_bench counts them
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    torch.cuda.synchronize()
    times = []
    for i in range(5 + (20 if quick else 100)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:  # the first few are warm-up
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _cpu_profiler_peak(fn: Callable[[], Any]) -> float:
    """Peak of the running sum of the allocations and frees torch's profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    if not events:
        raise RuntimeError("the profiler recorded no memory events")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


def _rss_peak(fn: Callable[[], Any]) -> float | None:
    """Rise of the process's peak resident set during one call (Linux: reset by clear_refs)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = status("VmRSS:")
        out = fn()
        peak = status("VmHWM:") - base
        del out
        return float(peak)
    except OSError:
        return None


def measure_copy_gbps(ctx: Context) -> dict[str, float]:
    """Device copy bandwidth, bytes read + written, of a 1 GiB (GPU) / 256 MiB (CPU) fp32 tensor:
    ``clone`` (a fresh output) and ``copy_`` into an existing buffer. The roofline uses clone on
    GPU (the caching allocator makes both the same) and copy_ on CPU, where the fresh allocation
    of a clone is page-faulted in by the OS on first touch and that, not memory, sets its speed."""
    n = 2**28 if ctx.cuda else 2**26
    x = torch.empty(n, dtype=torch.float32, device=ctx.device).fill_(1.0)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    clone = nbytes / (ctx.time_ms(x.clone) * 1e-3) / 1e9
    copy = nbytes / (ctx.time_ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    return {"clone_gbps": clone, "copy_into_gbps": copy, "roofline_gbps": clone if ctx.cuda else copy,
            "roofline_method": "clone" if ctx.cuda else "copy_ into an existing buffer"}


def measure_matmul_tflops(ctx: Context, dtype: str) -> float:
    n = 8192 if ctx.cuda else 1024
    a = torch.randn(n, n, device=ctx.device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=ctx.device).to(DTYPES[dtype])
    ms = ctx.time_ms(lambda: a @ b)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# Running a workload: variants, correctness guard, timing, records
# ---------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str  # our backend, or the baseline's name
    baseline: str | None
    forward: Callable[[], Any] | None = None
    compiled: bool = False
    skipped: str | None = None


def variants_of(ctx: Context, w: Workload) -> list[Variant]:
    out = []
    for name in ctx.backends:
        ok, why = ctx.availability(name)
        out.append(Variant(name, None, functools.partial(w.ours, name)) if ok else Variant(name, None, skipped=why))
    if "eager" in ctx.baselines:
        out.append(Variant("eager", "eager", lambda: w.eager(*w.eager_args)))
    if "conv" in ctx.baselines and w.conv is not None:
        out.append(Variant("conv", "conv", w.conv))
    if "compile" in ctx.baselines:
        compiled = torch.compile(w.eager)
        out.append(Variant("compile", "compile", lambda: compiled(*w.eager_args), compiled=True))
    return out


def base_record(ctx: Context, w: Workload, v: Variant, pass_: str) -> dict:
    return {"op": w.op, "backend": v.name, "baseline": v.baseline, "size": ctx.size, "shape": w.shape,
            "dtype": w.dtype, "pass": pass_, "device": ctx.device.type}


def measure(ctx: Context, w: Workload, v: Variant, pass_: str, check: str) -> dict:
    fn = pass_fn(w, v.forward, pass_)
    ms = ctx.time_ms(fn)
    peak, method = ctx.peak_extra(fn)
    nbytes = w.bytes[pass_]
    gbps = nbytes / (ms * 1e-3) / 1e9
    rec = base_record(ctx, w, v, pass_)
    rec.update(median_ms=ms, gbps=gbps, roofline_frac=gbps / ctx.copy_gbps, peak_extra_mb=peak,
               peak_extra_method=method, bytes=nbytes, check=check)
    if w.flops:
        rec["tflops"] = w.flops[pass_] / (ms * 1e-3) / 1e12
        peak_tflops = ctx.matmul_tflops.get(w.dtype)
        rec["flop_frac"] = rec["tflops"] / peak_tflops if peak_tflops else None
    return rec


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def verdict(ctx: Context, w: Workload, v: Variant, out: Any, grads: tuple) -> str:
    """The correctness guard: "ok", "MISMATCH ...", or why it could not say."""
    if not ctx.check:
        return "not checked"
    if v.name == "eager" and w.check is None:
        return "ok (the baseline itself)"
    try:
        return (w.check or functools.partial(compare_with_eager, w))(v.name, out, grads)
    except Exception as err:
        return f"MISMATCH: the check raised {type(err).__name__}: {_first_line(err)}"


def run_workload(ctx: Context, w: Workload) -> Iterator[dict]:
    for v in variants_of(ctx, w):
        if v.skipped:
            for pass_ in ctx.passes:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None, "skipped": v.skipped}
            continue
        # warm-up (Triton JIT, torch.compile) and the correctness guard, one fwd+bwd
        try:
            with time_limit(ctx.compile_timeout if v.compiled else None) as limit:
                out, grads = run_once(w, v.forward)
                ctx.sync()
        except Exception as err:
            if limit["fired"]:
                reason = f"torch.compile took over {ctx.compile_timeout:.0f} s"
            else:
                reason = f"{type(err).__name__}: {_first_line(err)}"
                reason = f"torch.compile failed: {reason}" if v.compiled else reason
            # a baseline that cannot run is skipped; one of our backends that fails is an error
            key = "skipped" if v.compiled else "error"
            for pass_ in ctx.passes:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None, key: reason}
            continue
        check = verdict(ctx, w, v, out, grads)
        del out, grads
        for pass_ in ctx.passes:
            try:
                yield measure(ctx, w, v, pass_, check)
            except Exception as err:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None,
                       "error": f"{type(err).__name__}: {_first_line(err)}", "check": check}


# ---------------------------------------------------------------------------------------------
# Registry: one entry per measurement family, selected by --ops
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSpec:
    name: str
    run: Callable[[Context], Iterator[dict]]
    default: bool  # part of a run without --ops
    patch_flops: bool = False  # needs the measured matmul peak


BENCHES: dict[str, BenchSpec] = {}
WORKLOADS: dict[str, Callable[[Context, str], Workload]] = {}  # op name → builder (tests/bench uses them)


def register(name: str, *, default: bool = True, patch_flops: bool = False):
    """Add a measurement: ``fn(ctx) -> iterator of records`` (dicts with at least "op", "size",
    "device"). It may use ``ctx.time_ms``, ``ctx.peak_extra`` and ``ctx.copy_gbps``; records
    with ``"baseline": None`` and a ``"pass"`` take part in the summaries. Example (data
    worker): ``@register("store_load", default=False)`` on a function timing store loads."""
    def deco(fn: Callable[[Context], Iterator[dict]]):
        BENCHES[name] = BenchSpec(name, fn, default, patch_flops)
        return fn
    return deco


def op_bench(name: str, build: Callable[[Context, str], Workload], dtypes: Sequence[str],
             optional_dtypes: Sequence[str] = (), patch_flops: bool = False) -> None:
    """Register an op benchmark: ``build(ctx, dtype)`` for each dtype, timed by :func:`run_workload`."""
    WORKLOADS[name] = build

    def run(ctx: Context) -> Iterator[dict]:
        for dtype in ctx.dtypes_for(dtypes, optional_dtypes):
            torch.manual_seed(0)
            w = build(ctx, dtype)
            try:
                yield from run_workload(ctx, w)
            finally:
                del w
                torch._dynamo.reset()  # drop compiled graphs before the next workload
                gc.collect()
                if ctx.cuda:
                    torch.cuda.empty_cache()
    register(name, patch_flops=patch_flops)(run)


op_bench("masked_mse", functools.partial(build_masked_mse, norm_pix=False), ("fp32",), ("bf16",))
op_bench("masked_mse_normpix", functools.partial(build_masked_mse, norm_pix=True), ("fp32",), ("bf16",))
op_bench("masking_fill", build_masking_fill, ("fp32",), ("bf16",))
op_bench("patch_embed3d", functools.partial(build_patch_embed, keep_half=False), ("fp32", "bf16"),
         ("fp16",), patch_flops=True)
op_bench("patch_embed3d_keep50", functools.partial(build_patch_embed, keep_half=True), ("fp32", "bf16"),
         ("fp16",), patch_flops=True)


@register("store_load", default=False)
def bench_store_load(ctx: Context) -> Iterator[dict]:
    """Whole-cohort load of a zarr store into memory (issue: a paper-sized store, 1,104 patients,
    ~2 GB, in under 10 s with a warm page cache) and streaming through forked DataLoader workers.
    ``--size paper`` writes a paper-sized synthetic store first (a few minutes, ~1 GB on disk)."""
    import tempfile

    from pyimputmae.data.bench_store import bench_store_load as run

    sizes = "paper" if ctx.size in ("paper", "large") else "small"
    for codec in ("lz4", "zstd"):
        with tempfile.TemporaryDirectory(prefix="pyimputmae-store-") as tmp:
            res = run(tmp, n_patients=1104, sizes=sizes, codec=codec, repeats=2 if ctx.quick else 3,
                      device=ctx.device if ctx.cuda else None)
        yield {"op": "store_load", "backend": codec, "baseline": None, "size": ctx.size,
               "shape": f"1104 patients, {sizes} sizes", "dtype": "fp32", "pass": "load",
               "device": str(ctx.device), "median_ms": res["load_s"] * 1e3,
               "gbps": res.get("load_gb_per_s"), "roofline_frac": None, "peak_extra_mb": res.get("memory_mb"),
               "store_mb": res.get("store_mb"), "stream_patients_per_s": res.get("stream_patients_per_s"),
               "load_cpu_s": res.get("load_cpu_s"), "load_s_runs": res.get("load_s_runs")}


# ---------------------------------------------------------------------------------------------
# Summaries, JSON, table
# ---------------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> list[dict]:
    """Per op/size/pass/dtype/device: the fastest of our backends whose check passed, and its
    speedups over each baseline measured in the same run."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("pass") and "op" in r and not r.get("summary") and not r.get("header"):
            groups.setdefault((r["op"], r["size"], r["pass"], r["dtype"], r["device"]), []).append(r)
    out = []
    for (op, size, pass_, dtype, device), recs in groups.items():
        timed = [r for r in recs if r.get("median_ms")]
        ours = [r for r in timed if r["baseline"] is None and str(r.get("check", "ok")).startswith(("ok", "not"))]
        s = {"summary": True, "op": op, "size": size, "pass": pass_, "dtype": dtype, "device": device,
             "best_backend": None, "best_ms": None}
        if ours:
            best = min(ours, key=lambda r: r["median_ms"])
            s.update(best_backend=best["backend"], best_ms=best["median_ms"])
        for base in BASELINES:
            if base == "conv" and not op.startswith("patch_embed"):
                continue
            ref = [r for r in timed if r["baseline"] == base]
            s[f"speedup_vs_{base}"] = ref[0]["median_ms"] / s["best_ms"] if ref and s["best_ms"] else None
        out.append(s)
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    """Rewritten after every measurement, so a run cut short still leaves its results."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "records": records + summarize(records)}, f, indent=1)
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value, spec)


def print_table(records: list[dict]) -> None:
    eager_ms = {(r["op"], r["pass"], r["dtype"]): r["median_ms"]
                for r in records if r.get("baseline") == "eager" and r.get("median_ms")}
    head = (f"{'op':22s} {'impl':10s} {'pass':8s} {'dtype':5s} {'ms':>9s} {'GB/s':>8s} {'%roof':>6s} "
            f"{'TFLOP/s':>8s} {'peak MB':>8s} {'x eager':>8s}  check")
    print("\n" + head + "\n" + "-" * len(head))
    for r in records:
        if r.get("header") or r.get("summary") or "op" not in r or "pass" not in r:
            continue
        ms = r.get("median_ms")
        if not ms:
            why = r.get("skipped") or r.get("error") or "?"
            print(f"{r['op']:22s} {r['backend']:10s} {r['pass']:8s} {r['dtype']:5s}  "
                  f"{'skipped' if 'skipped' in r else 'ERROR'}: {why[:90]}")
            continue
        e = eager_ms.get((r["op"], r["pass"], r["dtype"]))
        roof = r["roofline_frac"] * 100 if r.get("roofline_frac") is not None else None
        print(f"{r['op']:22s} {r['backend']:10s} {r['pass']:8s} {r['dtype']:5s} {ms:9.3f} "
              f"{_fmt(r.get('gbps'), '8.1f')} {_fmt(roof, '6.1f')} {_fmt(r.get('tflops'), '8.2f')} "
              f"{_fmt(r.get('peak_extra_mb'), '8.1f')} {_fmt(e / ms if e else None, '8.2f')}  {r.get('check', '')}")
    summaries = summarize(records)
    if summaries:
        print("\nbest of ours per op/pass/dtype (speedup = baseline ms / ours ms)")
        for s in summaries:
            speed = "  ".join(f"vs {b} {_fmt(s.get(f'speedup_vs_{b}'), '.2f')}"
                              for b in BASELINES if f"speedup_vs_{b}" in s)
            print(f"  {s['op']:22s} {s['pass']:8s} {s['dtype']:5s} {s['best_backend'] or 'none':10s} {speed}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def probe_extension() -> str | None:
    """Load the compiled extension in a child process first: a broken build can abort the process
    that loads it (a C++ exception in a static initialiser), which no try/except catches here.
    Returns why it cannot be used, or None when loading it is safe."""
    code = "import pyimputmae._extension as e; e.load()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.SubprocessError) as err:
        return f"could not probe the extension in a child process: {err}"
    if r.returncode == 0:
        return None
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    key = ("what():", "RuntimeError", "ImportError")
    what = next((ln for ln in lines if ln.startswith(key)), lines[-1] if lines else "")
    return f"loading pyimputmae._C ended a child process (exit {r.returncode}): {what[:300]}"


def _import_pyimputmae() -> None:
    try:
        import pyimputmae
    except ImportError:  # not installed: use the checkout (without the Triton package mapping)
        sys.path.insert(0, ROOT)
        import pyimputmae  # noqa: F401


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="large",
                    help="paper / large (DESIGN.md section 5); tiny: smoke tests only")
    ap.add_argument("--json", metavar="PATH", help="write {meta, records} here (rewritten as results come in)")
    defaults = [n for n, b in BENCHES.items() if b.default]
    ap.add_argument("--ops", nargs="+", metavar="OP", help=f"default: all of {defaults}")
    ap.add_argument("--backends", nargs="+", choices=OUR_BACKENDS, help="our backends (default: all)")
    ap.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                    help="default: fp32 and bf16 for patch embedding, fp32 for the others")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (GPU: 40 ms per measurement)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    ap.add_argument("--compile-timeout", type=float, default=None, metavar="S",
                    help="skip torch.compile when its first call takes longer (default 120 s GPU, 180 s CPU)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness guard")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--min-run-time", type=float, default=None, metavar="S",
                    help="CPU Timer.blocked_autorange min_run_time (default 0.5, --quick 0.2)")
    ap.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, spec in BENCHES.items():
            print(f"{name}{'' if spec.default else '  (only with --ops)'}")
        return 0
    ops = args.ops or [n for n, b in BENCHES.items() if b.default]
    unknown = [o for o in ops if o not in BENCHES]
    if unknown:
        print(f"unknown op(s) {unknown}; registered: {list(BENCHES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})", file=sys.stderr)
        return 3
    _import_pyimputmae()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    baselines = tuple(b for b in args.baselines if not (b == "compile" and args.no_compile))
    device = torch.device(args.device)
    ctx = Context(
        device=device, size=args.size, quick=args.quick,
        backends=tuple(args.backends or OUR_BACKENDS), explicit_backends=bool(args.backends),
        baselines=baselines, passes=tuple(args.passes), dtypes=tuple(args.dtypes) if args.dtypes else None,
        check=not args.no_check,
        compile_timeout=args.compile_timeout or (120.0 if device.type == "cuda" else 180.0),
        min_run_time=args.min_run_time or (0.2 if args.quick else 0.5), threads=threads,
    )
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    if os.environ.get("PYIMPUTMAE_NO_EXT") != "1":  # listing availability loads it too
        ctx.ext_broken = probe_extension()
        if ctx.ext_broken:
            os.environ["PYIMPUTMAE_NO_EXT"] = "1"  # nothing in this process may load it
            print(f"extension unusable, left out: {ctx.ext_broken}", file=sys.stderr, flush=True)
    name = device_name(device)
    print(f"device {name} ({device.type}); torch {torch.__version__}; triton {triton_version}; "
          f"cpu threads {threads}; size {args.size}{' (quick)' if args.quick else ''}", flush=True)
    copy = measure_copy_gbps(ctx)
    ctx.copy_gbps = copy["roofline_gbps"]
    if any(BENCHES[o].patch_flops for o in ops):
        for dt in ctx.dtypes_for(("fp32", "bf16"), ("fp16",)):
            ctx.matmul_tflops[dt] = measure_matmul_tflops(ctx, dt)
    print(f"copy bandwidth (read + write): clone {copy['clone_gbps']:.1f} GB/s, copy_ {copy['copy_into_gbps']:.1f} "
          f"GB/s, roofline uses {copy['roofline_method']}; matmul TFLOP/s "
          + (", ".join(f"{k} {v:.2f}" for k, v in ctx.matmul_tflops.items()) or "not measured"), flush=True)
    availability = {b: dict(zip(("ok", "why"), ctx.availability(b))) for b in OUR_BACKENDS}
    for b, a in availability.items():
        print(f"  backend {b:9s} {'yes' if a['ok'] else 'no '}  {a['why']}", flush=True)

    meta = {
        "device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "copy_gbps": ctx.copy_gbps, "copy": copy, "matmul_tflops": ctx.matmul_tflops,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "size": args.size, "quick": args.quick,
        "backends": availability,
        "timer": ("triton.testing.do_bench median (CUDA events)" if ctx.cuda
                  else f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={ctx.min_run_time}) median"),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    records: list[dict] = [{"header": True, "device": device.type, "device_name": name, "copy_gbps": ctx.copy_gbps,
                            **copy, "matmul_tflops": ctx.matmul_tflops, "cpu_threads": threads}]
    for op in ops:
        for rec in BENCHES[op].run(ctx):
            records.append(rec)
            ms = rec.get("median_ms")
            status = f"{ms:.3f} ms  {rec.get('check', '')}" if ms else (rec.get("skipped") or rec.get("error"))
            print(f"  {rec.get('op', op)} {rec.get('backend', '')} {rec.get('pass', '')} {rec.get('dtype', '')}: "
                  f"{status}", flush=True)
            if args.json:
                write_json(args.json, meta, records)
    print_table(records)
    if args.json:
        write_json(args.json, meta, records)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
