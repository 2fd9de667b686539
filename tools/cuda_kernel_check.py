#!/usr/bin/env python3
"""Every code path of our CUDA kernels (csrc/cuda/), once each, against the PyTorch reference.

    python tools/cuda_kernel_check.py                      # a GPU: torch.ops.pyimputmae on CUDA tensors
    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/cuda_kernel_check.py
    python tools/cuda_kernel_check.py --emulated           # no GPU: the host emulator of tests/cuda_emu/

The paths the op suites' small shapes do not reach: 16/8/4/2-byte row moves and misaligned rows;
segments longer than a block and than the key tile, and more segments than one launch takes;
masked-MSE rows longer than a block holds in registers (every dtype, with and without norm_pix);
hidden sums over several row chunks; patch moves in 16-byte units in 1, 2 and 3 dimensions. Masks
and data moves must equal the reference bit for bit, sums agree to rounding. Small shapes, so that
the whole check stays short under ``compute-sanitizer`` (``tools/gpu_check.sh OUT sanitize``).
``tests/test_cuda_emulator.py`` runs the same cases under the emulator on every CI run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyimputmae.reference import backend as ref  # noqa: E402  (after the checkout is on sys.path)

#: (rtol, atol relative to the largest |expected|) by result dtype
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
             torch.float16: (4e-3, 4e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a, e = actual.cpu(), expected.cpu()
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        raise AssertionError(f"{what}: {len(bad)} of {a.numel()} values differ, first at {bad[0].tolist()}")


def offset_tensor(shape: tuple[int, ...], dtype: torch.dtype, offset: int, device: torch.device) -> torch.Tensor:
    """Random values whose storage starts ``offset`` elements into an allocation (misaligned rows)."""
    n = math.prod(shape)
    return torch.randn(n + offset).to(device, dtype)[offset:].view(shape)


@dataclass(frozen=True)
class Case:
    """One code path: ``run(ops, device)`` raises AssertionError when the kernels disagree."""

    name: str
    run: Callable[..., None]
    kwargs: dict = field(default_factory=dict)

    def __call__(self, ops, device: torch.device) -> None:
        torch.manual_seed(0)
        self.run(ops, device, **self.kwargs)


# ---- masking ---------------------------------------------------------------------------------

def select_keep(ops, device, lengths):
    lengths = (*lengths, 3, 4)
    keeps = [n // 2 for n in lengths[:-2]] + [0, 4]  # ... nothing kept, everything kept
    present = torch.rand(3, len(lengths)) < 0.8
    present[1, 0] = False
    rng = torch.tensor([2**40 + 17, 99])
    ids, mask, inverse = ops.select_keep(present.to(device), list(lengths), keeps, rng.to(device))
    ids_ref, mask_ref = ref.select_keep(present, lengths, keeps, rng)
    assert_equal(ids, ids_ref, "ids_keep")
    assert_equal(mask, mask_ref, "mask")
    assert_equal(inverse, selection_inverse(ids_ref, mask_ref), "select_keep's inverse map")


def selection_inverse(ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """select_keep's third output, the fill's map: the slot of each kept (visible) position, -2 elsewhere."""
    B, K = ids_keep.shape
    inverse = torch.full(mask.shape, -2, dtype=torch.int32)
    slots = torch.arange(K, dtype=torch.int32).expand(B, K)
    visible = ~mask.gather(1, ids_keep)
    inverse[visible.nonzero(as_tuple=True)[0], ids_keep[visible]] = slots[visible]
    return inverse


def row_moves(ops, device, dtype, E, offset):
    lengths, keeps = [9, 30], [4, 15]
    present = torch.tensor([[True, True], [False, True], [True, False]])
    ids, mask = ref.select_keep(present, lengths, keeps, torch.tensor([5, 6]))
    tokens = offset_tensor((3, sum(lengths), E), dtype, offset, device)
    visible = ops.gather_visible(tokens, ids.to(device), mask.to(device))
    assert_equal(visible, ref.gather_visible(tokens.cpu(), ids, mask), "gather_visible")
    x = offset_tensor((3, sum(keeps), E), dtype, offset, device)
    token = offset_tensor((E,), dtype, offset, device)
    filled = ops.unshuffle_fill(x, ids.to(device), mask.to(device), token)
    assert_equal(filled, ref.unshuffle_fill(x.cpu(), ids, mask, token.cpu()), "unshuffle_fill")
    zero_filled = ops.unshuffle_fill(x, ids.to(device), mask.to(device), None)  # the gather's backward
    assert_equal(zero_filled, ref.unshuffle_fill(x.cpu(), ids, mask, None), "unshuffle_fill, no token")
    mapped = ops.unshuffle_fill(x, ids.to(device), mask.to(device), token, selection_inverse(ids, mask).to(device))
    assert_equal(mapped, filled, "unshuffle_fill given select_keep's inverse map")
    grad_x, grad_token = ops.fill_backward(tokens, ids.to(device), mask.to(device))  # the fill's backward
    assert_equal(grad_x, ref.gather_visible(tokens.cpu(), ids, mask), "fill_backward's gather")
    assert_equal(grad_token, ops.hidden_sum(tokens, mask.to(device)), "fill_backward's sum")


def hidden_sum(ops, device, dtype, E):
    grad = torch.randn(7, 300, E).to(dtype)  # 2,100 rows: several row chunks
    mask = torch.rand(7, 300) < 0.5
    out = ops.hidden_sum(grad.to(device), mask.to(device))
    assert_close(out, ref.hidden_sum(grad, mask).to(dtype), dtype, "hidden_sum")
    assert_equal(out, ops.hidden_sum(grad.to(device), mask.to(device)), "hidden_sum run twice")


# ---- masked MSE ------------------------------------------------------------------------------

def masked_mse(ops, device, pred_dtype, spatial, patch, norm_pix, x_dtype=torch.float32):
    B = 2
    x = (torch.randn(B, 1, *spatial) * 3 + 1).to(x_dtype)
    L = math.prod(s // patch for s in spatial)
    pred = torch.randn(B, L, patch ** len(spatial)).to(pred_dtype)
    weight = (torch.rand(B, L) < 0.7).float()
    weight[0, 0] = 1.0
    loss, grad = ops.masked_mse_forward(pred.to(device), x.to(device), weight.to(device), patch, norm_pix)
    loss_ref, grad_ref = ref.masked_mse_forward(pred, x, weight, patch, norm_pix)
    assert_close(loss, loss_ref, torch.float64 if pred_dtype == torch.float64 else torch.float32, "loss")
    # the gradient in reference.masked_mse.gradient_dtype: pred's, fp32 for fp16 pred
    assert grad.dtype == grad_ref.dtype, f"grad is {grad.dtype}, the reference's {grad_ref.dtype}"
    assert_close(grad, grad_ref, grad_ref.dtype, "grad")


def masked_mse_without_weight(ops, device):
    pred, x = torch.randn(2, 4, 16, device=device), torch.randn(2, 1, 64, device=device)
    loss, grad = ops.masked_mse_forward(pred, x, torch.zeros(2, 4, device=device), 16, True)
    assert loss.item() == 0.0, f"loss {loss.item()} with no weight"
    assert_equal(grad, torch.zeros_like(grad), "grad with no weight")


def scale_grad(ops, device, dtype, n, offset, scale):
    grad = offset_tensor((n,), dtype, offset, device)
    expected = (grad.double() * scale).to(dtype)
    ops.scale_grad_(grad, torch.tensor([scale], dtype=torch.float64, device=device))
    assert_equal(grad, expected, "scaled grad")


def scale_grad_by_one(ops, device):
    grad = torch.full((100,), float("nan"), device=device)
    ops.scale_grad_(grad, torch.ones(1, device=device))
    assert bool(torch.isnan(grad).all()), "scale 1 must leave the gradient untouched"


# ---- patch embedding -------------------------------------------------------------------------

def patch_embed(ops, device, dtype, spatial, patch, with_keep):
    B, C, E = 3, 2, 24
    x = torch.randn(B, C, *spatial).to(dtype)
    F = C * patch ** len(spatial)
    L = math.prod(s // patch for s in spatial)
    weight, bias, pos = torch.randn(E, F).to(dtype), torch.randn(E).to(dtype), torch.randn(L, E).to(dtype)
    keep = torch.stack([torch.randperm(L)[: L // 2].sort().values for _ in range(B)]) if with_keep else None
    dev = lambda t: None if t is None else t.to(device)
    out = ops.patch_embed_forward(dev(x), dev(weight), dev(bias), dev(pos), dev(keep), patch)
    out_ref = ref.patch_embed_forward(x.double(), weight.double(), bias.double(), pos.double(), keep, patch)
    tol = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    assert_close(out, out_ref, tol, "out")
    grad_out = torch.randn(out.shape).to(dtype)
    grad_x, grad_w = ops.patch_embed_backward(dev(grad_out), dev(x), dev(weight), dev(keep), patch, True, True)
    grad_x_ref, grad_w_ref = ref.patch_embed_backward(grad_out.double(), x.double(), weight.double(), keep, patch,
                                                      True, True)
    assert_close(grad_x, grad_x_ref, tol, "grad_x")
    assert_close(grad_w, grad_w_ref, tol, "grad_weight")


def _cases() -> list[Case]:
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    cases = [
        Case("select_keep/longer_than_a_block", select_keep, dict(lengths=(1500, 40))),
        Case("select_keep/longer_than_the_key_tile", select_keep, dict(lengths=(5000, 7))),
        Case("select_keep/70_segments_two_launches", select_keep, dict(lengths=tuple(range(1, 71)))),
    ]
    movers = {"fp32_16B_units": (f32, 8, 0), "fp32_8B_units": (f32, 6, 0), "fp32_4B_units": (f32, 3, 0),
              "bf16_16B_units": (bf16, 16, 0), "bf16_2B_units": (bf16, 3, 0), "fp64_16B_units": (f64, 4, 0),
              "fp16_16B_units": (f16, 16, 0), "fp16_4B_units": (f16, 6, 0), "fp16_misaligned": (f16, 8, 1),
              "fp32_misaligned": (f32, 8, 1),  # storage offset of one element: 4-byte units only
              "wide_rows": (f32, 1000, 0)}  # more units than one warp covers
    cases += [Case(f"row_moves/{name}", row_moves, dict(dtype=d, E=E, offset=o)) for name, (d, E, o) in movers.items()]
    cases += [Case(f"hidden_sum/{d}_E{E}".replace("torch.", ""), hidden_sum, dict(dtype=d, E=E))
              for d, E in [(f32, 8), (f32, 5), (bf16, 24), (f16, 24), (f16, 5), (f64, 6)]]
    # pred's dtype, x's dtype, spatial size, patch; fp16 pred writes an fp32 gradient (gradient_dtype)
    rows = {"fp32_P32768_vectorised": (f32, f32, (32, 32, 32), 32),
            "bf16_P13824_vectorised": (bf16, f32, (24, 24, 24), 24),
            "fp16_P13824_vectorised": (f16, f32, (24, 24, 24), 24),
            "fp16_x_fp16_P13824_vectorised": (f16, f16, (24, 24, 24), 24),
            "fp16_x_fp16_P6_scalar": (f16, f16, (12,), 6),
            "fp32_P8202_scalar": (f32, f32, (2 * 4101,), 4101), "fp64_P4096": (f64, f32, (16, 16, 16), 16)}
    for name, (d, xd, spatial, patch) in rows.items():
        for norm_pix in (False, True):
            cases.append(Case(f"masked_mse/{name}_{'norm_pix' if norm_pix else 'raw'}", masked_mse,
                              dict(pred_dtype=d, x_dtype=xd, spatial=spatial, patch=patch, norm_pix=norm_pix)))
    cases.append(Case("masked_mse/no_weight", masked_mse_without_weight))
    cases += [Case(f"scale_grad/{name}", scale_grad, dict(dtype=d, n=n, offset=o, scale=s))
              for name, (d, n, o, s) in {"fp32": (f32, 1001, 0, 0.5), "fp32_misaligned": (f32, 1001, 1, 0.5),
                                         "bf16": (bf16, 77, 0, -3.0), "fp16": (f16, 77, 0, -3.0),
                                         "fp16_misaligned": (f16, 77, 1, 0.5), "fp64": (f64, 10, 0, 2.0)}.items()]
    cases.append(Case("scale_grad/by_one_touches_nothing", scale_grad_by_one))
    embeds = {"3d_fp32_16B": (f32, (16, 16, 16), 4), "2d_bf16_16B": (bf16, (16, 16), 8),
              "3d_fp16_16B": (f16, (8, 8, 16), 8), "1d_fp16_scalar": (f16, (15,), 3),
              "1d_fp64_16B": (f64, (12,), 2), "2d_fp32_scalar": (f32, (15, 15), 5)}
    for name, (d, spatial, patch) in embeds.items():
        for with_keep in (False, True):
            cases.append(Case(f"patch_embed/{name}_{'keep' if with_keep else 'all'}", patch_embed,
                              dict(dtype=d, spatial=spatial, patch=patch, with_keep=with_keep)))
    return cases


CASES = _cases()


def emulated_ops():
    """``torch.ops.pyimputmae_cuda_emu``: the kernels built for the host emulator (tests/cuda_emu/build.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pyimputmae_tests_cuda_emu_build",
                                                  ROOT / "tests" / "cuda_emu" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true", help="run under the host emulator on CPU tensors")
    parser.add_argument("-k", dest="only", default="", help="only the cases whose name contains this")
    opts = parser.parse_args(argv)
    if opts.emulated:
        ops, device = emulated_ops(), torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: pass --emulated to run the kernels under the host emulator")
        from pyimputmae import _extension

        if not _extension.load():
            print(f"the extension does not load: {_extension.unavailable_reason()}")
            return 1
        ops, device = torch.ops.pyimputmae, torch.device("cuda")
    failed = 0
    for case in CASES:
        if opts.only not in case.name:
            continue
        start = time.perf_counter()
        try:
            case(ops, device)
            if device.type == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, under this case's name
            status = "ok"
        except Exception as err:  # report every case, then fail
            failed += 1
            status = f"FAIL {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        print(f"{case.name:45s} {status} ({time.perf_counter() - start:.2f}s)", flush=True)
    print(f"{failed} of {len(CASES)} cases failed" if failed else f"all {len(CASES)} cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
