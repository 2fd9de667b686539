"""Fixtures of the fused-op tests: the device, every backend that runs on it, seeding.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; triton reads
``TRITON_INTERPRET`` when it is imported, so it is set here, before anything imports triton.
On a GPU machine the same tests run once more on CUDA tensors ("ext" = our CUDA kernels,
"triton" = compiled Triton).
"""

from __future__ import annotations

import os
import sys
import warnings
import zlib

import pytest
import torch  # importing torch does not import triton

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        warnings.warn("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; "
                      "the triton backend may not run on CPU tensors", stacklevel=1)
    os.environ["TRITON_INTERPRET"] = "1"

from op_testing import ALL_FAMILIES, TEST_BACKENDS, backend_skip_reason, cuda_emu_ops, extension_import_crash  # noqa: E402  (after TRITON_INTERPRET is set)

from pyimputmae import _backends  # noqa: E402

# "cuda" only where there is a GPU, so that CPU runs do not list hundreds of skipped copies
DEVICES = [pytest.param("cpu", id="cpu")]
if HAS_CUDA:
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for dev in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        states = [f"{name}: {backend_skip_reason(name, torch.device(dev)) or 'runs'}" for name in TEST_BACKENDS]
        lines.append(f"pyimputmae backends on {dev}: " + "; ".join(states))
    return lines


@pytest.fixture(autouse=True)
def _triton_interpret_kept():
    """A test that drops or changes ``TRITON_INTERPRET`` (loading a tool that pops it, say) fails, and
    the variable is put back: otherwise every later Triton test of its process would skip instead."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    after = os.environ.get("TRITON_INTERPRET")
    if after != before:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        pytest.fail(f"the test changed TRITON_INTERPRET from {before!r} to {after!r} (restored)")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the tensors live: "cpu", plus "cuda" on a GPU machine."""
    return torch.device(request.param)


@pytest.fixture(params=TEST_BACKENDS)
def backend(request: pytest.FixtureRequest, device: torch.device, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every backend that runs the module's op families (``FAMILIES``) on ``device``; the others skip
    with the reason (extension not built, kernel not written yet, no Triton interpreter...).

    ``cuda_emu`` runs the CUDA kernels under the host emulator: for the test's duration the "ext"
    backend calls them instead of the C++ CPU kernels, so the test sees the name "ext".
    """
    families = getattr(request.module, "FAMILIES", ALL_FAMILIES)
    reason = backend_skip_reason(request.param, device, families)
    if reason:
        pytest.skip(reason)
    if request.param == "cuda_emu":
        monkeypatch.setattr(_backends.module("ext"), "_ops", cuda_emu_ops())
        return "ext"
    return request.param


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fixed seed per test function (the same for all its parameters), so failures reproduce."""
    torch.manual_seed(zlib.crc32(request.node.originalname.encode()))


def pytest_unconfigure(config: pytest.Config) -> None:
    extension_import_crash()  # reap the extension probe even when no test asked for "ext"
