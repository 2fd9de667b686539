#!/usr/bin/env python3
"""Time the Triton patch embedding under a few fixed tile configurations (a GPU measurement).

    python tools/patch_embed_sweep.py --json out/patch_embed_sweep.json          # H100 / H200, ~1 minute
    TRITON_INTERPRET=1 python tools/patch_embed_sweep.py --device cpu --size tiny  # the CPU dry run

The library has two forward kernels with one fixed configuration each (``kernels/patch_embed.py``): the
gather GEMM (``_forward_config``; a random half of the patches, ``keep``, always takes it) and, for every
patch of a 16-bit input on sm_90+, the TMA kernel (``_tma_plan``); and two for ``grad_weight`` alike
(the gather GEMM, and for every patch the TMA kernel of ``_grad_weight_tma_plan``). This measures the
alternatives of each on the bench's ``large`` shape (x ``(32, 4, 64, 64, 64)``, patch 8, E = 384,
bf16): the forward of every patch under the TMA and the gather configurations, of the kept half under
the gather ones, and grad_weight of every patch (case ``grad_weight``) under its TMA configurations
and the gather kernel, so that the fixed choices can follow a measurement.
Each configuration is checked against ``F.linear`` of the patchified input (grad_weight: against
``grad_outᵀ · patches`` in fp32) first (a mismatch is reported, never timed), then timed with
``triton.testing.do_bench`` (median). The same math in eager PyTorch on the patchified input (reshape
+ ``F.linear``; for grad_weight reshape + one matmul, the copy included) is timed in the same run as
the anchor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is the library's fixed choice. At
#: the large size (16,384 rows × 384) 128 × 128 tiles make 384 programs: 2 per SM fit with 3 stages
#: (96 KiB shared), 1.45 waves on 132 SMs; 2 stages (64 KiB) fit 3 per SM, one wave.
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
CONFIGS = [dict(zip(TILE_KEYS, tiles)) for tiles in [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 2),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 2),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]]
TINY_CONFIGS = [dict(zip(TILE_KEYS, tiles)) for tiles in [(16, 16, 16, 4, 1), (32, 16, 16, 4, 1)]]
#: the TMA kernel's (BLOCK_M: the patches a tile aims at, BLOCK_N, num_warps, num_stages), every patch
#: only; the first is its fixed choice (at the large size 2 × 8 × 8 patches × 128 dims, 384 programs).
TMA_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
TMA_CONFIGS = [dict(zip(TMA_KEYS, tiles), TMA=True) for tiles in [
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 128, 8, 2),
    (128, 256, 8, 3),
    (128, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
]]
TINY_TMA_CONFIGS = [dict(zip(TMA_KEYS, tiles), TMA=True) for tiles in [(16, 16, 1, 1), (16, 32, 1, 1)]]
#: grad_weight of every patch (``patch_embed_backward(config=...)``), the TMA kernel's (BLOCK_M: the
#: patches a step reduces over, BLOCK_N: the tile's embedding dims; each tile is 64 features × BLOCK_N,
#: split over the patches), then the gather kernel's fixed tiles; the first is the fixed choice. At the
#: large size 3 × 32 tiles × 3 splits of 43 steps; 3 stages need 128 KiB of shared memory (one program
#: per SM), 2 stages 80 KiB (two).
GRAD_CONFIGS = [dict(zip(TMA_KEYS, tiles), TMA=True) for tiles in [
    (128, 128, 4, 3),
    (128, 128, 4, 2),
    (128, 128, 4, 4),
    (128, 256, 4, 2),
    (128, 64, 4, 4),
    (256, 128, 4, 2),
    (64, 128, 4, 4),
    (128, 128, 8, 3),
]] + [{"TMA": False}]
TINY_GRAD_CONFIGS = [dict(zip(TMA_KEYS, tiles), TMA=True) for tiles in [(16, 16, 1, 1), (32, 16, 1, 1)]] + [
    {"TMA": False}]
SIZES = {"large": dict(B=32, C=4, S=64, patch=8, E=384), "tiny": dict(B=2, C=2, S=16, patch=4, E=24)}


def label(config: dict) -> str:
    """``BLOCK_MxBLOCK_NxBLOCK_Kxwarpsxstages`` for the gather kernel, e.g. ``128x128x64x8x3``;
    ``tma-BLOCK_MxBLOCK_Nxwarpsxstages`` for the TMA kernel; ``gather`` for grad_weight's gather kernel."""
    if config == {"TMA": False}:
        return "gather"
    if config.get("TMA"):
        return "tma-" + "x".join(str(config[k]) for k in TMA_KEYS)
    return "x".join(str(config[k]) for k in TILE_KEYS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="large", choices=tuple(SIZES))
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args(argv)
    from pyimputmae import _backends
    from pyimputmae.reference.patch_embed import patchify

    kernels = _backends.module("triton")
    dev = torch.device(opts.device)
    shape = SIZES[opts.size]
    B, C, S, p, E = (shape[k] for k in ("B", "C", "S", "patch", "E"))
    dtype = torch.bfloat16  # (the interpreter's dots run in float32: kernels.patch_embed._dot_mode)
    torch.manual_seed(0)
    x = torch.randn(B, C, S, S, S, device=dev, dtype=dtype)
    w = torch.randn(E, C * p**3, device=dev, dtype=dtype) * (C * p**3) ** -0.5
    b = torch.randn(E, device=dev, dtype=dtype)
    L = (S // p) ** 3
    keep = torch.rand(B, L, device=dev).argsort(1)[:, : L // 2].contiguous()
    if dev.type == "cuda":
        from triton.testing import do_bench

        def time_ms(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        def time_ms(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

    records = []
    patches = patchify(x, p)
    grad_out = torch.randn(B, L, E, device=dev, dtype=dtype)
    # every patch, as eager code embeds them: the same work for every forward case, timed once
    eager_ms = time_ms(lambda: F.linear(patchify(x, p), w, b))
    forward_flops = 2 * B * L * E * C * p**3
    grad_configs = TINY_GRAD_CONFIGS if opts.size == "tiny" else GRAD_CONFIGS
    # every patch's forward and grad_weight first (their TMA kernels decide the riskiest target), then
    # the kept half: the JSON is rewritten after each record, so a stage stopped early keeps those
    for case, k in [("all", None), ("grad_weight", None), ("keep50", keep)]:
        n = L if k is None else k.shape[1]
        flops = 2 * B * n * E * C * p**3
        if case == "grad_weight":
            want = (grad_out.reshape(-1, E).float().t() @ patches.reshape(-1, C * p**3).float())
            records.append({"case": case, "impl": "eager reshape + grad_outᵀ · patches (bf16 matmul)",
                            "median_ms": (ms := time_ms(lambda: grad_out.reshape(-1, E).t()
                                                        @ patchify(x, p).reshape(-1, C * p**3))),
                            "tflops": flops / (ms * 1e-3) / 1e12})
            configs = grad_configs

            def run(config, k=k):
                return kernels.patch_embed_backward(grad_out, x, w, None, p, False, True, config=config)[1]
        else:
            rows = patches if k is None else patches.gather(1, k[..., None].expand(-1, -1, patches.shape[2]))
            want = F.linear(rows, w, b)
            records.append({"case": case, "impl": "eager reshape + F.linear (all patches)", "median_ms": eager_ms,
                            "tflops": forward_flops / (eager_ms * 1e-3) / 1e12})
            configs = TINY_CONFIGS if opts.size == "tiny" else CONFIGS
            if k is None:
                configs = (TINY_TMA_CONFIGS if opts.size == "tiny" else TMA_CONFIGS) + configs

            def run(config, k=k):
                return kernels.patch_embed_forward(x, w, b, None, k, p, config=config)
        for config in configs:
            rec = {"case": case, "impl": "triton", "config": config}
            geo = kernels.patch_embed.patch_geometry(x, p)
            if case == "grad_weight" and config.get("TMA"):  # the tiles it resolves BLOCK_M to
                rec["plan"] = kernels.patch_embed._grad_weight_tma_plan(grad_out, x, w, None, geo, config)
            elif config.get("TMA"):  # (BD·BH·BX/p patches)
                rec["plan"] = kernels.patch_embed._tma_plan(x, w, k, geo, config)
            try:
                got = run(config)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                rec["max_rel_err"] = err
                if not err <= 2e-2:
                    rec["error"] = f"MISMATCH: max relative error {err:.3g}"
                else:
                    rec["median_ms"] = time_ms(lambda config=config: run(config))
                    rec["tflops"] = flops / (rec["median_ms"] * 1e-3) / 1e12
            except Exception as err:  # a tile that does not fit (shared memory, registers) is a result too
                rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            records.append(rec)
            if opts.json:
                opts.json.parent.mkdir(parents=True, exist_ok=True)
                opts.json.write_text(json.dumps({"device": str(dev), "shape": shape, "dtype": str(dtype),
                                                 "records": records}, indent=1))
    print(f"{'case':11s} {'implementation':52s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in records:
        name = r["impl"] if "config" not in r else "triton " + label(r["config"])
        if "median_ms" in r:
            print(f"{r['case']:11s} {name:52s} {r['median_ms']:8.3f} {r['tflops']:8.1f}")
        else:
            print(f"{r['case']:11s} {name:52s} {r['error']}")
    return 0 if all("median_ms" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
