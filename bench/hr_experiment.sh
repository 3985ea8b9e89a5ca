#!/usr/bin/env bash
# Does history resampling earn its keep? SRPO (HR on) against GRPO (--no_hr), 5 seeds each, on a
# CPU. The protocol (pre-registered before the first run) is in bench/RESULTS.md, section
# "History resampling against GRPO: the protocol".
#
#   bash bench/hr_experiment.sh            # every run not yet finished, then the comparison
#   SEEDS="1 2" bash bench/hr_experiment.sh  # a subset of seeds
#
# On 2 cores, seeds 2-5 ran as two instances side by side with one thread each
# (OMP_NUM_THREADS=1 SEEDS="2 4" ... and OMP_NUM_THREADS=1 SEEDS="3 5" ...): 1,900-2,400 s a run.
#
# Resumable: a finished run (its metrics end with the "after" evaluation) is skipped; a killed run
# continues from its last checkpoint (every 4 steps), and srpo.py truncates its metrics to that
# checkpoint, so the finished metrics are the same as an uninterrupted run's. Runs alternate arms
# (srpo s1, grpo s1, srpo s2, ...) so that a cut-off experiment is still balanced.
# Each finished run's metrics.jsonl and config.json are copied to bench/hr-exp/ARM-sSEED/.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
RUNS=${RUNS:-runs/hr-exp}

# The regime where HR is claimed to act: a pool of 64 prompts (8 a step, so an epoch is 8 steps and
# 32 steps are 4 epochs) spanning levels 1-3: level 1 the model soon solves always, levels 2-3 it
# can learn but mostly has not. Stage 1 (math) only. Evaluation: all 101 held-out math problems at
# levels 1-3, 4 samples each (404 per point), before training and every 8 steps (5 points).
common=(--max_level 3 --max_prompts 64 --prompts_per_step 8 --G 4 --max_new_tokens 48
        --total_steps 32 --stage1_steps 32 --lr 2e-5 --temperature 0.7
        --eval_prompts 101 --eval_k 4 --eval_domains math --eval_every 8 --save_every 4
        --micro_tokens 1024 --gen_slots 64)

finished() { [ -f "$1/metrics.jsonl" ] && grep -q '"tag": "after"' "$1/metrics.jsonl"; }

mkdir -p "$RUNS"
for s in $SEEDS; do
    for arm in srpo grpo; do
        out=$RUNS/$arm-s$s
        keep=bench/hr-exp/$arm-s$s
        if ! finished "$out"; then
            flag=$([ "$arm" = grpo ] && echo --no_hr || echo --hr)
            echo "== $arm seed $s -> $out ($(date -u +%H:%M:%S))"
            start=$(date +%s)
            # A run continues only at the commit it started at: its halves must be the same code.
            if [ -f "$out/commit" ] && [ "$(cat "$out/commit")" != "$(git rev-parse HEAD)" ]; then
                echo "$out was started at commit $(cat "$out/commit"), this is $(git rev-parse HEAD):" \
                     "continue it there (git worktree add DIR $(cat "$out/commit")), or remove $out" >&2
                exit 1
            fi
            mkdir -p "$out" && git rev-parse HEAD > "$out/commit"
            python3 srpo.py $flag --seed "$s" --out_dir "$out" "${common[@]}" > "$out.log" 2>&1 \
                || { echo "run $out failed; see $out.log" >&2; exit 1; }
            echo "   $(( $(date +%s) - start )) s"
        fi
        mkdir -p "$keep"
        cp "$out/metrics.jsonl" "$out/config.json" "$keep/"
        [ -f "$out/commit" ] && cp "$out/commit" "$keep/"  # the code the run was made with
    done
done

args=()
for arm in srpo grpo; do
    dirs=$(for s in $SEEDS; do printf "bench/hr-exp/%s-s%s," "$arm" "$s"; done)
    args+=("$(echo "$arm" | tr a-z A-Z)=${dirs%,}")
done
# 0.35: the target of "tokens to reach a target accuracy" in bench/RESULTS.md (about 0.03 above the start).
python3 bench/compare.py "${args[@]}" --metric pass1_math --target 0.35 --png bench/img/hr-experiment.png
