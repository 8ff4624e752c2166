#!/usr/bin/env bash
# The one GPU check (issue 3 item 5): on a bare GPU machine with PyTorch preinstalled and no network,
# build the extension for the local arch with every core, run the GPU tests, run the key benchmark
# rows, and leave everything in OUTDIR (8 files at most, none in subfolders):
#   summary.txt      step, exit status, seconds; then the issue checks (also printed last)
#   env.txt          nvidia-smi, torch/CUDA/nvcc versions, `python -m memorymamba info`
#   build.log        setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST = this GPU's capability)
#   tests.log        pytest tests -k "cuda or gpu" (override with MEMORYMAMBA_GPU_TESTS="pytest args"),
#                    then memorymamba train --device cuda --epochs 3 (the default run, shortened)
#   bench.log        python -m bench --device cuda --suite gpu-check, then python -m bench.profile_model
#                    (the top ops of a tiny-model training step)
#   <gpu-name>.jsonl the benchmark rows (append to bench/results/<gpu-name>.jsonl, then `python -m bench.report --update`)
#   report.md        the rows as the README table, with the checks
#   <gpu-name>-charts.png
#
# Usage: bench/gpu_check.sh OUTDIR [--dry-run] [--sweep] [--no-train]
#   --dry-run  build nothing, run on the CPU: the quick bench suite and the GPU test selection (skips);
#              tests this script here, where there is no GPU
#   --sweep    after the key rows, spend the time left in the budget on the gpu suite's scans
#   --no-train skip the training run (a rerun after a kernel change that training already covered)
# Environment: PYTHON (default python3), MEMORYMAMBA_GPU_CHECK_BUDGET_S (default 480: the whole run
# stays under 8 minutes), MEMORYMAMBA_GIT_SHA (the sha to stamp on rows when the copy has no .git).
# Each step runs under its own timeout, so a hang loses that step only; the script always exits 0
# after writing the summary, so OUTDIR comes back; read summary.txt for what failed.
set -u

usage() { echo "usage: $0 OUTDIR [--dry-run] [--sweep] [--no-train]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
shift
DRY=0
SWEEP=0
TRAIN=1
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        --sweep) SWEEP=1 ;;
        --no-train) TRAIN=0 ;;
        *) usage ;;
    esac
done

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${MEMORYMAMBA_GPU_CHECK_BUDGET_S:-480}
SUMMARY=$OUT/summary.txt
RESERVE=40  # seconds kept for the report and plot steps until they run
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_SECONDS LOG CMD...: run CMD under min(CAP, budget left) seconds, output to LOG.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        note "SKIP  $name: ${left}s of the ${BUDGET}s budget left"
        return 124
    fi
    echo "### $name: $* (timeout ${limit}s)" >>"$log"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    local verdict=OK
    [ "$rc" -eq 0 ] || verdict=FAIL
    [ "$rc" -eq 124 ] && verdict=TIMEOUT
    # pytest's 5: no test matched the selection (e.g. no GPU-marked tests yet), not a failure
    [ "$name" = tests ] && [ "$rc" -eq 5 ] && verdict=NOTESTS
    note "$(printf '%-7s %-8s rc=%-3s %4ss  (log: %s)' "$verdict" "$name" "$rc" "$((SECONDS - t0))" "$(basename "$log")")"
    return "$rc"
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
finish() {
    note "total ${SECONDS}s of a ${BUDGET}s budget; outputs: $(cd "$OUT" && echo ./*)"
}
trap finish EXIT

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) repo=$REPO dry_run=$DRY sweep=$SWEEP"
if [ -z "${MEMORYMAMBA_GIT_SHA:-}" ]; then
    MEMORYMAMBA_GIT_SHA=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    export MEMORYMAMBA_GIT_SHA
fi
note "git sha: $MEMORYMAMBA_GIT_SHA"

# --- environment ---------------------------------------------------------------------------------
# shellcheck disable=SC2317  # run by `bash -c` under step's timeout (timeout cannot run a function)
env_report() {
    if [ "$DRY" -eq 1 ]; then
        echo "dry run: no GPU queried"
    else
        nvidia-smi || echo "nvidia-smi failed"
    fi
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    command -v nvcc && nvcc --version | tail -2
    command -v ninja && ninja --version
    nproc
}
export DRY PY
export -f env_report
step env 60 "$OUT/env.txt" bash -c env_report

# nvcc is not always on PATH on a bare machine; setup.py finds the toolkit through it.
if ! command -v nvcc >/dev/null 2>&1; then
    for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
        [ -x "$d/nvcc" ] && export PATH="$PATH:$d" && break
    done
fi

# --- build ---------------------------------------------------------------------------------------
if [ "$DRY" -eq 1 ]; then
    note "SKIP    build    (dry run)"
    DEVICE=cpu
else
    DEVICE=cuda
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$OUT/build.log")
    note "arch: ${ARCH:-unknown}, jobs: $(nproc)"
    TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} MAX_JOBS=$(nproc) MEMORYMAMBA_FORCE_CUDA_BUILD=1 \
        step build 300 "$OUT/build.log" "$PY" setup.py build_ext --inplace
    step info 30 "$OUT/env.txt" "$PY" -m memorymamba info
fi

# --- tests ---------------------------------------------------------------------------------------
# GPU tests are marked `gpu`, named test_cuda_*, or parametrized with a "cuda" backend; -k matches
# marker names as well as test ids, so one selection takes all three (test_bench.py runs this script).
if [ -n "${MEMORYMAMBA_GPU_TESTS:-}" ]; then
    read -r -a TEST_ARGS <<<"$MEMORYMAMBA_GPU_TESTS"
else
    TEST_ARGS=(tests --ignore=tests/test_bench.py -k "cuda or gpu")
fi
# The loop references make the selection slow on one process (~40 s for selective_scan alone on the
# CPU stand-in); xdist (on the device image) spreads it over 4 workers, few enough CUDA contexts.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
step tests 150 "$OUT/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider --timeout=120 "${XDIST[@]}" "${TEST_ARGS[@]}"
grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | cut -c1-300 | head -40 | tee -a "$SUMMARY"
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1 | tee -a "$SUMMARY"

# --- the application on the GPU: the default synthetic run, shortened --------------------------------
if [ "$DRY" -eq 0 ] && [ "$TRAIN" -eq 1 ]; then
    step train 90 "$OUT/tests.log" "$PY" -m memorymamba train --device cuda --epochs 3 --no-progress \
        --output "${TMPDIR:-/tmp}/memorymamba-gpu-check-runs"
    sed -n '/^### train/,$p' "$OUT/tests.log" | grep -iE "epoch|test" | tail -6 | tee -a "$SUMMARY"
fi

# --- benchmarks ----------------------------------------------------------------------------------
if [ "$DRY" -eq 1 ]; then
    SUITE=quick
    ROWS=$OUT/cpu-dry-run.jsonl
else
    SUITE=gpu-check
    NAME=$("$PY" -c 'import os; from bench.harness import default_results_path; print(os.path.basename(default_results_path("cuda")))' 2>>"$OUT/bench.log")
    ROWS=$OUT/${NAME:-gpu.jsonl}
fi
step bench 170 "$OUT/bench.log" "$PY" -m bench --device "$DEVICE" --suite "$SUITE" --out "$ROWS"
if [ "$SWEEP" -eq 1 ] && [ "$DRY" -eq 0 ]; then
    step sweep 600 "$OUT/bench.log" \
        "$PY" -m bench --device cuda --suite gpu --ops cross_selective_scan,selective_scan --out "$ROWS"
fi

# --- where the model's training step spends its time (torch.profiler table into bench.log) ---------
if [ "$DRY" -eq 1 ]; then
    PROFILE_ARGS=(--batch 4 --steps 1)
else
    PROFILE_ARGS=(--device cuda)
fi
step profile 60 "$OUT/bench.log" "$PY" -m bench.profile_model "${PROFILE_ARGS[@]}"

# --- report --------------------------------------------------------------------------------------
RESERVE=0
if [ -s "$ROWS" ]; then
    step report 30 "$OUT/report.md" "$PY" -m bench.report --results "$ROWS" --suite "$SUITE"
    step plot 30 "$OUT/bench.log" "$PY" -m bench.plot --results "$ROWS" --out-dir "$OUT" --suite "$SUITE"
    {
        echo
        echo "checks (from $(basename "$ROWS")):"
        grep -E '^- (PASS|FAIL|n/a)' "$OUT/report.md" || echo "(no checks in report.md)"
    } | tee -a "$SUMMARY"
else
    note "no benchmark rows were written; see bench.log"
fi
exit 0
