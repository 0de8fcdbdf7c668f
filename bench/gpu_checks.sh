#!/usr/bin/env bash
# Every GPU check of the engine and training-kernel work in one run, sized for one call of a lent
# GPU (the device tool: one command of at most 10 minutes, about 15 minutes of device time):
#
#     bash bench/gpu_checks.sh                    # every check; logs under $OUT (default ./gpu_out)
#     bash bench/gpu_checks.sh cuda_tests sweep   # only the checks named (to split over two calls)
#
# Installs the package without dependencies (the lent machine has no network and its own torch and
# triton), then runs, each under its own time limit so that one hang cannot eat the rest: the CUDA
# tests, the engine benchmark (two-attempt vs transformers, nano-vllm's workload with and without
# async scheduling and CUDA graphs, decode bandwidth), the training kernels against eager, the
# FSDP2 training phase (MFU), the per-op GPU profile and the fused log-prob tile sweep at
# D = 4,096. Record what it prints in bench/RESULTS.md with the card and the date.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: no CUDA device here; these checks only mean something on a GPU" >&2
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

failed=0
wanted=" $* "
check() {  # check NAME SECONDS COMMAND...: run it under a limit, log to $out/NAME.log, show the end
    local name=$1 limit=$2
    shift 2
    if [ -n "${wanted// /}" ] && [[ "$wanted" != *" $name "* ]]; then
        return 0  # not among the checks named on the command line
    fi
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; failed=1; }
}

check cuda_tests 120 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_cuda.py tests/test_decode_step.py tests/test_fused_qkv.py tests/test_async_scheduling.py
check bench_engine 150 python3 -m pytest bench/bench_engine.py --benchmark-only -q -s -p no:cacheprovider
check bench_training_kernels 90 python3 -m pytest bench/bench_training_kernels.py --benchmark-only -q -s \
    -p no:cacheprovider
check bench_fsdp_train 90 python3 -m pytest bench/bench_fsdp_train.py --benchmark-only -q -s -p no:cacheprovider
check profile_gpu_steps 60 python3 bench/profile_gpu_steps.py
check sweep 90 python3 bench/sweep_fused_logprob_tiles.py
exit $failed
