"""The zarr v3 store written by ``pyimputmae preprocess``: layout, whole-cohort loading, and a
per-patient ``Dataset`` for stores larger than memory.

Layout (``N`` patients in manifest order; every per-patient array has the patient axis first). The
omics arrays, written once for the whole cohort, are chunked by blocks of ``omics_block`` (64)
patients — few, large chunks load fast and a random patient still costs one 4 MB decode; the
image arrays, written patient by patient during preprocessing, have one chunk per patient (per
tile for slides), so a patient's write never touches another's data and chunks are large
enough (196 KB–1 MB) that per-chunk overhead does not matter when the cohort is loaded::

    STORE.zarr/                    attrs: format, version, ids, modalities, shapes, clinical_names,
                                   split_codes, preprocessing (fitted on train), provenance,
                                   report, complete (set last)
      table/time      (N,)   f4    table/event (N,) f4        table/split (N,) i1 (split_codes)
      table/fold      (N,)   i2    table/clinical (N, K) f4   encoded (0/1, one-hot, numbers), NaN = unknown
      table/present   (N, M) bool  table/status (N, M) i1 (STATUS)
      rna/data   (N, 1, L) f4      rna/replaced (N,) i4       NaN/Inf set to training medians
      dnam/data  (N, 1, L) f4      dnam/replaced (N,) i4
      wsi/tiles  (N, k, 3, T, T) u1 (one chunk per tile, best first)   wsi/count (N,) i2
      wsi/scores (N, k) f4         wsi/coords (N, k, 2) i8   (level-0 x, y)
      mri/data   (N, C, D, H, W) f4                          mri/center (N, 3) i4
      provenance/                  attrs: per patient and modality, source path and checksum
                                   (a slide's also its "resolution": slide_mpp, the level-0 µm/px it
                                   was tiled at; from: "file", "force_mpp" or "default_mpp";
                                   recorded_mpp: what the file records, null if nothing usable)

Missing patients are never written (zarr reads them as the fill value 0). Chunks are compressed
with LZ4 inside Blosc with byte shuffle, level 1 (``codec="lz4"``): the fastest to decode of the
options measured (``"zstd"`` level 1 gives ~10 % smaller stores but loads slower; ``"none"``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cohort import Batch, Cohort, split_rows

FORMAT = "pyimputmae-store"
FORMAT_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
#: table/status values
STATUS = {"pending": 0, "present": 1, "missing": 2, "failed": 3}
WSI_TILE_MODES = ("best", "mean", "random")


class StoreError(RuntimeError):
    """A store that is missing, incomplete or of another format; the message says what to do."""


def compressors(codec: str) -> list[Any] | None:
    """zarr v3 compressors for ``codec``: "lz4" (Blosc LZ4, byte shuffle, level 1), "zstd" (level 1)
    or "none"."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "zstd":
        return [ZstdCodec(level=1)]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")]
    if codec == "none":
        return None
    raise ValueError(f"codec must be 'zstd', 'lz4' or 'none', got {codec!r}")


def create_store(path: str | Path, *, ids: list[str], shapes: dict[str, tuple[int, ...]], n_clinical: int,
                 wsi_keep: int = 1, codec: str = "lz4", omics_block: int = 64,
                 attrs: dict[str, Any] | None = None) -> Any:
    """Create an empty store (arrays filled with 0) and return its root ``zarr.Group``.

    shapes: modality → per-patient shape ``(C, *S)`` (``wsi``: ``(3, T, T)``, stored as ``k =
    wsi_keep`` uint8 tiles)."""
    import zarr

    n = len(ids)
    comp = compressors(codec)
    mods = list(shapes)
    # the attributes go into the group's first metadata write: from its first file on, the folder
    # reads as a pyimputmae store (unfinished), so a run killed while creating it is started afresh
    root = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={
        "format": FORMAT, "format_version": FORMAT_VERSION, "ids": list(ids), "modalities": mods,
        "shapes": {m: [int(x) for x in s] for m, s in shapes.items()}, "split_codes": SPLIT_CODES,
        "status_codes": STATUS, "codec": codec, "complete": False, **(attrs or {}),
    })

    def arr(name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...] | None = None) -> None:
        root.create_array(name, shape=shape, chunks=chunks or shape, dtype=dtype, fill_value=0,
                          compressors=comp if chunks else None)

    arr("table/time", (n,), "float32")
    arr("table/event", (n,), "float32")
    arr("table/split", (n,), "int8")
    arr("table/fold", (n,), "int16")
    arr("table/clinical", (n, n_clinical), "float32")
    arr("table/present", (n, len(mods)), "bool")
    arr("table/status", (n, len(mods)), "int8")
    for m, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if m == "wsi":
            arr("wsi/tiles", (n, wsi_keep, *shape), "uint8", (1, 1, *shape))
            arr("wsi/count", (n,), "int16")
            arr("wsi/scores", (n, wsi_keep), "float32")
            arr("wsi/coords", (n, wsi_keep, 2), "int64")
        else:
            block = 1 if m == "mri" else max(1, min(omics_block, n))
            arr(f"{m}/data", (n, *shape), "float32", (block, *shape))
            if m == "mri":
                arr("mri/center", (n, 3), "int32")
            else:
                arr(f"{m}/replaced", (n,), "int32")
    root.create_group("provenance")
    return root


def open_store(path: str | Path, *, require_complete: bool = True) -> Any:
    """The store's root group, read-only; :class:`StoreError` for a missing, foreign or (with
    ``require_complete``) unfinished store."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a zarr store (no zarr.json); create it with `pyimputmae preprocess`")
    root = zarr.open_group(str(path), mode="r")
    if root.attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is a zarr store but not one written by pyimputmae preprocess")
    version = root.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} is a pyimputmae store of format version {version} (written by pyimputmae "
                         f"{root.attrs.get('package_version', '?')}); this pyimputmae reads version {FORMAT_VERSION}: "
                         "write the store again with `pyimputmae preprocess`, or use the version that wrote it")
    if require_complete and not root.attrs.get("complete", False):
        raise StoreError(f"{path} is incomplete (preprocessing was interrupted); run `pyimputmae preprocess` "
                         "again with the same manifest and options to finish it, or pass allow_incomplete=True")
    return root


def completed_patients(path: str | Path) -> np.ndarray:
    """``(N,)`` bool: which patients read as complete. A finished store: all; an interrupted one:
    those whose every modality was written before the journal marked them (see ``preprocess``)."""
    from .preprocess import journal_complete

    root = open_store(path, require_complete=False)
    if root.attrs.get("complete", False):
        return np.ones(len(root.attrs["ids"]), dtype=bool)
    return journal_complete(Path(path), len(root.attrs["ids"]))


def load_preprocessing(store: str | Path | Any) -> dict[str, Any]:
    """The preprocessing fitted on the training split, as a plain dict: ``{"config", "clinical",
    "rna", "dnam", "modalities", "shapes", "package_version", "source"}`` — what
    :func:`pyimputmae.data.preprocess.apply_preprocessing` reuses for new patients."""
    root = open_store(store) if isinstance(store, str | Path) else store
    fitted = json.loads(json.dumps(root.attrs["preprocessing"]))
    fitted["source"] = str(getattr(root.store, "root", store))
    return fitted


def _split_names(codes: np.ndarray) -> np.ndarray:
    names = np.empty(len(codes), dtype=object)
    for name, code in SPLIT_CODES.items():
        names[codes == code] = name
    return names.astype(str)


def _chunk_decoder(arr: Any) -> Any | None:
    """The numcodecs decoder of a per-patient chunked local array this module wrote (bytes,
    little-endian, then Blosc, Zstd or nothing; fill value 0); ``None`` for any other layout."""
    from numcodecs import Blosc, Zstd
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    codecs = list(getattr(meta, "codecs", ()))
    if (not isinstance(arr.store, LocalStore) or getattr(meta, "zarr_format", 2) != 3 or not codecs
            or not isinstance(codecs[0], BytesCodec) or str(getattr(codecs[0].endian, "value", "little")) != "little"
            or len(codecs) > 2 or arr.chunks[0] != 1 or arr.dtype.byteorder == ">" or meta.fill_value != 0):
        return None
    if len(codecs) == 1:
        return "raw"
    return {BloscCodec: Blosc, ZstdCodec: Zstd}.get(type(codecs[1]), lambda: None)()


def read_patients(arr: Any, rows: np.ndarray, lead: tuple[int, ...] = (), threads: int | None = None) -> np.ndarray:
    """``arr[rows, *lead]`` of an array with one chunk per patient (per tile) — ``(len(rows), *rest)``.

    The fast path of whole-cohort loading: each chunk file is read and decoded by zarr's own codec
    implementation (numcodecs Blosc/Zstd) straight into its place in the output, in ``threads``
    threads (the decoders release the GIL) — ~5× less CPU than zarr's general reader, which
    decodes into a temporary buffer and copies. A missing chunk (a patient without the modality)
    reads as zeros. Arrays of any other layout or store go through zarr.
    """
    from concurrent.futures import ThreadPoolExecutor

    decoder = _chunk_decoder(arr)
    chunk = arr.chunks[1 + len(lead):]
    if decoder is None or arr.chunks[1: 1 + len(lead)] != (1,) * len(lead) or chunk != arr.shape[1 + len(lead):]:
        return arr.get_orthogonal_selection((rows, *lead))
    out = np.empty((len(rows), *chunk), dtype=arr.dtype)
    folder = Path(arr.store.root) / arr.path
    zeros = (0,) * len(chunk)

    def one(k: int) -> None:
        key = arr.metadata.encode_chunk_key((int(rows[k]), *lead, *zeros))
        try:
            data = (folder / key).read_bytes()
        except FileNotFoundError:
            out[k] = 0
            return
        try:
            if decoder == "raw":
                out[k] = np.frombuffer(data, dtype=arr.dtype).reshape(chunk)
            else:
                decoder.decode(data, out=out[k])
        except (RuntimeError, ValueError) as e:
            raise StoreError(f"{folder / key}: damaged chunk of patient row {rows[k]}: {e}") from e

    with ThreadPoolExecutor(threads or max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(rows))))
    return out


def _wsi_from_tiles(tiles: Any, count: np.ndarray, rows: np.ndarray, mode: str) -> np.ndarray:
    """``(len(rows), 3, T, T)``: the best tile (uint8, as stored) or the mean of the stored tiles
    (float32, 0–255)."""
    if mode == "best":
        return read_patients(tiles, rows, (0,))
    n = np.maximum(count[rows], 1)
    out = np.zeros((len(rows), *tiles.shape[2:]), dtype=np.float32)
    for k in range(int(n.max(initial=1))):  # one tile rank at a time: memory of one tile per patient
        out[n > k] += read_patients(tiles, rows[n > k], (k,))
    return out / n[:, None, None, None]


def load_cohort(path: str | Path, device: torch.device | str = "cpu", *, modalities: list[str] | None = None,
                wsi_tile: str = "best", allow_incomplete: bool = False, concurrency: int = 64) -> Cohort:
    """The whole store as a :class:`~pyimputmae.data.cohort.Cohort` in memory (on ``device``).

    wsi_tile: "best" (the best-scored tile; deterministic) or "mean" (all stored tiles averaged);
    training that draws among tiles uses :func:`load_wsi_bank`. allow_incomplete: load only the
    patients that read as complete from an interrupted store. ``concurrency``: chunks zarr reads
    in parallel (the omics arrays; slides and MRI take :func:`read_patients`' fast path)."""
    import zarr

    if wsi_tile not in ("best", "mean"):
        raise ValueError(f"load_cohort: wsi_tile must be 'best' or 'mean' (training draws: load_wsi_bank), "
                         f"got {wsi_tile!r}")
    root = open_store(path, require_complete=not allow_incomplete)
    attrs = root.attrs.asdict()
    all_mods = list(attrs["modalities"])
    mods = all_mods if modalities is None else list(modalities)
    unknown = [m for m in mods if m not in all_mods]
    if unknown:
        raise StoreError(f"{path}: no modality {unknown}; the store has {all_mods}")
    readable, present_all = _readable(root, Path(path))
    rows = np.flatnonzero(readable)
    present = present_all[rows][:, [all_mods.index(m) for m in mods]]
    inputs: dict[str, torch.Tensor] = {}
    with zarr.config.set({"async.concurrency": concurrency}):
        for j, m in enumerate(mods):
            if m in ("wsi", "mri"):
                # one chunk per patient: read only the patients that have it (MRI: 165 of 1,104)
                have = np.flatnonzero(present[:, j])
                if m == "wsi":
                    part = _wsi_from_tiles(root["wsi/tiles"], _wsi_count(root, Path(path)), rows[have], wsi_tile)
                else:
                    part = read_patients(root["mri/data"], rows[have])
                if len(have) == len(rows):
                    x = part
                else:  # zeros for the patients without it (no chunk was written for them)
                    x = np.zeros((len(rows), *part.shape[1:]), dtype=part.dtype)
                    x[have] = part
            else:
                arr = root[f"{m}/data"]
                x = arr[:] if len(rows) == len(readable) else arr.get_orthogonal_selection((rows,))
            t = torch.from_numpy(x).to(device)
            # slide tiles travel as uint8 (4× less to copy to the device) and become [0, 1] there
            inputs[m] = t.float().div_(255.0) if m == "wsi" else t
        table = {k: root[f"table/{k}"].get_orthogonal_selection((rows,))
                 for k in ("time", "event", "split", "fold", "clinical")}
    return Cohort(
        inputs=inputs, present=torch.from_numpy(present).to(device),
        clinical=torch.from_numpy(table["clinical"].astype(np.float32)).to(device),
        clinical_names=list(attrs.get("clinical_names", [])),
        time=torch.from_numpy(table["time"].astype(np.float32)).to(device),
        event=torch.from_numpy(table["event"].astype(np.float32)).to(device),
        split=_split_names(table["split"]), fold=table["fold"].astype(np.int64),
        ids=[attrs["ids"][i] for i in rows], attrs=attrs,
    )


def _readable(root: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` bool, the patients that read as complete (all of a finished store), and ``(N, M)``
    bool, which stored modality each has: an unfinished store's from its journal (the table is
    written last)."""
    if root.attrs.get("complete", False):
        return np.ones(len(root.attrs["ids"]), dtype=bool), root["table/present"][:].astype(bool)
    n = len(root.attrs["ids"])
    return completed_patients(path), _journal_present(path, list(root.attrs["modalities"]), n)


def _journal_present(path: Path, mods: list[str], n: int) -> np.ndarray:
    from .preprocess import journal_status

    return journal_status(path, mods, n) == STATUS["present"]


def _wsi_count(root: Any, path: Path) -> np.ndarray:
    """``(N,)`` slide tiles stored per patient: ``wsi/count`` of a finished store, the journal's of
    an unfinished one (``wsi/count`` is written last, and reads as 0 until then)."""
    from .preprocess import journal_wsi_count

    if root.attrs.get("complete", False):
        return root["wsi/count"][:]
    return journal_wsi_count(path, len(root.attrs["ids"]))


def load_wsi_bank(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All stored tiles for training-time random draws: ``(tiles (N, k, 3, T, T) uint8, count (N,)
    int64)`` — uint8 keeps them 4× smaller than float; :func:`draw_wsi_tiles` converts per batch."""
    root = open_store(path)
    tiles = torch.from_numpy(root["wsi/tiles"][:])
    count = torch.from_numpy(root["wsi/count"][:].astype(np.int64))
    return tiles.to(device), count.to(device)


def draw_wsi_tiles(tiles: torch.Tensor, count: torch.Tensor, idx: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One tile per row, uniformly among each patient's ``count`` stored tiles (training only):
    ``(B, 3, T, T)`` float32 in [0, 1], on the bank's device (no host round trip)."""
    idx = idx.to(tiles.device)
    n = count.index_select(0, idx).clamp(min=1)
    u = torch.rand(idx.shape[0], generator=generator, device=generator.device if generator else tiles.device)
    j = (u.to(tiles.device) * n).long().clamp(max=tiles.shape[1] - 1)
    return tiles[idx, j].float() / 255.0


class StoreDataset(torch.utils.data.Dataset):
    """Per-patient random access to a store (for stores larger than memory).

    Item ``i`` (a row of ``indices``) → dict ``{"inputs": {m: (C, *S) float32}, "present": (M,)
    bool, "clinical": (K,) float32, "time": (), "event": (), "id": str}``; :func:`collate_batch`
    makes a :class:`~pyimputmae.data.cohort.Batch`. wsi_tile: "best", "mean" or "random" (a uniform
    draw among the stored tiles, for training). seed: with "random", the tile of item ``i`` depends
    only on ``(seed, epoch, store row)`` — an item may be given as ``(i, epoch)``, as
    :func:`make_dataloader`'s sampler does; a plain ``i`` is epoch 0 —, whatever process reads it
    and whatever else used torch's random numbers; ``None``: a fresh draw from torch's global RNG
    at each read. The zarr arrays are opened lazily in each process, so the dataset is safe to use
    with forked DataLoader workers. allow_incomplete: stream only the patients that read as
    complete from an interrupted store (as :func:`load_cohort`; ``indices`` must be among them).
    """

    def __init__(self, path: str | Path, indices: np.ndarray | list[int] | None = None, *,
                 modalities: list[str] | None = None, wsi_tile: str = "best", allow_incomplete: bool = False,
                 seed: int | None = None) -> None:
        if wsi_tile not in WSI_TILE_MODES:
            raise ValueError(f"wsi_tile must be one of {WSI_TILE_MODES}, got {wsi_tile!r}")
        root = open_store(path, require_complete=not allow_incomplete)
        attrs = root.attrs.asdict()
        self.path = Path(path)
        self.allow_incomplete = allow_incomplete
        self.all_modalities = list(attrs["modalities"])
        self.modalities = self.all_modalities if modalities is None else list(modalities)
        self.wsi_tile = wsi_tile
        self.seed = seed
        self.ids: list[str] = list(attrs["ids"])
        readable, present = _readable(root, self.path)
        self.indices = np.flatnonzero(readable) if indices is None else np.asarray(indices, dtype=np.int64)
        unfinished = [self.ids[i] for i in self.indices if not readable[i]]
        if unfinished:
            raise StoreError(f"{path} is incomplete and patients {unfinished[:5]} (of {len(unfinished)}) were "
                             "not written yet; finish it with `pyimputmae preprocess`, or leave them out of indices")
        cols = [self.all_modalities.index(m) for m in self.modalities]
        # the small tables live in memory; only the modality arrays are read per item
        self.present = present[:, cols]
        self.clinical = root["table/clinical"][:].astype(np.float32)
        self.time = root["table/time"][:].astype(np.float32)
        self.event = root["table/event"][:].astype(np.float32)
        self.split = _split_names(root["table/split"][:])
        self.fold = root["table/fold"][:].astype(np.int64)
        self.wsi_count = _wsi_count(root, self.path) if "wsi" in self.all_modalities else None
        self._arrays: dict[str, Any] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> dict[str, Any]:
        import os

        if self._arrays is None or self._pid != os.getpid():
            root = open_store(self.path, require_complete=not self.allow_incomplete)
            self._arrays = {m: root["wsi/tiles" if m == "wsi" else f"{m}/data"] for m in self.modalities}
            self._pid = os.getpid()
        return self._arrays

    def _tile_index(self, i: int, n: int, epoch: int) -> int:
        """The stored tile (of ``n``) that store row ``i`` gives in ``epoch`` (wsi_tile "random")."""
        if self.seed is None:
            return int(torch.randint(n, ()))
        return int(np.random.default_rng([self.seed % 2**64, epoch, i]).integers(n))

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        item, epoch = item if isinstance(item, tuple) else (item, 0)
        i = int(self.indices[item])
        arrays = self._open()
        inputs = {}
        for m in self.modalities:
            if m != "wsi":
                inputs[m] = torch.from_numpy(np.ascontiguousarray(arrays[m][i]))
                continue
            n = max(int(self.wsi_count[i]), 1)
            if self.wsi_tile == "mean":
                x = arrays[m][i, :n].astype(np.float32).mean(0)
            else:
                j = self._tile_index(i, n, epoch) if self.wsi_tile == "random" else 0
                x = arrays[m][i, j].astype(np.float32)
            inputs[m] = torch.from_numpy(x / 255.0)
        return {"inputs": inputs, "present": torch.from_numpy(self.present[i]),
                "clinical": torch.from_numpy(self.clinical[i]), "time": torch.tensor(self.time[i]),
                "event": torch.tensor(self.event[i]), "id": self.ids[i]}


def collate_batch(items: list[dict[str, Any]], modalities: tuple[str, ...] | None = None) -> Batch:
    """Stack :class:`StoreDataset` items into a :class:`~pyimputmae.data.cohort.Batch`."""
    mods = modalities or tuple(items[0]["inputs"])
    return Batch(
        inputs={m: torch.stack([it["inputs"][m] for it in items]) for m in mods},
        present=torch.stack([it["present"] for it in items]),
        clinical=torch.stack([it["clinical"] for it in items]),
        time=torch.stack([it["time"] for it in items]), event=torch.stack([it["event"] for it in items]),
        modalities=mods, ids=[it["id"] for it in items],
    )


def _worker_init(worker_id: int) -> None:
    """In each DataLoader worker: one torch thread and one zarr codec thread (the workers are
    the parallelism; zarr's own pool per worker would oversubscribe the cores)."""
    import zarr

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 4})


class _EpochSampler(torch.utils.data.Sampler):
    """The indices (or batches of indices) of ``inner`` as ``(index, epoch)``, ``epoch`` counting
    the passes over it (one per iteration of the DataLoader, made in the main process), so that
    :class:`StoreDataset` draws its random tiles from ``(seed, epoch, patient)`` alone."""

    def __init__(self, inner: Any, batched: bool) -> None:
        self.inner, self.batched, self.epoch = inner, batched, -1

    def __iter__(self) -> Iterator[Any]:
        # a generator: the pass is counted when its first index is drawn, not when the iterator is
        # made (a DataLoader with workers makes one it never draws from, then the one it uses)
        self.epoch += 1
        epoch = self.epoch
        if self.batched:
            for batch in self.inner:
                yield [(i, epoch) for i in batch]
        else:
            for i in self.inner:
                yield i, epoch

    def __len__(self) -> int:
        return len(self.inner)


def make_dataloader(path: str | Path, *, split: str | None = None, fold: int | None = None,
                    batch_size: int | None = None, shuffle: bool = False, num_workers: int = 0, wsi_tile: str = "best",
                    modalities: list[str] | None = None, drop_last: bool = False, seed: int | None = None,
                    allow_incomplete: bool = False, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`~pyimputmae.data.cohort.Batch` over a store, streaming patients
    from disk in ``num_workers`` processes (forked workers are safe: arrays open lazily per
    process, zarr ≥ 3.1 resets its event loop after fork, and each worker limits zarr's threads).
    ``split``/``fold`` select rows like :meth:`Cohort.indices` (an unknown split name or fold is a
    ValueError); allow_incomplete: see :class:`StoreDataset`. seed: the shuffle order and, with
    ``wsi_tile="random"``, the tiles,
    which depend only on ``(seed, epoch, patient)`` — the same with any ``num_workers``, whatever
    else draws from torch's global RNG — and change from one pass over the loader to the next
    (``None``: a seed drawn from torch's global RNG when the loader is made). batch_size: 24 unless
    a ``batch_sampler`` is given. Other keyword arguments go to torch's DataLoader; a
    ``batch_sampler`` (yielding lists of positions ``0 … len(loader.dataset) - 1`` in the selected
    rows) makes the batches, so ``batch_size``, ``shuffle``, ``drop_last`` and ``sampler`` are left
    out with it (giving one is a ValueError); its random tiles still depend only on
    ``(seed, epoch, patient)``."""
    batch_sampler = kwargs.get("batch_sampler")
    if batch_sampler is not None:
        given = [f"batch_size={batch_size}"] if batch_size is not None else []
        given += [f"{name}=True" for name, value in (("shuffle", shuffle), ("drop_last", drop_last)) if value]
        if kwargs.get("sampler") is not None:
            given.append(f"sampler={type(kwargs['sampler']).__name__}")
        if given:
            raise ValueError(
                f"make_dataloader({str(path)!r}): batch_sampler={type(batch_sampler).__name__} makes the batches, "
                f"so it alone decides their size, order and last batch, but {', '.join(given)} was also given: "
                "leave it out (or set it on the batch sampler), or drop batch_sampler")
        batch_size = 1  # torch's DataLoader requires its default alongside a batch_sampler
    elif batch_size is None:
        batch_size = 24
    ds = StoreDataset(path, modalities=modalities, wsi_tile=wsi_tile, allow_incomplete=allow_incomplete)
    if split is not None:
        keep = np.zeros(len(ds.split), dtype=bool)
        keep[split_rows(ds.split, ds.fold, split, fold)] = True
        ds.indices = ds.indices[keep[ds.indices]]  # of the readable rows (all, in a finished store)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    mods = tuple(ds.modalities)
    if wsi_tile == "random" and "wsi" in mods:
        # not torch's RNG in whichever process reads the item (the main one without workers)
        ds.seed = seed if seed is not None else int(torch.randint(2**62, ()))
        if batch_sampler is not None:
            kwargs["batch_sampler"] = _EpochSampler(batch_sampler, batched=True)
        else:
            inner = kwargs.get("sampler")
            if inner is None:  # what DataLoader(shuffle=...) would make, with the same generator
                inner = (torch.utils.data.RandomSampler(ds, generator=generator) if shuffle
                         else torch.utils.data.SequentialSampler(ds))
                shuffle = False  # done by the sampler
            kwargs["sampler"] = _EpochSampler(inner, batched=False)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        collate_fn=functools.partial(collate_batch, modalities=mods),
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=num_workers > 0, generator=generator, **kwargs)
