"""``pyimputmae.train()``: pre-train an :class:`ImputeMAE`, fine-tune a :class:`SurvivalModel`, evaluate.

One call from a script::

    result = pyimputmae.train(model="small", out_dir="runs/demo", pretrain_epochs=20)
    result.metrics["test"]["c_index"], result.paths["model"]

The configuration is a :class:`TrainConfig` (:mod:`pyimputmae.train_config`), a YAML/JSON file,
a dict, or keyword arguments (which override the others). Batches are drawn from the in-memory
cohort (on the GPU when it fits), never from files. Checkpoints (``out_dir/checkpoints/last.pt``)
are written atomically every ``checkpoint_every`` optimizer steps and at the end of each stage,
and hold everything a resume needs: model, optimizer, scheduler, every RNG state and the masking
``(seed, offset)``, the stage, epoch and batch position, the accumulation step (with the partial
gradients) and what identifies the cohort. ``resume=True`` continues from there, with the
checkpoint's model, cohort and settings (:data:`pyimputmae.checkpoint.RESUMABLE_SETTINGS` may
change); on CPU with ``deterministic=True`` and a fixed thread count a resumed run ends with
bitwise the same weights as an uninterrupted one. An ``out_dir`` holding another run is refused
unless ``resume=True`` or ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__, checkpoint
from ._atomic import atomic_write_text
from ._graph_step import GraphedStep
from ._runlock import exclusive_use
from .data.cohort import Cohort
from .inference import evaluate_model, load, predict_survival, save_model  # noqa: F401  (public here too)
from .model.config import ModelConfig
from .model.mae import ImputeMAE, advance_rng_, model_preprocessing, new_rng
from .model.survival import SurvivalModel
from .train_config import TrainConfig, check_single_process, device_for, pretrains, resolve_model

STAGES = ("pretrain", "finetune")
#: run ``cuda_graph``'s step (:class:`~pyimputmae._graph_step.GraphedStep`) without a graph on the
#: CPU, where it is otherwise ignored: the tests check everything but the capture this way
GRAPH_STEP_WITHOUT_CUDA = False


@dataclass
class TrainResult:
    """What :func:`train` returns: the model (a SurvivalModel, or the ImputeMAE when fine-tuning is
    off), metrics per split, the training history (one dict per log record) and output paths."""

    model: nn.Module
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    paths: dict[str, str]
    config: TrainConfig


# ----------------------------------------------------------------------------------- helpers
class MissingPackageError(ImportError):
    """An optional package a chosen setting needs is not installed (the message says which)."""


def clinical_features_for(model_cfg: ModelConfig, cohort: Cohort, explicit: bool, finetune: bool,
                          source: str) -> ModelConfig:
    """The model with the cohort's clinical columns as ``clinical_features`` unless the user set them;
    set ones must be the cohort's (same names, same order) when fine-tuning will use them."""
    names = tuple(cohort.clinical_names)
    if not explicit:
        return model_cfg.replace(clinical_features=names) if model_cfg.clinical_features != names else model_cfg
    if finetune and model_cfg.clinical_features and model_cfg.clinical_features != names:
        columns = dict.fromkeys(n.split("=", 1)[0] for n in model_cfg.clinical_features)  # "project=LGG" → project
        raise ValueError(
            f"the configured clinical_features {list(model_cfg.clinical_features)} differ from the clinical columns "
            f"of the cohort ({source}) {list(names)} (fine-tuning needs the same names in the same order). Leave "
            f"clinical_features unset to use the cohort's columns, set model_overrides={{'clinical_features': "
            f"[...]}} (--set model.clinical_features='[...]') to exactly the cohort's, or rebuild the store with "
            f"`pyimputmae preprocess --clinical {','.join(columns)}` (manifest column names) to encode only those")
    return model_cfg


def _listed(cohort: Cohort, rows: np.ndarray, limit: int = 5) -> str:
    """The ids of ``rows``, the first ``limit`` of them."""
    return ", ".join(str(cohort.ids[i]) for i in rows[:limit]) + (", ..." if len(rows) > limit else "")


def split_indices(cohort: Cohort, val_fold: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training, validation and test rows. The validation rows are the cohort's ``"val"`` split
    (the manifest's), or with ``val_fold`` that cross-validation fold of the training split — not
    both: a cohort with a ``"val"`` split and a ``val_fold`` is refused."""
    if val_fold is None:
        return cohort.indices("train"), cohort.indices("val"), cohort.indices("test")
    in_val = cohort.indices("val")
    if len(in_val):
        raise ValueError(f"val_fold={val_fold} would hold out fold {val_fold} of the training split for validation, "
                         f"but the cohort already has {len(in_val)} patients in split 'val' "
                         f"({_listed(cohort, in_val)}), which would then be neither trained on nor evaluated. Leave "
                         "val_fold unset to validate on the 'val' "
                         "split, or mark those patients 'train' (or 'test') in the manifest to use folds")
    folds = sorted(set(np.asarray(cohort.fold)[np.asarray(cohort.split) == "train"].tolist()) - {-1})
    if val_fold not in folds:
        have = (f"its folds are {', '.join(map(str, folds))}" if folds
                else "it has no folds (fold is -1 for every training patient)")
        raise ValueError(f"val_fold={val_fold} is not a cross-validation fold of the cohort's training split: {have}")
    return cohort.indices("train", val_fold), cohort.indices("val", val_fold), cohort.indices("test")


def pretrained_state(path: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The pre-trained MAE weights of a model file, checked against the MAE of ``model_cfg``."""
    with torch.random.fork_rng(devices=[]):  # building models draws initial weights: leave the generator as it was
        src = load(path)
        want = ImputeMAE(model_cfg).state_dict()
    mae_src = src.mae if isinstance(src, SurvivalModel) else src
    state = mae_src.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(want[k].shape)} configured" for k in want
              if k in state and isinstance(want[k], torch.Tensor) and state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        problems = shapes[:6] + [f"{k} missing from the file" for k in missing[:3]] + \
            [f"{k} in the file, not in the configured model" for k in unexpected[:3]]
        fields = {f.name for f in dataclasses.fields(ModelConfig)} - {
            "clinical_features", "clinical_tokens", "clinical_hidden", "clinical_mode", "n_bins", "fusion_heads",
            "fusion_dropout", "freeze", "missing"}  # the fine-tuning settings do not shape the MAE
        old, new = mae_src.config.to_dict(), model_cfg.to_dict()
        config_diffs = checkpoint.differences({k: old[k] for k in sorted(fields)}, {k: new[k] for k in sorted(fields)},
                                              old_where="in the file")
        config_text = "\n  ".join(config_diffs) or "(none)"
        raise ValueError(
            f"pretrain_from={path}: its pre-trained model does not fit the configured model "
            f"({len(shapes) + len(missing) + len(unexpected)} parameters differ):\n  " + "\n  ".join(problems)
            + f"\nModel settings that differ:\n  {config_text}\nConfigure the model the file was trained with "
            f"(pyimputmae.load({str(path)!r}).config) or pre-train this one")
    return state


def load_cohort_for(cfg: TrainConfig, model_cfg: ModelConfig) -> Cohort:
    """The cohort named by the configuration: a zarr store, or the synthetic one shaped for the model."""
    if cfg.data:
        from .data.store import load_cohort

        return load_cohort(cfg.data)
    from .data.synthetic import make_cohort

    kwargs = {"seed": cfg.seed, **cfg.synthetic}
    kwargs.setdefault("shapes", {m.name: m.shape for m in model_cfg.modalities})
    return make_cohort(**kwargs)


def nonfinite_rows(values: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Rows of ``values`` ``(N, ...)`` holding a NaN or an infinity (checked ``chunk`` rows at a time:
    a cohort's inputs can be GBs)."""
    bad = [(~torch.isfinite(values[start:start + chunk])).flatten(1).any(1).cpu()
           for start in range(0, values.shape[0], chunk)]
    return np.flatnonzero(torch.cat(bad).numpy()) if bad else np.zeros(0, dtype=np.int64)


def _fitting_modalities(model_cfg: ModelConfig, cohort: Cohort) -> str:
    """A ``--set model.modalities=...`` value for the cohort's data: the model's modalities the cohort
    has, each with the cohort's channels and sizes and the model's patch size where it divides them
    (else the largest one below it that does), its encoder depth unchanged."""
    out = []
    for m in model_cfg.modalities:
        if m.name not in cohort.inputs:
            continue
        channels, *spatial = (int(x) for x in cohort.inputs[m.name].shape[1:])
        common = math.gcd(*spatial) if spatial else m.patch
        patch = max(p for p in range(1, min(m.patch, common) + 1) if common % p == 0)
        out.append({"name": m.name, "channels": channels, "spatial": spatial, "patch": patch, "depth": m.depth})
    return f"--set model.modalities='{json.dumps(out)}' (model_overrides={{'modalities': [...]}})"


def check_cohort(cohort: Cohort, model_cfg: ModelConfig, train_idx: np.ndarray, source: str = "the cohort") -> None:
    """Clear errors for a cohort that cannot train this model: modalities and shapes, NaN or
    infinite inputs (they would turn every weight into NaN), the training patients' survival.
    ``source``: where the cohort came from, for the messages."""
    lacking = [m.name for m in model_cfg.modalities if m.name not in cohort.inputs]
    if lacking:
        kept = [m for m in model_cfg.modalities if m.name in cohort.inputs]
        fix = (f"configure the model with the cohort's modalities only, e.g. {_fitting_modalities(model_cfg, cohort)}"
               ", or " if kept else "")
        raise ValueError(f"the model expects modalit{'ies' if len(lacking) > 1 else 'y'} "
                         f"{', '.join(map(repr, lacking))} but {source} has "
                         f"{list(cohort.inputs)}: {fix}write the store with every modality of the model (`pyimputmae "
                         "preprocess` without --modalities: a patient without a file counts as missing it)")
    for m in model_cfg.modalities:
        got = tuple(cohort.inputs[m.name].shape[1:])
        if got != m.shape:
            raise ValueError(f"modality {m.name!r}: {source} holds inputs of shape {got} per patient, the model "
                             f"expects {m.shape} (patch {m.patch}): configure the model for the data, e.g. "
                             f"{_fitting_modalities(model_cfg, cohort)}, or preprocess with the model's sizes")
    unknown = [n for n in cohort.inputs if n not in model_cfg.names]
    if unknown:
        raise ValueError(f"the cohort has modalities {unknown} the model does not know (configured: {model_cfg.names})")
    present = cohort.present.cpu().numpy()
    for m, name in enumerate(cohort.inputs):
        bad = nonfinite_rows(cohort.inputs[name])
        if len(bad):
            absent = bad[~present[bad, m]]
            which = (f"; {len(absent)} of them lack it (present is False): a missing modality's inputs must be "
                     "zeros, not NaN" if len(absent) else "")
            raise ValueError(f"modality {name!r} of {source} holds NaN or infinite values for {len(bad)} patient(s) "
                             f"({_listed(cohort, bad)}){which}. They would make every weight NaN: replace them "
                             "(e.g. by the training median) or mark the modality missing for those patients (zeros, "
                             "present False); a store written by `pyimputmae preprocess` has none")
    if len(train_idx) == 0:
        raise ValueError("the training split is empty")
    time, event, recorded = cohort.survival(train_idx)
    bad = train_idx[~(recorded & (time >= 0))]
    if len(bad):
        first = int(np.flatnonzero(train_idx == bad[0])[0])
        raise ValueError(f"{len(bad)} patient(s) of the training split of {source} have no usable survival "
                         f"({_listed(cohort, bad)}; the first: time {time[first]}, event {event[first]}): training "
                         "needs a time ≥ 0 and an event of 0 or 1 for every training patient; mark patients without "
                         "follow-up 'test' (or drop them)")
    if event.sum() == 0:
        raise ValueError(f"no patient of the training split ({len(train_idx)} patients) has an event: "
                         "survival cannot be learned")
    never = [name for m, name in enumerate(cohort.inputs) if not present[train_idx, m].any()]
    if never:
        warnings.warn(f"{source}: no patient of the training split ({len(train_idx)} patients) has modality "
                      f"{' or '.join(map(repr, never))}: the model cannot learn to read or impute it, and it is "
                      "treated as missing for every patient", RuntimeWarning, stacklevel=3)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``TrainConfig.amp`` on ``device`` (None: full precision).

    ``"auto"``: off on the CPU; on a CUDA GPU bf16 where it has native bf16 (compute capability 8.0,
    A100, and newer), else fp16 (V100, T4: bf16 there is emulated, slow, and Triton cannot use it
    on the tensor cores); fp16 trains with loss scaling (``torch.amp.GradScaler``)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not _native_bf16(device):
        return torch.float16
    return torch.bfloat16


def _precision_name(dtype: torch.dtype | None) -> str:
    """How a checkpoint names the autocast dtype a run trains in."""
    return {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def _native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def _lr_lambda(total: int, warmup: int, base: float, floor: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return (floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * progress))) / base
    return f


def _epoch_order(seed: int, stage: str, epoch: int, idx: np.ndarray) -> np.ndarray:
    """The data order of an epoch: a permutation fixed by (seed, stage, epoch), so a resumed run
    sees the same batches without storing a generator."""
    rs = np.random.default_rng([seed, STAGES.index(stage), epoch])
    return idx[rs.permutation(len(idx))]


class _Logger:
    """JSONL metrics log (+ optional TensorBoard), rewritten from the checkpoint's history on resume."""

    def __init__(self, path: Path, history: list[dict], tensorboard_dir: Path | None) -> None:
        self.path, self.history = path, history
        # replaced whole (a run killed while writing it leaves the previous file, not a cut one)
        atomic_write_text(path, "".join(checkpoint.json_text(rec) + "\n" for rec in history))
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(checkpoint.json_text(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record['stage']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _Window:
    """The optimizer steps since the last log record: the mean loss of their batches, each extra
    (pre-training's per-modality losses) averaged over the batches where it is not NaN (a modality
    no row of the batch has), and patients/s. Sums stay on the device until :meth:`record`;
    :meth:`state` / ``saved`` carry them through a checkpoint, elapsed time included."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.device = device
        self.loss = torch.tensor(float(saved.get("loss_sum", 0.0)), device=device)
        self.n, self.patients = int(saved.get("n", 0)), int(saved.get("patients", 0))
        self.parts = {k: (torch.tensor(float(v[0]), device=device), torch.tensor(float(v[1]), device=device))
                      for k, v in saved.get("parts", {}).items()}
        self.t0 = time.perf_counter() - float(saved.get("seconds", 0.0))

    def add(self, loss: torch.Tensor, extras: dict[str, torch.Tensor], patients: int) -> None:
        self.loss += loss.float()
        self.n += 1
        self.patients += patients
        for k, v in extras.items():
            if k not in self.parts:  # (created once, not on every step)
                self.parts[k] = (torch.zeros((), device=self.device), torch.zeros((), device=self.device))
            total, count = self.parts[k]
            counted = ~torch.isnan(v)
            total += torch.where(counted, v.float(), 0.0)
            count += counted

    def record(self) -> dict[str, float]:
        """The log record's figures (one host sync for all of them)."""
        names = list(self.parts)
        values = torch.stack([self.loss, *(t for k in names for t in self.parts[k])]).tolist()
        rec = {"loss": values[0] / max(self.n, 1),
               "patients_per_s": self.patients / max(time.perf_counter() - self.t0, 1e-9)}
        for i, k in enumerate(names):
            total, count = values[1 + 2 * i], values[2 + 2 * i]
            if count > 0:
                rec[k] = total / count
        return rec

    def state(self) -> dict[str, Any]:
        return {"loss_sum": float(self.loss), "n": self.n, "patients": self.patients,
                "seconds": time.perf_counter() - self.t0,
                "parts": {k: [float(t), float(c)] for k, (t, c) in self.parts.items()}}


# ----------------------------------------------------------------------------------- stopping
class TrainingInterrupted(KeyboardInterrupt):
    """:func:`train` was stopped by SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler's time
    limit or pre-emption) after writing a checkpoint at the batch it had reached; ``resume=True``
    continues from there. ``signal``: the signal's name; ``checkpoint``: the file, or None when it
    came before any training."""

    def __init__(self, message: str, signal: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signal, self.checkpoint = signal, checkpoint


class StopRequests:
    """SIGINT and SIGTERM while :func:`train` runs (in the main thread; elsewhere signals keep their
    handlers). The first one asks the loop to stop at the next batch boundary, after a checkpoint;
    a second SIGINT stops at once (the checkpoint is then the last periodic one)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, checkpoint_path: Path | None = None) -> None:
        self.signal: str | None = None
        self.checkpoint_path = checkpoint_path
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                previous = signal.getsignal(number)
                # left alone: a signal ignored (a background job's SIGINT) or handled outside Python
                # (an embedding host's, which getsignal reports as None and could not be put back)
                if previous is None or previous == signal.SIG_IGN:
                    continue
                self._previous[number] = previous
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            try:
                signal.signal(number, handler)
            except (TypeError, ValueError, OSError) as err:  # never mask what is propagating
                warnings.warn(f"could not restore the handler of signal {number}: {err}", RuntimeWarning, stacklevel=2)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self.signal is not None:
            if name == "SIGINT":
                raise KeyboardInterrupt  # a second Ctrl-C: at once
            return
        self.signal = name
        try:  # (no stderr under pythonw; a write it interrupts may refuse a reentrant one)
            print(f"\npyimputmae train: {name} received: stopping after this batch, once a checkpoint is written "
                  "(Ctrl-C again stops at once, from the last periodic checkpoint)", file=sys.stderr, flush=True)
        except (AttributeError, OSError, RuntimeError, ValueError):
            pass

    def requested(self) -> bool:
        return self.signal is not None

    def check(self, where: str, saved: bool) -> None:
        """Raise :class:`TrainingInterrupted` if a stop was asked for; ``saved``: the checkpoint holds
        the run up to ``where``."""
        if self.signal is None:
            return
        path = str(self.checkpoint_path) if saved and self.checkpoint_path else None
        if path:
            message = (f"stopped by {self.signal} at {where}; checkpoint {path} holds everything so far: "
                       "resume=True (pyimputmae train --resume) continues from there")
        else:
            message = f"stopped by {self.signal} before training started: nothing to save"
        raise TrainingInterrupted(message, self.signal, path)


# ----------------------------------------------------------------------------------- stages
@dataclass
class _Position:
    stage: str
    epoch: int = 0
    batch: int = 0  # next batch of the epoch
    step: int = 0  # optimizer steps taken in this stage
    micro: int = 0  # micro-batches accumulated since the last optimizer step


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device,
                   graph: bool = False) -> torch.optim.Optimizer:
    """train()'s AdamW: betas (0.9, 0.95), weight decay on the matrices only (not on biases, norms,
    tokens); fused on the GPU (and for ``graph``), torch's default on the CPU (its per-tensor loop);
    ``capturable`` for a step captured in a CUDA graph (``graph`` on a CUDA device)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **optimizer_mode(device, graph))


def optimizer_mode(device: torch.device, graph: bool) -> dict[str, bool]:
    """:func:`make_optimizer`'s implementation flags: ``{"fused", "capturable"}``."""
    cuda = device.type == "cuda"
    return {"fused": cuda or graph, "capturable": graph and cuda}


def set_optimizer_mode(opt: torch.optim.Optimizer, fused: bool, capturable: bool) -> None:
    """Give ``opt``'s groups these implementation flags, with step counts where they need them (on
    the parameters' device, float32, for fused or capturable): ``load_state_dict`` brings back the
    flags of the optimizer that wrote the checkpoint, which may have stepped another way (on the
    CPU, without the graph, or in it)."""
    for group in opt.param_groups:
        group["fused"], group["foreach"], group["capturable"] = fused, None, capturable
    if fused or capturable:
        for p, state in opt.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device, torch.float32)


class _Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, cohort: Cohort, device: torch.device,
                 saved: dict | None, identity: dict[str, Any]) -> None:
        self.cfg, self.model_cfg, self.cohort, self.device = cfg, model_cfg, cohort, device
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / checkpoint.RUN_FILES[0]
        self.amp = amp_dtype(cfg.amp, device)
        self.saved, self.identity = saved, identity  # the checkpoint being resumed (None: a new run)
        self._restored_window: dict[str, Any] | None = None
        self.stop = StopRequests(self.ckpt_path)  # SIGINT / SIGTERM while it trains (installed by _train)
        self.history: list[dict] = list(saved["history"]) if saved else []
        tb = self.out / "tensorboard" if cfg.tensorboard else None
        self.logger = _Logger(self.out / "metrics.jsonl", self.history, tb)

    def _graphed(self, stage: str) -> bool:
        """Does ``stage`` step through :mod:`pyimputmae._graph_step` (pre-training with ``cuda_graph``:
        one CUDA graph on a CUDA device; the same step without a graph on the CPU, which only the tests
        ask for, :data:`GRAPH_STEP_WITHOUT_CUDA`), rather than step by step?"""
        return (self.cfg.cuda_graph and stage == "pretrain"
                and (self.device.type == "cuda" or GRAPH_STEP_WITHOUT_CUDA))

    def _save(self, pos: _Position, model: nn.Module, opt, sched, scaler, rng: torch.Tensor | None,
              window: dict[str, Any] | None = None) -> None:
        """Write the checkpoint of ``pos``; ``window``: the steps since the last log record (their
        summed loss, count and patients), so that a resumed run logs the same record."""
        grads = None
        if pos.micro:
            # saved unscaled (fp16's loss scale is a power of two: exact): with amp="auto", a resume on
            # another GPU may run another precision
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            grads = {n: p.grad.detach().cpu() / scale for n, p in model.named_parameters() if p.grad is not None}
        state = {
            "version": __version__,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_cfg.to_dict(),
            "cohort": self.identity,
            "position": dataclasses.asdict(pos),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),  # fp16's loss scale ({} when amp is not fp16)
            "precision": _precision_name(self.amp),  # what amp resolved to on this device
            "mask_rng": None if rng is None else rng.detach().cpu(),
            "rng": checkpoint.rng_state(),
            "partial_grads": grads,
            "window": window,
            "history": self.history,
            "saved_at": time.time(),
        }
        checkpoint.atomic_save(state, self.ckpt_path)

    def _restore(self, stage: str, model: nn.Module, opt, sched, scaler,
                 rng: torch.Tensor | None) -> _Position | None:
        s = self.saved
        if s is None or s["position"]["stage"] != stage:
            return None
        now = _precision_name(self.amp)
        if s.get("precision", now) != now:  # amp="auto" on another device (none saved before this was)
            warnings.warn(f"{self.ckpt_path}: the run so far trained in {s['precision']}, this resume trains in {now} "
                          f"(amp={self.cfg.amp!r} on {self.device}); set amp to keep one precision",
                          RuntimeWarning, stacklevel=3)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        if scaler.is_enabled() and s.get("scaler"):  # none saved: a run without fp16 (or before it existed)
            scaler.load_state_dict(s["scaler"])
        if rng is not None and s["mask_rng"] is not None:
            rng.copy_(s["mask_rng"].to(rng.device))
        if s["partial_grads"]:
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            for n, p in model.named_parameters():
                if n in s["partial_grads"]:
                    p.grad = s["partial_grads"][n].to(p.device) * scale
        checkpoint.set_rng_state(s["rng"])
        self._restored_window = s.get("window")  # (none in checkpoints written before it was saved)
        self.saved = None
        return _Position(**s["position"])

    def _batches(self, stage: str, idx: np.ndarray, batch_size: int,
                 pos: _Position) -> Iterator[tuple[int, int, np.ndarray]]:
        n_batches = math.ceil(len(idx) / batch_size)
        epochs = self.cfg.pretrain_epochs if stage == "pretrain" else self.cfg.finetune_epochs
        for epoch in range(pos.epoch, epochs):
            order = _epoch_order(self.cfg.seed, stage, epoch, idx)
            start = pos.batch if epoch == pos.epoch else 0
            for b in range(start, n_batches):
                yield epoch, b, order[b * batch_size:(b + 1) * batch_size]

    def run_stage(self, stage: str, model: nn.Module, idx: np.ndarray, step_loss, rng: torch.Tensor | None) -> None:
        """The loop shared by both stages. ``step_loss(batch) -> (loss, extras)``."""
        cfg = self.cfg
        pre = stage == "pretrain"
        bs = cfg.pretrain_batch_size if pre else cfg.finetune_batch_size
        epochs = cfg.pretrain_epochs if pre else cfg.finetune_epochs
        lr = cfg.pretrain_lr if pre else cfg.finetune_lr
        params = [p for p in model.parameters() if p.requires_grad]
        graph = self._graphed(stage)
        opt = make_optimizer(params, lr, cfg.pretrain_weight_decay if pre else cfg.finetune_weight_decay, self.device,
                             graph)
        steps_per_epoch = math.ceil(math.ceil(len(idx) / bs) / cfg.grad_accum)
        total = max(1, epochs * steps_per_epoch)
        warmup = round((cfg.pretrain_warmup_epochs if pre else cfg.finetune_warmup_epochs) * steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(total, warmup, lr, cfg.pretrain_min_lr if pre else cfg.finetune_min_lr))
        # fp16 autocast needs loss scaling (its range loses small gradients); disabled, every call passes through
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        pos = self._restore(stage, model, opt, sched, scaler, rng) or _Position(stage)
        set_optimizer_mode(opt, **optimizer_mode(self.device, graph))  # a checkpoint brings back its own
        n_batches = math.ceil(len(idx) / bs)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs * n_batches, initial=pos.epoch * n_batches + pos.batch, desc=stage,
                       unit="batch", dynamic_ncols=True, mininterval=0.5)
        model.train()
        # the steps since the last log record (restored from the checkpoint being resumed): the
        # running sums stay on the device, one host sync per log record, not per step
        window = _Window(self.device, self._restored_window)
        self._restored_window = None

        self.stop.check(f"the start of {stage} epoch {pos.epoch} batch {pos.batch}", saved=self.ckpt_path.exists())
        first_step = True
        # cuda_graph: the whole step (forward to optimizer and RNG advance) is one replay; grad_accum
        # is 1 and amp not fp16 there (TrainConfig.validate, _train), so every batch is an optimizer
        # step. Its buffers hold a batch, or the whole split when that is smaller
        graphed = GraphedStep(opt, params, step_loss, rng, self.amp, cfg.grad_clip, min(bs, len(idx)),
                              self.device) if graph else None
        try:
            for epoch, b, rows in self._batches(stage, idx, bs, pos):
                if graphed is not None:  # the rows gathered straight into the graph's static inputs
                    loss, extras = graphed.step_rows(self.cohort, rows)
                else:
                    batch = self.cohort.batch(rows).to(self.device, non_blocking=True)
                    with torch.autocast(self.device.type, self.amp, enabled=self.amp is not None):
                        loss, extras = step_loss(batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                    # drop the graph now, not when the next forward reassigns these: masked_mse keeps its
                    # (pred-sized) gradient on the graph, which would otherwise live through that forward
                    loss, extras = loss.detach(), {k: v.detach() for k, v in extras.items()}
                    if rng is not None:
                        advance_rng_(rng)
                pos.micro += 1
                window.add(loss, extras, len(rows))
                last_of_epoch = b == n_batches - 1
                if pos.micro == cfg.grad_accum or last_of_epoch:
                    if graphed is None:
                        if cfg.grad_clip:
                            scaler.unscale_(opt)  # clip the true gradients (a no-op without fp16)
                            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        scaler.step(opt)  # fp16: skipped when a gradient is inf/NaN, and the scale lowered
                        scaler.update()
                    if first_step:
                        # a step fp16's GradScaler skipped still advances the schedule, as it does on the GPU,
                        # where the fused optimizer skips inside its kernel; torch checks a scheduler's first
                        # step only and would warn that opt.step() was not called
                        with warnings.catch_warnings():
                            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                            sched.step()
                        first_step = False
                    else:
                        sched.step()
                    if graphed is None:  # (the graph's gradients are its own, rewritten by every replay)
                        opt.zero_grad(set_to_none=True)
                    pos.micro = 0
                    pos.step += 1
                pos.epoch, pos.batch = (epoch + 1, 0) if last_of_epoch else (epoch, b + 1)
                if bar is not None:
                    bar.update(1)
                if pos.micro == 0 and (pos.step % cfg.log_every == 0 or last_of_epoch):
                    rec = {"stage": stage, "epoch": epoch, "step": pos.step, **window.record(),
                           "lr": sched.get_last_lr()[0]}
                    if scaler.is_enabled():
                        rec["loss_scale"] = scaler.get_scale()
                    self.logger.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", pps=f"{rec['patients_per_s']:.0f}")
                    window = _Window(self.device)
                saved = pos.micro == 0 and pos.step % cfg.checkpoint_every == 0
                if saved:
                    self._save(pos, model, opt, sched, scaler, rng, window.state())
                if self.stop.requested():  # SIGINT / SIGTERM: stop here, at a batch boundary, with nothing lost
                    if bar is not None:
                        bar.close()
                    if not saved:
                        self._save(pos, model, opt, sched, scaler, rng, window.state())
                    self.stop.check(f"{stage} epoch {pos.epoch} batch {pos.batch}", saved=True)
        finally:
            # the graph's gradients live in its memory (a stop or an error must not leave them on
            # the parameters, where the next stage's or a caller's backward would add to them)
            if graphed is not None:
                graphed.release()
        if bar is not None:
            bar.close()
        pos = _Position(stage, epoch=epochs, batch=0, step=pos.step, micro=0)
        self._save(pos, model, opt, sched, scaler, rng)

    def completed(self, stage: str) -> bool:
        """Was ``stage`` already finished by the run being resumed?"""
        s = self.saved
        if s is None:
            return False
        saved_stage = s["position"]["stage"]
        if STAGES.index(saved_stage) > STAGES.index(stage):
            return True
        epochs = self.cfg.pretrain_epochs if stage == "pretrain" else self.cfg.finetune_epochs
        return saved_stage == stage and s["position"]["epoch"] >= epochs and s["position"]["batch"] == 0


def _draw_figures(out: Path, history: list[dict], model: nn.Module | None, cohort: Cohort,
                  test_idx: np.ndarray) -> dict[str, str]:
    """training_curves.png (the losses, learning rate and fp16 loss scale by step) and, after
    fine-tuning, risk_groups.png (Kaplan–Meier curves of the test patients by predicted risk, when
    the test split has deaths among at least 4 patients). A figure that cannot be drawn is a
    warning: the model and metrics are already written."""
    from . import plots

    drawn: dict[str, str] = {}
    jobs = [("training_curves", lambda path: plots.plot_history(history, path))] if history else []
    events = float(cohort.event[torch.as_tensor(test_idx, device=cohort.event.device)].sum()) if len(test_idx) else 0
    if model is not None and len(test_idx) >= 4 and events > 0:
        jobs.append(("risk_groups", lambda path: plots.plot_risk_groups(model, cohort, test_idx, path)))
    for name, draw in jobs:
        path = out / f"{name}.png"
        try:
            result = draw(path)
        except Exception as err:  # a figure must not cost the finished run
            warnings.warn(f"{path}: could not draw the figure ({type(err).__name__}: {err}); the model and "
                          "metrics are written", RuntimeWarning, stacklevel=3)
            continue
        if isinstance(result, dict) and "skipped" in result:
            warnings.warn(f"{path}: not drawn: {result['skipped']}", RuntimeWarning, stacklevel=3)
        else:
            drawn[name] = str(path)
    return drawn


# ----------------------------------------------------------------------------------- public
def train(config: TrainConfig | str | os.PathLike | Mapping[str, Any] | None = None, *,
          cohort: Cohort | None = None, **overrides: Any) -> TrainResult:
    """Pre-train and fine-tune impuTMAE; evaluate on every split; write the model and logs.

    config: a :class:`TrainConfig`, a YAML/JSON path or a dict; ``overrides``: any TrainConfig field.
    cohort: an in-memory :class:`Cohort` to use instead of ``config.data`` / the synthetic one.
    Outputs in ``out_dir``: ``model.pt`` (for :func:`load`), ``metrics.json``, ``metrics.jsonl``
    (the history), ``config.json``, ``checkpoints/last.pt``, and the figures ``training_curves.png``
    and (after fine-tuning, when the test split has deaths) ``risk_groups.png``. Everything that can be checked before
    training (settings, out_dir, cohort, model, the checkpoint to resume, ``pretrain_from``) is
    checked before anything is written. torch's thread count and deterministic-algorithms mode,
    which ``num_threads`` / ``deterministic`` set, are restored when it returns. While it trains (in
    the main thread) it handles SIGINT and SIGTERM itself: the first stops the run at the next batch
    boundary after a checkpoint and raises :class:`TrainingInterrupted` (``resume=True`` continues,
    losing nothing); a second Ctrl-C stops at once. Signals that are ignored or handled outside
    Python are left alone.
    """
    cfg = TrainConfig.load(config, **overrides)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(cfg, cohort)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(cfg: TrainConfig, cohort: Cohort | None) -> TrainResult:
    check_single_process(cfg.out_dir)
    model_cfg, clinical_set = resolve_model(cfg)
    frozen = [n for n, blocks in model_cfg.trainable_blocks().items() if blocks != -1]
    if cfg.finetune and not pretrains(cfg) and frozen:
        warnings.warn(f"nothing is pre-trained (pretrain=False or pretrain_epochs=0, and no pretrain_from), but the "
                      f"configured freeze={model_cfg.freeze!r} keeps the randomly initialised encoder(s) of "
                      f"{', '.join(map(repr, frozen))} partly or wholly frozen during fine-tuning, where they will not "
                      "learn; set freeze='none' (model_overrides={'freeze': 'none'}, --set model.freeze='\"none\"') "
                      "to train them", RuntimeWarning, stacklevel=3)
    device = device_for(cfg.device)
    if cfg.cuda_graph and device.type != "cuda" and not GRAPH_STEP_WITHOUT_CUDA:
        warnings.warn(f"cuda_graph=True has no effect on {device}: CUDA graphs need a CUDA GPU; pre-training runs "
                      "step by step", RuntimeWarning, stacklevel=3)
    elif cfg.cuda_graph and amp_dtype(cfg.amp, device) == torch.float16:
        raise ValueError(f"cuda_graph=True cannot capture fp16 training (amp={cfg.amp!r} on {device}, whose "
                         "GPU has no native bf16): its loss scaler checks every step's gradients on the host. "
                         "Set amp='off' (float32) or cuda_graph=False")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise MissingPackageError("tensorboard=True needs the tensorboard package: pip install tensorboard (or set "
                          "tensorboard=False; metrics.jsonl is written either way)")
    checkpoint.check_out_dir(cfg)
    pretrained = pretrained_state(cfg.pretrain_from, model_cfg) if cfg.pretrain_from else None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    checkpoint.seed_everything(cfg.seed)

    if cohort is None:
        cohort = load_cohort_for(cfg, model_cfg)
        source = cfg.data or f"synthetic data {cfg.synthetic or {}} (seed {cfg.seed})"
    else:
        source = "an in-memory cohort"
    model_cfg = clinical_features_for(model_cfg, cohort, clinical_set, cfg.finetune, source)
    train_idx, val_idx, test_idx = split_indices(cohort, cfg.val_fold)
    check_cohort(cohort, model_cfg, train_idx, source)
    identity = checkpoint.cohort_identity(cohort, source)
    out = Path(cfg.out_dir)
    saved = checkpoint.load_resume_state(cfg, out / checkpoint.RUN_FILES[0], model_cfg, identity)
    # every check passed: from here on files are written, by this run only (another one writing the
    # same out_dir, e.g. the same job started twice, is refused)
    with exclusive_use(out / checkpoint.LOCK_FILE, f"out_dir {out}",
                       "Wait for it to end (or stop it), or choose another out_dir."):
        if cfg.overwrite:
            checkpoint.remove_run_files(out)
        checkpoint.remove_stale_temporaries(out)  # a run killed while writing a checkpoint or the model
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json",
                          json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, indent=1))
        if device.type == "cuda" and cfg.data_on_device != "no":
            free, _ = torch.cuda.mem_get_info(device)
            if cfg.data_on_device == "yes" or cohort.nbytes() < 0.5 * free:
                cohort = cohort.to(device)

        trainer = _Trainer(cfg, model_cfg, cohort, device, saved, identity)
        with trainer.stop:  # Ctrl-C / SIGTERM: stop at a batch boundary with a checkpoint
            try:
                model, metrics = _run(cfg, model_cfg, cohort, device, trainer, pretrained, train_idx, val_idx, test_idx)
            finally:
                trainer.logger.close()
        paths = {"out_dir": str(out), "model": str(out / "model.pt"), "metrics": str(out / "metrics.json"),
                 "history": str(out / "metrics.jsonl"), "checkpoint": str(trainer.ckpt_path),
                 "config": str(out / "config.json")}
        save_model(model, paths["model"], metrics, cfg)
        atomic_write_text(paths["metrics"], checkpoint.json_text(metrics, indent=1))
        paths.update(_draw_figures(out, trainer.history, model if cfg.finetune else None, cohort, test_idx))
        return TrainResult(model=model, metrics=metrics, history=trainer.history, paths=paths, config=cfg)


def _pretrain_step(mae: ImputeMAE, batch: Any, rng: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pre-training's loss and its per-modality parts, a part NaN for a modality no row of the batch
    has (its loss is 0 by contract, which would pull the logged averages down)."""
    loss, parts = mae.forward_pretrain(batch, rng, check=False)
    order = list(batch.modalities)
    has = batch.present.any(0)
    missing = torch.full((), float("nan"), device=loss.device)
    return loss, {k: torch.where(has[order.index(k)], v.float(), missing) if k in order else missing
                  for k, v in parts.items()}


def _run(cfg: TrainConfig, model_cfg: ModelConfig, cohort: Cohort, device: torch.device, trainer: _Trainer,
         pretrained: dict | None, train_idx: np.ndarray, val_idx: np.ndarray,
         test_idx: np.ndarray) -> tuple[nn.Module, dict[str, dict[str, float]]]:
    """The stages and the evaluation: the trained model and its metrics per split."""
    mae = ImputeMAE(model_cfg).to(device)
    if pretrained is not None:
        mae.load_state_dict(pretrained)
    if cfg.pretrain and not trainer.completed("pretrain"):
        # a batch needs at least one modality: patients with clinical data only are left to fine-tuning
        has_any = cohort.present[torch.as_tensor(train_idx, device=cohort.present.device)].any(1).cpu().numpy()
        if not has_any.any():
            warnings.warn(f"no patient of the training split ({len(train_idx)} patients) has any of the modalities "
                          f"{list(cohort.inputs)}: there is nothing to pre-train on, pre-training is skipped",
                          RuntimeWarning, stacklevel=3)
        rng = new_rng(cfg.seed, device)
        trainer.run_stage("pretrain", mae, train_idx[has_any], lambda batch: _pretrain_step(mae, batch, rng), rng)
    elif trainer.completed("pretrain") and trainer.saved["position"]["stage"] == "pretrain":
        mae.load_state_dict(trainer.saved["model"])
        checkpoint.set_rng_state(trainer.saved["rng"])
        trainer.saved = None

    mae.preprocessing = model_preprocessing(cohort.attrs)  # what impute() and predict check a store against
    model: nn.Module = mae
    metrics: dict[str, dict[str, float]] = {}
    if cfg.finetune:
        surv = SurvivalModel(mae, model_cfg).to(device)
        surv.fit_preprocessing(cohort, train_idx)
        if not trainer.completed("finetune"):
            trainer.run_stage("finetune", surv, train_idx, lambda batch: (surv.loss(batch), {}), None)
        elif trainer.saved is not None:
            surv.load_state_dict(trainer.saved["model"])
        model = surv
    trainer.stop.check("the end of training, before evaluation", saved=trainer.ckpt_path.exists())
    if cfg.finetune:
        for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            if not len(idx):
                continue
            _, event, known = cohort.survival(idx)
            if event[known].sum() == 0:
                warnings.warn(f"the {split} split is not evaluated: none of its {len(idx)} patients "
                              f"{'with a recorded time and event ' if not known.all() else ''}has an event, so the "
                              f"C-index is undefined (metrics.json has no {split!r} entry)", RuntimeWarning,
                              stacklevel=3)
                continue
            if not known.all():
                warnings.warn(f"the {split} split is evaluated on the {int(known.sum())} of its {len(idx)} patients "
                              f"whose time and event are recorded ({_listed(cohort, idx[~known])} have none)",
                              RuntimeWarning, stacklevel=3)
            metrics[split] = evaluate_model(model, cohort, idx[known], check=False)  # fitted on it
    trainer.stop.check("the evaluation after training", saved=trainer.ckpt_path.exists())
    return model, metrics
