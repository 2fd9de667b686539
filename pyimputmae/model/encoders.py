"""Per-modality encoders: a patch encoder for omics and imaging, a tabular encoder for clinical data.

:class:`PatchEncoder` embeds patches with the fused ``ops.patch_embed`` — reading only the kept
patches when given ``keep``, the MAE saving — prepends a CLS token and runs pre-norm transformer
blocks. :class:`ClinicalEncoder` carries the statistics fitted on the training split as buffers,
so a saved model applies exactly the training-time imputation and scaling to new patients.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .config import ModalityConfig
from .layers import Transformer, init_weights, sincos_pos_embed

#: a standard deviation below this is treated as a constant column (scaled by 1)
MIN_STD = 1e-6


class PatchEncoder(nn.Module):
    """One modality's encoder: patch embedding + positions, a CLS token, transformer blocks, LayerNorm.

    Positions: ``pos_embed="sincos"`` is MAE's choice — fixed sin-cos positions over the patch grid
    (a non-persistent buffer: they are a function of the config); ``"learned"`` is a zero-initialised
    parameter, as in the authors' code. The CLS token carries no position. The patch weight is an
    ``(E, C·p^k)`` matrix laid out like a flattened ``nn.Conv{k}d`` weight, xavier-uniform as MAE.
    """

    def __init__(self, cfg: ModalityConfig, dim: int, heads: int, mlp: int, dropout: float = 0.0,
                 pos_embed: str = "sincos") -> None:
        super().__init__()
        self.patch = cfg.patch
        self.weight = nn.Parameter(torch.empty(dim, cfg.patch_dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        if pos_embed == "sincos":
            self.register_buffer("pos", sincos_pos_embed(cfg.grid, dim), persistent=False)
        else:
            self.pos = nn.Parameter(torch.zeros(cfg.n_tokens, dim))
        self.cls = nn.Parameter(torch.zeros(dim))
        self.transformer = Transformer(cfg.depth, dim, heads, mlp, dropout)
        self.transformer.apply(init_weights)
        nn.init.xavier_uniform_(self.weight)
        nn.init.normal_(self.cls, std=0.02)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``(B, C, *S)``; keep: ``(B, K)`` int64 patch indices in ``[0, L_m)`` or None (all) →
        ``(B, 1 + N, D)``, ``N = K`` or ``L_m``: the CLS token first, then the (kept) patches in
        ``keep`` order, after the final LayerNorm."""
        tokens = ops.patch_embed(x, self.weight, self.bias, self.pos, keep, patch=self.patch)
        B, _, D = tokens.shape
        cls = self.cls.to(tokens.dtype).expand(B, 1, D)
        return self.transformer(torch.cat([cls, tokens], 1))


class ClinicalEncoder(nn.Module):
    """Clinical covariates → features → ``n_tokens`` tokens.

    Preprocessing (fitted on the training split by :meth:`fit`, held as buffers): a NaN becomes the
    training median and raises a missing-indicator feature; values are then standardised with the
    training mean and standard deviation (of the median-imputed column), so ``F`` covariates give
    ``2F`` features. With ``n_tokens > 0`` a small MLP (``2F → hidden → n_tokens·D``, GELU) and a
    LayerNorm turn the features into tokens; with ``n_tokens = 0`` only :meth:`features` is used
    (the "concatenate before the head" mode).
    """

    def __init__(self, names: tuple[str, ...], n_tokens: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.names = tuple(names)
        self.n_tokens, self.dim = n_tokens, dim
        F = len(self.names)
        self.register_buffer("median", torch.zeros(F))
        self.register_buffer("mean", torch.zeros(F))
        self.register_buffer("std", torch.ones(F))
        self.fitted = False
        if n_tokens:
            self.mlp = nn.Sequential(nn.Linear(2 * F, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * dim))
            self.norm = nn.LayerNorm(dim)
            self.apply(init_weights)

    @property
    def n_features(self) -> int:
        """``2F``: standardised values and missing indicators."""
        return 2 * len(self.names)

    @torch.no_grad()
    def fit(self, clinical_train: torch.Tensor) -> ClinicalEncoder:
        """Fit medians, means and standard deviations on ``clinical_train: (N, F)`` (NaN = unknown).

        A column unknown for every training patient gets median 0, mean 0, std 1; a constant
        column gets std 1.
        """
        x = self._check(clinical_train, "clinical_train").to(torch.float64)
        if x.shape[0] == 0:
            raise ValueError("clinical_train has no rows: fit on the training split")
        median = torch.nanquantile(x, 0.5, dim=0)
        median = torch.nan_to_num(median, nan=0.0)
        filled = torch.where(torch.isnan(x), median, x)
        mean = filled.mean(0)
        std = filled.std(0, unbiased=False)
        std = torch.where(std > MIN_STD, std, torch.ones_like(std))
        for buf, value in ((self.median, median), (self.mean, mean), (self.std, std)):
            buf.copy_(value.to(buf.dtype))
        self.fitted = True
        return self

    def features(self, clinical: torch.Tensor) -> torch.Tensor:
        """clinical: ``(B, F)`` with NaN for unknown → ``(B, 2F)`` float32: standardised values
        (median-imputed), then missing indicators (1 = was unknown)."""
        if not self.fitted:
            raise RuntimeError("the clinical encoder is not fitted: call SurvivalModel.fit_preprocessing(cohort) "
                               "(or ClinicalEncoder.fit) on the training split first")
        x = self._check(clinical, "batch.clinical").to(torch.float32)
        missing = torch.isnan(x)
        x = torch.where(missing, self.median, x)
        return torch.cat([(x - self.mean) / self.std, missing.to(torch.float32)], 1)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        """clinical: ``(B, F)`` with NaN for unknown → tokens ``(B, n_tokens, D)``."""
        if not self.n_tokens:
            raise RuntimeError("this clinical encoder makes no tokens (n_tokens = 0); use features()")
        h = self.mlp(self.features(clinical))
        return self.norm(h.view(h.shape[0], self.n_tokens, self.dim))

    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != len(self.names):
            raise ValueError(f"{what} must be (N, {len(self.names)}) with columns {list(self.names)}, "
                             f"got shape {tuple(x.shape)}")
        return x

    def get_extra_state(self) -> dict:
        return {"fitted": self.fitted, "names": list(self.names)}

    def set_extra_state(self, state: dict) -> None:
        if list(state.get("names", self.names)) != list(self.names):
            raise ValueError(f"saved clinical encoder has columns {state['names']}, this one {list(self.names)}")
        self.fitted = bool(state["fitted"])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ClinicalEncoder", "PatchEncoder", "count_parameters"]
