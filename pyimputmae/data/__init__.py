"""Data: the in-memory cohort, the synthetic demo cohort, real-data readers and the zarr store.

Heavy readers (openslide, SimpleITK, zarr) are imported inside the functions that use them.
"""

from .cohort import Batch, Cohort

__all__ = ["Batch", "Cohort"]
