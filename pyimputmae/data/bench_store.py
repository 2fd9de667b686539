"""Store throughput: write a synthetic store of the paper's per-patient sizes and time (1) loading
the whole cohort into memory with the page cache warm and (2) streaming it through DataLoader
workers — the two ways training reads a store (``tools/bench.py`` reports both).

Every patient has every modality (the worst case: about 2 GB for 1,104 patients at the paper's
sizes). The content is as hard to compress as real data or harder: RNA values on 16,304 of
16,384 positions (the rest is padding), beta values in [0, 1], uniform-noise uint8 tiles, and
z-scored noise inside a ball (a brain) in a zero background for MRI.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .store import create_store, load_cohort, make_dataloader

SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "paper": {"rna": (1, 16384), "dnam": (1, 24576), "wsi": (3, 256, 256), "mri": (1, 64, 64, 64)},
    "small": {"rna": (1, 1024), "dnam": (1, 1536), "wsi": (3, 64, 64), "mri": (1, 32, 32, 32)},
}


def _block(m: str, shape: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic values for ``n`` patients of modality ``m``."""
    if m == "rna":
        x = np.zeros((n, *shape), dtype=np.float32)
        used = min(shape[-1], 16304 * shape[-1] // 16384)
        x[..., :used] = rng.lognormal(0.0, 0.5, size=(n, shape[0], used)).astype(np.float32)
        return x
    if m == "dnam":
        return rng.random((n, *shape), dtype=np.float32)
    if m == "wsi":
        return rng.integers(0, 256, size=(n, 1, *shape), dtype=np.uint8)
    grid = np.indices(shape[1:]).astype(np.float32)
    centre = (np.asarray(shape[1:], dtype=np.float32) - 1) / 2
    brain = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= (0.45 * min(shape[1:])) ** 2
    return (rng.standard_normal((n, *shape), dtype=np.float32) * brain).astype(np.float32)


def write_synthetic_store(path: str | Path, n_patients: int = 1104, sizes: str = "paper", codec: str = "lz4",
                          seed: int = 0) -> Path:
    """A complete store of ``n_patients`` synthetic patients with every modality present."""
    shapes = SIZES[sizes]
    ids = [f"SYN-{i:05d}" for i in range(n_patients)]
    root = create_store(path, ids=ids, shapes=shapes, n_clinical=3, wsi_keep=1, codec=codec,
                        attrs={"package_version": "bench", "clinical_names": ["radiation", "chemo", "age"]})
    rng = np.random.default_rng(seed)
    block = 64
    for s in range(0, n_patients, block):
        n = min(block, n_patients - s)
        for m, shape in shapes.items():
            root["wsi/tiles" if m == "wsi" else f"{m}/data"][s: s + n] = _block(m, shape, n, rng)
    root["wsi/count"][:] = 1
    root["table/time"][:] = rng.exponential(2.0, n_patients).astype(np.float32)
    root["table/event"][:] = (rng.random(n_patients) < 0.4).astype(np.float32)
    root["table/split"][:] = (np.arange(n_patients) % 5 == 0).astype(np.int8) * 2  # 20 % test
    root["table/fold"][:] = np.where(np.arange(n_patients) % 5 == 0, -1, np.arange(n_patients) % 4)
    root["table/clinical"][:] = rng.normal(size=(n_patients, 3)).astype(np.float32)
    root["table/present"][:] = True
    root["table/status"][:] = 1
    root.attrs["complete"] = True
    return Path(path)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (what a load costs on an idle machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_store_load(tmpdir: str | Path, n_patients: int = 1104, sizes: str = "paper", codec: str = "lz4",
                     repeats: int = 3, device: str | None = None, stream_workers: int = 2, stream_batches: int = 20,
                     batch_size: int = 24) -> dict[str, Any]:
    """Write a synthetic store under ``tmpdir`` and time whole-cohort loads (after one warm-up
    load, so the page cache is warm) and DataLoader streaming (``stream_workers`` forked
    workers, ``stream_batches`` shuffled batches; 0 skips it).

    Returns ``{"n_patients", "sizes", "codec", "store_mb", "memory_mb", "write_s", "load_s"
    (median wall time), "load_s_runs", "load_cpu_s" (median user + system CPU time of the load, all
    threads: the cost on an idle machine, where wall time ≈ CPU time / cores), "load_gb_per_s",
    "device", "stream_workers", "stream_patients_per_s", "cpu_count", "load_average"}``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(tmpdir) / f"bench_{sizes}_{n_patients}_{codec}.zarr"
    start = time.perf_counter()
    write_synthetic_store(path, n_patients, sizes, codec)
    write_s = time.perf_counter() - start
    cohort = load_cohort(path, device)  # warm-up: page cache, imports, CUDA context
    memory = cohort.nbytes()
    del cohort
    runs, cpu = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        cohort = load_cohort(path, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
        del cohort
    result: dict[str, Any] = {
        "n_patients": n_patients, "sizes": sizes, "codec": codec, "store_mb": _du(path) / 2**20,
        "memory_mb": memory / 2**20, "write_s": write_s, "load_s": statistics.median(runs), "load_s_runs": runs,
        "load_cpu_s": statistics.median(cpu),
        "load_gb_per_s": memory / 1e9 / statistics.median(runs), "device": device,
        "stream_workers": stream_workers, "stream_patients_per_s": None,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    if stream_workers and stream_batches:
        loader = make_dataloader(path, batch_size=batch_size, shuffle=True, num_workers=stream_workers,
                                 wsi_tile="random", seed=0)
        seen, it = 0, iter(loader)
        next(it)  # workers started
        start = time.perf_counter()
        for _ in range(stream_batches - 1):
            try:
                seen += next(it).size
            except StopIteration:
                break
        result["stream_patients_per_s"] = seen / (time.perf_counter() - start)
        del it, loader
    return result
