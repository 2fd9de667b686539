"""Using a trained model: save and load model files, predict survival curves, impute, evaluate.

``pyimputmae.load(path)`` restores what :func:`pyimputmae.train` wrote (``out_dir/model.pt``): a
:class:`SurvivalModel` with everything fitted on the training split (interval cuts, clinical
statistics), or an :class:`ImputeMAE` after pre-training only.

Before predicting or imputing, :func:`check_compatible` makes sure a cohort is laid out the way the
model was trained: the same clinical columns in the same order, and the same data preprocessing
(omics feature lists and normalisation, image sizes) — a store made for new patients with
``pyimputmae preprocess --fitted TRAINING_STORE`` always is.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from .train_config import TrainConfig


class PreprocessingWarning(UserWarning):
    """The cohort was preprocessed with other training statistics than the model's (e.g. omics
    medians): its inputs have the model's layout, but some values were filled differently."""


#: parts of the fitted preprocessing that change no value the model sees: versions and paths, the
#: store's compression, the clinical column list as typed (the encoded features are compared) and
#: the clinical means/sds (the store keeps clinical values unscaled; the model has its own scaler)
_IGNORED = {"package_version", "source", "config.codec", "config.clinical_columns", "clinical.mean", "clinical.std"}
#: facts about the training patients (omics medians, how many) rather than the inputs' layout: a difference
#: is a warning
_STATISTICS = {"medians", "n_train"}
_MAX_LISTED = 6


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(model_side: Any, store_side: Any, path: str = "") -> list[tuple[str, str]]:
    """``(path, description)`` for every leaf where two fitted-preprocessing dicts differ."""
    if path in _IGNORED:
        return []
    if isinstance(model_side, dict) and isinstance(store_side, dict):
        out = []
        for key in [*model_side, *(k for k in store_side if k not in model_side)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in store_side:
                out.append((sub, "set for the model, absent from the store"))
            elif key not in model_side:
                out.append((sub, "absent for the model, set in the store"))
            else:
                out += _differences(model_side[key], store_side[key], sub)
        return out
    if model_side == store_side:
        return []
    if isinstance(model_side, list) and isinstance(store_side, list):
        first = next((i for i, (a, b) in enumerate(zip(model_side, store_side)) if a != b),
                     min(len(model_side), len(store_side)))
        where = (f"first difference at position {first}: {_short(model_side[first])} vs {_short(store_side[first])}"
                 if first < min(len(model_side), len(store_side)) else f"the lists agree up to position {first}")
        return [(path, f"{len(model_side)} entries for the model, {len(store_side)} in the store; {where}")]
    return [(path, f"{_short(model_side)} for the model, {_short(store_side)} in the store")]


def _canonical(obj: Any) -> Any:
    """A JSON round trip: tuples, numpy values and zarr's attribute types compare as plain data."""
    return json.loads(json.dumps(obj, default=str))


def _column_problem(model_names: list[str], data_names: list[str]) -> str:
    missing = [c for c in model_names if c not in data_names]
    extra = [c for c in data_names if c not in model_names]
    if not missing and not extra:
        what = "the same columns in another order"
    else:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"not known to the model {', '.join(map(repr, extra))}")
        what = "; ".join(parts)
    return (f"clinical columns {data_names} differ from the ones the model was trained with {model_names} "
            f"({what}); the model takes them by position, so each value would be read as another column")


def compatibility(model: nn.Module, cohort: Cohort, *, clinical: bool = True) -> tuple[list[str], list[str]]:
    """What stands between ``cohort`` and ``model``: ``(problems, notes)``.

    problems: clinical columns whose names or order differ (with ``clinical``, for prediction; a
    :class:`SurvivalModel` with clinical features only), and differences in the data
    preprocessing that change the inputs' layout or meaning (settings, omics feature lists,
    widths, image sizes, clinical encoding). notes: differences in training statistics only
    (omics medians, which fill values a source file lacks). The preprocessing is compared only
    when both the model (trained from a store) and the cohort (loaded from one) carry it.
    """
    problems: list[str] = []
    encoder = getattr(model, "clinical", None)
    if clinical and encoder is not None:
        want, have = list(encoder.names), list(cohort.clinical_names)
        if want != have:
            problems.append(_column_problem(want, have))
    mae = getattr(model, "mae", model)
    trained = (getattr(mae, "preprocessing", None) or {}).get("preprocessing")
    current = cohort.attrs.get("preprocessing")
    notes: list[str] = []
    if trained and current:
        trained, current = _canonical(trained), _canonical(current)
        if not clinical or problems:  # clinical encoding: irrelevant to imputing, or already reported
            trained.pop("clinical", None)
            current.pop("clinical", None)
        diffs = _differences(trained, current)
        layout = [f"{p}: {d}" for p, d in diffs if p.rsplit(".", 1)[-1] not in _STATISTICS]
        stats = sorted({p for p, _ in diffs if p.rsplit(".", 1)[-1] in _STATISTICS})
        if layout:
            shown = "; ".join(layout[:_MAX_LISTED]) + (f"; and {len(layout) - _MAX_LISTED} more"
                                                       if len(layout) > _MAX_LISTED else "")
            problems.append(f"its preprocessing differs from the one the model was trained with: {shown}")
        if stats:
            notes.append(f"the store's preprocessing was fitted on other training patients than the model's "
                         f"({', '.join(stats)} differ): values missing from a source file were filled with other "
                         "medians than in training; the feature lists and settings agree")
    return problems, notes


def _training_store(model: nn.Module) -> str:
    mae = getattr(model, "mae", model)
    return str(((getattr(mae, "preprocessing", None) or {}).get("report") or {}).get("store") or "TRAINING_STORE")


def check_compatible(model: nn.Module, cohort: Cohort, *, clinical: bool = True, model_name: str = "the model",
                     data_name: str = "the cohort") -> list[str]:
    """ValueError naming every :func:`compatibility` problem and how to fix it; returns the notes
    (differences in training statistics only) for the caller to show."""
    problems, notes = compatibility(model, cohort, clinical=clinical)
    if problems:
        fix = (f"make the store of new patients with the training store's preprocessing: `pyimputmae preprocess "
               f"MANIFEST --fitted {_training_store(model)} --out NEW.zarr` (same clinical columns in the same order, "
               "same omics features and normalisation)")
        listed = problems[0] if len(problems) == 1 else "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise ValueError(f"{data_name} does not fit {model_name}: {listed}. To fix it, {fix}")
    return notes


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, PreprocessingWarning, stacklevel=3)


def evaluate_model(model: SurvivalModel, cohort: Cohort, idx: np.ndarray | torch.Tensor | None = None,
                   batch_size: int = 256, device: torch.device | str | None = None,
                   check: bool = True) -> dict[str, float]:
    """C-index (Antolini), IBS, CS-score and Harrell's C of ``model`` on rows ``idx`` of ``cohort``
    (row numbers or a boolean mask, as :meth:`Cohort.rows` reads them; default: all);
    ``check``: as for :func:`predict_survival` (off where the model was just fitted on ``cohort``).

    ValueError for no rows, or for rows without a recorded survival time and event (new patients
    preprocessed with ``--fitted`` may have none; they are named). Rows without a death leave the
    C-index undefined: the metrics are then NaN, with a RuntimeWarning saying so."""
    idx = cohort.rows(idx)
    if not len(idx):
        raise ValueError("evaluate_model got no rows to evaluate (idx is empty)")
    time_, event, recorded = cohort.survival(idx)
    unknown = idx[~recorded]
    if len(unknown):
        shown = ", ".join(str(cohort.ids[i]) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} of the {len(idx)} patients to evaluate have no recorded survival time "
                         f"and event 0/1 ({shown}): evaluate only the others, e.g. idx[np.isfinite("
                         "cohort.time[idx].numpy())]")
    if not event.any():
        warnings.warn(f"none of the {len(idx)} patients evaluated has an event, so the C-index, IBS, "
                      "CS-score and Harrell's C are undefined (NaN)", RuntimeWarning, stacklevel=2)
    curves = predict_survival(model, cohort, idx, batch_size, device, check=check)
    return evaluate(curves, model.cuts.cpu().numpy(), time_, event)


def predict_survival(model: SurvivalModel, cohort: Cohort, idx: np.ndarray | torch.Tensor | None = None,
                     batch_size: int = 256, device: torch.device | str | None = None, *,
                     check: bool = True) -> np.ndarray:
    """Survival curves ``(N, n_bins + 1)`` at ``model.cuts`` for rows ``idx`` (row numbers or a
    boolean mask, as :meth:`Cohort.rows` reads them; default: all).

    A modality a row lacks (``present`` False, e.g. held out with :meth:`Cohort.withhold`) plays no
    part in its prediction, whatever its inputs hold. A patient with none of the modalities is
    predicted from its clinical data alone. check: first :func:`check_compatible` (ValueError for
    other clinical columns or another preprocessing; a :class:`PreprocessingWarning` for other
    training statistics)."""
    if check:
        _warn(check_compatible(model, cohort))
    idx = cohort.rows(idx)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for start in range(0, len(idx), batch_size):
        batch = cohort.batch(idx[start:start + batch_size]).to(device)
        out.append(model.predict_survival(batch).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.n_bins + 1))


def impute(model: nn.Module, cohort: Cohort, idx: np.ndarray | torch.Tensor | None = None, batch_size: int = 64,
           device: torch.device | str | None = None, *, keep_present: bool = True,
           check: bool = True) -> dict[str, np.ndarray]:
    """Inputs of rows ``idx`` (default: all) with missing modalities reconstructed: name →
    ``(N, C, *S)`` float32 (:meth:`ImputeMAE.impute`, batch by batch). ``model``: an
    :class:`ImputeMAE` or a :class:`SurvivalModel`. A patient with none of the modalities
    (clinical data only) has nothing to impute from: NaN in every modality — find them with
    ``~cohort.present[idx].any(1)``. A modality a row lacks (``present`` False) is reconstructed
    from the row's other modalities only, whatever its inputs hold. With a ``norm_pix`` model every
    value is per-patch normalised (:func:`pyimputmae.model.normalized_inputs`), the observed ones
    too. Imputation fidelity: ``impute(model, cohort.withhold(name), idx)[name]`` against
    ``impute(model, cohort, idx)[name]`` on rows that have ``name`` and another modality (both in
    the model's unit). check: :func:`check_compatible` first (the preprocessing; clinical columns
    play no part in imputation)."""
    mae = getattr(model, "mae", model)
    if check:
        _warn(check_compatible(model, cohort, clinical=False))
    idx = cohort.rows(idx)
    device = torch.device(device) if device is not None else next(mae.parameters()).device
    parts: dict[str, list[np.ndarray]] = {m.name: [] for m in mae.config.modalities}
    for start in range(0, len(idx), batch_size):
        batch = cohort.batch(idx[start:start + batch_size]).to(device)
        for name, value in mae.impute(batch, keep_present=keep_present).items():
            parts[name].append(value.cpu().numpy())
    return {m.name: np.concatenate(parts[m.name]) if parts[m.name] else np.zeros((0, *m.shape), np.float32)
            for m in mae.config.modalities}


def save_model(model: nn.Module, path: str | os.PathLike, metrics: dict | None = None,
               train_config: TrainConfig | None = None) -> Path:
    """Write a model file :func:`load` restores (config + weights + everything fitted on train)."""
    kind = "survival" if isinstance(model, SurvivalModel) else "mae"
    cfg = model.config
    state = {"format": "pyimputmae-model", "version": __version__, "kind": kind, "config": cfg.to_dict(),
             "state_dict": model.state_dict(), "metrics": metrics or {},
             "train_config": train_config.to_dict() if train_config else None}
    return checkpoint.atomic_save(state, path)


def _member_failing_its_checksum(path: Path) -> str | None:
    """The first member of the zip archive ``torch.save`` wrote whose bytes do not match the CRC-32
    stored with them (None when all match, or when the archive cannot be read that way: torch.load then
    says what is wrong). torch.load does not check these checksums, so without this a byte changed in
    a tensor's data (a bad copy, a failing disk) would load and predict silently different numbers.
    A member stored with CRC 0 is not checked (torch writes 0 when its ``compute_crc32`` is off)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error):
        return None
    return None


def _read_model_file(path: Path) -> Any:
    """``torch.load`` of ``path`` on the CPU; ValueError naming the file when it is no torch file or
    a damaged one (the archive's checksums are verified first)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is not a pyimputmae model file (it is empty: a copy or download that did "
                         "not finish?)")
    bad = _member_failing_its_checksum(path) if head == b"PK\x03\x04" else None
    if bad is not None:
        raise ValueError(f"{path} is a damaged model file: the bytes of {bad!r} inside it do not match the checksum "
                         "written with them (a copy, download or disk that changed the file?). Copy it again from "
                         "where training wrote it")
    try:
        return checkpoint.load(path, map_location="cpu")
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, RuntimeError, KeyError, AttributeError,
            ImportError, TypeError, IndexError, UnicodeDecodeError) as e:
        # (torch's zip reader raises OSError(EINVAL) for an archive cut short)
        # torch.save writes a zip archive; anything else was never written by it
        why = ("damaged or truncated" if head == b"PK\x03\x04"
               else f"not written by torch.save: it begins with {head!r}")
        raise ValueError(f"{path} is not a pyimputmae model file ({why}; torch.load: {type(e).__name__}: {e})") from e


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Restore a model written by :func:`train` / :func:`save_model`: a :class:`SurvivalModel` (use
    ``predict_survival``; its ``.mae.impute`` imputes) or an :class:`ImputeMAE` (pre-training only).

    ValueError naming the file for anything else (an empty, damaged or foreign file, a training
    checkpoint); ValueError naming the device for one that is not there (``"cuda"`` without a GPU).
    ``device``: a ``torch.device`` or its name (``"auto"``: a CUDA GPU when one is visible)."""
    from .train_config import device_for

    path = Path(path)
    device = device_for(device) if isinstance(device, str) else device
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.is_dir():
        inside = " (pass the model.pt inside it)" if (path / "model.pt").exists() else ""
        raise IsADirectoryError(f"{path} is a folder, not a model file{inside}")
    state = _read_model_file(path)
    if isinstance(state, dict) and state.get("format") != "pyimputmae-model" and "model_config" in state:
        raise ValueError(f"{path} is a training checkpoint, not a model file; resume training with resume=True "
                         f"or load the model file written at the end ({path.parent.parent / 'model.pt'})")
    if not isinstance(state, dict) or state.get("format") != "pyimputmae-model":
        raise ValueError(f"{path} is not a pyimputmae model file (a torch file, but without the "
                         "'format': 'pyimputmae-model' entry that save_model writes)")
    try:
        cfg = resolve_config(state["config"])
        mae = ImputeMAE(cfg)
        model: nn.Module = SurvivalModel(mae, cfg) if state["kind"] == "survival" else mae
        model.load_state_dict(state["state_dict"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: this pyimputmae model file (written by pyimputmae {state.get('version', '?')}) "
                         f"cannot be restored by pyimputmae {__version__}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    return model
