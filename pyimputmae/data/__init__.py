"""Data: the in-memory cohort, the synthetic demo cohort, real-data readers and the zarr store.

Heavy readers (openslide, SimpleITK, zarr, pandas) are imported inside the functions that use them,
so everything here imports with torch and numpy alone. ``preprocess()`` itself stays in
:mod:`pyimputmae.data.preprocess`: exported here it would shadow that submodule.
"""

from .cohort import Batch, Cohort
from .manifest import Manifest, ManifestError, ManifestWarning, Source, read_manifest
from .mri import MriConfig, MriError, preprocess_mri
from .omics import OmicsConfig, OmicsError, OmicsWarning, apply_omics, fit_omics, read_gdc_star_counts
from .preprocess import PreprocessConfig, PreprocessReport, apply_preprocessing
from .store import (
    StoreDataset,
    StoreError,
    collate_batch,
    completed_patients,
    draw_wsi_tiles,
    load_cohort,
    load_preprocessing,
    load_wsi_bank,
    make_dataloader,
    open_store,
    read_patients,
)
from .synthetic import make_cohort
from .wsi import SlideError, WsiConfig, tile_slide

__all__ = [
    "Batch",
    "Cohort",
    "Manifest",
    "ManifestError",
    "ManifestWarning",
    "MriConfig",
    "MriError",
    "OmicsConfig",
    "OmicsError",
    "OmicsWarning",
    "PreprocessConfig",
    "PreprocessReport",
    "SlideError",
    "Source",
    "StoreDataset",
    "StoreError",
    "WsiConfig",
    "apply_omics",
    "apply_preprocessing",
    "collate_batch",
    "completed_patients",
    "draw_wsi_tiles",
    "fit_omics",
    "load_cohort",
    "load_preprocessing",
    "load_wsi_bank",
    "make_cohort",
    "make_dataloader",
    "open_store",
    "preprocess_mri",
    "read_gdc_star_counts",
    "read_manifest",
    "read_patients",
    "tile_slide",
]
