"""Omics readers (GDC STAR gene counts, gene × sample matrices, methylation beta tables) and the
feature selection / normalisation fitted on the training split.

Pipeline of one modality (RNA defaults in brackets, DESIGN.md §1):

1. read one value per feature and patient (:func:`read_omics`) — the raw matrix ``(N, G)``;
2. screening (:func:`screen_patients`): a patient whose data cannot be this modality — values
   outside [0, 1] where betas are expected, or data sharing fewer than half of their features with
   the features most training patients (or the fitted preprocessing) have, counted against the
   smaller of the two sets: another modality's file, say — is left out of the modality and reported
   (file, patient, what is wrong), like an unreadable file. A patient on a smaller platform (27k
   methylation array among 450k arrays) is kept: the features it lacks are filled with training
   medians. When every patient's beta values fail, the files are M-values: one
   :class:`OmicsWarning` says so;
3. optional M-value → beta conversion (``values="m_value"``) and ``log1p`` [on];
4. **fit on training patients only** (:func:`fit_omics`): candidate features are those seen in
   training files; keep those with training standard deviation > ``min_std`` [0.1] (or a fixed
   ``gene_list``), at most ``width`` of them (the largest standard deviations), in file order;
   record each kept feature's training median;
5. apply (:func:`apply_omics`, the same for training, test and new patients): NaN/Inf → the
   training median (counted), per-sample normalisation [divide by the sample's median over the
   kept features], zero padding to ``width`` [16,384] → ``(N, 1, width)`` float32.

The fitted dict is plain JSON data and is saved with the store.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._fields import check_fields

GDC_VALUE_COLUMNS = ("tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded", "unstranded")
_GDC_REQUIRED = ("gene_id", "gene_name", "gene_type")


class OmicsError(ValueError):
    """An omics file that cannot be read for a patient; the message names both."""


class OmicsWarning(UserWarning):
    """A problem of a whole cohort's omics files (e.g. M-values where beta values are expected)."""


@dataclass
class OmicsConfig:
    """Settings of one omics modality (see the module docstring for the pipeline).

    kind: "auto" (GDC STAR file if its header says so, else a table), "gdc_star" or "table";
    value: the GDC column; gene_types: GDC ``gene_type`` values kept (empty = all); gene_key:
    "gene_id" (Ensembl, version stripped) or "gene_name"; values: "raw", "beta" (a patient with
    values outside [0, 1] is left out) or "m_value" (any real; converted to beta); log1p;
    sample_norm: "median" or "none"; min_std; width: padded length ``L``; gene_list: a fixed
    feature list instead of the standard-deviation filter.
    """

    kind: str = "auto"
    value: str = "tpm_unstranded"
    gene_types: tuple[str, ...] = ("protein_coding",)
    gene_key: str = "gene_id"
    values: str = "raw"
    log1p: bool = True
    sample_norm: str = "median"
    min_std: float = 0.1
    width: int = 16384
    gene_list: list[str] | None = None

    def __post_init__(self) -> None:
        check_fields(self, "OmicsConfig.")
        self.gene_types = tuple(self.gene_types)
        checks = (("kind", self.kind, ("auto", "gdc_star", "table")), ("value", self.value, GDC_VALUE_COLUMNS),
                  ("gene_key", self.gene_key, ("gene_id", "gene_name")),
                  ("values", self.values, ("raw", "beta", "m_value")),
                  ("sample_norm", self.sample_norm, ("median", "none")))
        for what, v, choices in checks:
            if v not in choices:
                raise ValueError(f"OmicsConfig.{what} must be one of {', '.join(choices)}, got {v!r}")
        if self.width < 1:
            raise ValueError(f"OmicsConfig.width must be ≥ 1, got {self.width}")

    @classmethod
    def rna(cls, **changes: Any) -> OmicsConfig:
        """The paper's RNA-seq: TPM of protein-coding genes, log1p, std > 0.1, ÷ sample median, 16,384."""
        return cls(**changes)

    @classmethod
    def dnam(cls, **changes: Any) -> OmicsConfig:
        """The paper's DNA methylation: beta values as they are, padded to 24,576 (more probes than
        that: the 24,576 with the largest training standard deviation)."""
        return cls(**{"values": "beta", "log1p": False, "sample_norm": "none", "min_std": 0.0, "width": 24576,
                      **changes})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gene_types"] = list(self.gene_types)
        return d


def _where(path: Path | str, patient: str | None) -> str:
    return f"{path} (patient {patient!r})" if patient else str(path)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _content_lines(path: Path, n: int) -> list[tuple[int, str]]:
    """``(line number from 0, text)`` of the first ``n`` lines that are neither ``#`` comments nor
    blank (whitespace only), the text without its line ending (``\\n`` or ``\\r\\n``)."""
    with _open_text(path) as f:
        lines = []
        for k, line in enumerate(f):
            if not line.startswith("#") and line.strip():
                lines.append((k, line.rstrip("\r\n")))
            if len(lines) >= n:
                break
    return lines


def _first_lines(path: Path, n: int = 3) -> list[str]:
    return [text for _, text in _content_lines(path, n)]


#: the count columns of a STAR gene-counts file: its header has one at least, besides gene_id and gene_type
_STAR_COUNT_COLUMNS = ("stranded_first", "stranded_second", *GDC_VALUE_COLUMNS)


def is_gdc_star(path: str | Path) -> bool:
    """Whether ``path`` looks like a GDC "augmented STAR gene counts" TSV, by its header (the first
    line that is not a ``#`` comment or blank): tab-separated, with ``gene_id``, ``gene_type`` and at
    least one STAR count column (``unstranded``, ``tpm_unstranded``, …). A genes × samples matrix
    with gene annotations is a table, not a STAR file."""
    p = Path(path)
    if p.suffix == ".parquet":
        return False
    try:
        head = _first_lines(p, 1)
    except (OSError, UnicodeDecodeError):
        return False
    columns = {c.strip() for c in head[0].split("\t")} if head else set()
    return {"gene_id", "gene_type"} <= columns and any(c in columns for c in _STAR_COUNT_COLUMNS)


def read_gdc_star_counts(path: str | Path, config: OmicsConfig | None = None, patient: str | None = None) -> Any:
    """One sample of a GDC "augmented STAR gene counts" TSV as a pandas Series (feature → value).

    The ``# gene-model`` comment and the ``N_unmapped``/``N_multimapping``/``N_noFeature``/
    ``N_ambiguous`` rows are dropped, rows filtered on ``gene_type``, and genes keyed by
    ``config.gene_key`` (duplicates, e.g. the ``_PAR_Y`` copies, are summed).
    """
    import pandas as pd

    cfg = config or OmicsConfig()
    path = Path(path)
    try:
        header = _content_lines(path, 1)  # after the comments and any blank lines
        table = pd.read_csv(path, sep="\t", comment="#", dtype=str, keep_default_na=False,
                            skiprows=header[0][0] if header else 0)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise OmicsError(f"{_where(path, patient)}: cannot read GDC STAR counts file: {e}") from e
    table.columns = [str(c).strip() for c in table.columns]  # trailing spaces after the last column name
    need = [*_GDC_REQUIRED, cfg.value]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise OmicsError(f"{_where(path, patient)}: GDC STAR counts file has no column(s) {missing}; "
                         f"columns are {list(table.columns)}")
    for c in need:
        table[c] = table[c].str.strip()
    table = table[~table["gene_id"].str.startswith("N_") & (table["gene_id"] != "")]  # blank lines: no gene
    if cfg.gene_types:
        table = table[table["gene_type"].isin(cfg.gene_types)]
    if table.empty:
        raise OmicsError(f"{_where(path, patient)}: no gene of type {list(cfg.gene_types)} in the file")
    key = table[cfg.gene_key]
    if cfg.gene_key == "gene_id":
        key = key.str.split(".").str[0]
    values = pd.to_numeric(table[cfg.value], errors="coerce")
    return values.groupby(key.to_numpy(), sort=False).sum(min_count=1).astype(np.float64)


def read_table(path: str | Path) -> Any:
    """A feature table as a DataFrame indexed by its first column: TSV/CSV/TXT (optionally
    ``.gz``) or parquet. A header-less two-column file (a GDC methylation beta file:
    ``probe<TAB>beta``) gets the columns ``["value"]``."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        first_is_text = table.shape[1] > 0 and not pd.api.types.is_numeric_dtype(table.dtypes.iloc[0])
        if isinstance(table.index, pd.RangeIndex) and first_is_text:
            table = table.set_index(table.columns[0])
        return table
    stem = path.with_suffix("") if path.suffix == ".gz" else path
    first = _first_lines(path, 1)
    if not first:
        raise ValueError("the file is empty")
    if stem.suffix.lower() in (".tsv", ".tab", ".txt"):
        sep = "\t"
    elif stem.suffix.lower() == ".csv":
        sep = ","
    else:
        try:
            sep = csv.Sniffer().sniff(first[0], delimiters="\t,;").delimiter
        except csv.Error:
            raise ValueError(f"no tab, comma or semicolon in its first line {first[0][:80]!r}: expected a table "
                             "separated by tabs, commas or semicolons, or a GDC STAR counts file") from None
    fields = first[0].split(sep)
    headerless = len(fields) >= 2 and all(_is_number(v) for v in fields[1:])
    table = pd.read_csv(path, sep=sep, comment="#", index_col=0, header=None if headerless else 0)
    if headerless:
        table.columns = ["value"] if table.shape[1] == 1 else [f"value{i}" for i in range(table.shape[1])]
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    return table


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return v.strip().lower() in ("na", "nan", "")
    return True


#: characters that end an id inside a longer label (``TCGA-CS-4938`` in ``TCGA-CS-4938-01A``, or
#: ``TCGA.CS.4938.01`` as R writes it): a prefix match must stop at one, so ``P1`` never picks ``P10``
_ID_SEPARATORS = "-._ |:;/"


class _Labels:
    """Sorted labels of one table axis, for exact and prefix look-ups in O(log n)."""

    def __init__(self, labels: Any) -> None:
        self.exact = set(labels)
        self.sorted = sorted(self.exact)

    def prefixed(self, key: str) -> str | None:
        """The first label in sorted order that is ``key`` followed by a separator and more."""
        hits = []
        for sep in _ID_SEPARATORS:
            i = bisect.bisect_left(self.sorted, key + sep)
            if i < len(self.sorted) and self.sorted[i].startswith(key + sep):
                hits.append(self.sorted[i])
        return min(hits) if hits else None

    def shorter(self, key: str) -> str | None:
        """The longest label that ``key`` starts with, up to a separator (``TCGA-CS-4938`` for the
        sample barcode ``TCGA-CS-4938-01A``): a hint for an id that matches nothing."""
        cuts = [k for k in range(len(key) - 1, 0, -1) if key[k] in _ID_SEPARATORS]
        return next((key[:k] for k in cuts if key[:k] in self.exact), None)


def find_sample(table: Any, patient: str, select: str | None = None, path: Path | str = "",
                labels: tuple[_Labels, _Labels] | None = None) -> tuple[str, str]:
    """Where one sample sits in a feature table of either orientation: ``("column" | "row", label)``.

    ``select`` (or else ``patient``) names a column (features × samples) or a row (samples ×
    features); failing that, the first in sorted order of the columns/rows whose name is it
    followed by a separator (``-``, ``.``, ``_``, …) and more (a TCGA sample barcode
    ``TCGA-XX-XXXX-01A-…`` for patient ``TCGA-XX-XXXX``: the primary tumour ``-01`` sorts first; ``P1``
    never picks ``P10``); failing that, a table with a single value column is the sample.
    ``labels``: the table's :class:`_Labels` (columns, rows), when looking up many patients.
    """
    labels = labels or (_Labels(table.columns), _Labels(table.index))
    key = select or patient
    for axis, lab in zip(("column", "row"), labels):
        if key in lab.exact:
            return axis, key
    for axis, lab in zip(("column", "row"), labels):
        if (hit := lab.prefixed(key)) is not None:
            return axis, hit
    if select is None and table.shape[1] == 1:
        return "column", table.columns[0]
    shorter = next((hit for lab in labels if (hit := lab.shorter(key)) is not None), None)
    hint = (f"; the table has {shorter!r}, the start of that id (a case barcode for a sample barcode?): if it is "
            f"this patient's, add #{shorter} to the path in the manifest" if shorter else "")
    raise OmicsError(f"{_where(path, patient)}: no column or row named {key!r} (table of "
                     f"{table.shape[0]} rows × {table.shape[1]} columns; columns start "
                     f"{list(table.columns[:5])}, rows start {list(table.index[:5])}){hint}")


def select_sample(table: Any, patient: str, select: str | None = None, path: Path | str = "") -> Any:
    """The Series (feature → float) of one sample of a feature table (see :func:`find_sample`)."""
    axis, label = find_sample(table, patient, select, path)
    series = table[label] if axis == "column" else table.loc[label]
    if series.ndim == 2:  # a duplicated row label: the first
        series = series.iloc[0]
    return _dedupe(series.astype(np.float64))


def _dedupe(series: Any) -> Any:
    """Mean over duplicated feature names (first-seen order)."""
    series.index = series.index.astype(str)
    return series.groupby(level=0, sort=False).mean() if series.index.has_duplicates else series


def _load_table(path: Path, patient: str, cache: dict | None) -> Any:
    import pandas as pd

    key = str(path)
    if cache is not None and key in cache:
        return cache[key]
    try:
        table = read_table(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise OmicsError(f"{_where(path, patient)}: cannot read the omics table: {e}") from e
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        table = table.apply(pd.to_numeric, errors="coerce")
    if cache is not None:
        cache[key] = table
    return table


def read_omics(path: str | Path, patient: str, config: OmicsConfig, select: str | None = None,
               cache: dict | None = None) -> Any:
    """One patient's raw values (a pandas Series, feature → float) from a GDC STAR file or a table.

    ``cache`` (path → DataFrame) keeps cohort-level matrices read once for all patients.
    """
    path = Path(path)
    if config.kind == "gdc_star" or (config.kind == "auto" and is_gdc_star(path)):
        return read_gdc_star_counts(path, config, patient)
    return select_sample(_load_table(path, patient, cache), patient, select, path)


def _transform(x: np.ndarray, fitted: dict[str, Any]) -> np.ndarray:
    """Value-wise steps before imputation: M → beta, log1p (negative values become NaN)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if fitted["values"] == "m_value":
            x = np.exp2(x) / (np.exp2(x) + 1.0)
        if fitted["log1p"]:
            x = np.where(x >= 0, np.log1p(np.where(x >= 0, x, 0.0)), np.nan)
    return x


def fit_omics(raw: Any, config: OmicsConfig) -> dict[str, Any]:
    """Fit the feature list and the per-feature medians on ``raw``: **training patients only**,
    a DataFrame ``(n_train, G)`` (NaN where a patient's file lacks a feature).

    Returns ``{"features": [...], "medians": [...], "width", "values", "log1p", "sample_norm",
    "min_std", "selection", "n_train"}`` (and, for a ``gene_list``, ``"unmeasured"``: its features
    no training patient has, whose median is 0).
    """
    if raw.shape[0] == 0:
        raise OmicsError("no training patient has this modality: nothing to fit the feature selection on")
    fitted: dict[str, Any] = {"values": config.values, "log1p": config.log1p, "sample_norm": config.sample_norm,
                              "min_std": config.min_std, "width": config.width, "n_train": int(raw.shape[0])}
    x = _transform(raw.to_numpy(np.float64), fitted)
    x[~np.isfinite(x)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(x, axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
        med = np.nanmedian(x, axis=0)
    names = [str(c) for c in raw.columns]
    if config.gene_list is not None:
        pos = {n: j for j, n in enumerate(names)}
        features = list(dict.fromkeys(str(g) for g in config.gene_list))
        medians = [float(med[pos[g]]) if g in pos and np.isfinite(med[pos[g]]) else 0.0 for g in features]
        fitted["selection"] = "gene_list"
        fitted["unmeasured"] = [g for g in features if g not in pos or not np.isfinite(med[pos[g]])]
    else:
        ok = np.isfinite(std) & (std > config.min_std) if config.min_std > 0 else np.isfinite(med)
        keep = np.flatnonzero(ok)
        if keep.size > config.width:  # the largest standard deviations, back in file order
            keep = np.sort(keep[np.argsort(-np.nan_to_num(std[keep]), kind="stable")[: config.width]])
        features = [names[j] for j in keep]
        medians = [float(med[j]) for j in keep]
        fitted["selection"] = f"std>{config.min_std}" if config.min_std > 0 else "all"
    if len(features) > config.width:
        raise OmicsError(f"the gene list has {len(features)} features, more than the width {config.width}")
    if not features:
        raise OmicsError(f"no feature passes the selection ({fitted['selection']}) on {raw.shape[0]} training patients")
    fitted["features"], fitted["medians"] = features, medians
    return fitted


def apply_omics(raw: Any, fitted: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Apply a fitted selection to any patients: ``raw`` DataFrame ``(n, G)`` → ``(values (n, 1, width)
    float32, replaced (n,) int64)`` — the count of NaN/Inf (or absent) values set to training medians."""
    x = _transform(raw.reindex(columns=fitted["features"]).to_numpy(np.float64), fitted)
    bad = ~np.isfinite(x)
    x = np.where(bad, np.asarray(fitted["medians"], dtype=np.float64)[None, :], x)
    if fitted["sample_norm"] == "median" and x.shape[0]:
        med = np.median(x, axis=1, keepdims=True)
        # a sample whose median is not positive (nearly all zeros) is left unscaled
        x = x / np.where(med > 0, med, 1.0)
    out = np.zeros((x.shape[0], 1, fitted["width"]), dtype=np.float32)
    out[:, 0, : x.shape[1]] = x
    return out, bad.sum(axis=1).astype(np.int64)


@dataclass
class OmicsStage:
    """The result of reading, fitting and applying one modality for a whole manifest.

    values: ``(N, 1, width)`` float32 (zeros where missing or failed); status: ``(N,)`` "present",
    "missing" or "failed"; errors: patient index → message; replaced: ``(N,)``; fitted: the dict;
    warnings: the cohort-level :class:`OmicsWarning` messages (also warned), for a report.
    """

    values: np.ndarray
    status: list[str]
    errors: dict[int, str] = field(default_factory=dict)
    replaced: np.ndarray | None = None
    fitted: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def read_cohort_omics(ids: list[str], sources: list[Any], config: OmicsConfig, workers: int = 1,
                      progress: bool = False, name: str = "omics") -> tuple[dict[int, Any], dict[int, str]]:
    """Every listed patient's raw values: ``({patient index: DataFrame of one or more patients ×
    features}, {patient index: error})``. A cohort-level table is read once and sliced for all its
    patients at once; per-patient files (GDC STAR) are read in ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    by_file: dict[Path, list[int]] = {}
    for i, s in enumerate(sources):
        if s is not None:
            by_file.setdefault(Path(s.path), []).append(i)
    errors: dict[int, str] = {}
    frames: dict[int, Any] = {}  # first patient of a block → (patients × features) frame
    single: list[int] = []
    for path, rows in by_file.items():
        if config.kind == "gdc_star" or (config.kind == "auto" and is_gdc_star(path)):
            single += rows
            continue
        try:
            table = _load_table(path, ids[rows[0]], None)
        except OmicsError as e:
            errors.update({i: str(e).replace(repr(ids[rows[0]]), repr(ids[i])) for i in rows})
            continue
        labels = (_Labels(table.columns), _Labels(table.index))
        picked: dict[str, list[tuple[int, str]]] = {"column": [], "row": []}
        for i in rows:
            try:
                axis, label = find_sample(table, ids[i], sources[i].select, path, labels)
            except OmicsError as e:
                errors[i] = str(e)
                continue
            picked[axis].append((i, label))
        for axis, hits in picked.items():
            if hits:
                part = table[[h[1] for h in hits]].T if axis == "column" else table.loc[[h[1] for h in hits]]
                part = part.astype(np.float32)  # half the memory of float64 for 450k-probe arrays
                part.columns = part.columns.astype(str)
                if part.columns.has_duplicates:
                    part = part.T.groupby(level=0, sort=False).mean().T
                part.index = [h[0] for h in hits]
                frames[hits[0][0]] = part

    def read(i: int) -> Any:
        return read_gdc_star_counts(sources[i].path, config, ids[i])

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {i: pool.submit(read, i) for i in single}
        for i in tqdm(single, desc=f"read {name}", disable=not progress or not single, leave=False):
            try:
                frames[i] = futures[i].result().astype(np.float32).to_frame(i).T
            except (OmicsError, OSError) as e:
                errors[i] = str(e)
    return frames, errors


#: a patient whose data share fewer than this part of the smaller of (its own features, the cohort's
#: features) with the cohort is not used (wrong file?)
MIN_SHARED_FEATURES = 0.5
#: beta values outside [0, 1] by more than this are not beta values
BETA_TOLERANCE = 1e-4


def _describe(ids: list[str], sources: list[Any], i: int) -> str:
    """``file#select (patient 'id')``: where patient ``i``'s data came from, for messages."""
    s = sources[i]
    return _where(f"{s.path}#{s.select}" if s.select else s.path, ids[i])


def _row_chunks(frame: Any, rows: int = 256) -> Any:
    """``(first row, values)`` blocks of a patients × features frame (bounded temporaries for
    450k-probe tables)."""
    x = frame.to_numpy()
    for start in range(0, x.shape[0], rows):
        yield start, x[start:start + rows]


def _drop_patients(frames: dict[int, Any], bad: set[int]) -> None:
    """Remove patient rows ``bad`` from ``frames`` in place (blocks left empty go too)."""
    for key, f in list(frames.items()):
        hit = f.index.isin(list(bad))
        if hit.all():
            del frames[key]
        elif hit.any():
            frames[key] = f.loc[~hit]


def screen_patients(frames: dict[int, Any], ids: list[str], sources: list[Any], train: np.ndarray,
                    values: str, fitted: dict[str, Any] | None = None, name: str = "omics",
                    notes: list[str] | None = None) -> dict[int, str]:
    """Take out of ``frames`` (as :func:`read_cohort_omics` returns them; changed in place) the
    patients whose data cannot be this modality, and return ``{patient index: message}`` for them:

    * ``values == "beta"``: values outside [0, 1] (M-values, or another modality's file). When every
      patient (two or more) fails this check, the files hold M-values: an :class:`OmicsWarning` says
      so once (its message also appended to ``notes``), and each patient's message too;
    * sharing fewer than :data:`MIN_SHARED_FEATURES` of the smaller of (the patient's own features,
      the reference features) with the reference — the ``fitted`` features (those measured in
      training), or else those that at least half of the (remaining) training patients have: the
      majority, not one wrong file, decides the feature set. Counting against the smaller set keeps
      a patient from a smaller platform whose features are mostly the others' (27k among 450k
      methylation arrays) and leaves out a file that shares next to nothing (an RNA table as DNAm).
    """
    import pandas as pd

    errors: dict[int, str] = {}
    if values == "beta":
        flag = " (--dnam-values m_value)" if name == "dnam" else ""
        found: dict[int, str] = {}  # patient → what lies outside [0, 1]
        n_with = sum(len(f) for f in frames.values())
        for f in frames.values():
            for start, x in _row_chunks(f):
                out = np.isfinite(x) & ((x < -BETA_TOLERANCE) | (x > 1 + BETA_TOLERANCE))
                for r in np.flatnonzero(out.any(axis=1)):
                    i, cols = int(f.index[start + r]), np.flatnonzero(out[r])
                    shown = ", ".join(f"{f.columns[j]}={x[r, j]:.4g}" for j in cols[:3])
                    shown += ", …" if cols.size > 3 else ""
                    found[i] = (f"{_describe(ids, sources, i)}: {name}: {cols.size} of {int(np.isfinite(x[r]).sum())} "
                                f"values lie outside [0, 1] ({shown}): not beta values")
        every = n_with >= 2 and len(found) == n_with
        if every:
            note = (f"{name}: all {n_with} patients with a {name} file have values outside [0, 1]: the files look "
                    f"like M-values, not beta values. Set {name}.values to 'm_value'{flag} and preprocess again; "
                    f"until then no patient's {name} is used")
            warnings.warn(note, OmicsWarning, stacklevel=3)
            if notes is not None:
                notes.append(note)
        for i, what in found.items():
            hint = (f"like every patient's {name} file: they look like M-values; set {name}.values to 'm_value'{flag}"
                    if every else f"If the file holds M-values, set {name}.values to 'm_value'{flag}; otherwise "
                    f"check that it is this patient's {name} file")
            errors[i] = f"{what}{', ' if every else '. '}{hint}. The patient's {name} is left out"
    # the patients failed so far take no part in the reference below; all are dropped once, at the end
    failed = np.fromiter(errors, dtype=np.int64)
    if fitted is not None:
        reference = pd.Index(fitted["features"]).difference(fitted.get("unmeasured", []), sort=False)
        whose = "the fitted preprocessing uses"
    else:
        counts, n_train = pd.Series(dtype=np.float64), 0
        for f in frames.values():
            index = f.index.to_numpy(np.int64)
            counted = train[index] & ~np.isin(index, failed)
            if counted.any():
                seen = sum(np.isfinite(x[counted[start:start + len(x)]]).sum(axis=0) for start, x in _row_chunks(f))
                counts = counts.add(pd.Series(seen, index=f.columns), fill_value=0)
                n_train += int(counted.sum())
        reference, whose = counts.index[counts >= n_train / 2], "at least half of the training patients have"
    if reference.empty:  # nothing to compare with (no training patient): the fit reports it
        _drop_patients(frames, set(errors))
        return errors
    for f in frames.values():
        known = f.columns.isin(reference)
        for start, x in _row_chunks(f):
            finite = np.isfinite(x)
            shared, own = (finite & known).sum(axis=1), finite.sum(axis=1)
            # a patient without a single value fails too (the smaller set is then taken as 1)
            smaller = np.maximum(np.minimum(own, len(reference)), 1)
            for r in np.flatnonzero(shared < MIN_SHARED_FEATURES * smaller):
                i = int(f.index[start + r])
                if i in errors:  # failed the value check already
                    continue
                foreign = ", ".join(str(c) for c in f.columns[finite[r] & ~known][:3])
                errors[i] = (f"{_describe(ids, sources, i)}: {name}: only {shared[r]} of the {len(reference)} features "
                             f"{whose} are in this patient's data ({own[r]} values"
                             f"{'; unknown features such as ' + foreign if foreign else ''}): fewer than half of the "
                             f"smaller of the two. Check that it is this patient's {name} file (not another "
                             f"modality's); if it is, its platform or feature names (e.g. gene ids vs gene names, "
                             f"another annotation) differ from the others' — convert them to the same ones. "
                             f"The patient's {name} is left out")
    _drop_patients(frames, set(errors))
    return errors


def _concat(frames: list[Any]) -> Any:
    """Stack patients × features frames; features in first-seen order (never sorted)."""
    import pandas as pd

    return pd.concat(frames, axis=0, sort=False) if frames else pd.DataFrame()


def run_omics(ids: list[str], sources: list[Any], train: np.ndarray, config: OmicsConfig,
              fitted: dict[str, Any] | None = None, workers: int = 1, progress: bool = False,
              name: str = "omics") -> OmicsStage:
    """Read every patient's data, fit on the ``train`` rows (unless ``fitted`` is given), apply to
    all. A file that fails — unreadable, or data that cannot be this modality
    (:func:`screen_patients`) — is recorded for its patient and never stops the others."""
    frames, errors = read_cohort_omics(ids, sources, config, workers, progress, name)
    notes: list[str] = []
    errors.update(screen_patients(frames, ids, sources, train, (fitted or {}).get("values", config.values), fitted,
                                  name, notes))
    status = ["missing" if s is None else "failed" if i in errors else "present" for i, s in enumerate(sources)]
    width = (fitted or {}).get("width", config.width)
    values = np.zeros((len(ids), 1, width), dtype=np.float32)
    replaced = np.zeros(len(ids), dtype=np.int64)
    if not frames:
        return OmicsStage(values, status, errors, replaced, fitted, notes)
    if fitted is None:
        # only training patients' data: test patients can change neither the features nor their order
        train_parts = [f.loc[[i for i in f.index if train[i]]] for f in frames.values()]
        train_frame = _concat([f for f in train_parts if len(f)])
        try:
            fitted = fit_omics(train_frame.dropna(axis=1, how="all"), config)
        except OmicsError as e:  # nothing to fit on: the modality is unusable for every patient
            for f in frames.values():
                for i in f.index:
                    status[i], errors[i] = "failed", f"patient {ids[i]!r}: {name}: {e}"
            return OmicsStage(values, status, errors, replaced, None, notes)
    frame = _concat(list(frames.values()))
    out, n_bad = apply_omics(frame, fitted)
    rows = frame.index.to_numpy(np.int64)
    values = np.zeros((len(ids), 1, fitted["width"]), dtype=np.float32)
    values[rows] = out
    replaced[rows] = n_bad
    return OmicsStage(values, status, errors, replaced, fitted, notes)
