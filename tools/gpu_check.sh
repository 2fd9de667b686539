#!/usr/bin/env bash
# Checks for a fresh GPU machine (H100/H200; torch, triton, nvcc, ncu there; no network).
#
#   tools/gpu_check.sh OUTDIR [stages...]        default stages: env build test bench
#                                               (others: e2e, sanitize)
#
#   env    nvidia-smi, python/torch/triton/nvcc versions              -> OUTDIR/env.txt
#   build  pip install --no-build-isolation --no-deps -e .            -> stage1_build.log, build_time.txt, info.txt
#          (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0); on failure a pure-Python install (PYIMPUTMAE_NO_EXT=1)
#          so that the Triton backend can still be tested and timed
#   test   tools/cuda_kernel_check.py: every CUDA code path once     -> stage1_kernel_check.log
#          then the op tests' GPU cases, -m "gpu and not slow"       -> stage1_test.log, junit_ops.xml
#          and the pairs they validated (tools/gpu_validated.py)    -> validated.txt
#          (only the Triton cases, with PYIMPUTMAE_NO_EXT=1, when the extension does not load)
#   sanitize  tools/cuda_kernel_check.py under compute-sanitizer memcheck, racecheck and synccheck
#          (not a default stage; ~1 minute each)                     -> stage4_sanitize_<tool>.log
#   bench  tools/bench.py --device cuda --quick, size large then paper -> bench_large.json, bench_paper.json
#   e2e    tools/e2e_step.py (pre-training step) and the plain-PyTorch anchor
#          ref_step_bench.py                                         -> e2e.json, ref_step.json
#          and tools/saved_activations.py (activation memory, both)  -> stage3_activations.log
#          (the anchor is looked for in ../shared/anchors, then shared/anchors in the repo; e2e_step.py
#          runs it in the same call and ref_step.json is taken from e2e.json, else it runs on its own)
#
# Every stage runs under its own timeout, clamped to what is left of GPU_CHECK_BUDGET_S, and
# writes its files into OUTDIR as it finishes, so a stage that overruns leaves the others' results.
# A stage runs even when the one before it failed. OUTDIR/summary.tsv: stage, status, seconds, log.
#
# Knobs (environment): PYTHON (python3), GPU_CHECK_BUDGET_S (570: the whole script), BUILD_TIMEOUT_S
# (240), TEST_TIMEOUT_S (180), BENCH_LARGE_TIMEOUT_S (180), BENCH_PAPER_TIMEOUT_S (150),
# E2E_TIMEOUT_S (360), REF_STEP_TIMEOUT_S (180), SANITIZE_TIMEOUT_S (150 per tool), GPU_CHECK_FORCE=1 (run
# the GPU stages without a visible GPU).

set -u
set -o pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
shift
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env build test bench)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
BUDGET=${GPU_CHECK_BUDGET_S:-570}
START=$(date +%s)
SUMMARY="$OUT/summary.tsv"
export PYTHONUNBUFFERED=1 OUT ROOT PY

OP_TESTS=(tests/test_patch_embed.py tests/test_masking.py tests/test_masked_mse.py tests/test_philox.py
          tests/test_compile.py)

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

note() {  # stage status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
}

# run_step NAME LIMIT_S LOG COMMAND...: COMMAND under `timeout` (clamped to the budget left), its
# output shown and appended to LOG; the outcome goes to summary.tsv. Returns COMMAND's status.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left
  left=$(remaining)
  if ((left < 15)); then
    echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$log"
    note "$name" "skipped (budget spent)" 0 "$(basename "$log")"
    return 125
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  note "$name" "$status" "$(($(date +%s) - t0))" "$(basename "$log")"
  echo "== $name: $status" | tee -a "$log"
  return $rc
}

skip() {  # stage reason
  echo "== $1: skipped: $2"
  note "$1" "skipped: $2" 0 -
}

HAVE_GPU=0
GPU_WHY="no nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    GPU_WHY="nvidia-smi -L lists no GPU"
  elif ! timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    GPU_WHY="torch.cuda.is_available() is False"
  else
    HAVE_GPU=1
  fi
fi
[[ ${GPU_CHECK_FORCE:-0} == 1 ]] && HAVE_GPU=1

# Does the built extension load next to the Python ops? Asked in a child process: a broken build
# can abort the process that loads it.
ext_loads() {
  timeout 120 "$PY" -c "import sys, pyimputmae._extension as e; sys.exit(0 if e.load() else 1)" >/dev/null 2>&1
}

stage_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   cpus: $(nproc)"
    echo "repo: $ROOT   commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "gpu check: $([[ $HAVE_GPU == 1 ]] && echo "GPU visible" || echo "no GPU ($GPU_WHY)")"
    if command -v nvidia-smi >/dev/null 2>&1; then timeout 60 nvidia-smi; else echo "nvidia-smi: not installed"; fi
    if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
    if command -v ncu >/dev/null 2>&1; then echo "ncu: $(ncu --version 2>&1 | tail -n 1)"; else echo "ncu: not on PATH"; fi
    timeout 120 "$PY" - <<'PYEOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "| built for CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, "| sm_%d%d" % (p.major, p.minor), "|", p.multi_processor_count, "SMs |",
              round(p.total_memory / 2**30, 1), "GiB")
except Exception as err:
    print("torch: import failed:", err)
for name in ("triton", "numpy", "pandas", "matplotlib", "pytest", "pytest_timeout", "zarr", "openslide",
             "SimpleITK", "lifelines"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: missing ({type(err).__name__})")
PYEOF
  } 2>&1 | tee "$OUT/env.txt"
}

stage_build() {
  local log="$OUT/stage1_build.log" t0 rc
  t0=$(date +%s)
  run_step build "${BUILD_TIMEOUT_S:-240}" "$log" \
    env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  rc=$?
  echo "build_seconds=$(($(date +%s) - t0)) exit=$rc" | tee "$OUT/build_time.txt"
  if ((rc != 0)); then
    # keep the package importable (and the Triton kernels mapped as pyimputmae.kernels)
    run_step build-python-only 120 "$log" \
      env PYIMPUTMAE_NO_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
  if [[ -f pyimputmae/__main__.py ]]; then
    run_step info 60 "$OUT/info.txt" "$PY" -m pyimputmae info
  fi
}

stage_test() {
  local files=() f
  for f in "${OP_TESTS[@]}"; do [[ -f $f ]] && files+=("$f"); done
  if ((${#files[@]} == 0)); then
    skip test "none of ${OP_TESTS[*]} exists yet"
    return
  fi
  # only the GPU cases (device "cuda" and the tests marked gpu): CI checks the CPU ones on every run.
  # -v: a run cut short by its timeout still names every test it finished in the log
  local args=(-v -rfE --maxfail=25 -m "gpu and not slow" -p no:cacheprovider --junitxml="$OUT/junit_ops.xml")
  "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && args+=(--timeout 120)
  local log="$OUT/stage1_test.log"
  if ext_loads; then
    # first: every CUDA code path once (seconds), so its verdict exists even if the suite overruns
    run_step kernel-check 120 "$OUT/stage1_kernel_check.log" "$PY" tools/cuda_kernel_check.py
    run_step test "${TEST_TIMEOUT_S:-180}" "$log" "$PY" -m pytest "${files[@]}" "${args[@]}" -k "not synthetic"
  else
    echo "the extension does not load: only the Triton tests, with PYIMPUTMAE_NO_EXT=1" | tee -a "$log"
    run_step test-triton-only "${TEST_TIMEOUT_S:-180}" "$log" \
      env PYIMPUTMAE_NO_EXT=1 "$PY" -m pytest "${files[@]}" "${args[@]}" -k "not synthetic and triton"
  fi
}

stage_sanitize() {
  local sanitizer tool
  sanitizer=$(command -v compute-sanitizer || true)
  [[ -z $sanitizer && -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/compute-sanitizer ]] && sanitizer=$CUDA_HOME/bin/compute-sanitizer
  [[ -z $sanitizer && -x /usr/local/cuda/bin/compute-sanitizer ]] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
  if [[ -z $sanitizer ]]; then
    skip sanitize "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return
  fi
  if ! ext_loads; then
    skip sanitize "the extension does not load"
    return
  fi
  for tool in memcheck racecheck synccheck; do
    run_step "sanitize-$tool" "${SANITIZE_TIMEOUT_S:-150}" "$OUT/stage4_sanitize_$tool.log" \
      "$sanitizer" --tool "$tool" --error-exitcode 9 "$PY" tools/cuda_kernel_check.py
  done
}

stage_bench() {
  run_step bench-large "${BENCH_LARGE_TIMEOUT_S:-180}" "$OUT/stage2_bench_large.log" \
    "$PY" tools/bench.py --device cuda --size large --quick --json "$OUT/bench_large.json"
  run_step bench-paper "${BENCH_PAPER_TIMEOUT_S:-150}" "$OUT/stage2_bench_paper.log" \
    "$PY" tools/bench.py --device cuda --size paper --quick --json "$OUT/bench_paper.json"
}

stage_e2e() {
  # ../shared does not travel to the GPU machine: the lead copies the anchor into shared/ in the repo
  local anchor="" cand
  for cand in ../shared/anchors/ref_step_bench.py shared/anchors/ref_step_bench.py; do
    if [[ -f $cand ]]; then anchor=$(cd "$(dirname "$cand")" && pwd)/$(basename "$cand"); break; fi
  done
  if [[ -f tools/e2e_step.py ]]; then
    local limit=${E2E_TIMEOUT_S:-360} left args=(--json "$OUT/e2e.json")
    left=$(remaining)
    ((limit > left)) && limit=$left
    # e2e_step.py keeps inside its own budget and runs the anchor itself, on the same card
    grep -q -- '"--budget-s"' tools/e2e_step.py && args+=(--budget-s "$((limit > 40 ? limit - 20 : 20))")
    [[ -n $anchor ]] && grep -q -- '"--ref"' tools/e2e_step.py && args+=(--ref "$anchor")
    run_step e2e "$limit" "$OUT/stage3_e2e.log" "$PY" tools/e2e_step.py "${args[@]}"
  else
    skip e2e "tools/e2e_step.py does not exist yet"
  fi
  # what each model keeps for backward: the part of the peak memory the model decides
  if [[ -n $anchor ]]; then
    run_step activations 90 "$OUT/stage3_activations.log" \
      "$PY" tools/saved_activations.py --device cuda --batch 96 --ref "$anchor" --top 10
  fi
  # ref_step.json: the anchor's result as e2e_step.py measured it, else a run of its own
  if [[ -f $OUT/e2e.json ]] && "$PY" - "$OUT/e2e.json" "$OUT/ref_step.json" <<'PYEOF'; then
import json, sys
ref = json.load(open(sys.argv[1])).get("reference") or {}
if not any(isinstance(v, dict) and "step_ms" in v for v in ref.values()):
    sys.exit(1)
json.dump(ref, open(sys.argv[2], "w"), indent=1)
PYEOF
    echo "== ref-step: taken from e2e.json (e2e_step.py ran the anchor in the same call)"
    note ref-step "ok (from e2e.json)" 0 ref_step.json
  elif [[ -n $anchor ]]; then
    run_step ref-step "${REF_STEP_TIMEOUT_S:-180}" "$OUT/stage3_ref_step.log" env OUT="$OUT" "$PY" "$anchor"
  else
    skip ref-step "no ../shared/anchors/ref_step_bench.py nor shared/anchors/ref_step_bench.py"
  fi
}

printf 'stage\tstatus\tseconds\tlog\n' >"$SUMMARY"
echo "gpu_check: stages ${STAGES[*]} -> $OUT (budget ${BUDGET}s)"
for stage in "${STAGES[@]}"; do
  case $stage in
    env) stage_env ;;
    build | test | bench | e2e | sanitize)
      if [[ $HAVE_GPU != 1 ]]; then
        skip "$stage" "no GPU ($GPU_WHY); GPU_CHECK_FORCE=1 runs it anyway"
      else
        "stage_$stage"
      fi
      ;;
    *) skip "$stage" "unknown stage (env build test bench e2e sanitize)" ;;
  esac
done

echo
echo "== gpu_check summary ($(($(date +%s) - START))s of ${BUDGET}s; files in $OUT)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
for f in "$OUT"/bench_*.json; do
  [[ -f $f ]] || continue
  "$PY" - "$f" <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"\n{sys.argv[1].rsplit('/', 1)[-1]}: {data['meta'].get('device')}, copy {data['meta'].get('copy_gbps', 0):.0f} GB/s")
for s in (r for r in data["records"] if r.get("summary")):
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"
    print(f"  {s['op']:22s} {s['pass']:8s} {s['dtype']:5s} best {str(s['best_backend']):10s} "
          f"vs eager {fmt(s.get('speedup_vs_eager'))}  vs compile {fmt(s.get('speedup_vs_compile'))}"
          + (f"  vs conv {fmt(s.get('speedup_vs_conv'))}" if "speedup_vs_conv" in s else ""))
PYEOF
done
if [[ -f $OUT/junit_ops.xml || -f $OUT/stage1_kernel_check.log ]]; then
  echo
  echo "== which (backend, family) pairs this run validated (tools/gpu_validated.py)"
  "$PY" tools/gpu_validated.py "$OUT" | tee "$OUT/validated.txt"
fi
# 1 when a stage failed or ran out of time (the others still ran and left their files)
! cut -f2 "$SUMMARY" | grep -q -e '^FAIL' -e '^TIMEOUT'
