"""The in-memory cohort every part of the package exchanges: tensors for all patients at once.

Cohorts in this field are small (the paper's 1,104 patients are about 2 GB at its per-patient
sizes), so training draws batches from a :class:`Cohort` held in memory — on the GPU when it
fits — instead of re-reading files. A cohort comes from ``pyimputmae.data.synthetic`` (the
built-in demo), or from a zarr store written by ``pyimputmae preprocess``
(``pyimputmae.data.store.load_cohort``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

#: the split names a cohort may use
SPLITS = ("train", "val", "test")


def split_rows(splits: np.ndarray, folds: np.ndarray, split: str, fold: int | None = None) -> np.ndarray:
    """Row indices of ``split`` given every patient's split name and fold (:meth:`Cohort.indices`,
    and :func:`pyimputmae.data.store.make_dataloader` on a store's table): ValueError for a split
    name outside :data:`SPLITS` or a ``fold`` no training patient has."""
    splits, folds = np.asarray(splits), np.asarray(folds)
    if split not in SPLITS:
        have = sorted({str(s) for s in splits.tolist()})
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)} (this cohort has "
                         f"{', '.join(have) or 'no patients'})")
    train = splits == "train"
    if fold is None:
        return np.flatnonzero(splits == split)
    known = sorted({int(f) for f in folds[train].tolist()} - {-1})
    if fold not in known:
        have = (f"its training folds are {', '.join(map(str, known))}" if known
                else "it has no folds (fold is -1 for every training patient)")
        raise ValueError(f"fold {fold} is not a cross-validation fold of this cohort: {have}")
    if split == "train":
        return np.flatnonzero(train & (folds != fold))
    if split == "val":
        return np.flatnonzero(train & (folds == fold))
    return np.flatnonzero(splits == split)


@dataclass
class Batch:
    """One mini-batch, as the model consumes it.

    inputs: modality name → ``(B, C, *S)`` float tensor (zeros where the patient lacks it);
    present: ``(B, M)`` bool in ``modalities`` order; clinical: ``(B, n_clinical)`` float32, NaN
    where a value is unknown (the model imputes with training medians + missing indicators);
    time: ``(B,)`` float32 in the data's unit (years); event: ``(B,)`` float32 (1 = death).
    """

    inputs: dict[str, torch.Tensor]
    present: torch.Tensor
    clinical: torch.Tensor
    time: torch.Tensor
    event: torch.Tensor
    modalities: tuple[str, ...]
    ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            inputs={k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
            present=self.present.to(device, non_blocking=non_blocking),
            clinical=self.clinical.to(device, non_blocking=non_blocking),
            time=self.time.to(device, non_blocking=non_blocking),
            event=self.event.to(device, non_blocking=non_blocking),
            modalities=self.modalities,
            ids=self.ids,
        )

    @property
    def size(self) -> int:
        return int(self.present.shape[0])


@dataclass
class Cohort:
    """All patients of a study.

    inputs: modality name → ``(N, C, *S)`` float tensor, zeros where missing;
    present: ``(N, M)`` bool; clinical: ``(N, n_clinical)`` float32 with NaN for unknown values;
    clinical_names: column names; time, event: ``(N,)`` float32; split: ``(N,)`` array of
    ``"train"``/``"val"``/``"test"``; fold: ``(N,)`` int (−1 where none); ids: patient ids;
    attrs: provenance and the preprocessing fitted on the training split.
    """

    inputs: dict[str, torch.Tensor]
    present: torch.Tensor
    clinical: torch.Tensor
    clinical_names: list[str]
    time: torch.Tensor
    event: torch.Tensor
    split: np.ndarray
    fold: np.ndarray
    ids: list[str]
    attrs: dict = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def __len__(self) -> int:
        return int(self.present.shape[0])

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, t in self.inputs.items():
            if t.shape[0] != n:
                raise ValueError(f"modality {name!r} has {t.shape[0]} rows for {n} patients")
        if self.present.shape != (n, len(self.inputs)):
            raise ValueError(f"present must be ({n}, {len(self.inputs)}), got {tuple(self.present.shape)}")
        for name, t in (("clinical", self.clinical), ("time", self.time), ("event", self.event)):
            if t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows for {n} patients")
        if len(self.split) != n or len(self.fold) != n:
            raise ValueError(f"split/fold must have {n} entries")

    def indices(self, split: str, fold: int | None = None) -> np.ndarray:
        """Row indices of a split (``"train"``, ``"val"``, ``"test"``); with ``fold``, the training
        rows outside / inside that cross-validation fold for ``"train"`` / ``"val"``.

        A split of another name, or a ``fold`` no training patient has, is a ValueError (not an
        empty selection, or the whole training split, that would go unnoticed); a known split
        without patients (``"val"`` when the manifest has none) is an empty array."""
        return split_rows(self.split, self.fold, split, fold)

    def survival(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(time, event, recorded)`` of rows ``idx`` (int row numbers) as numpy; ``recorded``: a
        finite time and an event of 0 or 1 (new patients may have no follow-up)."""
        rows = torch.as_tensor(idx, device=self.event.device)
        time, event = self.time[rows].cpu().numpy(), self.event[rows].cpu().numpy()
        return time, event, np.isfinite(time) & np.isin(event, (0.0, 1.0))

    def rows(self, idx: np.ndarray | torch.Tensor | list[int] | None = None, what: str = "idx") -> np.ndarray:
        """``idx`` as int64 row numbers: None → every row; integers (numpy, torch or a list) as
        they are; a boolean mask of one entry per patient → the rows where it is True (as numpy
        indexing reads it). ValueError naming ``what`` for anything else — floats, a mask of
        another length, a row outside ``[0, N)`` — rather than rows silently misread (a boolean
        mask cast to integers would select rows 0 and 1)."""
        if idx is None:
            return np.arange(len(self))
        arr = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        n = len(self)
        if arr.dtype == np.bool_:
            if arr.shape != (n,):
                raise ValueError(f"{what} is a boolean mask of shape {arr.shape}, but the cohort has {n} patients: "
                                 f"give one True/False per patient, or row numbers")
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be integer row numbers or a boolean mask, got dtype {arr.dtype} "
                             f"(first entry {arr.reshape(-1)[0].item()!r})")
        if arr.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise ValueError(f"{what} has row {int(bad[0])}, outside the cohort's {n} rows (0 to {n - 1})")
        return arr.astype(np.int64, copy=False)

    def batch(self, idx: np.ndarray | torch.Tensor, out: Batch | None = None) -> Batch:
        """Rows ``idx`` (as :meth:`rows` reads them) as a :class:`Batch` on the cohort's device.

        out: buffers to write the rows into instead (a :class:`Batch` of this cohort's modalities,
        each tensor with at least ``len(idx)`` rows and the cohort's row shape and dtype, on any
        device): the rows fill their first ``len(idx)`` rows — gathered straight into them when they
        are on the cohort's device, else gathered here and copied (``non_blocking``) — and the
        returned Batch holds views of those rows. Nothing batch-sized is allocated on ``out``'s
        device (``train(cuda_graph=True)`` fills its captured step's static inputs this way)."""
        idx = self.rows(idx)
        index = torch.as_tensor(idx, dtype=torch.int64, device=self.present.device)
        if out is not None and tuple(out.modalities) != tuple(self.modalities):
            raise ValueError(f"out holds modalities {', '.join(out.modalities)}, but the cohort's are "
                             f"{', '.join(self.modalities)}")
        n = len(idx)

        def take(name: str, src: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
            if dst is None:
                return src.index_select(0, index)
            if dst.shape[1:] != src.shape[1:] or dst.dtype != src.dtype or dst.shape[0] < n:
                raise ValueError(f"out's {name} is {tuple(dst.shape)} {dst.dtype}: it must hold {n} rows of the "
                                 f"cohort's {name}, {tuple(src.shape[1:])} {src.dtype}")
            rows = dst[:n]
            if dst.device == src.device and rows.is_contiguous():
                torch.index_select(src, 0, index, out=rows)
            else:
                rows.copy_(src.index_select(0, index), non_blocking=True)
            return rows

        def field(name: str) -> torch.Tensor:
            return take(name, getattr(self, name), getattr(out, name) if out is not None else None)

        return Batch(
            inputs={k: take(f"inputs[{k!r}]", v, out.inputs[k] if out is not None else None)
                    for k, v in self.inputs.items()},
            present=field("present"),
            clinical=field("clinical"),
            time=field("time"),
            event=field("event"),
            modalities=self.modalities,
            ids=[self.ids[i] for i in idx.tolist()],
        )

    def withhold(self, modalities: str | Iterable[str], rows: np.ndarray | torch.Tensor | None = None) -> Cohort:
        """A copy in which ``modalities`` are missing for ``rows`` (default: every patient), as if
        preprocessing had found none: ``present`` False and the inputs zeros there — the evaluation
        of a model with modalities held out at test time, or of imputation fidelity (hide what a
        patient has, impute it, compare with this cohort's inputs).

        modalities: a name or names of the cohort's modalities (ValueError naming the known ones
        otherwise); rows: as :meth:`rows` reads them. To keep only some modalities, withhold the
        others: ``cohort.withhold(set(cohort.modalities) - {"rna"})``. This cohort is not changed;
        the copy shares its tensors except ``present`` and the withheld modalities' inputs."""
        names = [modalities] if isinstance(modalities, str) else list(modalities)
        unknown = [n for n in names if n not in self.inputs]
        if unknown:
            raise ValueError(f"cannot withhold modality {unknown[0]!r}: the cohort has "
                             f"{', '.join(self.modalities)}")
        picked = self.rows(rows, what="rows")
        index = torch.as_tensor(picked, dtype=torch.int64, device=self.present.device)
        present, inputs = self.present.clone(), dict(self.inputs)
        for name in dict.fromkeys(names):
            present[index, self.modalities.index(name)] = False
            inputs[name] = inputs[name].clone()
            inputs[name][index] = 0
        return dataclasses.replace(self, inputs=inputs, present=present)

    def to(self, device: torch.device | str) -> Cohort:
        return Cohort(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            present=self.present.to(device),
            clinical=self.clinical.to(device),
            clinical_names=list(self.clinical_names),
            time=self.time.to(device),
            event=self.event.to(device),
            split=self.split,
            fold=self.fold,
            ids=list(self.ids),
            attrs=dict(self.attrs),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs.values())
