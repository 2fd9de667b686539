#!/usr/bin/env bash
# Checks for a fresh GPU machine (H100/H200; torch, triton, nvcc, ncu there; no network).
#
#   tools/gpu_check.sh OUTDIR [stages...]        default stages: env build test bench e2e sweep train test16 paper
#                                               (other: sanitize)
#
#   env    nvidia-smi, python/torch/triton/nvcc versions              -> OUTDIR/env.txt
#   build  pip install --no-build-isolation --no-deps -e .            -> stage1_build.log, build_time.txt, info.txt
#          (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0); on failure a pure-Python install (PYIMPUTMAE_NO_EXT=1)
#          so that the Triton backend can still be tested and timed. When the checkout carries a build
#          made for this machine's torch (tools/prebuilt_ext.py build; PREBUILT_DIR, default
#          build/prebuilt) that fits (same torch, the sources as they are now, sm_90) and loads, a
#          pure-Python install and that build instead of compiling (14–18 s in dry runs on the CPU).
#          While it compiles (CPU work; the GPU is idle), the torch.compile graphs that later stages
#          time are compiled once in the background to fill Inductor's on-disk cache: the anchor's
#          "compile bf16" mode (it once took over 200 s cold on an H200) and bench.py's compile
#          baselines at size large (warm_*.log).
#          The later stages then find them compiled. The stage that times anything waits for them.
#   test   tools/cuda_kernel_check.py: every CUDA code path once     -> stage1_kernel_check.log
#          then the op tests' GPU cases, -m "gpu and not slow", but   -> stage1_test.log, junit_ops.xml
#          the float16 ones (pytest-xdist, 8 processes, when it is installed) and the pairs they validated
#          (tools/gpu_validated.py)                                 -> validated.txt
#          (only the Triton cases, with PYIMPUTMAE_NO_EXT=1, when the extension does not load)
#   bench  tools/bench.py --device cuda --size large --quick          -> bench_large.json
#          then tools/op_overhead.py (host time per op call), ext and triton -> stage2_op_overhead.log
#   e2e    tools/e2e_step.py (pre-training step) and the plain-PyTorch anchor
#          ref_step_bench.py                                         -> e2e.json, ref_step.json
#          (the anchor is looked for in ../shared/anchors, then shared/anchors in the repo; e2e_step.py
#          runs it in the same call and ref_step.json is taken from e2e.json, else it runs on its own)
#          (our modes: E2E_MODES, default eager,graph,graph-mlp1024,train-graph,graph-torchln
#          (like-for-like: the anchor's decoder MLP; train-graph: train(cuda_graph=True)'s step, the
#          library's GraphedStep; graph-torchln: graph with layer_norm=reference, what the Triton
#          LayerNorm saves; the last three after the anchor, in that order, with what is left); add compile for torch.compile of our model (it runs last),
#          with PYIMPUTMAE_BACKEND set to the fastest backend per op family among those the test
#          stage validated (tools/gpu_validated.py); with what is left, tools/saved_activations.py
#          on the same backends                                      -> stage3_activations.log
#          (builds the extension first when the machine has none built from these sources: a second
#          call on a fresh machine)
#   train  tests/test_device_train.py on CUDA: train() with the cohort on the GPU and streamed to it,
#          checkpoint, resume, save, load onto the CPU and back, predict, impute, evaluate, with the
#          backends the test stage validated (builds the extension first, as e2e does)
#                                                                    -> stage3_train.log, junit_train.xml
#   test16 the float16 GPU cases of the op tests: they decide GPU_VALIDATED_FP16 (bf16 is what training
#          runs on an H100/H200, so its cases come first; fp16, the choice of amp="auto" on older GPUs,
#          gets the time the timed stages leave)                   -> stage1_test_fp16.log, junit_ops_fp16.xml
#   sweep  tools/patch_embed_sweep.py: the Triton patch-embedding forward and grad_weight under a
#          few tile configurations each, large size, bf16            -> patch_embed_sweep.json
#   paper  tools/bench.py --device cuda --size paper --quick          -> bench_paper.json
#   sanitize  tools/cuda_kernel_check.py under compute-sanitizer memcheck, racecheck and synccheck
#          (~1 minute each)                                          -> stage4_sanitize_<tool>.log
#
# Before the stages, when the checkout carries build/triton_cache.tar.gz (TRITON_CACHE_SEED; made by
# tools/triton_compile_check.py --cache-tar: the Triton kernels at bench large's and paper's shapes and
# the sweep's tiles, compiled for sm_90 elsewhere) made with this machine's triton from these kernel sources, its
# entries go into Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache): a launch whose cache key
# matches loads the cubin instead of compiling. The cache's size before each stage and at the end
# -> triton_cache.txt
#
# Every stage runs under its own timeout, clamped to what is left of GPU_CHECK_BUDGET_S, and its
# files are bundled as it finishes, so a stage that overruns leaves the others' results. The files
# named above are inside OUTDIR/gpu_check.tar.gz (the device tool returns at most 8 files); copies
# of summary.tsv, validated.txt, targets.md (issue 6's targets judged from this run's bench_large.json
# and e2e.json by tools/gpu_targets.py), bench_large.json, e2e.json and patch_embed_sweep.json lie beside it.
# A stage runs even when the one before it failed. OUTDIR/summary.tsv: stage, status, seconds, log.
#
# Knobs (environment): PYTHON (python3), GPU_CHECK_BUDGET_S (580: the whole script), TRITON_CACHE_SEED
# (build/triton_cache.tar.gz), BUILD_TIMEOUT_S
# (240), PREBUILT_DIR (build/prebuilt), GPU_CHECK_PREBUILT=0 (compile even when a carried build
# fits), TEST_TIMEOUT_S (120), TEST16_TIMEOUT_S (90), TEST_WORKERS (8), BENCH_LARGE_TIMEOUT_S (150),
# E2E_TIMEOUT_S (240), E2E_MODES, TRAIN_TIMEOUT_S (150), SWEEP_TIMEOUT_S (90), BENCH_PAPER_TIMEOUT_S
# (120), REF_STEP_TIMEOUT_S (180), SANITIZE_TIMEOUT_S (150 per tool), GPU_CHECK_WARM=0 (no
# background compilation), WARM_WAIT_S (60, or 120 after a carried build: how long a timed stage
# waits for an unfinished warm-up before stopping it), GPU_CHECK_FORCE=1 (run the GPU stages without a
# visible GPU), GPU_CHECK_KEEP_WORK=1 (keep the unbundled work folder in $TMPDIR), GPU_CHECK_COMMIT
# (the commit measured, recorded where the checkout is no git repository).

set -u
set -o pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
mkdir -p "$1" || exit 2
# The device tool brings back at most 8 files from its $OUT: every stage writes into a work folder,
# and after each stage bundle() puts all of it into OUTDIR/gpu_check.tar.gz, beside copies of the
# few files read first (KEY_FILES). So OUTDIR never holds more than 1 + ${#KEY_FILES[@]} files.
FINAL=$(cd "$1" && pwd)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
KEY_FILES=(summary.tsv validated.txt targets.md bench_large.json e2e.json patch_embed_sweep.json)
shift
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env build test bench e2e sweep train test16 paper)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
PREBUILT=${PREBUILT_DIR:-build/prebuilt}
PREBUILT_USED=0
# The commit measured, for every record of the run (env.txt, bench.py's meta): the checkout's own when
# it is a git repository, else GPU_CHECK_COMMIT as the caller gives it (the device tool's copy of the
# working tree may come without .git, so the plan's command names it)
if [[ $(git -C "$ROOT" rev-parse --show-toplevel 2>/dev/null) == "$(pwd -P)" ]] \
    && git_head=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
  [[ -n ${GPU_CHECK_COMMIT:-} && $GPU_CHECK_COMMIT != "$git_head" ]] && \
    echo "gpu_check: GPU_CHECK_COMMIT=$GPU_CHECK_COMMIT but the checkout is at $git_head: recording the checkout's"
  GPU_CHECK_COMMIT=$git_head COMMIT_FROM=git
elif [[ -n ${GPU_CHECK_COMMIT:-} ]]; then
  COMMIT_FROM="GPU_CHECK_COMMIT; no git repository here"
else
  COMMIT_FROM="no git repository here and GPU_CHECK_COMMIT unset"
fi
export GPU_CHECK_COMMIT
command -v "$PY" >/dev/null || PY=python
BUDGET=${GPU_CHECK_BUDGET_S:-580}
START=$(date +%s)
SUMMARY="$OUT/summary.tsv"
export PYTHONUNBUFFERED=1 OUT ROOT PY

OP_TESTS=(tests/test_patch_embed.py tests/test_masking.py tests/test_masked_mse.py tests/test_philox.py
          tests/test_layer_norm.py tests/test_compile.py)

remaining() { echo $((BUDGET - ($(date +%s) - START))); }
KILL_GRACE=10  # seconds between a step's TERM and KILL

bundle() {  # OUTDIR/gpu_check.tar.gz: everything written so far (written aside, then moved in)
  local f rc tmp="$OUT.tar.gz"
  for f in "${KEY_FILES[@]}"; do [[ -f $OUT/$f ]] && cp "$OUT/$f" "$FINAL/$f"; done
  tar -czf "$tmp" -C "$OUT" . 2>/dev/null
  rc=$?
  # GNU tar exits 1 when a file changed while it read it (a background warm-up appending to its log,
  # or its note in summary.tsv): the archive is whole all the same
  ((rc <= 1)) && mv -f "$tmp" "$FINAL/gpu_check.tar.gz"
}

note() {  # stage status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
}

# run_step NAME LIMIT_S LOG COMMAND...: COMMAND under `timeout` (clamped to the budget left), its
# output shown and appended to LOG; the outcome goes to summary.tsv. Returns COMMAND's status.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left
  left=$(($(remaining) - KILL_GRACE - 2))  # `timeout -k` may take KILL_GRACE more after the limit
  if ((left < 15)); then
    echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$log"
    note "$name" "skipped (budget spent)" 0 "$(basename "$log")"
    return 125
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  local t0 rc status took
  t0=$(date +%s)
  timeout -k "$KILL_GRACE" "$limit" "$@" 2>&1 | tee -a "$log"
  rc=$?
  took=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124) status="TIMEOUT after ${limit}s" ;;
    137) if ((took >= limit)); then status="TIMEOUT after ${limit}s"; else status="KILLED (exit 137: out of memory?)"; fi ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  note "$name" "$status" "$took" "$(basename "$log")"
  echo "== $name: $status" | tee -a "$log"
  bundle
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

# Does the built extension load next to the Python ops (and, given, does the Python condition COND
# on it, `e`, hold)? Asked in a child process: a broken build can abort the process that loads it.
ext_loads() {  # ext_loads [COND]
  local limit=$(($(remaining) - KILL_GRACE))
  ((limit > 120)) && limit=120
  ((limit < 5)) && return 1
  timeout -k 5 "$limit" "$PY" -c "import sys, pyimputmae._extension as e; sys.exit(0 if e.load() ${1:+and $1 }else 1)" \
    >/dev/null 2>&1
}
# ... and was built from this checkout's sources as they are (a warm machine keeps the git-ignored
# _C of an earlier call; the checkout sent since may hold other sources)
ext_current() { ext_loads "e.out_of_date() is None"; }

# the anchor script: ../shared does not travel to the GPU machine, so the lead copies it into shared/
find_anchor() {
  local cand
  for cand in ../shared/anchors/ref_step_bench.py shared/anchors/ref_step_bench.py; do
    if [[ -f $cand ]]; then echo "$(cd "$(dirname "$cand")" && pwd)/$(basename "$cand")"; return; fi
  done
}

wants() {  # wants STAGE: is STAGE among this run's stages?
  local s
  for s in "${STAGES[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

# Background compilation into Inductor's on-disk cache (FX graph + AOTAutograd caches, on by default),
# so that a timed stage's torch.compile finds its graphs compiled. Each warm-up is a real run of the
# same code on the same shapes (the cache keys are the graphs, shapes and versions), with few compile
# workers so the foreground keeps the cores it needs. Timed stages call wait_warmups first.
WARM_PIDS=()
start_warmup() {  # start_warmup NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ ${GPU_CHECK_WARM:-1} == 1 ]] || return 0
  echo "== warm-up $name (background, timeout ${limit}s): $*" | tee -a "$OUT/warm_$name.log"
  (
    t0=$(date +%s)
    TORCHINDUCTOR_COMPILE_THREADS=4 timeout -k "$KILL_GRACE" "$limit" "$@" >>"$OUT/warm_$name.log" 2>&1
    rc=$?
    note "warm-$name" "$([[ $rc == 0 ]] && echo ok || echo "exit $rc")" "$(($(date +%s) - t0))" "warm_$name.log"
  ) &
  WARM_PIDS+=($!)
}

warmups_running() {  # is any warm-up still running?
  local pid
  for pid in "${WARM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

stop_warmups() {  # TERM to each warm-up's `timeout` (it passes TERM on to its command), then KILL
  local pid child pgid _
  ((${#WARM_PIDS[@]})) || return 0
  for pid in "${WARM_PIDS[@]}"; do pkill -TERM -P "$pid" 2>/dev/null; done
  for _ in 1 2 3 4 5 6; do
    warmups_running || return 0
    sleep 1
  done
  # still there: KILL each warm-up's process group (`timeout` leads one, with its command in it)
  for pid in "${WARM_PIDS[@]}"; do
    for child in $(pgrep -P "$pid"); do
      pgid=$(ps -o pgid= -p "$child" | tr -d ' ')
      [[ -n $pgid ]] && kill -KILL -- "-$pgid" 2>/dev/null
    done
  done
}

wait_warmups() {  # before a timed stage: the warm-ups must not share the GPU and CPUs with it
  ((${#WARM_PIDS[@]})) || return 0
  # one deadline for all of them: at most WARM_WAIT_S, and never into the last minute of the budget.
  # With the carried build the warm-ups started a compile's time later (they used to overlap it):
  # a longer default wait gives them back about that head start before the timed stages.
  local cap=${WARM_WAIT_S:-$((PREBUILT_USED ? 120 : 60))}
  local wait_s=$(($(remaining) - 60)) pid deadline
  ((wait_s > cap)) && wait_s=$cap
  deadline=$(($(date +%s) + wait_s))
  while warmups_running && (($(date +%s) < deadline)); do sleep 1; done
  warmups_running && echo "== a warm-up is still running: stopped (its stage compiles what is missing)"
  stop_warmups
  for pid in "${WARM_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  WARM_PIDS=()
}

stage_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   cpus: $(nproc)"
    echo "repo: $ROOT   commit: ${GPU_CHECK_COMMIT:-unknown} ($COMMIT_FROM)"
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
for name in ("triton", "numpy", "pandas", "matplotlib", "pytest", "pytest_timeout", "xdist", "ninja", "zarr",
             "openslide", "SimpleITK", "lifelines"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: missing ({type(err).__name__})")
PYEOF
  } 2>&1 | tee "$OUT/env.txt"
}

# A build made on the development machine for this machine's torch and carried with the checkout
# (tools/prebuilt_ext.py; the device tool's carry: build/prebuilt): used when it fits (the same
# torch, the sources of this checkout as they are, machine code for this GPU) and loads; else the
# build stage compiles as usual. Saves the GPU the time of that compile (never timed there).
python_only_install() {  # python_only_install LOG: the package without the extension, editable
  run_step build-python-only 120 "$1" \
    env PYIMPUTMAE_NO_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
}

install_prebuilt() {  # install_prebuilt LOG: 0 when the carried build is installed and loads
  local log=$1
  [[ ${GPU_CHECK_PREBUILT:-1} == 1 && -f $PREBUILT/_C.abi3.so ]] || return 1
  # not a run_step: a carried build that does not fit is no failure of the check, only a compile
  if ! timeout -k 5 60 "$PY" tools/prebuilt_ext.py check --dir "$PREBUILT" 2>&1 | tee -a "$log"; then
    note prebuilt "not used (see log)" 0 "$(basename "$log")"
    return 1
  fi
  # a pure-Python editable install (the package and pyimputmae.kernels importable), then the build
  # copied in after it: the install writes a build record of its own, which the copy replaces
  python_only_install "$log" || return 1
  run_step prebuilt-install 60 "$log" "$PY" tools/prebuilt_ext.py install --dir "$PREBUILT" || return 1
  if ext_loads; then
    echo "== the carried build loads: not compiling" | tee -a "$log"
    return 0
  fi
  echo "== the carried build does not load here: removed, compiling from source" | tee -a "$log"
  note prebuilt "installed, does not load: compiling" 0 "$(basename "$log")"
  rm -f pyimputmae/_C.abi3.so pyimputmae/_build_config.json
  return 1
}

start_warmups() {  # the background compiles that the stages after the build time
  local anchor
  anchor=$(find_anchor)
  if wants e2e && [[ -n $anchor ]]; then
    mkdir -p "$OUT/anchor_warm"
    start_warmup anchor 300 env ANCHOR_MODES="compile bf16" OUT="$OUT/anchor_warm" "$PY" "$anchor"
  fi
  if wants bench; then
    start_warmup bench-compile 300 "$PY" tools/bench.py --device cuda --size large --quick \
      --backends reference --baselines compile --no-check
  fi
}

stage_build() {
  local log="$OUT/stage1_build.log" t0 rc=0
  t0=$(date +%s)
  if install_prebuilt "$log"; then
    echo "build_seconds=$(($(date +%s) - t0)) exit=0 prebuilt=$PREBUILT" | tee "$OUT/build_time.txt"
    PREBUILT_USED=1
    # no compile for the warm-ups to overlap: they overlap the test stage (it times nothing); without
    # one the next timed stage would only wait for them and stop them unfinished
    wants test && start_warmups
  else
    start_warmups
    run_step build "${BUILD_TIMEOUT_S:-240}" "$log" \
      env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    rc=$?
    echo "build_seconds=$(($(date +%s) - t0)) exit=$rc" | tee "$OUT/build_time.txt"
  fi
  if ((rc != 0)); then
    # keep the package importable (and the Triton kernels mapped as pyimputmae.kernels)
    python_only_install "$log"
  fi
  if [[ -f pyimputmae/__main__.py ]]; then
    run_step info 60 "$OUT/info.txt" "$PY" -m pyimputmae info
  fi
}

# the op tests' GPU cases: test_args JUNIT_FILE → the pytest arguments in TEST_ARGS
test_files() {
  TEST_FILES=()
  local f
  for f in "${OP_TESTS[@]}"; do [[ -f $f ]] && TEST_FILES+=("$f"); done
  ((${#TEST_FILES[@]}))
}
test_args() {
  # only the GPU cases (device "cuda" and the tests marked gpu): CI checks the CPU ones on every run.
  # -v: a run cut short by its timeout still names every test it finished in the log. No --maxfail:
  # the stage's timeout bounds it, and a stop after N failures of one (backend, family) pair would
  # leave every other pair of this rare run without a verdict
  TEST_ARGS=(-v -rfE --tb=short -m "gpu and not slow" -p no:cacheprovider --junitxml="$1")
  "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && TEST_ARGS+=(--timeout 120)
  # several processes share the GPU: the cases are small, the time goes to Triton's JIT and Python
  "$PY" -c "import xdist" >/dev/null 2>&1 && ((${TEST_WORKERS:-8} > 1)) && TEST_ARGS+=(-n "${TEST_WORKERS:-8}")
  return 0
}

# the float16 cases run in their own later stage (test16), which decides GPU_VALIDATED_FP16: the
# dtypes an H100/H200 trains in (bf16, fp32) are validated first, fp16 with the time left
stage_test() {
  if ! test_files; then
    skip test "none of ${OP_TESTS[*]} exists yet"
    return
  fi
  test_args "$OUT/junit_ops.xml"
  local log="$OUT/stage1_test.log"
  if ext_loads; then
    # first: every CUDA code path once (seconds), so its verdict exists even if the suite overruns
    run_step kernel-check 120 "$OUT/stage1_kernel_check.log" "$PY" tools/cuda_kernel_check.py
    run_step test "${TEST_TIMEOUT_S:-120}" "$log" "$PY" -m pytest "${TEST_FILES[@]}" "${TEST_ARGS[@]}" \
      -k "not synthetic and not fp16"
  else
    echo "the extension does not load: only the Triton tests, with PYIMPUTMAE_NO_EXT=1" | tee -a "$log"
    run_step test-triton-only "${TEST_TIMEOUT_S:-120}" "$log" \
      env PYIMPUTMAE_NO_EXT=1 "$PY" -m pytest "${TEST_FILES[@]}" "${TEST_ARGS[@]}" -k "not synthetic and triton and not fp16"
  fi
}
stage_test16() {
  if ! test_files; then
    skip test16 "none of ${OP_TESTS[*]} exists yet"
    return
  fi
  test_args "$OUT/junit_ops_fp16.xml"
  local log="$OUT/stage1_test_fp16.log" extra=()
  ext_loads || extra=(env PYIMPUTMAE_NO_EXT=1)
  run_step test16 "${TEST16_TIMEOUT_S:-90}" "$log" "${extra[@]}" "$PY" -m pytest "${TEST_FILES[@]}" "${TEST_ARGS[@]}" \
    -k "not synthetic and fp16$([[ ${#extra[@]} -gt 0 ]] && echo ' and triton')"
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
  wait_warmups
  run_step bench-large "${BENCH_LARGE_TIMEOUT_S:-150}" "$OUT/stage2_bench_large.log" \
    "$PY" tools/bench.py --device cuda --size large --quick --json "$OUT/bench_large.json"
  # host time per op call (tiny tensors): what a bench figure is made of when it is not the kernels
  local backend
  for backend in ext triton; do
    run_step "overhead-$backend" 30 "$OUT/stage2_op_overhead.log" \
      env PYIMPUTMAE_GPU_UNVALIDATED=1 "$PY" tools/op_overhead.py --device cuda --backend "$backend" --rounds 5
  done
}

stage_sweep() {
  wait_warmups
  run_step sweep "${SWEEP_TIMEOUT_S:-90}" "$OUT/stage2_sweep.log" \
    "$PY" tools/patch_embed_sweep.py --json "$OUT/patch_embed_sweep.json"
}

stage_paper() {
  wait_warmups
  run_step bench-paper "${BENCH_PAPER_TIMEOUT_S:-120}" "$OUT/stage2_bench_paper.log" \
    "$PY" tools/bench.py --device cuda --size paper --quick --json "$OUT/bench_paper.json"
}

# A stage of a call on a fresh machine (the build stage ran in an earlier call), or on a warm one
# whose extension predates the sources sent since: build first
ensure_current_build() {
  wants build || ext_current || stage_build
}

# The backends this run validated and found fastest (tools/gpu_validated.py's PYIMPUTMAE_BACKEND
# value), when it tested any; empty otherwise (the automatic choice)
validated_backends() {
  [[ -f $OUT/junit_ops.xml || -f $OUT/stage1_test.log ]] || return 0
  "$PY" tools/gpu_validated.py "$OUT" 2>/dev/null | grep '^PYIMPUTMAE_BACKEND=' | cut -d= -f2-
}

stage_e2e() {
  local anchor
  anchor=$(find_anchor)
  ensure_current_build
  wait_warmups
  local choice
  choice=$(validated_backends)
  echo "== e2e: backends from this run's validation: ${choice:-none, the automatic choice}"
  if [[ -f tools/e2e_step.py ]]; then
    # our modes: eager, the whole step in a CUDA graph (the fast one), that with the anchor's decoder
    # MLP (like for like), train(cuda_graph=True)'s captured step, and the graph with PyTorch's LayerNorm
    # in the pre-norm sublayers (what the validated Triton one saves); torch.compile of our model
    # (E2E_MODES=eager,graph,compile) is left out by default to leave the budget to the later stages
    local limit=${E2E_TIMEOUT_S:-240} left
    local args=(--json "$OUT/e2e.json" --modes "${E2E_MODES:-eager,graph,graph-mlp1024,train-graph,graph-torchln}")
    left=$(remaining)
    ((limit > left)) && limit=$left
    # e2e_step.py runs the anchor itself, on the same card, and ends inside its own budget, before
    # the step's timeout would stop it
    grep -q -- '"--budget-s"' tools/e2e_step.py && args+=(--budget-s "$((limit > 40 ? limit - 20 : limit / 2))")
    [[ -n $anchor ]] && grep -q -- '"--ref"' tools/e2e_step.py && args+=(--ref "$anchor")
    run_step e2e "$limit" "$OUT/stage3_e2e.log" env ${choice:+PYIMPUTMAE_BACKEND="$choice"} \
      "$PY" tools/e2e_step.py "${args[@]}"
  else
    skip e2e "tools/e2e_step.py does not exist yet"
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
  # what each model keeps for backward: the part of the peak memory the model decides
  if [[ -n $anchor ]]; then
    run_step activations 60 "$OUT/stage3_activations.log" env ${choice:+PYIMPUTMAE_BACKEND="$choice"} \
      "$PY" tools/saved_activations.py --device cuda --batch 96 --ref "$anchor" --top 10
  fi
}

# the user's path on the GPU: train() with the cohort on the device and streamed to it, checkpoint,
# resume, save, load onto the CPU and back, predict, impute, evaluate (tests/test_device_train.py,
# its CUDA case), with the backends this run validated, like e2e
stage_train() {
  if [[ ! -f tests/test_device_train.py ]]; then
    skip train "tests/test_device_train.py does not exist"
    return
  fi
  ensure_current_build
  local choice args=(-v -rfE --tb=short -m gpu -p no:cacheprovider --junitxml="$OUT/junit_train.xml")
  choice=$(validated_backends)
  echo "== train: backends ${choice:-chosen automatically (PYIMPUTMAE_BACKEND unset)}"
  run_step train "${TRAIN_TIMEOUT_S:-150}" "$OUT/stage3_train.log" env ${choice:+PYIMPUTMAE_BACKEND="$choice"} \
    "$PY" -m pytest tests/test_device_train.py "${args[@]}"
}

# Triton's on-disk cache, seeded from a carried tar.gz of kernels compiled elsewhere (see the header)
TRITON_SEED=${TRITON_CACHE_SEED:-build/triton_cache.tar.gz}
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
triton_cache_entries() {
  find "$TRITON_CACHE" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l
}
seed_triton_cache() {
  [[ -f $TRITON_SEED ]] || return 0
  local log="$OUT/triton_cache.txt" t0 made have before
  t0=$(date +%s)
  # manifest → "triton-version kernels-digest"; the same two of this machine and checkout
  made=$(tar -xzOf "$TRITON_SEED" ./manifest.json 2>/dev/null \
    | "$PY" -c 'import json, sys; m = json.load(sys.stdin); print(m["triton"], m["kernels_sha256"])' 2>/dev/null)
  # (triton_compile_check.kernels_digest's scheme)
  have="$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null | tail -1) $(cd kernels \
    && sha256sum $(ls -- *.py | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)"
  if [[ -z $made || $made != "$have" ]]; then
    echo "$TRITON_SEED: made with triton and kernels '${made:-unreadable}', here '${have:-no triton}': not used" \
      | tee -a "$log"
    note triton-cache "not used (another triton or other kernel sources)" $(($(date +%s) - t0)) triton_cache.txt
    return 0
  fi
  mkdir -p "$TRITON_CACHE" && before=$(triton_cache_entries)
  if tar -xzf "$TRITON_SEED" -C "$TRITON_CACHE" --skip-old-files --exclude ./manifest.json 2>>"$log"; then
    local after
    after=$(triton_cache_entries)
    echo "seeded $TRITON_CACHE from $TRITON_SEED (triton ${have%% *}): $before entries before, $after after" \
      | tee -a "$log"
    # (new entries: on a machine that already holds some, e.g. a second dry run, fewer than the tarball's)
    note triton-cache "seeded $((after - before)) new entries ($after in the cache)" $(($(date +%s) - t0)) \
      triton_cache.txt
  else
    note triton-cache "FAILED to unpack (see log)" $(($(date +%s) - t0)) triton_cache.txt
  fi
}

printf 'stage\tstatus\tseconds\tlog\n' >"$SUMMARY"
# killed from outside (the device call's own limit): stop the background warm-ups, keep what was written
trap 'stop_warmups; bundle; exit 143' TERM INT
echo "gpu_check: stages ${STAGES[*]} -> $OUT (budget ${BUDGET}s)"
seed_triton_cache
for stage in "${STAGES[@]}"; do
  [[ -f $TRITON_SEED ]] && echo "before $stage: $(triton_cache_entries) entries in $TRITON_CACHE" >>"$OUT/triton_cache.txt"
  case $stage in
    env) stage_env ;;
    build | test | test16 | bench | e2e | train | sweep | paper | sanitize)
      if [[ $HAVE_GPU != 1 ]]; then
        skip "$stage" "no GPU ($GPU_WHY); GPU_CHECK_FORCE=1 runs it anyway"
      else
        "stage_$stage"
      fi
      ;;
    *) skip "$stage" "unknown stage (env build test bench e2e sweep train test16 paper sanitize)" ;;
  esac
done

wait_warmups
[[ -f $TRITON_SEED ]] && echo "at the end: $(triton_cache_entries) entries in $TRITON_CACHE" >>"$OUT/triton_cache.txt"
echo
echo "== gpu_check summary ($(($(date +%s) - START))s of ${BUDGET}s)"
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
if compgen -G "$OUT/junit_ops*.xml" >/dev/null || compgen -G "$OUT/stage1_test*.log" >/dev/null ||
  [[ -f $OUT/stage1_kernel_check.log ]]; then
  echo
  echo "== which (backend, family) pairs this run validated (tools/gpu_validated.py)"
  "$PY" tools/gpu_validated.py "$OUT" | tee "$OUT/validated.txt"
fi
if [[ -f $OUT/bench_large.json || -f $OUT/e2e.json ]]; then
  echo
  echo "== issue 6's targets, judged from this run (tools/gpu_targets.py)"
  "$PY" tools/gpu_targets.py "$OUT" --json "$OUT/targets.json" | tee "$OUT/targets.md"
fi
bundle
echo "== files: $FINAL/gpu_check.tar.gz (everything; tar -xzf it) and $(cd "$FINAL" && ls | grep -v '^gpu_check.tar.gz$' | tr '\n' ' ')"
STATUS_LINES=$(cut -f2 "$SUMMARY")
[[ ${GPU_CHECK_KEEP_WORK:-0} == 1 ]] || rm -rf "$OUT"  # all of it is in the bundle
# 1 when a stage failed or ran out of time (the others still ran and left their files)
! grep -q -e '^FAIL' -e '^TIMEOUT' -e '^KILLED' <<<"$STATUS_LINES"
