"""The second history-resampling experiment's pre-registered tests (bench/RESULTS.md, "History
resampling in its own regime: the protocol"), beside bench/compare.py's two-sided ones:

    # H1, at G = 4: the posterior rule is not worse than GRPO by more than the margin (one-sided)
    python bench/hr_stats.py noninferior POST=DIR,DIR,... GRPO=DIR,DIR,... --margin 0.05 --metric pass1_math
    # H2: SRPO - GRPO is larger at G = 16 than at G = 4 (one-sided difference of differences)
    python bench/hr_stats.py interaction SRPO16=... GRPO16=... SRPO4=... GRPO4=... --metric pass1_math
    # the check that decides whether the committed G = 4 runs may serve as controls (exit status 1 if not)
    python bench/hr_stats.py reproduces runs/hr-exp2/g4/srpo-s2 bench/hr-exp/srpo-s2

Each LABEL=DIR[,DIR...] is one arm, one run folder per seed, read by compare.py. Both primary
metrics of the first experiment are tested (final held-out pass@1, the area under the pass@1-vs-step
curve); each test is Welch's t and an exact permutation test, one-sided, at the 5% level, and a
hypothesis holds on a metric when both give p < 0.05.
"""
import argparse
import json
import math
import os
import statistics
import sys

import numpy as np
from scipy import stats

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # appended: the root's rewards.py stays first
import compare  # noqa: E402


def exact_permutation_p(a: list[float], b: list[float]) -> float:
    """One-sided exact permutation p of mean(a) - mean(b) being this large: the share of all splits of
    the pooled values into groups of len(a) and len(b) (252 for 5 and 5) whose difference is at least
    the observed one (scipy allows for float noise in ties)."""
    diff = lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis)
    return float(stats.permutation_test((a, b), diff, permutation_type="independent", alternative="greater",
                                        n_resamples=np.inf, vectorized=True).pvalue)


def noninferiority(a: list[float], b: list[float], margin: float) -> dict:
    """H0: mean(a) - mean(b) <= -margin against H1: > -margin (a is not worse than b by the margin).
    Welch's t on a + margin against b, its one-sided 95% lower bound on the difference, and the exact
    permutation p of the same shifted samples."""
    shifted = [x + margin for x in a]
    res = stats.ttest_ind(shifted, b, equal_var=False, alternative="greater")
    lower = float(res.confidence_interval(0.95).low) - margin
    return {"diff": statistics.mean(a) - statistics.mean(b), "lower": lower, "t": float(res.statistic),
            "df": float(res.df), "p_welch": float(res.pvalue), "p_perm": exact_permutation_p(shifted, b)}


def welch_contrast(groups: list[list[float]], signs: list[int]) -> tuple[float, float, float]:
    """sum(sign * mean) over independent groups: (estimate, standard error, Welch-Satterthwaite df)."""
    v = [statistics.variance(g) / len(g) for g in groups]
    est = sum(s * statistics.mean(g) for s, g in zip(signs, groups))
    df = sum(v) ** 2 / sum(vi ** 2 / (len(g) - 1) for vi, g in zip(v, groups)) if sum(v) else math.inf
    return est, math.sqrt(sum(v)), df


def interaction(a16: dict, b16: dict, a4: dict, b4: dict) -> dict:
    """H0: (SRPO - GRPO at G = 16) <= (SRPO - GRPO at G = 4) against H1: >. Each argument maps
    seed -> value. Primary: the seed-paired differences d = SRPO_s - GRPO_s of each experiment (a
    seed's two runs share the first epoch exactly), the 5 d's at G = 16 against the 5 at G = 4 by
    Welch's t and the exact permutation test, one-sided; with the two-sided 95% interval of the
    difference of differences. Secondary: the unpaired contrast of the four arms' means (Welch)."""
    d16 = [a16[s] - b16[s] for s in sorted(set(a16) & set(b16))]
    d4 = [a4[s] - b4[s] for s in sorted(set(a4) & set(b4))]
    if min(len(d16), len(d4)) < 2:
        raise ValueError(f"pairing by seed left {len(d16)} (G = 16) and {len(d4)} (G = 4) differences: "
                         f"need 2 each")
    res = stats.ttest_ind(d16, d4, equal_var=False, alternative="greater")
    two = stats.ttest_ind(d16, d4, equal_var=False).confidence_interval(0.95)
    est, se, df = welch_contrast([list(g.values()) for g in (a16, b16, a4, b4)], [1, -1, -1, 1])
    p_unpaired = float(stats.t.sf(est / se, df)) if se else float(est <= 0)
    m16, m4 = statistics.mean(d16), statistics.mean(d4)
    return {"d16": m16, "d4": m4, "dd": m16 - m4, "low": float(two.low), "high": float(two.high),
            "t": float(res.statistic), "df": float(res.df), "p_welch": float(res.pvalue),
            "p_perm": exact_permutation_p(d16, d4), "n": (len(d16), len(d4)),
            "unpaired": (est, se, df, p_unpaired)}


# Wall-clock fields differ from run to run; everything else of a record must come back.
TIMES = {"t_gen", "t_score", "t_update", "tok_s"}
# Floats computed from counts (or set by an option): equal exactly, not nearly.
COUNTED = {"reward", "acc_math", "acc_code", "zero_adv", "resp_len", "tokens", "tokens_trained", "lr"}


def reproduces(new: str, old: str) -> list[str]:
    """Where run folder `new` fails to reproduce the committed run `old`: [] when every record of old's
    metrics.jsonl comes back in new's, in order, field for field (fields new added are not compared):
    counts and counted floats (COUNTED, pass1_*) exactly, other floats (loss, ratio, kl, entropy,
    grad_norm, clip_frac) within 1e-4 relative (1e-6 absolute, for KLs near 0), wall times not at all."""
    read = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl")) if x.strip()]
    a, b = read(old), read(new)
    if len(a) != len(b):
        return [f"{len(b)} records in {new}, {len(a)} in {old}"]
    diffs = []
    for i, (ra, rb) in enumerate(zip(a, b), 1):
        for k, va in ra.items():
            vb = rb.get(k)
            if k in TIMES:
                continue
            exact = not isinstance(va, float) or k in COUNTED or k.startswith("pass1_")
            near = isinstance(vb, float) and math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6)
            if (va != vb) if exact else not near:
                where = f"record {i} ({ra.get('type')} at step {ra.get('step')})"
                diffs.append(f"{where}: {k} = {vb!r}, committed {va!r}")
    return diffs


def by_seed(runs: list, value) -> dict:
    seeds = [r.seed for r in runs]
    if None in seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"runs {[r.path for r in runs]} need distinct seeds in their config.json to pair: "
                         f"{seeds}")
    return {r.seed: value(r) for r in runs}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("test", choices=("noninferior", "interaction", "reproduces"))
    ap.add_argument("groups", nargs="+", help="LABEL=DIR[,DIR...]: noninferior NEW GRPO; interaction SRPO16 "
                                              "GRPO16 SRPO4 GRPO4; reproduces NEW_DIR COMMITTED_DIR")
    ap.add_argument("--metric", default="pass1_math", help="pass1_math, pass1_code or pass1_mean")
    ap.add_argument("--margin", type=float, default=0.05, help="noninferior: how much worse is not worse")
    args = ap.parse_args(argv)
    if args.test == "reproduces":
        if len(args.groups) != 2:
            raise ValueError(f"reproduces takes a new run folder and a committed one, got {args.groups}")
        diffs = reproduces(*args.groups)
        new, old = args.groups
        text = (f"{new} reproduces {old}" if not diffs else
                f"{new} does NOT reproduce {old} ({len(diffs)} differences):\n" + "\n".join(diffs[:20]))
        print(text)
        if diffs:
            raise SystemExit(1)  # the experiment script decides on this status
        return text
    want = 2 if args.test == "noninferior" else 4
    if len(args.groups) != want:
        raise ValueError(f"{args.test} takes {want} LABEL=DIRS groups, got {len(args.groups)}")
    groups = compare.parse_groups(args.groups, args.metric)
    labels = list(groups)
    lines = []
    if args.test == "noninferior":
        lines += [f"{labels[0]} not worse than {labels[1]} by more than {args.margin} on {args.metric} "
                  f"(H0: difference <= -{args.margin}; one-sided tests)", "",
                  "| metric | difference | one-sided 95% lower bound | Welch t (df), p | permutation p "
                  "| not worse? |",
                  "|---|---|---|---|---|---|"]
        for name, value in compare.PRIMARY:
            r = noninferiority(*[[value(x) for x in groups[l]] for l in labels], args.margin)
            ok = "yes" if max(r["p_welch"], r["p_perm"]) < 0.05 else "not shown"
            lines.append(f"| {name} | {r['diff']:+.3f} | {r['lower']:+.3f} | {r['t']:.2f} ({r['df']:.1f}), "
                         f"{r['p_welch']:.3f} | {r['p_perm']:.3f} | {ok} |")
    else:
        lines += [f"({labels[0]} - {labels[1]}) - ({labels[2]} - {labels[3]}) on {args.metric}, seed-paired "
                  f"differences (H0: <= 0; one-sided tests; interval two-sided)", "",
                  "| metric | first difference | second difference | difference of differences [95% CI] | "
                  "Welch t (df), p | permutation p | larger? | unpaired contrast: estimate, Welch p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, value in compare.PRIMARY:
            r = interaction(*[by_seed(groups[l], value) for l in labels])
            ok = "yes" if max(r["p_welch"], r["p_perm"]) < 0.05 else "not shown"
            est, _, _, pu = r["unpaired"]
            lines.append(f"| {name} | {r['d16']:+.3f} | {r['d4']:+.3f} | {r['dd']:+.3f} [{r['low']:+.3f}, "
                         f"{r['high']:+.3f}] | {r['t']:.2f} ({r['df']:.1f}), {r['p_welch']:.3f} | "
                         f"{r['p_perm']:.3f} | {ok} | {est:+.3f}, {pu:.3f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"hr_stats.py: {e}")
