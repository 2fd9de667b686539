"""Registers, spills, shared memory and occupancy of every CUDA kernel in ``csrc/cuda/``, without a GPU.

    python tools/cuda_resource_check.py [--arch 90] [--json out.json]

Each ``csrc/cuda/*.cu`` is compiled to PTX with the flags ``setup.py`` builds the extension with
(torch's nvcc flags and setup.py's ``NVCC_FLAGS``), and the PTX is assembled for ``sm_<arch>`` by
``ptxas -v``. One line per kernel instantiation: registers per thread, spill stores/loads and stack
bytes (a non-zero one is a slowdown the GPU run would show without saying why), static shared
memory, the block size of its ``__launch_bounds__`` (``.maxntid`` in the PTX) and the theoretical
occupancy at that block size (resident warps per SM out of 64, from registers and shared memory;
launches that use fewer threads per block can fit more blocks). Exit status 1 when any kernel
spills or uses stack, or when a compilation fails.

Needs nvcc (``CUDA_HOME`` or on ``PATH``) and torch's headers; no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: per-SM limits of the architectures we target: registers, resident warps, shared memory per SM
#: and per block (bytes), resident blocks
SM_LIMITS = {
    80: dict(regs=65536, warps=64, smem_sm=167936, smem_block=166912, blocks=32),
    90: dict(regs=65536, warps=64, smem_sm=233472, smem_block=232448, blocks=32),
}
REG_UNIT = 256  # registers are allocated per warp in units of 256


@dataclass
class Kernel:
    source: str
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    block: int | None
    warps_per_sm: int | None

    @property
    def clean(self) -> bool:
        return self.spill_stores == self.spill_loads == self.stack == 0


def occupancy(registers: int, smem: int, block: int, arch: int) -> int:
    """Resident warps per SM of a kernel launched with ``block`` threads per block."""
    lim = SM_LIMITS.get(arch, SM_LIMITS[90])
    warps_per_block = -(-block // 32)
    per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    blocks = min(lim["regs"] // per_warp // warps_per_block, lim["warps"] // warps_per_block, lim["blocks"])
    if smem:
        blocks = min(blocks, lim["smem_sm"] // (smem + 1024))  # 1 KiB per block is reserved by the driver
    return blocks * warps_per_block


def short_name(mangled: str) -> str:
    """``masked_mse_rows_kernel<c10::BFloat16, float, ...>`` from a mangled entry name."""
    out = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    out = re.sub(r"pyimputmae::cuda::\(anonymous namespace\)::", "", out)
    out = re.sub(r"^void ", "", out)
    return re.sub(r"\(.*\)$", "", out)  # drop the parameter list: the template arguments name it


def setup_nvcc_flags() -> list[str]:
    """setup.py's ``NVCC_FLAGS`` (setup.py loaded by path; its build runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("_pyimputmae_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.NVCC_FLAGS)


def nvcc_command(nvcc: str, source: Path, ptx: Path, arch: int) -> list[str]:
    from torch.utils import cpp_extension

    includes = [str(ROOT / "csrc" / "include"), *cpp_extension.include_paths(device_type="cuda")]
    for path in sys.path:  # as setup.py: pip's CUDA torch keeps cusparse.h etc. here
        inc = os.path.join(path, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            includes.append(inc)
            break
    return [nvcc, "--ptx", f"-arch=compute_{arch}", "-std=c++20", *setup_nvcc_flags(),
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{p}" for p in [*includes, sysconfig.get_paths()["include"]]),
            str(source), "-o", str(ptx)]


def launch_bounds(ptx_text: str) -> dict[str, int]:
    """Entry name → threads per block of its ``.maxntid`` (kernels with ``__launch_bounds__``)."""
    bounds = {}
    for m in re.finditer(r"\.entry\s+(\S+?)\s*\((.*?)\)\s*((?:\.\w+[^{]*)*)\{", ptx_text, re.S):
        nt = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", m.group(3))
        if nt:
            bounds[m.group(1)] = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3))
    return bounds


def parse_ptxas(log: str, source: str, bounds: dict[str, int], arch: int) -> list[Kernel]:
    kernels, props, current = [], {}, None
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            current = m.group(1)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                          line)):
            props[current] = tuple(int(g) for g in m.groups())
        elif m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m.group(1)
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            stack, st, ld = props.get(current, (0, 0, 0))
            regs, shared = int(m.group(1)), int(smem.group(1)) if smem else 0
            block = bounds.get(current)
            kernels.append(Kernel(source, short_name(current), regs, st, ld, stack, shared, block,
                                  occupancy(regs, shared, block, arch) if block else None))
    return kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (80: A100, 90: H100/H200)")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args(argv)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    ptxas = str(Path(nvcc).parent / "ptxas") if nvcc else None
    if not nvcc or not Path(nvcc).exists() or not Path(ptxas).exists():
        print("cuda_resource_check: nvcc and ptxas not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    kernels, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            ptx = Path(tmp) / f"{source.stem}.ptx"
            proc = subprocess.run(nvcc_command(nvcc, source, ptx, opts.arch), capture_output=True, text=True)
            if proc.returncode:
                failures.append(f"{source.name}: nvcc failed\n{proc.stderr[-2000:]}")
                continue
            asm = subprocess.run([ptxas, f"-arch=sm_{opts.arch}", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                                 capture_output=True, text=True)
            if asm.returncode:
                failures.append(f"{source.name}: ptxas failed\n{asm.stderr[-2000:]}")
                continue
            kernels += parse_ptxas(asm.stdout + asm.stderr, source.name, launch_bounds(ptx.read_text()), opts.arch)
    print(f"sm_{opts.arch}: {len(kernels)} kernels from csrc/cuda/")
    print(f"{'kernel':96s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} {'smem':>6s} {'block':>5s} {'warps/SM':>8s}")
    for k in kernels:
        name = k.name if len(k.name) <= 96 else k.name[:93] + "..."
        print(f"{name:96s} {k.registers:4d} {f'{k.spill_stores}/{k.spill_loads}':>11s} {k.stack:5d} {k.smem:6d} "
              f"{k.block if k.block else '-':>5} {k.warps_per_sm if k.warps_per_sm is not None else '-':>8}")
    bad = [k for k in kernels if not k.clean]
    for k in bad:
        print(f"SPILLS: {k.source} {k.name}: {k.spill_stores} B stored, {k.spill_loads} B loaded, {k.stack} B stack")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"arch": opts.arch, "kernels": [asdict(k) for k in kernels],
                                         "failures": failures}, indent=1))
    print(f"{len(kernels) - len(bad)} of {len(kernels)} kernels without spills or stack"
          + (f"; {len(failures)} sources failed to compile" if failures else ""))
    return 1 if bad or failures or not kernels else 0


if __name__ == "__main__":
    sys.exit(main())
