"""``pyimputmae preprocess MANIFEST --out STORE.zarr``: manifest → zarr v3 store, once.

Stages: validate the manifest; create the store (survival/clinical table, clinical encoding
fitted on the training split); omics per modality (all patients at once: the feature selection
needs every training patient); slides and MRI per patient in a process pool (each result written
by this process, the single writer); finally the presence table, the report, and ``complete``.

**Resumable.** A journal in ``STORE.zarr/_progress/`` records what is finished: one file per omics
modality and one per patient for the images, each written to a temporary name and renamed
(atomic) only *after* the patient's arrays are written — so a crash at any point never leaves a
patient that reads as complete, and re-running the same command skips the finished ones (zarr
≥ 3.1.3 itself writes every chunk and metadata file to a temporary file and renames it; the
temporaries a killed run leaves are removed when it resumes). Each journal entry is written only
after the chunks it vouches for are flushed to disk (``fsync``), and ``complete`` only after the
whole store is, so a power loss or a node failure, which empties the page cache, never leaves a
patient or a store that reads as finished with arrays that never reached the disk. The journal is
removed once the store is complete. The store's metadata marks it as ours from its first file on, and a store
being replaced (``--overwrite``) is marked unfinished before anything is deleted, its metadata
last, so a run killed while creating or removing it is started afresh by the next. A re-run with
another manifest or other options refuses to mix the two (``--overwrite``, ``overwrite=True``,
starts afresh).

**Robust.** A file that cannot be read (a damaged slide, a volume of the wrong dimensionality, a
table without the gene column) or whose data cannot be the modality (an omics table sharing few
features with the rest of the cohort — another modality's file —, beta values outside [0, 1]) is
recorded for its patient and modality — the message names file, patient and value — and the rest
of the cohort goes on; a worker process that crashes outright is retried alone, then recorded as
failed. Manifest problems (rows left out, paths that do not exist, text in a numeric clinical
column, a modality without a path column) are listed in the summary at the end; a manifest that
gives no file for any modality is an error.

**Reusable.** The preprocessing fitted on the training split (omics feature lists and medians,
clinical encoding and standardisation, all settings) is saved in the store's attributes;
:func:`apply_preprocessing` reuses it unchanged for new patients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .._runlock import exclusive_use
from .manifest import Manifest, ManifestError, ManifestWarning, Source, path_column_names, read_manifest
from .mri import MriConfig, preprocess_mri, resolve_mri_paths
from .preprocess_config import PreprocessConfig, PreprocessReport
from .preprocess_stages import (  # the public names are re-exported: store.py and users import them from here
    _IMAGE_MODALITIES,
    FULL_CHECKSUM_BYTES,  # noqa: F401
    _finalize,
    _fingerprint,
    _image_entry,
    _journal_patient,
    _open_or_create,
    _progress,
    _provenance,
    _read_json,
    _run_omics_stage,
    _write_images,
    checksum,  # noqa: F401
    flush_patient_images,
    journal_complete,  # noqa: F401
    journal_status,  # noqa: F401
    journal_wsi_count,  # noqa: F401
)
from .store import load_preprocessing
from .wsi import PLAUSIBLE_MPP, WsiConfig, tile_slide


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
                # the provenance records the resolution the slide was tiled at and where it came from
                resolution = {"slide_mpp": r.slide_mpp, "from": r.mpp_source, "recorded_mpp": r.recorded_mpp}
                out[m] = {"status": "present", "tiles": r.tiles, "scores": r.scores.tolist(),
                          "coords": r.coords.tolist(), "count": len(r.scores), "slide_mpp": r.slide_mpp,
                          "n_tissue_tiles": r.n_tissue, "warnings": r.warnings,
                          "source": {**_provenance({"": source.path}), "resolution": resolution}}
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


def check_sources(manifest: Manifest, modalities: tuple[str, ...], training: bool = True,
                  strict: bool = False) -> list[str]:
    """Whether the manifest gives files for the requested modalities. Returns warnings (under
    ``strict``, raises them as a :class:`ManifestError`): a modality without a path column; no file
    for any modality when preprocessing new patients (``training`` False: predictions then rest on
    the clinical data alone). No file for any modality, or no patient in the training split, while
    ``training`` is always an error: an all-missing store cannot pre-train the model, and nothing
    can be fitted without training patients."""
    name = manifest.path.name if manifest.path else "manifest"
    if training and not (manifest.split == "train").any():
        counts = ", ".join(f"{s} {int((manifest.split == s).sum())}" for s in sorted(set(manifest.split)))
        raise ManifestError(f"{name}: no patient is in the training split ({counts}): the preprocessing (omics "
                            "features, clinical encoding) is fitted on training patients. For new patients, pass "
                            "--fitted TRAINING_STORE (apply_preprocessing); otherwise set split to train for the "
                            "training patients (an empty split cell is train)")
    listed = {m: sum(s is not None for s in manifest.sources[m]) for m in modalities}
    absent = [m for m in modalities if not manifest.path_columns.get(m) and not listed[m]]
    looked = "; ".join(f"{m}: {', '.join(path_column_names(m))}" for m in absent)
    flags = [c for c in manifest.columns if c.lower().startswith("has_")]
    flag_note = f"; {', '.join(flags)} are availability flags, not file paths" if flags else ""
    notes = []
    if not any(listed.values()):
        if len(absent) == len(modalities):
            what = (f"no file path column for any of {', '.join(modalities)} (looked for {looked}; the columns "
                    f"are {', '.join(manifest.columns)}{flag_note})")
        else:
            cols = ", ".join(c for m in modalities for c in manifest.path_columns.get(m, []))
            what = (f"no patient has a file for any of {', '.join(modalities)} (columns {cols}: every entry is "
                    "empty or a path that does not exist; paths are relative to the manifest's folder)")
        if training:
            raise ManifestError(f"{name}: {what}: the store would hold clinical data alone, which cannot pre-train "
                                f"the model. Add a column of file paths for each of {', '.join(modalities)}")
        notes.append(f"{name}: {what}: every patient lacks every modality; predictions rest on the clinical data "
                     "alone")
    elif absent:
        it, kept = "it" if len(absent) == 1 else "them", ",".join(m for m in modalities if m not in absent)
        notes.append(f"{name}: no file path column for {', '.join(absent)} (looked for {looked}){flag_note}: every "
                     f"patient counts as missing {it}; --modalities {kept} leaves {it} out of the store")
    if strict and notes:
        raise ManifestError("\n".join(notes))
    return notes


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
                                 require_survival=fitted is None, default_split="test" if fitted else "train",
                                 clinical_fitted=fitted["clinical"] if fitted else None)
    notes = check_sources(manifest, cfg.modalities, training=fitted is None, strict=strict)
    for msg in notes:
        warnings.warn(msg, ManifestWarning, stacklevel=2)
    notes = list(manifest.warnings) + notes
    if verbose and (manifest.rejected or notes):
        print(f"{manifest.path.name if manifest.path else 'manifest'}: {len(manifest.rejected)} row(s) left out, "
              f"{len(notes)} warning(s): listed in the summary at the end", file=sys.stderr)
    out = Path(out).resolve()
    # one run at a time writes a store (the lock file lies beside it: --overwrite removes the store folder)
    with exclusive_use(out.parent / f".{out.name}.lock", f"the store {out}",
                       "Wait for it to end (or stop it), or choose another --out."):
        root, resumed = _open_or_create(out, manifest, cfg, fitted, _fingerprint(manifest, cfg, fitted), overwrite)
        if resumed and root.attrs.get("complete"):
            report = PreprocessReport.from_dict(root.attrs["report"])
            report.resumed, report.processed, report.seconds = report.n_patients, 0, time.perf_counter() - start
            if verbose:
                print(report.table(), file=sys.stderr)
            return report
        report = PreprocessReport(store=out, n_patients=len(manifest), counts={}, failures=[],
                                  rejected=list(manifest.rejected), warnings=notes, replaced={})
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
                flush_patient_images(out, root, result["index"], cfg)  # its chunks on disk before its entry
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
    p.add_argument("--wsi-default-mpp", type=float,
                   help="µm/px at level 0 of slides that record no resolution, or an implausible one (outside "
                        f"{PLAUSIBLE_MPP[0]}–{PLAUSIBLE_MPP[1]} µm/px, e.g. a TIFF left at 72 dpi; without it such "
                        "a slide fails)")
    p.add_argument("--wsi-force-mpp", type=float,
                   help="µm/px at level 0 of every slide, instead of what the files record (for a cohort whose "
                        "files record a wrong resolution)")
    p.add_argument("--mri-sequences", help="comma-separated channels among t1,t1ce,t2,flair")
    p.add_argument("--mri-spacing", type=float)
    p.add_argument("--mri-crop", type=int, help="cubic crop side in voxels")
    p.set_defaults(func=run_cli)
    return p


#: the flags that shape the store (with ``--fitted`` the training store's settings are used instead)
_SETTING_FLAGS = ("config", "modalities", "clinical", "codec", "rna_value", "rna_genes", "rna_min_std", "rna_width",
                  "rna_no_log1p", "dnam_values", "dnam_width", "wsi_tile_px", "wsi_mpp", "wsi_candidates", "wsi_keep",
                  "wsi_default_mpp", "wsi_force_mpp", "mri_sequences", "mri_spacing", "mri_crop")


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
        ("wsi", "force_mpp"): args.wsi_force_mpp,
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
    summary and the store's report); 1 under ``--strict`` when any file failed. Manifest warnings
    are printed once, in that summary (not also by Python's warnings machinery)."""
    if args.fitted:  # every setting comes from the training store: a setting given too would be ignored
        values = {k: getattr(args, k) for k in _SETTING_FLAGS}
        given = [f"--{k.replace('_', '-')}" for k, v in values.items() if v is not None and v is not False]
        if given:
            raise ValueError(f"--fitted {args.fitted} applies the training store's preprocessing unchanged (its "
                             f"settings, feature lists and clinical columns), so {', '.join(given)} would be "
                             "ignored: leave them out, or preprocess the new patients without --fitted to fit "
                             "new settings")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ManifestWarning)
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
