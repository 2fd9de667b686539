#!/usr/bin/env python3
"""Which (backend, op family) pairs a GPU run validated, from the files ``tools/gpu_check.sh`` wrote.

    python tools/gpu_validated.py OUTDIR

Reads ``OUTDIR/junit_ops.xml`` (the op tests' GPU cases; when pytest was stopped before it wrote
that file, the verdicts its ``-v`` log ``OUTDIR/stage1_test.log`` printed), the same for their
float16 cases (``junit_ops_fp16.xml`` / ``stage1_test_fp16.log``, a later stage) and ``OUTDIR/stage1_kernel_check.log``
(``tools/cuda_kernel_check.py``: every CUDA code path once). A pair is validated when at least one
of its CUDA test cases passed and none failed; for ``ext`` also every kernel-check case of the
family passed. Cases of ``tests/test_compile.py`` exercise every fused op's family at once, so they
count for each of those; ``tests/test_layer_norm.py``'s count for ``layer_norm`` (the pre-norm
sublayers' LayerNorm, which of ext and triton only Triton implements). A validated pair is validated for float16 too
when its float16 cases ran, at least one passed and none failed. Prints one line per pair and the sets to put into
``pyimputmae._backends.GPU_VALIDATED`` and ``GPU_VALIDATED_FP16``.
With ``OUTDIR/bench_large.json`` it also prints ``CUDA_ORDER``: per family its validated backends,
fastest first by the summed ``fwd+bwd`` median time of the family's bench ops in the training dtype
(bf16 for patch embedding, fp32 for the others) whose correctness guard passed, then the reference
(``layer_norm``, which the bench does not time: its validated backend, then the reference).
The last line, ``PYIMPUTMAE_BACKEND=family=backend,...``, names the first of each family's order
(families with no validated backend left out, so that they keep the automatic choice):
``tools/gpu_check.sh`` runs the end-to-end step with it, so that the step uses what the same run
validated and found fastest. ``tools/gpu_report.py`` reads the same through :func:`validate`.
Exit status 1 when a case failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("patch_embed", "masking", "masked_mse", "layer_norm")
BACKENDS = ("ext", "triton")
#: the backends (of BACKENDS) with kernels for a family, where not all have: the pre-norm LayerNorm is Triton's
IMPLEMENTED = {"layer_norm": ("triton",)}
#: the fused ops' families, which tests/test_compile.py exercises all at once
FUSED_FAMILIES = ("patch_embed", "masking", "masked_mse")
#: test module → the op family its cases exercise (None: every fused op's family)
MODULE_FAMILY = {"test_patch_embed": "patch_embed", "test_masking": "masking", "test_masked_mse": "masked_mse",
                 "test_philox": "masking", "test_layer_norm": "layer_norm", "test_compile": None}
#: tools/cuda_kernel_check.py case prefix → family
CHECK_FAMILY = {"select_keep": "masking", "row_moves": "masking", "hidden_sum": "masking",
                "masked_mse": "masked_mse", "scale_grad": "masked_mse", "patch_embed": "patch_embed"}


def _count(counts: collections.Counter, module: str, name: str, outcome: str) -> None:
    """Count one test case ``module``, ``name`` (with its ``[param-ids]``) if it is a CUDA case of a backend."""
    if module not in MODULE_FAMILY:
        return
    params = re.search(r"\[(.*)\]$", name)
    ids = params.group(1).split("-") if params else []
    backend = next((b for b in BACKENDS if b in ids), None)
    if "cuda" not in ids or backend is None:
        return
    for family in [MODULE_FAMILY[module]] if MODULE_FAMILY[module] else FUSED_FAMILIES:
        counts[(backend, family, outcome)] += 1


def junit_outcomes(path: Path) -> collections.Counter:
    """(backend, family, outcome) → count over the CUDA cases of the op tests."""
    counts: collections.Counter = collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        _count(counts, case.get("classname", "").rsplit(".", 1)[-1], case.get("name", ""), outcome)
    return counts


#: a verdict line of ``pytest -v``, with or without pytest-xdist:
#: ``tests/test_masking.py::test_x[triton-cuda] PASSED [ 3%]`` or ``[gw1] [ 3%] PASSED tests/...::test_x[...]``
VERBOSE_LINE = re.compile(r"(?:(?P<a>PASSED|FAILED|ERROR|SKIPPED) )?tests/(?P<module>test_\w+)\.py::(?P<name>\S+)"
                          r"(?: (?P<b>PASSED|FAILED|ERROR|SKIPPED))?")


def log_outcomes(path: Path) -> collections.Counter:
    """The same count from a ``pytest -v`` log: what a run stopped by its timeout had printed."""
    counts: collections.Counter = collections.Counter()
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = VERBOSE_LINE.search(line)
        word = match and (match["a"] or match["b"])
        if not word or f"{match['module']}::{match['name']}" in seen:
            continue
        seen.add(f"{match['module']}::{match['name']}")
        outcome = {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, "failed")
        _count(counts, match["module"], match["name"], outcome)
    return counts


def kernel_check_outcomes(path: Path) -> collections.Counter:
    """(family, outcome) → count over the cases of the kernel check's log."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r"^(\w+)/\S+\s+(ok|FAIL)\b", line)
        if match and match.group(1) in CHECK_FAMILY:
            counts[(CHECK_FAMILY[match.group(1)], "passed" if match.group(2) == "ok" else "failed")] += 1
    return counts


#: op family → (its bench ops, the dtype training runs them in)
BENCH_OPS = {"patch_embed": (("patch_embed3d", "patch_embed3d_keep50"), "bf16"),
             "masking": (("masking_fill",), "fp32"), "masked_mse": (("masked_mse", "masked_mse_normpix"), "fp32")}


def cuda_order(bench: dict, validated: list[tuple[str, str]],
               log: Callable[[str], object] = print) -> dict[str, tuple[str, ...]]:
    """Per family: the validated backends, fastest first (summed fwd+bwd medians over the family's
    bench ops; a backend missing one of them, or failing its check, is left out), then "reference"."""
    order = {}
    for family in FAMILIES:
        if family not in BENCH_OPS:  # no bench op of its own (the LayerNorm): validated, then the reference
            order[family] = (*(b for b in BACKENDS if (b, family) in validated), "reference")
            continue
        ops, dtype = BENCH_OPS[family]
        totals = {}
        for backend in (b for b, f in validated if f == family):
            times = [r.get("median_ms") for r in bench["records"]
                     if r.get("op") in ops and r.get("backend") == backend and r.get("baseline") is None
                     and r.get("pass") == "fwd+bwd" and r.get("dtype") == dtype and r.get("check") == "ok"]
            if len(times) == len(ops) and all(t is not None for t in times):
                totals[backend] = sum(times)
        for backend, total in sorted(totals.items(), key=lambda kv: kv[1]):
            log(f"{family:12s} {backend:7s} {total:8.3f} ms (fwd+bwd {dtype}, {' + '.join(ops)})")
        # validated but not timed (the bench was cut short): after the timed ones, in the default order;
        # left out when the bench's correctness guard failed it on any of the family's ops
        failed = {r.get("backend") for r in bench["records"] if r.get("op") in ops and r.get("baseline") is None
                  and str(r.get("check", "")).startswith("MISMATCH")}
        untimed = [b for b in BACKENDS if (b, family) in validated and b not in totals and b not in failed]
        order[family] = (*sorted(totals, key=totals.get), *untimed, "reference")
    return order


@dataclass
class Validation:
    """What :func:`validate` found in one GPU run's files."""

    validated: list[tuple[str, str]]  # (backend, family) pairs, in BACKENDS × FAMILIES order
    validated16: list[tuple[str, str]]  # those validated for float16 too
    order: dict[str, tuple[str, ...]]  # CUDA_ORDER: per family, fastest validated backend first
    any_failed: bool  # a case failed
    tested: bool  # the op tests left verdicts (junit file or -v log)
    tested16: bool  # the same for their float16 cases
    timed: bool  # the order comes from bench_large.json (else the default order)


def validate(outdir: Path, log: Callable[[str], object] = print) -> Validation:
    """Read the run's files in ``outdir``, say what it found line by line through ``log`` (the
    command's output) and return it."""
    check_log = outdir / "stage1_kernel_check.log"
    # the op tests' GPU cases: fp32/bf16/fp64 (stage "test"), then float16 (stage "test16")
    stages, ran = {}, {}
    for key, junit_name, log_name, what in (
            ("main", "junit_ops.xml", "stage1_test.log", "the op tests"),
            ("fp16", "junit_ops_fp16.xml", "stage1_test_fp16.log", "the op tests' float16 cases")):
        junit, test_log = outdir / junit_name, outdir / log_name
        stages[key] = collections.Counter()
        ran[key] = junit.exists() or test_log.exists()
        if junit.exists():
            stages[key] = junit_outcomes(junit)
        elif test_log.exists():
            log(f"no {junit}: {what} did not finish; counting the verdicts {test_log.name} printed")
            stages[key] = log_outcomes(test_log)
        else:
            log(f"no {junit} nor {test_log}: {what} did not run")
    tests, half = stages["main"], stages["fp16"]
    checks = kernel_check_outcomes(check_log) if check_log.exists() else collections.Counter()
    if not check_log.exists():
        log(f"no {check_log}: the CUDA kernel check did not run")
    validated, validated16, any_failed = [], [], False
    for backend in BACKENDS:
        for family in FAMILIES:
            if backend not in IMPLEMENTED.get(family, BACKENDS):
                continue
            passed, failed, skipped = (tests[(backend, family, o)] for o in ("passed", "failed", "skipped"))
            line = f"{backend:7s} {family:12s} tests: {passed} passed, {failed} failed, {skipped} skipped"
            ok = passed > 0 and failed == 0
            if backend == "ext":
                c_ok, c_fail = checks[(family, "passed")], checks[(family, "failed")]
                line += f"; kernel check: {c_ok} ok, {c_fail} failed"
                ok = ok and c_ok > 0 and c_fail == 0
                failed += c_fail
            h_ok, h_fail = half[(backend, family, "passed")], half[(backend, family, "failed")]
            line += f"; float16: {h_ok} passed, {h_fail} failed"
            ok16 = ok and h_ok > 0 and h_fail == 0
            any_failed |= failed > 0 or h_fail > 0
            verdict = ("VALIDATED, float16 too" if ok16 else "VALIDATED, not float16" if ok else "not validated")
            log(f"{line}  -> {verdict}")
            if ok:
                validated.append((backend, family))
            if ok16:
                validated16.append((backend, family))
    log("GPU_VALIDATED = frozenset({" + ", ".join(f'("{b}", "{f}")' for b, f in validated) + "})")
    log("GPU_VALIDATED_FP16 = frozenset({" + ", ".join(f'("{b}", "{f}")' for b, f in validated16) + "})")
    bench_path = outdir / "bench_large.json"
    if bench_path.exists():
        order = cuda_order(json.loads(bench_path.read_text(encoding="utf-8")), validated, log)
        log("CUDA_ORDER = {" + ", ".join(f'"{f}": {o!r}' for f, o in order.items()) + "}")
    else:
        log(f"no {bench_path}: CUDA_ORDER needs the bench's timings; the default order below")
        order = {f: (*(b for b in BACKENDS if (b, f) in validated), "reference") for f in FAMILIES}
    # what the end-to-end stage runs with: per family the first of that order (validated in this run);
    # a family with none validated is left to the automatic choice (empty when none at all)
    log("PYIMPUTMAE_BACKEND=" + ",".join(f"{f}={o[0]}" for f, o in order.items() if o[0] != "reference"))
    return Validation(validated, validated16, order, any_failed, ran["main"], ran["fp16"], bench_path.exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    opts = parser.parse_args(argv)
    return 1 if validate(opts.outdir).any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
