"""Reference random per-modality masking and MASK_TOKEN fill: the spec of the masking ops.

Layout. Modalities come in a fixed order; modality ``m`` owns tokens ``[o_m, o_m + L_m)`` of the
joint sequence of length ``L = Σ L_m`` and ``K_m = floor(L_m·(1 − r_m))`` visible slots
``[q_m, q_m + K_m)`` of the visible sequence of length ``K = Σ K_m`` (the same for every row, so
shapes are static).

Selection. Every token gets a 32-bit Philox key (:func:`pyimputmae.reference.philox.token_keys`,
counter ``(token, row, offset)``, key ``seed``). In a present segment the ``K_m`` tokens with the
smallest ``(key, token index)`` pairs are kept — the index breaks ties, so the choice is a
deterministic function of ``(seed, offset)`` and is uniform over all ``K_m``-subsets up to ties
of 32-bit keys. Kept tokens stay in their original order (``ids_keep`` is sorted within each
segment). In a missing segment ``ids_keep`` holds the segment's first ``K_m`` positions, the
visible slots hold zeros and every position has ``mask = 1``.

Mask convention as in MAE: ``mask = 1`` hidden (to reconstruct), ``0`` visible; bool tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .philox import token_keys


def keep_counts(lengths: Sequence[int], ratios: Sequence[float] | float) -> list[int]:
    """``K_m = floor(L_m·(1 − r_m))`` per segment (1e-9 guards ``0.3 → 0.29999…`` round-off)."""
    if isinstance(ratios, numbers.Real):  # numpy scalars too (np.float32 is no Python float)
        ratios = [float(ratios)] * len(lengths)
    if len(ratios) != len(lengths):
        raise ValueError(f"{len(ratios)} mask ratios given for {len(lengths)} segments")
    out = []
    for m, (n, r) in enumerate(zip(lengths, ratios)):
        if n < 1:
            raise ValueError(f"segment {m} has length {n}; every segment needs at least one token")
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"mask ratio of segment {m} must lie in [0, 1], got {r}")
        out.append(math.floor(n * (1.0 - r) + 1e-9))
    return out


def select_keep_reference(
    present: torch.Tensor, lengths: Sequence[int], keeps: Sequence[int], rng: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the visible tokens.

    present: ``(B, M)`` bool; rng: ``(2,)`` int64 ``(seed, offset)`` →
    ``ids_keep: (B, K)`` int64 positions in ``[0, L)``, ``mask: (B, L)`` bool (True = hidden).
    """
    B = present.shape[0]
    L = sum(lengths)
    keys = token_keys(rng.to(present.device), B, L)
    ids, masks = [], []
    start = 0
    for m, (n, k) in enumerate(zip(lengths, keeps)):
        seg_keys = keys[:, start:start + n]
        # stable sort: equal keys keep index order, i.e. the token index breaks ties
        order = torch.sort(seg_keys, dim=1, stable=True).indices[:, :k]
        chosen = torch.sort(order, dim=1).values  # original order inside the segment
        first = torch.arange(k, device=present.device).expand(B, k)
        have = present[:, m:m + 1]
        ids.append(torch.where(have, chosen, first) + start)
        seg_mask = torch.ones(B, n, dtype=torch.bool, device=present.device)
        seg_mask.scatter_(1, chosen, False)
        masks.append(torch.where(have, seg_mask, True))
        start += n
    return torch.cat(ids, 1), torch.cat(masks, 1)


def gather_visible_reference(tokens: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tokens: (B, L, E)`` → ``(B, K, E)``: ``tokens[b, ids_keep[b, k]]``, zero where that position is hidden."""
    E = tokens.shape[-1]
    vis = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    hidden = torch.gather(mask, 1, ids_keep).unsqueeze(-1)
    return torch.where(hidden, torch.zeros((), dtype=tokens.dtype, device=tokens.device), vis)


def random_masking_reference(
    tokens: torch.Tensor,
    lengths: Sequence[int],
    ratios: Sequence[float] | float,
    present: torch.Tensor,
    rng: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens: ``(B, L, E)`` → ``visible: (B, K, E)``, ``ids_keep: (B, K)`` int64, ``mask: (B, L)`` bool."""
    keeps = keep_counts(lengths, ratios)
    ids_keep, mask = select_keep_reference(present, lengths, keeps, rng)
    return gather_visible_reference(tokens, ids_keep, mask), ids_keep, mask


def unshuffle_fill_reference(
    x: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Put visible tokens back in place and fill every hidden position with ``mask_token``.

    x: ``(B, K, E)``; ids_keep: ``(B, K)``; mask: ``(B, L)`` bool; mask_token: ``(E,)`` → ``(B, L, E)``.
    ``out[b, l] = mask_token`` where ``mask[b, l]``; ``out[b, ids_keep[b, k]] = x[b, k]`` where that
    position is visible; a visible position no ``ids_keep`` entry names is zero.
    Differentiable in x and mask_token through plain autograd.
    """
    B, _, E = x.shape
    L = mask.shape[1]
    written = ~torch.gather(mask, 1, ids_keep)  # (B, K): does slot k land on a visible position?
    src = x * written.unsqueeze(-1).to(x.dtype)
    out = torch.zeros(B, L, E, dtype=x.dtype, device=x.device)
    out = out.scatter_add(1, ids_keep.unsqueeze(-1).expand(-1, -1, E), src)
    return torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), out)
