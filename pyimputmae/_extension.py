"""Lazy loading of the compiled extension ``pyimputmae._C``.

The extension is optional at run time: when it is missing, was built for another torch (ABI
mismatch, undefined symbol) or cannot run on the current GPU, the ops warn once, naming the
versions, and fall back to Triton or the PyTorch reference. Importing pyimputmae never fails
because of it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from importlib import resources

import torch


class ExtensionWarning(UserWarning):
    """The compiled kernels cannot be used; the ops fall back to Triton or the reference."""


@functools.lru_cache(maxsize=1)
def build_config() -> dict:
    """The configuration recorded by setup.py when the extension was built (``{}`` if none)."""
    try:
        text = resources.files("pyimputmae").joinpath("_build_config.json").read_text()
    except (FileNotFoundError, OSError):
        return {}
    return json.loads(text)


_state: dict = {}


def load() -> bool:
    """Import ``pyimputmae._C`` once; True when its ops are registered. Warns once on failure."""
    if "ok" in _state:
        return _state["ok"]
    ok, why = False, None
    if os.environ.get("PYIMPUTMAE_NO_EXT") == "1":
        why = "disabled by PYIMPUTMAE_NO_EXT=1"
    else:
        try:
            importlib.import_module("pyimputmae._C")
            ok = hasattr(torch.ops.pyimputmae, "masked_mse_forward")
            if not ok:
                why = "pyimputmae._C imported but registered no ops"
            else:
                from . import _ext_fakes

                _ext_fakes.register()
        except ImportError as err:
            cfg = build_config()
            built = cfg.get("torch")
            if cfg.get("extension") is False:
                why = f"installed without it ({cfg.get('reason', 'no reason recorded')})"
            elif built and built != torch.__version__:
                why = (f"built for torch {built} but torch {torch.__version__} is running "
                       f"(rebuild: pip install --no-build-isolation -e .): {err}")
            else:
                why = f"cannot be loaded under torch {torch.__version__}: {err}"
    _state["ok"], _state["why"] = ok, why
    stale = out_of_date() if ok else None
    if stale:
        warnings.warn(f"pyimputmae: {stale}", ExtensionWarning, stacklevel=3)
    if not ok and why and not why.startswith("installed without") and "PYIMPUTMAE_NO_EXT" not in why:
        warnings.warn(f"pyimputmae: compiled kernels unavailable, {why}; using Triton or the PyTorch "
                      f"reference instead", ExtensionWarning, stacklevel=3)
    return ok


def out_of_date() -> str | None:
    """Why the extension was not built from the sources beside the package as they are now: the
    case of ``csrc/`` edited or pulled after an editable install's last build, whose ``_C`` then runs
    the old kernels. None when it was, or when there is nothing to compare: an installed package (no
    ``csrc/`` beside it), a build record without ``sources_sha256`` or of a pure-Python install."""
    from . import _build_sources

    cfg = build_config()
    recorded = cfg.get("sources_sha256")
    if not recorded or cfg.get("extension") is False:
        return None
    try:
        root = _build_sources.checkout_root()
        now = _build_sources.sources_digest(root, bool(cfg.get("cuda"))) if root is not None else None
    except OSError:  # an unreadable file, one saved as it was listed: loading must not fail for it
        return None
    if now is None or now == recorded:
        return None
    return (f"the compiled kernels are older than their sources: {root / 'csrc'} or {root / 'setup.py'} "
            f"changed since pyimputmae._C was built (sources {recorded[:12]} then, {now[:12]} now), so it "
            "runs the old kernels; rebuild it (pip install --no-build-isolation -e .)")


def unavailable_reason() -> str | None:
    """Why the extension is not used (None when it is loaded)."""
    load()
    return _state.get("why")


@functools.lru_cache(maxsize=1)
def cuda_archs() -> tuple[int, ...]:
    """CUDA architectures (e.g. 80, 90) the loaded extension carries code for."""
    if not load():
        return ()
    return tuple(torch.ops.pyimputmae.compiled_cuda_archs())


@functools.cache
def cuda_support(device_index: int) -> tuple[bool, str]:
    """Can the extension's CUDA kernels run on this GPU? ``(ok, reason)``."""
    if not load():
        return False, unavailable_reason() or "extension not loaded"
    archs = cuda_archs()
    if not archs:
        return False, "extension built without CUDA kernels"
    major, minor = torch.cuda.get_device_capability(device_index)
    cap = major * 10 + minor
    ptx = "+PTX" in (build_config().get("cuda_arch_list") or "")
    # machine code runs on the same major architecture at an equal or higher minor;
    # PTX of the highest target is JIT-compiled by the driver for any newer GPU
    if any(a // 10 == major and a <= cap for a in archs) or (ptx and cap >= max(archs)):
        return True, f"sm_{cap} covered by build targets {list(archs)}"
    reason = f"the extension has no kernel image for sm_{cap} (built for {list(archs)})"
    warnings.warn(f"pyimputmae: {reason}; using Triton or the PyTorch reference on this GPU. Rebuild with "
                  f"TORCH_CUDA_ARCH_LIST='{major}.{minor}'", ExtensionWarning, stacklevel=3)
    return False, reason
