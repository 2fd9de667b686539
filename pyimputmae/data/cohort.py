"""The in-memory cohort every part of the package exchanges: tensors for all patients at once.

Cohorts in this field are small (the paper's 1,104 patients are about 2 GB at its per-patient
sizes), so training draws batches from a :class:`Cohort` held in memory — on the GPU when it
fits — instead of re-reading files. A cohort comes from ``pyimputmae.data.synthetic`` (the
built-in demo), or from a zarr store written by ``pyimputmae preprocess``
(``pyimputmae.data.store.load_cohort``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


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
        rows outside / inside that cross-validation fold for ``"train"`` / ``"val"``."""
        if fold is None:
            return np.flatnonzero(self.split == split)
        train = self.split == "train"
        if split == "train":
            return np.flatnonzero(train & (self.fold != fold))
        if split == "val":
            return np.flatnonzero(train & (self.fold == fold))
        return np.flatnonzero(self.split == split)

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        """Rows ``idx`` as a :class:`Batch` on the cohort's device."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.int64, device=self.present.device)
        return Batch(
            inputs={k: v.index_select(0, index) for k, v in self.inputs.items()},
            present=self.present.index_select(0, index),
            clinical=self.clinical.index_select(0, index),
            time=self.time.index_select(0, index),
            event=self.event.index_select(0, index),
            modalities=self.modalities,
            ids=[self.ids[i] for i in np.asarray(idx).tolist()],
        )

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
