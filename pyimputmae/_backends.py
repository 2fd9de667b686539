"""Backend choice for the fused ops.

Every backend offers the same kernel-level functions (the schemas in ``csrc/ops.cpp``):
``patch_embed_forward``, ``patch_embed_backward``, ``select_keep``, ``gather_visible``,
``unshuffle_fill`` (``mask_token=None`` for a zero token), ``hidden_sum``, ``fill_backward``
(``gather_visible`` and ``hidden_sum`` of one gradient, fused where a backend can),
``masked_mse_forward``, ``scale_grad_``.

Backends: ``ext`` (our compiled C++ / CUDA kernels, ``pyimputmae._C``), ``triton``
(``pyimputmae.kernels``), ``reference`` (plain PyTorch, ``pyimputmae.reference.backend``). The fused
ops' families (``patch_embed``, ``masking``, ``masked_mse``) have all three; ``layer_norm``, the
pre-norm sublayers' LayerNorm (``layer_norm_forward``, ``layer_norm_backward``), only ``triton`` and
``reference`` (``IMPLEMENTED``): its order is triton → reference on CUDA and reference on CPU, and
one name in ``PYIMPUTMAE_BACKEND`` leaves a family that backend does not implement to the automatic
choice.
Order for CUDA tensors: per op family ``CUDA_ORDER`` (ext → triton → reference until a GPU run
measures which is faster), among the pairs in ``GPU_VALIDATED`` (for float16 tensors also in
``GPU_VALIDATED_FP16``); for CPU tensors: ext → reference. Triton runs
on CPU tensors only when asked for by name, under ``TRITON_INTERPRET=1``. A per-call ``backend=``
wins over ``PYIMPUTMAE_BACKEND`` (one name for every op, or ``family=name`` pairs separated by
commas, e.g. ``masked_mse=triton,patch_embed=ext``), which wins over the default order.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import _extension

FAMILIES = ("patch_embed", "masking", "masked_mse", "layer_norm")
NAMES = ("ext", "triton", "reference")
#: the backends that implement a family, where not all of NAMES do: ``layer_norm`` (the pre-norm
#: sublayers' LayerNorm, 16-bit in and out with float32 statistics: ``kernels/layer_norm.py``) is a
#: Triton kernel beside PyTorch's own
IMPLEMENTED = {"layer_norm": ("triton", "reference")}
ALIASES = {"cpp": "ext", "cpu": "ext", "cuda": "ext", "c++": "ext", "ref": "reference", "torch": "reference"}


#: (backend, family) pairs whose GPU kernels have been checked against the reference on real
#: hardware (docs/benchmarks.md, "GPU validation"). On CUDA tensors the automatic choice uses only
#: these; the others run when asked for by name (backend= or PYIMPUTMAE_BACKEND), or for all of
#: them with PYIMPUTMAE_GPU_UNVALIDATED=1 (what tools/gpu_check.sh sets to validate them).
GPU_VALIDATED = frozenset({("triton", "masking"), ("triton", "masked_mse")})
#: the pairs of GPU_VALIDATED whose float16 cases passed on a GPU too (tools/gpu_check.sh runs them in a
#: later stage, test16): for float16 tensors on CUDA the automatic choice needs a pair in both sets
GPU_VALIDATED_FP16: frozenset[tuple[str, str]] = frozenset()

#: the automatic order on CUDA tensors per op family, fastest first: tools/gpu_validated.py prints it
#: from a GPU run's bench_large.json (the family's training-pass times of its validated backends).
#: The CUDA patch embedding is a gather + cuBLAS, the Triton one an implicit GEMM (TMA boxes for every
#: patch of 16-bit inputs on sm_90+, gathered patches otherwise): which wins is
#: for the measurement to say.
DEFAULT_CUDA_ORDER = ("ext", "triton", "reference")
CUDA_ORDER: dict[str, tuple[str, ...]] = {family: DEFAULT_CUDA_ORDER for family in FAMILIES}


#: the floating dtypes a backend's kernels take (the automatic choice passes a backend by for others).
#: ext takes all four, float16 (torch.autocast("cuda")'s default) included: fp32 accumulation, and
#: masked_mse keeps an fp16 pred's gradient in fp32 (reference.masked_mse.gradient_dtype)
DTYPES = {"ext": frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})}


class BackendError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


def implements(name: str, family: str) -> bool:
    """Does backend ``name`` have kernels for op family ``family``?"""
    return name in IMPLEMENTED.get(family, NAMES)


def canonical(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in (*NAMES, "auto"):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
    return name


@functools.lru_cache(maxsize=1)
def _triton_module() -> tuple[ModuleType | None, str | None]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return None, f"triton is not installed ({err})"
    try:
        return importlib.import_module("pyimputmae.kernels"), None
    except ModuleNotFoundError as err:
        if err.name != "pyimputmae.kernels":
            return None, f"pyimputmae.kernels failed to import: {err!r}"
        return _kernels_from_checkout()
    except Exception as err:  # a broken triton install must not break the other backends
        return None, f"pyimputmae.kernels failed to import: {err!r}"


def _kernels_from_checkout() -> tuple[ModuleType | None, str | None]:
    """Running from a source checkout that was never installed: ``kernels/`` beside the package
    is ``pyimputmae.kernels`` (the mapping setup.py makes at install time)."""
    import importlib.util
    import sys
    from pathlib import Path

    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.exists():
        return None, "pyimputmae.kernels is not installed and no kernels/ folder lies beside the package"
    spec = importlib.util.spec_from_file_location("pyimputmae.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyimputmae.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules["pyimputmae.kernels"]
        return None, f"kernels/ from the source checkout failed to import: {err!r}"
    return module, None


@functools.cache  # module() runs on every op call: importlib's lookup alone costs microseconds
def _ext_module() -> ModuleType:
    return importlib.import_module("pyimputmae._ext_backend")


@functools.cache
def _reference_module() -> ModuleType:
    return importlib.import_module("pyimputmae.reference.backend")


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """Can backend ``name`` run on tensors of ``device``? ``(ok, reason)``."""
    if name == "reference":
        return True, "plain PyTorch runs everywhere"
    if name == "ext":
        if not _extension.load():
            return False, _extension.unavailable_reason() or "extension not loaded"
        if device.type == "cpu":
            return True, "compiled C++ CPU kernels"
        if device.type == "cuda":
            return _extension.cuda_support(device.index if device.index is not None else torch.cuda.current_device())
        return False, f"no compiled kernels for device type {device.type}"
    if name == "triton":
        mod, why = _triton_module()
        if mod is None:
            return False, why or "triton unavailable"
        if device.type == "cuda":
            return True, "Triton kernels compiled for this GPU"
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "TRITON_INTERPRET=1: Triton interpreter on CPU tensors (only when asked for by name)"
            return False, "Triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)"
        return False, f"Triton does not run on {device.type} tensors"
    raise ValueError(name)


def _env_choice(family: str) -> str | None:
    raw = os.environ.get("PYIMPUTMAE_BACKEND", "").strip()
    if not raw:
        return None
    if "=" not in raw:  # one name for every op: the families it has no kernels for keep the automatic choice
        name = canonical(raw)
        return name if name == "auto" or implements(name, family) else None
    for item in raw.split(","):
        key, _, value = item.partition("=")
        if key.strip() == family:
            return canonical(value.strip())
    return None


def default_order(device: torch.device, family: str | None = None) -> tuple[str, ...]:
    """The automatic order of backends for ``family`` (any family when None) on ``device``."""
    order = ("ext", "reference") if device.type != "cuda" else CUDA_ORDER.get(family, DEFAULT_CUDA_ORDER)
    return order if family is None else tuple(name for name in order if implements(name, family))


def resolve(family: str, device: torch.device, requested: str = "auto",
            dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """The backend that runs op family ``family`` on ``device`` for floating tensors of ``dtypes``
    (the automatic choice skips a backend whose kernels do not take one of them)."""
    requested = canonical(requested)
    source = "backend="
    if requested == "auto":
        requested = _env_choice(family) or "auto"
        source = "PYIMPUTMAE_BACKEND"
    if requested != "auto":
        if not implements(requested, family):
            raise BackendError(f"{family}: backend {requested!r} (from {source}) has no {family} kernels; "
                               f"choose one of {', '.join(IMPLEMENTED[family])} or 'auto'")
        ok, why = availability(requested, device)
        if not ok:
            raise BackendError(f"{family}: backend {requested!r} (from {source}) cannot run on {device}: {why}")
        return requested
    for name in default_order(device, family):
        if name in DTYPES and not DTYPES[name].issuperset(dtypes):
            continue
        if availability(name, device)[0] and _validated(name, family, device, dtypes):
            return name
    return "reference"


def _validated(name: str, family: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    if device.type != "cuda" or name == "reference" or os.environ.get("PYIMPUTMAE_GPU_UNVALIDATED") == "1":
        return True
    if torch.float16 in dtypes and (name, family) not in GPU_VALIDATED_FP16:
        return False
    return (name, family) in GPU_VALIDATED


def module(name: str) -> ModuleType:
    """The module implementing backend ``name``'s kernel-level functions."""
    if name == "ext":
        return _ext_module()
    if name == "triton":
        mod, why = _triton_module()
        if mod is None:
            raise BackendError(f"triton backend unavailable: {why}")
        return mod
    return _reference_module()


def explain(device: torch.device) -> dict[str, dict]:
    """For ``pyimputmae info``: per family, the chosen backend and why the others are not."""
    out = {}
    for family in FAMILIES:
        try:
            chosen = resolve(family, device)
        except BackendError as err:
            chosen = f"error: {err}"
        reasons = {}
        for name in NAMES:
            if not implements(name, family):
                reasons[name] = (False, f"has no {family} kernels")
                continue
            ok, why = availability(name, device)
            if ok and not _validated(name, family, device):
                ok, why = False, (f"{why}; not yet validated on a GPU, so used only when asked for by name "
                                  "(backend=, PYIMPUTMAE_BACKEND) or with PYIMPUTMAE_GPU_UNVALIDATED=1")
            reasons[name] = (ok, why)
        out[family] = {"backend": chosen, "candidates": {n: {"ok": ok, "why": why} for n, (ok, why) in reasons.items()}}
        if device.type == "cuda":  # float16 needs its own GPU validation
            try:
                half = resolve(family, device, dtypes=(torch.float16,))
            except BackendError as err:
                half = f"error: {err}"
            if half != chosen:
                out[family]["float16_backend"] = half
    return out
