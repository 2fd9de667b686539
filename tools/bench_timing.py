"""The measuring side of ``tools/bench.py``: :class:`Context` (device, settings, timer, peak
memory), the compile time limit, and the probes of device copy bandwidth and matmul peak."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_config import BASELINES, DTYPES, OUR_BACKENDS, PASSES

# ---------------------------------------------------------------------------------------------
# Context: device, timers, memory, measured limits
# ---------------------------------------------------------------------------------------------

class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[dict]:
    """Raise CompileTimeout in the main thread after ``seconds`` (SIGALRM); yields a state dict
    whose "fired" says whether it did (torch.compile may wrap the exception in its own)."""
    state = {"fired": False}
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield state
        return

    def handler(signum, frame):
        state["fired"] = True
        raise CompileTimeout(f"took over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Context:
    device: torch.device
    size: str
    quick: bool = False
    backends: tuple[str, ...] = OUR_BACKENDS
    explicit_backends: bool = False
    baselines: tuple[str, ...] = BASELINES
    passes: tuple[str, ...] = PASSES
    dtypes: tuple[str, ...] | None = None  # None: each op's default dtypes
    check: bool = True
    compile_timeout: float = 300.0
    min_run_time: float = 0.5
    threads: int = 1
    copy_gbps: float = math.nan
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    ext_broken: str | None = None  # set when loading the extension kills a child process

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of one call: CUDA events (do_bench) on GPU, Timer on CPU."""
        if self.cuda:
            return _time_cuda(fn, self.quick)
        from torch.utils import benchmark

        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        return timer.blocked_autorange(min_run_time=self.min_run_time).median * 1e3

    def peak_extra(self, fn: Callable[[], Any]) -> tuple[float | None, str]:
        """MiB allocated by one call beyond what existed before it (inputs excluded; outputs and
        gradients it returns included), and how that was measured."""
        gc.collect()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return peak / 2**20, "torch.cuda.max_memory_allocated"
        try:
            return _cpu_profiler_peak(fn) / 2**20, "torch.profiler memory events (torch CPU allocations)"
        except Exception:
            peak = _rss_peak(fn)
            method = "RSS high-water delta (approximate: freed and reused pages hide part of it)"
            return (peak / 2**20 if peak is not None else None), method

    def dtypes_for(self, default: Sequence[str], optional: Sequence[str]) -> list[str]:
        if self.dtypes is None:
            return list(default)
        return [d for d in self.dtypes if d in (*default, *optional)]

    def availability(self, name: str) -> tuple[bool, str]:
        from pyimputmae import _backends

        if name == "ext" and self.ext_broken:
            return False, self.ext_broken
        ok, why = _backends.availability(name, self.device)
        if ok and name == "triton" and not self.cuda and not self.explicit_backends:
            return False, "Triton interpreter on CPU is a correctness tool, not timed unless --backends names it"
        return ok, why


#: what the L2 flush before each timed call writes (triton.testing.do_bench's size; an H100/H200
#: has 50 MB of L2, and the paper-size inputs of some ops would fit in it)
L2_FLUSH_BYTES = 256 * 2**20


def _do_bench() -> Callable | None:
    """``triton.testing.do_bench``, or None when Triton is not installed."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def cuda_timer_name() -> str:
    """How :func:`_time_cuda` times on this machine (the ``timer`` of bench.py's meta)."""
    if _do_bench() is not None:
        return "triton.testing.do_bench median (CUDA events, L2 flushed before each call)"
    return "median of CUDA events, L2 flushed before each call (Triton not installed: no do_bench)"


def _time_cuda(fn: Callable[[], Any], quick: bool) -> float:
    warmup, rep = (10, 40) if quick else (25, 200)  # milliseconds, as do_bench counts them
    do_bench = _do_bench()
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    # without Triton: the same protocol by hand, L2 flushed before every timed call as do_bench does,
    # so that inputs that fit in L2 are not timed from it
    flush = _l2_flush_buffer()
    fn()
    torch.cuda.synchronize()
    times = []
    for i in range(5 + (20 if quick else 100)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:  # the first few are warm-up
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _cpu_profiler_peak(fn: Callable[[], Any]) -> float:
    """Peak of the running sum of the allocations and frees torch's profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    if not events:
        raise RuntimeError("the profiler recorded no memory events")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


def _rss_peak(fn: Callable[[], Any]) -> float | None:
    """Rise of the process's peak resident set during one call (Linux: reset by clear_refs)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = status("VmRSS:")
        out = fn()
        peak = status("VmHWM:") - base
        del out
        return float(peak)
    except OSError:
        return None


def measure_copy_gbps(ctx: Context) -> dict[str, float]:
    """Device copy bandwidth, bytes read + written, of a 1 GiB (GPU) / 256 MiB (CPU) fp32 tensor:
    ``clone`` (a fresh output) and ``copy_`` into an existing buffer. The roofline uses clone on
    GPU (the caching allocator makes both the same) and copy_ on CPU, where the fresh allocation
    of a clone is page-faulted in by the OS on first touch and that, not memory, sets its speed."""
    n = 2**28 if ctx.cuda else 2**26
    x = torch.empty(n, dtype=torch.float32, device=ctx.device).fill_(1.0)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    clone = nbytes / (ctx.time_ms(x.clone) * 1e-3) / 1e9
    copy = nbytes / (ctx.time_ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    return {"clone_gbps": clone, "copy_into_gbps": copy, "roofline_gbps": clone if ctx.cuda else copy,
            "roofline_method": "clone" if ctx.cuda else "copy_ into an existing buffer"}


def measure_matmul_tflops(ctx: Context, dtype: str) -> float:
    n = 8192 if ctx.cuda else 1024
    a = torch.randn(n, n, device=ctx.device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=ctx.device).to(DTYPES[dtype])
    ms = ctx.time_ms(lambda: a @ b)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12
