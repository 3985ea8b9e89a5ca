#!/usr/bin/env bash
# Does history resampling earn its keep, and when? The pre-registered experiments of bench/RESULTS.md,
# on a CPU, one command each:
#
#   bash bench/hr_experiment.sh            # hr1: SRPO against GRPO at G = 4, 5 seeds each (issue 13,
#                                          #   section "History resampling against GRPO: the protocol")
#   bash bench/hr_experiment.sh g4         # the posterior drop rule at G = 4 against the G = 4 controls,
#                                          #   and the mechanism's pass rates (issue 25, section "History
#   bash bench/hr_experiment.sh g16        # SRPO against GRPO at G = 16      resampling in its own regime")
#   SEEDS="1 2" bash bench/hr_experiment.sh g16   # a subset of seeds
#   bash bench/hr_experiment.sh report     # every experiment side by side, once all have run: each one's
#                                          #   difference with its 95% interval (compare.py --differences)
#   bash bench/hr_experiment.sh g16 report # one experiment's report from its kept runs (bench/hr-exp2/g16),
#                                          #   running nothing: where the runs were made elsewhere
#
# Run it in a git worktree at one fixed commit (git worktree add ../srpo-exp COMMIT), niced; on the
# 2-core machine, two instances side by side with one thread each, as the first experiment's seeds 2-5:
#   OMP_NUM_THREADS=1 SEEDS="1 3 5" nice bash bench/hr_experiment.sh g16 &
#   OMP_NUM_THREADS=1 SEEDS="2 4" nice bash bench/hr_experiment.sh g16 &
# On 2 cores, hr1's seeds 2-5 ran that way: 1,900-2,400 s a run.
#
# Resumable: a finished run (its metrics end with the "after" evaluation) is skipped; a killed run
# continues from its last checkpoint (every 4 steps), and srpo.py truncates its metrics to that
# checkpoint, so the finished metrics are the same as an uninterrupted run's. A run continues only at
# the commit it started at. Runs alternate arms (seed 1 of every arm, then seed 2, ...) so that a
# cut-off experiment is still balanced. Each finished run's metrics.jsonl, config.json and commit are
# copied to bench/hr-exp/ (hr1) or bench/hr-exp2/EXPERIMENT/ (g4, g16): commit them as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=${1:-hr1}
SEEDS=${SEEDS:-"1 2 3 4 5"}

# The regime where HR is claimed to act (hr1's, kept for g4): a pool of 64 prompts (8 a step, so an
# epoch is 8 steps and 32 steps are 4 epochs) spanning levels 1-3: level 1 the model soon solves
# always, levels 2-3 it can learn but mostly has not. Stage 1 (math) only. Evaluation: all 101
# held-out math problems at levels 1-3, 4 samples each (404 per point), before training and every 8
# steps (5 points).
common=(--max_level 3 --max_new_tokens 48 --total_steps 32 --stage1_steps 32 --lr 2e-5 --temperature 0.7
        --eval_prompts 101 --eval_k 4 --eval_domains math --eval_every 8 --save_every 4
        --micro_tokens 1024 --gen_slots 64)
g4=(--max_prompts 64 --prompts_per_step 8 --G 4)
# G = 16 at the same 32 rollouts a step: 2 prompts a step, so a pool of 16 keeps an epoch at 8 steps
# and 32 steps at 4 epochs (HR acts at steps 8, 16, 24): the pool shrinks, not the epochs.
g16=(--max_prompts 16 --prompts_per_step 2 --G 16)
case $EXP in
    hr1) arms="srpo grpo"; size=("${g4[@]}"); RUNS=${RUNS:-runs/hr-exp}; KEEP=bench/hr-exp ;;
    g4)  arms="post"; size=("${g4[@]}"); RUNS=${RUNS:-runs/hr-exp2/g4}; KEEP=bench/hr-exp2/g4 ;;
    g16) arms="srpo grpo"; size=("${g16[@]}"); RUNS=${RUNS:-runs/hr-exp2/g16}; KEEP=bench/hr-exp2/g16 ;;
    report) ;;
    *) echo "unknown experiment '$EXP': hr1, g4, g16 or report" >&2; exit 2 ;;
esac

arm_flags() {  # the one thing the arms differ in
    case $1 in
        srpo) echo --hr ;;                     # the report's rule: all rollouts of the epoch right
        grpo) echo --no_hr ;;
        post) echo --hr --hr_rule posterior ;; # and P(pass rate > 0.9) > 0.5 over the stage's rollouts
    esac
}

finished() { [ -f "$1/metrics.jsonl" ] && grep -q '"tag": "after"' "$1/metrics.jsonl"; }

all_arms() {  # the arms a seed has: g4's controls SRPO and GRPO beside its new arm
    echo $arms $([ "$EXP" = g4 ] && echo srpo grpo)
}

run_one() {  # ARM SEED: run (or finish) it, then copy what it measured to $KEEP
    local arm=$1 s=$2 out=$RUNS/$1-s$2 keep=$KEEP/$1-s$2 start
    if ! finished "$out"; then
        echo "== $EXP: $arm seed $s -> $out ($(date -u +%H:%M:%S))"
        start=$(date +%s)
        # A run continues only at the commit it started at: its halves must be the same code. The
        # commit is kept beside the run folder (as its log is): srpo.py writes only into a folder
        # that is new or its own.
        if [ -f "$out.commit" ] && [ "$(cat "$out.commit")" != "$(git rev-parse HEAD)" ]; then
            echo "$out was started at commit $(cat "$out.commit"), this is $(git rev-parse HEAD):" \
                 "continue it there (git worktree add DIR $(cat "$out.commit")), or remove $out" >&2
            exit 1
        fi
        mkdir -p "$(dirname "$out")" && git rev-parse HEAD > "$out.commit"
        # shellcheck disable=SC2046
        python3 srpo.py $(arm_flags "$arm") --seed "$s" --out_dir "$out" "${common[@]}" "${size[@]}" \
            > "$out.log" 2>&1 || { echo "run $out failed; see $out.log" >&2; exit 1; }
        echo "   $(( $(date +%s) - start )) s"
    fi
    mkdir -p "$keep"
    cp "$out/metrics.jsonl" "$out/config.json" "$keep/"
    [ -f "$out.commit" ] && cp "$out.commit" "$keep/commit"  # the code the run was made with
}

dirs() {  # ROOT ARM: the kept runs of ARM, one per seed, comma-separated
    for s in $SEEDS; do printf "%s/%s-s%s," "$1" "$2" "$s"; done | sed 's/,$//'
}

if [ "$EXP" = report ]; then
    # The G = 4 controls of experiment (i): the first experiment's runs if they were reproduced.
    c=$(cat bench/hr-exp2/g4/controls)
    g4=(); [ "$c" = bench/hr-exp ] || g4=("G4 at the fixed commit:SRPO=$(dirs "$c" srpo)"
                                         "G4 at the fixed commit:GRPO=$(dirs "$c" grpo)")
    python3 bench/compare.py --differences --metric pass1_math --png bench/img/hr-differences.png \
        "G4, first experiment:SRPO=$(dirs bench/hr-exp srpo)" "G4, first experiment:GRPO=$(dirs bench/hr-exp grpo)" \
        "${g4[@]}" \
        "G4 posterior rule:POST=$(dirs bench/hr-exp2/g4 post)" "G4 posterior rule:GRPO=$(dirs "$c" grpo)" \
        "G4 posterior vs report's rule:POST=$(dirs bench/hr-exp2/g4 post)" \
        "G4 posterior vs report's rule:SRPO=$(dirs "$c" srpo)" \
        "G16:SRPO=$(dirs bench/hr-exp2/g16 srpo)" "G16:GRPO=$(dirs bench/hr-exp2/g16 grpo)"
    exit 0
fi

check_kept() {  # the report of runs made elsewhere: every kept run must have finished
    local c s arm missing=""
    c=$(cat bench/hr-exp2/g4/controls 2>/dev/null || echo bench/hr-exp)
    for s in $SEEDS; do
        for arm in $(all_arms); do
            local root=$KEEP; [ "$EXP" = g4 ] && [ "$arm" != post ] && root=$c
            finished "$root/$arm-s$s" || missing="$missing $root/$arm-s$s"
        done
    done
    [ -z "$missing" ] || { echo "no finished run in:$missing" >&2; exit 1; }
}

make_runs() {  # every run not finished yet; in g4, the instance with seed 2 first decides on the controls
    mkdir -p "$RUNS" "$KEEP"
    if [ "$EXP" = g4 ] && [[ " $SEEDS " == *" 2 "* ]]; then
        # The committed G = 4 runs (bench/hr-exp, commit 991c337) may serve as controls only if this commit
        # reproduces them: seed 2 of each arm again (seed 2 ran with OMP_NUM_THREADS=1, as these will),
        # every committed field compared (bench/hr_stats.py reproduces). Otherwise every control runs again.
        # The instance whose SEEDS hold 2 decides; another waits for the decision before its first control.
        run_one srpo 2
        run_one grpo 2
        if [ ! -f "$KEEP/controls" ]; then
            log=$KEEP/reproduction.txt
            if python3 bench/hr_stats.py reproduces "$KEEP/srpo-s2" bench/hr-exp/srpo-s2 > "$log" \
               && python3 bench/hr_stats.py reproduces "$KEEP/grpo-s2" bench/hr-exp/grpo-s2 >> "$log"; then
                echo bench/hr-exp > "$KEEP/controls"
            else
                echo "$KEEP" > "$KEEP/controls"
            fi
            cat "$log"
        fi
        # The mechanism: each pool prompt's pass rate under the base policy and under SRPO seed 2's final
        # policy, 32 samples each, with the runs' sampling options (bench/hr_mechanism.py).
        mkdir -p bench/hr-exp2/mechanism
        for pol in base srpo-s2; do
            f=bench/hr-exp2/mechanism/$pol.jsonl
            if [ ! -f "$f" ]; then
                model=$([ "$pol" = base ] && echo default || echo "$RUNS/$pol/policy")
                python3 bench/hr_mechanism.py rates --n 32 --out "$f" -- --model "$model" --seed 1 \
                    "${common[@]}" "${g4[@]}"
            fi
        done
    fi

    for s in $SEEDS; do
        for arm in $(all_arms); do
            if [ "$EXP" = g4 ] && [ "$arm" != post ]; then
                until [ -f "$KEEP/controls" ]; do sleep 60; done
                [ "$(cat "$KEEP/controls")" = bench/hr-exp ] && continue  # the committed runs serve
            fi
            run_one "$arm" "$s"
        done
    done
}

case ${2:-} in
    report) check_kept ;;
    "") make_runs ;;
    *) echo "unknown second argument '$2': report or nothing" >&2; exit 2 ;;
esac

# The report: compare.py's intervals and two-sided tests for each pair, then the pre-registered
# one-sided tests (hr_stats.py) and the mechanism (hr_mechanism.py).
case $EXP in
    hr1)
        # 0.35: the target of "tokens to reach a target accuracy" in bench/RESULTS.md (about 0.03 above
        # the start).
        python3 bench/compare.py "SRPO=$(dirs bench/hr-exp srpo)" "GRPO=$(dirs bench/hr-exp grpo)" \
            --metric pass1_math --target 0.35 --png bench/img/hr-experiment.png ;;
    g4)
        c=$(cat "$KEEP/controls")
        post="POST=$(dirs "$KEEP" post)"
        python3 bench/compare.py "$post" "GRPO=$(dirs "$c" grpo)" "SRPO=$(dirs "$c" srpo)" \
            --metric pass1_math --target 0.35 --png bench/img/hr-experiment-g4.png
        python3 bench/compare.py "$post" "SRPO=$(dirs "$c" srpo)" --metric pass1_math --target 0.35
        python3 bench/hr_stats.py noninferior "$post" "GRPO=$(dirs "$c" grpo)" --margin 0.05
        for pol in base srpo-s2; do
            python3 bench/hr_mechanism.py predict "bench/hr-exp2/mechanism/$pol.jsonl"
            # shellcheck disable=SC2046
            python3 bench/hr_mechanism.py observe "bench/hr-exp2/mechanism/$pol.jsonl" \
                $(dirs "$KEEP" post | tr , ' ') $(dirs "$c" srpo | tr , ' ') $(dirs "$c" grpo | tr , ' ')
        done ;;
    g16)
        # the G = 4 runs to contrast with: experiment (i)'s controls
        c=$(cat bench/hr-exp2/g4/controls 2>/dev/null || echo "bench/hr-exp")
        python3 bench/compare.py "SRPO16=$(dirs "$KEEP" srpo)" "GRPO16=$(dirs "$KEEP" grpo)" \
            --metric pass1_math --png bench/img/hr-experiment-g16.png
        python3 bench/hr_stats.py interaction "SRPO16=$(dirs "$KEEP" srpo)" "GRPO16=$(dirs "$KEEP" grpo)" \
            "SRPO4=$(dirs "$c" srpo)" "GRPO4=$(dirs "$c" grpo)"
        for pol in base srpo-s2; do
            f=bench/hr-exp2/mechanism/$pol.jsonl
            # shellcheck disable=SC2046
            if [ -f "$f" ]; then
                python3 bench/hr_mechanism.py predict "$f" --first 16  # this experiment's pool
                python3 bench/hr_mechanism.py observe "$f" \
                    $(dirs "$KEEP" srpo | tr , ' ') $(dirs "$KEEP" grpo | tr , ' ')
            fi
        done ;;
esac
