"""The settings a ``pyimputmae preprocess`` store is built with, and the report of a run.

:class:`PreprocessConfig` is part of the store's fingerprint and is saved with it as the fitted
preprocessing; :class:`PreprocessReport` is the summary printed at the end of a run and saved as
the store's report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fields import check_fields, reject_unknown
from .manifest import MODALITIES
from .mri import MriConfig
from .omics import OmicsConfig
from .wsi import WsiConfig


@dataclass
class PreprocessConfig:
    """Everything that shapes the store (part of its fingerprint and saved with it)."""

    modalities: tuple[str, ...] = MODALITIES
    rna: OmicsConfig = field(default_factory=OmicsConfig.rna)
    dnam: OmicsConfig = field(default_factory=OmicsConfig.dnam)
    wsi: WsiConfig = field(default_factory=WsiConfig)
    mri: MriConfig = field(default_factory=MriConfig)
    clinical_columns: list[str] | None = None
    codec: str = "lz4"

    def __post_init__(self) -> None:
        check_fields(self, "preprocessing setting ")
        for key, make in (("rna", OmicsConfig.rna), ("dnam", OmicsConfig.dnam), ("wsi", WsiConfig), ("mri", MriConfig)):
            if isinstance(getattr(self, key), Mapping):  # the settings of one part as a dict: built here
                setattr(self, key, make(**getattr(self, key)))
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"modalities must be among {MODALITIES}, got {self.modalities}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-patient shape ``(C, *S)`` of each modality."""
        all_shapes = {"rna": (1, self.rna.width), "dnam": (1, self.dnam.width),
                      "wsi": (3, self.wsi.tile_px, self.wsi.tile_px), "mri": (len(self.mri.sequences), *self.mri.crop)}
        return {m: all_shapes[m] for m in self.modalities}

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "rna": self.rna.to_dict(), "dnam": self.dnam.to_dict(),
                "wsi": self.wsi.to_dict(), "mri": self.mri.to_dict(), "clinical_columns": self.clinical_columns,
                "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; missing keys keep their defaults; unknown keys (also inside
        ``rna``/``dnam``/``wsi``/``mri``) and values of the wrong type are errors naming them. A single
        number as ``mri.crop`` is a cube, as with ``--mri-crop``."""
        reject_unknown(cls, d, "preprocessing settings")
        kw = dict(d)
        mri = kw.get("mri")
        if isinstance(mri, dict) and isinstance(mri.get("crop"), int | float) and not isinstance(mri["crop"], bool):
            kw["mri"] = {**mri, "crop": [mri["crop"]] * 3}
        return cls(**kw)  # __post_init__ checks the values and builds the parts given as dicts


@dataclass
class PreprocessReport:
    """What a run did. counts: modality → {"listed", "present", "missing", "failed"}; failures:
    ``(patient, modality, message)``; replaced: modality → NaN/Inf values set to training medians."""

    store: Path
    n_patients: int
    counts: dict[str, dict[str, int]]
    failures: list[tuple[str, str, str]]
    rejected: list[str]
    warnings: list[str]
    replaced: dict[str, int]
    resumed: int = 0
    processed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["store"] = str(self.store)
        d["failures"] = [list(f) for f in self.failures]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessReport:
        return cls(**{**d, "store": Path(d["store"]), "failures": [tuple(f) for f in d["failures"]]})

    def table(self) -> str:
        """The summary printed at the end of a run."""
        lines = [f"pyimputmae preprocess: {self.n_patients} patients → {self.store} ({self.seconds:.1f} s; "
                 f"{self.processed} processed, {self.resumed} already done)",
                 f"{'modality':<9}{'listed':>8}{'present':>9}{'missing':>9}{'failed':>8}"]
        for m, c in self.counts.items():
            lines.append(f"{m:<9}{c['listed']:>8}{c['present']:>9}{c['missing']:>9}{c['failed']:>8}")
        for m, n in self.replaced.items():
            if n:
                lines.append(f"{m}: {n} NaN/Inf or absent values set to training medians")
        for title, items in (("failures", [f"{p}  {m}  {e}" for p, m, e in self.failures]),
                             ("rejected manifest rows", self.rejected), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {x}" for x in items[:50]]
                if len(items) > 50:
                    lines.append(f"  … and {len(items) - 50} more")
        return "\n".join(lines)
