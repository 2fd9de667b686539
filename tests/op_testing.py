"""Shared helpers of the fused-op tests: which backends can run here, tolerances, the bf16 / fp16 criterion.

Imported by ``conftest.py`` and the test modules (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pyimputmae import _backends

BACKENDS = ("reference", "ext", "triton")
#: the backends the op tests run: the library's, plus "cuda_emu" = our CUDA kernels (csrc/cuda/)
#: compiled as host C++ under the emulator in tests/cuda_emu/, run on CPU tensors as the "ext" backend
TEST_BACKENDS = (*BACKENDS, "cuda_emu")

# the kernel-level functions (docs/architecture.md) each op family needs from a backend
FAMILY_FUNCTIONS = {
    "patch_embed": ("patch_embed_forward", "patch_embed_backward"),
    "masking": ("select_keep", "gather_visible", "unshuffle_fill", "hidden_sum", "fill_backward"),
    "masked_mse": ("masked_mse_forward", "scale_grad_"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
}
#: the fused ops' families, what a test module without ``FAMILIES`` runs (``layer_norm`` is the model's
#: LayerNorm, which only triton and reference implement: tests/test_layer_norm.py)
ALL_FAMILIES = ("patch_embed", "masking", "masked_mse")

# (rtol, atol); atol is taken relative to the largest |expected| (at least 1), so a sum of many
# terms is judged on the scale of the result rather than on each element's own size
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
#: the 16-bit dtypes (autocast's: bf16, and fp16, torch.autocast("cuda")'s default), as test parameters
HALF_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]



def setup_module() -> ModuleType:
    """``setup.py`` loaded as a module (its build runs only as ``__main__``), to call its functions;
    a fresh one per call (tests patch its globals)."""
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("pyimputmae_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the tiny model of the training tests: every modality, a few thousand parameters
TINY_MODEL = dict(dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64, freeze="none")


def tool_module(name: str) -> ModuleType:
    """``tools/<name>.py`` (a script, not a package) loaded as a module, to call its functions.
    ``TRITON_INTERPRET`` is put back afterwards: a tool that compiles for a GPU drops it for its own
    launches, and the Triton tests of this process need it."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module

@dataclass(frozen=True)
class PatchInput:
    """The shape of a patch op's raw input ``x: (batch, channels, *spatial)`` cut into patches of
    ``patch`` per axis: ``tokens`` = L patches of ``features`` = C·p^k values."""

    batch: int
    channels: int
    spatial: tuple[int, ...]
    patch: int

    @property
    def tokens(self) -> int:
        return math.prod(s // self.patch for s in self.spatial)

    @property
    def features(self) -> int:
        return self.channels * self.patch ** len(self.spatial)


def has_kernel(qualname: str, key: str) -> bool:
    """Is ``qualname`` (``ns::op``) registered with a kernel for dispatch key ``key``?"""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    except RuntimeError:  # the operator does not exist
        return False


def _start_extension_probe() -> subprocess.Popen | None:
    if importlib.util.find_spec("pyimputmae._C") is None:
        return None
    return subprocess.Popen([sys.executable, "-c", "import pyimputmae, pyimputmae._C"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# started at import, so that it runs while pytest collects
_EXTENSION_PROBE = _start_extension_probe()


@functools.lru_cache(maxsize=1)
def extension_import_crash() -> str | None:
    """If importing the built ``pyimputmae._C`` next to the Python ops kills the interpreter (an
    abort in a static initialiser, e.g. a clashing operator registration), what it printed; else None.

    Probed in a subprocess so that such an extension fails its own test (test_backends.py) instead
    of taking the whole session down. An ordinary ImportError is not a crash: the ops fall back.
    """
    if _EXTENSION_PROBE is None:
        return None
    _, stderr = _EXTENSION_PROBE.communicate(timeout=300)
    if _EXTENSION_PROBE.returncode >= 0:
        return None
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("  File")]
    return f"signal {-_EXTENSION_PROBE.returncode}: " + " | ".join(lines[:8])


@functools.lru_cache(maxsize=1)
def cuda_emu_build() -> ModuleType:
    """tests/cuda_emu/build.py, which builds csrc/cuda/ for the host emulator (cached in build/cuda_emu)."""
    path = Path(__file__).resolve().parent / "cuda_emu" / "build.py"
    spec = importlib.util.spec_from_file_location("pyimputmae_tests_cuda_emu_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def cuda_emu_ops() -> object:
    """``torch.ops.pyimputmae_cuda_emu``: our CUDA kernels, built and loaded once for the host emulator.

    A build failure is an error, not a skip: wherever the real extension was built, this can be.
    """
    return cuda_emu_build().build()


def backend_skip_reason(name: str, device: torch.device, families: Iterable[str] = ALL_FAMILIES) -> str | None:
    """Why backend ``name`` cannot run ``families`` on ``device`` here, or None when it can."""
    if name == "cuda_emu":
        if device.type != "cpu" or torch.cuda.is_available():
            return "cuda_emu: a GPU machine tests the real CUDA kernels; the emulated ones are for machines without"
        reason = backend_skip_reason("ext", device, families)
        return reason and f"cuda_emu needs the C++ extension for its CPU fallbacks and schemas; {reason}"
    if name == "ext" and extension_import_crash():
        return "ext: importing pyimputmae._C kills the process (test_backends.py shows why)"
    absent = [family for family in families if not _backends.implements(name, family)]
    if absent:
        return f"{name}: has no {', '.join(absent)} kernels (only {', '.join(_backends.IMPLEMENTED[absent[0]])})"
    ok, why = _backends.availability(name, device)
    if not ok:
        return f"{name}: {why}"
    needed = [fn for family in families for fn in FAMILY_FUNCTIONS[family]]
    if name == "triton":
        kernels = _backends.module("triton")
        missing = [fn for fn in needed if not callable(getattr(kernels, fn, None))]
        if missing:
            return f"triton: pyimputmae.kernels does not implement {', '.join(missing)} yet"
    if name == "ext":
        key = "CUDA" if device.type == "cuda" else "CPU"
        missing = [fn for fn in needed
                   if not (has_kernel(f"pyimputmae::{fn}", key)
                           or has_kernel(f"pyimputmae::{fn}", "CompositeExplicitAutograd"))]
        if missing:
            return f"ext: pyimputmae._C has no {key} kernel for {', '.join(missing)} yet"
    return None


def kernel_level_op(name: str, device: torch.device) -> tuple[torch._ops.OpOverload | None, str | None]:
    """The compiled kernel-level op ``torch.ops.pyimputmae.<name>`` of the ext backend, if it can be
    opchecked here: ``(op, None)``, or ``(None, reason to skip)``."""
    family = next(f for f, fns in FAMILY_FUNCTIONS.items() if name in fns)
    reason = backend_skip_reason("ext", device, [family])
    if reason:
        return None, reason
    qualname = f"pyimputmae::{name}"
    op = getattr(torch.ops.pyimputmae, name).default
    if any(arg.name == "backend" for arg in op._schema.arguments):
        return None, f"ext: torch.ops.pyimputmae.{name} is the public Python op, not the compiled kernel"
    from torch._library import simple_registry

    python_fake = simple_registry.singleton.find(qualname).fake_impl.kernel is not None
    if not (python_fake or has_kernel(qualname, "Meta")):
        return None, f"ext: {qualname} has no fake (Meta) kernel, so it cannot be traced on its own"
    return op, None


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 what: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: ``actual``'s dtype), in float64 on the CPU."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    a, e = _as_float64(actual), _as_float64(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, equal_nan=False,
                               msg=lambda m: f"{what}: {m}" if what else m)


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (_as_float64(actual) - _as_float64(reference)).abs().max().item() if actual.numel() else 0.0


def assert_no_worse_than_torch(actual: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, *,
                               factor: float = 2.0, what: str = "") -> None:
    """The low-precision criterion of the GPU issue: a bf16 (or fp16) result passes when its error
    against an fp32 (or better) reference is at most ``factor`` (twice) that of the same computation
    in plain PyTorch in that dtype (``plain``).

    Errors are the largest absolute difference, computed in float64.
    """
    name = str(plain.dtype).removeprefix("torch.")
    assert actual.dtype == plain.dtype, f"{what}: expected a {name} result, got {actual.dtype}"
    assert actual.shape == reference.shape == plain.shape, (
        f"{what}: shapes {tuple(actual.shape)}, plain {tuple(plain.shape)}, reference {tuple(reference.shape)}")
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the {name} result"
    err, base = max_abs_error(actual, reference), max_abs_error(plain, reference)
    assert err <= factor * base, (
        f"{what}: {name} max error {err:.3e} against the fp32 reference exceeds {factor}× that of plain "
        f"PyTorch {name} ({base:.3e})")

