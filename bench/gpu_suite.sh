#!/usr/bin/env bash
# The whole GPU suite in one command, for a machine with an NVIDIA GPU:
#
#     bash bench/gpu_suite.sh [COPY_TO_DIR]
#
# run from the repository root. It makes .venv if there is none (`make install`; without a
# network, it uses python3's own packages with this source tree on sys.path), checks
# nvidia-smi, then runs with the CUDA simulator off:
#   1. the test suite on the real GPU (pytest -q tests, gpu-marked tests included),
#   2. nbalex bench static --json, kernels --backend cuda --json (in two halves),
#      sgemm --json, train --json, and bench/elementwise_variants.py --json,
#   3. python bench/write_results.py: bench/results/gpu-<card>-<date>.md and a short summary.
# Each step has a time limit and its exit status is recorded; a failing step never stops
# the others. Everything fits in NBALEX_SUITE_BUDGET seconds (default 570). Raw outputs go
# to bench/results/raw/; with COPY_TO_DIR the markdown file, steps.tsv, pytest.log and
# raw.tar.gz (everything in bench/results/raw) are copied there.
# NBALEX_SUITE_SKIP="tests,train" skips the steps named (tests, static, kernels-conv,
# kernels-rest, sgemm, train, variants).

set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${NBALEX_SUITE_BUDGET:-570}
RESERVE=15                       # seconds always kept for write_results.py
RAW=bench/results/raw
mkdir -p "$RAW"
rm -f "$RAW"/*
STEPS="$RAW/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"
unset NUMBA_ENABLE_CUDASIM
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }

record() {  # name status seconds
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STEPS"
    echo "[suite $(elapsed)s] $1: $2 (${3}s)"
}

# run_step NAME CAP_SECONDS OUTPUT_FILE COMMAND... : stdout to OUTPUT_FILE, stderr to NAME.err
run_step() {
    local name=$1 cap=$2 out=$3
    shift 3
    if [[ ",${NBALEX_SUITE_SKIP:-}," == *",$name,"* ]]; then
        record "$name" "skipped (NBALEX_SUITE_SKIP)" 0
        return
    fi
    local left=$(( BUDGET - RESERVE - $(elapsed) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        record "$name" "skipped (suite time budget spent)" 0
        return
    fi
    local t0 rc status
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$out" 2> "$RAW/$name.err"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timeout after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" $(( $(date +%s) - t0 ))
}

# ---------------------------------------------------------------- the Python environment
PY=python3
if [ ! -x .venv/bin/python ]; then
    t0=$(date +%s)
    if PIP_DEFAULT_TIMEOUT=10 PIP_RETRIES=0 timeout 150 make install > "$RAW/install.log" 2>&1; then
        record install "ok (make install)" $(( $(date +%s) - t0 ))
    else
        # No package index reachable: use python3 with its own packages (numba, numba-cuda,
        # torch, h5py, click, pytest) and this source tree on sys.path (python -c / -m add it).
        rm -rf .venv
        record install "ok (no package index: python3's own packages and the source tree)" \
            $(( $(date +%s) - t0 ))
    fi
fi
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import numba.cuda, click, h5py, pytest, nbalex" >> "$RAW/install.log" 2>&1; then
    record python "failed: $PY cannot import numba.cuda, click, h5py, pytest and nbalex" 0
fi
# the CLI without relying on the console script (an offline install may lack it)
NBALEX=("$PY" -c 'import sys; from nbalex.cli import main; sys.argv[0] = "nbalex"; main()')

# ---------------------------------------------------------------- the GPU
if ! nvidia-smi > "$RAW/nvidia-smi.txt" 2>&1; then
    record nvidia-smi "failed: no usable NVIDIA GPU" 0
    cat "$RAW/nvidia-smi.txt"
    echo "bench/gpu_suite.sh is for a machine with an NVIDIA GPU; use 'make test' elsewhere." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader > "$RAW/gpu.csv" 2>/dev/null
record nvidia-smi ok 0
"$PY" - > "$RAW/python.txt" 2>&1 <<'EOF'
import platform
print("python", platform.python_version())
for name in ("numpy", "numba", "numba_cuda", "torch"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
except Exception:
    pass
EOF

# ---------------------------------------------------------------- the steps
# pytest-xdist, when installed, spreads the test files over 4 processes (kernels compile
# per process, so more workers mostly compile more)
XDIST=()
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 4)
run_step tests 150 "$RAW/pytest.log" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests
run_step static 60 "$RAW/static.json" "${NBALEX[@]}" bench static --json
run_step kernels-conv 90 "$RAW/kernels-conv.json" \
    "${NBALEX[@]}" bench kernels --backend cuda --repeats 5 --layer conv1,conv2,conv3,conv4,conv5 --json
run_step kernels-rest 90 "$RAW/kernels-rest.json" \
    "${NBALEX[@]}" bench kernels --backend cuda --repeats 5 \
    --layer norm1,norm2,pool1,pool2,pool5,fc6,fc7,fc8,relu,dropout,softmax-xent,sgd --json
run_step sgemm 45 "$RAW/sgemm.json" "${NBALEX[@]}" bench sgemm --repeats 5 --json
run_step train 90 "$RAW/train.json" "${NBALEX[@]}" bench train --steps 5 --warmup 1 --json
run_step variants 60 "$RAW/variants.json" "$PY" bench/elementwise_variants.py --json --repeats 20

# ---------------------------------------------------------------- the results file
"$PY" bench/write_results.py "$RAW"
rc=$?
# exit status 1 when any step was not ok (skipped steps included)
awk -F'\t' 'NR > 1 && $2 !~ /^ok/ {bad = 1} END {exit bad ? 0 : 1}' "$STEPS" && rc=1
if [ $# -ge 1 ]; then   # four files: the table, the step list, the test log, the rest bundled
    mkdir -p "$1"
    cp "$(cat "$RAW/results_path.txt" 2>/dev/null)" "$1"/ 2>/dev/null
    cp "$STEPS" "$RAW/pytest.log" "$1"/ 2>/dev/null
    tar -czf "$1/raw.tar.gz" -C "$(dirname "$RAW")" "$(basename "$RAW")"
fi
exit $rc
