#!/usr/bin/env python3
"""The operations one pre-training step dispatches, per phase: a CPU proxy for its GPU kernel count.

    python tools/step_ops.py                         # paper configuration, batch 2, CPU, bf16 autocast
    python tools/step_ops.py --device cuda --top 15  # the same on a GPU

A step of the authors' configuration is far from the GPU's arithmetic limits: its time goes to the
number of kernels and their launch gaps more than to their work, and each ATen operation that
computes something is at least one kernel. This counts them, without a GPU, in one step of our
``ImputeMAE`` (bf16 autocast, every modality present, ``train()``'s AdamW, fused as on a GPU) and of
the anchor script's ``Ref`` model (``../shared/anchors/ref_step_bench.py``, when it is there; AdamW
with multi-tensor kernels, its default modes' optimizer on a GPU): every operation
a ``TorchDispatchMode`` sees in the forward, the backward and the optimizer step, leaving out those
that launch nothing (views and aliases, ``detach``, allocations of empty tensors). The counts do not
depend on the batch size; CPU autocast casts like CUDA autocast except that it runs LayerNorm in bf16.
``_to_copy`` (dtype casts: autocast's per-weight casts to bf16 and the gradients' casts back) is
reported on its own line. On CPU tensors our ops also check ``ids_keep``'s bounds (four small
operations per call, about 20 per step), which they skip on a GPU. A Triton kernel launch counts as one
operation (``triton.<kernel>``), what runs inside it as none: with ``TRITON_INTERPRET=1`` and
``PYIMPUTMAE_BACKEND`` naming ``triton`` for a family (e.g. ``layer_norm=triton``), the count is that
of the step with those kernels.

Each operation is also charged the bytes of the tensors it takes and returns (a launch: of the tensors
among its arguments), a proxy for the memory traffic it causes on a GPU (an elementwise kernel moves
exactly that; a matmul reads its operands once in the ideal; an in-place one counts its tensor twice,
read and written). Unlike the counts, the bytes grow with ``--batch`` (the activations; the weights
and their casts do not): give the batch of the GPU step, 96, for its traffic.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tools"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from saved_activations import DEFAULT_REF, anchor_model  # noqa: E402  (tools/, on the path above)

#: operations that compute nothing on the device (besides the views and aliases their schemas name)
NO_KERNEL = {"aten.detach.default", "aten._unsafe_view.default", "aten.empty.memory_format", "aten.empty_like.default",
             "aten.empty_strided.default", "aten.new_empty.default", "aten.new_empty_strided.default",
             "aten.lift_fresh.default", "aten.promote_types.default", "aten.is_same_size.default",
             # reads a value to the host: here the optimizer's step counts, which on a GPU stay on the
             # host too (or on the device, for fused AdamW); not a kernel
             "aten._local_scalar_dense.default"}
PHASES = ("forward", "backward", "optimizer")


class OpCensus(TorchDispatchMode):
    """Counts the dispatched operations that compute something, per phase (``self.phase``)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = PHASES[0]
        self.counts: dict[str, collections.Counter] = {phase: collections.Counter() for phase in PHASES}
        self.bytes: dict[str, collections.Counter] = {phase: collections.Counter() for phase in PHASES}
        self.in_triton = 0  # > 0 inside a Triton launch (the interpreter's own tensor operations)

    def charge(self, name: str, *trees) -> None:
        """One operation ``name`` of the current phase, moving the tensors found in ``trees``."""
        self.counts[self.phase][name] += 1
        self.bytes[self.phase][name] += tensor_bytes(*trees)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        out = func(*args, **(kwargs or {}))
        if not (self.in_triton or func.is_view or name in NO_KERNEL or name.startswith("profiler.")):
            self.charge(name, args, kwargs, out)
        return out


def tensor_bytes(*trees) -> int:
    """The bytes of the tensors among the leaves of ``trees`` (elements × size, views as they are)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(trees) if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def triton_launches(record: OpCensus) -> Iterator[None]:
    """Count each Triton kernel launch (compiled or interpreted) as one operation ``triton.<kernel>``."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def counting(original):
        def run(self, *args, **kwargs):
            record.charge(f"triton.{self.fn.__name__}", args)
            record.in_triton += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                record.in_triton -= 1
        return run

    for cls, original in saved.items():
        cls.run = counting(original)
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.run = original


def census(forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device,
           amp: bool) -> OpCensus:
    """One step (forward under bf16 autocast when ``amp``, backward, optimizer step) after one unrecorded
    step (lazy state: the optimizer's moments) → its record: ``counts`` and ``bytes``, phase →
    operation name → calls / bytes."""

    def step(record: OpCensus | None) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = forward()
        if record:
            record.phase = "backward"
        loss.backward()
        if record:
            record.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(None)
    record = OpCensus()
    with triton_launches(record), record:
        step(record)
    return record


def ours(device: torch.device, batch: int, config: str) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    from pyimputmae.data import Batch
    from pyimputmae.model import ImputeMAE, ModelConfig, advance_rng_, new_rng
    from pyimputmae.training import make_optimizer, set_optimizer_mode

    cfg = ModelConfig.named(config)
    inputs = {m.name: torch.randn(batch, *m.shape, device=device) for m in cfg.modalities}
    present = torch.ones(batch, len(cfg.modalities), dtype=torch.bool, device=device)
    zeros = torch.zeros(batch, device=device)
    data = Batch(inputs, present, torch.zeros(batch, len(cfg.clinical_features), device=device), zeros, zeros,
                 cfg.names)
    model = ImputeMAE(cfg).to(device)
    rng = new_rng(0, device)

    def forward() -> torch.Tensor:
        loss, _ = model.forward_pretrain(data, rng, check=False)
        advance_rng_(rng)
        return loss

    optimizer = make_optimizer(list(model.parameters()), 1e-3, 1e-2, device)
    set_optimizer_mode(optimizer, fused=True, capturable=False)  # what train() steps with on a GPU
    return forward, optimizer


def anchor(device: torch.device, batch: int, ref: Path) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    model, mods = anchor_model(ref, device.type)
    data = {m: torch.randn(batch, *shape, device=device) for m, (_, _, _, shape) in mods.items()}
    # the script's default modes step with AdamW's default on a GPU: foreach (multi-tensor) kernels
    return (lambda: model(data)), torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def _print_tally(per_phase: dict[str, collections.Counter], head: str, unit: str, casts: str,
                 fmt: Callable[[int], str], top: int) -> None:
    """One line: ``head``, the total over the phases with ``unit``, each phase's, the casts' share; then
    per phase its ``top`` operations. ``fmt`` writes a quantity (a count, bytes)."""
    total = sum(sum(c.values()) for c in per_phase.values())
    cast = sum(c["aten._to_copy.default"] for c in per_phase.values())
    phases = ", ".join(f"{phase} {fmt(sum(per_phase[phase].values()))}" for phase in PHASES)
    print(f"{head}{fmt(total)}{unit} ({phases}); {casts} {fmt(cast)} = {cast / max(total, 1):.0%}")
    for phase in PHASES:
        listed = ", ".join(f"{op.removeprefix('aten.')} {fmt(n)}" for op, n in per_phase[phase].most_common(top))
        print(f"    {phase:9s} {listed}")


def report(name: str, record: OpCensus, top: int) -> None:
    """What :func:`census` recorded: the operations and their calls, then the bytes they move."""
    _print_tally(record.counts, f"{name}: ", " operations that compute", "dtype casts (_to_copy)",
                 lambda n: f"{n:,}", top)
    _print_tally(record.bytes, "  bytes of the tensors they take and return: ", "", "dtype casts",
                 lambda n: f"{n / 2**30:.2f} GiB", top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2,
                        help="rows per batch (the counts do not depend on it; the bytes do: 96 for the GPU step's)")
    parser.add_argument("--config", default="paper", help="our model's configuration: paper or small")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16: under bf16 autocast")
    parser.add_argument("--top", type=int, default=10, help="operations listed per phase")
    parser.add_argument("--ref", type=Path, default=DEFAULT_REF, help="the anchor script")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    amp = opts.dtype == "bf16"
    torch.manual_seed(0)
    report(f"ours ({opts.config} configuration)", census(*ours(device, opts.batch, opts.config), device, amp),
           opts.top)
    if opts.ref.exists():
        report("anchor (ref_step_bench.py Ref)", census(*anchor(device, opts.batch, opts.ref), device, amp), opts.top)
    else:
        print(f"anchor: {opts.ref} not found, not counted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
