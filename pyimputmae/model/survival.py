"""SurvivalModel: pre-trained encoders + fusion self-attention + a discrete-time hazard head.

Fusion tokens, per patient: a learnable CLS token, one summary token per modality (that
encoder's CLS output — pooled, so fusion costs ``1 + M + T`` tokens, not every patch) and, with
``clinical_mode="tokens"``, ``T`` clinical tokens; a learnable type embedding says which is
which. With ``missing="mask"`` a missing modality's summary slot holds zeros and is excluded from
attention by the key mask; CLS and the clinical tokens are never excluded, so no attention row
is fully masked and a patient with no omics or imaging gets finite logits from CLS and clinical
data alone. One pre-norm multi-head self-attention layer (``fusion_heads``, dropout
``fusion_dropout``), LayerNorm on CLS, optionally the processed clinical features concatenated
(``clinical_mode="concat"``, the authors' way), then ``Linear(→ n_bins)``: the logits of the
discrete-time hazards, trained with the logistic-hazard NLL (``pyimputmae.survival``).

Fitted on the training split and saved in the state dict: clinical medians/means/stds
(``ClinicalEncoder``), the interval cuts, and the data preprocessing (``mae.preprocessing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ModelConfig, resolve_config
from .encoders import ClinicalEncoder
from .layers import Attention, init_weights, key_mask
from .mae import ImputeMAE, eval_mode, jsonable, model_preprocessing


def apply_freeze(mae: ImputeMAE, trainable: Mapping[str, int]) -> None:
    """Set ``requires_grad`` for fine-tuning.

    trainable: modality → last encoder blocks left trainable (their final LayerNorm too when ≥ 1);
    -1 = the whole encoder (patch embedding, positions and CLS included). The decoder, its heads
    and ``mask_token`` are frozen: fine-tuning uses them only to impute, without gradient.
    """
    mae.requires_grad_(False)
    for name, encoder in mae.encoders.items():
        n = trainable.get(name, 0)
        if n == -1:
            encoder.requires_grad_(True)
        elif n > 0:
            for block in encoder.blocks[-n:]:
                block.requires_grad_(True)
            encoder.transformer.norm.requires_grad_(True)


class SurvivalModel(nn.Module):
    """``SurvivalModel(mae, config=None)``: fine-tunes a pre-trained :class:`ImputeMAE`.

    config: the fine-tuning settings (``missing``, ``clinical_*``, ``n_bins``, ``fusion_*``,
    ``freeze``); defaults to ``mae.config`` and must describe the same modalities and width. The
    freezing policy is applied on construction. Before training call :meth:`fit_preprocessing` on
    the training split. ``forward(batch) → (B, n_bins)`` hazard logits;
    :meth:`predict_survival` → ``(B, n_bins + 1)`` survival at the interval cuts.
    """

    def __init__(self, mae: ImputeMAE, config: ModelConfig | str | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = mae.config if config is None else resolve_config(config)
        if cfg.modalities != mae.config.modalities or cfg.dim != mae.config.dim:
            raise ValueError(f"config describes modalities {cfg.names} at width {cfg.dim}, but the pre-trained "
                             f"model has {mae.config.names} at width {mae.config.dim}: fine-tuning settings may "
                             "change, the encoders may not")
        self.config = cfg
        self.mae = mae
        D, M = cfg.dim, len(cfg.names)
        use_tokens = bool(cfg.clinical_features) and cfg.clinical_mode == "tokens"
        use_concat = bool(cfg.clinical_features) and cfg.clinical_mode == "concat"
        self.clinical = (ClinicalEncoder(cfg.clinical_features, cfg.clinical_tokens if use_tokens else 0, D,
                                         cfg.clinical_hidden) if cfg.clinical_features else None)
        self.n_clinical_tokens = cfg.clinical_tokens if use_tokens else 0
        self.concat_clinical = use_concat
        self.cls = nn.Parameter(torch.zeros(D))
        self.token_type = nn.Parameter(torch.zeros(1 + M + self.n_clinical_tokens, D))
        self.fusion_norm = nn.LayerNorm(D)
        self.fusion = Attention(D, cfg.fusion_heads, cfg.fusion_dropout)
        self.out_norm = nn.LayerNorm(D)
        head_in = D + (self.clinical.n_features if use_concat else 0)
        self.head = nn.Linear(head_in, cfg.n_bins)
        for module in (self.fusion_norm, self.fusion, self.out_norm, self.head):
            module.apply(init_weights)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.token_type, std=0.02)
        self.interval_cuts: Any = None  # pyimputmae.survival.IntervalCuts once fitted
        apply_freeze(mae, cfg.trainable_blocks())

    # ------------------------------------------------------------- preprocess
    def fit_preprocessing(self, cohort: Any, idx: np.ndarray | None = None) -> SurvivalModel:
        """Fit everything the model learns from the training split, on rows ``idx`` of ``cohort``
        (default: ``cohort.indices("train")``; row numbers or a boolean mask, as :meth:`Cohort.rows`
        reads them): clinical imputation and scaling, the ``n_bins`` equidistant interval cuts
        (``IntervalCuts.fit``), and keep ``cohort.attrs`` (the data preprocessing fitted when the
        cohort was built) in ``mae.preprocessing``."""
        from ..survival import IntervalCuts

        idx = cohort.indices("train") if idx is None else cohort.rows(idx)
        if len(idx) == 0:
            raise ValueError("fit_preprocessing got no training rows")
        index = torch.as_tensor(idx, dtype=torch.int64, device=cohort.time.device)
        if self.clinical is not None:
            names = tuple(cohort.clinical_names)
            if names != self.clinical.names:
                raise ValueError(f"cohort clinical columns {list(names)} differ from the configured "
                                 f"clinical_features {list(self.clinical.names)} (same names, same order)")
            self.clinical.fit(cohort.clinical.index_select(0, index).to(self.clinical.median.device))
        self.interval_cuts = IntervalCuts.fit(cohort.time.index_select(0, index).cpu(), n_bins=self.config.n_bins)
        self.mae.preprocessing = model_preprocessing(cohort.attrs)
        return self

    @property
    def cuts(self) -> torch.Tensor:
        """The ``n_bins + 1`` interval cut points (time in the data's unit), from 0 to the largest training time."""
        return torch.as_tensor(self._fitted_cuts().cuts)

    def _fitted_cuts(self) -> Any:
        if self.interval_cuts is None:
            raise RuntimeError("interval cuts are not fitted: call fit_preprocessing(cohort) on the training split")
        return self.interval_cuts

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Any) -> torch.Tensor:
        """batch: a :class:`~pyimputmae.data.Batch` → hazard logits ``(B, n_bins)``."""
        features, excluded = self.mae.encode(batch, self.config.missing)
        summary = torch.stack([features[n][:, 0] for n in self.mae.names], 1)  # (B, M, D)
        summary = summary.masked_fill(excluded.unsqueeze(-1), 0.0)
        B, _, D = summary.shape
        always = excluded.new_ones(B, 1)
        tokens, allowed = [self.cls.to(summary.dtype).expand(B, 1, D), summary], [always, ~excluded]
        if self.n_clinical_tokens:
            clin = self.clinical(batch.clinical)
            tokens.append(clin.to(summary.dtype))
            allowed.append(always.expand(B, self.n_clinical_tokens))
        x = torch.cat(tokens, 1) + self.token_type.to(summary.dtype)
        x = x + self.fusion(self.fusion_norm(x), key_mask(torch.cat(allowed, 1)))
        h = self.out_norm(x[:, 0])
        if self.concat_clinical:
            h = torch.cat([h, self.clinical.features(batch.clinical).to(h.dtype)], 1)
        return self.head(h)

    @torch.no_grad()
    def predict_survival(self, batch: Any) -> torch.Tensor:
        """Survival curve ``(B, n_bins + 1)`` at the interval cuts: ``S(t_0) = 1``,
        ``S(t_j) = Π_{i ≤ j} (1 − sigmoid(logit_i))``; eval mode, deterministic."""
        from ..survival import hazards_to_survival

        with eval_mode(self):
            logits = self(batch)
        return hazards_to_survival(logits.float())

    def targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Discretised targets of a batch with the fitted cuts (``IntervalCuts.transform``):
        ``idx_durations (B,)`` int64 and ``events (B,)`` float32, on the batch's device."""
        return self._fitted_cuts().transform(batch.time, batch.event)

    def loss(self, batch: Any) -> torch.Tensor:
        """Logistic-hazard negative log-likelihood of ``batch`` (0-d)."""
        from ..survival import nll_logistic_hazard

        return nll_logistic_hazard(self(batch).float(), *self.targets(batch))

    # ------------------------------------------------------------ saved state
    def get_extra_state(self) -> dict:
        return {"interval_cuts": None if self.interval_cuts is None else jsonable(self.interval_cuts.to_dict())}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("interval_cuts")
        if saved is None:
            self.interval_cuts = None
            return
        from ..survival import IntervalCuts

        self.interval_cuts = IntervalCuts.from_dict(saved)
