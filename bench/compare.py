"""Runs against runs, from their metrics.jsonl: SRPO (history resampling on) against GRPO (off).

    python bench/compare.py SRPO=runs/srpo-s1,runs/srpo-s2 GRPO=runs/grpo-s1,runs/grpo-s2 \
        --png bench/img/compare.png

Each argument is LABEL=DIR[,DIR...]: one label per method, one directory per seed. The first label
is the reference of the ratios. Printed, as a markdown table per label:
  - held-out pass@1 before and after, and each domain's after (the mean over seeds, and the
    spread: min..max);
  - the steps and the generated tokens each run needed to first reach a target accuracy on an
    evaluation (--target; by default the best accuracy that every run reached, so that it is
    defined for all of them), and the ratio of tokens needed to the first label's;
  - the fraction of all groups that had zero advantage (weighted by rollouts: with HR a step may
    hold fewer prompts), the share of generated tokens that carried a gradient, the training
    reward and the policy's entropy over the last quarter of the steps, the mean response length, the tokens generated in all, and the prompts history resampling dropped.
The plot has accuracy against steps and against generated tokens (what a step costs differs when
HR shrinks an epoch), the zero-advantage fraction and the response length: one colour per label,
one line style per seed.

With two or more labels it also prints the pre-registered primary metrics of the first two (final
pass@1 and the area under the accuracy-vs-step curve): each arm's mean with its 95% t-interval over
seeds, their difference, Welch's t test and an exact permutation test, both two-sided. Where both
arms ran the same seeds (config.json), it adds the difference paired seed by seed, marked
exploratory: the protocol registered the unpaired tests.

With --differences the arguments come in pairs, one pair per experiment, labelled EXPERIMENT:ARM
(e.g. "G4:SRPO=..." "G4:GRPO=..." "G16:SRPO=..." "G16:GRPO=..."): it prints, for every experiment,
the first arm minus the second on both primary metrics with the difference's 95% Welch interval,
Welch's p and the permutation p (and the seed-paired difference, exploratory), and --png plots those
differences with their intervals, one row per experiment: the results of several experiments side
by side.

Evaluations are what the comparison rests on, so runs need several (srpo.py --eval_every N). The
accuracy is `--metric`: pass1_math, pass1_code, or pass1_mean (their mean, the default).
"""
import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Run:
    path: str
    evals: list[tuple[int, int, float]]   # (step, generated tokens by then, accuracy)
    steps: list[dict]                     # the step records, in order
    dropped: int                          # prompts history resampling dropped, in all
    final: dict                           # the last evaluation's pass1_* fields
    seed: int | None = None               # from config.json, where the run has one

    @property
    def tokens(self) -> int:
        return sum(r["gen_tokens"] for r in self.steps)

    def zero_adv(self) -> float:
        # Rollouts per step = generated tokens / mean length; G is fixed within a run.
        n = [s["gen_tokens"] / s["resp_len"] if s["resp_len"] else 0.0 for s in self.steps]
        return sum(s["zero_adv"] * k for s, k in zip(self.steps, n)) / max(sum(n), 1e-9)

    def trained_share(self) -> float:
        if any("tokens_trained" not in s for s in self.steps):
            return float("nan")  # logs from before srpo.py recorded it
        return sum(s["tokens_trained"] for s in self.steps) / max(self.tokens, 1)


def accuracy(record: dict, metric: str) -> float:
    if metric == "pass1_mean":
        vals = [v for k, v in record.items() if k.startswith("pass1_")]
        if not vals:
            raise ValueError(f"evaluation record at step {record['step']} has no pass1_* field")
        return sum(vals) / len(vals)
    if metric not in record:
        raise ValueError(f"evaluation record at step {record['step']} has no field {metric!r} "
                         f"(it has {sorted(k for k in record if k.startswith('pass1_'))})")
    return record[metric]


def load_run(path: str, metric: str = "pass1_mean") -> Run:
    """One run's metrics. A resumed run's file holds each step once (srpo.py truncates on resume)."""
    f = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f} does not exist: is {path} the out_dir of an srpo.py run?")
    records = []
    with open(f) as fh:
        for n, line in enumerate(fh, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n}: not JSON ({e})") from None
    steps = [r for r in records if r["type"] == "step"]
    tokens_at, total = {0: 0}, 0
    for r in steps:
        total += r["gen_tokens"]
        tokens_at[r["step"]] = total
    evals = [(r["step"], tokens_at[r["step"]], accuracy(r, metric)) for r in records if r["type"] == "eval"]
    if len(evals) < 2:
        raise ValueError(f"{f} has {len(evals)} evaluation(s): a comparison needs the one before training "
                         f"and at least one after (run srpo.py with --eval_every N)")
    config = os.path.join(path, "config.json")
    cfg = json.load(open(config)) if os.path.exists(config) else {}
    hr = cfg.get("hr", True)
    # With --no_hr an epoch record counts what HR *would* have dropped: nothing was.
    dropped = sum(r.get("dropped", 0) for r in records if r["type"] == "epoch") if hr else 0
    final = {k: v for k, v in [r for r in records if r["type"] == "eval"][-1].items() if k.startswith("pass1_")}
    return Run(path, evals, steps, dropped, final, cfg.get("seed"))


def first_reach(run: Run, target: float) -> tuple[int, int] | None:
    """(step, generated tokens) of the first evaluation at or above target; None if none is."""
    for step, tokens, acc in run.evals:
        if acc >= target - 1e-12:
            return step, tokens
    return None


def default_target(runs: list[Run]) -> float:
    """The best accuracy every run reached at some evaluation after the first."""
    return min(max(acc for _, _, acc in r.evals[1:]) for r in runs)


def late(run: Run, key: str) -> float:
    """The mean of a step field over the last quarter of the steps (nan where the logs lack it):
    where a run ended up, e.g. its training reward or its entropy."""
    tail = run.steps[-max(len(run.steps) // 4, 1):]
    return statistics.mean(s[key] for s in tail) if all(key in s for s in tail) else float("nan")


def _spread(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ({format(min(xs), fmt)}..{format(max(xs), fmt)})"


def summarize(groups: dict[str, list[Run]], target: float) -> list[dict]:
    """One row per label; the cells are strings, ready for the table."""
    rows, ref_tokens = [], None
    fields = sorted({k for runs in groups.values() for r in runs for k in r.final})   # pass1_code, pass1_math
    for label, runs in groups.items():
        reach = [first_reach(r, target) for r in runs]
        reached = [x for x in reach if x is not None]
        mean_tokens = statistics.mean(t for _, t in reached) if len(reached) == len(runs) else None
        if ref_tokens is None:
            ref_tokens = mean_tokens
        ratio = "n/a" if mean_tokens is None or not ref_tokens else f"{mean_tokens / ref_tokens:.2f}"
        rows.append({
            "label": label,
            "seeds": str(len(runs)),
            "pass@1 before": _spread([r.evals[0][2] for r in runs], ".3f"),
            "pass@1 after": _spread([r.evals[-1][2] for r in runs], ".3f"),
            "best pass@1": _spread([max(a for _, _, a in r.evals) for r in runs], ".3f"),
            **{f"{k} after": _spread([r.final.get(k, float("nan")) for r in runs], ".3f")
               for k in fields},
            f"steps to {target:.3f}": ", ".join(str(x[0]) if x else "not reached" for x in reach),
            f"tokens to {target:.3f}": ", ".join(f"{x[1]:,}" if x else "not reached" for x in reach),
            "tokens vs first": ratio,
            "zero-adv groups": _spread([r.zero_adv() for r in runs], ".2f"),
            "tokens with a gradient": _spread([r.trained_share() for r in runs], ".2f"),
            "train reward, last quarter": _spread([late(r, "reward") for r in runs], ".2f"),
            "entropy, last quarter": _spread([late(r, "entropy") for r in runs], ".3f"),
            "response length": _spread([statistics.mean(s["resp_len"] for s in r.steps) for r in runs], ".1f"),
            "tokens generated": _spread([r.tokens for r in runs], ",.0f"),
            "prompts dropped by HR": ", ".join(str(r.dropped) for r in runs),
        })
    return rows


# -----------------------------------------------------------------------------
# Statistics over seeds: a 95% interval per arm and a two-sample test between the first two arms,
# from scipy.stats (a requirement of the benchmarks and tests; the trainer does not import it).


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean over seeds; one seed gives no interval."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's two-sample t test of mean(a) = mean(b): (t, degrees of freedom, two-sided p)."""
    r = stats.ttest_ind(a, b, equal_var=False)
    return float(r.statistic), float(r.df), float(r.pvalue)


def _abs_mean_diff(x, y, axis):
    # permutation_test's statistic; vectorized: x and y hold many relabellings along the other axes.
    return np.abs(np.mean(x, axis=axis) - np.mean(y, axis=axis))


def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of the difference of means: the share of all ways to
    relabel the pooled values as two arms of these sizes whose |difference| is at least the
    observed one. With 5 + 5 seeds there are 252 relabellings, so the smallest p is 2/252.
    (|difference| against "greater", not scipy's "two-sided", which doubles the smaller tail:
    the two agree for arms of equal size, whose null distribution is symmetric.)"""
    r = stats.permutation_test((a, b), _abs_mean_diff, permutation_type="independent", vectorized=True,
                               n_resamples=np.inf, alternative="greater")   # inf: every relabelling
    return float(r.pvalue)


def auc(run: Run) -> float:
    """Area under held-out accuracy against step (trapezoids), divided by the steps spanned: the
    mean accuracy over training. It rewards reaching an accuracy early, not only ending there."""
    pts = [(s, a) for s, _, a in run.evals]
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(pts, pts[1:]))
    return area / max(pts[-1][0] - pts[0][0], 1)


def paired_t(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """The paired t test of mean(a - b) = 0, a[i] and b[i] from one seed: (mean difference, its
    95% interval's low and high, two-sided p)."""
    m, lo, hi = mean_ci([x - y for x, y in zip(a, b)])
    return m, lo, hi, float(stats.ttest_rel(a, b).pvalue)


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the difference's Welch interval, the t quantile at the
    Welch-Satterthwaite degrees of freedom times the unpooled standard error."""
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return statistics.mean(a) - statistics.mean(b), float(ci.low), float(ci.high)


PRIMARY = (("final pass@1", lambda r: r.evals[-1][2]), ("area under curve", auc))


def seed_pairs(a: list[Run], b: list[Run], value) -> tuple[list[int], list[float], list[float]]:
    """The seeds both arms ran (config.json), in order, and each arm's value on them."""
    by_seed = [{r.seed: value(r) for r in runs} for runs in (a, b)]
    seeds = sorted(set(by_seed[0]) & set(by_seed[1]) - {None})
    return seeds, [by_seed[0][s] for s in seeds], [by_seed[1][s] for s in seeds]


def paired(groups: dict[str, list[Run]]) -> str | None:
    """Exploratory, not pre-registered: where both arms ran the same seeds, the difference seed by
    seed (same evaluation stream; HR only acts from the second epoch, so a seed's two runs agree
    until then), with its 95% t-interval and the paired t test. None where the seeds do not pair."""
    labels = list(groups)[:2]
    seeds, _, _ = seed_pairs(*(groups[l] for l in labels), PRIMARY[0][1])
    if len(seeds) < 2:
        return None
    lines = [f"| metric | {labels[0]} - {labels[1]}, paired over seeds {seeds} [95% CI] | paired t p |", "|---|---|---|"]
    for name, value in PRIMARY:
        _, first, second = seed_pairs(*(groups[l] for l in labels), value)
        m, lo, hi, p = paired_t(first, second)
        lines.append(f"| {name} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | {p:.3f} |")
    return "\n".join(lines)


def significance(groups: dict[str, list[Run]]) -> str:
    """The pre-registered primary metrics, final pass@1 and the area under the curve: each arm's
    mean with its 95% interval over seeds, then the first arm against the second."""
    labels = list(groups)
    lines = ["| metric | " + " | ".join(f"{l} mean [95% CI]" for l in labels[:2])
             + " | difference | Welch t (df), p | permutation p |", "|---" * 6 + "|"]
    for name, value in PRIMARY:
        xs = [[value(r) for r in groups[l]] for l in labels[:2]]
        cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if len(x) > 1 else f"{m:.3f} (one seed)"
                 for x, (m, lo, hi) in zip(xs, map(mean_ci, xs))]
        if min(map(len, xs)) < 2:
            test = "n/a (one seed)", "n/a"
        else:
            t, df, p = welch(*xs)
            test = f"{t:.2f} ({df:.1f}), {p:.3f}", f"{permutation_p(*xs):.3f}"
        diff = statistics.mean(xs[0]) - statistics.mean(xs[1])
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {diff:+.3f} | {test[0]} | {test[1]} |")
    return "\n".join(lines)


def experiment_pairs(groups: dict[str, list[Run]]) -> list[tuple[str, str, str]]:
    """--differences: the labels in consecutive pairs, EXPERIMENT:ARM each, one experiment a pair:
    [(experiment, first label, second label)]."""
    labels = list(groups)
    if len(labels) % 2:
        raise ValueError(f"--differences takes the arms in pairs (EXPERIMENT:A, EXPERIMENT:B), got {len(labels)}")
    pairs = []
    for first, second in zip(labels[::2], labels[1::2]):
        exp, sep, _ = first.partition(":")
        if not sep or second.partition(":")[0] != exp or second.partition(":")[1] != ":":
            raise ValueError(f"--differences: {first!r} and {second!r} must be labelled EXPERIMENT:ARM with the "
                             f"same EXPERIMENT, e.g. G4:SRPO and G4:GRPO")
        for label in (first, second):
            if len(groups[label]) < 2:
                raise ValueError(f"{label}: an interval needs at least two seeds, got {len(groups[label])}")
        pairs.append((exp, first, second))
    return pairs


def differences(groups: dict[str, list[Run]]) -> tuple[str, list[dict]]:
    """Each experiment's first arm minus its second on both primary metrics, with the pre-registered
    two-sided tests, and the seed-paired difference where the seeds pair (exploratory)."""
    lines = ["| experiment | metric | difference | A - B [95% Welch CI] | Welch t (df), p | permutation p "
             "| seed-paired A - B [95% CI] (exploratory) |", "|---" * 7 + "|"]
    rows = []
    for exp, a, b in experiment_pairs(groups):
        for name, value in PRIMARY:
            xa, xb = ([value(r) for r in groups[l]] for l in (a, b))
            d, lo, hi = welch_interval(xa, xb)
            t, df, p = welch(xa, xb)
            pp = permutation_p(xa, xb)
            common, pa, pb = seed_pairs(groups[a], groups[b], value)
            pair = "n/a (seeds do not pair)"
            if len(common) >= 2:
                m, plo, phi, _ = paired_t(pa, pb)
                pair = f"{m:+.3f} [{plo:+.3f}, {phi:+.3f}] over seeds {common}"
            lines.append(f"| {exp} | {name} | {a.partition(':')[2]} - {b.partition(':')[2]} | {d:+.3f} "
                         f"[{lo:+.3f}, {hi:+.3f}] | {t:.2f} ({df:.1f}), {p:.3f} | {pp:.3f} | {pair} |")
            rows.append(dict(experiment=exp, metric=name, a=a, b=b, diff=d, low=lo, high=hi, p=p, p_perm=pp))
    return "\n".join(lines), rows


def plot_differences(rows: list[dict], metric: str, png: str):
    """One panel per primary metric: each experiment's difference as a point with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [name for name, _ in PRIMARY]
    exps = {r["experiment"]: f"{r['experiment']}: {r['a'].partition(':')[2]} - {r['b'].partition(':')[2]}"
            for r in rows}  # experiment -> its y label, in order
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 1.2 + 0.7 * len(exps)), sharey=True)
    for ax, name in zip(axes, names):
        for y, r in enumerate([x for x in rows if x["metric"] == name]):
            ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], fmt="o", capsize=4)
            ax.annotate(f"{r['diff']:+.3f}", (r["diff"], y), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
        ax.axvline(0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{name} ({metric}): A - B, 95% Welch interval", fontsize=9)
    axes[0].set_yticks(range(len(exps)))
    axes[0].set_yticklabels(list(exps.values()), fontsize=8)
    axes[0].set_ylim(len(exps) - 0.5, -0.8)  # the first experiment on top, room for its label
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    """Transposed (one column per label): the cells are long and the labels are few."""
    keys = list(rows[0])
    lines = ["| | " + " | ".join(r["label"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(r[k] for r in rows) + " |" for k in keys[1:]]
    return "\n".join(lines)


def plot(groups: dict[str, list[Run]], target: float, metric: str, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for c, (label, runs) in enumerate(groups.items()):
        for s, r in enumerate(runs):
            kw = dict(color=colors[c % len(colors)], ls=styles[s % len(styles)],
                      label=f"{label} {os.path.basename(os.path.normpath(r.path))}")
            ax[0, 0].plot([e[0] for e in r.evals], [e[2] for e in r.evals], marker="o", **kw)
            ax[0, 1].plot([e[1] for e in r.evals], [e[2] for e in r.evals], marker="o", **kw)
            x = [st["step"] for st in r.steps]
            ax[1, 0].plot(x, [st["zero_adv"] for st in r.steps], **kw)
            ax[1, 1].plot(x, [st["resp_len"] for st in r.steps], **kw)
    for a in ax[0]:
        a.axhline(target, color="gray", lw=0.8, ls="--")
    titles = [(f"held-out {metric} (dashed: target)", "step"), (f"held-out {metric}", "generated tokens"),
              ("zero-advantage groups (fraction)", "step"), ("mean response length (tokens)", "step")]
    for a, (t, xl) in zip(ax.flat, titles):
        a.set_title(t, fontsize=10)
        a.set_xlabel(xl)
    ax[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def parse_groups(specs: list[str], metric: str) -> dict[str, list[Run]]:
    groups = {}
    for spec in specs:
        label, sep, dirs = spec.partition("=")
        if not sep or not label or not dirs:
            raise ValueError(f"{spec!r}: expected LABEL=DIR[,DIR...], e.g. SRPO=runs/srpo-s1,runs/srpo-s2")
        if label in groups:
            raise ValueError(f"label {label!r} is given twice")
        groups[label] = [load_run(d, metric) for d in dirs.split(",") if d]
    return groups


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("groups", nargs="+", help="LABEL=DIR[,DIR...]: the runs (one per seed) of one method")
    ap.add_argument("--metric", default="pass1_mean", help="pass1_math, pass1_code or pass1_mean")
    ap.add_argument("--target", type=float, default=None, help="accuracy to reach (default: the best all runs reach)")
    ap.add_argument("--png", default=None, help="write the plot here")
    ap.add_argument("--differences", action="store_true",
                    help="arms in pairs labelled EXPERIMENT:ARM: each experiment's difference with its interval")
    args = ap.parse_args(argv)
    groups = parse_groups(args.groups, args.metric)
    if args.differences:
        table, rows = differences(groups)
        text = (f"{args.metric}: each experiment's first arm minus its second (intervals: Welch over seeds; "
                f"tests two-sided)\n\n" + table)
        print(text)
        if args.png:
            plot_differences(rows, args.metric, args.png)
            print(f"\nplot: {args.png}")
        return text
    runs = [r for rs in groups.values() for r in rs]
    target = default_target(runs) if args.target is None else args.target
    how = "given" if args.target is not None else "the best accuracy every run reached"
    text = (f"{args.metric}, target {target:.3f} ({how}); a cell 'mean (min..max)' is over seeds, "
            f"a list has one entry per seed\n\n" + markdown(summarize(groups, target)))
    if len(groups) >= 2:
        text += (f"\n\n{list(groups)[0]} against {list(groups)[1]} on {args.metric} (intervals: t over seeds; "
                 f"tests two-sided):\n\n" + significance(groups))
        extra = paired(groups)
        if extra:
            text += "\n\nExploratory, not pre-registered: the same difference paired by seed\n\n" + extra
    print(text)
    if args.png:
        plot(groups, target, args.metric, args.png)
        print(f"\nplot: {args.png}")
    return text


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"compare.py: {e}")
