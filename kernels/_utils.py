"""Small helpers shared by the Triton kernels and launchers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on CPU tensors with one small configuration."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU even when another one is current (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def sm_count(index: int) -> int:
    """Number of SMs of CUDA device ``index`` (sizes split-K and grid-stride grids)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    """SMs of ``t``'s device; a nominal 132 (H100) off the GPU."""
    if t.device.type != "cuda":
        return 132
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


INTERPRET = tl.constexpr(interpreting())

#: Lengths, counts and loop bounds reach the kernels as 32-bit scalars (tensor offsets are 64-bit);
#: each stays below this, so that a loop counter stepping a block past its bound never wraps.
INDEX_LIMIT = 2**31 - 2**16
#: programs a launch grid may have along its second axis (CUDA's gridDim.y)
GRID_Y_LIMIT = 65535


def check_sizes(op: str, **sizes: int) -> None:
    """Raise ``ValueError`` naming ``op`` and the size when a size is :data:`INDEX_LIMIT` or more."""
    for name, n in sizes.items():
        if n >= INDEX_LIMIT:
            raise ValueError(f"{op}: {name} = {n:,} is too large for the Triton kernels (they take sizes "
                             f"below 2^31 - 2^16 = {INDEX_LIMIT:,}); split the input or use backend='reference'")


def check_grid_y(op: str, what: str, n: int, block: int) -> None:
    """Raise ``ValueError`` when ``cdiv(n, block)`` tiles of ``what`` exceed :data:`GRID_Y_LIMIT`."""
    if triton.cdiv(n, block) > GRID_Y_LIMIT:
        raise ValueError(f"{op}: {what} = {n:,} is too large for one Triton launch (at most "
                         f"{GRID_Y_LIMIT * block:,}); use backend='reference'")


@triton.jit
def loop_bound(x):
    """A runtime scalar ``x`` as a ``range`` bound: ``x`` itself when compiled.

    Under ``TRITON_INTERPRET=1`` every scalar is a 1-element NumPy array and ``range`` asks for
    ``__index__``: Triton 3.6's interpreter answers with ``int(data)``, which NumPy ≥ 2.4 refuses for
    an array of shape ``(1,)``. There the bound is handed over as a plain Python int instead.
    """
    if INTERPRET:
        return x.handle.data.item()
    return x


@triton.jit
def cast_rn(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even, as the GPU does.

    The interpreter truncates fp32 → bf16; there the rounding is done on the bits instead (NaN kept).
    """
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            y = tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(dtype))
        else:
            y = x.to(dtype)
    else:
        y = x.to(dtype)
    return y
