"""Reference models the multimodal model has to beat.

:func:`coxph_clinical`: a Cox proportional-hazards model on the clinical covariates alone
(lifelines ``CoxPHFitter``), scored with exactly the metrics and time grid of the main model.
"""

from __future__ import annotations

import numpy as np

from .data.cohort import Cohort
from .metrics import evaluate
from .survival import IntervalCuts

__all__ = ["clinical_design_matrix", "coxph_clinical"]


def clinical_design_matrix(
    clinical: np.ndarray, train_idx: np.ndarray, names: list[str], min_missing: int = 5
) -> tuple[np.ndarray, list[str]]:
    """Clinical covariates as a complete, standardised design matrix, fitted on the training rows.

    clinical: ``(N, F)`` with NaN for unknown values → ``(N, F')`` and the column names: each
    column imputed with its training median, plus a ``<name>_missing`` indicator for every column
    unknown in at least ``min_missing`` training rows (an indicator set for one or two patients
    only destabilises the Cox fit: the real cohort lacks the age of a single patient); every column
    standardised with training mean and sd. Columns constant on the training rows are dropped
    (a Cox model cannot estimate them).
    """
    x = np.asarray(clinical, dtype=np.float64)
    train = x[train_idx]
    columns, out_names = [], []
    for j, name in enumerate(names):
        known = ~np.isnan(train[:, j])
        median = float(np.median(train[known, j])) if known.any() else 0.0
        columns.append(np.where(np.isnan(x[:, j]), median, x[:, j]))
        out_names.append(name)
        if (~known).sum() >= max(min_missing, 1):
            columns.append(np.isnan(x[:, j]).astype(np.float64))
            out_names.append(f"{name}_missing")
    design = np.stack(columns, axis=1) if columns else np.zeros((len(x), 0))
    mean = design[train_idx].mean(0)
    sd = design[train_idx].std(0)
    keep = sd > 0
    design = (design[:, keep] - mean[keep]) / sd[keep]
    return design, [n for n, k in zip(out_names, keep) if k]


def coxph_clinical(
    cohort: Cohort,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    n_bins: int = 20,
    penalizer: float = 0.01,
    time_grid: np.ndarray | None = None,
) -> dict[str, float]:
    """Cox model on clinical covariates only, evaluated on ``test_idx``.

    Fitted on rows ``train_idx`` (median imputation + missing indicators, standardised with
    training statistics: :func:`clinical_design_matrix`; ridge ``penalizer``). Survival curves are
    predicted at ``time_grid`` — by default the model's own grid, the ``n_bins`` equidistant
    interval cuts fitted on the training times — and scored by :func:`pyimputmae.metrics.evaluate`:
    ``{"c_index", "ibs", "cs_score", "harrell_c"}``.
    """
    import pandas as pd
    from lifelines import CoxPHFitter

    train_idx = np.asarray(train_idx)
    test_idx = np.asarray(test_idx)
    time = cohort.time.detach().cpu().numpy().astype(np.float64)
    event = cohort.event.detach().cpu().numpy().astype(np.float64)
    clinical = cohort.clinical.detach().cpu().numpy()
    design, names = clinical_design_matrix(clinical, train_idx, list(cohort.clinical_names))
    grid = IntervalCuts.fit(time[train_idx], n_bins=n_bins).cuts if time_grid is None else np.asarray(time_grid)

    frame = pd.DataFrame(design[train_idx], columns=names)
    frame["time"], frame["event"] = time[train_idx], event[train_idx]
    cox = CoxPHFitter(penalizer=penalizer).fit(frame, duration_col="time", event_col="event")
    surv = cox.predict_survival_function(pd.DataFrame(design[test_idx], columns=names), times=grid)
    # lifelines returns (times, patients); the baseline survival is 1 at time 0 by construction.
    return evaluate(surv.to_numpy().T, grid, time[test_idx], event[test_idx])
