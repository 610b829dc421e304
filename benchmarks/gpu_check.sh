#!/usr/bin/env bash
# The GPU check: build fastlstm with its CUDA kernels, run the CUDA tests, then the GPU benchmark
# grid, on one CUDA GPU in about 8 minutes. Every stage has its own time limit and its failure is
# recorded while the script goes on, so a broken build still leaves the baselines measured and a
# slow stage still leaves time for the later ones. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh                 # results under benchmarks/results/gpu-<time>/
#     OUT=/some/dir bash benchmarks/gpu_check.sh   # results under /some/dir
#
# Needs python3 with torch (CUDA build), Triton, nvcc, ninja and pytest; installs nothing from the
# network (pip install --no-build-isolation --no-deps). Writes at most 8 files, all in $OUT:
#   env.txt      GPU, driver, versions        build.log   the build (with ptxas's report)
#   tests.log    the CUDA-marked tests          bench.log   progress and tables of every bench stage
#   gpu.jsonl    every record (fastlstm.bench schema; redraw with `fastlstm bench --from`)
#   fastrnns.txt the fastrnns-convention table  summary.txt each stage's exit code and seconds
# and prints a short table last. Set FASTLSTM_GIT_COMMIT to name the commit measured when the
# tree has no .git. Stage limits (seconds) can be scaled with GPU_CHECK_SCALE (default 1); the
# probes between stages have fixed limits of their own. The tests run with -v, so a stage cut off
# by its limit still names every test that finished; with pytest-xdist they run in 4 processes
# (Triton and torch.compile compile on the CPU), and with pytest-timeout a hung test is ended
# (its xdist worker is replaced and the others go on).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SCALE=${GPU_CHECK_SCALE:-1}
RESULTS=$OUT/gpu.jsonl
SUMMARY=$OUT/summary.txt
BENCH_LOG=$OUT/bench.log
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET  # real Triton kernels on the GPU, never the interpreter
if [ -z "${FASTLSTM_GIT_COMMIT:-}" ]; then
  FASTLSTM_GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "")
  [ -n "$FASTLSTM_GIT_COMMIT" ] && export FASTLSTM_GIT_COMMIT || unset FASTLSTM_GIT_COMMIT
fi
: >"$SUMMARY"
CHECK_START=$(date +%s)

# stage NAME LIMIT_SECONDS LOGFILE COMMAND...: run with a time limit, log, record rc and time.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
  local start end rc
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  echo "[gpu_check] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  end=$(date +%s)
  local verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timed out (partial results kept)"
  elif [ "$rc" -ne 0 ]; then verdict="failed"; fi
  printf '%-18s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((end - start))" "$verdict" | tee -a "$SUMMARY"
  return 0
}

bench() {  # bench NAME LIMIT ARGS...: one fastlstm bench run appending to gpu.jsonl
  # Timing gets 60% of the stage's limit (--budget: fewer rounds per shape rather than shapes
  # left out); the rest is for building the workloads (Triton compiles, cuDNN plans).
  local name=$1 limit=$2 budget
  shift 2
  budget=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s * 0.6 }')
  stage "$name" "$limit" "$BENCH_LOG" "$PY" -m fastlstm.bench --device cuda --out "$RESULTS" \
    --budget "$budget" "$@"
}

# 1. What machine this is.
{
  date -u
  timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi failed"
  timeout 120 "$PY" - <<'PYEOF' 2>&1
import importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sms", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
    print("cudnn", torch.backends.cudnn.version())
for name in ("triton", "pytest", "ninja"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "missing")
PYEOF
  timeout 30 nvcc --version 2>&1 | tail -2
} >"$OUT/env.txt" 2>&1
if ! timeout 120 "$PY" -c \
    'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "torch sees no CUDA GPU: nothing to check here" | tee -a "$SUMMARY"
  exit 1
fi

# 2. Build fastlstm._C with the CUDA kernels for sm_90 (fails loudly if it cannot).
stage build 180 "$OUT/build.log" env FASTLSTM_BUILD_CUDA=1 FASTLSTM_CUDA_ARCHS=9.0 MAX_JOBS=16 \
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
timeout 120 "$PY" -c \
  'import fastlstm; print("backends on cuda:", fastlstm.available_backends("cuda"))' \
  >>"$OUT/build.log" 2>&1

# 3. The CUDA-marked tests (about 150, many of them compiling Triton kernels or torch.compile
# graphs on first use).
PYTEST_EXTRA=()
if timeout 60 "$PY" -c 'import xdist' >/dev/null 2>&1; then PYTEST_EXTRA+=(-n 4); fi
if timeout 60 "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
  PYTEST_EXTRA+=(--timeout=100 --timeout-method=thread)
fi
stage tests 150 "$OUT/tests.log" "$PY" -m pytest -m cuda tests -v -p no:cacheprovider \
  --continue-on-collection-errors --durations=15 ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"}

# 4. Benchmarks, most important first. Training: headline shapes (FlashRNN's B=16 T=1024 H=768
# and the small-batch shapes) in bf16, also against fp16 cuDNN, then the grid in bf16 and fp32.
bench train-headline 45 --suites train --dtype bfloat16 --shapes train=gpu-headline \
  --backends cuda,triton --repeats 7
bench train-headline-fp16 15 --suites train --dtype bfloat16 --baseline-dtype float16 \
  --shapes train=16x1024x768x768x1 --backends cuda,triton --repeats 7
bench sample 20 --suites sample --dtype bfloat16 --backends cuda,triton --repeats 10
bench decode 25 --suites decode --dtype float32 --backends cuda,triton --repeats 5
bench decode-bf16 15 --suites decode --dtype bfloat16 --backends cuda --repeats 5 \
  --shapes decode=65x64x1024x2
bench train-grid-bf16 30 --suites train --dtype bfloat16 --shapes train=gpu-grid \
  --backends cuda,triton --repeats 5 --warmup 2
bench train-grid-fp32 25 --suites train --dtype float32 --shapes train=gpu-grid \
  --backends cuda,triton --repeats 5 --warmup 2
stage fastrnns 15 "$OUT/fastrnns.txt" "$PY" benchmarks/fastrnns.py --device cuda \
  --rnns cudnn fastlstm-cuda fastlstm-triton --nloops 30 --warmup 5 --out "$RESULTS" --no-progress

# 5. Short table last.
echo "total $(( $(date +%s) - CHECK_START ))s" | tee -a "$SUMMARY"
echo
cat "$SUMMARY"
echo
if [ -s "$RESULTS" ]; then
  timeout 120 "$PY" -m fastlstm.bench --from "$RESULTS" --brief 2>&1 | tee -a "$SUMMARY"
else
  echo "no benchmark records were written" | tee -a "$SUMMARY"
fi
exit 0
