#!/usr/bin/env python3
"""Activation memory of one pre-training forward: ours against the anchor script's model.

    python tools/saved_activations.py --device cpu --batch 96            # a CPU proxy, minutes on 2 cores
    python tools/saved_activations.py --device cuda --batch 96 --top 10  # the same on a GPU

The figure is the bytes of the distinct storages autograd keeps for backward after one forward
(``torch.autograd.graph.saved_tensors_hooks``) under bf16 autocast, batch ``--batch``, every
modality present, at the authors' configuration, leaving out the storages of the parameters and of
the inputs (they are held anyway): the memory the forward adds and keeps until backward, the part of
a step's peak memory the model decides (the rest is parameters, optimizer state, inputs and
transient buffers). The anchor's model
(``Ref`` of ``../shared/anchors/ref_step_bench.py``) is taken from the script's source without running
its benchmark. ``--top N`` lists the largest saved tensors by shape and dtype.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_REF = ROOT.parent / "shared" / "anchors" / "ref_step_bench.py"


def saved_storages(forward, held: list[torch.Tensor]) -> dict[int, tuple[int, tuple[int, ...], torch.dtype]]:
    """Run ``forward()``; → storage address → (bytes, shape, dtype) of every tensor saved for backward,
    except those sharing storage with a tensor of ``held`` (parameters, inputs)."""
    held_ptrs = {t.untyped_storage().data_ptr() for t in held}
    seen: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held_ptrs:
            seen[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return seen


def report(name: str, seen: dict, seconds: float, top: int) -> None:
    total = sum(nbytes for nbytes, _, _ in seen.values())
    print(f"{name:32s} saved {total / 2**20:9.1f} MiB in {len(seen):4d} storages ({seconds:.1f} s)")
    by_kind: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for nbytes, shape, dtype in seen.values():
        by_kind[(shape, dtype)] += nbytes
        count[(shape, dtype)] += 1
    for (shape, dtype), nbytes in by_kind.most_common(top):
        print(f"    {nbytes / 2**20:8.1f} MiB  x{count[(shape, dtype)]:<3d} {shape} {dtype}")


def anchor_model(path: Path, device: str) -> tuple[torch.nn.Module, dict]:
    """The anchor's ``Ref`` model and its inputs, from the script's source up to its timing code."""
    source = path.read_text(encoding="utf-8").split("\ndef run(")[0].replace('dev = "cuda"', f'dev = "{device}"')
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), namespace)  # the project's own anchor script
    return namespace["Ref"]().to(device), namespace["MODS"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--ref", type=Path, default=DEFAULT_REF, help="the anchor script")
    parser.add_argument("--top", type=int, default=0, help="list the N largest saved tensors of each model")
    opts = parser.parse_args(argv)

    from pyimputmae.data import Batch
    from pyimputmae.model import ImputeMAE, ModelConfig, new_rng

    dev, B = torch.device(opts.device), opts.batch
    torch.manual_seed(0)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16)
    cfg = ModelConfig.named("paper")
    model = ImputeMAE(cfg).to(dev)
    inputs = {m.name: torch.randn(B, *m.shape, device=dev) for m in cfg.modalities}
    zeros = torch.zeros(B, device=dev)
    batch = Batch(inputs, torch.ones(B, len(cfg.modalities), dtype=torch.bool, device=dev),
                  torch.zeros(B, 0, device=dev), zeros, zeros, cfg.names)
    start = time.perf_counter()
    with torch.autocast(**amp):
        seen = saved_storages(lambda: model.forward_pretrain(batch, new_rng(0, dev), check=False),
                              [*model.parameters(), *inputs.values()])
    report("ours (ImputeMAE, paper config)", seen, time.perf_counter() - start, opts.top)
    if opts.ref.exists():
        ref, mods = anchor_model(opts.ref, opts.device)
        ref_batch = {m: torch.randn(B, *shape, device=dev) for m, (_, _, _, shape) in mods.items()}
        start = time.perf_counter()
        with torch.autocast(**amp):
            seen = saved_storages(lambda: ref(ref_batch), [*ref.parameters(), *ref_batch.values()])
        report("anchor (ref_step_bench.py Ref)", seen, time.perf_counter() - start, opts.top)
    else:
        print(f"anchor script not found at {opts.ref}: pass --ref")
    return 0


if __name__ == "__main__":
    sys.exit(main())
