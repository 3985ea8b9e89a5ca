"""The GPU benchmarks' CPU smoke modes: every code path a GPU run takes, on tiny shapes, so that
the benchmarks still run (and still compare like with like) when a GPU session gets to them."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(name: str) -> str:
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), "--cpu-smoke"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"bench/{name} --cpu-smoke failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_loss_benchmark_methods_compute_the_same_loss():
    """bench/loss.py's timed methods (srpo kernels and naive torch among them) print the same loss per shape."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in smoke("loss.py").splitlines()
            if re.match(r"\| \d+ \| \d+ \|", line)]
    by_shape = {}
    for H, V, method, ms, *_, loss in rows:
        if "floor" not in method and re.fullmatch(r"-?\d+\.\d+", loss):
            by_shape.setdefault((H, V), {})[method] = float(loss)
    assert len(by_shape) == 2, f"expected two shapes with timed methods: {rows}"
    for shape, losses in by_shape.items():
        assert {"srpo kernels", "naive torch"} <= set(losses), f"{shape}: a method did not run: {losses}"
        assert max(losses.values()) - min(losses.values()) < 1e-5, f"{shape}: the methods disagree: {losses}"


def test_update_benchmark_runs_every_variant():
    """bench/update.py prints a row for each of 2 budgets x 4 variants, and no row says FAILED or OOM."""
    out = smoke("update.py")
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \(\d+ mb\) \|", line)]
    assert len(rows) == 8, f"expected 2 budgets x 4 variants:\n{out}"
    assert not any("FAILED" in r or "OOM" in r for r in rows), "\n".join(rows)


@pytest.mark.cxx
def test_sampler_benchmark_compiled_equals_eager():
    """bench/sampler.py's compiled decode step gives the eager step's greedy tokens on both toy model shapes."""
    out = smoke("sampler.py")
    assert out.count("compiled step == eager step") == 2, out


def _load_check_identity():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_identity", os.path.join(ROOT, "bench", "check_identity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_identity_check_accepts_the_baseline_and_catches_a_change():
    """bench/check_identity.py passes the baseline against itself, ignores timings and added fields,
    tolerates float noise in the update's statistics, and flags a changed token count, a changed
    loss and a missing record."""
    ci = _load_check_identity()
    base = ci.read(os.path.join(ROOT, ci.BASELINE))
    assert ci.compare(base, base) == [], "the baseline must reproduce itself"
    run = [dict(r) for r in base]
    step = next(r for r in run if r["type"] == "step" and r["tokens_trained"] > 0)
    step["t_gen"] += 5.0
    step["new_field"] = 1
    step["loss"] *= 1 + 1e-6
    assert ci.compare(run, base) == [], "timings, new fields and 1e-6 float noise must pass"
    # A loss that is zero up to fp32 rounding may come back with the other sign, but not as 1e-5.
    near_zero = next(r for r in run if r["type"] == "step" and 0 < abs(r["loss"]) < 1e-6)
    near_zero["loss"] = -near_zero["loss"]
    assert ci.compare(run, base) == [], "a near-zero loss within fp32 rounding of zero must pass"
    near_zero["loss"] = 1e-5
    assert ci.compare(run, base), "a loss of 1e-5 where the baseline has zero must be caught"
    near_zero["loss"] = base[run.index(near_zero)]["loss"]
    step["gen_tokens"] += 1
    step["loss"] *= 1.01
    problems = ci.compare(run[1:], base)
    what = " | ".join(w for _, w in problems)
    assert "gen_tokens" in what and "loss" in what and "record missing" in what, problems


def test_reading_path_of_one_step_stays_in_six_core_files():
    """bench/reading_path.py traces one training step: skipping the support modules, a reader follows it
    through srpo.py and at most five other core files (curriculum, rollout, model, rewards and the
    sandbox's mode check), and srpo.py holds the most of it."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "reading_path.py")], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    core = re.search(r"without support modules:\s+(\d+) files, (\d+) functions, (\d+) jumps between files "
                     r"\((.*)\)", p.stdout)
    assert core, p.stdout[-2000:]
    files = dict((f, int(n)) for f, n in (part.rsplit(" ", 1) for part in core.group(4).split(", ")))
    assert int(core.group(1)) <= 6 and "srpo.py" in files, files
    assert not {"common.py", "memory.py", "run.py", "checkpoint.py"} & set(files), files
    assert files["srpo.py"] >= 10, f"the step's own functions are in srpo.py: {files}"
