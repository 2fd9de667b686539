"""What `pip install` of a release needs beyond a checkout: a source distribution that carries every
file the build compiles or includes, and setup.py's choices of CUDA toolkit and license field."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from op_testing import setup_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its build runs only as __main__)."""
    return setup_module()


def _tracked_files() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (an unpacked source distribution has no .git)")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line}


@pytest.mark.slow
def test_the_source_distribution_carries_what_the_build_and_the_tests_need(tmp_path):
    """A release is installed from its sdist: before MANIFEST.in the archive lacked csrc/include/*.h
    and *.cuh, so `pip install pyimputmae-0.1.0.tar.gz` failed to compile (cpu_kernel_utils.h: No
    such file or directory)."""
    tracked = _tracked_files()
    # built from a copy of the tracked files: setuptools lays the archive's tree out in the folder it
    # runs in, which must not be the checkout (a second build there at the same time would collide)
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, PYIMPUTMAE_NO_EXT="1")  # metadata only: no compiler, no torch import
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)], cwd=src, env=env, check=True,
                   capture_output=True, text=True)
    (archive,) = tmp_path.glob("pyimputmae-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    shipped = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    wanted = {f for f in tracked
              if f.split("/")[0] in {"csrc", "kernels", "pyimputmae", "tests", "tools", "docs"}
              or f in {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"}}
    assert {"csrc/include/cpu_kernel_utils.h", "csrc/include/cuda_utils.cuh", "LICENSE"} <= wanted
    assert sorted(wanted - shipped) == []
    # nothing built or machine-specific rides along
    leaked = [n for n in shipped if n.endswith((".so", ".pyc")) or n.endswith("_build_config.json")
              or n.startswith(("build/", "shared/", ".venv/"))]
    assert leaked == []


def test_a_toolkit_of_torchs_cuda_major_version_is_preferred(setup_py):
    """With CUDA 12.4 on PATH and 13.0 installed beside it, a cu130 torch builds with 13.0: torch's
    build refuses a toolkit of another major version."""
    kits = ["/opt/cuda-12.4", "/usr/local/cuda-13.0", "/usr/local/cuda-12.8"]
    releases = {"/opt/cuda-12.4": "12.4", "/usr/local/cuda-13.0": "13.0", "/usr/local/cuda-12.8": "12.8"}
    assert setup_py.pick_toolkit(kits, releases, "13.0") == "/usr/local/cuda-13.0"
    assert setup_py.pick_toolkit(kits, releases, "12.6") == "/opt/cuda-12.4"
    # none matches: the first (the build then reports the mismatch); no toolkit at all: None
    assert setup_py.pick_toolkit(kits, releases, "11.8") == "/opt/cuda-12.4"
    assert setup_py.pick_toolkit(kits, {}, "13.0") == "/opt/cuda-12.4"
    assert setup_py.pick_toolkit([], {}, "13.0") is None


def test_an_nvcc_of_another_major_version_builds_the_cpu_kernels_and_says_why(setup_py):
    """torch's build raises on a CUDA major mismatch, which failed the whole install; now the C++
    kernels are built and the reason names both versions and the fix."""
    build, reason = setup_py.cuda_decision(None, "13.0", "12.4", has_nvcc=True)
    assert not build
    assert "nvcc 12.4" in reason and "CUDA 13.0" in reason and "CUDA_HOME" in reason and "13.x" in reason
    assert setup_py.cuda_decision(None, "13.0", "13.1", has_nvcc=True) == (
        True, "torch is a CUDA build and nvcc was found")  # minor versions may differ
    assert setup_py.cuda_decision("0", "13.0", "13.0", has_nvcc=True) == (False, "PYIMPUTMAE_CUDA=0")
    assert setup_py.cuda_decision(None, None, None, has_nvcc=True) == (False, "torch is a CPU-only build")
    assert not setup_py.cuda_decision(None, "13.0", None, has_nvcc=False)[0]


def test_nvcc_release_reads_the_version_line(setup_py, tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    fake.chmod(0o755)
    assert setup_py._nvcc_release(str(fake)) == "12.4"
    assert setup_py._nvcc_release(str(tmp_path / "missing")) is None


def test_the_license_is_an_spdx_expression_where_setuptools_has_one(setup_py):
    """setuptools 77 deprecates the license table (builds stop being supported on 2027-02-18);
    a fresh Python 3.11 venv still has setuptools 65, which has no expression field."""
    assert setup_py.license_metadata("84.2.1") == {"license_expression": "Apache-2.0"}
    assert setup_py.license_metadata("77.0.0") == {"license_expression": "Apache-2.0"}
    assert setup_py.license_metadata("65.5.0") == {"license": "Apache-2.0"}
