"""Philox4x32-10 in plain PyTorch: the random-number spec every masking backend follows.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` to four 32-bit words with
ten rounds; we use word 0 only. The masking ops draw one 32-bit *key* per token with

    counter = (token, row, offset_lo, offset_hi)      key = (seed_lo, seed_hi)

where ``token`` is the token's position in the joint sequence ``[0, L)``, ``row`` the batch row,
and ``seed`` / ``offset`` the two int64 values of the ``rng`` device tensor, read as unsigned
64-bit numbers and split into 32-bit halves. The C++ (``csrc/include/philox.h``), CUDA and
Triton (``kernels/philox.py``) backends compute the same words bit for bit.

Everything here runs on int64 tensors on any device, without host synchronisation: 32-bit
products are split into 16-bit halves so that no intermediate exceeds 2**49.
"""

from __future__ import annotations

import torch

ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
_LO32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full 64-bit product of the constant ``a`` and the uint32 values in ``b`` (int64 tensor).

    Returns ``(hi, lo)``, both uint32 values held in int64.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    x = b * a_hi  # < 2**48
    y = b * a_lo  # < 2**48
    t = x + (y >> 16)  # product = t * 2**16 + (y & 0xFFFF)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (y & 0xFFFF)
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    k0: torch.Tensor, k1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 values.

    Returns the four output words as int64 tensors with values in ``[0, 2**32)``.
    """
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(ROUND_A, c0)
        hi1, lo1 = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + KEY_A) & _LO32
        k1 = (k1 + KEY_B) & _LO32
    return c0, c1, c2, c3


def split_u64(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit halves of int64 values read as unsigned 64-bit numbers."""
    lo = v & _LO32
    hi = (v >> 32) & _LO32  # arithmetic shift of a negative value: the mask keeps the bits
    return lo, hi


def token_keys(rng: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """The 32-bit random key of every token: ``(rows, tokens)`` int64 in ``[0, 2**32)``.

    ``rng``: ``(2,)`` int64 ``(seed, offset)`` on the device where the keys are wanted.
    """
    if rng.shape != (2,) or rng.dtype != torch.int64:
        raise ValueError(f"rng must be a (2,) int64 tensor (seed, offset), got {tuple(rng.shape)} {rng.dtype}")
    dev = rng.device
    k0, k1 = split_u64(rng[0])
    off_lo, off_hi = split_u64(rng[1])
    token = torch.arange(tokens, device=dev, dtype=torch.int64).view(1, tokens)
    row = torch.arange(rows, device=dev, dtype=torch.int64).view(rows, 1)
    word0, _, _, _ = philox4x32(token, row, off_lo, off_hi, k0, k1)
    return word0.expand(rows, tokens)
