"""Atomic checkpoints, the random-number state a bitwise-exact resume needs, and what a resumed run
must have in common with the run that wrote the checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._atomic import atomic_write
from ._atomic import remove_stale_temporaries as remove_temporaries

if TYPE_CHECKING:
    from .model.config import ModelConfig
    from .train_config import TrainConfig


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``
    (:func:`pyimputmae._atomic.atomic_write`).

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(obj, f))


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: a NaN or infinite number (an undefined C-index, a diverged loss) is
    ``null``, which every JSON reader takes (Python writes ``NaN``, which jq, R's jsonlite and
    JavaScript refuse)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, Mapping):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_save` (full pickle: our own files only)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------- what a resume must match
#: TrainConfig settings a resumed run may change. They change how long or where the run goes on, or
#: what it reports, not what is being trained: the epoch counts (a longer or shorter run; the
#: cosine schedule is recomputed over the new length from the step reached), the output folder,
#: the device and threads (results then match an uninterrupted run only up to floating-point
#: rounding; with ``amp="auto"`` a move between CPU and GPU also turns mixed precision off or on, and
#: one between GPU generations may switch bf16 and fp16), logging,
#: progress display and checkpoint frequency. ``model``/``model_overrides`` are compared as the
#: resolved model configuration, ``data``/``synthetic`` as the cohort itself
#: (:func:`cohort_identity`: a moved store resumes, one with other content does not). Every
#: other setting (seed, learning rates, batch sizes, schedule, weight decay, grad_accum, grad_clip,
#: amp, val_fold, pretrain/finetune, pretrain_from) must be the checkpoint's.
RESUMABLE_SETTINGS = frozenset({
    "pretrain_epochs", "finetune_epochs", "out_dir", "resume", "overwrite", "device", "data_on_device",
    "num_threads", "deterministic", "progress", "log_every", "checkpoint_every", "tensorboard", "cuda_graph",
})
_COMPARED_ELSEWHERE = frozenset({"model", "model_overrides", "data", "synthetic"})

# the inputs are large (GBs for a real cohort): hash an evenly strided sample of at most this many
# values per modality; the tables (ids, split, fold, survival, clinical, presence) are hashed whole
_INPUT_SAMPLE = 1 << 20


def cohort_identity(cohort: Any, source: str) -> dict[str, Any]:
    """What identifies a cohort for a resume: a digest of its patients, splits, folds, survival,
    clinical table, presence, modality shapes, a strided sample of every input (and the store's
    own fingerprint when it has one), with a readable summary for messages. ``source``: where it
    came from (a store path, "synthetic ...", "in-memory cohort")."""
    h = hashlib.sha256()
    shapes = {name: list(t.shape[1:]) for name, t in cohort.inputs.items()}
    h.update(json.dumps([list(cohort.ids), np.asarray(cohort.split).tolist(), np.asarray(cohort.fold).tolist(),
                         list(cohort.clinical_names), shapes, cohort.attrs.get("fingerprint")], default=str).encode())
    for t in (cohort.time, cohort.event, cohort.present, cohort.clinical):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in cohort.inputs.values():
        stride = max(1, math.ceil(t.numel() / _INPUT_SAMPLE))
        h.update(t.detach().reshape(-1)[::stride].float().cpu().numpy().tobytes())
    splits = {s: int((np.asarray(cohort.split) == s).sum()) for s in ("train", "val", "test")}
    return {"digest": h.hexdigest(), "patients": len(cohort), "splits": {k: v for k, v in splits.items() if v},
            "source": source}


def describe_cohort(identity: dict[str, Any]) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in identity["splits"].items())
    return f"{identity['patients']} patients ({splits}) from {identity['source']}"


def differences(old: Any, new: Any, path: str = "", old_where: str = "in the checkpoint") -> list[str]:
    """``"path: old in the checkpoint, new now"`` for every leaf where two JSON-like values differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(f"{sub}: {old.get(key, '(not set)')!r} {old_where}, {new.get(key, '(not set)')!r} now")
            else:
                out += differences(old[key], new[key], sub, old_where)
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]", old_where)]
    if old != new:
        return [f"{path}: {old!r} {old_where}, {new!r} now"]
    return []


def resume_differences(saved: dict[str, Any], train_config: dict[str, Any], model_config: dict[str, Any],
                       identity: dict[str, Any]) -> list[str]:
    """Why the run saved in ``saved`` cannot be continued with these settings (empty: it can)."""
    out = differences(saved["model_config"], model_config, "model")
    old_train = saved["train_config"]
    fixed = [k for k in train_config if k in old_train and k not in RESUMABLE_SETTINGS | _COMPARED_ELSEWHERE]
    out += differences({k: old_train[k] for k in fixed}, {k: train_config[k] for k in fixed})
    old_epochs, new_epochs = old_train.get("pretrain_epochs"), train_config.get("pretrain_epochs")
    if saved["position"].get("stage") == "finetune" and old_epochs != new_epochs:
        out.append(f"pretrain_epochs: {old_epochs!r} in the checkpoint, {new_epochs!r} now, but pre-training has "
                   f"finished and fine-tuning has started: only finetune_epochs can change now")
    old_identity = saved.get("cohort")
    if old_identity is not None and old_identity["digest"] != identity["digest"]:
        same_size = old_identity["patients"] == identity["patients"]
        out.append(f"cohort: {describe_cohort(old_identity)} in the checkpoint, {describe_cohort(identity)} now"
                   + (" (same size, different content)" if same_size else ""))
    return out


#: the lock file a run holds in out_dir while it writes there (pyimputmae._runlock; removed at its end)
LOCK_FILE = ".pyimputmae.lock"
#: What a run writes in out_dir (relative paths); an out_dir holding any of them holds a run.
RUN_FILES = ("checkpoints/last.pt", "model.pt", "metrics.json", "metrics.jsonl", "config.json", "tensorboard",
             "training_curves.png", "risk_groups.png")


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuse to write over an earlier run in ``out_dir`` unless ``resume`` or ``overwrite`` says so."""
    out = Path(cfg.out_dir)
    blocked = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        where = "is" if blocked == out else f"is inside {blocked}, which is"
        raise NotADirectoryError(f"out_dir {out} {where} a file, not a folder: choose another out_dir")
    found = [f for f in RUN_FILES if (out / f).exists()]
    if not found or cfg.overwrite:
        return
    if not cfg.resume:
        raise FileExistsError(
            f"out_dir {out} already holds a training run ({', '.join(found)}), which this one would overwrite. "
            f"Pass resume=True (pyimputmae train --resume) to continue it, overwrite=True (--overwrite) to replace "
            f"it, or choose another out_dir")
    if not (out / RUN_FILES[0]).exists() and (out / "model.pt").exists():
        raise FileExistsError(
            f"resume=True but {out} has no checkpoint ({RUN_FILES[0]}) to continue, only the finished run's "
            f"model.pt; pass overwrite=True (--overwrite) to train again from scratch there, or choose another out_dir")


def remove_run_files(out: Path) -> None:
    """``overwrite=True``: the earlier run's files go (only those: out_dir may hold other things)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_stale_temporaries(out: Path) -> None:
    """The temporaries a run killed while writing its checkpoint, model or logs left in ``out``
    (each as large as the file it was to replace); called once the run owns ``out``."""
    names = [Path(f) for f in RUN_FILES]
    for folder in {p.parent for p in names}:
        remove_temporaries(out / folder, [p.name for p in names if p.parent == folder])


def load_resume_state(cfg: TrainConfig, ckpt_path: Path, model_cfg: ModelConfig,
                      identity: dict[str, Any]) -> dict | None:
    """The checkpoint to continue (``resume=True``), after checking that it was written with this
    model, this cohort and these settings (:data:`RESUMABLE_SETTINGS` may differ)."""
    if not cfg.resume:
        return None
    if not ckpt_path.exists():
        print(f"resume: no checkpoint at {ckpt_path}, starting from scratch")
        return None
    try:
        saved = load(ckpt_path)
    except Exception as e:  # a damaged or foreign file: say which, do not show a pickle traceback only
        raise ValueError(f"cannot read the checkpoint {ckpt_path} to resume from ({type(e).__name__}: {e}); "
                         f"pass overwrite=True (--overwrite) to start again, or choose another out_dir") from e
    if not isinstance(saved, dict) or "model_config" not in saved or "position" not in saved:
        raise ValueError(f"{ckpt_path} is not a pyimputmae training checkpoint; pass overwrite=True (--overwrite) "
                         f"to start again, or choose another out_dir")
    diffs = resume_differences(saved, cfg.to_dict(), model_cfg.to_dict(), identity)
    if diffs:
        lines = "\n  ".join(diffs)
        raise ValueError(
            f"cannot resume from {ckpt_path}: it was written with other settings, and continuing it with these "
            f"would mix two runs:\n  {lines}\nTo continue that run, use its settings (saved in "
            f"{ckpt_path.parent.parent / 'config.json'}); only {', '.join(sorted(RESUMABLE_SETTINGS))} "
            f"may change on resume. To train with the new settings, choose another out_dir, or pass overwrite=True "
            f"(--overwrite) instead of resume to replace the old run")
    return saved
