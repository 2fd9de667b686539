"""Shared helpers of the user-facing ops: backend dispatch, the eager fast path, autocast.

Every op exists twice over the same kernel-level functions (``pyimputmae._backends``):

- a ``torch.library.custom_op`` (``torch.ops.pyimputmae.*``), which ``torch.compile`` and
  ``torch.export`` trace as one opaque node with a fake (meta) implementation;
- an eager path: an ``autograd.Function`` built from the *same* ``setup_context`` and ``backward``
  functions, calling the backend module directly. ``custom_op``'s Python layers (schema checks,
  pytree, the autograd wrapper, two trips through the dispatcher) cost tens of microseconds a call;
  on a GPU the ops' kernels take about as long, so a user's eager step (and ``tools/bench.py``)
  would time Python rather than kernels.

The public functions take the custom op while ``torch.compiler.is_compiling()``, else the eager
path. Their backwards reach the kernels through ``ctx.kernels``: the backend module itself on the
eager path, :class:`CustomOpKernels` (the same functions, as the custom ops) on the traced one.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .. import _backends


def backend_for(family: str, device: torch.device, requested: str, *tensors: torch.Tensor) -> ModuleType:
    """The kernel module that runs ``family`` on ``device`` for ``tensors`` (their floating dtypes
    matter to the automatic choice; see ``pyimputmae._backends``)."""
    dtypes = tuple({t.dtype for t in tensors if t.is_floating_point()})
    return _backends.module(_backends.resolve(family, device, requested, dtypes))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None. Custom ops are opaque to
    autocast, so the wrappers cast their floating inputs themselves, as F.linear would."""
    dev = device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def check_backend_arg(backend: str) -> str:
    return _backends.canonical(backend)


def traced() -> bool:
    """Is ``torch.compile`` / ``torch.export`` tracing this call (take the custom op)?"""
    return torch.compiler.is_compiling()


def check_indices(name: str, ids: torch.Tensor, bound: int, what: str) -> None:
    """``ids: (B, K)`` int64 must lie in ``[0, bound)``: a ValueError naming the first entry outside.

    Checked for CPU tensors only, outside tracing (reading them costs nothing there): on a GPU it
    would synchronise the host, and the Triton kernels would otherwise read or write out of bounds
    (a segmentation fault under the interpreter). The CUDA kernels assert on the device."""
    if ids.device.type != "cpu" or ids.numel() == 0 or traced():
        return
    bad = (ids < 0) | (ids >= bound)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}[{b}, {k}] = {int(ids[b, k])} is outside [0, {bound}) ({what})")


def check_same_device(anchor: str, device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Every tensor given (None skipped) must live on ``device``, the one of argument ``anchor``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {anchor} is on {device}: move it there "
                             f"({name}.to({str(device)!r}))")


class CustomOpKernels:
    """Kernel-level functions with a backend module's signatures that call the custom ops instead:
    what a backward reaches the kernels through when it is traced. ``ops``: name → custom op
    taking the module function's arguments followed by the backend name."""

    def __init__(self, ops: dict[str, Callable[..., Any]], backend: str) -> None:
        self._ops, self._backend = ops, backend

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = self._ops[name]
        return lambda *args: op(*args, self._backend)


def kernels(spec: ModuleType | str, ops: dict[str, Callable[..., Any]]) -> ModuleType | CustomOpKernels:
    """The last argument of an op's forward → what its backward calls kernels through: a backend
    module (the eager path) as it is, a backend name (the custom op) as :class:`CustomOpKernels`."""
    return CustomOpKernels(ops, spec) if isinstance(spec, str) else spec


#: custom op name → the public function that calls it, for messages
_PUBLIC = {"gather_kept": "random_masking", "fill_masked": "unshuffle_fill"}


def eager_function(name: str, kernel: str, setup_context: Callable[..., None],
                   backward: Callable[..., Any]) -> type[torch.autograd.Function]:
    """The eager path of custom op ``name``: an ``autograd.Function`` whose forward calls the backend
    module's function ``kernel`` (passed as the last argument, where the custom op takes the backend's
    name, so ``ctx.needs_input_grad`` means the same on both paths) and then the custom op's own
    ``setup_context(ctx, inputs, output)``; its backward is the custom op's ``backward``, first-order
    only (``once_differentiable``: the kernels it calls record no graph). The classic
    ``forward(ctx, ...)`` form: with a ``setup_context`` method, ``Function.apply`` binds the arguments
    through ``inspect`` on every call, ~50 µs."""

    def run(ctx, *args):
        output = getattr(args[-1], kernel)(*args[:-1])
        setup_context(ctx, args, output)
        return output

    first_order = once_differentiable(backward)

    def backward_once(ctx, *grads):
        # grad mode is on in a backward only under create_graph=True: the gradients returned here
        # carry no graph, so a second derivative through them would silently miss every term of this op
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"pyimputmae.{_PUBLIC.get(name, name)} (op pyimputmae::{name}) has no second derivative: its "
                "backward was asked for a graph "
                "(create_graph=True: double backward, a gradient penalty, higher-order gradients). For "
                "those, use the plain-PyTorch twins in pyimputmae.reference (e.g. masked_mse_reference, "
                "patch_embed_reference, random_masking_reference, unshuffle_fill_reference)")
        return first_order(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run),
        "backward": staticmethod(backward_once),
        "__doc__": f"The eager path of ``pyimputmae::{name}`` (see ``pyimputmae.ops._common``).",
    })


def call(custom_op: Callable[..., Any], eager: type[torch.autograd.Function], family: str, backend: str,
         *args: Any, module: ModuleType | None = None) -> Any:
    """One op call: ``custom_op(*args, backend)`` while traced, else ``eager.apply(*args, module)``
    with ``module``, or the backend module chosen for the device and floating dtypes of the tensor
    arguments when None."""
    if traced():
        return custom_op(*args, backend)
    if module is None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        module = backend_for(family, tensors[0].device, backend, *tensors)
    return eager.apply(*args, module)
