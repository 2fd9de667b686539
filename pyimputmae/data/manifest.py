"""The cohort manifest: one row per patient, validated, plus the clinical encoding fitted on it.

A manifest is a CSV/TSV (or parquet) table with columns

* ``patient_id`` — unique, compared ignoring case and TCGA barcodes by their case barcode
  (``TCGA-CS-4938-01A`` and ``TCGA-CS-4938`` are one patient) (aliases: ``case_id``,
  ``case_submitter_id``, ``submitter_id``, ``id``);
* ``time`` ≥ 0 in the data's own unit and ``event`` in {0, 1} (aliases: ``time_years``,
  ``survival_time``, ``duration``; ``status``, ``dead``);
* ``split`` in {train, val, test} (default: all ``train``; ``test`` when preprocessing new patients
  with a fitted store) and ``fold`` (``cv_fold``; empty = none);
* one path column per modality — ``rna``, ``dnam``, ``wsi``, ``mri`` (or ``<name>_path``); empty =
  the patient lacks it. Paths are relative to the manifest's folder. An omics path may pick a
  column (or row) of a cohort-level matrix with ``file.tsv#SAMPLE``; without ``#``, the patient id
  is used, or else the first label that is the id followed by a separator (a TCGA sample barcode
  ``TCGA-XX-XXXX-01A…`` for ``TCGA-XX-XXXX``; ``P1`` never picks ``P10``). MRI may also be given per
  sequence (``mri_t1``, ``mri_t1ce``, ``mri_t2``, ``mri_flair``) with ``mri_tumor_mask`` /
  ``mri_brain_mask``; ``mri`` itself may be a BraTS-style case folder;
* clinical columns: every other column unless ``clinical_columns`` names them (columns called
  ``has_*`` — availability flags — and the path columns of modalities left out of ``modalities``
  are never clinical by default). Empty cells and the usual
  placeholders (``NA``, GDC's ``'--``/``not reported``/``Unknown``, TCGA's ``[Not Available]``,
  ``[Unknown]``, ``[Discrepancy]``…: :data:`MISSING_MARKERS`) are unknown values — never a category
  of their own. A column whose known values are mostly (more than half) numbers stays numeric, one
  whose known values are mostly yes/no/true/false/1/0 stays yes/no: its other entries (text among
  numbers, a typo such as ``yse``) are named in a warning (an error under ``strict=True``) and read
  as unknown.

``time`` and ``event`` cells holding a missing-value marker (``'--``, ``Unknown``, ``[Not
Available]``…) are empty cells: allowed for new patients (``require_survival=False``), "missing"
otherwise. ``split`` and ``fold`` take no markers: an ``Unknown`` split or fold is rejected, not
quietly read as ``train`` or as no fold (which would put the patient in every training fold); only
an empty cell means the default split or no fold.

Problems are reported with the line of the file and the value: a row with a duplicated id, a
missing or negative time, or an event other than 0/1 is rejected (left out, with a warning) — or,
with ``strict=True``, every problem is raised together as a :class:`ManifestError`. A path that does
not exist counts as missing with a warning (an error under ``strict=True``).
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cohort import SPLITS

MODALITIES = ("rna", "dnam", "wsi", "mri")
MRI_ROLES = ("t1", "t1ce", "t2", "flair", "tumor_mask", "brain_mask")

_ALIASES = {
    "patient_id": ("patient_id", "patient", "case_id", "case_submitter_id", "submitter_id", "id"),
    "time": ("time", "time_years", "survival_time", "duration", "os_time"),
    "event": ("event", "status", "dead", "os_event"),
    "split": ("split",),
    "fold": ("fold", "cv_fold"),
}
_MRI_ALIASES = {"tumor_mask": ("tumor_mask", "tumour_mask", "seg"), "brain_mask": ("brain_mask",)}
_EMPTY = {"", "na", "nan", "none", "null", "n/a"}
#: clinical values read as unknown besides the empty ones above (case-insensitive): the placeholders
#: GDC exports (``'--``, ``not reported``, ``Unknown``) and TCGA BCR tables use (``[Not Available]``, …)
MISSING_MARKERS = frozenset({
    "'--", "--", "#n/a", "unknown", "not reported", "not available", "not applicable", "not evaluated",
    "[not available]", "[not applicable]", "[unknown]", "[discrepancy]", "[not evaluated]", "[not reported]",
    "[pending]",
})
_TRUE = {"yes", "true", "y", "1", "1.0"}
_FALSE = {"no", "false", "n", "0", "0.0"}
_YES_NO = _TRUE | _FALSE
_UNKNOWN = _EMPTY | MISSING_MARKERS


#: a TCGA barcode's case part (lower case): ``TCGA-CS-4938`` of the sample barcode ``TCGA-CS-4938-01A``
_TCGA_CASE = re.compile(r"(tcga-[a-z0-9]{2}-[a-z0-9]{4})(?:-|$)")


class ManifestError(ValueError):
    """The manifest cannot be used; the message lists every problem with its line and value."""


class ManifestWarning(UserWarning):
    """A row left out or a path counted as missing."""


@dataclass(frozen=True)
class Source:
    """Where one modality of one patient comes from.

    path: a file or folder; select: the column/row of a cohort-level omics matrix (``None`` = the
    patient id); parts: MRI role → path (``t1ce``, ``tumor_mask``, …) when given per column.
    """

    path: Path
    select: str | None = None
    parts: tuple[tuple[str, Path], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "select": self.select, "parts": {k: str(v) for k, v in self.parts}}


@dataclass
class Manifest:
    """A validated manifest: ``N`` accepted patients in file order.

    time, event: ``(N,)`` float64 (NaN only when survival was not required); split: ``(N,)`` str;
    fold: ``(N,)`` int64, −1 = none; clinical: raw clinical values, a pandas DataFrame of strings
    (``N`` rows); sources: modality → ``N`` entries of :class:`Source` or ``None`` (missing);
    lines: the file line of each patient; rejected / warnings: messages for the report;
    path_columns: modality → the manifest columns its paths were read from (none found: empty);
    columns: all the manifest's columns.
    """

    path: Path | None
    ids: list[str]
    time: np.ndarray
    event: np.ndarray
    split: np.ndarray
    fold: np.ndarray
    clinical: Any
    sources: dict[str, list[Source | None]]
    lines: list[int]
    sha256: str = ""
    rejected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    path_columns: dict[str, list[str]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.sources)


def _patient_key(pid: str) -> str:
    """What identifies a patient among the manifest's ids: the id ignoring case, and a TCGA barcode's case
    barcode (a sample barcode ``TCGA-CS-4938-01A`` and ``TCGA-CS-4938`` are one patient)."""
    key = pid.casefold()
    tcga = _TCGA_CASE.match(key)
    return tcga.group(1) if tcga else key


def _duplicate(where: str, pid: str, line: int, others: list[tuple[int, str]]) -> str:
    """The message for a row whose patient is also on the ``others`` (line, id) rows."""
    if all(o == pid for _, o in others):
        return f"{where}: duplicate patient id, also on line(s) {', '.join(str(x) for x, _ in others)}"
    tcga = _TCGA_CASE.match(pid.casefold())
    why = (f"barcodes of the same TCGA case {tcga.group(1).upper()!r}" if tcga
           else "ids that differ only in case")
    shown = ", ".join(f"{x} ({o!r})" for x, o in others)
    return f"{where}: duplicate patient, also on line(s) {shown}: {why} name one patient; keep one row per patient"


def _is_empty(value: Any, words: frozenset[str] | set[str] = _EMPTY) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip().lower() in words


def _shown(raw: Any) -> str:
    """`` ('--)`` — the text of a non-empty unknown cell, for a "missing" message; ``""`` for an empty one."""
    text = "" if raw is None else str(raw).strip()
    return f" ({text!r})" if text else ""


def _path_aliases(modality: str) -> dict[str, tuple[str, ...]]:
    """Role (``""``: the main path) → the column names it is read from, lower case."""
    aliases = {"": (modality, f"{modality}_path")}
    if modality == "mri":
        aliases.update({role: tuple(f"mri_{a}" for a in _MRI_ALIASES.get(role, (role,))) for role in MRI_ROLES})
    return aliases


def path_column_names(modality: str) -> list[str]:
    """The column names (case-insensitive) a modality's paths are read from."""
    return [n for names in _path_aliases(modality).values() for n in names]


def _find(columns: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if path.suffix == ".parquet":
        return _as_text(pd.read_parquet(path))
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment=None)


def _as_text(table: Any) -> Any:
    """A DataFrame's cells as text, a missing one (``None``, NaN, pandas' ``NA`` of nullable columns,
    ``NaT``) as an empty cell, never the text ``'<NA>'``."""
    return table.astype(object).where(table.notna(), "").astype(str).reset_index(drop=True)


def file_sha256(path: str | Path) -> str:
    """``sha256`` hex digest of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(
    manifest: str | Path | Any,
    *,
    modalities: tuple[str, ...] = MODALITIES,
    clinical_columns: list[str] | None = None,
    strict: bool = False,
    require_survival: bool = True,
    default_split: str = "train",
    clinical_fitted: dict[str, Any] | None = None,
) -> Manifest:
    """Read and validate a manifest file (or a pandas DataFrame, paths then relative to the cwd).

    Returns a :class:`Manifest` of the accepted rows. ``require_survival=False`` (new patients at
    prediction time) lets time/event be empty (NaN) but still checks the values that are given.
    A clinical column that is numeric (or yes/no) except for a few text entries keeps its kind;
    those entries are named in a warning (an error under ``strict``) and read as unknown.
    ``clinical_fitted``: the clinical encoding of a fitted store (:func:`fit_clinical`), whose
    column kinds are then checked instead of the kinds this manifest's values suggest.
    """
    import pandas as pd

    if isinstance(manifest, pd.DataFrame):
        table = _as_text(manifest)
        path, name, base = None, "manifest", Path.cwd()
        digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    else:
        path = Path(manifest).resolve()
        table, name, base, digest = _read_table(path), path.name, path.parent, file_sha256(path)
    table = table.rename(columns=lambda c: str(c).strip())
    columns = list(table.columns)
    col = {key: _find(columns, names) for key, names in _ALIASES.items()}
    problems: list[str] = []
    if col["patient_id"] is None:
        raise ManifestError(f"{name}: no patient id column (expected one of {', '.join(_ALIASES['patient_id'])}); "
                            f"columns: {', '.join(columns)}")
    for key in ("time", "event"):
        if col[key] is None and require_survival:
            raise ManifestError(f"{name}: no {key} column (expected one of {', '.join(_ALIASES[key])}); "
                                f"columns: {', '.join(columns)}")

    path_cols: dict[str, dict[str, str]] = {}
    for m in modalities:
        path_cols[m] = {role: c for role, names in _path_aliases(m).items() if (c := _find(columns, names))}
    used = {c for c in col.values() if c} | {c for cols in path_cols.values() for c in cols.values()}
    if clinical_columns is None:
        # the path columns of a modality left out of ``modalities`` are paths too, never clinical data
        paths = {n for m in MODALITIES for n in path_column_names(m)}
        clinical_columns = [c for c in columns if c not in used and c.lower() not in paths
                            and not c.lower().startswith("has_")]
    missing_clin = [c for c in clinical_columns if c not in columns]
    if missing_clin:
        raise ManifestError(f"{name}: clinical column(s) {missing_clin} not found; columns: {', '.join(columns)}")

    ids = [str(v).strip() for v in table[col["patient_id"]]]
    first_line: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        first_line.setdefault(_patient_key(pid), []).append(i + 2)
    bad_rows: dict[int, str] = {}
    accepted: list[int] = []
    times, events, splits, folds = [], [], [], []
    for i, pid in enumerate(ids):
        line = i + 2
        where = f"{name} line {line} (patient {pid!r})"
        reasons = []
        if pid == "" or pid.lower() in _EMPTY:
            reasons.append(f"{name} line {line}: empty patient id")
        elif len(lines := first_line[_patient_key(pid)]) > 1:
            reasons.append(_duplicate(where, pid, line, [(x, ids[x - 2]) for x in lines if x != line]))
        t = e = math.nan
        if col["time"] is not None:
            raw = table[col["time"]].iloc[i]
            if is_unknown(raw):
                if require_survival:
                    reasons.append(f"{where}: missing time{_shown(raw)}")
            else:
                try:
                    t = float(raw)
                except ValueError:
                    reasons.append(f"{where}: time {raw!r} is not a number")
                else:
                    if not math.isfinite(t) or t < 0:
                        reasons.append(f"{where}: time {raw!r} is negative or not finite")
        if col["event"] is not None:
            raw = table[col["event"]].iloc[i]
            if is_unknown(raw):
                if require_survival:
                    reasons.append(f"{where}: missing event{_shown(raw)}")
            elif str(raw).strip() in ("0", "1", "0.0", "1.0"):
                e = float(raw)
            else:
                reasons.append(f"{where}: event {raw!r} is not 0/1 (write 1 where the death was observed — e.g. "
                               "vital status Dead —, 0 where the patient was censored, e.g. Alive)")
        split = default_split
        if col["split"] is not None and not _is_empty(table[col["split"]].iloc[i]):
            split = str(table[col["split"]].iloc[i]).strip().lower()
            split = {"validation": "val", "valid": "val", "training": "train"}.get(split, split)
            if split not in SPLITS:
                reasons.append(f"{where}: split {table[col['split']].iloc[i]!r} is not one of {', '.join(SPLITS)}")
        fold = -1
        if col["fold"] is not None and not _is_empty(table[col["fold"]].iloc[i]):
            raw = table[col["fold"]].iloc[i]
            try:
                fold = int(float(raw))
            except ValueError:
                reasons.append(f"{where}: fold {raw!r} is not an integer (leave the cell empty for no fold)")
        if reasons:
            bad_rows[i] = "; ".join(reasons)
            continue
        accepted.append(i)
        times.append(t)
        events.append(e)
        splits.append(split)
        folds.append(fold)

    warned: list[str] = []
    sources: dict[str, list[Source | None]] = {m: [] for m in modalities}
    for i in accepted:
        where = f"{name} line {i + 2} (patient {ids[i]!r})"
        for m, cols in path_cols.items():
            entries: dict[str, tuple[Path, str | None]] = {}
            for role, c in cols.items():
                raw = table[c].iloc[i]
                if _is_empty(raw):
                    continue
                text, _, select = str(raw).strip().partition("#")
                p = Path(text).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.exists():
                    msg = f"{where}: {c} path {text!r} does not exist"
                    if strict:
                        problems.append(msg)
                    elif role in ("tumor_mask", "brain_mask"):
                        warned.append(msg + "; the mask is ignored")
                    else:
                        warned.append(msg + f"; {m} counted as missing")
                        entries = {}
                        break
                    continue
                entries[role] = (p, select or None)
            if not entries or set(entries) <= {"tumor_mask", "brain_mask"}:
                sources[m].append(None)
                continue
            main = entries.get("", next(iter(entries.values())))
            parts = tuple((r, p) for r, (p, _) in entries.items() if r)
            sources[m].append(Source(path=main[0], select=main[1], parts=parts))

    clinical = table.iloc[accepted][list(clinical_columns)].reset_index(drop=True)
    kinds = ({f["source"]: f["kind"] for f in clinical_fitted["features"]} if clinical_fitted is not None
             else {c: clinical_kind(clinical[c]) for c in clinical.columns})
    for c in clinical.columns:
        strays = [k for k, v in enumerate(clinical[c]) if _is_stray(v, kinds.get(c, "onehot"))]
        if strays:
            shown = ", ".join(f"line {accepted[k] + 2} (patient {ids[accepted[k]]!r}) {str(clinical[c][k])!r}"
                              for k in strays[:10])
            more = f" and {len(strays) - 10} more" if len(strays) > 10 else ""
            what = "numbers" if kinds[c] == "numeric" else "yes/no values"
            msg = (f"{name}: clinical column {c!r} holds {what}, but {len(strays)} value(s) are not: {shown}{more}; "
                   "correct them, or leave a cell empty where the value is unknown")
            if strict:
                problems.append(msg)
            else:
                warned.append(msg + "; read as unknown")

    warned += _unseen_levels(name, clinical, kinds, clinical_fitted, splits, [(i + 2, ids[i]) for i in accepted])

    rejected = [bad_rows[i] + "; row left out" for i in sorted(bad_rows)]
    if strict:
        problems = [bad_rows[i] for i in sorted(bad_rows)] + problems
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  … and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ManifestError(f"{name}: {len(problems)} problem(s):\n  {shown}{more}")
    if not accepted:
        raise ManifestError(f"{name}: no usable rows:\n  " + "\n  ".join(rejected[:30]))
    for msg in rejected + warned:
        warnings.warn(msg, ManifestWarning, stacklevel=2)

    return Manifest(
        path=path, ids=[ids[i] for i in accepted], time=np.asarray(times, dtype=np.float64),
        event=np.asarray(events, dtype=np.float64), split=np.asarray(splits, dtype=object).astype(str),
        fold=np.asarray(folds, dtype=np.int64), clinical=clinical, sources=sources,
        lines=[i + 2 for i in accepted], sha256=digest, rejected=rejected, warnings=warned,
        path_columns={m: list(cols.values()) for m, cols in path_cols.items()}, columns=columns,
    )


# ------------------------------------------------------------------------------------- clinical
def is_unknown(value: Any) -> bool:
    """Whether a clinical value means "unknown": empty, ``NA``/``nan``/``none``/``null``/``n/a``, or
    one of :data:`MISSING_MARKERS` (case and surrounding spaces ignored)."""
    return _is_empty(value, _UNKNOWN)


def clinical_kind(values: Any) -> str:
    """How a clinical column is encoded, from its values (strings; unknown ones ignored):
    ``"binary"`` (mostly yes/no/true/false/1/0), ``"numeric"`` (mostly numbers) or ``"onehot"``
    (text). "Mostly" is more than half of the known values: the others are strays (typos such as
    ``yse``, not categories), read as unknown."""
    known = [str(v).strip() for v in values if not is_unknown(v)]
    numbers = [v for v in known if _is_float(v)]
    if not known:
        return "binary"
    if 2 * len(numbers) > len(known):
        return "binary" if {v.lower() for v in numbers} <= _YES_NO else "numeric"
    if 2 * sum(v.lower() in _YES_NO for v in known) > len(known):
        return "binary"
    return "onehot"


def _unseen_levels(name: str, clinical: Any, kinds: dict[str, str], fitted: dict[str, Any] | None,
                   splits: list[str], rows: list[tuple[int, str]]) -> list[str]:
    """Messages for the text-column levels the clinical encoding has no feature for: levels that no
    training patient has (this manifest's ``train`` rows, or the ``fitted`` encoding's levels). They
    are read as unknown, like an empty cell, which is right for a level the model never saw but
    hides a spelling that differs from the training one (``G4`` vs ``G 4``): so they are named."""
    known = {f["source"]: f["levels"] for f in fitted["features"] if f["kind"] == "onehot"} if fitted else {}
    train = [k for k, split in enumerate(splits) if split == "train"]
    if fitted is None and not train:
        return []  # nothing is fitted here: no level is known, and that is not each value's fault
    messages = []
    for c in clinical.columns:
        if kinds.get(c, "onehot") != "onehot":
            continue
        values = [str(v).strip() for v in clinical[c]]
        if fitted is not None:
            if c not in known:
                continue  # a column the encoding does not use
            levels = set(known[c])
        else:
            levels = {values[k] for k in train if not is_unknown(values[k])}
            if not levels:
                continue  # no feature at all, as with a fitted encoding that does not use the column
        unseen = [k for k, v in enumerate(values) if not is_unknown(v) and v not in levels]
        if not unseen:
            continue
        shown = ", ".join(f"line {rows[k][0]} (patient {rows[k][1]!r}) {values[k]!r}" for k in unseen[:10])
        more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
        among = ", ".join(repr(v) for v in sorted(levels)[:20]) + (", …" if len(levels) > 20 else "")
        if len({values[k] for k in unseen}) > 10:  # values that rarely repeat are no categories
            hint = ("its values rarely repeat (identifiers or free text?): leave it out of the clinical columns "
                    "(name the ones to use: --clinical, or clinical_columns in the settings)")
        else:
            hint = "if it is a training level spelled differently, correct the spelling"
        messages.append(f"{name}: clinical column {c!r}: {len(unseen)} value(s) of a level no training patient had "
                        f"(training levels: {among}): {shown}{more}; read as unknown, as the model has no "
                        f"feature for it ({hint})")
    return messages


def _is_stray(value: Any, kind: str) -> bool:
    """A known value that a numeric or binary column cannot encode (it is read as unknown)."""
    if is_unknown(value) or kind == "onehot":
        return False
    v = str(value).strip()
    return not _is_float(v) if kind == "numeric" else v.lower() not in _YES_NO


def fit_clinical(clinical: Any, train: np.ndarray) -> dict[str, Any]:
    """Encode clinical columns, fitted on the rows where ``train`` is True.

    Unknown values (:func:`is_unknown`: empty cells and placeholders such as ``'--``, ``Unknown``,
    ``not reported``, ``[Not Available]``) are NaN, never a category. The kind of each column comes
    from :func:`clinical_kind`: numeric columns stay numbers (a stray text entry is NaN;
    :func:`read_manifest` warns about it); yes/no/true/false/1/0 columns become 0/1; other text
    columns become one-hot ``column=level`` features over the levels seen in training (two levels:
    one feature). The training mean and standard deviation of each feature are recorded too (the
    store keeps the encoded values unstandardised: the model fits its own imputation and scaling).
    Returns a plain dict: ``{"features": [{"name", "source", "kind", "level"?, "levels"?}], "mean",
    "std"}``.
    """
    features: list[dict[str, Any]] = []
    for c in clinical.columns:
        kind = clinical_kind(clinical[c])
        if kind != "onehot":
            features.append({"name": c, "source": c, "kind": kind})
            continue
        levels = sorted({str(v).strip() for v, t in zip(clinical[c], train) if t and not is_unknown(v)})
        for level in levels[1:] if len(levels) == 2 else levels:
            features.append({"name": f"{c}={level}", "source": c, "kind": "onehot", "level": level,
                             "levels": levels})
    fitted: dict[str, Any] = {"features": features, "mean": [], "std": []}
    raw = encode_clinical(clinical, fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(raw[train], axis=0) if train.any() else np.zeros(raw.shape[1])
        std = np.nanstd(raw[train], axis=0) if train.any() else np.ones(raw.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    fitted["mean"], fitted["std"] = mean.tolist(), std.tolist()
    return fitted


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def encode_clinical(clinical: Any, fitted: dict[str, Any]) -> np.ndarray:
    """``(N, K)`` float64 encoded (not standardised) clinical features; NaN = unknown (see
    :func:`is_unknown`), a stray text entry of a numeric or yes/no column, or a level never seen in
    training."""
    out = np.full((len(clinical), len(fitted["features"])), np.nan)
    for j, f in enumerate(fitted["features"]):
        if f["source"] not in clinical.columns:
            continue
        for i, v in enumerate(clinical[f["source"]]):
            v = str(v).strip()
            if is_unknown(v):
                continue
            if f["kind"] == "numeric":
                out[i, j] = float(v) if _is_float(v) else np.nan
            elif f["kind"] == "binary":
                out[i, j] = 1.0 if v.lower() in _TRUE else 0.0 if v.lower() in _FALSE else np.nan
            elif v in f["levels"]:
                out[i, j] = float(v == f["level"])
    return out


def apply_clinical(clinical: Any, fitted: dict[str, Any], standardize: bool = False) -> np.ndarray:
    """``(N, K)`` float32 encoded clinical features, NaN for unknown values; ``standardize``: minus
    the training mean, over the training standard deviation."""
    raw = encode_clinical(clinical, fitted)
    if standardize and raw.shape[1]:
        raw = (raw - np.asarray(fitted["mean"])) / np.asarray(fitted["std"])
    return raw.astype(np.float32)
