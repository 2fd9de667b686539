"""The plain-PyTorch baselines of ``tools/bench.py``: each op's math as a user writes it today
(``eager``, also what ``torch.compile`` gets) and patch embedding as ``nn.Conv3d`` runs it (``conv``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Baselines: the math as a user writes it today (facebookresearch/mae models_mae.py style)
# ---------------------------------------------------------------------------------------------

def patchify_eager(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x: (B, C, D, H, W)`` → ``(B, L, C·p³)``, patches row-major, features ``(c, i, j, l)``."""
    B, C, D, H, W = x.shape
    t = x.reshape(B, C, D // p, p, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return t.reshape(B, (D // p) * (H // p) * (W // p), C * p**3)


def embed_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """Patch embedding as reshape + F.linear: ``(B, C, D, H, W)`` → ``(B, L, E)``."""
    return F.linear(patchify_eager(x, p), weight, bias)


def embed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """Patch embedding as nn.Conv3d(C, E, p, stride=p) computes it → ``(B, L, E)``."""
    w = weight.view(weight.shape[0], x.shape[1], p, p, p)
    return F.conv3d(x, w, bias, stride=p).flatten(2).transpose(1, 2)


def keep_rows(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(B, L, E)``, ``keep: (B, K)`` → ``(B, K, E)``: MAE's gather of the visible tokens."""
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def embed_keep_eager(x, weight, bias, keep, p: int) -> torch.Tensor:
    """What users do today for ``keep``: embed every patch, then gather the kept ones."""
    return keep_rows(embed_eager(x, weight, bias, p), keep)


def embed_keep_conv(x, weight, bias, keep, p: int) -> torch.Tensor:
    return keep_rows(embed_conv(x, weight, bias, p), keep)


def masked_mse_eager(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """MAE's ``forward_loss``: mean over patch values, mean over hidden patches (mask: float, 1 = hidden)."""
    target = patchify_eager(x, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L): mean loss per patch
    return (loss * mask).sum() / mask.sum()


def masking_fill_eager(tokens, mask_token, seg_offset, keep_cols, missing_tok, missing_vis):
    """MAE-style per-modality masking (argsort of noise) and unshuffle with MASK_TOKEN fill.

    tokens: ``(B, L, E)``; mask_token: ``(E,)``; seg_offset: ``(L,)`` 2·segment id, so that each
    segment's noise lies in its own band and the sort keeps the segments in blocks; keep_cols:
    ``(K,)`` the first ``K_m`` columns of each block; missing_tok ``(B, L)`` / missing_vis
    ``(B, K)``: bool, the modality is missing → ``full: (B, L, E)``, ``mask: (B, L)`` bool.
    """
    B, L, E = tokens.shape
    noise = torch.rand(B, L, device=tokens.device) + seg_offset
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: the first K_m of each block are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, keep_cols]
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, E))
    visible = visible.masked_fill(missing_vis.unsqueeze(-1), 0.0)
    # (the encoders run on `visible` here)
    shuffled = mask_token.expand(B, L, E).clone()
    shuffled[:, keep_cols] = visible
    full = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, E))
    full = torch.where(missing_tok.unsqueeze(-1), mask_token, full)
    mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)  # 1 = hidden, as in MAE
    mask[:, keep_cols] = False
    mask = torch.gather(mask, 1, ids_restore) | missing_tok
    return full, mask

