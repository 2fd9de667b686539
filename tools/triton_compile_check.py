"""Compile every Triton kernel of pyimputmae for a CUDA GPU, without a GPU: a pre-flight check.

    python tools/triton_compile_check.py [--arch 90] [--dtypes fp32,bf16] [--size large,paper|small|huge] [--sweep]
                                         [--grids-only] [--cache-tar build/triton_cache.tar.gz]

The real launchers (``pyimputmae.kernels``) run on ``meta`` tensors of the benchmark shapes, with
``JITFunction.run`` swapped for a recorder: every launch they would make is caught with its
arguments, grid and options, bound and specialized by Triton's own launch code for the target
(``GPUTarget("cuda", arch, 32)``), and compiled with ``triton.compile(ASTSource(...))`` down to a
cubin (ptxas ships inside triton). One line per distinct kernel configuration: ``ok`` with the
shared memory it needs, the registers and spill bytes ``ptxas -v`` reports, and whether it uses
tensor cores (``wgmma`` / ``mma``) and asynchronous copies (``cp.async`` / ``tma``); or the error.
Exit status 1 when any fails. Works with triton 3.6 and 3.8.

Shapes (``--size large``, those of ``tools/bench.py --size large``): masked MSE pred
``(32, 512, 2048)`` on x ``(32, 4, 64, 64, 64)``, p = 8 (with and without norm_pix); masking
``B = 64``, 4 segments of 256 tokens, half kept, ``E = 384``; patch embedding of x
``(32, 4, 64, 64, 64)``, p = 8, ``E = 384``, with and without ``keep`` (half the patches),
forward and backward; the pre-norm LayerNorm over the masking's kept token rows (``D = E``), forward and
backward. ``--size paper``: those of ``tools/bench.py --size paper`` (masked MSE and
patch embedding of MRI x ``(96, 1, 64, 64, 64)``, p = 16, ``E = 256``; masking ``B = 96``, segments
of 32, 24, 256 and 64 tokens, ``E = 256``). Both come from ``tools/bench_config.py``; several sizes
are given comma-separated. ``--size small`` shrinks every one of them (a quicker smoke run).
``--size huge`` takes shapes past 2^31 elements (meta tensors: nothing is allocated), where Triton
passes the row counts, per-sample strides and element counts as 64-bit scalars: the kernels must
compile that way too, and every launch grid must stay within CUDA's limits (checked for every size:
at most 2^31 - 1 programs along the first axis, 65,535 along the others).

``--cache-tar PATH`` compiles into an empty Triton cache directory and packs it, with a
``manifest.json`` (triton version, target, dtypes, size, a digest of ``kernels/``), into a tar.gz for
``tools/gpu_check.sh`` to seed the GPU machine's cache with. The compiles go through Triton's own
``triton.compile`` with the arguments ``JITFunction.run`` would give it, so with the same triton (and
its bundled ptxas) a launch there on these shapes finds its cache key and loads the cubin instead of
compiling; any difference only makes it compile as before.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick their GPU configurations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit as triton_jit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_config import SIZES  # (tools/, on the path above)

from pyimputmae import _backends
from pyimputmae._atomic import atomic_write

#: what ``--size`` takes: the benchmark's sizes, a quick smoke size, and shapes past 2^31 elements
SIZE_CHOICES = ("large", "paper", "small", "huge")

#: shared memory a block may use on sm_90 (H100 / H200): 227 KiB
SHARED_LIMIT = {90: 232448, 100: 232448}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Launch:
    """One launch the launchers asked for: kernel, positional and keyword arguments, grid."""

    def __init__(self, fn, args, kwargs, grid, case: str):
        self.fn, self.args, self.kwargs, self.grid, self.case = fn, args, kwargs, grid, case


def record_launches(case: str, call, sink: list[Launch]) -> None:
    """Run ``call()`` with every ``JITFunction`` launch recorded into ``sink`` instead of run."""
    original = triton_jit.JITFunction.run

    def recorder(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, dict(kwargs), grid, case))
        return None

    triton_jit.JITFunction.run = recorder
    try:
        call()
    finally:
        triton_jit.JITFunction.run = original


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


#: programs a launch grid may have along its axes (CUDA's gridDim.x, .y, .z)
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid_error(grid) -> str | None:
    """Why CUDA would refuse the launch grid ``grid`` (a tuple of 1 to 3 ints), or None."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            return f"grid {tuple(grid)}: {n:,} programs along axis {axis}, CUDA takes at most {limit:,}"
    return None


def own_pair(k, B: int, lengths: list[int], rng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_keep``'s ``(ids_keep, mask)`` for B rows of segments of ``lengths`` tokens, half kept: a
    pair whose inverse map the launchers know (its own launch is recorded with the case's)."""
    return k.select_keep(meta(B, len(lengths), dtype=torch.bool), lengths, [n // 2 for n in lengths], rng)


def huge_cases(k, dtype: torch.dtype) -> list[tuple[str, object]]:
    """Launchers on shapes whose row counts, per-sample strides or element counts reach 2^31, so that
    Triton specializes those scalars as int64 (each still within the kernels' 32-bit size limits)."""
    rng, p = meta(2, dtype=torch.int64), 16
    x_wide = meta(1, 2, 1024, 1024, 1024, dtype=dtype)  # one sample of 2^31 elements: its stride is int64
    L_wide, F_wide = 64**3, 2 * p**3
    weight = meta(64, F_wide, dtype=dtype)
    x_rows = meta(2**12, 1, 2**20, dtype=dtype)  # 1-D, p = 2: B·L = 2^31 patch rows
    w_rows = meta(64, 2, dtype=dtype)
    keep_rows = meta(2**12, 2**19, dtype=torch.int64)
    B, L, E = 2**16, 2**16, 64  # B·L = 2^32 token rows
    ln = torch.float32 if dtype == torch.float64 else dtype  # the LayerNorm kernels take 16- and 32-bit rows
    tokens, mask = meta(B, L, E, dtype=dtype), meta(B, L, dtype=torch.bool)
    ids = meta(B, L // 2, dtype=torch.int64)
    return [
        ("masked_mse", lambda: k.masked_mse_forward(meta(1, L_wide, F_wide, dtype=dtype), x_wide, meta(1, L_wide), p,
                                                    False)),
        ("masked_mse norm_pix", lambda: k.masked_mse_forward(meta(1, L_wide, F_wide, dtype=dtype), x_wide,
                                                             meta(1, L_wide), p, True)),
        ("scale_grad_", lambda: k.scale_grad_(meta(2**33, dtype=dtype), meta(1))),
        ("select_keep", lambda: k.select_keep(meta(2**20, 4, dtype=torch.bool), [2**12] * 4, [2**11] * 4, rng)),
        ("gather_visible", lambda: k.gather_visible(tokens, ids, mask)),
        ("unshuffle_fill", lambda: k.unshuffle_fill(meta(B, L // 2, E, dtype=dtype), ids, mask, meta(E, dtype=dtype))),
        ("unshuffle_fill, no token", lambda: k.unshuffle_fill(meta(B, L // 2, E, dtype=dtype), ids, mask, None)),
        ("hidden_sum", lambda: k.hidden_sum(tokens, mask)),
        ("fill_backward, select_keep's pair", lambda: k.fill_backward(tokens, *own_pair(k, B, [L // 4] * 4, rng))),
        ("patch_embed fwd, wide sample", lambda: k.patch_embed_forward(x_wide, weight, None, None, None, p)),
        ("patch_embed fwd, many rows", lambda: k.patch_embed_forward(x_rows, w_rows, None, None, None, 2)),
        ("patch_embed fwd keep, many rows", lambda: k.patch_embed_forward(x_rows, w_rows, None, None, keep_rows, 2)),
        ("patch_embed bwd, wide sample", lambda: k.patch_embed_backward(meta(1, L_wide, 64, dtype=dtype), x_wide,
                                                                        weight, None, p, True, True)),
        ("patch_embed bwd keep, many rows", lambda: k.patch_embed_backward(meta(2**12, 2**19, 64, dtype=dtype), x_rows,
                                                                           w_rows, keep_rows, 2, True, True)),
        ("layer_norm fwd, 2^32 values", lambda: k.layer_norm_forward(meta(2**24, 256, dtype=ln), meta(256),
                                                                     meta(256), 1e-5, ln)),
        ("layer_norm bwd, 2^32 values", lambda: k.layer_norm_backward(meta(2**24, 256, dtype=ln), meta(256),
                                                                      meta(256), 1e-5, meta(2**24, 256, dtype=ln),
                                                                      ln, True, True)),
    ]


def cases(k, dtype: torch.dtype, size: str, sweep: ModuleType | None = None) -> list[tuple[str, object]]:
    """(name, thunk) pairs: each thunk calls one launcher on meta tensors of the benchmark shapes;
    ``sweep``: ``tools/patch_embed_sweep.py``, whose tile configurations are compiled as well."""
    if size == "huge":
        return huge_cases(k, dtype)
    if size in ("large", "paper"):
        shapes = SIZES[size]
        B, C, S, p, E = (shapes["patch"][key] for key in ("B", "C", "S", "p", "E"))
        if shapes["mse"] != {key: shapes["patch"][key] for key in ("B", "C", "S", "p")}:
            raise ValueError(f"size {size}: the masked-MSE and patch-embedding inputs differ; these cases take one")
        mB, lengths, mE = shapes["masking"]["B"], list(shapes["masking"]["lengths"]), shapes["masking"]["E"]
    else:
        B, C, S, p, E = 2, 2, 16, 4, 96
        mB, lengths, mE = 4, [32] * 4, 96
    x = meta(B, C, S, S, S, dtype=dtype)
    L, F = (S // p) ** 3, C * p**3
    K = L // 2
    keep = meta(B, K, dtype=torch.int64)
    weight, bias, pos = meta(E, F, dtype=dtype), meta(E, dtype=dtype), meta(L, E, dtype=dtype)
    pred, w = meta(B, L, F, dtype=dtype), meta(B, L)
    keeps = [n // 2 for n in lengths]
    mL, mK = sum(lengths), sum(keeps)
    tokens, visible = meta(mB, mL, mE, dtype=dtype), meta(mB, mK, mE, dtype=dtype)
    ids, mask = meta(mB, mK, dtype=torch.int64), meta(mB, mL, dtype=torch.bool)
    present, rng = meta(mB, len(lengths), dtype=torch.bool), meta(2, dtype=torch.int64)
    ln = torch.float32 if dtype == torch.float64 else dtype  # the LayerNorm kernels take 16- and 32-bit rows
    cases = [
        ("masked_mse", lambda: k.masked_mse_forward(pred, x, w, p, False)),
        ("masked_mse norm_pix", lambda: k.masked_mse_forward(pred, x, w, p, True)),
        ("scale_grad_", lambda: k.scale_grad_(pred, meta(1))),
        ("select_keep", lambda: k.select_keep(present, lengths, keeps, rng)),
        ("gather_visible", lambda: k.gather_visible(tokens, ids, mask)),
        ("unshuffle_fill", lambda: k.unshuffle_fill(visible, ids, mask, meta(mE, dtype=dtype))),
        ("unshuffle_fill, no token", lambda: k.unshuffle_fill(visible, ids, mask, None)),
        ("hidden_sum", lambda: k.hidden_sum(tokens, mask)),
        ("fill_backward, select_keep's pair", lambda: k.fill_backward(tokens, *own_pair(k, mB, lengths, rng))),
        ("patch_embed fwd", lambda: k.patch_embed_forward(x, weight, bias, pos, None, p)),
        ("patch_embed fwd keep", lambda: k.patch_embed_forward(x, weight, bias, pos, keep, p)),
        ("patch_embed bwd", lambda: k.patch_embed_backward(meta(B, L, E, dtype=dtype), x, weight, None, p,
                                                           True, True)),
        ("patch_embed bwd keep", lambda: k.patch_embed_backward(meta(B, K, E, dtype=dtype), x, weight, keep, p,
                                                                True, True)),
        # the pre-norm sublayers' LayerNorm over the masking's token rows: x in `dtype` (autocast's residual
        # stream), float32 parameters, output and xn in `dtype`
        ("layer_norm fwd", lambda: k.layer_norm_forward(meta(mB * mK, mE, dtype=ln), meta(mE), meta(mE), 1e-5, ln)),
        ("layer_norm bwd", lambda: k.layer_norm_backward(meta(mB * mK, mE, dtype=ln), meta(mE), meta(mE), 1e-5,
                                                         meta(mB * mK, mE, dtype=ln), ln, True, True)),
    ]
    if sweep:  # the tile configurations tools/patch_embed_sweep.py times on a GPU (no bias/pos there)
        sixteen_bit = dtype in (torch.bfloat16, torch.float16)  # the TMA kernels take only those
        for config in sweep.TMA_CONFIGS if sixteen_bit else []:  # every patch only
            cases.append((f"patch_embed fwd sweep {sweep.label(config)}",
                          lambda c=config: k.patch_embed_forward(x, weight, bias, None, None, p, config=c)))
        for config in sweep.GRAD_CONFIGS if sixteen_bit else [{"TMA": False}]:  # grad_weight of every patch
            cases.append((f"patch_embed grad_weight sweep {sweep.label(config)}",
                          lambda c=config: k.patch_embed_backward(meta(B, L, E, dtype=dtype), x, weight, None, p,
                                                                  False, True, config=c)))
        for config in sweep.CONFIGS if sixteen_bit else []:  # the sweep times bf16 (fp32 tiles are smaller)
            name = sweep.label(config)
            cases += [(f"patch_embed fwd sweep {name}", lambda c=config: k.patch_embed_forward(x, weight, bias, None,
                                                                                              None, p, config=c)),
                      (f"patch_embed fwd keep sweep {name}",
                       lambda c=config: k.patch_embed_forward(x, weight, bias, None, keep, p, config=c))]
    if dtype != torch.float32:  # what autocast hands the kernels: x in float32, the rest in `dtype`
        x32 = meta(B, C, S, S, S)
        cases += [
            ("patch_embed fwd keep, fp32 x", lambda: k.patch_embed_forward(x32, weight, bias, pos, keep, p)),
            ("patch_embed bwd keep, fp32 x", lambda: k.patch_embed_backward(meta(B, K, E, dtype=dtype), x32, weight,
                                                                            keep, p, True, True)),
        ]
    return cases


def describe(fn, constexprs: dict, options) -> str:
    names = fn.arg_names
    flags = []
    for key, value in sorted(constexprs.items()):
        name = names[key[0]] if isinstance(key, tuple) and len(key) == 1 else str(key)
        if name.isupper() or name.startswith("BLOCK"):
            flags.append(f"{name}={value}")
    return " ".join([*flags, f"warps={options.num_warps}", f"stages={options.num_stages}"])


def compile_launch(launch: Launch, target: GPUTarget, backend, seen: set) -> tuple[str, str] | None:
    """Bind and specialize like ``JITFunction.run``, then compile; ``(label, result)`` or None if seen."""
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", fn.debug or triton.knobs.runtime.debug)
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (fn.fn.__qualname__, str(signature), str(sorted(constexprs.items())), str(attrs), str(options))
    if key in seen:
        return None
    seen.add(key)
    label = f"{fn.__name__} [{describe(fn, constexprs, options)}]"
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as err:  # report and go on with the others
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return label, f"ERROR {last[:2000]}"
    shared = compiled.metadata.shared
    limit = SHARED_LIMIT.get(target.arch)
    took = time.perf_counter() - start
    if limit is not None and shared > limit:
        return label, f"ERROR needs {shared} bytes of shared memory, sm_{target.arch} has {limit} ({took:.1f}s)"
    if "cubin" not in compiled.asm:
        return label, f"ERROR no cubin produced ({took:.1f}s)"
    return label, f"ok shared={shared} {machine_code_report(compiled.asm['ptx'], target.arch)} ({took:.1f}s)"


#: what the PTX of a kernel uses, as the words of the report: tensor cores and asynchronous copies
PTX_FEATURES = (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"), ("tma", "cp.async.bulk.tensor"),
                ("cp.async", "cp.async.cg"), ("cp.async", "cp.async.ca"))


def machine_code_report(ptx: str, arch: int) -> str:
    """``regs=N spills=S uses=wgmma,cp.async``: registers and spill bytes from ``ptxas -v`` on the
    kernel's PTX (the figures the GPU would report), and the instruction families it uses."""
    uses = sorted({word for word, needle in PTX_FEATURES if needle in ptx})
    if "wgmma" in uses and "mma" in uses and "mma.sync" not in ptx.replace("wgmma.mma_async", ""):
        uses.remove("mma")
    words = [f"uses={','.join(uses) or 'none'}"]
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
        suffix = "a" if arch >= 90 else ""
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(ptx)
            out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, timeout=120)
        info = out.stderr + out.stdout
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.findall(r"(\d+) bytes spill stores", info)
        words.insert(0, f"regs={regs.group(1) if regs else '?'} spills={max(map(int, spills), default=0)}")
    except Exception as err:  # the report is informative; compiling already succeeded
        words.insert(0, f"regs=? ({type(err).__name__})")
    return " ".join(words)


def kernels_digest(root: Path | None = None) -> str:
    """sha256 of ``kernels/*.py`` as ``cd kernels && sha256sum $(ls *.py | LC_ALL=C sort) | sha256sum``
    prints it: what the cache keys of the kernels depend on in this checkout. ``tools/gpu_check.sh``
    computes it that way (no Python) before seeding a cache made elsewhere."""
    root = root or Path(__file__).resolve().parent.parent
    lines = "".join(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
                    for path in sorted((root / "kernels").glob("*.py"), key=lambda p: p.name.encode()))
    return hashlib.sha256(lines.encode()).hexdigest()


def pack_cache(cache_dir: Path, out: Path, manifest: dict) -> int:
    """Write ``cache_dir``'s entries and ``manifest.json`` into the tar.gz ``out`` (atomically);
    the number of entries."""
    entries = sorted(p for p in cache_dir.iterdir() if p.is_dir())
    data = json.dumps({**manifest, "entries": len(entries)}, indent=1).encode()

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            for entry in entries:
                tar.add(entry, arcname=f"./{entry.name}")
            info = tarfile.TarInfo("./manifest.json")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--size", default="large",
                        help=f"comma-separated, from {','.join(SIZE_CHOICES)} (default: large)")
    parser.add_argument("-k", dest="only", default="", help="only the cases whose name contains this")
    parser.add_argument("--grids-only", action="store_true",
                        help="only record the launches and check their grids against CUDA's limits (no compiling)")
    parser.add_argument("--sweep", action="store_true",
                        help="also the patch-embedding tile configurations of tools/patch_embed_sweep.py (at the "
                             "large size, the one it times)")
    parser.add_argument("--cache-tar", type=Path, default=None,
                        help="compile into an empty Triton cache and pack it into this tar.gz (gpu_check.sh seeds "
                             "the GPU machine's cache with it)")
    opts = parser.parse_args(argv)
    sizes = [size.strip() for size in opts.size.split(",") if size.strip()]
    unknown = [size for size in sizes if size not in SIZE_CHOICES]
    if unknown or not sizes:
        parser.error(f"--size takes {', '.join(SIZE_CHOICES)} (comma-separated), got {opts.size!r}")
    if opts.cache_tar is not None and opts.grids_only:
        parser.error("--cache-tar needs the compiles: drop --grids-only")
    cache_dir = None
    if opts.cache_tar is not None:
        cache_dir = Path(tempfile.mkdtemp(prefix="pyimputmae-triton-cache-"))
        os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
        triton.knobs.cache.dir = str(cache_dir)
    sweep = None
    if opts.sweep:
        import importlib.util

        path = Path(__file__).with_name("patch_embed_sweep.py")
        spec = importlib.util.spec_from_file_location("patch_embed_sweep", path)
        sweep_tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep_tool)
        sweep = sweep_tool

    kernels, why = _backends._triton_module()
    if kernels is None:
        print(f"cannot import the Triton kernels: {why}")
        return 1
    target = GPUTarget("cuda", opts.arch, 32)
    backend = make_backend(target)
    # the meta tensors stand for the target's GPU: the patch embedding takes its TMA kernel there
    kernels.patch_embed.tma_capable = lambda t: opts.arch >= 90
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{opts.arch}, size {','.join(sizes)}")
    seen: set = set()
    failed = 0
    runs = [(size, dname) for size in sizes for dname in [d.strip() for d in opts.dtypes.split(",") if d.strip()]]
    for size, dname in runs:
        # (tools/patch_embed_sweep.py times the large size only)
        for case, thunk in cases(kernels, DTYPES[dname], size, sweep if size == "large" else None):
            if len(sizes) > 1:
                case = f"{case} ({size})"
            if opts.only and opts.only not in case:
                continue
            launches: list[Launch] = []
            try:
                record_launches(case, thunk, launches)
            except Exception as err:
                print(f"{dname:5s} {case}: ERROR in the launcher: {err!r}", flush=True)
                failed += 1
                continue
            for launch in launches:
                refused = grid_error(launch.grid)
                if refused:
                    failed += 1
                    print(f"{dname:5s} {case}: {launch.fn.__name__}: ERROR {refused}", flush=True)
                    continue
                if opts.grids_only:
                    print(f"{dname:5s} {case}: {launch.fn.__name__}: grid {tuple(launch.grid)} ok", flush=True)
                    continue
                try:
                    result = compile_launch(launch, target, backend, seen)
                except Exception as err:
                    result = (launch.fn.__name__, f"ERROR binding the arguments: {err!r}")
                if result is None:
                    continue
                label, status = result
                failed += status.startswith("ERROR")
                print(f"{dname:5s} {case}: {label}: {status}", flush=True)
    print(f"{'FAILED: ' + str(failed) if failed else 'all ok'}")
    if cache_dir is not None:
        if failed:
            print(f"not writing {opts.cache_tar}: some kernels failed to compile")
        else:
            manifest = {"triton": triton.__version__, "torch": torch.__version__, "arch": opts.arch,
                        "dtypes": opts.dtypes, "size": ",".join(sizes), "sweep": opts.sweep, "only": opts.only,
                        "kernels_sha256": kernels_digest()}
            n = pack_cache(cache_dir, opts.cache_tar, manifest)
            print(f"wrote {opts.cache_tar}: {n} compiled kernels ({opts.cache_tar.stat().st_size / 2**20:.1f} MiB), "
                  f"triton {triton.__version__}, sm_{opts.arch}")
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
