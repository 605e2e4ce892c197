#!/usr/bin/env bash
# Every CUDA test and GPU benchmark in one run, with one summary at the end: what the first
# session lent a GPU runs to measure everything at once. About 5-7 minutes on one H100/H200
# (each step under `timeout`, all within BUDGET_S); on a machine without CUDA it prints the
# summary with every step skipped, says why, and exits 0 in seconds.
#
#   benchmarks/gpu_check.sh                  # Python: $PYTHON, else .venv/bin/python, else python3
#   PYTHON=python3 benchmarks/gpu_check.sh   # an interpreter whose torch has CUDA
#   INSTALL=1 benchmarks/gpu_check.sh        # `make install` first (needs the package index)
#
# Which torch: `make install` pins torch==2.13.0 from the configured package index. PyPI's
# Linux x86-64 wheel of that version is a CUDA build, but a mirror may hold only the +cpu
# one (this workplace's does: /opt/wheels), and a GPU machine without network cannot install
# at all. There, point PYTHON at the machine's own Python with a CUDA torch (needs torch,
# triton, transformers, safetensors, tqdm, pyyaml, pytest; peft and bitsandbytes for the peer
# arms, which are skipped without them). src/ goes first on PYTHONPATH, so qlora itself need
# not be installed (its C extensions only serve the CPU).
#
# Steps:
#   gpu tests       pytest -m gpu over every test file that has the marker (CUDA-only tests:
#                   Triton dispatch, fused decode vs dequantize+matmul, paged optimizers)
#   triton tests    the Triton kernels against their references, run on the GPU
#   bench_triton    dequantize GB/s vs the HBM peak (PEAK_GBS, default from the device name);
#                   fused vs dequantize+matmul decode for 1-16 tokens
#   bench_step      training-step time and peak memory, ours vs PEFT, --device cuda (on the
#                   default model, or a synthetic one of its shapes where it is not installed)
#   bench_optim     torch AdamW vs qlora's optimizers (paged ones staged), --device cuda
#
# Environment: BUDGET_S (default 450 s for all steps), LOG_DIR (default: a new temp dir),
# PEAK_GBS. Exit status: 0 unless a step failed (skips are not failures).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
BUDGET_S=${BUDGET_S:-450}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/qlora-gpu-check.XXXXXX")}
mkdir -p "$LOG_DIR"
START=$SECONDS
SUMMARY=()
FAILED=0

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # the tests' CPU fallback; here the kernels run on the GPU

note() { printf '[gpu_check %3ds] %s\n' "$((SECONDS - START))" "$*"; }
record() { # name status seconds detail
    SUMMARY+=("$(printf '%-13s %-4s %4ss  %s' "$1" "$2" "$3" "$4")")
    [[ $2 == FAIL ]] && FAILED=1
    return 0
}

print_summary() {
    echo
    echo "================ gpu_check summary ================"
    echo "python:  $PYTHON"
    echo "env:     ${ENV_LINE:-unknown}"
    echo "logs:    $LOG_DIR"
    printf '%s\n' "${SUMMARY[@]}"
    echo "total:   $((SECONDS - START)) s (budget ${BUDGET_S} s)"
    if ((FAILED)); then echo "result:  FAILED"; else echo "result:  ok"; fi
}

if [[ ${INSTALL:-0} == 1 ]]; then
    note "make install"
    if ! timeout 900 make install >"$LOG_DIR/install.log" 2>&1; then
        record install FAIL 0 "make install failed: $(tail -n 1 "$LOG_DIR/install.log")"
    fi
fi
if [[ -n ${QLORA_DISABLE_KERNELS:-} && ${QLORA_DISABLE_KERNELS} != 0 ]]; then
    note "QLORA_DISABLE_KERNELS=$QLORA_DISABLE_KERNELS would time the references: unset here"
    unset QLORA_DISABLE_KERNELS
fi

# ------------------------------------------------------------------ the environment
# One Python run answers every question about the interpreter, as shell assignments.
PROBE=$("$PYTHON" - <<'EOF' 2>"$LOG_DIR/probe.log"
import importlib.util
import shlex


def say(name, value):
    print(f"{name}={shlex.quote(str(value))}")


def has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


try:
    import torch
except Exception as err:  # noqa: BLE001 - any failure to import is the answer
    say("TORCH", "")
    say("WHY", f"torch does not import: {err}")
    raise SystemExit
cuda = torch.cuda.is_available()
say("TORCH", torch.__version__)
say("CUDA", int(cuda))
say("DEVICE", torch.cuda.get_device_name(0) if cuda else "")
say("HAS_PEFT", int(has("peft")))
say("HAS_BNB", int(has("bitsandbytes")))
try:
    import triton

    say("TRITON", triton.__version__)
except Exception:  # noqa: BLE001
    say("TRITON", "")
try:
    import qlora  # noqa: F401
except Exception as err:  # noqa: BLE001
    say("QLORA_ERR", f"qlora does not import from src/: {err}")
if not cuda:
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    say("WHY", f"CUDA is not available: torch {torch.__version__} is {build} and sees no GPU")
EOF
)
TORCH="" CUDA=0 DEVICE="" TRITON="" HAS_PEFT=0 HAS_BNB=0 WHY="" QLORA_ERR=""
eval "$PROBE"
ENV_LINE="torch ${TORCH:-none}, triton ${TRITON:-none}, ${DEVICE:-no CUDA device}"

STEPS=("gpu tests" "triton tests" bench_triton bench_step bench_optim)
if [[ -z $TORCH ]]; then # a Python that cannot run torch: an error, not an answer
    WHY=${WHY:-"$PYTHON did not run: $(tail -n 1 "$LOG_DIR/probe.log")"}
    for step in "${STEPS[@]}"; do record "$step" FAIL 0 "$WHY"; done
    SUMMARY+=("" "Set PYTHON to an interpreter with torch (see the top of $0).")
    print_summary
    exit 2
fi
if ((!CUDA)); then # no GPU here: every step is skipped, and that is the whole answer
    for step in "${STEPS[@]}"; do record "$step" SKIP 0 "no CUDA"; done
    SUMMARY+=("" "No step ran. $WHY." \
        "On a GPU machine, run with PYTHON=<a python whose torch has CUDA> (e.g. PYTHON=python3).")
    print_summary
    exit 0
fi
if [[ -n $QLORA_ERR ]]; then
    for step in "${STEPS[@]}"; do record "$step" FAIL 0 "$QLORA_ERR"; done
    print_summary
    exit 1
fi

# ------------------------------------------------------------------ running steps
remaining() { echo $((BUDGET_S - (SECONDS - START))); }

# run_step NAME LIMIT_S LOG COMMAND...: runs COMMAND under timeout; sets STEP_RC, STEP_S.
run_step() {
    local name=$1 limit=$2 log=$3 left
    shift 3
    left=$(remaining)
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        STEP_RC=-1 STEP_S=0
        record "$name" SKIP 0 "out of time (BUDGET_S=$BUDGET_S)"
        return
    fi
    note "$name (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - t0))
    if ((STEP_RC == 124 || STEP_RC == 137)); then
        record "$name" FAIL "$STEP_S" "timed out after ${limit}s; log $log"
        STEP_RC=-1
    fi
}

pytest_line() { # the last "N passed, ..." line of a pytest log
    grep -E '[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran' "$1" | tail -n 1
}

pytest_step() { # NAME LIMIT LOG PYTEST-ARGS...
    local name=$1 limit=$2 log=$3
    shift 3
    run_step "$name" "$limit" "$log" "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs "$@"
    ((STEP_RC == -1)) && return
    local line
    line=$(pytest_line "$log")
    if ((STEP_RC == 0)) && ! grep -qE '[0-9]+ skipped' <<<"$line"; then
        record "$name" PASS "$STEP_S" "$line"
    elif ((STEP_RC == 0)); then # a skip on a GPU machine means something is missing
        record "$name" PASS "$STEP_S" "$line; skips: $(grep -m 3 '^SKIPPED' "$log" | tr '\n' ' ')"
    else
        record "$name" FAIL "$STEP_S" "${line:-pytest exit $STEP_RC}; log $log"
    fi
}

# json_step NAME LOG KIND [NOTE]: the key numbers of the JSON line a benchmark printed last
# (gpu_check_summary.py), or a failure with the log's last line.
json_step() {
    local name=$1 log=$2 kind=$3 note=${4:-} detail rc
    ((STEP_RC == -1)) && return
    if ((STEP_RC != 0)); then
        record "$name" FAIL "$STEP_S" "exit $STEP_RC: $(tail -n 1 "$log"); log $log"
        return
    fi
    detail=$("$PYTHON" "$ROOT/benchmarks/gpu_check_summary.py" "$kind" "$log" "$note" 2>&1)
    rc=$?
    case $rc in
        0) record "$name" PASS "$STEP_S" "$detail" ;;
        3) record "$name" FAIL "$STEP_S" "$detail" ;; # some part of it failed
        *) record "$name" FAIL "$STEP_S" "unreadable output ($detail); log $log" ;;
    esac
}

# ------------------------------------------------------------------ the steps
mapfile -t GPU_FILES < <(grep -rlE --include='*.py' 'pytest\.mark\.gpu\b' tests | sort)
mapfile -t TRITON_FILES < <(find tests -name 'test_triton_*.py' | sort)

pytest_step "gpu tests" 150 "$LOG_DIR/gpu_tests.log" -m gpu "${GPU_FILES[@]}"
pytest_step "triton tests" 150 "$LOG_DIR/triton_tests.log" -m "not gpu" "${TRITON_FILES[@]}"

if [[ -z $TRITON ]]; then
    record bench_triton SKIP 0 "triton is not installed for $PYTHON"
else
    if [[ -z ${PEAK_GBS:-} ]]; then
        case $DEVICE in # HBM peak (GB/s) of the common data-center parts
            *H200*) PEAK_GBS=4800 ;;
            *H100*PCIe*) PEAK_GBS=2000 ;;
            *H100*NVL*) PEAK_GBS=3900 ;;
            *H100*) PEAK_GBS=3350 ;;
            *A100*80GB*PCIe*) PEAK_GBS=1935 ;;
            *A100*80GB*) PEAK_GBS=2039 ;;
            *A100*) PEAK_GBS=1555 ;;
            *) PEAK_GBS=3350 ;;
        esac
    fi
    run_step bench_triton 120 "$LOG_DIR/bench_triton.log" \
        "$PYTHON" benchmarks/bench_triton.py --peak-gbs "$PEAK_GBS" --repeats 30
    json_step bench_triton "$LOG_DIR/bench_triton.log" triton
fi

# The default model where it is installed; else a synthetic checkpoint of its shapes.
MODEL=$("$PYTHON" -c "from qlora.models.loader import resolve_checkpoint as r
print(r('smollm2-135m'))" 2>"$LOG_DIR/model.log" | tail -n 1)
MODEL_NOTE="default model"
if [[ -z $MODEL ]]; then
    note "default model not available ($(tail -n 1 "$LOG_DIR/model.log")): synthetic shapes"
    MODEL=$(timeout 120 "$PYTHON" benchmarks/synthetic_checkpoint.py smollm2-135m \
        2>>"$LOG_DIR/model.log" | tail -n 1)
    MODEL_NOTE="synthetic weights, the default model's shapes"
fi
if [[ -z $MODEL ]]; then
    for step in bench_step bench_optim; do
        record "$step" FAIL 0 "no model: $(tail -n 1 "$LOG_DIR/model.log")"
    done
else
    ARMS=ours-lora,ours-qlora
    ((HAS_PEFT)) && ARMS+=,peft-lora
    ((HAS_PEFT && HAS_BNB)) && ARMS+=,peft-qlora
    run_step bench_step 180 "$LOG_DIR/bench_step.log" \
        "$PYTHON" benchmarks/bench_step.py --device cuda --steps 8 --warmup 2 --ckpt off --dtypes bfloat16 \
        --arms "$ARMS" --model "$MODEL"
    json_step bench_step "$LOG_DIR/bench_step.log" step "$MODEL_NOTE"

    ONLY=("torch AdamW" qlora)
    ((HAS_BNB)) && ONLY+=(bnb)
    run_step bench_optim 120 "$LOG_DIR/bench_optim.log" \
        "$PYTHON" benchmarks/bench_optim.py --device cuda --steps 5 --only "${ONLY[@]}" \
        --model "$MODEL"
    json_step bench_optim "$LOG_DIR/bench_optim.log" optim "$MODEL_NOTE"
fi

print_summary
exit "$FAILED"
