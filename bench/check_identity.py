"""
Does a CPU demo run reproduce the baseline metrics? The check every change to the training path is
held to (docs/tests.md, "Changing the training path"):

    bash train.sh demo --dtype fp32 --no_resume --out_dir runs/identity
    python bench/check_identity.py runs/identity/metrics.jsonl

Every record of the baseline (bench/img/demo-cpu-metrics.jsonl) must appear in the run, matched
by type, step and tag, with every field equal, except timings (ignored) and the update's float
statistics, which may differ in the last digits because a change can reorder float sums (relative
1e-4). New record types and new fields in the run are allowed; a missing or changed one is not.
Exit status 1 on a mismatch.
"""
import argparse
import json
import math
import sys

BASELINE = "bench/img/demo-cpu-metrics.jsonl"
TIMINGS = {"t_gen", "t_score", "t_update", "tok_s"}
UPDATE_FLOATS = {"loss", "ratio", "kl", "entropy", "grad_norm"}
RTOL = 1e-4
# A step whose groups nearly cancel logs a loss that is zero up to fp32 rounding (a token mean of
# terms -A * ratio, |A| <= 1.5, each rounded at 1.2e-7 relative): run to run, on the same commit and
# CPU, such a loss came back anywhere within about 1.1e-7 of zero (bench/RESULTS.md, "The identity
# check"), so no relative tolerance can hold it and 1e-8 absolute failed the unchanged code.
ATOL = 1e-6


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(run: list[dict], base: list[dict]) -> list[tuple]:
    """The differences as (record key, what differs); empty when the run reproduces the baseline."""
    # Records are matched by (type, step, tag): a run may log record types the baseline lacks.
    key = lambda r: (r.get("type"), r.get("step"), r.get("tag"))  # noqa: E731
    by_key = {key(r): r for r in run}
    problems = []
    for b in base:
        r = by_key.get(key(b))
        if r is None:
            problems.append((key(b), "record missing"))
            continue
        for field, want in b.items():
            if field in TIMINGS:
                continue
            if field not in r:
                problems.append((key(b), f"field {field!r} missing"))
                continue
            got = r[field]
            if field in UPDATE_FLOATS:
                ok = math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL)
            else:
                ok = got == want
            if not ok:
                problems.append((key(b), f"{field} = {got!r}, baseline {want!r}"))
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("metrics", help="the run's metrics.jsonl")
    ap.add_argument("--baseline", default=BASELINE)
    args = ap.parse_args(argv)
    try:
        run, base = read(args.metrics), read(args.baseline)
    except (OSError, ValueError) as e:
        print(f"check_identity: error: {e}", file=sys.stderr)
        return 2
    problems = compare(run, base)
    for where, what in problems:
        print(f"{where}: {what}")
    n, bad = len(base), len({where for where, _ in problems})
    print(f"{n - bad} of {n} baseline records reproduced (timings aside)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
