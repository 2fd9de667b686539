"""The store's whole-cohort loading: the fast chunk reader agrees with zarr's own for every codec,
missing patients read as zeros, damaged chunks are named, and the benchmark runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyimputmae.data.bench_store import bench_store_load, write_synthetic_store
from pyimputmae.data.store import StoreDataset, StoreError, create_store, load_cohort, read_patients

pytest.importorskip("zarr", reason="zarr>=3 writes the store")


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_fast_reader_matches_zarr(tmp_path: Path, codec: str):
    root = create_store(tmp_path / "s.zarr", ids=[f"P{i}" for i in range(7)],
                        shapes={"wsi": (3, 8, 8), "mri": (2, 4, 4, 4)}, n_clinical=0, wsi_keep=3, codec=codec)
    rng = np.random.default_rng(0)
    mri = rng.standard_normal((7, 2, 4, 4, 4)).astype(np.float32)
    tiles = rng.integers(0, 256, (7, 3, 3, 8, 8), dtype=np.uint8)
    for i in (0, 2, 3, 6):  # P1, P4, P5 never written: no chunk files
        root["mri/data"][i] = mri[i]
        root["wsi/tiles"][i] = tiles[i]
    rows = np.array([6, 0, 1, 3, 4])
    for arr, lead in ((root["mri/data"], ()), (root["wsi/tiles"], (0,)), (root["wsi/tiles"], (2,))):
        fast = read_patients(arr, rows, lead)
        np.testing.assert_array_equal(fast, arr.get_orthogonal_selection((rows, *lead)))
    np.testing.assert_array_equal(read_patients(root["mri/data"], rows)[2], 0)


def test_damaged_chunk_is_named(tmp_path: Path):
    root = create_store(tmp_path / "s.zarr", ids=["P0", "P1"], shapes={"mri": (1, 8, 8, 8)}, n_clinical=0)
    root["mri/data"][1] = np.ones((1, 8, 8, 8), np.float32) * np.arange(8, dtype=np.float32)
    chunk = tmp_path / "s.zarr" / "mri" / "data" / "c" / "1" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(StoreError, match=r"mri/data/c/1/0/0/0/0: damaged chunk of patient row 1"):
        read_patients(root["mri/data"], np.array([0, 1]))


def test_synthetic_store_loads_into_memory(tmp_path: Path):
    path = write_synthetic_store(tmp_path / "syn.zarr", n_patients=10, sizes="small")
    c = load_cohort(path)
    assert len(c) == 10 and c.present.all()
    assert {m: tuple(t.shape[1:]) for m, t in c.inputs.items()} == {
        "rna": (1, 1024), "dnam": (1, 1536), "wsi": (3, 64, 64), "mri": (1, 32, 32, 32)}
    assert all(t.dtype == torch.float32 for t in c.inputs.values())
    assert list(c.split).count("test") == 2 and c.indices("train", fold=0).size > 0


def test_bench_store_load_reports_load_and_stream(tmp_path: Path):
    r = bench_store_load(tmp_path, n_patients=24, sizes="small", repeats=1, device="cpu", stream_workers=2,
                         stream_batches=3, batch_size=4)
    assert r["n_patients"] == 24 and r["codec"] == "lz4" and r["memory_mb"] > 0 and r["store_mb"] > 0
    assert r["load_s"] > 0 and r["load_cpu_s"] >= 0 and r["stream_patients_per_s"] > 0


def test_a_store_of_another_format_version_is_refused(tmp_path: Path):
    path = write_synthetic_store(tmp_path / "v.zarr", n_patients=4, sizes="small")
    import zarr

    zarr.open_group(str(path), mode="r+").attrs.update({"format_version": 2, "package_version": "9.0"})
    for read in (load_cohort, StoreDataset):
        with pytest.raises(StoreError, match=r"v.zarr is a pyimputmae store of format version 2 \(written by "
                           r"pyimputmae 9.0\); this pyimputmae reads version 1: write the store again"):
            read(path)
