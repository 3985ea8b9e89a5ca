"""bench/compare.py: steps and tokens to a target accuracy, spread over seeds, bad input, statistics."""
import itertools
import json
import math
import os
import statistics

import pytest
from scipy import stats  # a requirement of the tests (requirements.txt): no test here may skip without it

import harness

compare = harness.bench_module("compare")


def write_run(path, tokens_per_step, evals, zero_adv=0.5, dropped=(), rollouts=8):
    """A metrics.jsonl as srpo.py writes it: evals is {step: (pass1_math, pass1_code)}; a
    rollouts callable gives each step's number of rollouts."""
    os.makedirs(path)
    last = max(evals)
    recs = [{"type": "eval", "step": 0, "tag": "before", "pass1_math": evals[0][0], "pass1_code": evals[0][1]}]
    for s in range(1, last + 1):
        n = rollouts(s) if callable(rollouts) else rollouts
        za = zero_adv(s) if callable(zero_adv) else zero_adv
        recs.append({"type": "step", "step": s, "gen_tokens": tokens_per_step, "zero_adv": za,
                     "resp_len": tokens_per_step / n, "tokens": tokens_per_step,
                     "tokens_trained": round(tokens_per_step * (1 - za)), "reward": s / 10, "entropy": 1 / s})
        if s in dropped:
            recs.append({"type": "epoch", "step": s, "prompts": 5, "dropped": dropped[s]})
        if s in evals:
            recs.append({"type": "eval", "step": s, "tag": "periodic", "pass1_math": evals[s][0],
                         "pass1_code": evals[s][1]})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


def test_steps_and_tokens_to_target_and_their_ratio(tmp_path, capsys):
    """Steps and tokens to the default target, the token ratio to the first arm and seed spreads are right."""
    # pass1_mean per eval: a1 0.2 -> 0.5 (step 2) -> 0.6; a2 0.2 -> 0.4 -> 0.7; b 0.2 -> 0.3 -> 0.5.
    a1 = write_run(tmp_path / "a1", 100, {0: (0.3, 0.1), 2: (0.6, 0.4), 4: (0.7, 0.5)}, dropped={2: 3})
    a2 = write_run(tmp_path / "a2", 100, {0: (0.3, 0.1), 2: (0.5, 0.3), 4: (0.8, 0.6)}, dropped={2: 1, 4: 2})
    b = write_run(tmp_path / "b", 150, {0: (0.3, 0.1), 2: (0.4, 0.2), 4: (0.6, 0.4)}, zero_adv=0.75)
    text = compare.main([f"SRPO={a1},{a2}", f"GRPO={b}", "--png", str(tmp_path / "c.png")])
    assert "target 0.500" in text, "default target: the best accuracy that every run reached (b's 0.5)"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["steps to 0.500"] == ["2, 4", "4"]
    assert rows["tokens to 0.500"] == ["200, 400", "600"]
    assert rows["tokens vs first"] == ["1.00", "2.00"], "GRPO needs 600 tokens to SRPO's mean 300"
    assert rows["pass@1 after"] == ["0.650 (0.600..0.700)", "0.500"]
    assert rows["pass1_math after"] == ["0.750 (0.700..0.800)", "0.600"]
    assert rows["zero-adv groups"] == ["0.50 (0.50..0.50)", "0.75"]
    assert rows["tokens with a gradient"] == ["0.50 (0.50..0.50)", "0.25"]
    assert rows["prompts dropped by HR"] == ["3, 3", "0"]
    assert rows["tokens generated"] == ["400 (400..400)", "600"]
    assert rows["train reward, last quarter"] == ["0.40 (0.40..0.40)", "0.40"], "4 steps: the last one, reward 4/10"
    assert rows["entropy, last quarter"] == ["0.250 (0.250..0.250)", "0.250"]
    assert (tmp_path / "c.png").stat().st_size > 10_000, "the plot was not written"


def test_a_target_nobody_reaches_and_one_metric(tmp_path):
    """A run short of --target reads "not reached" and its token ratio "n/a"; --metric scores one field only."""
    a = write_run(tmp_path / "a", 10, {0: (0.1, 0.0), 3: (0.4, 0.0)})
    b = write_run(tmp_path / "b", 10, {0: (0.1, 0.0), 3: (0.2, 0.9)})
    text = compare.main([f"A={a}", f"B={b}", "--metric", "pass1_math", "--target", "0.3"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["steps to 0.300"] == ["3", "not reached"]
    assert rows["tokens vs first"] == ["1.00", "n/a"]


def test_bad_input_is_named(tmp_path):
    """A missing folder, one evaluation, no LABEL=, an unknown metric or bad JSON raises an error naming it."""
    one_eval = tmp_path / "one"
    os.makedirs(one_eval)
    (one_eval / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 0, "pass1_math": 0.1}) + "\n")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compare.main([f"A={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="1 evaluation.*--eval_every"):
        compare.main([f"A={one_eval}"])
    with pytest.raises(ValueError, match="LABEL=DIR"):
        compare.main([str(one_eval)])
    ok = write_run(tmp_path / "ok", 10, {0: (0.1, 0.0), 3: (0.4, 0.0)})
    with pytest.raises(ValueError, match="no field 'pass1_chess'"):
        compare.main([f"A={ok}", "--metric", "pass1_chess"])
    (tmp_path / "ok" / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1: not JSON"):
        compare.main([f"A={ok}"])


def test_zero_advantage_fraction_counts_groups_not_steps(tmp_path):
    """The zero-advantage share weights steps by rollouts (HR steps hold fewer); the trained share is by tokens."""
    # Step 1: 8 rollouts, all in zero-advantage groups; steps 2-4: 2 rollouts each, none. Per step
    # that averages 0.25; per group 8 of 14 rollouts, 0.571.
    a = write_run(tmp_path / "a", 100, {0: (0.1, 0.0), 4: (0.4, 0.0)},
                  zero_adv=lambda s: 1.0 if s == 1 else 0.0, rollouts=lambda s: 8 if s == 1 else 2)
    run = compare.load_run(a)
    assert abs(run.zero_adv() - 8 / 14) < 1e-9, run.zero_adv()
    assert abs(run.trained_share() - 0.75) < 1e-9, "3 of 4 steps' tokens had a gradient"


def test_t_interval_matches_printed_tables():
    """The 95% t-interval's half-width is the printed table's t quantile times the standard error."""
    for n, q in ((2, 12.706), (5, 2.776), (10, 2.262), (31, 2.042)):
        xs = [0.1 * i for i in range(n)]
        m, lo, hi = compare.mean_ci(xs)
        sem = statistics.stdev(xs) / math.sqrt(n)
        assert abs((hi - m) / sem - q) < 1e-3 and abs((m - lo) / sem - q) < 1e-3, (n, lo, hi, q)


# Two arms and a paired sample shared by the statistics tests below.
A, B = [0.50, 0.60, 0.55, 0.62, 0.58], [0.50, 0.52, 0.49, 0.55, 0.51, 0.47]
PAIRED_A, PAIRED_B = [0.50, 0.41, 0.62, 0.33], [0.45, 0.40, 0.52, 0.30]


def test_statistics_match_fixed_values():
    """Welch's test, the t-interval, the permutation and the paired test give the recorded values."""
    # Computed once with scipy 1.17.1 (ttest_ind equal_var=False, t.ppf, ttest_rel); the hand-written
    # Student's t that compare.py used before scipy gave the same to 1e-14.
    t, df, p = compare.welch(A, B)
    assert abs(t - 2.665764283014989) < 1e-9 and abs(df - 6.186686101148814) < 1e-9, (t, df)
    assert abs(p - 0.0361565658611476) < 1e-9, p
    m, lo, hi = compare.mean_ci(A)
    assert (m, round(lo, 12), round(hi, 12)) == (0.57, 0.511760796144, 0.628239203856), (m, lo, hi)
    assert abs(compare.permutation_p(A, B) - 14 / 462) < 1e-12, "14 of the C(11, 5) = 462 relabellings"
    m, lo, hi, p = compare.paired_t(PAIRED_A, PAIRED_B)
    assert abs(m - 0.0475) < 1e-12, m
    assert abs(lo + 0.013956380924) < 1e-11 and abs(hi - 0.108956380924) < 1e-11, (lo, hi)
    assert abs(p - 0.0908892230143467) < 1e-9, p


def test_statistics_match_scipy_and_the_formulas():
    """compare.py's statistics equal scipy's live, and Welch's t and df equal the textbook formulas."""
    t, df, p = compare.welch(A, B)
    ref = stats.ttest_ind(A, B, equal_var=False)
    assert abs(t - ref.statistic) < 1e-12 and abs(df - ref.df) < 1e-9, (t, df, ref)
    assert abs(p - ref.pvalue) < 1e-12, (p, ref)
    va, vb = statistics.variance(A) / len(A), statistics.variance(B) / len(B)
    assert abs(t - (statistics.mean(A) - statistics.mean(B)) / math.sqrt(va + vb)) < 1e-12, "Welch's t"
    welch_df = (va + vb) ** 2 / (va ** 2 / (len(A) - 1) + vb ** 2 / (len(B) - 1))
    assert abs(df - welch_df) < 1e-9, "the Welch-Satterthwaite degrees of freedom"
    m, lo, hi = compare.mean_ci(A)
    rlo, rhi = stats.t.interval(0.95, len(A) - 1, loc=m, scale=stats.sem(A))
    assert abs(lo - rlo) < 1e-12 and abs(hi - rhi) < 1e-12, (lo, hi, rlo, rhi)
    m, lo, hi, p = compare.paired_t(PAIRED_A, PAIRED_B)
    assert abs(p - stats.ttest_rel(PAIRED_A, PAIRED_B).pvalue) < 1e-12, p
    assert abs(p - stats.ttest_1samp([x - y for x, y in zip(PAIRED_A, PAIRED_B)], 0).pvalue) < 1e-12, \
        "the paired test is the one-sample test of the differences"


def test_permutation_test_is_exact():
    """The permutation p is the share of all relabellings at least as extreme, counted by brute force."""
    assert abs(compare.permutation_p([1, 2, 3], [4, 5, 6]) - 0.1) < 1e-12, "2 of 20 relabellings"
    assert compare.permutation_p([1, 1, 1], [1, 1, 1]) == 1.0
    pooled, observed = A + B, abs(statistics.mean(A) - statistics.mean(B))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(A)):
        x = [pooled[i] for i in idx]
        y = [v for i, v in enumerate(pooled) if i not in idx]
        hits += abs(statistics.mean(x) - statistics.mean(y)) >= observed - 1e-12
        total += 1
    assert total == 462 and abs(compare.permutation_p(A, B) - hits / total) < 1e-12, (hits, total)
    # Equal arms: a symmetric null, where this equals scipy's own two-sided p.
    ref = stats.permutation_test((A, B[:5]), lambda x, y: statistics.mean(x) - statistics.mean(y),
                                 permutation_type="independent", n_resamples=math.inf).pvalue
    assert abs(compare.permutation_p(A, B[:5]) - ref) < 1e-12, (compare.permutation_p(A, B[:5]), ref)


def test_significance_table_in_the_report(tmp_path):
    """Two arms of 3 seeds: the report prints each arm's interval, the AUC and both tests."""
    a = [write_run(tmp_path / f"a{i}", 10, {0: (0.2, 0.0), 2: (0.4 + d, 0.0), 4: (0.6 + d, 0.0)})
         for i, d in enumerate((0.0, 0.02, 0.04))]
    b = [write_run(tmp_path / f"b{i}", 10, {0: (0.2, 0.0), 2: (0.3 + d, 0.0), 4: (0.4 + d, 0.0)})
         for i, d in enumerate((0.0, 0.02, 0.04))]
    text = compare.main([f"HR={','.join(a)}", f"GRPO={','.join(b)}", "--metric", "pass1_math"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    # final: 0.60/0.62/0.64 against 0.40/0.42/0.44; sd 0.02, half-width t(0.975, 2) * 0.02 / sqrt 3
    half = 4.303 * 0.02 / 3 ** 0.5
    assert rows["final pass@1"][0] == f"0.620 [{0.62 - half:.3f}, {0.62 + half:.3f}]", rows["final pass@1"]
    assert rows["final pass@1"][2] == "+0.200"
    assert rows["final pass@1"][4] == "0.100", "3+3 seeds, fully separated: 2 of 20 relabellings"
    # AUC over steps 0..4 of (0.2, 0.4+d, 0.6+d): ((0.6 + d) + (1.0 + 2d)) / 4 = 0.4 + 0.75d, mean d 0.02
    assert rows["area under curve"][0].startswith("0.415 ["), rows["area under curve"]
    assert rows["area under curve"][2] == "+0.100", "GRPO's curve: 0.3 + 0.75d"


def test_paired_by_seed_is_exploratory_and_matches_scipy(tmp_path):
    """Arms with the same seeds get a seed-paired difference whose p equals scipy's ttest_rel; unpaired seeds get none."""
    finals_a, finals_b = (0.50, 0.41, 0.62), (0.45, 0.40, 0.52)

    def arm(name, finals, seeds):
        dirs = []
        for seed, f in zip(seeds, finals):
            d = write_run(tmp_path / f"{name}{seed}", 10, {0: (0.2, 0.0), 4: (f, 0.0)})
            with open(os.path.join(d, "config.json"), "w") as fh:
                json.dump({"seed": seed, "hr": name == "a"}, fh)
            dirs.append(d)
        return ",".join(dirs)

    # Listed in a different seed order in the second arm: pairing goes by seed, not by position.
    text = compare.main([f"A={arm('a', finals_a, (1, 2, 3))}",
                         f"B={arm('b', finals_b[::-1], (3, 2, 1))}", "--metric", "pass1_math"])
    assert "Exploratory, not pre-registered" in text
    row = next(line for line in text.splitlines() if line.startswith("| final pass@1 | +") and "paired" not in line
               and line.count("|") == 4)
    ref = stats.ttest_rel(finals_a, finals_b)
    d = [x - y for x, y in zip(finals_a, finals_b)]
    assert row.split("|")[2].strip().startswith(f"{sum(d) / 3:+.3f} ["), row
    assert row.split("|")[3].strip() == f"{ref.pvalue:.3f}", (row, ref.pvalue)
    text = compare.main([f"A={arm('c', finals_a, (4, 5, 6))}", f"B={arm('e', finals_b, (7, 8, 9))}",
                         "--metric", "pass1_math"])
    assert "paired" not in text, "no seeds in common: nothing to pair"


def test_differences_of_several_experiments(tmp_path):
    """--differences: one row per experiment and metric, the Welch interval equal to the textbook
    formula, the tests equal to the two-arm report's, the plot written; bad pairings are named."""
    def arm(name, finals, seeds=(1, 2, 3)):
        dirs = []
        for seed, f in zip(seeds, finals):
            d = write_run(tmp_path / f"{name}{seed}", 10, {0: (0.2, 0.0), 4: (f, 0.0)})
            with open(os.path.join(d, "config.json"), "w") as fh:
                json.dump({"seed": seed}, fh)
            dirs.append(d)
        return ",".join(dirs)

    a4, b4 = (0.30, 0.26, 0.28), (0.40, 0.37, 0.41)
    a16, b16 = (0.45, 0.50, 0.41), (0.40, 0.44, 0.43)
    groups = [f"G4:SRPO={arm('a4', a4)}", f"G4:GRPO={arm('b4', b4)}",
              f"G16:SRPO={arm('a16', a16)}", f"G16:GRPO={arm('b16', b16)}"]
    png = tmp_path / "d.png"
    text = compare.main(groups + ["--differences", "--metric", "pass1_math", "--png", str(png)])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| G")]
    assert [(r[0], r[1]) for r in rows] == [("G4", "final pass@1"), ("G4", "area under curve"),
                                           ("G16", "final pass@1"), ("G16", "area under curve")]
    for row, (xa, xb) in zip(rows[::2], ((a4, b4), (a16, b16))):
        va, vb = statistics.variance(xa) / 3, statistics.variance(xb) / 3
        df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
        d = statistics.mean(xa) - statistics.mean(xb)
        half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
        assert row[2] == "SRPO - GRPO" and row[3] == f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]", row
        assert row[4].endswith(f"{stats.ttest_ind(xa, xb, equal_var=False).pvalue:.3f}"), row
        assert row[5] == f"{compare.permutation_p(list(xa), list(xb)):.3f}", row
        m = statistics.mean([x - y for x, y in zip(xa, xb)])
        assert row[6].startswith(f"{m:+.3f} [") and row[6].endswith("over seeds [1, 2, 3]"), row
    assert rows[0][5] == "0.100", "G4's arms are fully separated: 2 of 20 relabellings"
    assert png.stat().st_size > 5_000, "the plot was not written"

    with pytest.raises(ValueError, match="in pairs"):
        compare.main(groups[:3] + ["--differences"])
    with pytest.raises(ValueError, match="same EXPERIMENT"):
        compare.main([groups[0], groups[3], "--differences"])
    with pytest.raises(ValueError, match="at least two seeds"):
        compare.main([groups[0], f"G4:GRPO={arm('one', (0.4,), (9,))}", "--differences"])
