#!/usr/bin/env bash
# Every GPU check, in two parts that each fit one call of a lent GPU (the device tool: one command of
# at most 10 minutes, about 15 minutes of device time; each part's limits add up to 8 minutes):
#
#     bash bench/gpu_checks.sh 1            # part 1: the checks that matter most
#     bash bench/gpu_checks.sh 2            # part 2
#     bash bench/gpu_checks.sh              # both parts, one after the other (a user's own GPU)
#     bash bench/gpu_checks.sh --dry-run    # any machine, CPU included (.ci/run runs it): see below
#
# Part 1: a one-step `score train` and a `score eval` of a tiny model with the default config
# (bench/gpu_smoke.py), the CUDA tests (compiled in parallel when pytest-xdist is installed), the
# engine benchmark (two attempts vs transformers, nano-vllm's workload with and without async
# scheduling and CUDA graphs, decode bandwidth). Part 2: the training kernels against eager and
# torch's own attention, the FSDP2 training phase (MFU, with and without activation checkpointing),
# the fused log-prob tile sweep at the three LM heads, the per-op GPU profile.
#
# Each part installs the package without dependencies first (a lent machine has no network and its
# own torch and triton) and runs every check to the end under its own time limit, whatever failed
# before; logs go under $OUT (default ./gpu_out), the exit status says whether any check failed.
# Record what it prints in bench/RESULTS.md with the card and the date.
#
# --dry-run runs no GPU work: every check's command must resolve (scripts compile, every pytest
# selection collects), the smoke check runs on this machine's device, and every GPU benchmark's
# workload is validated at a reduced width (bench/gpu_workloads.py --check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
dry=0
part=all
for arg in "$@"; do
    case $arg in
        --dry-run) dry=1 ;;
        1 | 2) part=$arg ;;
        *) echo "gpu_checks.sh: unknown argument '$arg' (use 1, 2 or --dry-run)" >&2; exit 2 ;;
    esac
done

if [ "$dry" -eq 0 ]; then
    if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_checks.sh: no CUDA device here; these checks only mean something on a GPU (try --dry-run)" >&2
        exit 2
    fi
    if ! pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
        echo "gpu_checks.sh: pip install -e . failed, see $out/install.log" >&2
        tail -n 20 "$out/install.log" >&2
        exit 1
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        date -u
    } >"$out/device.txt" 2>&1
    cat "$out/device.txt"
fi

parallel=()
if python3 -c "import xdist" 2>/dev/null; then
    parallel=(-n 8)  # Triton compiles each kernel once per process: eight at a time on a cold cache
fi
failed=0

run() {  # run NAME SECONDS COMMAND...: under a time limit, logged to $out/NAME.log, its end shown
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=1
}

tests() {  # tests NAME SECONDS PYTEST-ARGS...: a pytest selection (collected only in a dry run)
    local name=$1 limit=$2
    shift 2
    if [ "$dry" -eq 1 ]; then
        run "$name" "$limit" python3 -m pytest --collect-only -q -p no:cacheprovider "$@"
    else
        run "$name" "$limit" python3 -m pytest -q -p no:cacheprovider -rs "${parallel[@]}" "$@"
    fi
}

benchmark() {  # benchmark NAME SECONDS FILE: a pytest-benchmark suite (collected only in a dry run)
    local name=$1 limit=$2 file=$3
    if [ "$dry" -eq 1 ]; then
        run "$name" "$limit" python3 -m pytest --collect-only -q -p no:cacheprovider "$file"
    else
        run "$name" "$limit" python3 -m pytest "$file" --benchmark-only -q -s -p no:cacheprovider
    fi
}

script() {  # script NAME SECONDS FILE ARGS...: a Python script (compiled only in a dry run)
    local name=$1 limit=$2 file=$3
    shift 3
    if [ "$dry" -eq 1 ]; then
        run "$name" "$limit" python3 -m py_compile "$file"
    else
        run "$name" "$limit" python3 "$file" "$@"
    fi
}

if [ "$part" != 2 ]; then
    # on a GPU and in a dry run alike: a dry run takes the CPU path of the same commands
    run smoke 120 python3 bench/gpu_smoke.py --out "$out/smoke"
    tests cuda_tests 150 tests/test_kernels_cuda.py tests/test_decode_step.py tests/test_inference_model.py \
        tests/test_async_scheduling.py
    benchmark bench_engine 150 bench/bench_engine.py
fi
if [ "$part" != 1 ]; then
    benchmark bench_training_kernels 90 bench/bench_training_kernels.py
    benchmark bench_fsdp_train 150 bench/bench_fsdp_train.py
    script sweep 90 bench/sweep_fused_logprob_tiles.py --all-shapes
    script profile_gpu_steps 60 bench/profile_gpu_steps.py
fi
if [ "$dry" -eq 1 ]; then
    run workloads 300 python3 bench/gpu_workloads.py --check
fi
exit $failed
