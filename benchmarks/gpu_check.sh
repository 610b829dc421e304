#!/usr/bin/env bash
# The GPU check: probe the machine, build fastlstm with its CUDA kernels, run the CUDA tests, then
# the GPU benchmark grid, on one CUDA GPU in under 8 minutes, and end with a verdict table. Every
# stage has its own time limit and its failure is recorded while the script goes on, so a broken
# build still leaves the baselines measured and a slow stage still leaves time for the later ones.
# Run from anywhere:
#
#     bash benchmarks/gpu_check.sh                 # results under benchmarks/results/gpu-<time>/
#     OUT=/some/dir bash benchmarks/gpu_check.sh   # results under /some/dir
#     bash benchmarks/gpu_check.sh --dry-run       # the whole script on this CPU (see below)
#     bash benchmarks/gpu_check.sh --pack [DIR]    # copy pytest & co and ninja into DIR
#
# Needs python3 with a CUDA build of torch, and nvcc. Installs nothing from the network. A bare
# GPU machine may lack pytest or ninja: `--pack` (run where they are installed, e.g. in the
# project's .venv) copies the pure-Python pytest, pluggy, iniconfig, packaging and pygments
# packages and the ninja binary into DIR (default .gpu-carry/, ignored by git); when DIR sits in
# the checkout on the GPU machine, the check puts what python3 lacks from it on PYTHONPATH and
# PATH. The extension is built with `pip install --no-build-isolation --no-deps -e .`, or with
# `python setup.py build_ext --inplace` where pip refuses. A failed build fails the check: the
# CUDA tests then run with FASTLSTM_EXPECT_BACKENDS=cuda,triton and fail rather than skip.
#
# --dry-run runs every stage here, on the CPU, with each CUDA stage replaced by its counterpart:
# the build stage asks pip to resolve the project without building (`--dry-run`) and then checks
# the installed build (backends cpu and triton, the latter under TRITON_INTERPRET=1); the tests
# stage collects the CUDA-marked tests (they skip without a GPU: a collection error fails it);
# each benchmark stage runs its suites on the CPU at the --quick shapes. `make test` runs it
# (tests/tooling/test_gpu_check.py), so the script itself is tested on every change.
#
# Writes at most 8 files, all in $OUT:
#   env.txt      machine, versions, what is missing   build.log   the build (with ptxas's report)
#   tests.log    the CUDA-marked tests                 bench.log   progress and tables of the benches
#   gpu.jsonl    every record (fastlstm.bench schema; redraw with `fastlstm bench --from`)
#   fastrnns.txt the fastrnns-convention table         summary.txt stage, verdict, seconds
# and prints the benchmark summary, then the verdict table, last. Exit status: 0 when every stage
# passed, 1 otherwise. Stage limits (seconds) scale with GPU_CHECK_SCALE (default 1; the limits
# add up to 447 s and the probes between stages take about 20 s more). GPU_CHECK_ONLY=build,tests
# (comma-separated stage names) runs only those stages, for a rerun of what failed. FASTLSTM_GIT_COMMIT names
# the commit measured when the tree has no .git; PYTHON picks the interpreter (default python3).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --pack)
    DEST=${2:-$ROOT/.gpu-carry}
    mkdir -p "$DEST/python" "$DEST/bin" || exit 1
    "$PY" - "$DEST" <<'PYEOF' || exit 1
import importlib, os, shutil, sys
dest = sys.argv[1]
# pytest and what it imports on any Python >= 3.11 (all pure Python).
for name in ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        if name == "py":
            continue  # py.py is optional (pytest ships its own shim in newer releases)
        sys.exit(f"--pack: {name} is not installed for {sys.executable}; install pytest first")
    path = module.__file__
    if os.path.basename(path) == "__init__.py":
        shutil.copytree(os.path.dirname(path), os.path.join(dest, "python", name),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(path, os.path.join(dest, "python", os.path.basename(path)))
    print(f"packed {name} from {path}")
PYEOF
    NINJA=$(command -v ninja || true)
    if [ -n "$NINJA" ] && head -c 4 "$NINJA" | grep -q ELF; then
      cp "$NINJA" "$DEST/bin/ninja" && echo "packed ninja from $NINJA"
    else  # pip's ninja package keeps the binary in ninja.BIN_DIR behind a Python launcher
      BIN=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null)
      if [ -n "$BIN" ] && [ -x "$BIN" ]; then
        cp "$BIN" "$DEST/bin/ninja" && echo "packed ninja from $BIN"
      else
        echo "--pack: no ninja binary found (pip install ninja)" >&2
        exit 1
      fi
    fi
    echo "packed into $DEST"
    exit 0 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --pack [DIR]]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
SCALE=${GPU_CHECK_SCALE:-1}
DRY_SCALE=1  # the dry run's CPU counterparts get 3x the limits: CI's CPUs are few and shared
[ "$DRY" = 1 ] && DRY_SCALE=3
RESULTS=$OUT/gpu.jsonl
SUMMARY=$OUT/summary.txt
BENCH_LOG=$OUT/bench.log
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  export FASTLSTM_EXPECT_BACKENDS=cpu,triton
  DEVICE=cpu
else
  unset TRITON_INTERPRET  # real Triton kernels on the GPU, never the interpreter
  export FASTLSTM_EXPECT_BACKENDS=cuda,triton
  DEVICE=cuda
fi
if [ -z "${FASTLSTM_GIT_COMMIT:-}" ]; then
  FASTLSTM_GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "")
  [ -n "$FASTLSTM_GIT_COMMIT" ] && export FASTLSTM_GIT_COMMIT || unset FASTLSTM_GIT_COMMIT
fi
: >"$SUMMARY"
CHECK_START=$(date +%s)
FAILED=0

# record NAME RC SECONDS NOTE: one line of the verdict table.
record() {
  local verdict=ok
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then verdict="timed out"; FAILED=1
  elif [ "$2" -ne 0 ]; then verdict="FAILED"; FAILED=1; fi
  printf '%-20s %-10s %5ss  %s\n' "$1" "$verdict" "$3" "$4" >>"$SUMMARY"
  echo "[gpu_check] $1: $verdict (${3}s) $4"
}

# wanted NAME: whether GPU_CHECK_ONLY (comma-separated stage names; empty: all) lists NAME.
wanted() {
  [ -z "${GPU_CHECK_ONLY:-}" ] || [[ ",$GPU_CHECK_ONLY," == *",$1,"* ]]
}

# stage NAME LIMIT_SECONDS LOGFILE COMMAND...: run with a scaled time limit, log, record.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  wanted "$name" || return 0
  limit=$(awk -v l="$limit" -v s="$SCALE" -v d="$DRY_SCALE" 'BEGIN { printf "%d", l * s * d }')
  local start rc
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" >>"$log"
  echo "[gpu_check] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - start ))" "$log"
}

# 1. What machine this is, and what it lacks. Tools missing from python3 are taken from a
# carried --pack folder when there is one.
CARRY=${GPU_CHECK_CARRY:-$ROOT/.gpu-carry}
probe_start=$(date +%s)
MISSING=()
if [ -d "$CARRY" ]; then
  if ! timeout 60 "$PY" -c 'import pytest' >/dev/null 2>&1 && [ -d "$CARRY/python" ]; then
    export PYTHONPATH=$PYTHONPATH:$CARRY/python
  fi
  if ! command -v ninja >/dev/null 2>&1 && [ -x "$CARRY/bin/ninja" ]; then
    export PATH=$PATH:$CARRY/bin
  fi
fi
NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC=$CUDA_HOME/bin/nvcc
fi
command -v ninja >/dev/null 2>&1 || MISSING+=("ninja (builds without it are serial and slow)")
timeout 60 "$PY" -c 'import pytest' >/dev/null 2>&1 || MISSING+=("pytest (no tests can run)")
timeout 60 "$PY" -c 'import triton' >/dev/null 2>&1 || MISSING+=("triton (no triton backend)")
timeout 60 "$PY" -c 'import scipy' >/dev/null 2>&1 || MISSING+=("scipy (chi-square tests skip)")
{
  date -u
  echo "mode: $([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU")"
  timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  timeout 120 "$PY" - <<'PYEOF' 2>&1
import importlib.metadata, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sms", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1),
          "capability", f"{p.major}.{p.minor}")
    print("cudnn", torch.backends.cudnn.version())
for name in ("triton", "pytest", "ninja", "scipy", "hypothesis", "pytest-xdist", "pytest-timeout"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed as a package")
PYEOF
  echo "nvcc: ${NVCC:-not found}"
  [ -n "$NVCC" ] && timeout 30 "$NVCC" --version 2>&1 | tail -2
  echo "ninja: $(command -v ninja || echo 'not found')"
  for item in ${MISSING[@]+"${MISSING[@]}"}; do echo "missing: $item"; done
} >"$OUT/env.txt" 2>&1
GPU_OK=0
timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  && GPU_OK=1
probe_note="python3 $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)"
probe_rc=0
if [ "$DRY" = 1 ]; then
  probe_note="$probe_note; dry run (CPU)"
elif [ "$GPU_OK" = 0 ]; then
  probe_note="$probe_note; torch sees no CUDA GPU"; probe_rc=1
fi
if [ "$DRY" = 0 ] && [ -z "$NVCC" ]; then
  probe_note="$probe_note; nvcc not found (set CUDA_HOME or put nvcc on PATH)"; probe_rc=1
fi
[ ${#MISSING[@]} -gt 0 ] && probe_note="$probe_note; missing: ${MISSING[*]}"
record probe "$probe_rc" "$(( $(date +%s) - probe_start ))" "$probe_note"
if [ "$DRY" = 0 ] && [ "$GPU_OK" = 0 ]; then
  echo; cat "$SUMMARY"; echo "VERDICT: FAIL (no GPU)"
  exit 1
fi

# 2. Build fastlstm._C with the CUDA kernels for sm_90; pip first, setup.py where pip refuses.
build() {
  # The dry run's counterparts compile nothing (the build under test is make's): pip only
  # resolves the project, and setup.py only configures the extension and writes its metadata.
  local pip_args=(-v) setup_args=(build_ext --inplace)
  if [ "$DRY" = 1 ]; then
    pip_args=(--dry-run)
    setup_args=(egg_info --egg-base "$(mktemp -d)")
  fi
  if env FASTLSTM_BUILD_CUDA=$BUILD_CUDA FASTLSTM_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16} \
      "$PY" -m pip install --no-build-isolation --no-deps "${pip_args[@]}" -e .; then
    return 0
  fi
  echo "pip refused or failed: falling back to python setup.py ${setup_args[*]}"
  env FASTLSTM_BUILD_CUDA=$BUILD_CUDA FASTLSTM_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py "${setup_args[@]}"
}
# The build counts only if the backends it should give are there.
build_and_probe() {
  build || return 1
  "$PY" - <<'PYEOF'
import os, sys
import fastlstm
device = "cuda" if os.environ["FASTLSTM_EXPECT_BACKENDS"].startswith("cuda") else "cpu"
have = fastlstm.available_backends(device)
want = os.environ["FASTLSTM_EXPECT_BACKENDS"].split(",")
print(f"backends on {device}: {have}")
missing = [name for name in want if name not in have]
if missing:
    from fastlstm import _backends
    for name in missing:
        print(f"build check: backend {name!r} cannot run on {device}: "
              f"{_backends.why_unavailable(name, device)}")
    sys.exit(1)
# An error whose message formats numbers must raise, not crash (a second, static libstdc++ in
# the extension crashes there; setup.py links the shared one).
import torch
try:
    torch.ops.fastlstm.recurrence_forward(
        torch.zeros(6, 32), torch.empty(0, dtype=torch.int64), torch.zeros(2, 8),
        torch.zeros(2, 8), torch.zeros(32, 5), None, False, False)
    sys.exit("build check: a bad w_hh shape was accepted")
except RuntimeError as error:
    print("error paths raise:", str(error).splitlines()[0][:100])
PYEOF
}
export -f build build_and_probe
BUILD_CUDA=1
[ "$DRY" = 1 ] && BUILD_CUDA=auto
export PY DRY BUILD_CUDA
stage build 140 "$OUT/build.log" bash -c build_and_probe

# 3. The CUDA-marked tests. FASTLSTM_EXPECT_BACKENDS makes tests/conftest.py fail every test of
# a missing backend instead of skipping it. With pytest-xdist they run in 4 processes (Triton
# and torch.compile compile on the CPU); with pytest-timeout a hung test is ended.
PYTEST_EXTRA=()
if [ "$DRY" = 0 ]; then
  timeout 60 "$PY" -c 'import xdist' >/dev/null 2>&1 && PYTEST_EXTRA+=(-n 4)
  if timeout 60 "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    PYTEST_EXTRA+=(--timeout=100 --timeout-method=thread)
  fi
fi
stage tests 160 "$OUT/tests.log" "$PY" -m pytest -m cuda tests -v -p no:cacheprovider \
  --durations=15 ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"}

# 4. Benchmarks, most important first. Training: headline shapes (FlashRNN's B=16 T=1024 H=768
# and the small-batch shapes) in bf16, also against fp16 cuDNN, then the grid in bf16 and fp32.
# bench NAME LIMIT ARGS...: one fastlstm bench run appending to gpu.jsonl. Timing gets 60% of
# the stage's limit (--budget: fewer rounds per shape rather than shapes left out); the rest is
# for building the workloads (Triton compiles, cuDNN plans). The dry run keeps each stage's
# suites and runs them on the CPU at the --quick shapes.
bench() {
  local name=$1 limit=$2 budget
  shift 2
  budget=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s * 0.6 }')
  local args=("$@")
  if [ "$DRY" = 1 ]; then
    local suites=train
    for ((i = 0; i < ${#args[@]}; i++)); do
      [ "${args[$i]}" = --suites ] && suites=${args[$((i + 1))]}
    done
    args=(--suites "$suites" --quick --dtype float32 --backends cpu --repeats 3)
  fi
  stage "$name" "$limit" "$BENCH_LOG" "$PY" -m fastlstm.bench --device "$DEVICE" \
    --out "$RESULTS" --budget "$budget" "${args[@]}"
}
bench train-headline 40 --suites train --dtype bfloat16 --shapes train=gpu-headline \
  --backends cuda,triton --repeats 7
bench train-headline-fp16 12 --suites train --dtype bfloat16 --baseline-dtype float16 \
  --shapes train=16x1024x768x768x1 --backends cuda,triton --repeats 7
bench sample 20 --suites sample --dtype bfloat16 --backends cuda,triton --repeats 10
bench decode 20 --suites decode --dtype float32 --backends cuda,triton --repeats 5
bench decode-bf16 10 --suites decode --dtype bfloat16 --backends cuda --repeats 5 \
  --shapes decode=65x64x1024x2
bench train-grid-bf16 20 --suites train --dtype bfloat16 --shapes train=gpu-grid \
  --backends cuda,triton --repeats 5 --warmup 2
bench train-grid-fp32 15 --suites train --dtype float32 --shapes train=gpu-grid \
  --backends cuda,triton --repeats 5 --warmup 2
if [ "$DRY" = 1 ]; then
  FASTRNNS=(--device cpu --rnns cudnn fastlstm-cpu --seqLength 4 --inputSize 16 --hiddenSize 16
            --miniBatch 2 --nloops 2 --warmup 0)
else
  FASTRNNS=(--device cuda --rnns cudnn fastlstm-cuda fastlstm-triton --nloops 30 --warmup 5)
fi
stage fastrnns 10 "$OUT/fastrnns.txt" "$PY" benchmarks/fastrnns.py "${FASTRNNS[@]}" \
  --out "$RESULTS" --no-progress

# 5. The benchmark summary, then the verdict table last.
echo
if [ -s "$RESULTS" ]; then
  timeout 60 "$PY" -m fastlstm.bench --from "$RESULTS" --brief 2>&1 | tee -a "$OUT/bench.log"
else
  echo "no benchmark records were written"
fi
echo
printf '%-20s %-10s %6s  %s\n' stage verdict time "log / note"
cat "$SUMMARY"
TOTAL=$(( $(date +%s) - CHECK_START ))
if [ "$FAILED" = 0 ]; then VERDICT=PASS; else VERDICT=FAIL; fi
echo "VERDICT: $VERDICT in ${TOTAL}s ($([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo GPU))" \
  | tee -a "$SUMMARY"
[ "$FAILED" = 0 ]
