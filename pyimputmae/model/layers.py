"""Transformer pieces shared by the encoders, the decoder and the fusion block.

Pre-norm blocks (LayerNorm → attention → residual, LayerNorm → GELU MLP → residual) with
``F.scaled_dot_product_attention``, initialised as MAE does (xavier-uniform linear weights, zero
biases, unit LayerNorms), and the fixed sin-cos positions of an N-d patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prenorm import norm_linear, norm_mlp


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sin-cos positions of a row-major patch grid: ``(Π grid, dim)`` float32.

    Each of the ``k`` axes gets ``2·⌊dim / 2k⌋`` channels (half sines, half cosines of the patch
    coordinate at geometrically spaced frequencies, as in MAE's 2-D version); the remaining
    ``dim mod 2k`` channels are zero. Patch order matches ``ops.patch_embed`` (first axis slowest).
    """
    k = len(grid)
    half = dim // (2 * k)
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angle), torch.cos(angle)]
    out = torch.cat(parts, 1) if half else torch.zeros(math.prod(grid), 0, dtype=torch.float64)
    return F.pad(out, (0, dim - out.shape[1])).to(torch.float32)


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation, for ``module.apply``: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def key_mask(allowed: torch.Tensor) -> torch.Tensor:
    """``allowed: (B, N)`` bool (True = may be attended to) → SDPA's boolean mask ``(B, 1, 1, N)``.

    Callers guarantee that every row allows at least one key: a row with none would give NaN.
    """
    return allowed[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention: ``x: (B, N, D)``, optional ``attn_mask: (B, 1, 1, N)`` bool → ``(B, N, D)``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by the head count {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``norm``: a LayerNorm applied to ``x`` first, fused with the qkv projection
        (:func:`~.prenorm.norm_linear`: only ``x`` is kept for backward)."""
        B, N, D = x.shape
        qkv = norm_linear(x, norm, self.qkv) if norm is not None else self.qkv(x)
        # (B, N, 3·D) → 3 × (B, H, N, D/H)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return F.dropout(self.proj(out.transpose(1, 2).reshape(B, N, D)), p, self.training)


class Block(nn.Module):
    """Pre-norm transformer block: ``x: (B, N, D)`` → ``(B, N, D)``.

    Without dropout (pre-training, evaluation) each LayerNorm runs fused with the matmul after it
    and the MLP recomputes its GELU in backward (:mod:`.prenorm`): the same function and gradients,
    less activation memory. With dropout in training it runs the plain autograd path.
    """

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            x = x + self.attn(x, attn_mask, norm=self.norm1)
            return x + norm_mlp(x, self.norm2, self.fc1, self.fc2)
        x = x + self.attn(self.norm1(x), attn_mask)
        h = F.dropout(F.gelu(self.fc1(self.norm2(x))), self.dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


class Transformer(nn.Module):
    """``depth`` pre-norm blocks and a final LayerNorm: ``x: (B, N, D)`` → ``(B, N, D)``."""

    def __init__(self, depth: int, dim: int, heads: int, mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)
