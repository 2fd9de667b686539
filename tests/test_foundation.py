"""The package as installed: light import, graceful fallback without the extension, `info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import pyimputmae
from pyimputmae import _extension

HEAVY = ("zarr", "openslide", "SimpleITK", "lifelines", "matplotlib", "pandas", "triton")


def _run(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120)


def test_import_needs_only_torch_and_numpy():
    out = _run(f"""
        import sys, pyimputmae, pyimputmae.data, pyimputmae.ops
        print([m for m in {HEAVY!r} if m in sys.modules])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import pyimputmae pulled in heavy modules: {out.stdout}"


def test_expected_install_kind():
    """In CI's pure-Python stage the imported package must be that install, without _C."""
    if os.environ.get("PYIMPUTMAE_EXPECT_NO_EXT") != "1":
        pytest.skip("only meaningful in the PYIMPUTMAE_NO_EXT=1 install stage of .ci/run")
    assert _extension.build_config().get("extension") is False
    assert not list(Path(pyimputmae.__file__).parent.glob("_C*.so"))
    assert not _extension.load()


def test_no_ext_env_falls_back_to_reference_silently():
    out = _run("""
        import warnings, torch
        warnings.simplefilter("error")
        import pyimputmae
        from pyimputmae import _backends
        x = torch.randn(2, 1, 8); pred = torch.randn(2, 2, 4); mask = torch.ones(2, 2, dtype=torch.bool)
        loss = pyimputmae.masked_mse(pred, x, mask, patch=4)
        print(float(loss), _backends.resolve("masked_mse", torch.device("cpu")))
    """, env={"PYIMPUTMAE_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "reference"


def _compile_broken_extension(path: Path) -> None:
    """A `_C` that imports like one built against another torch: an undefined C++ symbol."""
    src = path.with_name("broken_ext.c")
    src.write_text(textwrap.dedent("""
        #include <Python.h>
        extern void _ZN3c1019UndefinedTensorImpl10_singletonE_from_another_torch(void);
        PyMODINIT_FUNC PyInit__C(void) {
            _ZN3c1019UndefinedTensorImpl10_singletonE_from_another_torch();
            return NULL;
        }
    """))
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a deliberately broken extension")
    inc = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-shared", "-fPIC", f"-I{inc}", str(src), "-o", str(path)], check=True, capture_output=True)


def test_broken_extension_warns_once_and_falls_back(tmp_path):
    pkg = tmp_path / "pyimputmae"
    shutil.copytree(Path(pyimputmae.__file__).parent, pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    _compile_broken_extension(pkg / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}")
    (pkg / "_build_config.json").write_text(json.dumps({"extension": True, "torch": "0.0.0-other"}))
    out = _run(f"""
        import warnings, torch
        import pyimputmae
        assert pyimputmae.__file__.startswith({str(tmp_path)!r}), pyimputmae.__file__
        x = torch.randn(2, 1, 8); pred = torch.randn(2, 2, 4); mask = torch.ones(2, 2, dtype=torch.bool)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = pyimputmae.masked_mse(pred, x, mask, patch=4)
            b = pyimputmae.masked_mse(pred, x, mask, patch=4)
        ours = [str(w.message) for w in caught if "pyimputmae" in str(w.message)]
        print(len(ours)); print(ours[0] if ours else ""); print(float(a) == float(b))
    """, env={"PYTHONPATH": str(tmp_path), "PYIMPUTMAE_NO_EXT": ""}, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    count, message, same = out.stdout.strip().splitlines()
    assert count == "1", f"expected exactly one warning, got {count}: {out.stdout}"
    assert "0.0.0-other" in message and "undefined symbol" in message, message
    assert same == "True"


def test_info_reports_backends_and_build():
    from pyimputmae.info import collect, render

    info = collect()
    text = render(info)
    assert "ops on cpu tensors" in text and "masked_mse" in text
    for family in ("patch_embed", "masking", "masked_mse"):
        assert info["backends"]["cpu"][family]["backend"] in ("ext", "reference")
    if _extension.load():
        assert info["backends"]["cpu"]["masked_mse"]["backend"] == "ext"
        if _extension.build_config().get("cuda"):
            assert info["extension"]["cuda_archs"], "build says CUDA, but no CUDA kernels are compiled in"


def test_info_cli_runs():
    out = subprocess.run([sys.executable, "-m", "pyimputmae", "info", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["pyimputmae"] == pyimputmae.__version__ and "backends" in data


def test_backend_override_by_env_and_argument(monkeypatch):
    import torch

    from pyimputmae import _backends

    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "masked_mse=reference")
    assert _backends.resolve("masked_mse", torch.device("cpu")) == "reference"
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        _backends.resolve("masked_mse", torch.device("cpu"))
    monkeypatch.delenv("PYIMPUTMAE_BACKEND")
    assert _backends.resolve("masked_mse", torch.device("cpu"), "reference") == "reference"
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(_backends.BackendError, match="TRITON_INTERPRET"):
            _backends.resolve("masked_mse", torch.device("cpu"), "triton")
