#!/usr/bin/env bash
# The GPU check (issue #18) in one command: the host synchronisations per step, the overhead benchmark's GPU models,
# the per-step cost by part and the rollback snapshots' cost (the measurements first), then the CUDA tests and the
# engine benchmark on the GPU, each step under its own time limit, all within 8 minutes. For a machine with one NVIDIA
# GPU, no network, and a Python that already has torch (CUDA), lightning, accelerate, transformers, torchmetrics,
# numpy, scipy, scikit-learn, matplotlib, hypothesis and pytest.
#
#   bash scripts/gpu_check.sh                    # on the GPU machine (--device cuda): at most 480 s of steps
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu   # small sizes, no bf16, nothing that needs
#                                                # CUDA: the script's own check, on any machine (CI), ~1-2 minutes
#   options: --device cuda|cpu (default cuda), --out DIR (default gpu_check_results), --budget SECONDS (default
#   480: no step starts, and every step is cut, at that many seconds after the start), --no-tests (skip the two
#   pytest steps: CI, whose test suite has just run the same tests)
#   environment: PYTHON, the interpreter to use (default python3)
#
# The packages such a machine lacks (ripser, persim and Deprecated, which ripser needs, gudhi, giotto-ph) travel as
# wheels in .whl/ (git-ignored), built for the GPU machine's Python: CPython 3.12, manylinux x86_64. Before going
# there, in this checkout:
#   mkdir -p .whl && cp ../shared/gpu-wheels/*.whl .whl/
# (.whl/ is ignored by git: whatever copies the checkout to the GPU machine must be told to take it along.)
# To refresh one, on a machine with network (NAME==VERSION, e.g. ripser==0.6.15; keep one version of each, since
# every wheel in .whl/ is installed; name a package's missing dependencies too, --no-deps fetches none):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION
# (pip matches each --platform exactly: if it finds nothing, add --platform manylinux_2_N_x86_64 for the N in the
# wheel's name on PyPI, e.g. 24 or 27).
# They are installed with `pip install --no-index --no-deps --target` into a temporary folder, which goes on
# PYTHONPATH with the project: nothing is installed into the machine's Python, and the project is not installed.
#
# Output: DIR/results.md (the machine; each step's command, exit code, wall time and limit; the engine tables, the
# test summaries and the overhead benchmark's output) and every step's full log in DIR/logs/, also packed in
# DIR/logs.tar.gz. Exit status 1 if any step failed, timed out or was not reached in the budget (the other steps
# run anyway and the results file is written); 0 otherwise. A step skipped for a reason the results file gives
# (the overhead benchmark without its --model option yet, the CPU setting) does not fail the check.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DEVICE=cuda
OUT=gpu_check_results
BUDGET=480
RUN_TESTS=1
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --no-tests) RUN_TESTS=0; shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $DEVICE in cuda | cpu) ;; *) echo "--device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac

mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/logs/*.log "$OUT"/logs/*.json "$OUT/results.md" "$OUT/logs.tar.gz"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX") || exit 2
trap 'rm -rf "$SITE"' EXIT

# the project and the wheels' folder on the path (the tests' subprocesses keep both: tests/procs.py's clean_env
# passes PYTHONPATH on after the repository); offline, unbuffered (a step cut by its limit keeps its log), seeded
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg
export TOKENIZERS_PARALLELISM=false HYPOTHESIS_PROFILE=ci

START=$(date +%s)
FAILED=0
ROWS=()

# record NAME STATUS EXIT WALL LIMIT COMMAND [NOTE]: one row of the results table; a failing status fails the check.
# The command is shown as LABEL when that is set (a `python -c` program does not fit in a table cell).
record() {
    local note=${7:-} shown=${LABEL:-$6}
    ROWS+=("| $1 | $2 | $3 | $4 s | $5 s | \`${shown//|/\\|}\` | $note |")
    case $2 in passed | skipped) ;; *) FAILED=1 ;; esac
    printf '[gpu_check] %-18s %-10s exit %-4s %4s s  %s\n' "$1" "$2" "$3" "$4" "$note"
}

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, its output in logs/NAME.log; sets STEP_RC. The limit is
# cut to what is left of the budget; a step that would get under 10 s is not started.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    local log="$OUT/logs/$name.log"
    if ((limit < 10)); then
        ((left < 0)) && left=0
        echo "not run: ${left} s left of the ${BUDGET} s budget" >"$log"
        record "$name" "not run" - 0 "$left" "$*" "budget spent"
        STEP_RC=125
        return
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    STEP_RC=$?
    local wall=$((SECONDS - t0))
    STEP_NOTE=""
    case $STEP_RC in
        0) STEP_STATUS=passed ;;
        124 | 137) STEP_STATUS="timed out" STEP_NOTE="cut at its ${limit} s limit" ;;
        *) STEP_STATUS=FAILED ;;
    esac
    STEP_ARGS=("$name" "$wall" "$limit" "$*")
}

# finish [STATUS NOTE]: record the step just run, with STATUS/NOTE overriding its own when given
finish() {
    local status=${1:-$STEP_STATUS} note=${2:-$STEP_NOTE}
    record "${STEP_ARGS[0]}" "$status" "$STEP_RC" "${STEP_ARGS[1]}" "${STEP_ARGS[2]}" "${STEP_ARGS[3]}" "$note"
}

run() {  # step + finish, for steps with nothing to add
    step "$@"
    [ "$STEP_RC" = 125 ] || finish
}

# ------------------------------------------------------------------------------------------------ environment
ENV_PY='
import platform, sys
import torch
device = sys.argv[1]
print("python", sys.version.split()[0], platform.machine(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| threads", torch.get_num_threads())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, f"sm_{props.major}{props.minor}", f"{props.total_memory / 2**30:.0f} GiB",
          "| nccl", ".".join(map(str, torch.cuda.nccl.version())))
    x = torch.randn(1024, 1024, device="cuda")
    print("smoke: matmul on the GPU ok,", float((x @ x).sum().isfinite()))
elif device == "cuda":
    sys.exit("torch sees no CUDA device: the CUDA steps would be skipped, not checked")
'
LABEL="$PY -c <environment and GPU smoke test>" run env 30 "$PY" -c "$ENV_PY" "$DEVICE"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/logs/env.log" 2>&1
fi

# ----------------------------------------------------------------------------------------------------- wheels
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    run wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "${WHEELS[@]}"
else
    echo "no .whl/*.whl: the packages are the interpreter's own" >"$OUT/logs/wheels.log"
    record wheels skipped - 0 0 "pip install --target (no .whl/)" "no .whl/: the interpreter's own packages"
fi
IMPORTS_PY='
import importlib
for name in ["topo_callbacks", "torch", "torchmetrics", "lightning", "accelerate", "transformers", "ripser",
             "persim", "gudhi", "numpy", "scipy", "sklearn", "hypothesis", "pytest"]:
    module = importlib.import_module(name)
    version = getattr(module, "__version__", "?")
    print(f"{name:15s} {version:12s} {module.__file__}")
try:
    import gph
    print("gph (giotto-ph)", getattr(gph, "__version__", "?"))
except ImportError:
    print("gph (giotto-ph) not installed: the engine benchmark leaves its column empty")
'
LABEL="$PY -c <import every package, print versions>" run imports 45 "$PY" -c "$IMPORTS_PY"

# The steps that measure come first (each is short), then the tests, then the engine benchmark: a budget cut (the
# first run on a GPU had no timings to size the limits by) takes the engine's larger sizes first.
# ------------------------------------------------------------------------------------------------- step syncs
# Host synchronisations per optimizer step with the monitor's per-step path (torch.cuda.set_sync_debug_mode): zero
# between the batched reads is the target (issue 24)
run step-syncs 60 "$PY" benchmarks/step_syncs.py --device "$DEVICE" --steps "$([ "$DEVICE" = cuda ] && echo 200 || echo 48)"

# --------------------------------------------------------------------------------------------- overhead bench
# The monitor's cost on realistic models (benchmarks/overhead.py --model): a GPU-sized model takes its warm-up,
# steps without and with the monitor, and the checks; 120 s each (the step is cut at the budget's end anyway).
for model in resnet18 gpt2; do
    name=overhead-$model
    cmd="$PY benchmarks/overhead.py --model $model --device $DEVICE"
    if [ "$DEVICE" = cpu ]; then
        echo "skipped: the GPU models run with --device cuda only" >"$OUT/logs/$name.log"
        record "$name" skipped - 0 0 "$cmd" "CPU setting: GPU models only"
    else
        run "$name" 120 "$PY" benchmarks/overhead.py --model "$model" --device "$DEVICE"
    fi
done

# ------------------------------------------------------------------------------------------------ step cost
# Where the per-step cost goes on a host-bound model (ResNet-18 at batch 128: 16% slower with every step read on an
# H200, 2026-12-04): wall time per arm, the monitor's own timing (what the budget steers by), kernel launches
if [ "$DEVICE" = cuda ]; then
    run step-cost-resnet18 100 "$PY" benchmarks/step_cost.py --model resnet18 --device cuda
else
    run step-cost-resnet18 60 "$PY" benchmarks/step_cost.py --model resnet18 --device cpu --quick
fi

# ------------------------------------------------------------------------------------------------ snapshots
# What on_alarm="rollback"'s snapshots cost (pinned host buffers, non-blocking copies on CUDA) and a restore checked
# bit for bit against a direct copy (issue 23)
if [ "$DEVICE" = cuda ]; then
    run snapshots-resnet18 60 "$PY" benchmarks/snapshots.py --model resnet18 --device cuda
    run snapshots-gpt2 90 "$PY" benchmarks/snapshots.py --model gpt2 --device cuda --blocks 4
else
    run snapshots-resnet18 60 "$PY" benchmarks/snapshots.py --model resnet18 --device cpu --quick
fi

# ------------------------------------------------------------------------------------------------------ tests
# tests/test_devices.py: every test on the CPU and, where there is one, on CUDA (engine against the CPU after resets
# and 1%/5%/100% moves, the collapse index, the Lightning monitor in fp32 and bf16-mixed, the neuron monitor; -m slow:
# Lightning ddp on one device (NCCL on a GPU), the gatherer across two ranks with rows on the device). And the
# engine's tests that draw the device. On CUDA any skip fails the step: a skipped CUDA test checked nothing.
ENGINE_TESTS=(tests/test_engine.py::test_cuda_matches_cpu_on_benchmark_like_clouds
    tests/test_engine.py::test_betti_after_edit_sequences_matches_gudhi
    tests/test_engine.py::test_float32_fast_path_matches_gudhi_after_a_move)
PYTEST=("$PY" -m pytest -q -rs)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout 200)  # a hung test fails alone, with a traceback, instead of the whole step's limit
fi
if [ "$DEVICE" = cuda ]; then
    SELECT=(-m "not slow")
    TEST_LIMIT=170
    DDP_LIMIT=100
else
    SELECT=(-m "not slow" -k "not bf16")
    TEST_LIMIT=100
    DDP_LIMIT=90
fi
pytest_step() {  # pytest_step NAME LIMIT PYTEST-ARGS...: a pytest run, failed on CUDA if anything was skipped
    step "$@"
    [ "$STEP_RC" = 125 ] && return
    if [ "$DEVICE" = cuda ] && [ "$STEP_RC" = 0 ] && grep -q '^SKIPPED' "$OUT/logs/$1.log"; then
        finish FAILED "tests skipped on a CUDA machine (see the log)"
    else
        finish
    fi
}
if [ "$RUN_TESTS" = 1 ]; then
    pytest_step tests "$TEST_LIMIT" "${PYTEST[@]}" "${SELECT[@]}" tests/test_devices.py "${ENGINE_TESTS[@]}"
    pytest_step tests-ddp "$DDP_LIMIT" "${PYTEST[@]}" -m slow tests/test_devices.py
else
    for name in tests tests-ddp; do
        echo "skipped: --no-tests" >"$OUT/logs/$name.log"
        record "$name" skipped - 0 0 "pytest tests/test_devices.py" "--no-tests"
    done
fi

# ---------------------------------------------------------------------------------------------- engine bench
# benchmarks/engine.py on the device, one run per size so that each has its own limit (rows are printed as they
# come: a run cut by its limit keeps the rows it finished). The peers (ripser, giotto-ph; CPU) only at the smallest.
if [ "$DEVICE" = cuda ]; then
    ENGINE_RUNS=("engine-2048|45|--sizes 2048 --dims 768 4096 --peers-up-to 2048"
        "engine-8192|60|--sizes 8192 --dims 768 4096 --no-peers --reps 1"
        "engine-16384|75|--sizes 16384 --dims 768 4096 --pcts 1 --no-peers --reps 1")
else
    ENGINE_RUNS=("engine-128|30|--sizes 128 --dims 16 32 --reps 1"
        "engine-256|30|--sizes 256 --dims 16 32 --no-peers --reps 1"
        "engine-384|30|--sizes 384 --dims 16 32 --pcts 1 --no-peers --reps 1")
fi
for spec in "${ENGINE_RUNS[@]}"; do
    IFS='|' read -r name limit args <<<"$spec"
    read -ra args <<<"$args"
    run "$name" "$limit" "$PY" benchmarks/engine.py --device "$DEVICE" "${args[@]}" --json "$OUT/logs/$name.json"
done

# ---------------------------------------------------------------------------------------------------- results
TOTAL=$(($(date +%s) - START))
{
    echo "# GPU check: --device $DEVICE"
    echo
    revision="not a git checkout"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        revision="commit $commit$(git diff --quiet HEAD || echo ' with uncommitted changes')"
    fi
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) CPUs, $revision; total ${TOTAL} s (budget ${BUDGET} s)."
    echo "Overall: $([ $FAILED = 0 ] && echo PASSED || echo FAILED)"
    echo
    echo '```'
    cat "$OUT/logs/env.log"
    echo '```'
    echo
    echo "| step | status | exit | wall | limit | command | note |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "## Tests"
    for name in tests tests-ddp; do
        echo
        echo "\`$name\` (last lines; full log in logs/$name.log):"
        echo '```'
        tail -n 25 "$OUT/logs/$name.log"
        echo '```'
    done
    echo
    echo "## Engine benchmark (benchmarks/engine.py --device $DEVICE)"
    for spec in "${ENGINE_RUNS[@]}"; do
        name=${spec%%|*}
        echo
        echo "\`$name\`: $(head -n 1 "$OUT/logs/$name.log")"
        echo
        # the rows as they were printed (a run cut by its limit has only those), then any disagreement line
        # each row as it was printed, once (the run prints its table again at the end, with the header; a run
        # cut by its limit has only the rows it finished), then any disagreement or error
        grep '^| data \|^|---' "$OUT/logs/$name.log" | head -n 2
        grep '^| \(gauss\|collapsed\) ' "$OUT/logs/$name.log" | awk '!seen[$0]++'
        grep -h 'DISAGREEMENT\|Error\|error:' "$OUT/logs/$name.log" | tail -n 5
    done
    echo
    echo "## Rollback snapshots (benchmarks/snapshots.py --device $DEVICE)"
    for name in snapshots-resnet18 snapshots-gpt2; do
        [ -f "$OUT/logs/$name.log" ] || continue
        echo
        echo "\`$name\`:"
        echo '```'
        tail -n 8 "$OUT/logs/$name.log"
        echo '```'
    done
    echo
    echo "## Per-step cost by part (benchmarks/step_cost.py --device $DEVICE)"
    echo '```'
    grep -v '^\(STAGE\|USDT\|\[W\)' "$OUT/logs/step-cost-resnet18.log" | tail -n 32
    echo '```'
    echo
    echo "## Step synchronisations (benchmarks/step_syncs.py --device $DEVICE)"
    echo '```'
    tail -n 15 "$OUT/logs/step-syncs.log"
    echo '```'
    echo
    echo "## Overhead benchmark (benchmarks/overhead.py --model M --device $DEVICE)"
    for model in resnet18 gpt2; do
        echo
        echo "\`overhead-$model\` (last lines):"
        echo '```'
        tail -n 30 "$OUT/logs/overhead-$model.log"
        echo '```'
    done
} >"$OUT/results.md"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
echo "[gpu_check] $([ $FAILED = 0 ] && echo PASSED || echo FAILED) in ${TOTAL} s; results: $OUT/results.md"
exit $FAILED
