#!/usr/bin/env bash
# SRPO launches. Run from the repository root.
#
#   bash train.sh                        # the demo on the embedded SmolLM2-135M-Instruct (CPU or GPUs)
#   bash train.sh qwen /path/to/Qwen2.5-7B --math_train M --code_train C --math_test MT --code_test CT
#                                        # a paper-like run on one 8-GPU node, on public sets converted
#                                        # by data/convert.py (README, "A public data set")
#   bash train.sh grpo                   # the demo with history resampling off: the GRPO baseline
#
# Anything after those arguments goes to srpo.py unchanged, e.g. `bash train.sh demo --seed 2`.
# Every option is listed by `python srpo.py --help`.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-demo}
shift || true

# How many GPUs torchrun should use: all visible ones; none means one CPU process.
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")

if [ "$what" = "demo" ] || [ "$what" = "grpo" ]; then
    hr=$([ "$what" = "grpo" ] && echo --no_hr || echo --hr)
    if [ "$ngpu" -eq 0 ]; then
        # One CPU process, a configuration small enough for 2 cores and about 7 minutes (bench/RESULTS.md):
        # the easiest problems (levels 1-2, which the model solves about half the time: mixed groups),
        # 12 prompts per domain so an epoch is 3 steps and history resampling acts several times,
        # short answers, and a larger learning rate than the paper's (tuned for 32B models and
        # thousands of steps). Evaluation runs before and after, on held-out problems.
        python3 srpo.py $hr --out_dir runs/demo-$what-cpu \
            --max_level 2 --max_prompts 12 --prompts_per_step 4 --G 4 --max_new_tokens 48 \
            --total_steps 15 --stage1_steps 9 --lr 2e-5 --temperature 0.7 \
            --eval_prompts 24 --eval_k 2 --eval_every 0 --save_every 5 \
            --micro_tokens 1024 --gen_slots 16 --eval_humaneval 16 "$@"
    else
        # All visible GPUs, one process each. History resampling needs several epochs to act, so
        # the prompt set is capped to make epochs short.
        torchrun --standalone --nproc_per_node="$ngpu" srpo.py $hr --out_dir runs/demo-$what \
            --prompts_per_step 32 --G 8 --max_new_tokens 256 --total_steps 120 --stage1_steps 60 \
            --lr 5e-6 --eval_prompts 200 --eval_k 4 --eval_every 20 --save_every 20 \
            --max_prompts 512 --eval_humaneval 164 "$@"
    fi
elif [ "$what" = "qwen" ]; then
    # A paper-like configuration (the SRPO report, arXiv 2504.14286): G = 32 rollouts, constant lr 1e-6, AdamW (0.9, 0.95),
    # no KL, token-level loss, history resampling, stage 1 math then stage 2 math + code.
    # The paper used 256 prompts a step on a 32B model; 64 fits a 7B model on one 8-GPU node.
    # Memory: 16k-token micro-batches of a 7B model keep ~100 GiB of activations for the backward,
    # so the start-up memory plan (printed first) turns activation checkpointing on (--grad_ckpt
    # auto) and, if even that does not fit, lowers --micro_tokens, or stops naming what to change.
    # KV cache: what the memory plan leaves (about 96 slots per rank for 7B on 80 GB GPUs against 256
    # rollouts per rank: 3 generation waves); the run prints this plan, reward workers and the
    # sandbox mode before its first step.
    # Run `python bench/preflight.py` once on a new machine first: every GPU path, in minutes, with
    # a 2-rank check of CUDA graphs beside NCCL (if that fails, add --no_cuda_graphs).
    model=${1:?usage: bash train.sh qwen /path/to/Qwen2.5-checkpoint --math_train M --code_train C --math_test MT --code_test CT [options]}
    shift
    # Real data, converted by data/convert.py: the shipped procedural problems ("Calculate 59 - 22.")
    # are solved at once by a 7B model, every group is all-correct, history resampling empties the
    # pool and nothing is learned. So each data file must be given; none defaults to them here.
    missing=""
    for opt in --math_train --code_train --math_test --code_test; do
        case " $* " in *" $opt "* | *" $opt="*) ;; *) missing="$missing $opt" ;; esac
    done
    if [ -n "$missing" ]; then
        echo "train.sh qwen: missing$missing: give the converted public sets (README, \"A public data set\")," \
             "e.g. DeepScaleR or MATH for stage 1 and TACO, APPS or LiveCodeBench for stage 2" >&2
        exit 2
    fi
    torchrun --standalone --nproc_per_node="$ngpu" srpo.py --model "$model" --out_dir runs/qwen \
        --prompts_per_step 64 --G 32 --max_new_tokens 4096 --lr 1e-6 --kl_coef 0 \
        --stage1_steps 500 --total_steps 1000 --eval_every 50 --save_every 50 \
        --micro_tokens 16384 --grad_ckpt auto "$@"
    # Several nodes: the same torchrun command on each, with --nnodes N --node_rank I
    # --rdzv_backend c10d --rdzv_endpoint HOST:PORT in place of --standalone.
else
    echo "unknown launch '$what': use demo, grpo or qwen (see the top of train.sh)" >&2
    exit 2
fi
