"""
The CPU path, measured side by side in one run against real peers, on the default model
(SmolLM2-135M-Instruct, fp32) and the demo's real prompts.

    python bench/cpu.py                      # all three parts (the third needs `pip install trl`)
    python bench/cpu.py --parts sampler,update

1. sampler: rollout.generate against transformers' generate() in the RL setting: G = 4 samples of
   each prompt (the chat the demo trains on: instructions, one worked example, the question),
   temperature 1, no top-k/top-p, every response exactly --new tokens (EOS ignored), at 16 and 64
   sequences (4 and 16 prompts). tok/s counts generated tokens over the whole call, prefill
   included, warm. "% floor" is the share of the compute floor reached: the time the call's matmul
   FLOPs (prefill and decode, flops.flops_per_token / 3 for a forward) would take at the fp32
   matmul rate measured here, over the time it took.
2. update: srpo.policy_update on real rollouts of the demo's prompts (G = 4, the demo's
   --max_new_tokens 48), shared prompts against unshared, every rollout trained (advantages +-1,
   so both do the whole batch). tok/s = response tokens per second of update.
3. step: a whole training step of srpo.py against TRL's GRPOTrainer on the same work
   (bench/cpu_step.py; runs alternate A, B, A, B).
Medians of --reps timed repeats after one warm-up; one markdown table per part.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memory  # noqa: E402
import datafile  # noqa: E402
import srpo  # noqa: E402
from flops import flops_per_token  # noqa: E402
from weights import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from rollout import KVCache, eos_token_ids, generate  # noqa: E402


def matmul_flops() -> float:
    """fp32 FLOP/s of a large square matmul: the compute floor's rate."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(a, b)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t)


def demo_prompts(tok, n: int) -> list[list[int]]:
    """The first n math training prompts at levels <= 2, as the demo encodes them."""
    problems = datafile.load_problems("data/math_train.jsonl", "math", n, 2)
    return [srpo.encode_prompt(tok, p, one_shot=True) for p in problems]


def timed(fn, reps: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_sampler(ours, hf, tok, new: int, reps: int, rate: float) -> list[str]:
    rows = ["| sequences | ours tok/s | generate() tok/s | x generate() | ours % floor | generate() % floor |",
            "|---|---|---|---|---|---|"]
    fwd = lambda seq: flops_per_token(ours.config, seq) / 3   # a forward's matmul FLOPs per token
    for n_prompts in (4, 16):
        prompts = demo_prompts(tok, n_prompts)
        B, G = 4 * n_prompts, 4
        cache = KVCache.for_model(ours, max_len=max(map(len, prompts)) + new, max_slots=B)
        t_ours, out = timed(lambda: generate(ours, prompts, n=G, max_new_tokens=new, eos_ids=(), seed=1,
                                             cache=cache), reps)
        assert all(len(r.tokens) == new for r in out)
        # transformers: left-padded prompts, num_return_sequences = G, the same sampling
        enc = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G, max_new_tokens=new,
                  min_new_tokens=new, pad_token_id=tok.pad_token_id or 0)
        with torch.no_grad():
            t_hf, gen = timed(lambda: hf.generate(**enc, **kw), reps)
        assert gen.shape == (B, enc["input_ids"].shape[1] + new), tuple(gen.shape)
        # FLOPs of the call: each prompt once per sample for generate() (it prefills G copies), once
        # for ours (its samples share the prefill); then B * new decoded tokens at growing context
        mean_p = sum(map(len, prompts)) / n_prompts
        decode = B * new * fwd(mean_p + new / 2)
        ours_flops = n_prompts * mean_p * fwd(mean_p / 2) + decode
        hf_flops = B * mean_p * fwd(mean_p / 2) + decode
        tps_ours, tps_hf = B * new / t_ours, B * new / t_hf
        rows.append(f"| {B} | {tps_ours:,.0f} | {tps_hf:,.0f} | {tps_ours / tps_hf:.2f} | "
                    f"{100 * ours_flops / rate / t_ours:.0f}% | {100 * hf_flops / rate / t_hf:.0f}% |")
    return rows


def bench_update(ours, tok, reps: int) -> list[str]:
    prompts = demo_prompts(tok, 4)
    cache = KVCache.for_model(ours, max_len=max(map(len, prompts)) + 48, max_slots=16)
    rolls = generate(ours, prompts, n=4, max_new_tokens=48, temperature=0.7, seed=1, cache=cache,
                     eos_ids=eos_token_ids(tok))
    samples = [srpo.Sample(prompts[r.prompt_idx] + r.tokens, len(prompts[r.prompt_idx]), r.logprobs,
                           1.0 if i % 2 else -1.0) for i, r in enumerate(rolls)]
    n_resp = sum(len(r.tokens) for r in rolls)
    prec = memory.decide_precision("cpu", 1, sharded=False)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    rows = ["| update | seconds | response tok/s | x unshared |", "|---|---|---|---|"]
    base = None
    for shared in (False, True):
        cfg = srpo.Config(micro_tokens=1024, lr=2e-5, temperature=0.7, shared_prompts=shared)
        opt = torch.optim.AdamW(ours.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        t, _ = timed(lambda: srpo.policy_update(ours, opt, samples, cfg, prec, "cpu"), reps)
        ours.load_state_dict(start)
        base = base or t
        rows.append(f"| {'shared' if shared else 'unshared'} prompts | {t:.2f} | {n_resp / t:,.0f} | {base / t:.2f} |")
    mean_p = sum(map(len, prompts)) / 4
    rows.append(f"\n(4 prompts of {mean_p:.0f} tokens on average, 16 rollouts, {n_resp} response tokens)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sampler,update,step")
    ap.add_argument("--new", type=int, default=64, help="tokens per response in the sampler part")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="training steps per run in the step part")
    ap.add_argument("--rounds", type=int, default=2, help="A, B rounds in the step part")
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.manual_seed(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    rate = matmul_flops()
    print(f"# {datetime.date.today()} | {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__} | fp32 matmul {rate / 1e9:.0f} GFLOP/s\n")
    path = resolve_model_path("default")
    tok = load_tokenizer(path)
    ours = load_model(path)
    if "sampler" in parts:
        from transformers import AutoModelForCausalLM
        folder, name = os.path.split(path)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        print(f"## sampler: {args.new} new tokens, T = 1, G = 4\n")
        print("\n".join(bench_sampler(ours.eval(), hf, tok, args.new, args.reps, rate)) + "\n")
        del hf
    if "update" in parts:
        print("## update: the demo's real rollouts, every one trained\n")
        print("\n".join(bench_update(ours.train(), tok, args.reps)) + "\n")
    if "step" in parts:
        import cpu_step
        print(f"## step: srpo.py against TRL's GRPOTrainer, {args.steps} steps a run, {args.rounds} rounds\n")
        cpu_step.main(["--steps", str(args.steps), "--rounds", str(args.rounds)])


if __name__ == "__main__":
    main()
