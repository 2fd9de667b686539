"""tools/gpu_report.py: one GPU run's results as a report for docs/benchmarks.md, and --apply (the run
archived, its validated backends written into pyimputmae/_backends.py), from synthetic OUTDIRs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from op_testing import tool_module
from test_backends import write_junit

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"

ENV_TXT = """date: 2026-12-01T09:30:00Z   host: gpu1   cpus: 16
repo: /work/repo   commit: {commit}
gpu check: GPU visible
| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |
ncu: not on PATH
python 3.12.3 /usr/bin/python3
torch 2.11.0+cu130 | built for CUDA 13.0 | cuda available True
gpu NVIDIA H200 | sm_90 | 132 SMs | 139.8 GiB
triton 3.6.0
"""
SUMMARY = ("stage\tstatus\tseconds\tlog\nbuild\tok\t95\tstage1_build.log\nwarm-anchor\tok\t180\twarm_anchor.log\n"
           "kernel-check\tok\t4\tstage1_kernel_check.log\ntest\tok\t80\tstage1_test.log\n"
           "bench-large\tok\t120\tstage2_bench_large.log\noverhead-ext\tok\t9\tstage2_op_overhead.log\n"
           "e2e\tTIMEOUT after 240s\t250\tstage3_e2e.log\ntrain\tskipped (budget spent)\t0\tstage3_train.log\n")


def _bench_records() -> list[dict]:
    """Our backends and the baselines as tools/bench.py records them: a mismatching backend, one
    skipped, one that raised, a baseline whose compile was too slow; summaries by bench.py's own code."""
    def rec(op, impl, pass_, dtype, ms, **extra):
        base = impl if impl in ("eager", "compile", "conv") else None
        return {"op": op, "backend": impl, "baseline": base, "size": "large", "pass": pass_, "dtype": dtype,
                "device": "cuda", "median_ms": ms, **extra}

    records = [
        rec("masked_mse", "ext", "fwd+bwd", "fp32", 0.1, gbps=3000.0, roofline_frac=0.75, peak_extra_mb=128.5,
            shape={"pred": [32, 512, 2048]}, check="ok"),
        rec("masked_mse", "triton", "fwd+bwd", "fp32", 0.05, gbps=3600.0, roofline_frac=0.9, check="MISMATCH 1e-1"),
        rec("masked_mse", "reference", "fwd+bwd", "fp32", 0.6, check="ok"),
        rec("masked_mse", "eager", "fwd+bwd", "fp32", 0.45, peak_extra_mb=512.0, check="ok (the baseline itself)"),
        rec("masked_mse", "compile", "fwd+bwd", "fp32", 0.5, check="ok"),
        rec("patch_embed3d", "ext", "fwd", "bf16", None, skipped="the extension was built without CUDA kernels"),
        rec("patch_embed3d", "triton", "fwd", "bf16", 0.08, gbps=1250.0, roofline_frac=0.3, tflops=215.3,
            peak_extra_mb=24.0, check="ok"),
        rec("patch_embed3d", "eager", "fwd", "bf16", 0.2, check="ok"),
        rec("patch_embed3d", "compile", "fwd", "bf16", 0.093, check="ok"),
        rec("patch_embed3d", "conv", "fwd", "bf16", 0.9, check="ok"),
        rec("masking_fill", "ext", "fwd+bwd", "fp32", 0.2, gbps=2700.0, roofline_frac=0.65, check="ok"),
        rec("masking_fill", "triton", "fwd+bwd", "fp32", None, error="RuntimeError: boom", check="ok"),
        rec("masking_fill", "eager", "fwd+bwd", "fp32", 0.7, check="ok"),
        rec("masking_fill", "compile", "fwd+bwd", "fp32", None, skipped="torch.compile took over 120 s"),
    ]
    if str(ROOT / "tools") not in sys.path:  # bench.py imports its neighbours (as tools/gpu_targets.py does)
        sys.path.insert(0, str(ROOT / "tools"))
    return records + tool_module("bench").summarize(records)


def _e2e(*, finished: bool = True) -> dict:
    ours = {"eager": {"step_ms": 53.5, "patients_per_s": 1794.4, "peak_GB": 2.58,
                      "backends": {"patch_embed": "triton", "masking": "ext", "masked_mse": "ext"}}}
    if finished:
        ours["graph"] = {"step_ms": 16.0, "patients_per_s": 6000.0, "peak_GB": 2.4}
        ours["train-graph"] = {"error": "timed out after 75 s", "log_tail": "warming up\nCapturing graph\n"}
    ref = {"error": "timed out", "eager fp32": {"step_ms": 76.7, "patients_per_s": 1252.0, "peak_GB": 4.2},
           "eager bf16": {"step_ms": 78.9, "patients_per_s": 1500.0, "peak_GB": 2.9}}
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "config": "paper", "batch": 96, "dtype": "bf16",
            "steps": 20, "ours": ours, "reference": ref}


def _sweep() -> dict:
    """tools/patch_embed_sweep.py's JSON: each kernel's fixed configuration first, one that failed."""
    def tma(m, n, w, st):
        return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st, "TMA": True}

    gather = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    records = [
        {"case": "all", "impl": "eager reshape + F.linear (all patches)", "median_ms": 0.2, "tflops": 129.0},
        {"case": "all", "impl": "triton", "config": tma(128, 128, 8, 3), "median_ms": 0.08, "tflops": 322.1},
        {"case": "all", "impl": "triton", "config": tma(128, 128, 8, 4), "median_ms": 0.064, "tflops": 402.7},
        {"case": "all", "impl": "triton", "config": tma(128, 256, 8, 3), "error": "OutOfResources: shared memory"},
        {"case": "all", "impl": "triton", "config": gather, "median_ms": 0.12, "tflops": 214.7},
        {"case": "grad_weight", "impl": "eager reshape + grad_outᵀ · patches (bf16 matmul)", "median_ms": 0.1,
         "tflops": 257.7},
        {"case": "grad_weight", "impl": "triton", "config": tma(128, 128, 4, 3), "median_ms": 0.05, "tflops": 515.4},
        {"case": "grad_weight", "impl": "triton", "config": {"TMA": False}, "median_ms": 0.125, "tflops": 206.2},
        {"case": "keep50", "impl": "eager reshape + F.linear (all patches)", "median_ms": 0.2, "tflops": 129.0},
        {"case": "keep50", "impl": "triton", "config": gather, "median_ms": 0.07, "tflops": 184.1},
    ]
    return {"device": "cuda", "shape": {"B": 32, "C": 4, "S": 64, "patch": 8, "E": 384}, "dtype": "torch.bfloat16",
            "records": records}


def make_outdir(tmp_path: Path, commit: str = SHA) -> Path:
    """What tools/gpu_check.sh leaves: gpu_check.tar.gz (every file, "./name" as its tar writes them)
    and copies of the key files beside it; the e2e.json beside it is newer than the bundled one."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "env.txt").write_text(ENV_TXT.format(commit=commit))
    (work / "summary.tsv").write_text(SUMMARY)
    meta = {"device": "NVIDIA H200", "device_type": "cuda", "size": "large", "quick": True, "torch": "2.11.0+cu130",
            "triton": "3.6.0", "copy_gbps": 4182.0, "matmul_tflops": {"bf16": 700.0}, "git_commit": commit,
            "timer": "triton.testing.do_bench", "command": "python3 tools/bench.py --device cuda --size large"}
    (work / "bench_large.json").write_text(json.dumps({"meta": meta, "records": _bench_records()}))
    (work / "e2e.json").write_text(json.dumps(_e2e(finished=False)))
    (work / "patch_embed_sweep.json").write_text(json.dumps(_sweep()))
    (work / "stage3_e2e.log").write_text("== e2e (timeout 240s): env python3 tools/e2e_step.py --json e2e.json "
                                         "--modes eager,graph,graph-mlp1024,train-graph --budget-s 220\n")
    write_junit(work / "junit_ops.xml", [
        ("tests.test_masking", "test_a[ext-cuda-fp32]", ""), ("tests.test_masking", "test_a[triton-cuda-fp32]", ""),
        ("tests.test_masked_mse", "test_b[ext-cuda]", ""), ("tests.test_masked_mse", "test_b[triton-cuda]", ""),
        ("tests.test_patch_embed", "test_c[triton-cuda-bf16]", ""),
        ("tests.test_patch_embed", "test_c[ext-cuda-bf16]", "<failure message='boom'/>")])
    (work / "stage1_kernel_check.log").write_text("select_keep/long       ok (0.1s)\nmasked_mse/fp32_raw    ok (0.1s)\n"
                                                  "patch_embed/3d_fp32    ok (0.2s)\n")
    with tarfile.open(out / "gpu_check.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=".")
    for name in ("summary.tsv", "bench_large.json"):
        shutil.copy(work / name, out / name)
    (out / "e2e.json").write_text(json.dumps(_e2e()))
    return out


EXPECTED_VALIDATED = frozenset({("ext", "masking"), ("ext", "masked_mse"), ("triton", "patch_embed"),
                                ("triton", "masking"), ("triton", "masked_mse")})
# patch_embed: triton untimed in fwd+bwd; masking: ext timed, triton raised (validated, untimed); masked_mse:
# norm_pix untimed, triton's guard failed: left out
EXPECTED_ORDER = {"patch_embed": ("triton", "reference"), "masking": ("ext", "triton", "reference"),
                  "masked_mse": ("ext", "reference"), "layer_norm": ("reference",)}


def test_report_gives_each_measured_figure_and_says_what_was_not_measured(tmp_path, capsys):
    tool = tool_module("gpu_report")
    out = make_outdir(tmp_path)
    assert tool.main([str(out)]) == 0
    text = (out / "report.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert text.startswith(f"#### NVIDIA H200, 2026-12-01, commit `{SHA[:12]}`")
    assert ("Card: NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB), driver 570.124.06 (CUDA 12.8); torch 2.11.0+cu130, "
            f"triton 3.6.0, python 3.12.3. Date 2026-12-01T09:30:00Z, commit `{SHA}`.") in text
    assert "`bash tools/gpu_check.sh $OUT env build test bench e2e train`" in text
    assert "| e2e | TIMEOUT after 240s | 250 |" in text
    # kernels: ours, the baselines, the best of ours (the mismatching triton never is), its ratios
    assert ("| `masked_mse` | fwd+bwd | fp32 | 0.100 | 0.050 | 0.600 | 0.450 | 0.500 | — | ext | 4.50× | 5.00× | — "
            "| 75.0% |  | 128.5 / 512.0 | ext ok; triton MISMATCH 1e-1; reference ok |") in text
    assert ("| `patch_embed3d` | fwd | bf16 | skipped | 0.080 | — | 0.200 | 0.093 | 0.900 | triton | 2.50× | 1.16× "
            "| 11.25× | 30.0% | 215.3 | 24.0 / — | ok |") in text
    assert "| `masking_fill` | fwd+bwd | fp32 | 0.200 | error | — | 0.700 | skipped | — | ext | 3.50× | — |" in text
    assert "- ext skipped (patch_embed3d fwd bf16): the extension was built without CUDA kernels" in text
    assert "- triton error (masking_fill fwd+bwd fp32): RuntimeError: boom" in text
    assert "- compile skipped (masking_fill fwd+bwd fp32): torch.compile took over 120 s" in text
    assert ("Not measured: bench_paper.json is missing: its stage (paper) did not run in this call (not in "
            "summary.tsv).") in text
    # end to end: the e2e.json beside the bundle (newer) wins; ratios to the reference's best mode, eager bf16
    assert "| ours `graph` | 16.0 | 6,000 | 2.40 | 4.00× | 0.83× | — |" in text
    assert ("| ours `eager` | 53.5 | 1,794 | 2.58 | 1.20× | 0.89× | patch_embed=triton, masking=ext, "
            "masked_mse=ext |") in text
    assert "| reference `eager bf16` (best) | 78.9 | 1,500 | 2.90 |" in text
    assert "- ours `train-graph`: timed out after 75 s; last output: Capturing graph" in text
    assert "- ours `graph-mlp1024`: did not run (step e2e: TIMEOUT after 240s (250 s))" in text
    assert "- reference `compile bf16`: did not finish (timed out)" in text
    # the tile sweep: each kernel's fixed choice (listed first) and the fastest, ratios to the eager anchor
    assert "Case `all`: forward, every patch." in text
    assert "| `tma-128x128x8x3` | 0.080 | 322.1 | 2.50× | the fixed choice (TMA) |" in text
    assert "| `tma-128x128x8x4` | 0.064 | 402.7 | 3.12× | fastest |" in text
    assert "| `128x128x64x8x3` | 0.120 | 214.7 | 1.67× | the fixed choice (gather) |" in text
    assert ("- `tma-128x128x8x4` is 1.25× as fast as the fixed choice `tma-128x128x8x3` (0.064 against "
            "0.080 ms).") in text
    assert "- did not run: `tma-128x256x8x3`: OutOfResources: shared memory" in text
    assert "| `tma-128x128x4x3` | 0.050 | 515.4 | 2.00× | the fixed choice (TMA), fastest |" in text
    assert "| `gather` | 0.125 | 206.2 | 0.80× | the fixed choice (gather) |" in text
    assert "| `128x128x64x8x3` | 0.070 | 184.1 | 2.86× | the fixed choice (gather), fastest |" in text
    assert text.index("Case `all`") < text.index("Case `grad_weight`") < text.index("Case `keep50`")
    # the verdicts are gpu_targets.py's
    assert "| `masked_mse` fp32 fwd+bwd: speed-up over eager | 4.50× (ext 0.1 ms) | ≥ 4× eager | met |" in text
    assert "not measured: the reference's compile bf16 did not finish (timed out)" in text
    # the validated pairs and the order, as _backends.py statements
    assert ('GPU_VALIDATED = frozenset({\n    ("ext", "masking"),\n    ("ext", "masked_mse"),\n'
            '    ("triton", "patch_embed"),\n') in text
    assert "GPU_VALIDATED_FP16: frozenset[tuple[str, str]] = frozenset()" in text
    assert '    "masking": ("ext", "triton", "reference"),\n' in text
    assert "ext     patch_embed  tests: 0 passed, 1 failed" in text
    assert ("The float16 cases left no verdicts (junit_ops_fp16.xml is missing: its stage (test16) did not run in "
            "this call (not in summary.tsv)): no pair is validated for float16 by this run.") in text
    assert "- junit_train.xml is missing; summary.tsv: train skipped (budget spent) (0 s)" in text
    assert "None" not in text and "nan" not in text.lower().replace("nanoseconds", "")


def test_report_of_an_unpacked_run_whose_stages_stopped(tmp_path):
    """An unpacked folder (no bundle) of a run whose bench timed out before it wrote a record and whose
    op tests never ran: each is "not measured" with the step's outcome, and the backends stay as they are."""
    tool = tool_module("gpu_report")
    (tmp_path / "env.txt").write_text(ENV_TXT.format(commit=SHA))
    (tmp_path / "summary.tsv").write_text("stage\tstatus\tseconds\tlog\nbench-large\tTIMEOUT after 150s\t150\tx.log\n")
    assert tool.main([str(tmp_path), "--report", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "`bash tools/gpu_check.sh $OUT env bench`" in text
    assert ("Not measured: bench_large.json is missing; summary.tsv: bench-large TIMEOUT after 150s (150 s).") in text
    assert "Not measured: e2e.json is missing: its stage (e2e) did not run in this call" in text
    assert "GPU_VALIDATED, GPU_VALIDATED_FP16 and CUDA_ORDER stay as they are." in text
    assert "not measured: bench_large.json is missing" in text  # the verdicts say it too


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _scratch_repo(tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "repo"
    (repo / "pyimputmae").mkdir(parents=True)
    shutil.copy(ROOT / "pyimputmae" / "_backends.py", repo / "pyimputmae" / "_backends.py")
    for folder in ("csrc", "kernels"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "measured")
    return repo, _git(repo, "rev-parse", "HEAD")


def _load_backends(path: Path):
    """The rewritten file, imported by path as a module of the installed package (its relative import)."""
    spec = importlib.util.spec_from_file_location("pyimputmae._backends_applied", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_apply_archives_the_run_and_writes_its_backends(tmp_path, capsys):
    tool = tool_module("gpu_report")
    repo, sha = _scratch_repo(tmp_path)
    out = make_outdir(tmp_path, commit=sha)
    _git(repo, "commit", "-q", "--allow-empty", "-m", "later work, kernels untouched")
    assert tool.main([str(out), "--apply", "--repo", str(repo)]) == 0
    printed = capsys.readouterr().out
    dest = repo / "docs" / "gpu-runs" / "2026-12-01-h200"
    assert {"report.md", "env.txt", "summary.tsv", "junit_ops.xml", "stage3_e2e.log", "e2e.json"} <= {
        p.name for p in dest.iterdir()}
    assert json.loads((dest / "e2e.json").read_text())["ours"]["graph"]["patients_per_s"] == 6000.0  # the newer
    assert "Every file of the run: `docs/gpu-runs/2026-12-01-h200/`." in (dest / "report.md").read_text()
    assert f"archived the run in {dest}" in printed and '+    ("triton", "patch_embed"),' in printed
    backends = repo / "pyimputmae" / "_backends.py"
    module = _load_backends(backends)
    assert module.GPU_VALIDATED == EXPECTED_VALIDATED
    assert module.GPU_VALIDATED_FP16 == frozenset()
    assert module.CUDA_ORDER == EXPECTED_ORDER
    text = backends.read_text()
    assert "#: (backend, family) pairs whose GPU kernels have been checked" in text  # the comments stay
    assert "#: the automatic order on CUDA tensors per op family, fastest first" in text
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff:
        lint = subprocess.run([ruff, "check", "--config", str(ROOT / "pyproject.toml"), str(backends)],
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout

    # the same run again: its folder exists, nothing is touched
    assert tool.main([str(out), "--apply", "--repo", str(repo)]) == 2
    assert f"{dest} exists and is not empty" in capsys.readouterr().err
    assert backends.read_text() == text

    # a kernel changed after the run's commit: the run validated other kernels
    kernel = next(p for p in sorted((repo / "csrc").rglob("*")) if p.is_file())
    kernel.write_text(kernel.read_text() + "\n// changed\n")
    _git(repo, "commit", "-q", "-am", "kernel change")
    shutil.rmtree(dest)
    assert tool.main([str(out), "--apply", "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert f"the kernels differ from the run's commit {sha[:12]}" in err
    assert kernel.relative_to(repo).as_posix() in err
    assert not dest.exists() and backends.read_text() == text


def test_apply_refuses_a_run_of_a_commit_this_branch_does_not_hold(tmp_path, capsys):
    tool = tool_module("gpu_report")
    repo, sha = _scratch_repo(tmp_path)
    _git(repo, "switch", "-q", "-c", "side")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "elsewhere")
    side = _git(repo, "rev-parse", "HEAD")
    _git(repo, "switch", "-q", "-")
    before = (repo / "pyimputmae" / "_backends.py").read_text()
    out = make_outdir(tmp_path, commit=side)
    assert tool.main([str(out), "--apply", "--repo", str(repo)]) == 2
    assert f"the run's commit {side} is not an ancestor of HEAD" in capsys.readouterr().err
    assert not (repo / "docs").exists() and (repo / "pyimputmae" / "_backends.py").read_text() == before
    assert sha != side


def test_statements_keep_one_element_tuples_and_short_sets_on_one_line():
    tool = tool_module("gpu_report")
    order = {"patch_embed": ("reference",)}
    assert tool._order_statement("CUDA_ORDER", order) == 'CUDA_ORDER = {"patch_embed": ("reference",)}'
    assert tool._pairs_statement("X", [("ext", "masking")]) == 'X = frozenset({("ext", "masking")})'
