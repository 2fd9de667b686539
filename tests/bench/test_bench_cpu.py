"""pytest-benchmark suite of the fused ops on CPU, at a small size: every op × every CPU backend
that loads here (``ext``, ``reference``), beside the plain-PyTorch ``eager`` baseline, forward
and forward+backward. The workloads, baselines and correctness guard are those of
``tools/bench.py``; each benchmark first checks its result against eager.

Not part of the default test run (pyproject's addopts ignores tests/bench):

    pip install pytest-benchmark
    pytest tests/bench --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "tools"))
import bench  # tools/ is not a package

CPU_BACKENDS = ("ext", "reference")  # the CPU dispatch order; Triton runs on CPU only interpreted
IMPLS = (*CPU_BACKENDS, "eager")


@pytest.fixture(scope="module")
def ctx() -> bench.Context:
    context = bench.Context(device=torch.device("cpu"), size="tiny", threads=torch.get_num_threads())
    if os.environ.get("PYIMPUTMAE_NO_EXT") != "1":
        # a broken extension build aborts the process that loads it: try it in a child first
        context.ext_broken = bench.probe_extension()
        if context.ext_broken:
            os.environ["PYIMPUTMAE_NO_EXT"] = "1"
    return context


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(bench.WORKLOADS))
def test_op_cpu(benchmark, ctx: bench.Context, op: str, impl: str, pass_: str) -> None:
    if impl in CPU_BACKENDS:
        ok, why = ctx.availability(impl)
        if not ok:
            pytest.skip(f"backend {impl}: {why}")
    torch.manual_seed(0)
    w = bench.WORKLOADS[op](ctx, "fp32")
    forward = (lambda: w.eager(*w.eager_args)) if impl == "eager" else (lambda: w.ours(impl))
    out, grads = bench.run_once(w, forward)
    if w.check is not None:
        verdict = w.check(impl, out, grads)
    elif impl == "eager":
        verdict = "ok"
    else:
        verdict = bench.compare_with_eager(w, impl, out, grads)
    assert verdict == "ok", f"{op} on {impl}: {verdict}"
    benchmark.group = f"{op} {pass_}"
    benchmark.extra_info.update(bytes=w.bytes[pass_], shape=w.shape)
    benchmark(bench.pass_fn(w, forward, pass_))
