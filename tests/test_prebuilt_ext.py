"""The sources digest of the build record, what it tells a developer whose build is older than its
sources, and tools/prebuilt_ext.py: a build made here for the GPU machine's torch, used there only
when it fits (so the lent GPU's minutes do not go into compiling)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from op_testing import setup_module, tool_module

from pyimputmae import _build_sources, _extension
from pyimputmae.info import collect, render

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> Path:
    """A scratch source tree: kernels, a header, setup.py, and a file the build does not read."""
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "csrc" / "include").mkdir()
    (root / "csrc" / "ops.cpp").write_text("int ops;\n")
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "csrc" / "include" / "u.cuh").write_text("#pragma once\n")
    (root / "csrc" / "README.md").write_text("notes\n")
    (root / "setup.py").write_text("# flags\n")
    return root


def test_the_digest_follows_the_sources_the_build_reads_and_nothing_else(tmp_path):
    root = _tree(tmp_path / "src")
    first = _build_sources.sources_digest(root)
    assert first and len(first) == 64
    os.utime(root / "csrc" / "ops.cpp", (1, 1))  # a fresh clone has other timestamps
    (root / "csrc" / "README.md").write_text("other notes\n")
    (root / "csrc" / "ops.o").write_bytes(b"\0built")
    (root / "csrc" / "ops.cpp~").write_text("an editor's backup\n")
    assert _build_sources.sources_digest(root) == first
    for change in (lambda: (root / "csrc" / "include" / "u.cuh").write_text("#pragma once\n#define X\n"),
                   lambda: (root / "setup.py").write_text("# other flags\n"),
                   lambda: (root / "csrc" / "cuda" / "k2.cu").write_text(""),
                   lambda: (root / "csrc" / "cuda" / "k2.cu").rename(root / "csrc" / "cuda" / "k3.cu"),
                   lambda: (root / "csrc" / "include" / "tables.inc").write_text("1, 2\n")):  # any header
        change()
        now = _build_sources.sources_digest(root)
        assert now != first
        first = now
    assert _build_sources.sources_digest(tmp_path / "elsewhere") is None  # an installed package's folder


def test_a_build_without_the_cuda_kernels_does_not_depend_on_the_cuda_sources(tmp_path):
    root = _tree(tmp_path / "src")
    cpu, cuda = _build_sources.sources_digest(root, cuda=False), _build_sources.sources_digest(root, cuda=True)
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k(int) {}\n")
    (root / "csrc" / "include" / "u.cuh").write_text("#pragma once // edited\n")
    assert _build_sources.sources_digest(root, cuda=False) == cpu
    assert _build_sources.sources_digest(root, cuda=True) != cuda
    (root / "csrc" / "ops.cpp").write_text("int ops = 3;\n")
    assert _build_sources.sources_digest(root, cuda=False) != cpu


def test_setup_py_records_the_same_digest_as_the_package_computes(tmp_path):
    module = setup_module()
    root = _tree(tmp_path / "src")
    for cuda in (False, True):
        assert module.sources_digest(str(root), cuda) == _build_sources.sources_digest(root, cuda)


def test_the_extension_this_suite_runs_was_built_from_the_checkouts_sources():
    """A stale build (csrc/ edited or pulled, no rebuild) would have every backend test check the old
    kernels: the suite must not pass silently on one."""
    if not _extension.load() or _extension.build_config().get("extension") is False:
        pytest.skip("no extension loaded")
    if _build_sources.checkout_root() is None:
        pytest.skip("an installed package: no sources beside it to compare with")
    if "sources_sha256" not in _extension.build_config():
        pytest.fail("the build record has no sources_sha256: rebuild (pip install --no-build-isolation -e .)")
    assert _extension.out_of_date() is None, _extension.out_of_date()


@pytest.fixture
def stale_build(tmp_path, monkeypatch):
    """The package seen from a scratch checkout whose sources changed after the build."""
    root = _tree(tmp_path / "src")
    record = {"extension": True, "cuda": True, "torch": torch.__version__,
              "sources_sha256": _build_sources.sources_digest(root, cuda=True)}
    (root / "csrc" / "ops.cpp").write_text("int ops = 1;\n")
    monkeypatch.setattr(_extension, "build_config", lambda: dict(record))
    monkeypatch.setattr(_build_sources, "checkout_root", lambda: root)
    return root, record


def test_a_build_older_than_its_sources_is_named_out_of_date(stale_build, monkeypatch):
    root, record = stale_build
    why = _extension.out_of_date()
    assert why and str(root / "csrc") in why and "pip install --no-build-isolation -e ." in why
    assert record["sources_sha256"][:12] in why
    if _extension.load():
        info = collect()
        assert info["build_sources_changed"] == why
        assert f"out of date: {why}" in render(info)
        # loading it warns once, naming what is stale
        monkeypatch.setattr(_extension, "_state", {})
        with pytest.warns(_extension.ExtensionWarning, match="older than their sources"):
            assert _extension.load()
    # nothing to compare: a record without the digest, a pure-Python record, an installed package
    for other in ({"extension": True}, {"extension": False, "sources_sha256": "0" * 64}):
        monkeypatch.setattr(_extension, "build_config", lambda other=other: other)
        assert _extension.out_of_date() is None
    monkeypatch.setattr(_extension, "build_config", lambda: dict(record))
    monkeypatch.setattr(_build_sources, "checkout_root", lambda: None)
    assert _extension.out_of_date() is None

    def unreadable(*args):
        raise PermissionError("csrc/ops.cpp")

    monkeypatch.setattr(_build_sources, "checkout_root", lambda: root)
    monkeypatch.setattr(_build_sources, "sources_digest", unreadable)
    assert _extension.out_of_date() is None  # loading the extension must not fail for it


def test_a_current_build_loads_without_a_warning(stale_build, monkeypatch):
    root, record = stale_build
    record["sources_sha256"] = _build_sources.sources_digest(root, cuda=True)
    if not _extension.load():
        pytest.skip("no extension loaded")
    monkeypatch.setattr(_extension, "_state", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", _extension.ExtensionWarning)
        assert _extension.load()
    assert _extension.out_of_date() is None


# ---------------------------------------------------------------- tools/prebuilt_ext.py


@pytest.fixture
def prebuilt_tool():
    return tool_module("prebuilt_ext")


def test_a_carried_build_fits_only_the_torch_sources_and_gpu_it_was_built_for(prebuilt_tool):
    fits = prebuilt_tool.fits
    good = {"extension": True, "cuda": True, "torch": "2.11.0+cu130", "sources_sha256": "a" * 64,
            "cuda_archs": [90], "nvcc": "13.0", "cxx_version": "c++ 12.2.0"}
    ok, why = fits(good, "a" * 64, "2.11.0+cu130", 90)
    assert ok and "2.11.0+cu130" in why and "aaaaaaaaaaaa" in why and "[90]" in why
    assert fits(good, "a" * 64, "2.11.0+cu130", None)[0]  # no GPU visible: the targets are not asked
    cases = {
        "torch 2.11.0+cu130, this machine runs torch 2.11.1+cu130": (good, "a" * 64, "2.11.1+cu130", 90),
        "they changed after the build": (good, "b" * 64, "2.11.0+cu130", 90),
        "no machine code for this GPU's sm_100": (good, "a" * 64, "2.11.0+cu130", 100),
        "not of a build with CUDA kernels": ({**good, "cuda": False}, "a" * 64, "2.11.0+cu130", 90),
        "has no sources_sha256": ({k: v for k, v in good.items() if k != "sources_sha256"}, "a" * 64,
                                  "2.11.0+cu130", 90),
        "no csrc/": (good, None, "2.11.0+cu130", 90),
    }
    for reason, args in cases.items():
        ok, why = fits(*args)
        assert not ok and reason in why, (reason, why)


def test_the_build_tree_holds_what_setup_py_reads_and_nothing_built(prebuilt_tool, tmp_path):
    prebuilt_tool.stage_tree(tmp_path / "tree")
    tree = tmp_path / "tree"
    assert (tree / "setup.py").is_file() and (tree / "pyimputmae" / "_build_sources.py").is_file()
    assert not list(tree.rglob("*.so")) and not list(tree.rglob("_build_config.json"))
    assert _build_sources.sources_digest(tree) == _build_sources.sources_digest(ROOT)
    assert _build_sources.sources_digest(tree, cuda=False) == _build_sources.sources_digest(ROOT, cuda=False)


def _scratch_repo(tmp_path: Path, torch_version: str) -> Path:
    """A checkout with tools/prebuilt_ext.py and a carried build in build/prebuilt."""
    repo = _tree(tmp_path / "repo")
    (repo / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "prebuilt_ext.py", repo / "tools")
    (repo / "pyimputmae").mkdir()
    for module in ("_build_sources.py", "_atomic.py"):  # what the tool loads by path
        shutil.copy(ROOT / "pyimputmae" / module, repo / "pyimputmae")
    (repo / "pyimputmae" / "_build_config.json").write_text(json.dumps({"extension": False}))
    carried = repo / "build" / "prebuilt"
    carried.mkdir(parents=True)
    (carried / "_C.abi3.so").write_bytes(b"\x7fELF stand-in")
    (carried / "_build_config.json").write_text(json.dumps(
        {"extension": True, "cuda": True, "torch": torch_version, "cuda_archs": [90],
         "sources_sha256": _build_sources.sources_digest(repo, cuda=True)}))
    return repo


def test_install_copies_a_fitting_build_into_the_package_and_refuses_one_that_does_not(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the stand-in record's sm_90 need not be this GPU's")
    repo = _scratch_repo(tmp_path, torch.__version__)
    tool = [sys.executable, str(repo / "tools" / "prebuilt_ext.py")]
    done = subprocess.run([*tool, "install"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fits" in done.stdout
    assert (repo / "pyimputmae" / "_C.abi3.so").read_bytes() == b"\x7fELF stand-in"
    assert json.loads((repo / "pyimputmae" / "_build_config.json").read_text())["cuda_archs"] == [90]

    (repo / "pyimputmae" / "_C.abi3.so").unlink()
    (repo / "csrc" / "ops.cpp").write_text("int ops = 2;\n")  # edited after the build
    refused = subprocess.run([*tool, "install"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "changed after the build" in refused.stdout, refused.stdout
    assert not (repo / "pyimputmae" / "_C.abi3.so").exists()


@pytest.mark.parametrize("carried", ["fits", "does not fit", "does not load"])
def test_gpu_check_installs_a_carried_build_instead_of_compiling_when_it_fits(tmp_path, carried):
    """tools/gpu_check.sh's build stage with a stand-in Python: a carried build that fits is installed
    after a pure-Python install and nothing compiles (the warm-ups then wait for the test stage: with
    none to overlap, a timed stage would only stop them); one that does not fit, or does not load
    once installed (it is removed), leaves the usual compile with the warm-ups beside it."""
    repo = _scratch_repo(tmp_path, torch.__version__)
    shutil.copy(ROOT / "tools" / "gpu_check.sh", repo / "tools" / "gpu_check.sh")
    if carried == "does not load":  # what `install` would have copied in
        (repo / "pyimputmae" / "_C.abi3.so").write_bytes(b"\x7fELF stand-in")
    log = tmp_path / "calls.log"
    fake_py = tmp_path / "fakepy"
    fake_py.write_text('#!/bin/sh\n'
                       'echo "MAX_JOBS=${MAX_JOBS-} NO_EXT=${PYIMPUTMAE_NO_EXT-} args: $*" >>"$FAKE_PY_LOG"\n'
                       'case "$*" in *"prebuilt_ext.py check"*) exit "$CHECK_RC";;\n'
                       '  *"e.load() else 1"*) exit "$LOAD_RC";; esac\nexit 0\n')
    fake_py.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "PYIMPUTMAE", "PREBUILT"))}
    env.update(PYTHON=str(fake_py), FAKE_PY_LOG=str(log), GPU_CHECK_FORCE="1", BENCH_LARGE_TIMEOUT_S="20",
               WARM_WAIT_S="5", CHECK_RC="1" if carried == "does not fit" else "0",
               LOAD_RC="1" if carried == "does not load" else "0", PATH=os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh"), str(tmp_path / "out"), "build", "bench"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    compile_calls = [c for c in calls if c.startswith("MAX_JOBS=16 ") and "pip install" in c]
    warmups = [c for c in calls if "--baselines compile --no-check" in c]
    assert any("prebuilt_ext.py check --dir build/prebuilt" in c for c in calls), calls
    summary = (tmp_path / "out" / "summary.tsv").read_text()
    if carried == "fits":
        order = [next(i for i, c in enumerate(calls) if key in c)
                 for key in ("prebuilt_ext.py check", "NO_EXT=1 args: -m pip install", "prebuilt_ext.py install",
                             "e.load() else 1")]
        assert order == sorted(order), calls
        assert not compile_calls and not warmups, calls
        with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as bundle:
            build_time = bundle.extractfile("./build_time.txt").read().decode()
        assert "exit=0 prebuilt=build/prebuilt" in build_time, build_time
        return
    assert len(compile_calls) == 1 and "NO_EXT= " in compile_calls[0], calls
    assert warmups and calls.index(warmups[0]) < calls.index(compile_calls[0]), calls
    if carried == "does not fit":
        assert not any("prebuilt_ext.py install" in c for c in calls), calls
        assert "prebuilt\tnot used (see log)" in summary, summary
    else:
        assert "prebuilt\tinstalled, does not load: compiling" in summary, summary
        assert not (repo / "pyimputmae" / "_C.abi3.so").exists()
        assert not (repo / "pyimputmae" / "_build_config.json").exists()
