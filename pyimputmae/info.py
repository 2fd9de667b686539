"""``pyimputmae info``: versions, the recorded build configuration, and which backend each op
uses on each device and why not the others."""

from __future__ import annotations

import json
import platform
import sys

import torch

from . import __version__, _backends, _extension


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def stale_record(cfg: dict, ext_ok: bool) -> str | None:
    """Why the recorded build configuration cannot describe the extension that actually loaded
    (None when it can): e.g. an editable reinstall with ``PYIMPUTMAE_NO_EXT=1`` that left an
    earlier build's ``_C`` in the source tree, or a record from before setup.py kept wheel builds
    (``PYIMPUTMAE_NO_EXT=1 pip wheel .``) from rewriting the editable install's record."""
    if not ext_ok:
        return None
    module = sys.modules.get("pyimputmae._C")
    where = getattr(module, "__file__", None) or "pyimputmae._C"
    refresh = "reinstall (pip install --no-build-isolation -e .) to refresh it"
    if not cfg:
        return f"no build record, but the extension was loaded from {where}; {refresh}"
    if cfg.get("extension") is False:
        return (f"the record describes a pure-Python build ({cfg.get('reason', 'no reason recorded')}), but the "
                f"extension was loaded from {where}: the record was left by another build; {refresh}")
    recorded = sorted(cfg.get("cuda_archs") or [])
    loaded = sorted(_extension.cuda_archs())
    if recorded != loaded:
        return (f"the record lists CUDA targets {recorded}, the loaded extension ({where}) carries {loaded}: "
                f"the record was left by another build; {refresh}")
    return None


def collect() -> dict:
    """Everything ``pyimputmae info`` prints, as a dict (``--json``)."""
    cfg = _extension.build_config()
    ext_ok = _extension.load()
    info: dict = {
        "pyimputmae": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {
            "loaded": ext_ok,
            "why_not": None if ext_ok else _extension.unavailable_reason(),
            "cpu_kernels": ext_ok,
            "cuda_kernels_compiled": bool(_extension.cuda_archs()) if ext_ok else False,
            "cuda_archs": list(_extension.cuda_archs()) if ext_ok else [],
        },
        "build": cfg,
        "build_record_stale": stale_record(cfg, ext_ok),
        "build_sources_changed": _extension.out_of_date() if ext_ok else None,
        "backends": {"cpu": _backends.explain(torch.device("cpu"))},
    }
    if torch.cuda.is_available():
        info["backends"]["cuda"] = _backends.explain(torch.device("cuda", torch.cuda.current_device()))
    else:
        tri_ok = _triton_module_ok()
        info["backends"]["cuda"] = {
            "note": "no CUDA device visible; on a GPU the order per op family is "
                    + "; ".join(f"{f}: {' → '.join(_backends.default_order(torch.device('cuda'), f))}"
                                for f in _backends.FAMILIES)
                    + ", among the kernels validated on a GPU: "
                    + ", ".join(f"{b} {f}" for b, f in sorted(_backends.GPU_VALIDATED))
                    + "; for float16: " + (", ".join(f"{b} {f}" for b, f in sorted(_backends.GPU_VALIDATED_FP16))
                                           or "none yet (the PyTorch reference runs)"),
            "ext": "CUDA kernels compiled for " + ", ".join(f"sm_{a}" for a in _extension.cuda_archs())
            if ext_ok and _extension.cuda_archs() else "no CUDA kernels in this build",
            "triton": "importable" if tri_ok else "not importable",
        }
    return info


def _triton_module_ok() -> bool:
    mod, _ = _backends._triton_module()
    return mod is not None


def render(info: dict) -> str:
    lines = [
        f"pyimputmae {info['pyimputmae']}  python {info['python']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}",
        f"GPU: {info['gpu'] or 'none visible'}",
    ]
    ext = info["extension"]
    if ext["loaded"]:
        archs = ", ".join(f"sm_{a}" for a in ext["cuda_archs"]) or "none"
        lines.append(f"extension pyimputmae._C: loaded; CPU kernels yes; CUDA kernels compiled: {archs}")
    else:
        lines.append(f"extension pyimputmae._C: not used ({ext['why_not']})")
    b = info["build"]
    stale = info.get("build_record_stale")
    label = "build record (stale)" if stale else "build"
    if b and not b.get("extension", True):
        lines.append(f"{label}: pure Python install ({b.get('reason')})")
    elif b:
        lines.append(
            f"{label}: torch {b.get('torch')}, {b.get('cxx_version', b.get('cxx', '?'))}, OpenMP {b.get('openmp')}, "
            f"CUDA {'yes' if b.get('cuda') else 'no'} ({b.get('cuda_reason', b.get('reason', ''))}), "
            f"nvcc {b.get('nvcc')}, TORCH_CUDA_ARCH_LIST {b.get('cuda_arch_list')}"
        )
    if stale:
        lines.append(f"  stale: {stale}")
    if info.get("build_sources_changed"):
        lines.append(f"  out of date: {info['build_sources_changed']}")
    for dev, table in info["backends"].items():
        lines.append(f"\nops on {dev} tensors:")
        if "note" in table:
            lines.append(f"  {table['note']}")
            lines.append(f"  ext: {table['ext']}; triton: {table['triton']}")
            continue
        for family, entry in table.items():
            half = (f" (float16: {entry['float16_backend']}, its float16 kernels not yet validated on a GPU)"
                    if "float16_backend" in entry else "")
            lines.append(f"  {family:12s} → {entry['backend']}{half}")
            for name, cand in entry["candidates"].items():
                mark = "ok " if cand["ok"] else "no "
                lines.append(f"      {mark}{name:9s} {cand['why']}")
    return "\n".join(lines)


def main(as_json: bool = False) -> None:
    info = collect()
    print(json.dumps(info, indent=1, default=str) if as_json else render(info))
