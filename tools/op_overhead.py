#!/usr/bin/env python3
"""Host time of one forward + backward of each op on tiny tensors: what a call costs beyond its kernels.

    python tools/op_overhead.py                       # CPU tensors, the ext backend, against eager
    python tools/op_overhead.py --device cuda --backend triton

On a GPU the kernels of a step run asynchronously while the host prepares the next ones: an op
whose host time exceeds its kernels' time leaves the GPU waiting, and is timed as host time by any
benchmark. The inputs here are tiny, so the figures are host time (Python, dispatch, launches)
plus a few microseconds of kernel. Ours and the same math in plain PyTorch ("eager") are timed in
alternating rounds; the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyimputmae import masked_mse, patch_embed, random_masking, unshuffle_fill  # noqa: E402

B, E, P = 2, 8, 4  # rows, token width, patch size of a (1, 16, 16) image: 16 patches of 16 values


def cases(device: torch.device, backend: str) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """op name → (ours, eager): each one forward and backward on tiny inputs."""
    torch.manual_seed(0)
    lengths, L = (4, 4, 8), 16
    tokens = torch.randn(B, L, E, device=device, requires_grad=True)
    token = torch.randn(E, device=device, requires_grad=True)
    present = torch.ones(B, len(lengths), dtype=torch.bool, device=device)
    rng = torch.tensor([1, 2], device=device)
    x = torch.randn(B, 1, 16, 16, device=device)
    pred = torch.randn(B, 16, P * P, device=device, requires_grad=True)
    hidden = torch.rand(B, 16, device=device) > 0.5
    w = torch.randn(E, P * P, device=device, requires_grad=True)
    b = torch.randn(E, device=device, requires_grad=True)

    def patchify() -> torch.Tensor:
        return x.view(B, 1, 4, P, 4, P).permute(0, 2, 4, 1, 3, 5).reshape(B, 16, P * P)

    def ours_masking():
        visible, ids, mask = random_masking(tokens, lengths, 0.5, present, rng, backend=backend)
        torch.autograd.grad(unshuffle_fill(visible, ids, mask, token, backend=backend).sum(), (tokens, token))

    def eager_masking():
        ids = torch.rand(B, L, device=device).argsort(1)
        restore = ids.argsort(1)
        visible = torch.gather(tokens, 1, ids[:, :8, None].expand(-1, -1, E))
        full = torch.cat([visible, token.expand(B, L - 8, E)], 1)
        full = torch.gather(full, 1, restore[..., None].expand(-1, -1, E))
        torch.autograd.grad(full.sum(), (tokens, token))

    def ours_mse():
        torch.autograd.grad(masked_mse(pred, x, hidden, patch=P, backend=backend), pred)

    def eager_mse():
        loss = (((pred - patchify()) ** 2).mean(-1) * hidden).sum() / hidden.sum()
        torch.autograd.grad(loss, pred)

    def ours_embed():
        torch.autograd.grad(patch_embed(x, w, b, patch=P, backend=backend).sum(), (w, b))

    def eager_embed():
        torch.autograd.grad(torch.nn.functional.linear(patchify(), w, b).sum(), (w, b))

    return {"masking + fill": (ours_masking, eager_masking), "masked_mse": (ours_mse, eager_mse),
            "patch_embed": (ours_embed, eager_embed)}


def per_call_us(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="ext", help="our backend to time (default: ext)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(1)  # tiny tensors: threads would only add noise
    print(f"{'op (forward + backward)':26s} {'ours us':>9s} {'eager us':>9s}   ({opts.backend}, {device}, "
          f"median of {opts.rounds} alternating rounds of {opts.calls} calls)")
    for name, (ours, eager) in cases(device, opts.backend).items():
        for fn in (ours, eager):  # warm-up: JIT, caches
            per_call_us(fn, 20, sync)
        times: dict[str, list[float]] = {"ours": [], "eager": []}
        for _ in range(opts.rounds):
            times["ours"].append(per_call_us(ours, opts.calls, sync))
            times["eager"].append(per_call_us(eager, opts.calls, sync))
        print(f"{name:26s} {statistics.median(times['ours']):9.1f} {statistics.median(times['eager']):9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
