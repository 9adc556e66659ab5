#!/usr/bin/env bash
# The whole GPU suite in one command, for a machine with an NVIDIA GPU:
#
#     bash bench/gpu_suite.sh [--budget SECONDS] [--dry-run] [OUT_DIR]
#     bash bench/gpu_suite.sh --list          # the step names, in order
#
# run from anywhere (it works in the repository root). Steps, in order of value:
#   env         python3's own packages when they have what the suite needs (numba, numba-cuda,
#               click, h5py, pytest, numpy; torch/cupy/xdist are optional), else `make install`
#   nvidia-smi  the card, driver and clocks
#   preflight   bench/gpu_preflight.py: numba-cuda, NVVM, nvJitLink and driver versions, then one
#               tiny launch_bounds + aligned-shared kernel; if it fails the suite stops at once
#   tests       pytest -rA -v (--dist loadfile with pytest-xdist) on the real GPU; the static
#               thresholds are skipped on a CUDA release other than the pinned one
#   memcheck, racecheck   compute-sanitizer on bench/gpu_sanitize.py (each GEMM kernel once)
#   plan        nbalex bench plan --json (the predicted step, to set beside the measured one)
#   kernels-conv, sgemm, train, kernels-rest, variants, static   the timings and the report
#
# Results come back even when the run is cut short: OUT_DIR (default bench/results/raw) gets
# at most 4 files, each written as soon as a step finishes:
#   steps.jsonl         one JSON record per step (status, exit code, seconds, its JSON output or
#                       the tail of its output, the tail of its stderr), appended per step
#   pytest.log          the test step's log, streamed as it runs
#   gpu-<card>-<date>.md  the results table, rewritten (atomically) after every step
#   raw.tar.gz          every step's full stdout and stderr, at the end
# The budget (--budget or NBALEX_SUITE_BUDGET, default 270 s) caps the whole run: each step has
# its own cap, and a step that would start with too little time left is recorded as skipped.
# NBALEX_SUITE_SKIP="tests,static" skips steps by name. NBALEX_SUITE_TESTS overrides the test
# step's pytest arguments (default: tests, without the static thresholds and this suite's own
# dry-run test).
# --dry-run (a machine without a GPU: the CUDA simulator on, a stand-in nvidia-smi on PATH)
# runs every step's plumbing at tiny sizes; steps that only make sense on a GPU (timings,
# compute-sanitizer, the static compile) are recorded as skipped.
# Exit status: 0 when every step was ok, 1 when one was not, 2 on a bad argument or a failed
# preflight.

set -u
cd "$(dirname "$0")/.."
STEPS_ALL="env nvidia-smi preflight tests memcheck racecheck plan kernels-conv sgemm train kernels-rest variants static"
BUDGET=${NBALEX_SUITE_BUDGET:-270}
DRY=0
OUT=bench/results/raw
while [ $# -gt 0 ]; do
    case $1 in
        --budget) BUDGET=${2:-}; shift 2 || { echo "gpu_suite: --budget needs a value" >&2; exit 2; } ;;
        --budget=*) BUDGET=${1#--budget=}; shift ;;
        --dry-run) DRY=1; shift ;;
        --list) echo "$STEPS_ALL"; exit 0 ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_suite: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT=$1; shift ;;
    esac
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || (( BUDGET < 10 )); then
    echo "gpu_suite: the budget must be a whole number of seconds, at least 10 (got '$BUDGET')" >&2
    exit 2
fi
mkdir -p "$OUT" || { echo "gpu_suite: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/steps.jsonl "$OUT"/pytest.log "$OUT"/raw.tar.gz "$OUT"/gpu-*.md
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if (( DRY )); then export NUMBA_ENABLE_CUDASIM=1; else unset NUMBA_ENABLE_CUDASIM; fi
RESULTS=(python3 bench/write_results.py)      # stdlib only: works before the env step

elapsed() { echo $(( $(date +%s) - START )); }

record() {  # record NAME STATUS RC SECONDS LIMIT [STDOUT_FILE]
    "${RESULTS[@]}" record "$OUT" --step "$1" --status "$2" --rc "$3" --seconds "$4" --limit "$5" \
        --stdout "${6:-}" --stderr "$WORK/$1.err" --dry-run "$DRY" > /dev/null
    echo "[suite $(elapsed)s] $1: $2 (${4}s)"
}

skip_step() {  # skip_step NAME WHY
    record "$1" "skipped ($2)" "" 0 0
}

# run_step NAME CAP OUTPUT_FILE COMMAND... : stdout to OUTPUT_FILE, stderr to $WORK/NAME.err
run_step() {
    local name=$1 cap=$2 out=$3
    shift 3
    if [[ ",${NBALEX_SUITE_SKIP:-}," == *",$name,"* ]]; then
        skip_step "$name" "NBALEX_SUITE_SKIP"; return 1
    fi
    local left=$(( BUDGET - $(elapsed) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        skip_step "$name" "budget spent"; return 1
    fi
    local t0 rc status
    t0=$(date +%s)
    : > "$WORK/$name.err"
    # SIGINT first: Python stops with KeyboardInterrupt, so pytest still prints its summary
    timeout -s INT -k 10 "$limit" "$@" > "$out" 2> "$WORK/$name.err"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timeout after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$limit" "$out"
    return $rc
}

# ---------------------------------------------------------------- the Python environment
run_step env 200 "$WORK/env.out" python3 bench/gpu_env.py
PY=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"] or "python3")' \
     "$WORK/env.out" 2> /dev/null || echo python3)
NBALEX=("$PY" -m nbalex.cli)

# ---------------------------------------------------------------- the GPU
run_step nvidia-smi 20 "$WORK/nvidia-smi.out" nvidia-smi \
    --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
if ! run_step preflight 60 "$WORK/preflight.out" "$PY" bench/gpu_preflight.py; then
    echo "gpu_suite: preflight failed: $(tail -n 1 "$WORK/preflight.err")" >&2
    exit 2
fi

# ---------------------------------------------------------------- the steps
XDIST=()
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 4 --dist loadfile)
# the static thresholds are the static step's business, and the dry run of this suite is not
# for a GPU run: both are left out of the default test arguments
read -r -a TESTS <<< "${NBALEX_SUITE_TESTS:-tests --ignore=tests/test_cuda_static.py --ignore=tests/test_gpu_suite.py}"
run_step tests 110 "$OUT/pytest.log" "$PY" -m pytest -rA -v -p no:cacheprovider "${XDIST[@]}" "${TESTS[@]}"

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
for tool in memcheck racecheck; do
    if (( DRY )) || [ -z "$SANITIZER" ]; then
        skip_step "$tool" "$( (( DRY )) && echo "dry run" || echo "compute-sanitizer not found")"
    else
        run_step "$tool" 50 "$WORK/$tool.out" "$SANITIZER" --tool "$tool" --error-exitcode 3 --log-file /dev/stderr \
            "$PY" bench/gpu_sanitize.py
    fi
done

if "$PY" -c "import nbalex.benchmarks.plan" 2> /dev/null; then
    run_step plan 20 "$WORK/plan.out" "${NBALEX[@]}" bench plan --model alexnet --batch-size 128 --json
else
    skip_step plan "nbalex bench plan not available"
fi

gpu_step() {  # gpu_step NAME CAP COMMAND...: timings, skipped in a dry run
    if (( DRY )); then skip_step "$1" "dry run"; else run_step "$1" "$2" "$WORK/$1.out" "${@:3}"; fi
}
gpu_step kernels-conv 60 "${NBALEX[@]}" bench kernels --backend cuda --repeats 5 \
    --layer conv1,conv2,conv3,conv4,conv5 --json
gpu_step sgemm 30 "${NBALEX[@]}" bench sgemm --repeats 5 --json
gpu_step train 50 "${NBALEX[@]}" bench train --steps 5 --warmup 1 --json
gpu_step kernels-rest 40 "${NBALEX[@]}" bench kernels --backend cuda --repeats 5 \
    --layer norm1,norm2,pool1,pool2,pool5,fc6,fc7,fc8,relu,dropout,softmax-xent,sgd --json
gpu_step variants 30 "$PY" bench/elementwise_variants.py --json --repeats 20
gpu_step static 60 "${NBALEX[@]}" bench static --json

# ---------------------------------------------------------------- the bundle
tar -czf "$OUT/raw.tar.gz.tmp" -C "$WORK" . && mv "$OUT/raw.tar.gz.tmp" "$OUT/raw.tar.gz"
"${RESULTS[@]}" summary "$OUT"
