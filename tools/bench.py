#!/usr/bin/env python3
"""Benchmarks of the fused ops against plain PyTorch, timed in one run on one device.

    python tools/bench.py --device cuda --size large --json out/bench_large.json [--quick]
    python tools/bench.py --device cpu --size paper --ops masked_mse --backends reference --quick

For every op of DESIGN.md section 5 (``masked_mse``, ``masked_mse_normpix``, ``masking_fill``,
``patch_embed3d``, ``patch_embed3d_keep50``), every dtype, every pass (``fwd``, ``fwd+bwd``): each
of our backends that can run on the device (``ext``, ``triton``, ``reference``; the others are
listed as skipped, with the reason) and the baselines ``eager`` (the same math as a user writes
it in plain PyTorch), ``compile`` (``torch.compile`` of eager) and ``conv`` (``F.conv3d`` with
kernel = stride, what ``nn.Conv3d`` runs; patch embedding only). Before timing, each variant's
outputs and gradients are compared with eager's on the bench inputs (``"check"``).

GB/s counts the bytes the op must move (section 5), whatever a variant actually moves;
``roofline_frac`` divides it by the device copy bandwidth measured in the same run (a large
``clone``, bytes read + written). Docs: docs/benchmarks.md. New measurements (e.g. the data
worker's ``store_load``) plug in through :func:`register`.

Beside this file (the CLI: running, registry, summaries, JSON, table): ``bench_config.py``
(backends, baselines, passes, dtypes, sizes), ``bench_baselines.py`` (the plain-PyTorch math),
``bench_workloads.py`` (each op's inputs and implementations) and ``bench_timing.py`` (Context:
timer, peak memory, copy-bandwidth and matmul probes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench_config import BASELINES, DTYPES, OUR_BACKENDS, PASSES, SIZES
from bench_timing import Context, cuda_timer_name, measure_copy_gbps, measure_matmul_tflops, time_limit
from bench_workloads import (
    Workload,
    build_masked_mse,
    build_masking_fill,
    build_patch_embed,
    compare_with_eager,
    pass_fn,
    run_once,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Running a workload: variants, correctness guard, timing, records
# ---------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str  # our backend, or the baseline's name
    baseline: str | None
    forward: Callable[[], Any] | None = None
    compiled: bool = False
    skipped: str | None = None


def variants_of(ctx: Context, w: Workload) -> list[Variant]:
    out = []
    for name in ctx.backends:
        ok, why = ctx.availability(name)
        out.append(Variant(name, None, functools.partial(w.ours, name)) if ok else Variant(name, None, skipped=why))
    if "eager" in ctx.baselines:
        out.append(Variant("eager", "eager", lambda: w.eager(*w.eager_args)))
    if "conv" in ctx.baselines and w.conv is not None:
        out.append(Variant("conv", "conv", w.conv))
    if "compile" in ctx.baselines:
        compiled = torch.compile(w.eager)
        out.append(Variant("compile", "compile", lambda: compiled(*w.eager_args), compiled=True))
    return out


def base_record(ctx: Context, w: Workload, v: Variant, pass_: str) -> dict:
    return {"op": w.op, "backend": v.name, "baseline": v.baseline, "size": ctx.size, "shape": w.shape,
            "dtype": w.dtype, "pass": pass_, "device": ctx.device.type}


def measure(ctx: Context, w: Workload, v: Variant, pass_: str, check: str) -> dict:
    fn = pass_fn(w, v.forward, pass_)
    ms = ctx.time_ms(fn)
    peak, method = ctx.peak_extra(fn)
    nbytes = w.bytes[pass_]
    gbps = nbytes / (ms * 1e-3) / 1e9
    rec = base_record(ctx, w, v, pass_)
    rec.update(median_ms=ms, gbps=gbps, roofline_frac=gbps / ctx.copy_gbps, peak_extra_mb=peak,
               peak_extra_method=method, bytes=nbytes, check=check)
    if w.flops:
        rec["tflops"] = w.flops[pass_] / (ms * 1e-3) / 1e12
        peak_tflops = ctx.matmul_tflops.get(w.dtype)
        rec["flop_frac"] = rec["tflops"] / peak_tflops if peak_tflops else None
    return rec


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def verdict(ctx: Context, w: Workload, v: Variant, out: Any, grads: tuple) -> str:
    """The correctness guard: "ok", "MISMATCH ...", or why it could not say."""
    if not ctx.check:
        return "not checked"
    if v.name == "eager" and w.check is None:
        return "ok (the baseline itself)"
    try:
        return (w.check or functools.partial(compare_with_eager, w))(v.name, out, grads)
    except Exception as err:
        return f"MISMATCH: the check raised {type(err).__name__}: {_first_line(err)}"


def run_workload(ctx: Context, w: Workload) -> Iterator[dict]:
    for v in variants_of(ctx, w):
        if v.skipped:
            for pass_ in ctx.passes:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None, "skipped": v.skipped}
            continue
        # warm-up (Triton JIT, torch.compile) and the correctness guard, one fwd+bwd
        try:
            with time_limit(ctx.compile_timeout if v.compiled else None) as limit:
                out, grads = run_once(w, v.forward)
                ctx.sync()
        except Exception as err:
            if limit["fired"]:
                reason = f"torch.compile took over {ctx.compile_timeout:.0f} s"
            else:
                reason = f"{type(err).__name__}: {_first_line(err)}"
                reason = f"torch.compile failed: {reason}" if v.compiled else reason
            # a baseline that cannot run is skipped; one of our backends that fails is an error
            key = "skipped" if v.compiled else "error"
            for pass_ in ctx.passes:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None, key: reason}
            continue
        check = verdict(ctx, w, v, out, grads)
        del out, grads
        for pass_ in ctx.passes:
            try:
                yield measure(ctx, w, v, pass_, check)
            except Exception as err:
                yield {**base_record(ctx, w, v, pass_), "median_ms": None,
                       "error": f"{type(err).__name__}: {_first_line(err)}", "check": check}


# ---------------------------------------------------------------------------------------------
# Registry: one entry per measurement family, selected by --ops
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSpec:
    name: str
    run: Callable[[Context], Iterator[dict]]
    default: bool  # part of a run without --ops
    patch_flops: bool = False  # needs the measured matmul peak


BENCHES: dict[str, BenchSpec] = {}
WORKLOADS: dict[str, Callable[[Context, str], Workload]] = {}  # op name → builder (tests/bench uses them)


def register(name: str, *, default: bool = True, patch_flops: bool = False):
    """Add a measurement: ``fn(ctx) -> iterator of records`` (dicts with at least "op", "size",
    "device"). It may use ``ctx.time_ms``, ``ctx.peak_extra`` and ``ctx.copy_gbps``; records
    with ``"baseline": None`` and a ``"pass"`` take part in the summaries. Example (data
    worker): ``@register("store_load", default=False)`` on a function timing store loads."""
    def deco(fn: Callable[[Context], Iterator[dict]]):
        BENCHES[name] = BenchSpec(name, fn, default, patch_flops)
        return fn
    return deco


def op_bench(name: str, build: Callable[[Context, str], Workload], dtypes: Sequence[str],
             optional_dtypes: Sequence[str] = (), patch_flops: bool = False) -> None:
    """Register an op benchmark: ``build(ctx, dtype)`` for each dtype, timed by :func:`run_workload`."""
    WORKLOADS[name] = build

    def run(ctx: Context) -> Iterator[dict]:
        for dtype in ctx.dtypes_for(dtypes, optional_dtypes):
            torch.manual_seed(0)
            w = build(ctx, dtype)
            try:
                yield from run_workload(ctx, w)
            finally:
                del w
                torch._dynamo.reset()  # drop compiled graphs before the next workload
                gc.collect()
                if ctx.cuda:
                    torch.cuda.empty_cache()
    register(name, patch_flops=patch_flops)(run)


op_bench("masked_mse", functools.partial(build_masked_mse, norm_pix=False), ("fp32",), ("bf16",))
op_bench("masked_mse_normpix", functools.partial(build_masked_mse, norm_pix=True), ("fp32",), ("bf16",))
op_bench("masking_fill", build_masking_fill, ("fp32",), ("bf16",))
op_bench("patch_embed3d", functools.partial(build_patch_embed, keep_half=False), ("fp32", "bf16"),
         ("fp16",), patch_flops=True)
op_bench("patch_embed3d_keep50", functools.partial(build_patch_embed, keep_half=True), ("fp32", "bf16"),
         ("fp16",), patch_flops=True)


@register("store_load", default=False)
def bench_store_load(ctx: Context) -> Iterator[dict]:
    """Whole-cohort load of a zarr store into memory (issue: a paper-sized store, 1,104 patients,
    ~2 GB, in under 10 s with a warm page cache) and streaming through forked DataLoader workers.
    ``--size paper`` writes a paper-sized synthetic store first (a few minutes, ~1 GB on disk)."""
    import tempfile

    from pyimputmae.data.bench_store import bench_store_load as run

    sizes = "paper" if ctx.size in ("paper", "large") else "small"
    for codec in ("lz4", "zstd"):
        with tempfile.TemporaryDirectory(prefix="pyimputmae-store-") as tmp:
            res = run(tmp, n_patients=1104, sizes=sizes, codec=codec, repeats=2 if ctx.quick else 3,
                      device=ctx.device if ctx.cuda else None)
        yield {"op": "store_load", "backend": codec, "baseline": None, "size": ctx.size,
               "shape": f"1104 patients, {sizes} sizes", "dtype": "fp32", "pass": "load",
               "device": str(ctx.device), "median_ms": res["load_s"] * 1e3,
               "gbps": res.get("load_gb_per_s"), "roofline_frac": None, "peak_extra_mb": res.get("memory_mb"),
               "store_mb": res.get("store_mb"), "stream_patients_per_s": res.get("stream_patients_per_s"),
               "load_cpu_s": res.get("load_cpu_s"), "load_s_runs": res.get("load_s_runs")}


# ---------------------------------------------------------------------------------------------
# Summaries, JSON, table
# ---------------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> list[dict]:
    """Per op/size/pass/dtype/device: the fastest of our backends whose check passed, and its
    speedups over each baseline measured in the same run."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("pass") and "op" in r and not r.get("summary") and not r.get("header"):
            groups.setdefault((r["op"], r["size"], r["pass"], r["dtype"], r["device"]), []).append(r)
    out = []
    for (op, size, pass_, dtype, device), recs in groups.items():
        timed = [r for r in recs if r.get("median_ms")]
        ours = [r for r in timed if r["baseline"] is None and str(r.get("check", "ok")).startswith(("ok", "not"))]
        s = {"summary": True, "op": op, "size": size, "pass": pass_, "dtype": dtype, "device": device,
             "best_backend": None, "best_ms": None}
        if ours:
            best = min(ours, key=lambda r: r["median_ms"])
            s.update(best_backend=best["backend"], best_ms=best["median_ms"])
        for base in BASELINES:
            if base == "conv" and not op.startswith("patch_embed"):
                continue
            ref = [r for r in timed if r["baseline"] == base]
            s[f"speedup_vs_{base}"] = ref[0]["median_ms"] / s["best_ms"] if ref and s["best_ms"] else None
        out.append(s)
    return out


def git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files); where the checkout
    is no git repository (a copy sent to a GPU machine), ``GPU_CHECK_COMMIT`` as tools/gpu_check.sh
    passes it on; None when neither says."""
    given = os.environ.get("GPU_CHECK_COMMIT") or None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return given
    if sha.returncode:
        return given
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    """Rewritten after every measurement, so a run cut short still leaves its results."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "records": records + summarize(records)}, f, indent=1)
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(value, spec)


def print_table(records: list[dict]) -> None:
    eager_ms = {(r["op"], r["pass"], r["dtype"]): r["median_ms"]
                for r in records if r.get("baseline") == "eager" and r.get("median_ms")}
    head = (f"{'op':22s} {'impl':10s} {'pass':8s} {'dtype':5s} {'ms':>9s} {'GB/s':>8s} {'%roof':>6s} "
            f"{'TFLOP/s':>8s} {'peak MB':>8s} {'x eager':>8s}  check")
    print("\n" + head + "\n" + "-" * len(head))
    for r in records:
        if r.get("header") or r.get("summary") or "op" not in r or "pass" not in r:
            continue
        ms = r.get("median_ms")
        if not ms:
            why = r.get("skipped") or r.get("error") or "?"
            print(f"{r['op']:22s} {r['backend']:10s} {r['pass']:8s} {r['dtype']:5s}  "
                  f"{'skipped' if 'skipped' in r else 'ERROR'}: {why[:90]}")
            continue
        e = eager_ms.get((r["op"], r["pass"], r["dtype"]))
        roof = r["roofline_frac"] * 100 if r.get("roofline_frac") is not None else None
        print(f"{r['op']:22s} {r['backend']:10s} {r['pass']:8s} {r['dtype']:5s} {ms:9.3f} "
              f"{_fmt(r.get('gbps'), '8.1f')} {_fmt(roof, '6.1f')} {_fmt(r.get('tflops'), '8.2f')} "
              f"{_fmt(r.get('peak_extra_mb'), '8.1f')} {_fmt(e / ms if e else None, '8.2f')}  {r.get('check', '')}")
    summaries = summarize(records)
    if summaries:
        print("\nbest of ours per op/pass/dtype (speedup = baseline ms / ours ms)")
        for s in summaries:
            speed = "  ".join(f"vs {b} {_fmt(s.get(f'speedup_vs_{b}'), '.2f')}"
                              for b in BASELINES if f"speedup_vs_{b}" in s)
            print(f"  {s['op']:22s} {s['pass']:8s} {s['dtype']:5s} {s['best_backend'] or 'none':10s} {speed}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def probe_extension() -> str | None:
    """Load the compiled extension in a child process first: a broken build can abort the process
    that loads it (a C++ exception in a static initialiser), which no try/except catches here.
    Returns why it cannot be used, or None when loading it is safe."""
    code = "import pyimputmae._extension as e; e.load()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.SubprocessError) as err:
        return f"could not probe the extension in a child process: {err}"
    if r.returncode == 0:
        return None
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    key = ("what():", "RuntimeError", "ImportError")
    what = next((ln for ln in lines if ln.startswith(key)), lines[-1] if lines else "")
    return f"loading pyimputmae._C ended a child process (exit {r.returncode}): {what[:300]}"


def _import_pyimputmae() -> None:
    try:
        import pyimputmae
    except ImportError:  # not installed: use the checkout (without the Triton package mapping)
        sys.path.insert(0, ROOT)
        import pyimputmae  # noqa: F401


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="large",
                    help="paper / large (DESIGN.md section 5); tiny: smoke tests only")
    ap.add_argument("--json", metavar="PATH", help="write {meta, records} here (rewritten as results come in)")
    defaults = [n for n, b in BENCHES.items() if b.default]
    ap.add_argument("--ops", nargs="+", metavar="OP", help=f"default: all of {defaults}")
    ap.add_argument("--backends", nargs="+", choices=OUR_BACKENDS, help="our backends (default: all)")
    ap.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                    help="default: fp32 and bf16 for patch embedding, fp32 for the others")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (GPU: 40 ms per measurement)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    ap.add_argument("--compile-timeout", type=float, default=None, metavar="S",
                    help="skip torch.compile when its first call takes longer (default 120 s GPU, 180 s CPU)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness guard")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--min-run-time", type=float, default=None, metavar="S",
                    help="CPU Timer.blocked_autorange min_run_time (default 0.5, --quick 0.2)")
    ap.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, spec in BENCHES.items():
            print(f"{name}{'' if spec.default else '  (only with --ops)'}")
        return 0
    ops = args.ops or [n for n, b in BENCHES.items() if b.default]
    unknown = [o for o in ops if o not in BENCHES]
    if unknown:
        print(f"unknown op(s) {unknown}; registered: {list(BENCHES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})", file=sys.stderr)
        return 3
    _import_pyimputmae()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    baselines = tuple(b for b in args.baselines if not (b == "compile" and args.no_compile))
    device = torch.device(args.device)
    ctx = Context(
        device=device, size=args.size, quick=args.quick,
        backends=tuple(args.backends or OUR_BACKENDS), explicit_backends=bool(args.backends),
        baselines=baselines, passes=tuple(args.passes), dtypes=tuple(args.dtypes) if args.dtypes else None,
        check=not args.no_check,
        compile_timeout=args.compile_timeout or (120.0 if device.type == "cuda" else 180.0),
        min_run_time=args.min_run_time or (0.2 if args.quick else 0.5), threads=threads,
    )
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    if os.environ.get("PYIMPUTMAE_NO_EXT") != "1":  # listing availability loads it too
        ctx.ext_broken = probe_extension()
        if ctx.ext_broken:
            os.environ["PYIMPUTMAE_NO_EXT"] = "1"  # nothing in this process may load it
            print(f"extension unusable, left out: {ctx.ext_broken}", file=sys.stderr, flush=True)
    name = device_name(device)
    print(f"device {name} ({device.type}); torch {torch.__version__}; triton {triton_version}; "
          f"cpu threads {threads}; size {args.size}{' (quick)' if args.quick else ''}", flush=True)
    copy = measure_copy_gbps(ctx)
    ctx.copy_gbps = copy["roofline_gbps"]
    if any(BENCHES[o].patch_flops for o in ops):
        for dt in ctx.dtypes_for(("fp32", "bf16"), ("fp16",)):
            ctx.matmul_tflops[dt] = measure_matmul_tflops(ctx, dt)
    print(f"copy bandwidth (read + write): clone {copy['clone_gbps']:.1f} GB/s, copy_ {copy['copy_into_gbps']:.1f} "
          f"GB/s, roofline uses {copy['roofline_method']}; matmul TFLOP/s "
          + (", ".join(f"{k} {v:.2f}" for k, v in ctx.matmul_tflops.items()) or "not measured"), flush=True)
    availability = {b: dict(zip(("ok", "why"), ctx.availability(b))) for b in OUR_BACKENDS}
    for b, a in availability.items():
        print(f"  backend {b:9s} {'yes' if a['ok'] else 'no '}  {a['why']}", flush=True)

    meta = {
        "device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "copy_gbps": ctx.copy_gbps, "copy": copy, "matmul_tflops": ctx.matmul_tflops,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "size": args.size, "quick": args.quick,
        "backends": availability,
        "timer": (cuda_timer_name() if ctx.cuda
                  else f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={ctx.min_run_time}) median"),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    records: list[dict] = [{"header": True, "device": device.type, "device_name": name, "copy_gbps": ctx.copy_gbps,
                            **copy, "matmul_tflops": ctx.matmul_tflops, "cpu_threads": threads}]
    for op in ops:
        for rec in BENCHES[op].run(ctx):
            records.append(rec)
            ms = rec.get("median_ms")
            status = f"{ms:.3f} ms  {rec.get('check', '')}" if ms else (rec.get("skipped") or rec.get("error"))
            print(f"  {rec.get('op', op)} {rec.get('backend', '')} {rec.get('pass', '')} {rec.get('dtype', '')}: "
                  f"{status}", flush=True)
            if args.json:
                write_json(args.json, meta, records)
    print_table(records)
    if args.json:
        write_json(args.json, meta, records)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
