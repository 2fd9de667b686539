"""Using a trained model: save and load model files, predict survival curves, evaluate.

``pyimputmae.load(path)`` restores what :func:`pyimputmae.train` wrote (``out_dir/model.pt``): a
:class:`SurvivalModel` with everything fitted on the training split (interval cuts, clinical
statistics), or an :class:`ImputeMAE` after pre-training only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import __version__, checkpoint
from .data.cohort import Cohort
from .metrics import evaluate
from .model.config import resolve_config
from .model.mae import ImputeMAE
from .model.survival import SurvivalModel

if TYPE_CHECKING:
    from .training import TrainConfig


def evaluate_model(model: SurvivalModel, cohort: Cohort, idx: np.ndarray, batch_size: int = 256,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """C-index (Antolini), IBS, CS-score and Harrell's C of ``model`` on rows ``idx`` of ``cohort``."""

    curves = predict_survival(model, cohort, idx, batch_size, device)
    time_ = cohort.time[torch.as_tensor(idx, device=cohort.time.device)].cpu().numpy()
    event = cohort.event[torch.as_tensor(idx, device=cohort.event.device)].cpu().numpy()
    return evaluate(curves, model.cuts.cpu().numpy(), time_, event)


def predict_survival(model: SurvivalModel, cohort: Cohort, idx: np.ndarray | None = None, batch_size: int = 256,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Survival curves ``(N, n_bins + 1)`` at ``model.cuts`` for rows ``idx`` (default: all)."""
    idx = np.arange(len(cohort)) if idx is None else np.asarray(idx)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for start in range(0, len(idx), batch_size):
        batch = cohort.batch(idx[start:start + batch_size]).to(device)
        out.append(model.predict_survival(batch).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.n_bins + 1))


def save_model(model: nn.Module, path: str | os.PathLike, metrics: dict | None = None,
               train_config: TrainConfig | None = None) -> Path:
    """Write a model file :func:`load` restores (config + weights + everything fitted on train)."""
    kind = "survival" if isinstance(model, SurvivalModel) else "mae"
    cfg = model.config
    state = {"format": "pyimputmae-model", "version": __version__, "kind": kind, "config": cfg.to_dict(),
             "state_dict": model.state_dict(), "metrics": metrics or {},
             "train_config": train_config.to_dict() if train_config else None}
    return checkpoint.atomic_save(state, path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Restore a model written by :func:`train` / :func:`save_model`: a :class:`SurvivalModel` (use
    ``predict_survival``; its ``.mae.impute`` imputes) or an :class:`ImputeMAE` (pre-training only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    state = checkpoint.load(path, map_location=device)
    if isinstance(state, dict) and state.get("format") != "pyimputmae-model" and "model_config" in state:
        raise ValueError(f"{path} is a training checkpoint, not a model file; resume training with resume=True "
                         f"or load the model file written at the end ({path.parent.parent / 'model.pt'})")
    if not isinstance(state, dict) or state.get("format") != "pyimputmae-model":
        raise ValueError(f"{path} is not a pyimputmae model file")
    cfg = resolve_config(state["config"])
    mae = ImputeMAE(cfg)
    model: nn.Module = SurvivalModel(mae, cfg) if state["kind"] == "survival" else mae
    model.load_state_dict(state["state_dict"])
    model.to(device).eval()
    return model
