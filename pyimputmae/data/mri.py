"""Brain MRI (SimpleITK): several sequences as channels, isotropic resampling, a tumour-centred
crop, z-scoring inside the brain.

One patient → ``(C, D, H, W)`` float32, ``C`` = the configured sequences in order (the paper:
T1ce only; BraTS: T1, T1ce, T2, FLAIR):

1. read each sequence (NIfTI, NRRD, MHA, … or a DICOM series folder), check it is a 3-D scalar
   volume, and that all sequences and masks share one geometry (size, spacing, origin, direction:
   they must be co-registered; this module does not register); NaN voxels (a common background in
   MHA/NRRD exports) are read as 0 with a note, infinite ones are an error;
2. reorient to LPS (so every patient's axes mean the same), resample to ``spacing`` mm
   isotropic (linear for images, nearest for masks);
3. crop ``crop`` voxels centred on the tumour mask's centroid when given (and not empty), else on
   the brain mask's, else on the intensity centroid; outside the volume is padded;
4. z-score each channel with the mean and standard deviation of the brain voxels of the whole
   volume; voxels outside the brain are 0. The brain mask is the given one, else the voxels
   non-zero in any sequence (skull-stripped BraTS convention), else — when that covers nearly the
   whole volume, i.e. the background is not zero — Otsu's threshold of the first sequence.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._fields import check_fields

#: file/folder name endings that identify each role in a BraTS-style case folder
ROLE_ALIASES = {
    "t1": ("t1", "t1n", "t1w", "t1native"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1contrast"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair"),
    "tumor_mask": ("seg", "tumor", "tumour", "tumor_mask", "tumour_mask", "label"),
    "brain_mask": ("brain_mask", "brainmask", "mask_brain"),
}
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


class MriError(ValueError):
    """A volume that cannot be used; the message names the file, the patient and the value."""


@dataclass
class MriConfig:
    """sequences: channel order; spacing: isotropic mm; crop: voxels ``(D, H, W)``;
    geometry_tol: relative tolerance of the geometry check."""

    sequences: tuple[str, ...] = ("t1ce",)
    spacing: float = 1.0
    crop: tuple[int, int, int] = (64, 64, 64)
    geometry_tol: float = 1e-3

    def __post_init__(self) -> None:
        check_fields(self, "MriConfig.")
        self.sequences = tuple(str(s).lower() for s in self.sequences)
        self.crop = tuple(int(c) for c in self.crop)
        bad = [s for s in self.sequences if s not in ("t1", "t1ce", "t2", "flair")]
        if bad or not self.sequences:
            raise ValueError(f"MriConfig.sequences must be among t1, t1ce, t2, flair; got {self.sequences}")
        if len(self.crop) != 3 or min(self.crop) < 1 or self.spacing <= 0:
            raise ValueError(f"MriConfig needs a 3-axis positive crop and spacing > 0; got {self}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sequences"], d["crop"] = list(self.sequences), list(self.crop)
        return d


@dataclass
class MriResult:
    """volume: ``(C, D, H, W)`` float32; brain: ``(D, H, W)`` bool crop of the brain mask;
    center: ``(3,)`` voxel index ``(z, y, x)`` of the crop centre in the resampled volume;
    center_source: "tumor_mask", "brain_mask" or "intensity"; warnings: messages."""

    volume: np.ndarray
    brain: np.ndarray
    center: np.ndarray
    center_source: str
    warnings: list[str]


def _where(path: Path | str, patient: str | None) -> str:
    return f"{path} (patient {patient!r})" if patient else str(path)


def _stem(path: Path) -> str:
    name = path.name.lower()
    for suffix in _VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _role_of(path: Path) -> str | None:
    stem = _stem(path)
    for role in ("brain_mask", "tumor_mask", "t1ce", "flair", "t2", "t1"):  # longest names first
        for alias in ROLE_ALIASES[role]:
            if stem == alias or re.search(rf"(^|[_\-. ]){re.escape(alias)}$", stem):
                return role
    return None


def find_case_files(folder: str | Path) -> dict[str, Path]:
    """Role → file (or DICOM-series subfolder) in a BraTS-style case folder, by name endings
    (``*_t1.nii.gz``, ``*_t1ce.nii.gz``, ``*-t2f.nii.gz``, ``*_seg.nii.gz``, ``T1CE/``, …)."""
    found: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        role = _role_of(p)
        if role and (p.is_dir() or p.name.lower().endswith(_VOLUME_SUFFIXES)):
            found.setdefault(role, p)
    return found


def resolve_mri_paths(source: Any, config: MriConfig, patient: str | None = None) -> dict[str, Path]:
    """Role → path for one patient from a manifest :class:`~pyimputmae.data.manifest.Source`:
    per-sequence columns, a BraTS-style case folder, a DICOM series folder or a single volume
    (the sequence its file name ends with, else the first configured one)."""
    parts = dict(source.parts)
    main = Path(source.path)
    if main.is_dir() and not _is_dicom_dir(main):
        parts = {**find_case_files(main), **parts}
    elif not any(s in parts for s in config.sequences):
        role = _role_of(main)  # a single volume: the sequence its name says, else the first configured
        parts = {role if role in config.sequences else config.sequences[0]: main, **parts}
    missing = [s for s in config.sequences if s not in parts]
    if missing:
        raise MriError(f"{_where(main, patient)}: no {', '.join(missing)} sequence found "
                       f"(have: {', '.join(sorted(parts)) or 'none'}; configured: {', '.join(config.sequences)})")
    return {r: Path(p) for r, p in parts.items() if r in config.sequences or r.endswith("_mask")}


def _is_dicom_dir(path: Path) -> bool:
    """A folder holding a DICOM series (and no NIfTI/NRRD/MHA volumes)."""
    import SimpleITK as sitk

    if not path.is_dir() or any(p.name.lower().endswith(_VOLUME_SUFFIXES[:-1]) for p in path.iterdir()):
        return False
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on folders without a series
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_volume(path: str | Path, patient: str | None = None, role: str = "image") -> Any:
    """A 3-D scalar ``SimpleITK.Image`` from a file or a DICOM series folder (a 4-D file whose
    last axis has size 1 is accepted as 3-D)."""
    import SimpleITK as sitk

    path = Path(path)
    where = f"{_where(path, patient)} [{role}]"
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if len(ids) != 1:
                raise MriError(f"{where}: expected one DICOM series in the folder, found {len(ids)}"
                               + (f" ({', '.join(ids)})" if ids else ""))
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise MriError(f"{where}: cannot read the volume: {str(e).strip().splitlines()[-1]}") from e
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif image.GetDimension() != 3:
        raise MriError(f"{where}: expected a 3-D volume, got a {image.GetDimension()}-D image of size {size}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MriError(f"{where}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} "
                       "components per voxel")
    return image


def check_geometry(images: dict[str, Any], paths: dict[str, Path], patient: str | None = None,
                   tol: float = 1e-3) -> None:
    """Raise :class:`MriError` unless every image has the first one's size, spacing, origin and
    direction (spacing/origin within ``tol`` relative to the spacing, direction within ``tol``)."""
    roles = list(images)
    ref = images[roles[0]]
    for role in roles[1:]:
        img = images[role]
        atol = tol * np.asarray(ref.GetSpacing()) + 1e-6
        checks = (
            ("size", ref.GetSize(), img.GetSize(), lambda a, b: a == b),
            ("spacing", ref.GetSpacing(), img.GetSpacing(), lambda a, b: np.allclose(a, b, rtol=tol, atol=0)),
            ("origin", ref.GetOrigin(), img.GetOrigin(),
             lambda a, b, atol=atol: np.all(np.abs(np.subtract(a, b)) <= atol)),
            ("direction", ref.GetDirection(), img.GetDirection(), lambda a, b: np.allclose(a, b, atol=tol)),
        )
        for what, a, b, same in checks:
            if not same(a, b):
                fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"
                raise MriError(f"{_where(paths[role], patient)}: {role} {what} {fmt(b)} does not match "
                               f"{roles[0]} {fmt(a)} of {paths[roles[0]]}; sequences and masks must be co-registered")


def _finite(image: Any, where: str, notes: list[str]) -> Any:
    """``image`` with its NaN voxels set to 0, noted (NaN outside the brain is a common export convention
    of MHA/NRRD volumes; SimpleITK's NIfTI reader already reads it as 0); :class:`MriError` for ±Inf."""
    import SimpleITK as sitk

    a = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(a.dtype, np.floating) or np.isfinite(a).all():
        return image
    if np.isinf(a).any():
        raise MriError(f"{where}: {int(np.isinf(a).sum())} voxels are infinite (a damaged or wrongly scaled "
                       "volume); convert it again from the scanner data")
    nan = np.isnan(a)
    notes.append(f"{where}: {int(nan.sum())} of {nan.size} voxels are NaN; read as 0 (background)")
    fixed = sitk.GetImageFromArray(np.where(nan, 0, a).astype(a.dtype))
    fixed.CopyInformation(image)
    return fixed


def _resample(image: Any, spacing: float, is_mask: bool) -> Any:
    import SimpleITK as sitk

    old_spacing = np.asarray(image.GetSpacing())
    pixel = sitk.sitkUInt8 if is_mask else sitk.sitkFloat32
    if np.allclose(old_spacing, spacing, rtol=1e-4):
        return sitk.Cast(image > 0, pixel) if is_mask else sitk.Cast(image, pixel)
    size = [max(1, round(n * s / spacing)) for n, s in zip(image.GetSize(), old_spacing)]
    f = sitk.ResampleImageFilter()
    f.SetSize(size)
    f.SetOutputSpacing([spacing] * 3)
    f.SetOutputOrigin(image.GetOrigin())
    f.SetOutputDirection(image.GetDirection())
    f.SetTransform(sitk.Transform())
    f.SetDefaultPixelValue(0)
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear)
    f.SetOutputPixelType(pixel)
    return f.Execute(sitk.Cast(image > 0, sitk.sitkUInt8) if is_mask else image)


def _crop(array: np.ndarray, center: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``array[..., z, y, x]`` cropped to ``size`` around ``center``, zero-padded outside."""
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=array.dtype)
    src, dst = [], []
    for c, n, s in zip(center, array.shape[-3:], size):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - start, lo - start + max(0, hi - lo)))
    out[(..., *dst)] = array[(..., *src)]
    return out


def preprocess_mri(paths: dict[str, str | Path], config: MriConfig | None = None,
                   patient: str | None = None) -> MriResult:
    """One patient's sequences (role → path; roles ``t1``/``t1ce``/``t2``/``flair`` and optional
    ``tumor_mask``/``brain_mask``) → :class:`MriResult`. See the module docstring."""
    import SimpleITK as sitk

    cfg = config or MriConfig()
    paths = {r: Path(p) for r, p in paths.items()}
    missing = [s for s in cfg.sequences if s not in paths]
    if missing:
        raise MriError(f"patient {patient!r}: no path for sequence(s) {missing}")
    roles = [*cfg.sequences, *(r for r in ("tumor_mask", "brain_mask") if r in paths)]
    images = {r: read_volume(paths[r], patient, r) for r in roles}
    check_geometry(images, paths, patient, cfg.geometry_tol)
    notes: list[str] = []
    for s in cfg.sequences:
        images[s] = _finite(images[s], f"{_where(paths[s], patient)} [{s}]", notes)
    images = {r: sitk.DICOMOrient(img, "LPS") for r, img in images.items()}
    images = {r: _resample(img, cfg.spacing, r.endswith("_mask")) for r, img in images.items()}
    channels = np.stack([sitk.GetArrayFromImage(images[s]).astype(np.float32) for s in cfg.sequences])

    if "brain_mask" in images:
        brain = sitk.GetArrayFromImage(images["brain_mask"]) > 0
        if not brain.any():
            raise MriError(f"{_where(paths['brain_mask'], patient)}: the brain mask is empty")
    else:
        brain = np.any(channels != 0, axis=0)
        if brain.mean() > 0.9:
            otsu = sitk.OtsuThreshold(images[cfg.sequences[0]], 0, 1)
            brain = sitk.GetArrayFromImage(otsu) > 0
        if not brain.any():
            raise MriError(f"{_where(paths[cfg.sequences[0]], patient)}: the volume is empty (all zero)")

    center, source = None, ""
    if "tumor_mask" in images:
        tumor = sitk.GetArrayFromImage(images["tumor_mask"]) > 0
        if tumor.any():
            center, source = np.argwhere(tumor).mean(axis=0), "tumor_mask"
        else:
            notes.append(f"{_where(paths['tumor_mask'], patient)}: the tumour mask is empty; crop centred on the brain")
    if center is None and "brain_mask" in images:
        center, source = np.argwhere(brain).mean(axis=0), "brain_mask"
    if center is None:
        w = np.clip(channels[0], 0, None)
        grid = np.indices(w.shape).reshape(3, -1)
        center, source = (grid * w.ravel()).sum(axis=1) / max(w.sum(), 1e-12), "intensity"
    center = np.rint(center).astype(np.int64)

    out = np.zeros_like(channels)
    for c, name in enumerate(cfg.sequences):
        vals = channels[c][brain]
        std = float(vals.std())
        if not np.isfinite(std) or std == 0:
            notes.append(f"{_where(paths[name], patient)}: {name} is constant inside the brain; left at 0")
            continue
        out[c][brain] = (vals - vals.mean()) / std
    return MriResult(volume=np.ascontiguousarray(_crop(out, center, cfg.crop)),
                     brain=_crop(brain, center, cfg.crop), center=center, center_source=source, warnings=notes)
