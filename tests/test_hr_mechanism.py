"""bench/hr_mechanism.py: pass rates under a policy, what HR's rules drop given them, and that
prediction beside a run's epoch records. Parts (b) and (c) on synthetic rates, no model."""
import json
import math
import os

import pytest

import rewards
import curriculum
import srpo
from harness import bench_module, make_world

mech = bench_module("hr_mechanism")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL, POST = curriculum.DropRule("all_correct"), curriculum.DropRule("posterior")


def close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15) for x, y in zip(a, b))


def test_drop_schedule_of_the_reports_rule():
    """all_correct, pass rate p, G = 4: dropped at epoch e with (1 - p^4)^(e-1) p^4; --no_hr: p^4 always."""
    p = 0.7
    q = p ** 4  # 0.2401: all four right
    got = mech.drop_schedule(p, 4, 3, ALL)
    assert close(got, [q, (1 - q) * q, (1 - q) ** 2 * q]), got
    assert close(mech.drop_schedule(p, 4, 3, ALL, hr=False), [q, q, q]), "with --no_hr nothing leaves"
    assert close(mech.drop_schedule(1.0, 4, 3, ALL), [1.0, 0.0, 0.0]), "a sure prompt leaves at once"
    assert mech.drop_schedule(0.0, 4, 3, ALL) == [0.0] * 3, "a never-solved prompt never leaves"


def test_drop_schedule_of_the_posterior_rule_by_hand():
    """posterior (tau 0.9, q 0.5), G = 4, by hand: [0, p^8, 0, 8 p^15 (1-p)]; --no_hr: [0, p^8, p^12, ...]."""
    p = 0.7
    # Epoch 1: 4 of 4 gives P(p > 0.9) = 1 - 0.9^5 = 0.41: never dropped.
    # Epoch 2: dropped only at 8 of 8 (0.613); 7 of 8 with the last epoch all right is 0.225: kept.
    # Epoch 3: 12 of 12 was dropped at epoch 2; 11 of 12 gives P(Bin(13, 0.9) <= 11) = 0.379: kept.
    # Epoch 4: 15 of 16 gives P(Bin(17, 0.9) <= 15) = 0.518: dropped, if the one failure was in epoch 1
    #   or 2 (in epoch 3 it would have been dropped at epoch 2) and epoch 4 is all right: 2 * 4 p^15 (1-p).
    #   14 of 16 gives 0.238: kept.
    want = [0.0, p ** 8, 0.0, 8 * p ** 15 * (1 - p)]
    got = mech.drop_schedule(p, 4, 4, POST)
    assert close(got, want), f"{got} != {want}"
    # Without HR nothing leaves: epoch 3 would drop at 12 of 12; epoch 4 at 16 of 16, or 15 of 16 with the
    # failure anywhere in epochs 1-3 (12 places) and epoch 4 all right.
    want = [0.0, p ** 8, p ** 12, p ** 16 + 12 * p ** 15 * (1 - p)]
    got = mech.drop_schedule(p, 4, 4, POST, hr=False)
    assert close(got, want), f"--no_hr: {got} != {want}"
    # G = 32: one all-right epoch already gives 0.969, so the two rules agree at the first epoch end
    assert close(mech.drop_schedule(0.97, 32, 1, POST), [0.97 ** 32]), "at G = 32 the rules agree"


def test_predict_on_synthetic_rates():
    """predict's shares and weak-prompt probabilities equal the values worked out by hand for four rates."""
    rates = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.95}  # weak (< 0.9): b and c
    rows = {r["rule"]: r for r in mech.predict(rates, [4], 2, 0.9)}
    a = rows["all_correct"]
    # epoch 1: a surely, b 0.5^4 = 0.0625, c never, d 0.95^4 = 0.81450625; epoch 2: the survivors again
    assert close(a["share_per_epoch"], [(1 + 0.0625 + 0.81450625) / 4,
                                        (0.9375 * 0.0625 + (1 - 0.81450625) * 0.81450625) / 4]), a
    assert math.isclose(a["weak_first"], (0.0625 + 0) / 2), a
    assert math.isclose(a["weak_within"], (0.0625 + 0.05859375) / 2), a
    total = 1 + 0.0625 + 0.05859375 + 0.81450625 + 0.18549375 * 0.81450625
    assert math.isclose(a["weak_share_of_drops"], (0.0625 + 0.05859375) / total), a
    b = rows["posterior"]
    # nothing at the first epoch end; at the second, 8 of 8: a surely, b 0.5^8, d 0.95^8
    assert close(b["share_per_epoch"], [0.0, (1 + 0.5 ** 8 + 0.95 ** 8) / 4]), b
    assert (b["weak_first"], b["weak_within"]) == (0.0, 0.5 ** 8 / 2), b


def test_predict_cli_on_the_first_prompts_of_a_rates_file(tmp_path):
    """predict --first N describes the first N prompts of the file (a smaller pool), in file order."""
    rates = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.95}
    f = tmp_path / "rates.jsonl"
    f.write_text("".join(json.dumps({"id": k, "n": 32, "correct": round(32 * v), "rate": v}) + "\n"
                         for k, v in rates.items()))
    whole = mech.main(["predict", str(f), "--G", "4"])
    assert whole.startswith("4 prompts") and whole == mech.predict_table(mech.predict(rates, [4], 4, 0.9), 4, 4, 0.9)
    first = mech.main(["predict", str(f), "--G", "4", "--first", "2"])
    assert first == mech.predict_table(mech.predict({"a": 1.0, "b": 0.5}, [4], 4, 0.9), 2, 4, 0.9), first
    assert first != whole
    with pytest.raises(ValueError, match="has 4 prompts"):
        mech.main(["predict", str(f), "--first", "5"])


def write_run(root, cfg: dict, epochs: list[dict]) -> str:
    os.makedirs(root, exist_ok=True)
    json.dump(cfg, open(os.path.join(root, "config.json"), "w"))
    with open(os.path.join(root, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"type": "eval", "step": 0}) + "\n")
        for r in epochs:
            f.write(json.dumps({"type": "epoch", "stage": 1} | r) + "\n")
    return str(root)


def test_compare_run_predicts_a_synthetic_run(tmp_path):
    """compare_run: the run's rule, G and pool give the predicted drops per epoch end; ids scored."""
    pool = tmp_path / "math.jsonl"
    rows = [{"id": i, "domain": "math", "question": "q", "answer": "1"} for i in "abcd"]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.95}
    cfg = {"G": 4, "hr": True, "hr_rule": "posterior", "hr_tau": 0.9, "hr_q": 0.5, "math_train": str(pool),
           "max_prompts": 0, "max_level": 0}
    run = write_run(tmp_path / "run", cfg, [{"epoch": 1, "dropped": 0, "dropped_ids": []},
                                            {"epoch": 2, "dropped": 2, "dropped_ids": ["a", "b"]}])
    r = mech.compare_run(rates, run, 0.9)
    assert r["observed"] == [0, 2] and r["rule"] == "posterior", r
    assert close(r["predicted"], [0.0, 1 + 0.5 ** 8 + 0.95 ** 8]), r["predicted"]
    assert r["weak_dropped"] == (1, 2), "b (0.5) is weak, a (1.0) is not"
    # a run older than --hr_rule used the report's rule; a --no_hr run's counts are would-drops
    old_cfg = {k: cfg[k] for k in ("G", "math_train", "max_prompts", "max_level")} | {"hr": False}
    old = write_run(tmp_path / "old", old_cfg, [{"epoch": 1, "dropped": 2}])
    r = mech.compare_run(rates, old, 0.9)
    assert r["rule"] == "all_correct" and close(r["predicted"], [1 + 0.0625 + 0.81450625]), r
    assert "weak_dropped" not in r, r
    with pytest.raises(ValueError, match="3 of its pool's 4 prompts"):
        mech.compare_run({"a": 1.0}, run, 0.9)
    more = mech.compare_run(rates | {"e": 1.0}, run, 0.9)  # a rate outside the pool is not counted
    assert close(more["predicted"], [0.0, 1 + 0.5 ** 8 + 0.95 ** 8]), more
    row = mech.observe_table([r], 0.9).splitlines()[-1]
    assert row.endswith("| off (would drop) | all_correct | 2 | 1.9 | not logged |"), row


def test_observed_reads_the_committed_first_experiment():
    """The first experiment's committed runs parse: SRPO's drops per epoch; GRPO's (not logged then) None."""
    s1 = mech.observed(os.path.join(ROOT, "bench/hr-exp/srpo-s1"))
    assert s1["dropped"] == [9, 4, 9, 5] and s1["ids"] is None and s1["cfg"]["G"] == 4, s1["dropped"]
    g1 = mech.observed(os.path.join(ROOT, "bench/hr-exp/grpo-s1"))
    assert g1["dropped"] is None and g1["cfg"]["hr"] is False, g1["dropped"]


@pytest.mark.usefixtures("one_thread")
def test_rates_smoke_on_a_tiny_model(tmp_path):
    """(a) on a tiny random model: one row per pool prompt, n samples each, the counts of reward_fn's
    accuracy per prompt (problem-major order); with the trainer's own scorer the file is well formed."""
    world = make_world(str(tmp_path / "w"), n_math=6)
    opts = ["--model", f"{world}/model", "--math_train", f"{world}/math_train.jsonl", "--max_new_tokens", "3",
            "--temperature", "1.0", "--gen_slots", "8", "--reward_workers", "1"]
    out = tmp_path / "rates.jsonl"

    def every_other_prompt(tok, problems, rolls, cfg):  # prompts 0, 2, 4 always right; the others 1 in 3
        return [rewards.Score(float(r.prompt_idx % 2 == 0 or i % 3 == 0), 0.0, 0.0)
                for i, r in enumerate(rolls)]

    msg = mech.main(["rates", "--n", "3", "--out", str(out), "--"] + opts, reward_fn=every_other_prompt)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"math-train-{i}" for i in range(6)], rows
    assert [r["correct"] for r in rows] == [3, 1, 3, 1, 3, 1] and all(r["n"] == 3 for r in rows), rows
    assert rows[1]["rate"] == 1 / 3 and "6 prompts" in msg, (rows, msg)
    mech.main(["rates", "--n", "2", "--out", str(out)] + opts)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["n"] == 2 and r["rate"] == r["correct"] / 2 for r in rows), rows
    assert mech.read_rates(str(out)) == {r["id"]: r["rate"] for r in rows}

# -----------------------------------------------------------------------------
# bench/hr_stats.py: the second experiment's one-sided tests



def load_hr_stats():
    """bench/hr_stats.py (it needs scipy, which requirements.txt lists)."""
    return bench_module("hr_stats")


def enumerated_p(a: list, b: list) -> float:
    """The one-sided exact permutation p by plain enumeration, the reference for scipy's."""
    import itertools
    pooled, obs = a + b, sum(a) / len(a) - sum(b) / len(b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    hits = 0
    for idx in splits:
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += sum(x) / len(x) - sum(y) / len(y) >= obs - 1e-9
    return hits / len(splits)


def test_noninferiority_by_hand():
    """Non-inferiority, margin 0.05: difference -0.01, se 0.01: t = 4 (8 df), bound -0.01 - t(.95, 8) .01."""
    hr_stats = load_hr_stats()
    import scipy.stats as stats
    a, b = [0.40, 0.42, 0.38, 0.41, 0.39], [0.41, 0.43, 0.39, 0.42, 0.40]  # each: variance 0.00025
    r = hr_stats.noninferiority(a, b, 0.05)
    assert math.isclose(r["diff"], -0.01) and math.isclose(r["t"], 4.0) and math.isclose(r["df"], 8.0), r
    assert math.isclose(r["p_welch"], stats.t.sf(4.0, 8)), r
    assert math.isclose(r["lower"], -0.01 - stats.t.ppf(0.95, 8) * 0.01), r
    # shifted by the margin, a is the top five of the ten values, with one tie (0.43): 2 of 252 splits
    assert math.isclose(r["p_perm"], 2 / 252), r
    assert math.isclose(r["p_perm"], enumerated_p([x + 0.05 for x in a], b)), r
    worse = hr_stats.noninferiority([x - 0.10 for x in a], b, 0.05)
    assert worse["p_welch"] > 0.5 and worse["p_perm"] > 0.5, f"0.11 worse must fail a 0.05 margin: {worse}"


def test_interaction_paired_and_unpaired():
    """The difference of differences: seed-paired Welch and permutation, one-sided; the unpaired contrast is
    Welch's two-sample test when the G = 4 arms are constant."""
    hr_stats = load_hr_stats()
    import scipy.stats as stats
    a16, b16 = {1: .30, 2: .35, 3: .32, 4: .31, 5: .36}, {1: .38, 2: .40, 3: .39, 4: .41, 5: .40}
    a4, b4 = {1: .28, 2: .25, 3: .28, 4: .26, 5: .35}, {1: .40, 2: .41, 3: .36, 4: .42, 5: .39}
    r = hr_stats.interaction(a16, b16, a4, b4)
    d16 = [a16[s] - b16[s] for s in range(1, 6)]
    d4 = [a4[s] - b4[s] for s in range(1, 6)]
    ref = stats.ttest_ind(d16, d4, equal_var=False, alternative="greater")
    assert math.isclose(r["dd"], sum(d16) / 5 - sum(d4) / 5) and math.isclose(r["p_welch"], ref.pvalue), r
    assert math.isclose(r["p_perm"], enumerated_p(d16, d4)), r
    assert r["low"] < r["dd"] < r["high"], r
    const = {s: 0.4 for s in range(1, 6)}
    est, se, df = hr_stats.welch_contrast([list(a16.values()), list(b16.values()), list(const.values()),
                                           list(const.values())], [1, -1, -1, 1])
    two = stats.ttest_ind(list(a16.values()), list(b16.values()), equal_var=False)
    assert math.isclose(est / se, two.statistic) and math.isclose(df, two.df), (est / se, df, two)
    with pytest.raises(ValueError, match="pairing by seed"):
        hr_stats.interaction(a16, {9: 0.1}, a4, b4)


def fake_run(root, seed: int, final: float) -> str:
    os.makedirs(root)
    json.dump({"seed": seed, "hr": True}, open(os.path.join(root, "config.json"), "w"))
    recs = [{"type": "eval", "step": 0, "pass1_math": 0.3}, {"type": "step", "step": 8, "gen_tokens": 100},
            {"type": "eval", "step": 8, "pass1_math": final}]
    open(os.path.join(root, "metrics.jsonl"), "w").write("".join(json.dumps(r) + "\n" for r in recs))
    return str(root)


def test_hr_stats_cli_reads_runs(tmp_path):
    """hr_stats.main reads arms of run folders through compare.py and prints both primary metrics per test."""
    hr_stats = load_hr_stats()
    arms = {}
    for label, finals in {"A": [.40, .42, .38, .41, .39], "B": [.41, .43, .39, .42, .40],
                          "C": [.30, .31, .29, .33, .32], "D": [.40, .42, .41, .43, .39]}.items():
        arms[label] = ",".join(fake_run(tmp_path / f"{label}{s}", s, v) for s, v in enumerate(finals, 1))
    out = hr_stats.main(["noninferior", f"A={arms['A']}", f"B={arms['B']}", "--margin", "0.05"])
    row = next(x for x in out.splitlines() if x.startswith("| final pass@1"))
    assert "| -0.010 |" in row and row.endswith("| 0.008 | yes |"), row
    assert "| area under curve |" in out, out
    out = hr_stats.main(["interaction"] + [f"{k}={arms[k]}" for k in "ABCD"])
    row = next(x for x in out.splitlines() if x.startswith("| final pass@1"))
    assert "| -0.010 | -0.100 | +0.090 [" in row, row  # A - B = -0.01, C - D = -0.10
    with pytest.raises(ValueError, match="takes 4"):
        hr_stats.main(["interaction", f"A={arms['A']}", f"B={arms['B']}"])


def test_reproduces_compares_every_committed_field_but_wall_times(tmp_path):
    """reproduces: other wall times and new keys pass; a changed count or a loss off by 1e-3 is named."""
    hr_stats = load_hr_stats()
    old = os.path.join(ROOT, "bench/hr-exp/grpo-s2")
    recs = [json.loads(x) for x in open(os.path.join(old, "metrics.jsonl"))]

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        rows = [dict(r) for r in recs]
        change(rows)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    same = variant("same", lambda rows: [r.update(t_gen=1.0, tok_s=9.0, new_key=[1])
                                         for r in rows if r["type"] == "step"])
    assert hr_stats.reproduces(same, old) == [], "wall times and new keys must not count"
    tiny = variant("tiny", lambda rows: rows[1].update(loss=rows[1]["loss"] * (1 + 1e-6)))
    assert hr_stats.reproduces(tiny, old) == [], "a float within 1e-4 relative reproduces"
    off = variant("off", lambda rows: (rows[1].update(loss=rows[1]["loss"] * 1.001),
                                       rows[2].update(gen_tokens=1)))
    diffs = hr_stats.reproduces(off, old)
    assert len(diffs) == 2 and "loss" in diffs[0] and "gen_tokens = 1" in diffs[1], diffs
    short = variant("short", lambda rows: rows.pop())
    assert "records" in hr_stats.reproduces(short, old)[0]
    with pytest.raises(SystemExit):
        hr_stats.main(["reproduces", off, old])

# -----------------------------------------------------------------------------
# bench/hr_experiment.sh: the order of runs, the controls' decision, the commit check (a fake python3)

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
if [ "$1" = srpo.py ]; then
    out=""; prev=""
    for a in "$@"; do [ "$prev" = --out_dir ] && out=$a; prev=$a; done
    # As srpo.py (runfolder.py): it writes only into a new or empty folder, or one of its own runs.
    if [ -d "$out" ] && [ ! -f "$out/.srpo-run" ] && [ -n "$(ls -A "$out")" ]; then
        echo "srpo: error: --out_dir $out holds what no srpo run put there" >&2; exit 2
    fi
    mkdir -p "$out" && touch "$out/.srpo-run" && echo '{"type": "eval", "tag": "after"}' > "$out/metrics.jsonl"
    echo '{}' > "$out/config.json"
elif [ "$1" = bench/hr_stats.py ] && [ "$2" = reproduces ]; then
    exit "$REPRO"
elif [ "$1" = bench/hr_mechanism.py ] && [ "$2" = rates ]; then
    touch "$6"
fi
"""


def experiment(tmp_path, exp: str, seeds: str, repro: int = 0, *more: str):
    """bench/hr_experiment.sh EXP in a scratch git repository with a fake python3: its calls and status."""
    import subprocess
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "bench").mkdir(parents=True)
        script = open(os.path.join(ROOT, "bench", "hr_experiment.sh")).read()
        (repo / "bench" / "hr_experiment.sh").write_text(script)
        git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)
        git("init", "-q")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "x", "--allow-empty")
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "script")
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "python3").write_text(FAKE_PYTHON)
        (tmp_path / "bin" / "python3").chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", CALLS=str(calls),
               REPRO=str(repro), SEEDS=seeds)
    p = subprocess.run(["bash", "bench/hr_experiment.sh", exp, *more], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    lines = calls.read_text().splitlines()
    runs = [x.split("--out_dir ")[1].split()[0] for x in lines if x.startswith("srpo.py")]
    return p, lines, runs, repo


def test_experiment_g4_reuses_controls_only_when_they_reproduce(tmp_path):
    """g4: SRPO and GRPO seed 2 first; reproduced -> only the posterior arm runs, else all controls again."""
    p, lines, runs, repo = experiment(tmp_path / "a", "g4", "1 2", repro=0)
    assert p.returncode == 0, p.stderr
    g = "runs/hr-exp2/g4/"
    assert runs == [g + "srpo-s2", g + "grpo-s2", g + "post-s1", g + "post-s2"], runs
    assert (repo / "bench/hr-exp2/g4/controls").read_text().strip() == "bench/hr-exp"
    post = next(x for x in lines if "post-s1" in x)
    assert "--hr --hr_rule posterior --seed 1" in post and "--G 4" in post, post
    assert "--max_prompts 64" in post, post
    rates = [x for x in lines if x.startswith("bench/hr_mechanism.py rates")]
    assert len(rates) == 2 and "--model default" in rates[0], rates
    assert f"--model {g}srpo-s2/policy" in rates[1], rates
    test = ("bench/hr_stats.py noninferior POST=bench/hr-exp2/g4/post-s1,bench/hr-exp2/g4/post-s2 "
            "GRPO=bench/hr-exp/grpo-s1,bench/hr-exp/grpo-s2")
    assert any(x.startswith(test) for x in lines), lines
    p, lines, runs, repo = experiment(tmp_path / "b", "g4", "1 2", repro=1)
    assert p.returncode == 0, p.stderr
    want = ["srpo-s2", "grpo-s2", "post-s1", "srpo-s1", "grpo-s1", "post-s2"]
    assert runs == [g + r for r in want], runs
    assert (repo / "bench/hr-exp2/g4/controls").read_text().strip() == "bench/hr-exp2/g4"
    assert (repo / "bench/hr-exp2/g4/srpo-s1/commit").exists(), "each kept run records its commit"


def test_experiment_g16_flags_resume_and_commit_check(tmp_path):
    """g16: G = 16, 2 prompts a step, a pool of 16; finished runs skipped; another commit's refused."""
    p, lines, runs, repo = experiment(tmp_path, "g16", "1")
    assert p.returncode == 0, p.stderr
    assert runs == ["runs/hr-exp2/g16/srpo-s1", "runs/hr-exp2/g16/grpo-s1"], runs
    srpo_call = next(x for x in lines if x.startswith("srpo.py"))
    for flag in ("--hr --seed 1", "--G 16", "--prompts_per_step 2", "--max_prompts 16", "--total_steps 32",
                 "--eval_k 4"):
        assert flag in srpo_call, f"{flag} missing: {srpo_call}"
    assert "--no_hr" in next(x for x in lines if "grpo-s1" in x and x.startswith("srpo.py"))
    (repo / "bench/hr-exp2/mechanism").mkdir(parents=True)
    (repo / "bench/hr-exp2/mechanism/base.jsonl").write_text("")
    p, lines, runs, _ = experiment(tmp_path, "g16", "1")
    assert p.returncode == 0 and runs == [], f"finished runs must be skipped: {runs}"
    assert "bench/hr_mechanism.py predict bench/hr-exp2/mechanism/base.jsonl --first 16" in lines, \
        "the report predicts the drops of the G = 16 pool: the first 16 prompts"
    half = repo / "runs/hr-exp2/g16/srpo-s2"
    half.mkdir(parents=True)
    (half / ".srpo-run").touch()
    (repo / "runs/hr-exp2/g16/srpo-s2.commit").write_text("0" * 40 + "\n")
    p, lines, runs, _ = experiment(tmp_path, "g16", "2")
    assert p.returncode == 1 and "was started at commit 0000" in p.stderr, (p.returncode, p.stderr)
    assert runs == [], runs
    p, _, _, _ = experiment(tmp_path, "g99", "1")
    assert p.returncode == 2 and "unknown experiment" in p.stderr, p.stderr


def test_experiment_hr1_keeps_the_first_experiments_options(tmp_path):
    """hr1 (no argument) passes the first experiment's srpo.py options, as in bench/hr-exp/*/config.json."""
    p, lines, runs, _ = experiment(tmp_path, "", "1")
    assert p.returncode == 0 and runs == ["runs/hr-exp/srpo-s1", "runs/hr-exp/grpo-s1"], (p.stderr, runs)
    args = next(x for x in lines if x.startswith("srpo.py")).split()
    opts = {a[2:]: b for a, b in zip(args, args[1:] + [""]) if a.startswith("--") and not b.startswith("--")}
    committed = json.load(open(os.path.join(ROOT, "bench/hr-exp/srpo-s1/config.json")))
    for k, v in opts.items():
        if k != "out_dir":
            same = str(committed[k]).lower() == v.lower() or float(committed[k]) == float(v)
            assert same, f"--{k} {v}: committed {committed[k]}"
    assert len(opts) == 18, sorted(opts)  # the 16 options of the protocol, --seed and --out_dir


@pytest.mark.usefixtures("one_thread")
def test_a_posterior_run_logs_what_the_mechanism_predicts(tmp_path):
    """A tiny srpo.py run with --hr_rule posterior: one prompt always right, the rest never; it is kept
    after its first all-right epoch and dropped after its second, the epoch record names it, and
    hr_mechanism predicts exactly that from pass rates 1 and 0."""
    from harness import world_args
    world = make_world(str(tmp_path / "w"), n_math=4)
    easy = "math-train-0"

    def one_easy(tok, problems, rolls, cfg):
        right = [float(problems[r.prompt_idx].id == easy) for r in rolls]
        return [rewards.Score(x, 0.0, x) for x in right]

    out = str(tmp_path / "run")
    # 4 prompts, 2 a step: epochs end at steps 2, 4 and (3 prompts left) 6
    srpo.main(world_args(world, out, total_steps=8, stage1_steps=8, eval_domains="math", hr_rule="posterior"),
              reward_fn=one_easy)
    obs = mech.observed(out)
    assert obs["dropped"] == [0, 1, 0] and obs["ids"] == [[], [easy], []], obs
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["kept_all_correct"] for r in recs if r["type"] == "epoch"] == [1, 0, 0], recs
    r = mech.compare_run({f"math-train-{i}": float(i == 0) for i in range(4)}, out, 0.9)
    assert r["predicted"] == [0.0, 1.0, 0.0] and r["observed"] == [0, 1, 0] and r["weak_dropped"] == (0, 1), r


def test_experiment_report_puts_every_experiment_side_by_side(tmp_path):
    """report: one compare.py --differences call, the G = 4 controls taken from the controls' decision."""
    p, lines, runs, repo = experiment(tmp_path, "g4", "1 2", repro=1)  # the controls are rerun
    assert p.returncode == 0, p.stderr
    p, lines, runs, _ = experiment(tmp_path, "report", "1 2")
    assert p.returncode == 0 and runs == [], (p.stderr, runs)
    (call,) = [x for x in lines if x.startswith("bench/compare.py")]
    g4 = "bench/hr-exp2/g4/"
    for group in ("G4, first experiment:SRPO=bench/hr-exp/srpo-s1,bench/hr-exp/srpo-s2",
                  f"G4 at the fixed commit:GRPO={g4}grpo-s1,{g4}grpo-s2",
                  f"G4 posterior rule:POST={g4}post-s1,{g4}post-s2 G4 posterior rule:GRPO={g4}grpo-s1,{g4}grpo-s2",
                  f"report's rule:SRPO={g4}srpo-s1,{g4}srpo-s2",
                  "G16:SRPO=bench/hr-exp2/g16/srpo-s1,bench/hr-exp2/g16/srpo-s2 G16:GRPO="):
        assert group in call, (group, call)
    assert "--differences" in call and call.count(":SRPO=") + call.count(":GRPO=") + call.count(":POST=") == 10
    (repo / "bench/hr-exp2/g4/controls").write_text("bench/hr-exp\n")  # reproduced: no second G4 pair
    p, lines, _, _ = experiment(tmp_path, "report", "1 2")
    (call,) = [x for x in lines if x.startswith("bench/compare.py")]
    assert "fixed commit" not in call and "G4 posterior rule:GRPO=bench/hr-exp/grpo-s1" in call, call


def test_experiment_report_only_reads_the_kept_runs(tmp_path):
    """EXP report: no run starts; a kept run that is missing or unfinished is named and nothing printed."""
    p, lines, runs, repo = experiment(tmp_path, "g16", "1 2", 0, "report")
    assert p.returncode == 1 and runs == [] and not any(x.startswith("bench/") for x in lines), (p.stderr, lines)
    assert "bench/hr-exp2/g16/srpo-s1" in p.stderr and "bench/hr-exp2/g16/grpo-s2" in p.stderr, p.stderr
    p, *_ = experiment(tmp_path, "g4", "1 2", 1)  # made here, kept in bench/hr-exp2/g4, controls rerun
    assert p.returncode == 0, p.stderr
    import shutil
    shutil.rmtree(repo / "runs")  # as in a checkout of main: the kept runs only
    p, lines, runs, _ = experiment(tmp_path, "g4", "1 2", 1, "report")
    assert p.returncode == 0 and runs == [], (p.stderr, runs)
    assert any(x.startswith("bench/hr_stats.py noninferior POST=bench/hr-exp2/g4/post-s1") for x in lines), lines
    (repo / "bench/hr-exp2/g4/grpo-s2/metrics.jsonl").write_text('{"type": "step"}\n')  # cut off
    p, lines, _, _ = experiment(tmp_path, "g4", "1 2", 1, "report")
    assert p.returncode == 1 and "bench/hr-exp2/g4/grpo-s2" in p.stderr and lines == [], (p.stderr, lines)
    p, *_ = experiment(tmp_path, "g4", "1", 0, "again")
    assert p.returncode == 2 and "unknown second argument 'again'" in p.stderr, p.stderr
