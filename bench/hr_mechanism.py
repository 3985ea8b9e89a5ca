"""Why history resampling (HR) drops what it drops: each pool prompt's pass rate under a policy, what
HR's rules would then drop at G = 4, 8, 16 and 32, and that prediction against a run's drop counts.

    # (a) each pool prompt's pass rate under a policy: N samples a prompt, the trainer's own sampler and
    #     reward; the srpo.py options after the script's own say which pool, model and sampling
    python bench/hr_mechanism.py rates --n 32 --out bench/hr-mech/base.jsonl -- \\
        --max_level 3 --max_prompts 64 --max_new_tokens 48 --temperature 0.7 [--model runs/X/policy]
    # (b) from those rates: how often each rule drops a prompt the policy does not reliably solve
    python bench/hr_mechanism.py predict bench/hr-mech/base.jsonl [--epochs 4] [--below 0.9]
    # (c) predicted against observed drops, epoch by epoch, for runs of that pool
    python bench/hr_mechanism.py observe bench/hr-mech/base.jsonl bench/hr-exp/srpo-s1 bench/hr-exp/grpo-s1

The prediction holds each prompt's pass rate p fixed over the epochs (the policy it was measured
under), so an epoch's G rollouts of a prompt are G coin flips of bias p, independent of the last
epoch's. A trained policy's rates move; measuring them under the base policy and under a trained
one brackets what a run sees. The posterior rule depends on all of a prompt's past rollouts, so its
drop probabilities are computed exactly by carrying the distribution of the success count, epoch by
epoch (drop_schedule), not by simulation.
"""
import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import curriculum  # noqa: E402
import datafile  # noqa: E402
import srpo  # noqa: E402

RULES = {"all_correct": curriculum.DropRule("all_correct"), "posterior": curriculum.DropRule("posterior")}

# -----------------------------------------------------------------------------
# (a) pass rates under a policy


def estimate_rates(argv: list[str], n: int, reward_fn=srpo.score_responses) -> list[dict]:
    """Each stage-1 pool prompt's pass rate: n samples of it at the run's temperature, scored by
    reward_fn (the trainer's, by default). argv: srpo.py options (pool, model, sampling, seed)."""
    import torch

    import memory
    from weights import load_model, load_tokenizer, resolve_model_path
    from common import inference_copy, share_of_free_memory
    cfg = srpo.parse_config(argv)
    path = resolve_model_path(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prec = memory.decide_precision(device.type, 1, sharded=False, dtype=cfg.dtype)  # as the trainer decides
    tok = load_tokenizer(path)
    sampler = load_model(path, dtype=torch.float32, device=device)
    sampler.eval().requires_grad_(False)
    if prec.compute != torch.float32:
        sampler = inference_copy(sampler, dtype=prec.compute, device=device)
    pool = datafile.load_problems(cfg.math_train, "math", cfg.max_prompts, cfg.max_level)
    prompt_ids = {p.id: srpo.encode_prompt(tok, p, cfg.one_shot) for p in pool}
    budget = share_of_free_memory(device, cfg.gen_mem)  # no memory plan here (no update): as on a CPU
    cache = memory.make_cache(sampler, pool, prompt_ids, cfg.max_new_tokens, cfg.gen_slots, budget,
                                f"--gen_mem {cfg.gen_mem} of what is free")
    rolls = srpo.sample_responses(sampler, cache, tok, pool, prompt_ids, n, cfg.temperature, cfg.seed,
                                  cfg.max_new_tokens, cfg.top_p, cfg.top_k)
    scores = reward_fn(tok, pool, rolls, cfg)
    correct = [0] * len(pool)
    for r, s in zip(rolls, scores):  # problem-major: rollout i belongs to pool[r.prompt_idx]
        correct[r.prompt_idx] += int(s.accuracy)
    return [{"id": p.id, "n": n, "correct": c, "rate": c / n} for p, c in zip(pool, correct)]


def read_rates(path: str) -> dict[str, float]:
    """id -> pass rate, from a file `rates` wrote."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rates = {r["id"]: float(r["rate"]) for r in rows}
    if len(rates) != len(rows):
        raise ValueError(f"{path}: a prompt id appears more than once")
    return rates

# -----------------------------------------------------------------------------
# (b) what each rule drops, given the rates


def drop_schedule(p: float, G: int, epochs: int, rule: curriculum.DropRule, hr: bool = True) -> list[float]:
    """For a prompt of pass rate p: the probability that HR drops it at the end of epoch 1, 2, ...,
    epochs (with hr, once dropped it is gone, so these sum to the chance of being dropped at all);
    with hr=False (a --no_hr run) the probability that HR *would* drop it at each epoch end.
    Exact: `alive` maps the success count after e epochs (e*G rollouts) to its probability mass."""
    binom = [math.comb(G, k) * p ** k * (1 - p) ** (G - k) for k in range(G + 1)]  # this epoch's successes
    alive, out = {0: 1.0}, []
    for e in range(epochs):
        nxt, dropped = {}, 0.0
        for s, mass in alive.items():
            for k, pk in enumerate(binom):
                if pk == 0.0:
                    continue
                s2, f2 = s + k, (e + 1) * G - s - k
                if k == G and rule.drops([True] * G, s2, f2):
                    dropped += mass * pk
                    if hr:
                        continue  # out of the pool for the rest of the stage
                nxt[s2] = nxt.get(s2, 0.0) + mass * pk
        alive = nxt
        out.append(dropped)
    return out


def predict(rates: dict[str, float], Gs: list[int], epochs: int, below: float) -> list[dict]:
    """Per G and rule: the share of the pool HR drops at each epoch end (expected), the chance that a
    prompt the policy does not reliably solve (rate < below) is dropped at the first epoch end and
    within `epochs`, and the share of the expected drops that are such prompts."""
    rows = []
    for G in Gs:
        for name, rule in RULES.items():
            sched = {pid: drop_schedule(p, G, epochs, rule) for pid, p in rates.items()}
            weak = [pid for pid, p in rates.items() if p < below]
            total, weak_total = sum(sum(s) for s in sched.values()), sum(sum(sched[pid]) for pid in weak)
            share = [sum(s[e] for s in sched.values()) / len(rates) for e in range(epochs)]
            nan = float("nan")
            rows.append({"G": G, "rule": name, "share_per_epoch": share,
                         "weak_first": sum(sched[pid][0] for pid in weak) / len(weak) if weak else nan,
                         "weak_within": weak_total / len(weak) if weak else nan,
                         "weak_share_of_drops": weak_total / total if total else nan})
    return rows


def predict_table(rows: list[dict], n_rates: int, epochs: int, below: float) -> str:
    lines = [f"{n_rates} prompts; 'weak' = pass rate < {below}; pass rates held fixed over {epochs} epochs",
             "", f"| G | rule | expected share of the pool dropped, epochs 1..{epochs} "
             f"| P(weak dropped) epoch 1 | "
             f"P(weak dropped) within {epochs} | weak share of drops |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['G']} | {r['rule']} | {', '.join(f'{x:.3f}' for x in r['share_per_epoch'])} | "
                     f"{r['weak_first']:.3f} | {r['weak_within']:.3f} | {r['weak_share_of_drops']:.2f} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# (c) predicted against observed: a run's epoch records


def observed(run: str) -> dict:
    """A run's config and its stage-1 epoch records: per epoch end, the prompts dropped (or, --no_hr,
    that HR would have dropped: None in --no_hr runs older than those counts) and, in runs that
    logged them, their ids (else None)."""
    cfg = json.load(open(os.path.join(run, "config.json")))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if r["type"] == "epoch" and r["stage"] == 1]
    logged = lambda key: [r[key] for r in epochs] if all(key in r for r in epochs) else None
    return {"cfg": cfg, "epochs": [r["epoch"] for r in epochs], "dropped": logged("dropped"),
            "ids": logged("dropped_ids")}


def run_rule(cfg: dict) -> curriculum.DropRule:
    """The rule a run used (runs older than --hr_rule used the report's)."""
    return curriculum.DropRule(cfg.get("hr_rule", "all_correct"), cfg.get("hr_tau", 0.9), cfg.get("hr_q", 0.5))


def compare_run(rates: dict[str, float], run: str, below: float) -> dict:
    """Predicted (from `rates`) and observed drops per epoch end of one run. The rates must cover the
    run's pool (its config's math_train, max_prompts and max_level name it): the rates of the 64-prompt
    pool cover the first 16 of it too."""
    obs = observed(run)
    cfg = obs["cfg"]
    path = cfg["math_train"] if os.path.isabs(cfg["math_train"]) else os.path.join(ROOT, cfg["math_train"])
    pool = [p.id for p in datafile.load_problems(path, "math", cfg["max_prompts"], cfg["max_level"])]
    missing = set(pool) - set(rates)
    if missing:
        raise ValueError(f"{run}: {len(missing)} of its pool's {len(pool)} prompts ({cfg['math_train']}) "
                         f"have no rate, e.g. {sorted(missing)[0]!r}: measure the rates with the run's "
                         f"--max_prompts and --max_level")
    n = len(obs["epochs"])
    scheds = [drop_schedule(rates[pid], cfg["G"], n, run_rule(cfg), hr=cfg["hr"]) for pid in pool]
    out = {"run": run, "G": cfg["G"], "hr": cfg["hr"], "rule": run_rule(cfg).name, "observed": obs["dropped"],
           "predicted": [sum(s[e] for s in scheds) for e in range(n)]}
    if obs["ids"] is not None:  # runs since the epoch records name the ids: how many of them were weak
        ids = [pid for epoch in obs["ids"] for pid in epoch]
        out["weak_dropped"] = (sum(rates[pid] < below for pid in ids), len(ids))
    return out


def observe_table(results: list[dict], below: float) -> str:
    lines = [f"| run | G | HR | rule | dropped per epoch end: observed | predicted "
             f"| weak (< {below}) of dropped ids |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        weak = "%d of %d" % r["weak_dropped"] if "weak_dropped" in r else "not logged"
        seen = "not logged" if r["observed"] is None else ", ".join(map(str, r["observed"]))
        predicted = ", ".join(f"{x:.1f}" for x in r["predicted"])
        lines.append(f"| {r['run']} | {r['G']} | {'on' if r['hr'] else 'off (would drop)'} | {r['rule']} | "
                     f"{seen} | {predicted} | {weak} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------


def main(argv=None, reward_fn=srpo.score_responses) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    a = sub.add_parser("rates", help="(a) pass rates under a policy; srpo.py options follow")
    a.add_argument("--n", type=int, default=32, help="samples per prompt")
    a.add_argument("--out", required=True, help="JSONL to write: id, n, correct, rate")
    b = sub.add_parser("predict", help="(b) each rule's drop probabilities from the rates")
    b.add_argument("rates")
    b.add_argument("--G", type=int, nargs="+", default=[4, 8, 16, 32])
    b.add_argument("--first", type=int, default=0,
                   help="only the first N prompts of the rates file, in the pool's order (0: all); the "
                        "G = 16 experiment's pool is the first 16 of the 64")
    c = sub.add_parser("observe", help="(c) predicted against observed drops of runs")
    c.add_argument("rates")
    c.add_argument("runs", nargs="+", help="run folders (metrics.jsonl, config.json)")
    for p in (b, c):
        p.add_argument("--below", type=float, default=0.9, help="a 'weak' prompt's pass rate is below this")
    b.add_argument("--epochs", type=int, default=4, help="epoch ends to follow")
    args, rest = ap.parse_known_args(argv)
    if args.part == "rates":
        if args.n < 1:
            raise ValueError(f"--n {args.n}: at least one sample per prompt")
        rows = estimate_rates([x for x in rest if x != "--"], args.n, reward_fn)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        mean = sum(r["rate"] for r in rows) / len(rows)
        return f"{len(rows)} prompts, mean pass rate {mean:.3f}: {args.out}"
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    rates = read_rates(args.rates)
    if args.part == "predict":
        if args.first:
            if not 0 < args.first <= len(rates):
                raise ValueError(f"--first {args.first}: the rates file {args.rates} has {len(rates)} prompts")
            rates = dict(list(rates.items())[:args.first])  # rates keeps the file's (the pool's) order
        rows = predict(rates, args.G, args.epochs, args.below)
        return predict_table(rows, len(rates), args.epochs, args.below)
    return observe_table([compare_run(rates, r, args.below) for r in args.runs], args.below)


if __name__ == "__main__":
    print(main())
