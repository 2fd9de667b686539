"""Figures of a training run: loss curves from its history, Kaplan–Meier curves by predicted risk.

:func:`train` draws both into its ``out_dir`` when it finishes; ``pyimputmae plot RUN_DIR`` draws
the loss curves from ``metrics.jsonl`` at any time, also while the run is still going.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write

#: the fields of a history record that are not a loss to plot
BOOKKEEPING = frozenset({"stage", "epoch", "step", "loss", "lr", "patients_per_s", "loss_scale"})
STAGE_TITLES = {"pretrain": "pre-training: masked reconstruction (MSE)",
                "finetune": "fine-tuning: survival loss (NLL)"}


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` outside pyplot: drawing it to a file changes no global state (a
    notebook's backend stays as it is) and needs no display."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Draw ``fig`` to ``path`` atomically (:func:`~pyimputmae._atomic.atomic_write`): a run killed
    while drawing leaves the previous figure, or none, never a truncated file that looks like a
    result. The format comes from the file's extension, as ``Figure.savefig`` takes it; a name
    without one gets matplotlib's default format (``savefig.format``) as its extension. Returns the
    path written."""
    import matplotlib

    path = Path(path)
    fmt = path.suffix[1:].lower()
    if not fmt:
        fmt = matplotlib.rcParams["savefig.format"]
        path = path.with_name(f"{path.name}.{fmt}")
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (``path``: the file or the run's folder).

    A last line cut short (a run killed while it wrote) is left out with a warning; any other line
    that is not a JSON record is an error naming the file and the line."""
    path = Path(path)
    why = "a run of pyimputmae.train writes metrics.jsonl in its out_dir after its first logged step"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or metrics.jsonl file ({why})")
    if path.is_dir():
        path = path / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file ({why})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file: expected a run's metrics.jsonl (or its folder)") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path} line {number}: cut short ({err.msg}), left out: the run was probably "
                              "stopped while writing it", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{path} line {number}: not a JSON record ({err.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or not {"stage", "step", "loss"} <= set(record):
            raise ValueError(f"{path} line {number}: not a training record (it needs 'stage', 'step' and 'loss'): "
                             f"{line[:80]!r}")
        # undefined figures are written as null (strict JSON): NaN again here, as the plots expect
        records.append({k: math.nan if v is None else v for k, v in record.items()})
    if not records:
        raise ValueError(f"{path}: no record yet (a run writes its first after log_every optimizer steps)")
    return records


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Loss curves of a run against the optimizer step of each stage: pre-training's loss with its
    per-modality parts, fine-tuning's loss, the learning rate, and fp16's loss scale when logged.

    history: :func:`train`'s ``TrainResult.history`` or :func:`read_history`'s records. Writes a PNG
    to ``path`` and returns it."""
    stages = [s for s in STAGE_TITLES if any(r.get("stage") == s for r in history)]
    if not stages:
        raise ValueError("the history holds no record of a training stage: nothing to plot")
    scaled = any("loss_scale" in r for r in history)
    panels = len(stages) + 1 + scaled
    fig = new_figure(figsize=(4.3 * panels, 3.5))
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    for ax, stage in zip(axes, stages):
        recs = [r for r in history if r.get("stage") == stage]
        steps = [r["step"] for r in recs]
        # the parts in the order the records list them (the model's modality order), whichever record has them
        parts = list(dict.fromkeys(k for r in recs for k in r if k not in BOOKKEEPING
                                   and isinstance(r[k], (int, float))))
        marker = "." if len(recs) < 3 else None  # a line needs two points: a lone record still shows
        ax.plot(steps, [r["loss"] for r in recs], color="black", lw=1.8, marker=marker,
                label="mean loss (sum of the parts)" if parts else "mean loss")
        for k in parts:
            ax.plot(steps, [r.get(k, math.nan) for r in recs], lw=1.0, marker=marker, label=k)
        if all(r["loss"] > 0 for r in recs):
            ax.set_yscale("log")
        ax.set_title(STAGE_TITLES[stage], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    ax = axes[len(stages)]
    for stage in stages:
        recs = [r for r in history if r.get("stage") == stage and "lr" in r]
        ax.plot([r["step"] for r in recs], [r["lr"] for r in recs], marker="." if len(recs) < 3 else None,
                label=stage)
    ax.set_title("learning rate", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    if scaled:
        ax = axes[-1]
        for stage in stages:
            recs = [r for r in history if r.get("stage") == stage and "loss_scale" in r]
            ax.step([r["step"] for r in recs], [r["loss_scale"] for r in recs], where="post", label=stage)
        ax.set_yscale("log", base=2)
        ax.set_title("fp16 loss scale (lowered on overflow)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def risk_scores(curves: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Risk score = −(restricted mean survival time up to the last cut): ``curves (N, T)`` on ``grid (T,)``."""
    return -(curves[:, 1:] @ np.diff(grid))


def plot_risk_groups(model: Any, cohort: Any, idx: np.ndarray, path: str | os.PathLike,
                     split: str = "test") -> dict[str, Any]:
    """Kaplan–Meier curves of the patients ``idx`` split into halves by predicted risk, with the
    log-rank p-value; writes a PNG to ``path`` and returns ``{"logrank_p", "n_high", "n_low"}`` —
    or ``{"skipped": why}``, drawing nothing, when every patient has the same predicted risk."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    from .inference import predict_survival

    grid = model.cuts.cpu().numpy()
    risk = risk_scores(predict_survival(model, cohort, idx), grid)
    if np.unique(risk).size < 2:
        return {"skipped": f"all {len(risk)} {split} patients have the same predicted risk: no groups to compare"}
    t = cohort.time[torch.as_tensor(idx)].cpu().numpy()
    e = cohort.event[torch.as_tensor(idx)].cpu().numpy()
    # halves by rank (ties at the median split by patient order), so that neither half is empty
    high = np.zeros(len(risk), dtype=bool)
    high[np.argsort(risk, kind="stable")[len(risk) // 2:]] = True
    p = float(logrank_test(t[high], t[~high], e[high], e[~high]).p_value)
    fig = new_figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for mask, label, colour in ((~high, "predicted low risk", "tab:blue"), (high, "predicted high risk", "tab:red")):
        KaplanMeierFitter().fit(t[mask], e[mask], label=f"{label} (n={int(mask.sum())})").plot_survival_function(
            ax=ax, color=colour, ci_show=True)
    ax.set_xlabel("years")
    ax.set_ylabel("survival probability")
    ax.set_title(f"{split.capitalize() + ' patients' if split else 'Patients'} by predicted risk "
                 f"(log-rank p = {p:.2g})")
    fig.tight_layout()
    save_figure(fig, path)
    return {"logrank_p": p, "n_high": int(high.sum()), "n_low": int((~high).sum())}
