"""Build csrc/cuda/*.cu as host C++ under the CUDA emulator (``emu_runtime.h``) and load it.

The translation is textual and small: each ``kernel<<<grid, block[, shared, stream]>>>(args)``
launch becomes ``::emu::launch("kernel", grid, block, shared, stream, &kernel, args)``,
``is_cuda()`` device checks become ``is_cpu()`` (the emulated device's tensors live on the CPU),
and the ``CUDA`` dispatch-key registrations become ``CPU`` ones. Everything else — launchers,
grid arithmetic, vector-width choices, the kernels themselves — compiles unchanged. The library
is built together with ``csrc/ops.cpp`` under the operator namespace ``pyimputmae_cuda_emu``, so it
loads beside the real extension: ``torch.ops.pyimputmae_cuda_emu.<op>`` runs the CUDA code path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAMESPACE = "pyimputmae_cuda_emu"

_LAUNCH_START = re.compile(r"<<<")


def _matching(text: str, index: int) -> int:
    """Index of the bracket that balances the one at ``text[index]`` (``(`` or ``)``, ``<`` or ``>``),
    scanning forwards from an opening one, backwards from a closing one."""
    pairs = {"(": ")", "<": ">"}
    opening = text[index] in pairs
    own = text[index]
    other = pairs[own] if opening else next(o for o, c in pairs.items() if c == own)
    step = 1 if opening else -1
    depth = 0
    i = index
    while 0 <= i < len(text):
        depth += (text[i] == own) - (text[i] == other)
        if depth == 0:
            return i
        i += step
    raise ValueError(f"unbalanced {own!r} at offset {index}")


def _split_top_level(text: str) -> list[str]:
    """Split ``a, f(b, c), d<e, f>`` at the commas outside brackets."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[last:i].strip())
            last = i + 1
    parts.append(text[last:].strip())
    return parts


def translate(source: str) -> str:
    """The host-emulator C++ of one .cu file."""
    out, pos = [], 0
    for match in _LAUNCH_START.finditer(source):
        if match.start() < pos:
            continue
        # the kernel expression: an identifier, optionally with <template arguments>
        end = match.start() - 1
        start = end
        if source[end] == ">":
            start = _matching(source, end) - 1
        while start >= 0 and (source[start].isalnum() or source[start] in "_:"):
            start -= 1
        kernel = source[start + 1:match.start()].strip()
        config_end = source.index(">>>", match.end())
        config = _split_top_level(source[match.end():config_end])
        if not 2 <= len(config) <= 4:
            raise ValueError(f"launch of {kernel}: cannot read the configuration {config}")
        config += ["0", "nullptr"][len(config) - 2:]
        args_open = source.index("(", config_end)
        args_close = _matching(source, args_open)
        args = source[args_open + 1:args_close].strip()
        out.append(source[pos:start + 1])
        call_args = [f'"{kernel}"', *config, f"&{kernel}"] + ([args] if args else [])
        out.append("::emu::launch(" + ", ".join(call_args) + ")")
        pos = args_close + 1
    out.append(source[pos:])
    text = "".join(out)
    text = text.replace(".is_cuda()", ".is_cpu()")
    return re.sub(r"TORCH_LIBRARY_IMPL\((\w+),\s*CUDA,", r"TORCH_LIBRARY_IMPL(\1, CPU,", text)


def build_directory() -> Path:
    return Path(os.environ.get("PYIMPUTMAE_CUDA_EMU_BUILD", REPO / "build" / "cuda_emu"))


def _compile(name: str, cuda_sources: list[Path], cpp_sources: list[Path], defines: list[str],
             verbose: bool) -> None:
    from torch.utils import cpp_extension

    directory = build_directory() / name
    sources_dir = directory / "sources"
    sources_dir.mkdir(parents=True, exist_ok=True)
    # the CUDA headers of csrc/include are translated too and found first (same names)
    translated = [(cuh, sources_dir / cuh.name) for cuh in sorted((REPO / "csrc" / "include").glob("*.cuh"))]
    translated += [(cu, sources_dir / f"{cu.stem}.emu.cpp") for cu in cuda_sources]
    sources = [str(s) for s in cpp_sources]
    for original, target in translated:
        text = f'#line 1 "{original}"\n' + translate(original.read_text(encoding="utf-8"))
        if not target.exists() or target.read_text(encoding="utf-8") != text:  # keep ninja's timestamps when unchanged
            target.write_text(text, encoding="utf-8")
        if target.suffix == ".cpp":
            sources.append(str(target))
    # PYIMPUTMAE_CUDA_EMU_SANITIZE=address builds with AddressSanitizer, which then catches the
    # kernels' out-of-bounds accesses (run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
    sanitize = os.environ.get("PYIMPUTMAE_CUDA_EMU_SANITIZE", "")
    sanitize_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=["-O1" if sanitize else "-O2", "-g0", "-Wno-unknown-pragmas", *sanitize_flags, *defines,
                      "-include", str(HERE / "emu_runtime.h")],
        extra_ldflags=sanitize_flags,
        extra_include_paths=[str(sources_dir), str(HERE / "include"), str(REPO / "csrc" / "include")],
        build_directory=str(directory),
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )


def build(verbose: bool = False) -> object:
    """Compile (incrementally) and load csrc/cuda/ under the emulator; returns ``torch.ops.pyimputmae_cuda_emu``."""
    _compile(NAMESPACE, sorted((REPO / "csrc" / "cuda").glob("*.cu")), [REPO / "csrc" / "ops.cpp"],
             [f"-Dpyimputmae={NAMESPACE}"], verbose)
    return getattr(torch.ops, NAMESPACE)


def build_selftest(verbose: bool = False) -> object:
    """The emulator's own test kernels (selftest.cu); returns ``torch.ops.cuda_emu_selftest``."""
    _compile("cuda_emu_selftest", [HERE / "selftest.cu"], [], [], verbose)
    return torch.ops.cuda_emu_selftest


if __name__ == "__main__":
    print("loaded", build(verbose=True), build_selftest(verbose=True))
