"""The store's whole-cohort loading: the fast chunk reader agrees with zarr's own for every codec,
missing patients read as zeros, damaged chunks are named, and the benchmark runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyimputmae.data.bench_store import bench_store_load, write_synthetic_store
from pyimputmae.data.store import (
    StoreDataset,
    StoreError,
    create_store,
    load_cohort,
    make_dataloader,
    read_patients,
)

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


def test_dataloader_selects_splits_and_folds_like_the_cohort(tmp_path: Path):
    """make_dataloader gave an empty loader for a misspelt split or an unknown fold."""
    path = write_synthetic_store(tmp_path / "syn.zarr", n_patients=10, sizes="small")
    cohort = load_cohort(path)
    for split, fold in (("test", None), ("train", 1), ("val", 1)):
        loader = make_dataloader(path, split=split, fold=fold, batch_size=10, modalities=["rna"])
        assert [pid for b in loader for pid in b.ids] == [cohort.ids[i] for i in cohort.indices(split, fold)]
    with pytest.raises(ValueError, match=r"unknown split 'tset': choose one of train, val, test \(this cohort has "
                                         r"test, train\)"):
        make_dataloader(path, split="tset")
    with pytest.raises(ValueError, match=r"fold 7 is not a cross-validation fold of this cohort: its training folds "
                                         r"are 0, 1, 2, 3"):
        make_dataloader(path, split="val", fold=7)


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


def _numbered_tiles_store(path: Path, counts: list[int], keep: int = 8) -> Path:
    """A complete slides-only store whose patient ``i`` has ``counts[i]`` tiles, tile ``k`` all ``k``."""
    ids = [f"P{i}" for i in range(len(counts))]
    root = create_store(path, ids=ids, shapes={"wsi": (3, 4, 4)}, n_clinical=0, wsi_keep=keep)
    for i, n in enumerate(counts):
        if n:
            root["wsi/tiles"][i] = np.arange(keep, dtype=np.uint8)[:, None, None, None] * (np.arange(keep) < n)[
                :, None, None, None].astype(np.uint8) * np.ones((keep, 3, 4, 4), np.uint8)
    root["wsi/count"][:] = counts
    root["table/present"][:] = np.asarray(counts)[:, None] > 0
    root["table/status"][:] = (np.asarray(counts)[:, None] > 0).astype(np.int8)
    root.attrs["complete"] = True
    return path


def _drawn_tiles(loader: torch.utils.data.DataLoader, epochs: int = 3) -> list[dict[str, int]]:
    """Per pass over ``loader``: patient → the stored tile it gave, with torch's global RNG used
    between batches (as a training step does)."""
    passes = []
    for _ in range(epochs):
        drawn = {}
        for b in loader:
            drawn.update({pid: round(float(b.inputs["wsi"][r, 0, 0, 0]) * 255) for r, pid in enumerate(b.ids)})
            torch.rand(100)
        passes.append(drawn)
    return passes


def test_random_tiles_depend_only_on_seed_epoch_and_patient(tmp_path: Path):
    counts = [8, 8, 3, 0, 8, 8, 5, 8, 8, 8, 2, 8]
    path = _numbered_tiles_store(tmp_path / "tiles.zarr", counts)

    def draws(num_workers: int, seed: int = 7, **kw) -> list[dict[str, int]]:
        return _drawn_tiles(make_dataloader(path, wsi_tile="random", seed=seed, batch_size=5, shuffle=True,
                                            num_workers=num_workers, **kw))

    torch.manual_seed(0)
    in_process = draws(0)
    torch.manual_seed(123)  # another state of the global RNG changes nothing
    assert draws(0) == in_process
    assert draws(2) == in_process  # nor do worker processes (and which one reads which patient)
    # a tile among the patient's stored ones; each pass draws anew; another seed, other tiles
    for drawn in in_process:
        assert all(0 <= drawn[f"P{i}"] < max(n, 1) for i, n in enumerate(counts))
    assert in_process[0] != in_process[1] != in_process[2]
    assert len({d["P0"] for d in in_process} | {d["P1"] for d in in_process}) > 1
    assert draws(0, seed=8) != in_process
    # the same tiles in the same pass, whatever the order and the batches
    assert _drawn_tiles(make_dataloader(path, wsi_tile="random", seed=7, batch_size=12)) == in_process
    # the dataset alone: a seed fixes each patient's tile (epoch 0, or the one given)
    ds = StoreDataset(path, wsi_tile="random", seed=7)
    assert [round(float(ds[0]["inputs"]["wsi"][0, 0, 0]) * 255) for _ in range(5)] == [in_process[0]["P0"]] * 5
    assert round(float(ds[(0, 2)]["inputs"]["wsi"][0, 0, 0]) * 255) == in_process[2]["P0"]


class _ByTileCount(torch.utils.data.Sampler):
    """A user's batch sampler: patients grouped by how many tiles they have (a bucketing sampler),
    the groups in a shuffled order that changes from pass to pass."""

    def __init__(self, counts: list[int], seed: int) -> None:
        self.counts, self.rng = counts, np.random.default_rng(seed)

    def __iter__(self):
        groups = [[i for i, c in enumerate(self.counts) if c == n] for n in sorted(set(self.counts))]
        return iter([groups[g] for g in self.rng.permutation(len(groups))])

    def __len__(self) -> int:
        return len(set(self.counts))


def test_a_batch_sampler_makes_the_batches_and_keeps_the_random_tiles(tmp_path: Path):
    """make_dataloader passed its default batch_size along with a batch_sampler, and torch's
    DataLoader refused the pair ("batch_sampler option is mutually exclusive with batch_size ...");
    and with workers the first pass was counted twice (the loader makes a sampler iterator it never
    uses), so its tiles were those of the next pass."""
    counts = [8, 8, 3, 0, 8, 8, 5, 8, 8, 8, 2, 8]
    path = _numbered_tiles_store(tmp_path / "tiles.zarr", counts)
    groups = {n: [f"P{i}" for i, c in enumerate(counts) if c == n] for n in set(counts)}
    reference = _drawn_tiles(make_dataloader(path, wsi_tile="random", seed=7, batch_size=12))
    for workers in (0, 2):
        loader = make_dataloader(path, wsi_tile="random", seed=7, num_workers=workers,
                                 batch_sampler=_ByTileCount(counts, seed=workers))
        assert len(loader) == len(groups)
        batches = [b.ids for b in loader]
        assert sorted(map(sorted, batches)) == sorted(map(sorted, groups.values()))
        # the tiles depend on (seed, epoch, patient) alone: the same as in batches of 12, pass by pass
        assert _drawn_tiles(loader, epochs=2) == reference[1:]
    plain = make_dataloader(path, modalities=["wsi"], batch_sampler=torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(range(len(counts))), batch_size=5, drop_last=True))
    assert [b.ids for b in plain] == [[f"P{i}" for i in range(5)], [f"P{i}" for i in range(5, 10)]]
    assert len(next(iter(make_dataloader(path))).ids) == 12  # without one, batches of 24 as before
    for contradiction, shown in (({"batch_size": 4}, "batch_size=4"), ({"shuffle": True}, "shuffle=True"),
                                 ({"drop_last": True, "batch_size": 2}, "batch_size=2, drop_last=True"),
                                 ({"sampler": torch.utils.data.SequentialSampler(range(12))},
                                  "sampler=SequentialSampler")):
        with pytest.raises(ValueError, match=rf"tiles.zarr'\): batch_sampler=_ByTileCount makes the batches, so it "
                                             rf"alone decides their size, order and last batch, but {shown} was also "
                                             r"given: leave it out \(or set it on the batch sampler\)"):
            make_dataloader(path, batch_sampler=_ByTileCount(counts, 0), **contradiction)
