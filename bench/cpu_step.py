"""One whole training step on the CPU: this project's srpo.py against TRL's GRPOTrainer doing the same work.

    pip install trl                                   # optional: without it only srpo's rows are printed
    python bench/cpu_step.py --steps 3 --rounds 2     # the table for bench/RESULTS.md (tens of minutes on 2 cores)

What is timed: a training step = generate 4 prompts x G=4 completions (at most 48 new tokens, temperature
0.7, top_p 1), score them with this repo's rule-based math reward, one clipped token-level GRPO update
(AdamW lr 2e-5, betas (0.9, 0.95), no weight decay, constant lr, grad-norm clip 1, no KL, fp32).
  srpo  `python srpo.py` with the CPU demo's settings of train.sh, but --no_hr (TRL has no history
        resampling) and math only. Step times come from the run's metrics.jsonl (t_gen + t_score +
        t_update), so model loading and the evaluations srpo.py runs before and after are not counted.
  TRL   GRPOTrainer on the same model (SmolLM2-135M-Instruct, read from the same GGUF file), the same
        prompts (the same chat, token for token: checked before training), the same reward. A step is
        timed by a TrainerCallback from on_step_begin to on_step_end: with steps_per_generation equal to
        gradient_accumulation_steps it holds one generation of 16 completions, their scoring and one
        optimizer step. By default (--trl_grad_accum 1) the update takes all 16 completions in one batch,
        whose activations took over 13 GiB here; --trl_grad_accum 4 splits it into 4 micro-batches, same result.
One difference is each system's real behaviour and kept: srpo's update skips groups whose G rewards are
all equal (zero advantage), TRL's forward and backward run over every completion.
Runs alternate srpo, TRL, srpo, TRL, ... each in a fresh process, so peak memory is per run. The first step
of each run is warm-up and not counted (when --steps > 1). Reported per system: the median over rounds of
s/step (itself the median over a run's steps), generated tokens/s and peak resident memory.
"""
import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The CPU demo of train.sh, minus history resampling; the evaluation is shrunk to one prompt because it
# is not measured (srpo.py always evaluates before and after), only waited for.
SRPO_ARGS = ["--no_hr", "--max_level", "2", "--max_prompts", "12", "--prompts_per_step", "4", "--G", "4",
             "--max_new_tokens", "48", "--lr", "2e-5", "--temperature", "0.7", "--micro_tokens", "1024",
             "--gen_slots", "16", "--eval_every", "0", "--eval_prompts", "1", "--eval_k", "1",
             "--eval_domains", "math", "--save_every", "0"]
SETTINGS = ("4 prompts x G=4, max 48 new tokens, temperature 0.7, AdamW lr 2e-5, grad clip 1, fp32, no KL, "
            "math reward, no HR")
TRL_INSTALL = "pip install trl   (an optional benchmark dependency, not in requirements.txt)"


def run_child(cmd: list[str], log_path: str, threads: int) -> int:
    """Runs cmd to completion, its output to log_path; returns its peak resident memory in bytes.
    Why wait4: getrusage(RUSAGE_CHILDREN) is a max over every child reaped so far, so the second run
    would inherit the first one's peak. os.wait4 returns the rusage of this one child, whose ru_maxrss
    (KiB on Linux) is the largest of its own peak and its reaped descendants' (the reward workers, small
    Python processes in both systems): the peak of the trainer process."""
    # Same threads for both; no GPU even where there is one: this is a CPU benchmark.
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if p.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        hint = " (killed: out of memory? TRL takes less with --trl_grad_accum 4)" if p.returncode == -9 else ""
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}{hint}; end of {log_path}:\n{tail}")
    return usage.ru_maxrss * 1024


def summarize(system: str, rnd: int, times: list[float], tokens: list[int], peak: int, zero_adv: float) -> dict:
    """A run's row. The first step warms up (allocator, thread pools, first-call paths): dropped if there are others."""
    if len(times) > 1:
        times, tokens = times[1:], tokens[1:]
    return {"system": system, "round": rnd, "s_per_step": statistics.median(times),
            "tok_s": sum(tokens) / sum(times),  # completion tokens (EOS included) over the same steps' time
            "peak_gib": peak / 2**30, "steps": len(times), "zero_adv": zero_adv}


def run_srpo(steps: int, out_dir: str, rnd: int, threads: int) -> dict:
    run_dir = os.path.join(out_dir, f"srpo-r{rnd}")
    shutil.rmtree(run_dir, ignore_errors=True)  # srpo.py resumes from a checkpoint in its out_dir: start fresh
    cmd = [sys.executable, "srpo.py", *SRPO_ARGS, "--total_steps", str(steps), "--stage1_steps", str(steps),
           "--out_dir", run_dir]
    peak = run_child(cmd, run_dir + ".log", threads)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r["type"] == "step"]
    assert len(recs) == steps, f"{run_dir}: {len(recs)} step records, expected {steps}"
    return summarize("srpo", rnd, [r["t_gen"] + r["t_score"] + r["t_update"] for r in recs],
                     [r["gen_tokens"] for r in recs], peak, statistics.mean(r["zero_adv"] for r in recs))


def run_trl(steps: int, out_dir: str, rnd: int, threads: int, grad_accum: int) -> dict:
    result = os.path.join(out_dir, f"trl-r{rnd}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trl_child", result, "--steps", str(steps),
           "--out_dir", out_dir, "--threads", str(threads), "--trl_grad_accum", str(grad_accum)]
    peak = run_child(cmd, os.path.join(out_dir, f"trl-r{rnd}.log"), threads)
    with open(result) as f:
        r = json.load(f)
    return summarize("TRL", rnd, r["times"], r["tokens"], peak, r["zero_adv"])


def trl_child(steps: int, result: str, out_dir: str, threads: int, grad_accum: int):
    """Runs in its own process: TRL's GRPOTrainer for `steps` steps; writes step times and token counts."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GgufConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards
    import datafile
    import srpo
    import weights

    torch.set_num_threads(threads)
    path = weights.resolve_model_path("default")
    tok = weights.load_tokenizer(path)
    # dequantize=True: a plain fp32 model, the weights srpo's model.py reads from the same file. Without it
    # transformers keeps a GGUF "quantizer" on the model (its weights are dense all the same) and Trainer
    # refuses to fine-tune a "purely quantized model".
    policy = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    # srpo.py stops a response at rollout.eos_token_ids(tok); TRL at the tokenizer's EOS plus the model's
    # generation_config.eos_token_id. For SmolLM2 both are [<|im_end|>]; asserted so a change shows.
    from rollout import eos_token_ids
    assert eos_token_ids(tok) == [tok.eos_token_id] == [policy.generation_config.eos_token_id], "EOS ids differ"

    # The same prompts, as the chat srpo.encode_prompt builds (one worked example, then the question).
    problems = datafile.load_problems(os.path.join(ROOT, "data/math_train.jsonl"), "math", 12, 2)
    q, a = rewards.EXAMPLES["math"]
    shot = [{"role": "user", "content": rewards.format_prompt(q, "math")}, {"role": "assistant", "content": a}]
    rows = [{"prompt": shot + [{"role": "user", "content": rewards.format_prompt(p.question, "math")}],
             "answer": p.reference} for p in problems]

    tokens, zero = [], []  # per step: completion tokens, fraction of groups with equal rewards
    sandbox = srpo.Config().sandbox  # srpo.py's default; math never runs the sandbox

    def math_reward(completions, answer, completion_ids, **_):
        tokens.append(sum(len(c) for c in completion_ids))  # TRL keeps the EOS token, as srpo's rollouts do
        texts = [c[0]["content"] for c in completions]    # decoded with skip_special_tokens, as in srpo.py
        scores = [s.reward for s in rewards.score_batch(texts, ["math"] * len(texts), answer,
                                                          workers=os.cpu_count(), sandbox=sandbox)]
        groups = [scores[i:i + 4] for i in range(0, len(scores), 4)]
        zero.append(sum(len(set(g)) == 1 for g in groups) / len(groups))
        return scores

    class StepTimer(TrainerCallback):
        """on_step_begin comes after the batch of prompts is fetched, on_step_end after optimizer.step
        and before logging: the step's generation, scoring, forward, backward and AdamW."""
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=os.path.join(out_dir, "trl-scratch"), max_steps=steps, seed=1234,
        # Batch sizes count completions: 16 = 4 prompts x 4, one generation per optimizer step. With
        # grad_accum 1 (the default) the forward and backward take all 16 at once; grad_accum 4 splits them
        # into micro-batches of 4 (srpo packs ~1024-token micro-batches), still one generation of 16 per step.
        per_device_train_batch_size=16 // grad_accum, num_generations=4, gradient_accumulation_steps=grad_accum,
        steps_per_generation=grad_accum,
        # in file order (srpo shuffles the same 12 prompts within an epoch: at 3 steps both see all 12)
        num_iterations=1, shuffle_dataset=False,
        max_completion_length=48, temperature=0.7, top_p=1.0, top_k=0, use_vllm=False,
        learning_rate=2e-5, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="dapo",  # "dapo": the token-level mean over the whole batch, as srpo
        scale_rewards="group",                    # (R - mean) / (std + 1e-4) within each group
        # TRL's defaults differ from TrainingArguments': bf16 and gradient checkpointing are on unless
        # turned off. srpo.py on a CPU runs fp32 and its memory plan leaves checkpointing off.
        # (activation_checkpointing is transformers 5's name; TRL's default sits on the old alias.)
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True)
    timer = StepTimer()
    trainer = GRPOTrainer(model=policy, reward_funcs=[math_reward], args=config, processing_class=tok,
                          train_dataset=Dataset.from_list(rows), callbacks=[timer])

    # TRL's own prompt tokenization (a private method: the path its generation takes) against srpo's.
    ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    for p, got in zip(problems, ids, strict=True):
        want = srpo.encode_prompt(tok, p, one_shot=True)
        if list(got) != want:
            raise SystemExit(f"prompt token ids differ for {p.id}:\n TRL  {list(got)}\n srpo {want}")
    print(f"prompt token ids: TRL == srpo for all {len(ids)} prompts", flush=True)

    trainer.train()
    assert len(timer.times) == len(tokens) == steps, (len(timer.times), len(tokens), steps)
    with open(result, "w") as f:
        json.dump({"times": timer.times, "tokens": tokens, "zero_adv": statistics.mean(zero)}, f)


def measure(steps: int = 3, rounds: int = 2, out_dir: str = os.path.join(ROOT, "runs/bench-cpu-step"),
            threads: int = os.cpu_count(), trl_grad_accum: int = 1) -> list[dict]:
    """Alternates srpo and TRL runs, `rounds` of each; returns one row per run (TRL's only if trl is installed)."""
    out_dir = os.path.abspath(out_dir)  # the children run in the repository root
    os.makedirs(out_dir, exist_ok=True)
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        print(f"trl is not installed: measuring srpo only. For the comparison: {TRL_INSTALL}")
    rows = []
    for rnd in range(rounds):
        for system in ("srpo", "TRL") if have_trl else ("srpo",):
            t = time.time()
            rows.append(run_srpo(steps, out_dir, rnd, threads) if system == "srpo" else
                        run_trl(steps, out_dir, rnd, threads, trl_grad_accum))
            print(f"round {rnd} {system}: {rows[-1]['s_per_step']:.1f} s/step, {rows[-1]['tok_s']:.1f} tok/s, "
                  f"peak {rows[-1]['peak_gib']:.2f} GiB (run took {time.time() - t:.0f}s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    agg = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        agg[system] = {k: statistics.median(r[k] for r in mine)
                       for k in ("s_per_step", "tok_s", "peak_gib", "zero_adv")}
    lines = ["| system | s/step | generated tok/s | peak memory GiB |", "|---|---|---|---|"]
    lines += [f"| {s} | {a['s_per_step']:.1f} | {a['tok_s']:.1f} | {a['peak_gib']:.2f} |" for s, a in agg.items()]
    if "TRL" in agg:
        ours, trl = agg["srpo"], agg["TRL"]
        lines.append(f"| ratio | TRL / srpo = {trl['s_per_step'] / ours['s_per_step']:.2f}x "
                     f"| srpo / TRL = {ours['tok_s'] / trl['tok_s']:.2f}x "
                     f"| srpo / TRL = {ours['peak_gib'] / trl['peak_gib']:.2f}x |")
    zero = ", ".join(f"{s} {a['zero_adv']:.2f}" for s, a in agg.items())
    lines.append(f"\nZero-advantage groups (fraction): {zero}. srpo's update skips them; TRL trains on "
                 f"them too (its real behaviour, kept).")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (the first is warm-up when > 1)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each system, alternating")
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "runs/bench-cpu-step"), help="runs' logs and metrics")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads, the same for both")
    ap.add_argument("--trl_grad_accum", type=int, default=1, choices=(1, 2, 4, 8, 16),
                    help="TRL's micro-batches per step (16 completions each step in all); 1 = one batch of 16")
    ap.add_argument("--trl_child", help=argparse.SUPPRESS)  # internal: one TRL run, results to this file
    args = ap.parse_args(argv)
    if args.trl_child:
        return trl_child(args.steps, args.trl_child, args.out_dir, args.threads, args.trl_grad_accum)
    rows = measure(args.steps, args.rounds, args.out_dir, args.threads, args.trl_grad_accum)
    import torch
    import transformers
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if importlib.util.find_spec("trl"):
        import trl
        versions += f", trl {trl.__version__}"
    print()
    print(table(rows))
    print(f"\nSettings: {SETTINGS}; {args.steps} steps per run (first = warm-up), {args.rounds} rounds, medians "
          f"over rounds; {args.threads} threads; TRL gradient accumulation {args.trl_grad_accum}.\n"
          f"{datetime.date.today()}, {machine()}; {versions}.")


if __name__ == "__main__":
    main()
