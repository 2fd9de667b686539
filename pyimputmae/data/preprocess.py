"""``pyimputmae preprocess MANIFEST --out STORE.zarr``: manifest → zarr v3 store, once.

Stages: validate the manifest; create the store (survival/clinical table, clinical encoding
fitted on the training split); omics per modality (all patients at once: the feature selection
needs every training patient); slides and MRI per patient in a process pool (each result written
by this process, the single writer); finally the presence table, the report, and ``complete``.

**Resumable.** A journal in ``STORE.zarr/_progress/`` records what is finished: one file per omics
modality and one per patient for the images, each written to a temporary name and renamed
(atomic) only *after* the patient's arrays are written — so a crash at any point never leaves a
patient that reads as complete, and re-running the same command skips the finished ones (zarr
itself writes every chunk to a temporary file and renames it). The journal is removed once the
store is complete. A re-run with another manifest or other options refuses to mix the two
(``overwrite=True`` starts afresh).

**Robust.** A file that cannot be read (a damaged slide, a volume of the wrong dimensionality, a
table without the gene column) is recorded for its patient and modality — the message names file,
patient and value — and the rest of the cohort goes on; a worker process that crashes outright is
retried alone, then recorded as failed.

**Reusable.** The preprocessing fitted on the training split (omics feature lists and medians,
clinical encoding and standardisation, all settings) is saved in the store's attributes;
:func:`apply_preprocessing` reuses it unchanged for new patients.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import MODALITIES, Manifest, Source, apply_clinical, file_sha256, fit_clinical, read_manifest
from .mri import MriConfig, preprocess_mri, resolve_mri_paths
from .omics import OmicsConfig, run_omics
from .store import FORMAT, SPLIT_CODES, STATUS, create_store, load_preprocessing
from .wsi import WsiConfig, tile_slide

_IMAGE_MODALITIES = ("wsi", "mri")
_OMICS_MODALITIES = ("rna", "dnam")
#: files above this size get a sampled checksum (first and last 16 MiB + size), not a full read
FULL_CHECKSUM_BYTES = 256 << 20


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
        self.modalities = tuple(self.modalities)
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
        """Inverse of :meth:`to_dict`; missing keys keep their defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing settings {unknown}; known: {sorted(known)}")
        kw = dict(d)
        for key, make in (("rna", OmicsConfig.rna), ("dnam", OmicsConfig.dnam), ("wsi", WsiConfig), ("mri", MriConfig)):
            if isinstance(kw.get(key), dict):
                kw[key] = make(**kw[key])
        return cls(**kw)


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


# ------------------------------------------------------------------------------------ journal
def _progress(store: Path) -> Path:
    return store / "_progress"


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary name, flush to disk, rename: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _image_entry(store: Path, i: int) -> Path:
    return _progress(store) / "images" / f"{i:06d}.json"


def journal_complete(store: str | Path, n: int) -> np.ndarray:
    """``(n,)`` bool: patients of an unfinished store whose every stage is journaled."""
    store = Path(store)
    plan = _read_json(_progress(store) / "plan.json")
    if plan is None:
        return np.zeros(n, dtype=bool)
    omics_done = all((_progress(store) / f"{m}.json").exists() for m in plan["omics"])
    done = np.full(n, omics_done)
    for i in plan["image_tasks"]:
        done[i] &= _image_entry(store, i).exists()
    return done


def journal_status(store: str | Path, modalities: list[str], n: int) -> np.ndarray:
    """``(n, M)`` int8 :data:`~pyimputmae.data.store.STATUS` codes from the journal."""
    store = Path(store)
    plan = _read_json(_progress(store) / "plan.json") or {"listed": {}, "omics": [], "image_tasks": []}
    status = np.full((n, len(modalities)), STATUS["pending"], dtype=np.int8)
    for j, m in enumerate(modalities):
        listed = np.zeros(n, dtype=bool)
        listed[plan["listed"].get(m, [])] = True
        status[~listed, j] = STATUS["missing"]
        if m in _OMICS_MODALITIES:
            entry = _read_json(_progress(store) / f"{m}.json")
            if entry is not None:
                status[:, j] = [STATUS[s] for s in entry["status"]]
        else:
            for i in np.flatnonzero(listed):
                entry = _read_json(_image_entry(store, int(i)))
                if entry is not None:
                    status[i, j] = STATUS[entry[m]["status"]]
    return status


# ----------------------------------------------------------------------------------- checksum
def checksum(path: str | Path) -> str:
    """``sha256:<hex>`` of a file (``sha256-sampled:`` — first and last 16 MiB plus the size — above
    :data:`FULL_CHECKSUM_BYTES`, where reading whole slides would dominate preprocessing), or of a
    folder's files in name order (DICOM series)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(bytes.fromhex(file_sha256(f)))
        return f"sha256:{h.hexdigest()}"
    size = p.stat().st_size
    if size <= FULL_CHECKSUM_BYTES:
        return f"sha256:{file_sha256(p)}"
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(16 << 20))
        f.seek(size - (16 << 20))
        h.update(f.read(16 << 20))
    return f"sha256-sampled:{h.hexdigest()}"


def _provenance(paths: dict[str, Path]) -> dict[str, Any]:
    return {role or "file": {"path": str(p), "checksum": checksum(p)} for role, p in paths.items()}


# ------------------------------------------------------------------------------- image worker
def process_images(task: dict[str, Any]) -> dict[str, Any]:
    """One patient's slide and MRI (runs in a worker process). Never raises for bad input: a
    failure is returned as ``{"status": "failed", "error": message}`` for that modality."""
    pid, out = task["id"], {"index": task["index"], "id": task["id"]}
    wsi_cfg, mri_cfg = WsiConfig(**task["wsi_config"]), MriConfig(**task["mri_config"])
    for m in _IMAGE_MODALITIES:
        source: Source | None = task.get(m)
        if source is None:
            continue
        try:
            if m == "wsi":
                r = tile_slide(source.path, wsi_cfg, pid)
                out[m] = {"status": "present", "tiles": r.tiles, "scores": r.scores.tolist(),
                          "coords": r.coords.tolist(), "count": len(r.scores), "slide_mpp": r.slide_mpp,
                          "n_tissue_tiles": r.n_tissue, "source": _provenance({"": source.path})}
            else:
                paths = resolve_mri_paths(source, mri_cfg, pid)
                r = preprocess_mri(paths, mri_cfg, pid)
                out[m] = {"status": "present", "volume": r.volume, "center": r.center.tolist(),
                          "center_source": r.center_source, "warnings": r.warnings, "source": _provenance(paths)}
        except Exception as e:  # any bad file fails this patient's modality only
            known = type(e).__name__ in ("SlideError", "MriError")
            out[m] = {"status": "failed", "error": str(e) if known else f"{source.path} (patient {pid!r}): "
                      f"{type(e).__name__}: {e}"}
    return out


def _init_worker() -> None:
    """Worker processes are the parallelism: one thread each for SimpleITK and torch."""
    import SimpleITK as sitk
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)


def _run_tasks(tasks: list[dict[str, Any]], workers: int, on_result: Any, fn: Any = None,
               initializer: Any = _init_worker) -> None:
    """Run ``fn`` (:func:`process_images`) over ``tasks`` (in this process when ``workers`` ≤ 0),
    calling ``on_result`` here for each. At most ``2·workers`` tasks are in flight, so when a worker
    dies (a crash inside a native reader) only those few are suspects: each is retried alone, and
    one that kills its worker again is recorded as failed."""
    fn = fn or process_images
    if workers <= 0:
        for t in tasks:
            on_result(fn(t))
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds zarr/torch threads
    queue = list(reversed(tasks))
    while queue:
        suspects: list[dict[str, Any]] = []
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer) as pool:
            running: dict[Any, dict[str, Any]] = {}
            while queue or running:
                while queue and len(running) < 2 * workers:
                    t = queue.pop()
                    running[pool.submit(fn, t)] = t
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    t = running.pop(f)
                    try:
                        on_result(f.result())
                    except BrokenProcessPool:
                        suspects.append(t)
                if suspects:
                    suspects += list(running.values())
                    break
        for t in suspects:
            try:
                with ProcessPoolExecutor(1, mp_context=ctx, initializer=initializer) as alone:
                    on_result(alone.submit(fn, t).result())
            except BrokenProcessPool:
                on_result({"index": t["index"], "id": t["id"], **{
                    m: {"status": "failed", "error": f"{t[m].path} (patient {t['id']!r}): the reader crashed "
                        "its worker process (damaged file?)"} for m in _IMAGE_MODALITIES if t.get(m) is not None}})


# ---------------------------------------------------------------------------------- the stages
def _fingerprint(manifest: Manifest, cfg: PreprocessConfig, fitted: dict[str, Any] | None) -> str:
    blob = json.dumps({"manifest": manifest.sha256, "ids": manifest.ids, "config": cfg.to_dict(),
                       "fitted": fitted}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_or_create(out: Path, manifest: Manifest, cfg: PreprocessConfig, fitted: dict[str, Any] | None,
                    fingerprint: str, overwrite: bool) -> tuple[Any, bool]:
    import zarr

    from .. import __version__

    if out.exists():
        ours = (out / "zarr.json").exists() and zarr.open_group(str(out), mode="r").attrs.get("format") == FORMAT
        if not ours and any(out.iterdir()):  # never delete a folder this package did not write
            raise FileExistsError(f"{out} exists and is not a pyimputmae store; choose another --out")
        if ours and not overwrite:
            root = zarr.open_group(str(out), mode="r+")
            # a crash before the plan was written leaves nothing worth keeping: start afresh
            started = root.attrs.get("complete") or (_progress(out) / "plan.json").exists()
            if root.attrs.get("fingerprint") == fingerprint and started:
                return root, True
            if root.attrs.get("fingerprint") != fingerprint:
                raise FileExistsError(f"{out} was built from another manifest or with other options; pass "
                                      "--overwrite (overwrite=True) to rebuild it, or choose another --out")
        shutil.rmtree(out)
    train = manifest.split == "train"
    clinical_fit = fitted["clinical"] if fitted else fit_clinical(manifest.clinical, train)
    clinical = apply_clinical(manifest.clinical, clinical_fit)
    names = [f["name"] for f in clinical_fit["features"]]
    root = create_store(out, ids=manifest.ids, shapes=cfg.shapes(), n_clinical=len(names), wsi_keep=cfg.wsi.n_keep,
                        codec=cfg.codec, attrs={
                            "package_version": __version__, "fingerprint": fingerprint,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "clinical_names": names,
                            "provenance": {"manifest": str(manifest.path) if manifest.path else None,
                                           "manifest_sha256": manifest.sha256, "config": cfg.to_dict(),
                                           "fitted_from": fitted.get("source") if fitted else None,
                                           "package": f"pyimputmae {__version__}"}})
    root["table/time"][:] = manifest.time.astype(np.float32)
    root["table/event"][:] = manifest.event.astype(np.float32)
    root["table/split"][:] = np.asarray([SPLIT_CODES[s] for s in manifest.split], dtype=np.int8)
    root["table/fold"][:] = manifest.fold.astype(np.int16)
    if names:
        root["table/clinical"][:] = clinical
    listed = {m: [i for i, s in enumerate(manifest.sources[m]) if s is not None] for m in cfg.modalities}
    image_tasks = sorted({i for m in cfg.modalities if m in _IMAGE_MODALITIES for i in listed[m]})
    _write_json_atomic(_progress(out) / "plan.json", {
        "listed": listed, "omics": [m for m in cfg.modalities if m in _OMICS_MODALITIES], "image_tasks": image_tasks,
        "clinical": clinical_fit})
    return root, False


def _run_omics_stage(root: Any, out: Path, manifest: Manifest, cfg: PreprocessConfig, fitted: dict[str, Any] | None,
                     workers: int, progress: bool) -> None:
    train = manifest.split == "train"
    for m in (m for m in cfg.modalities if m in _OMICS_MODALITIES):
        if (_progress(out) / f"{m}.json").exists():
            continue
        stage = run_omics(manifest.ids, manifest.sources[m], train, getattr(cfg, m),
                          fitted.get(m) if fitted else None, max(1, workers), progress, m)
        root[f"{m}/data"][:] = stage.values
        root[f"{m}/replaced"][:] = stage.replaced.astype(np.int32)
        files = sorted({str(s.path) for s in manifest.sources[m] if s is not None})
        sums = {f: checksum(f) for f in files}
        sources = [{"path": str(s.path), "select": s.select, "checksum": sums[str(s.path)]}
                   if st == "present" else None for s, st in zip(manifest.sources[m], stage.status)]
        _write_json_atomic(_progress(out) / f"{m}.json", {
            "status": stage.status, "errors": {str(i): e for i, e in stage.errors.items()},
            "fitted": stage.fitted, "sources": sources})


def _journal_patient(out: Path, i: int, entry: dict[str, Any]) -> None:
    """Mark patient ``i``'s images complete (called only after its arrays are written)."""
    _write_json_atomic(_image_entry(out, i), entry)


def _write_images(root: Any, result: dict[str, Any], cfg: PreprocessConfig) -> dict[str, Any]:
    """Write one patient's image arrays (zeros — i.e. no chunk — where a modality failed, so a
    half-written earlier attempt never survives) and return its journal entry."""
    i = result["index"]
    entry: dict[str, Any] = {"id": result["id"]}
    for m in (m for m in cfg.modalities if m in _IMAGE_MODALITIES):
        r = result.get(m, {"status": "missing"})
        if m == "wsi":
            tiles = np.zeros(root["wsi/tiles"].shape[1:], dtype=np.uint8)
            if r["status"] == "present":
                tiles[: r["count"]] = r["tiles"]
            root["wsi/tiles"][i] = tiles
        else:
            root["mri/data"][i] = r["volume"] if r["status"] == "present" else 0.0
        entry[m] = {k: v for k, v in r.items() if k not in ("tiles", "volume")}
    return entry


def _finalize(root: Any, out: Path, manifest: Manifest, cfg: PreprocessConfig, report: PreprocessReport) -> None:
    from .. import __version__

    n, mods = len(manifest), list(cfg.modalities)
    plan = _read_json(_progress(out) / "plan.json")
    status = journal_status(out, mods, n)
    fitted: dict[str, Any] = {"config": cfg.to_dict(), "clinical": plan["clinical"], "modalities": mods,
                              "shapes": {m: list(s) for m, s in cfg.shapes().items()}, "package_version": __version__}
    sources: dict[str, list[Any]] = {m: [None] * n for m in mods}
    failures: list[tuple[str, str, str]] = []
    for m in (m for m in mods if m in _OMICS_MODALITIES):
        entry = _read_json(_progress(out) / f"{m}.json")
        fitted[m] = entry["fitted"]
        sources[m] = entry["sources"]
        failures += [(manifest.ids[int(i)], m, e) for i, e in entry["errors"].items()]
        report.replaced[m] = int(root[f"{m}/replaced"][:].sum())
    if any(m in _IMAGE_MODALITIES for m in mods):
        k = cfg.wsi.n_keep
        count, scores = np.zeros(n, np.int16), np.zeros((n, k), np.float32)
        coords, center = np.zeros((n, k, 2), np.int64), np.zeros((n, 3), np.int32)
        for i in plan["image_tasks"]:
            entry = _read_json(_image_entry(out, i))
            for m in (m for m in mods if m in _IMAGE_MODALITIES):
                e = entry.get(m, {})
                if e.get("status") == "failed":
                    failures.append((manifest.ids[i], m, e["error"]))
                elif e.get("status") == "present":
                    sources[m][i] = e["source"]
                    if m == "wsi":
                        count[i] = e["count"]
                        scores[i, : e["count"]] = e["scores"]
                        coords[i, : e["count"]] = e["coords"]
                    else:
                        center[i] = e["center"]
                        report.warnings += e.get("warnings", [])
        if "wsi" in mods:
            root["wsi/count"][:], root["wsi/scores"][:], root["wsi/coords"][:] = count, scores, coords
        if "mri" in mods:
            root["mri/center"][:] = center
    root["table/status"][:] = status
    root["table/present"][:] = status == STATUS["present"]
    root["provenance"].attrs.update({"sources": sources, "ids": manifest.ids})
    report.failures = sorted(failures, key=lambda f: (manifest.ids.index(f[0]), f[1]))
    for j, m in enumerate(mods):
        report.counts[m] = {"listed": int(sum(s is not None for s in manifest.sources[m])),
                            "present": int((status[:, j] == STATUS["present"]).sum()),
                            "missing": int((status[:, j] == STATUS["missing"]).sum()),
                            "failed": int((status[:, j] == STATUS["failed"]).sum())}
    root.attrs.update({"preprocessing": fitted, "report": report.to_dict()})
    root.attrs["complete"] = True  # last: only now does the store read as complete
    shutil.rmtree(_progress(out), ignore_errors=True)


def preprocess(manifest: str | Path | Manifest, out: str | Path, *, config: PreprocessConfig | dict | None = None,
               fitted: dict[str, Any] | str | Path | None = None, workers: int | None = None, strict: bool = False,
               overwrite: bool = False, progress: bool = True, verbose: bool = True) -> PreprocessReport:
    """Preprocess a cohort manifest into the zarr v3 store ``out`` and return the report.

    config: :class:`PreprocessConfig` (or its dict); fitted: the preprocessing of an earlier store
    (its dict, or the store's path) to reuse unchanged for new patients — its settings then
    replace ``config``; workers: processes for slides/MRI (0: in this process; default: the CPU
    count); strict: manifest problems are errors instead of warnings. Re-running an interrupted
    call resumes it.
    """
    start = time.perf_counter()
    if isinstance(fitted, str | Path):
        fitted = load_preprocessing(fitted)
    if fitted is not None:
        cfg = PreprocessConfig.from_dict(fitted["config"])
    else:
        cfg = PreprocessConfig.from_dict(config) if isinstance(config, dict) else (config or PreprocessConfig())
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(manifest, Manifest):
        clinical = sorted({f["source"] for f in fitted["clinical"]["features"]}) if fitted else cfg.clinical_columns
        manifest = read_manifest(manifest, modalities=cfg.modalities, clinical_columns=clinical, strict=strict,
                                 require_survival=fitted is None, default_split="test" if fitted else "train")
    out = Path(out).resolve()
    root, resumed = _open_or_create(out, manifest, cfg, fitted, _fingerprint(manifest, cfg, fitted), overwrite)
    if resumed and root.attrs.get("complete"):
        report = PreprocessReport.from_dict(root.attrs["report"])
        report.resumed, report.processed, report.seconds = report.n_patients, 0, time.perf_counter() - start
        if verbose:
            print(report.table(), file=sys.stderr)
        return report
    report = PreprocessReport(store=out, n_patients=len(manifest), counts={}, failures=[],
                              rejected=list(manifest.rejected), warnings=list(manifest.warnings), replaced={})
    _run_omics_stage(root, out, manifest, cfg, fitted, workers, progress)

    from tqdm.auto import tqdm

    plan = _read_json(_progress(out) / "plan.json")
    todo = [i for i in plan["image_tasks"] if not _image_entry(out, i).exists()]
    report.resumed = len(manifest) - len(todo) if resumed else 0
    report.processed = len(todo)
    tasks = [{"index": i, "id": manifest.ids[i], "wsi_config": cfg.wsi.to_dict(), "mri_config": cfg.mri.to_dict(),
              **{m: manifest.sources[m][i] for m in cfg.modalities if m in _IMAGE_MODALITIES}} for i in todo]
    with tqdm(total=len(tasks), desc="slides/MRI", unit="patient", disable=not progress or not tasks) as bar:
        def on_result(result: dict[str, Any]) -> None:
            entry = _write_images(root, result, cfg)
            _journal_patient(out, result["index"], entry)
            bar.update(1)

        _run_tasks(tasks, workers, on_result)
    _finalize(root, out, manifest, cfg, report)
    report.seconds = time.perf_counter() - start
    root.attrs["report"] = report.to_dict()
    if verbose:
        print(report.table(), file=sys.stderr)
    return report


def apply_preprocessing(manifest: str | Path | Manifest, fitted: dict[str, Any] | str | Path, out: str | Path,
                        **kwargs: Any) -> PreprocessReport:
    """Preprocess new patients with the preprocessing fitted on a training store (``fitted``: the
    store's path or :func:`~pyimputmae.data.store.load_preprocessing`'s dict), unchanged: same
    feature lists and medians, clinical encoding, tiling and MRI settings. Time/event may be
    empty; the split defaults to "test"."""
    return preprocess(manifest, out, fitted=fitted, **kwargs)


# --------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``preprocess`` to a ``pyimputmae`` argparse sub-parser set (sets ``func``)."""
    p = subparsers.add_parser("preprocess", help="cohort manifest → zarr v3 store", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="CSV/TSV: patient_id, time, event, split, fold, clinical, rna/dnam/wsi/mri paths")
    p.add_argument("--out", required=True, help="the store to write (e.g. cohort.zarr)")
    p.add_argument("--config", help="JSON/YAML file of PreprocessConfig settings (the flags below override it)")
    p.add_argument("--fitted", help="reuse the preprocessing fitted on this store (new patients)")
    p.add_argument("--workers", type=int, default=None, help="processes for slides/MRI (0 = none; default: CPUs)")
    p.add_argument("--strict", action="store_true", help="manifest problems are errors, not warnings")
    p.add_argument("--overwrite", action="store_true", help="rebuild --out even if it holds another store")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--modalities", help="comma-separated subset of rna,dnam,wsi,mri")
    p.add_argument("--clinical", help="comma-separated clinical columns (default: all other columns)")
    p.add_argument("--codec", choices=("zstd", "lz4", "none"))
    p.add_argument("--rna-value", choices=("tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded", "unstranded"))
    p.add_argument("--rna-genes", help="file with a fixed gene list (one per line) instead of the std filter")
    p.add_argument("--rna-min-std", type=float)
    p.add_argument("--rna-width", type=int)
    p.add_argument("--rna-no-log1p", action="store_true", help="the RNA values are already log-scaled")
    p.add_argument("--dnam-values", choices=("beta", "m_value"))
    p.add_argument("--dnam-width", type=int)
    p.add_argument("--wsi-tile-px", type=int)
    p.add_argument("--wsi-mpp", type=float)
    p.add_argument("--wsi-candidates", type=int)
    p.add_argument("--wsi-keep", type=int)
    p.add_argument("--wsi-default-mpp", type=float)
    p.add_argument("--mri-sequences", help="comma-separated channels among t1,t1ce,t2,flair")
    p.add_argument("--mri-spacing", type=float)
    p.add_argument("--mri-crop", type=int, help="cubic crop side in voxels")
    p.set_defaults(func=run_cli)
    return p


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if args.config:
        text = Path(args.config).read_text()
        if args.config.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    for sub in ("rna", "dnam", "wsi", "mri"):
        d[sub] = dict(d.get(sub) or {})
    flags = {
        ("rna", "value"): args.rna_value, ("rna", "min_std"): args.rna_min_std, ("rna", "width"): args.rna_width,
        ("dnam", "values"): args.dnam_values, ("dnam", "width"): args.dnam_width,
        ("wsi", "tile_px"): args.wsi_tile_px, ("wsi", "mpp"): args.wsi_mpp,
        ("wsi", "n_candidates"): args.wsi_candidates,
        ("wsi", "n_keep"): args.wsi_keep, ("wsi", "default_mpp"): args.wsi_default_mpp,
        ("mri", "spacing"): args.mri_spacing,
    }
    for (sub, key), value in flags.items():
        if value is not None:
            d[sub][key] = value
    if args.rna_no_log1p:
        d["rna"]["log1p"] = False
    if args.rna_genes:
        d["rna"]["gene_list"] = [g.strip() for g in Path(args.rna_genes).read_text().split() if g.strip()]
    if args.mri_sequences:
        d["mri"]["sequences"] = args.mri_sequences.split(",")
    if args.mri_crop:
        d["mri"]["crop"] = [args.mri_crop] * 3
    if args.modalities:
        d["modalities"] = args.modalities.split(",")
    if args.clinical:
        d["clinical_columns"] = args.clinical.split(",")
    if args.codec:
        d["codec"] = args.codec
    return d


def run_cli(args: argparse.Namespace) -> int:
    """The ``preprocess`` sub-command: 0 once the store is written (failed files are listed in the
    summary and the store's report); 1 under ``--strict`` when any file failed."""
    report = preprocess(args.manifest, args.out, config=None if args.fitted else _config_from_args(args),
                        fitted=args.fitted, workers=args.workers, strict=args.strict, overwrite=args.overwrite,
                        progress=not args.no_progress)
    return 1 if args.strict and report.failures else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pyimputmae.data.preprocess MANIFEST --out STORE.zarr`` (same as the CLI)."""
    parser = argparse.ArgumentParser(prog="pyimputmae")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["preprocess", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
