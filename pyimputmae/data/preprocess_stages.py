"""The single writer's side of ``pyimputmae preprocess``: the stages that create the store, write
the omics and each patient's image arrays, and finalize it (presence table, fitted preprocessing,
report, ``complete``), with the resume journal in ``STORE.zarr/_progress/`` and the file checksums
recorded as provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_text, fsync_path
from .manifest import Manifest, apply_clinical, file_sha256, fit_clinical
from .omics import run_omics
from .preprocess_config import PreprocessConfig, PreprocessReport
from .store import FORMAT, SPLIT_CODES, STATUS, create_store

_IMAGE_MODALITIES = ("wsi", "mri")
_OMICS_MODALITIES = ("rna", "dnam")
#: files above this size get a sampled checksum (first and last 16 MiB + size), not a full read
FULL_CHECKSUM_BYTES = 256 << 20


# ------------------------------------------------------------------------------------ journal
def _progress(store: Path) -> Path:
    return store / "_progress"


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary name, flush to disk, rename: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj))


#: fsync of one file (a name of its own, which the durability test watches; folders use fsync_path)
_fsync_file = fsync_path


def flush_to_disk(path: Path) -> None:
    """Flush ``path`` — a file, or a folder with everything under it — and the folder entries
    naming it to disk, so that a journal entry written afterwards never outlives, in a power loss
    or node failure, the array chunks it vouches for (a killed process needs none of this: the
    page cache survives it). A path that does not exist (an all-zero chunk zarr did not write) is
    skipped."""
    if not path.exists():
        return
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(folder) / name)
            fsync_path(folder)
    else:
        _fsync_file(path)
    fsync_path(path.parent)


def _chunk_rows(out: Path, root: Any, name: str, i: int) -> Path:
    """The folder of array ``name``'s chunks that hold patient ``i`` (zarr v3's default chunk keys:
    ``NAME/c/<row block>/...``)."""
    return out / name / "c" / str(i // root[name].chunks[0])


def flush_patient_images(out: Path, root: Any, i: int, cfg: PreprocessConfig) -> None:
    """:func:`flush_to_disk` of patient ``i``'s image chunks, before its journal entry."""
    for m in (m for m in cfg.modalities if m in _IMAGE_MODALITIES):
        array = "wsi/tiles" if m == "wsi" else "mri/data"
        flush_to_disk(_chunk_rows(out, root, array, i))


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


def journal_wsi_count(store: str | Path, n: int) -> np.ndarray:
    """``(n,)`` int16: slide tiles stored per patient of an unfinished store, from the journal
    (``wsi/count`` is written only when the store is finished)."""
    store = Path(store)
    plan = _read_json(_progress(store) / "plan.json") or {"image_tasks": []}
    count = np.zeros(n, dtype=np.int16)
    for i in plan["image_tasks"]:
        entry = _read_json(_image_entry(store, int(i))) or {}
        wsi = entry.get("wsi", {})
        if wsi.get("status") == "present":
            count[i] = wsi["count"]
    return count


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


# ---------------------------------------------------------------------------------- the stages
def _fingerprint(manifest: Manifest, cfg: PreprocessConfig, fitted: dict[str, Any] | None) -> str:
    blob = json.dumps({"manifest": manifest.sha256, "ids": manifest.ids, "config": cfg.to_dict(),
                       "fitted": fitted}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


#: what zarr's LocalStore writes before renaming it into place (a run killed meanwhile leaves it)
_ZARR_TEMPORARY = re.compile(r".+\.[0-9a-f]{32}\.partial")


def _is_our_store(out: Path) -> bool:
    """A pyimputmae store (finished or not, or being removed), or a folder whose creation was cut
    before the store's first metadata file was in place (it holds nothing but zarr temporaries)."""
    import zarr

    if (out / "zarr.json").exists():
        return zarr.open_group(str(out), mode="r").attrs.get("format") == FORMAT
    return all(_ZARR_TEMPORARY.fullmatch(p.name) for p in out.iterdir())


def _remove_store(out: Path) -> None:
    """Delete a store so that a run killed meanwhile leaves a folder the next run still recognises
    (and removes): it is first marked unfinished and being removed, ``zarr.json`` goes last."""
    import zarr

    meta = out / "zarr.json"
    if meta.exists():
        zarr.open_group(str(out), mode="r+").attrs.update({"complete": False, "removing": True})
    for entry in out.iterdir():
        if entry != meta:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    meta.unlink(missing_ok=True)
    out.rmdir()


def _remove_leftovers(out: Path, complete: bool) -> None:
    """What a killed run left in a store being resumed: zarr's temporaries (each as large as a
    chunk) and, in a finished store, the rest of the journal (its removal is the last step)."""
    if complete:
        shutil.rmtree(_progress(out), ignore_errors=True)
    for folder, _, files in os.walk(out):
        for name in files:
            if _ZARR_TEMPORARY.fullmatch(name) or (name.startswith(".") and name.endswith(".tmp")):
                Path(folder, name).unlink(missing_ok=True)


def _open_or_create(out: Path, manifest: Manifest, cfg: PreprocessConfig, fitted: dict[str, Any] | None,
                    fingerprint: str, overwrite: bool) -> tuple[Any, bool]:
    import zarr

    from .. import __version__

    if out.exists():
        ours = _is_our_store(out)
        if not ours and any(out.iterdir()):  # never delete a folder this package did not write
            raise FileExistsError(f"{out} exists and is not a pyimputmae store; choose another --out")
        if ours and not overwrite and (out / "zarr.json").exists():
            root = zarr.open_group(str(out), mode="r+")
            # a crash before the plan was written, or while the store was being removed, leaves
            # nothing worth keeping: start afresh
            started = not root.attrs.get("removing") and (
                root.attrs.get("complete") or (_progress(out) / "plan.json").exists())
            if root.attrs.get("fingerprint") == fingerprint and started:
                _remove_leftovers(out, complete=bool(root.attrs.get("complete")))
                return root, True
            if root.attrs.get("fingerprint") != fingerprint and started:
                raise FileExistsError(f"{out} was built from another manifest or with other options; pass "
                                      "--overwrite (overwrite=True) to rebuild it, or choose another --out")
        _remove_store(out)
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
        flush_to_disk(out / m)  # the arrays on disk before the journal says the modality is done
        files = sorted({str(s.path) for s in manifest.sources[m] if s is not None})
        sums = {f: checksum(f) for f in files}
        sources = [{"path": str(s.path), "select": s.select, "checksum": sums[str(s.path)]}
                   if st == "present" else None for s, st in zip(manifest.sources[m], stage.status)]
        _write_json_atomic(_progress(out) / f"{m}.json", {
            "status": stage.status, "errors": {str(i): e for i, e in stage.errors.items()},
            "fitted": stage.fitted, "sources": sources,
            "warnings": stage.warnings})  # the cohort-level ones, for the report's summary


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
        report.warnings += entry.get("warnings", [])
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
                    report.warnings += e.get("warnings", [])
                    if m == "wsi":
                        count[i] = e["count"]
                        scores[i, : e["count"]] = e["scores"]
                        coords[i, : e["count"]] = e["coords"]
                    else:
                        center[i] = e["center"]
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
    flush_to_disk(out)  # every array and attribute on disk before the store says it is complete
    root.attrs["complete"] = True  # last: only now does the store read as complete
    flush_to_disk(out / "zarr.json")
    shutil.rmtree(_progress(out), ignore_errors=True)
