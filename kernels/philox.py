"""Per-token Philox4x32-10 keys in Triton, bit-identical to ``pyimputmae.reference.philox.token_keys``.

Counter ``(token, row, offset_lo, offset_hi)``, key ``(seed_lo, seed_hi)``, word 0 of the output.
``tl.philox(seed, c0, c1, c2, c3)`` is Random123's Philox4x32-10 with key
``(seed & 0xffffffff, seed >> 32)`` for 32-bit counters, which is exactly that layout.
``seed`` and ``offset`` are read from the ``rng`` device tensor inside the kernel, never passed as
Python ints, so a captured CUDA graph replays with whatever the tensor holds at replay time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rng(rng_ptr):
    """``rng = (seed, offset)`` int64 on the device → ``(seed, offset_lo, offset_hi)``.

    seed stays an int64 scalar (``tl.philox`` splits it itself); the offset is read as an unsigned
    64-bit number and split into its uint32 halves.
    """
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1).to(tl.uint64, bitcast=True)
    return seed, offset.to(tl.uint32), (offset >> 32).to(tl.uint32)


@triton.jit
def token_keys(tokens, row, seed, offset_lo, offset_hi):
    """The uint32 key of every token in ``tokens`` (a block of positions in ``[0, L)``) of batch row ``row``."""
    c0 = tokens.to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + row.to(tl.uint32)
    c2 = zero + offset_lo
    c3 = zero + offset_hi
    word0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return word0
