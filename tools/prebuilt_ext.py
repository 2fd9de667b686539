"""Build ``pyimputmae._C`` here for another machine's torch, and use it there only if it fits.

A lent GPU machine has 15 minutes, its start included, and compiling the extension there keeps the
GPU idle (never timed there; here it takes 2 min 10 s on 2 cores for sm_90, 3 min of CPU time, so
on its 16 cores at least the slowest file's compile). This machine has nvcc and can build against
the GPU machine's torch (same version, installed in a venv here), so the build can travel with the
checkout instead (the device tool's ``carry``) and ``tools/gpu_check.sh`` installs it when it fits:

    python tools/prebuilt_ext.py build --python /path/to/venv-with-that-torch/bin/python
        compiles the extension from a copy of this checkout's sources (TORCH_CUDA_ARCH_LIST
        9.0 by default: H100 and H200), checks that the build loads under that Python, and
        writes _C.abi3.so and its build record into build/prebuilt/ (git-ignored)
    python tools/prebuilt_ext.py check [--dir build/prebuilt]
        exit 0 when the build there fits this machine (else 1, with the reason): the torch it
        was built for is the torch running here, it was built from the sources of this checkout
        as they are now (the record's sources_sha256), and it carries machine code for the GPU
        here (when one is visible)
    python tools/prebuilt_ext.py install [--dir build/prebuilt]
        check, then copy both files into pyimputmae/ (where an editable install imports them)

Whether the copied extension then loads (the C++ runtime libraries of that machine) is for the
caller to find out in a child process, as gpu_check.sh does; if not, it builds from source.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _package_module(name: str):
    """``pyimputmae/<name>.py`` (standard library only), by path: copying the extension in needs no
    import of the package it completes."""
    spec = importlib.util.spec_from_file_location(f"_pyimputmae_{name}", ROOT / "pyimputmae" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sources_digest = _package_module("_build_sources").sources_digest
atomic_write = _package_module("_atomic").atomic_write

SO_NAME = "_C.abi3.so"
RECORD_NAME = "_build_config.json"
DEFAULT_DIR = ROOT / "build" / "prebuilt"
#: what the build reads from a checkout: setup.py imports the package's _build_sources.py by path,
#: and build_ext --inplace lays the extension into pyimputmae/
TREE = ("setup.py", "pyproject.toml", "csrc", "pyimputmae")


def fits(record: dict, digest: str | None, torch_version: str, capability: int | None) -> tuple[bool, str]:
    """Can a build with this record run here? ``digest``: the checkout's sources now;
    ``capability``: the visible GPU's (e.g. 90), or None without one."""
    if not record.get("extension") or not record.get("cuda"):
        return False, "the record is not of a build with CUDA kernels"
    if record.get("torch") != torch_version:
        return False, f"built for torch {record.get('torch')}, this machine runs torch {torch_version}"
    if not record.get("sources_sha256"):
        return False, "the record has no sources_sha256 (built before setup.py recorded it)"
    if digest is None:
        return False, f"no csrc/ in {ROOT} to compare the build's sources with"
    if record["sources_sha256"] != digest:
        return False, (f"built from other sources ({record['sources_sha256'][:12]}) than this checkout's csrc/ "
                       f"and setup.py ({digest[:12]}): they changed after the build")
    archs = record.get("cuda_archs") or []
    if capability is not None and capability not in archs:
        return False, f"no machine code for this GPU's sm_{capability} (built for {archs})"
    return True, (f"torch {torch_version}, sources {digest[:12]}, CUDA targets {archs}, "
                  f"built with {record.get('cxx_version', '?')} and nvcc {record.get('nvcc')}")


def _read_record(folder: Path) -> dict:
    if not (folder / SO_NAME).is_file():
        raise FileNotFoundError(f"no {SO_NAME} in {folder}")
    with open(folder / RECORD_NAME) as f:
        return json.load(f)


def check(folder: Path) -> tuple[bool, str]:
    try:
        record = _read_record(folder)
    except (OSError, ValueError) as err:
        return False, f"no usable build in {folder}: {err}"
    import torch

    capability = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        capability = major * 10 + minor
    return fits(record, sources_digest(ROOT, cuda=True), torch.__version__, capability)


def stage_tree(dest: Path) -> None:
    """Copy what a build reads (:data:`TREE`) into ``dest``, leaving built files behind."""
    skip = shutil.ignore_patterns("*.so", RECORD_NAME, "__pycache__", "*.pyc")
    dest.mkdir(parents=True, exist_ok=True)
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        else:
            shutil.copy2(src, dest / name)


def build(python: str, out: Path, arch_list: str, jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="pyimputmae-prebuilt-") as tmp:
        tree = Path(tmp) / "src"
        stage_tree(tree)
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch_list, "MAX_JOBS": str(jobs), "PYIMPUTMAE_CUDA": "1"}
        env.pop("PYIMPUTMAE_NO_EXT", None)
        print(f"building in {tree} with {python} (TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={jobs})", flush=True)
        subprocess.run([python, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env, check=True)
        record = _read_record(tree / "pyimputmae")
        if record.get("sources_sha256") != sources_digest(ROOT, cuda=True):
            sys.exit("the checkout's sources changed while the extension was built: build again")
        # the build must load under the Python it was built for (a CPU-only check: no GPU here)
        probe = ("import sys, pyimputmae._extension as e, torch; ok = e.load(); "
                 "print(torch.__version__, e.cuda_archs() if ok else e.unavailable_reason()); sys.exit(0 if ok else 1)")
        subprocess.run([python, "-c", probe], cwd=tree, env={**env, "PYTHONPATH": str(tree)}, check=True)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in (SO_NAME, RECORD_NAME):
            shutil.copy2(tree / "pyimputmae" / name, staging / name)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    size = (out / SO_NAME).stat().st_size / 2**20
    print(f"wrote {out / SO_NAME} ({size:.1f} MiB) and its record: torch {record['torch']}, "
          f"CUDA targets {record['cuda_archs']}, sources {record['sources_sha256'][:12]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the extension for another machine's torch")
    b.add_argument("--python", required=True, help="a Python whose torch is the other machine's")
    b.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (default 9.0: H100, H200)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    b.add_argument("--out", type=Path, default=DEFAULT_DIR)
    for name in ("check", "install"):
        p = sub.add_parser(name, help=f"{name} a prebuilt extension")
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.python, args.out.resolve(), args.arch, args.jobs)
        return 0
    ok, why = check(args.dir)
    print(f"prebuilt extension in {args.dir}: {'fits' if ok else 'not used'}: {why}", flush=True)
    if not ok:
        return 1
    if args.command == "install":
        for name in (SO_NAME, RECORD_NAME):  # each file whole or not at all (a process may be loading it)
            with open(args.dir / name, "rb") as src:
                atomic_write(ROOT / "pyimputmae" / name, lambda f, src=src: shutil.copyfileobj(src, f))
        print(f"copied {SO_NAME} and {RECORD_NAME} into {ROOT / 'pyimputmae'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
