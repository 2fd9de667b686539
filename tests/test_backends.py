"""The backends themselves: the compiled extension loads, and every backend says whether it runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from op_testing import ALL_FAMILIES, BACKENDS, backend_skip_reason, extension_import_crash

from pyimputmae import _backends


def test_extension_import_does_not_kill_the_process():
    """``import pyimputmae._C`` after ``import pyimputmae`` must either work or raise ImportError
    (then the ops warn and fall back); an abort would take every user's program down with it."""
    if importlib.util.find_spec("pyimputmae._C") is None:
        pytest.skip("ext: pyimputmae._C not built")
    crash = extension_import_crash()
    assert crash is None, f"importing pyimputmae._C after pyimputmae aborts: {crash}"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_auto_backend_is_one_that_runs(family, device):
    """``auto`` picks ext, then (on CUDA) triton, then the reference, whichever can run."""
    if extension_import_crash():
        pytest.skip("ext: importing pyimputmae._C kills the process, so auto cannot be resolved safely")
    chosen = _backends.resolve(family, device)
    order = _backends.default_order(device)
    runnable = [name for name in order if backend_skip_reason(name, device, [family]) is None]
    assert chosen in BACKENDS
    assert chosen == (runnable[0] if runnable else "reference"), f"{family}: auto chose {chosen}, runnable {runnable}"


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        _backends.resolve("masking", torch.device("cpu"), "fortran")
