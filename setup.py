"""Build pyimputmae._C, the C++ (CPU) and CUDA kernels, with torch.utils.cpp_extension.

Environment knobs (all optional):
  PYIMPUTMAE_NO_EXT=1       install pure Python (the ops fall back to Triton / PyTorch reference)
  PYIMPUTMAE_CUDA=0|1       force the CUDA kernels off / on (default: on when torch is a CUDA
                            build and an nvcc of torch's CUDA major version is found, with or
                            without a visible GPU; with CUDA_HOME and CUDA_PATH unset, the first
                            toolkit of that version among nvcc on PATH, /usr/local/cuda and
                            /usr/local/cuda-* is used)
  TORCH_CUDA_ARCH_LIST      CUDA targets, default "8.0;9.0+PTX" (PTX lets newer GPUs JIT it)
  MAX_JOBS                  parallel compile jobs (ninja)
The resolved configuration is printed and recorded as pyimputmae/_build_config.json in what the
build produces: the build folder a wheel is made from, and the source tree only for in-place or
editable builds (which import from it) — so building a wheel never rewrites the record of the
editable install in the same checkout.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(ROOT, "pyimputmae")
CONFIG_NAME = "_build_config.json"
DEFAULT_ARCHS = "8.0;9.0+PTX"
LICENSE = "Apache-2.0"
#: nvcc's flags for the CUDA kernels (tools/cuda_resource_check.py compiles with them too). No
#: --use_fast_math: the kernels move memory, their arithmetic is a few operations per element, and
#: fast math would flush subnormals to zero and round divisions approximately where the PyTorch
#: reference (the spec) does neither; a subnormal mask weight would count as no weight at all
NVCC_FLAGS = ["-O3", "-DPYIMPUTMAE_PYTHON_MODULE"]


@functools.cache
def _package_module(name: str):
    """``pyimputmae/<name>.py`` (standard library only), loaded by path: the package cannot be
    imported before it is built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_pyimputmae_setup_{name}", os.path.join(PACKAGE_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_digest(root: str, cuda: bool) -> str | None:
    """pyimputmae/_build_sources.py's digest of the extension's sources under ``root`` (``cuda``:
    with the CUDA sources)."""
    return _package_module("_build_sources").sources_digest(root, cuda)


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value


def _compiler_has_openmp(cxx: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        result = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")], capture_output=True)
        return result.returncode == 0


def _arch_numbers(arch_list: str) -> list[int]:
    """'8.0;9.0+PTX' -> [80, 90]: the targets the extension carries code for."""
    nums = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        m = re.match(r"^(\d+)\.(\d+)", item)
        if m:
            nums.append(int(m.group(1)) * 10 + int(m.group(2)))
    return sorted(set(nums))


@functools.cache
def _nvcc_release(nvcc: str) -> str | None:
    """``nvcc --version``'s release, e.g. ``"13.0"``; None when it does not run or says none (asked
    once per path: the toolkit chosen among several is asked again for the build's record)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def _cuda_toolkits() -> list[str]:
    """CUDA toolkit folders holding bin/nvcc and lib64/libcudart*: nvcc's on PATH first, then
    /usr/local/cuda, then /usr/local/cuda-* in reverse name order (cuda-13.0 before cuda-12.8)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    found = []
    for home in candidates:
        libs = glob.glob(os.path.join(home, "lib64", "libcudart*")) + glob.glob(os.path.join(home, "lib", "libcudart*"))
        real = os.path.realpath(home)
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and libs and real not in found:
            found.append(real)
    return found


def pick_toolkit(toolkits: list[str], release: dict[str, str | None], torch_cuda: str | None) -> str | None:
    """The first toolkit whose nvcc has torch's CUDA major version (torch refuses to build with
    another major), else the first one (the build then reports the mismatch); None for none."""
    for home in toolkits:
        if torch_cuda and _major(release.get(home)) == _major(torch_cuda):
            return home
    return toolkits[0] if toolkits else None


def cuda_decision(want: str | None, torch_cuda: str | None, nvcc_release: str | None,
                  has_nvcc: bool) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why: ``(build, reason)``. ``want`` is PYIMPUTMAE_CUDA
    (None, "0" or "1"); ``torch_cuda`` torch.version.cuda; ``nvcc_release`` e.g. ``"12.4"``."""
    if want == "0":
        return False, "PYIMPUTMAE_CUDA=0"
    if torch_cuda is None:
        return False, "torch is a CPU-only build"
    if not has_nvcc:
        return False, "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if nvcc_release and _major(nvcc_release) != _major(torch_cuda):
        return False, (f"nvcc {nvcc_release} cannot build for this torch, which was built with CUDA "
                       f"{torch_cuda} (the major versions must agree): set CUDA_HOME to a CUDA "
                       f"{_major(torch_cuda)}.x toolkit, or install a torch built for CUDA {_major(nvcc_release)}")
    return True, "torch is a CUDA build and nvcc was found"


def _resolve() -> tuple[dict, list]:
    config: dict = {"python": platform.python_version()}
    if _flag("PYIMPUTMAE_NO_EXT") == "1":
        config.update(extension=False, reason="PYIMPUTMAE_NO_EXT=1")
        return config, []
    try:
        import torch
    except ImportError:
        sys.exit("setup.py: torch must be installed first (pip install torch), then "
                 "pip install --no-build-isolation -e .  (or set PYIMPUTMAE_NO_EXT=1)")
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and torch.version.cuda:
        # torch takes CUDA_HOME as nvcc's grandparent: /usr/local for a /usr/local/bin/nvcc wrapper,
        # where libcudart is not. Point it at a toolkit that has both nvcc and the runtime library,
        # of torch's CUDA major version where several are installed.
        toolkits = _cuda_toolkits()
        releases = {home: _nvcc_release(os.path.join(home, "bin", "nvcc")) for home in toolkits}
        home = pick_toolkit(toolkits, releases, torch.version.cuda)
        if home:
            os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension  # reads CUDA_HOME on import

    cxx = os.environ.get("CXX", "c++")
    openmp = _compiler_has_openmp(cxx)
    want_cuda = _flag("PYIMPUTMAE_CUDA")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    has_nvcc = bool(nvcc and os.path.exists(nvcc))
    nvcc_version = _nvcc_release(nvcc) if has_nvcc and want_cuda != "0" and torch.version.cuda else None
    cuda, cuda_reason = cuda_decision(want_cuda, torch.version.cuda, nvcc_version, has_nvcc)
    if want_cuda == "1" and not cuda:
        sys.exit(f"setup.py: PYIMPUTMAE_CUDA=1 but the CUDA kernels cannot be built: {cuda_reason}")
    if not cuda and torch.version.cuda and want_cuda != "0":
        print(f"setup.py: building the C++ (CPU) kernels only: {cuda_reason}. On CUDA tensors the ops "
              "use the Triton kernels or the PyTorch reference.", file=sys.stderr, flush=True)

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    cpu_sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if cuda else []
    cxx_flags = ["-O3", "-DPYIMPUTMAE_PYTHON_MODULE"]
    link_flags = []
    if openmp:
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_flags = [*NVCC_FLAGS, "-lineinfo"]
    macros = []
    if cuda:
        macros.append(("PYIMPUTMAE_WITH_CUDA", None))
        archs = ",".join(str(a) for a in _arch_numbers(arch_list))
        # C++ only (csrc/ops.cpp reads it): nvcc would split "-D...=80,90" at the comma
        cxx_flags.append(f"-DPYIMPUTMAE_CUDA_ARCHS={archs}")
        # ATen/cuda/CUDAContext.h needs cusparse.h, which pip's CUDA torch keeps here
        for path in sys.path:
            inc = os.path.join(path, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                nvcc_flags.append(f"-I{inc}")
                cxx_flags.append(f"-I{inc}")
                break

    config.update(
        extension=True,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cxx=cxx,
        cxx_version=subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        openmp=openmp,
        cuda=cuda,
        cuda_reason=cuda_reason,
        nvcc=nvcc_version,
        cuda_arch_list=arch_list if cuda else None,
        cuda_archs=_arch_numbers(arch_list) if cuda else [],
        max_jobs=os.environ.get("MAX_JOBS"),
        sources=cpu_sources + cuda_sources,
        # what the sources were when built: `pyimputmae info` names a build older than its checkout's
        # csrc/ stale, and tools/prebuilt_ext.py uses a carried build only for its own sources
        sources_sha256=sources_digest(ROOT, cuda),
    )
    ext_cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = ext_cls(
        "pyimputmae._C",
        cpu_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if cuda else {"cxx": cxx_flags},
        extra_link_args=link_flags,
        # the library talks to Python only through PyInit (ops register via the dispatcher), so one
        # build serves every CPython >= 3.9 (_C.abi3.so) and does not link libtorch_python
        py_limited_api=True,
    )
    return config, [ext]


def license_metadata(setuptools_version: str) -> dict:
    """The license for ``setup()``: an SPDX expression (``license_expression``) from setuptools 77
    on, which deprecates the free-text field; the free-text ``license`` before, which has no
    expression field. pyproject.toml lists the license as dynamic so both builds take it from here."""
    major = int(re.match(r"\d+", setuptools_version).group())
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


def _write_config(config: dict, *dirs: str) -> None:
    # whole or not at all: a process importing the package meanwhile reads the old record or the new
    write_text = _package_module("_atomic").atomic_write_text
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        write_text(os.path.join(d, CONFIG_NAME), json.dumps(config, indent=1, sort_keys=True))


def record_dirs(build_lib: str, in_place: bool) -> list[str]:
    """Where a build records its configuration: the package in ``build_lib`` (what a wheel or a
    regular install is made from) and, for in-place / editable builds only, the source package —
    the one those import."""
    dirs = [os.path.join(build_lib, "pyimputmae")]
    if in_place:
        dirs.append(os.path.join(ROOT, "pyimputmae"))
    return dirs


def command_classes(config: dict, with_extension: bool) -> dict:
    """setuptools commands that write ``config`` where :func:`record_dirs` says (build_py runs in
    every build, with or without the extension; build_ext also in ``build_ext --inplace``)."""
    from setuptools.command.build_py import build_py

    class _BuildPy(build_py):
        def run(self):
            super().run()
            _write_config(config, *record_dirs(self.build_lib, self.editable_mode))

    classes: dict = {"build_py": _BuildPy}
    if not with_extension:
        return classes
    from torch.utils.cpp_extension import BuildExtension

    class _BuildExt(BuildExtension):
        def run(self):
            super().run()
            _write_config(config, *record_dirs(self.build_lib, self.inplace or self.editable_mode))
            # an older per-interpreter build (_C.cpython-3xx-*.so) would shadow the abi3 one
            for stale in glob.glob(os.path.join(ROOT, "pyimputmae", "_C.cpython-*.so")):
                os.remove(stale)

    classes["build_ext"] = _BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)
    return classes


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its functions
    config, extensions = _resolve()
    print("pyimputmae build configuration:\n" + json.dumps(config, indent=1, sort_keys=True), flush=True)
    setup(
        ext_modules=extensions,
        cmdclass=command_classes(config, bool(extensions)),
        package_dir={"pyimputmae": "pyimputmae", "pyimputmae.kernels": "kernels"},
        packages=[*find_packages(include=["pyimputmae", "pyimputmae.*"]), "pyimputmae.kernels"],
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if extensions else {},
        **license_metadata(setuptools.__version__),
    )
