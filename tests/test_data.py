"""
Tests for the demo data sets in data/ (made by data/make_data.py).

The checks are independent of the generator wherever they can be: math answers are re-derived
from the question text (a safe evaluator for the arithmetic, one pattern per word-problem
template), and every code row's solution is run against its tests (`CALL == LITERAL` cases, read
here with ast), which a wrong stub must fail.
"""
import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from fractions import Fraction

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
FILES = ["math_train", "math_test", "code_train", "code_test"]
EXPECTED_ROWS = {"math_train": 2000, "math_test": 200, "code_train": 600, "code_test": 100}
MATH_LEVELS, CODE_LEVELS = range(1, 7), range(1, 6)
FIELDS = {"math": {"id": str, "domain": str, "question": str, "answer": str, "level": int},
          "code": {"id": str, "domain": str, "question": str, "tests": str, "solution": str, "level": int}}


def load(name):
    with open(os.path.join(DATA, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows():
    return {name: load(name) for name in FILES}


# -----------------------------------------------------------------------------
# Files: reproducible, the right size, the right shape.


def test_regenerating_gives_identical_bytes(tmp_path):
    """The shipped data/*.jsonl equal, byte for byte, what a fresh `python data/make_data.py` writes."""
    subprocess.run([sys.executable, os.path.join(DATA, "make_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in FILES:
        shipped = open(os.path.join(DATA, f"{name}.jsonl"), "rb").read()
        fresh = open(tmp_path / f"{name}.jsonl", "rb").read()
        assert fresh == shipped, f"data/{name}.jsonl differs from a fresh `python data/make_data.py`: rerun it"


def test_counts_and_total_size(rows):
    """Each data file has its expected number of rows, and the four files together stay under 2 MB."""
    for name, n in EXPECTED_ROWS.items():
        assert len(rows[name]) == n, f"{name}: {len(rows[name])} rows, expected {n}"
    total = sum(os.path.getsize(os.path.join(DATA, f"{name}.jsonl")) for name in FILES)
    assert total < 2_000_000, f"data files total {total} bytes; the budget is 2 MB"


def test_schema(rows):
    """Every row has exactly its domain's typed fields, no empty string, and an id in sequence, none repeated."""
    for name in FILES:
        domain, split = name.split("_")
        ids = set()
        for i, row in enumerate(rows[name], start=1):
            where = f"{name} row {i}"
            assert set(row) == set(FIELDS[domain]), f"{where}: fields {sorted(row)}, expected {sorted(FIELDS[domain])}"
            for field, typ in FIELDS[domain].items():
                assert type(row[field]) is typ, f"{where}: {field} is {type(row[field]).__name__}, not {typ.__name__}"
            assert row["domain"] == domain, f"{where}: domain {row['domain']!r}"
            assert row["id"] == f"{domain}-{split}-{i:06d}", f"{where}: id {row['id']!r} out of sequence"
            ids.add(row["id"])
            for field in FIELDS[domain]:
                if FIELDS[domain][field] is str:
                    assert row[field].strip(), f"{where}: empty {field}"
        assert len(ids) == len(rows[name]), f"{name}: duplicate ids"


def test_train_and_test_are_disjoint(rows):
    """No question repeats in a split or sits in both; code statements, without their example, are disjoint too."""
    for domain in ("math", "code"):
        train = [r["question"] for r in rows[f"{domain}_train"]]
        test = [r["question"] for r in rows[f"{domain}_test"]]
        assert len(set(train)) == len(train), f"{domain}_train repeats a question"
        assert len(set(test)) == len(test), f"{domain}_test repeats a question"
        shared = set(train) & set(test)
        assert not shared, f"{domain}: {len(shared)} questions in both splits, e.g. {sorted(shared)[0]!r}"
    # A code question is a statement plus an example line drawn from its tests; two rows that differ
    # only in the example are the same problem, so the statements alone must be disjoint too.
    statement = lambda r: r["question"].split("\n")[0]  # noqa: E731
    shared = {statement(r) for r in rows["code_train"]} & {statement(r) for r in rows["code_test"]}
    assert not shared, f"code: {len(shared)} statements in both splits, e.g. {sorted(shared)[0]!r}"


def test_every_level_in_both_splits_and_roughly_even(rows):
    """Every level appears in both splits of each domain, each with at least 80% of an even share of the rows."""
    for domain, levels in (("math", MATH_LEVELS), ("code", CODE_LEVELS)):
        for split in ("train", "test"):
            name = f"{domain}_{split}"
            counts = {lv: sum(r["level"] == lv for r in rows[name]) for lv in levels}
            assert set(r["level"] for r in rows[name]) == set(levels), f"{name}: levels {counts}"
            assert min(counts.values()) >= 0.8 * len(rows[name]) / len(levels), f"{name}: uneven levels {counts}"


def test_splits_are_shuffled_across_levels(rows):
    """The first quarter of each file holds every level, so a run that reads only the first rows sees them all."""
    # A loader that reads the first rows of a file (a small CPU run) must still see every level.
    for name in FILES:
        first = rows[name][:len(rows[name]) // 4]
        n_levels = len(MATH_LEVELS if name.startswith("math") else CODE_LEVELS)
        assert len({r["level"] for r in first}) == n_levels, f"{name}: first quarter misses a level"


# -----------------------------------------------------------------------------
# Math: every answer canonical, and re-derived from the question.

INT, DEC, FRAC = re.compile(r"-?(0|[1-9]\d*)"), re.compile(r"-?(0|[1-9]\d*)\.\d*[1-9]"), re.compile(r"-?[1-9]\d*/[1-9]\d*")


def as_number(answer: str) -> Fraction:
    """The exact value of a canonical answer; fails on anything that is not one."""
    if INT.fullmatch(answer) or DEC.fullmatch(answer):
        return Fraction(answer)
    assert FRAC.fullmatch(answer), f"answer {answer!r} is not an integer, a decimal or p/q"
    value = Fraction(answer)
    assert f"{value.numerator}/{value.denominator}" == answer, f"fraction {answer!r} is not in lowest terms"
    return value


def safe_eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression: numbers, + - * /, parentheses, unary minus."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(repr(node.value))  # "2.5" -> 5/2 exactly
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not plain arithmetic: {ast.dump(node)}")
    return ev(ast.parse(expr, mode="eval"))


ARITHMETIC = re.compile(r"(?:What is|Compute|Calculate|Evaluate) ([-\d+*/(). ]+?)[?.]"
                        r"(?: Give the answer as a fraction in lowest terms\.)?")
N = r"(\d+)"
# One pattern per word-problem template, with how its answer follows from the numbers in it.
WORD_PROBLEMS = [
    (rf"\w+ has {N} \w+\. (?:He|She) gets {N} more\. How many \w+ does \w+ have now\?", lambda a, b: a + b),
    (rf"\w+ had {N} \w+ and gave {N} of them to \w+\. How many \w+ does \w+ have left\?", lambda a, b: a - b),
    (rf"There are {N} boxes with {N} \w+ in each box\. How many \w+ are there in total\?", lambda a, b: a * b),
    (rf"\w+ shares {N} \w+ equally among {N} friends\. How many \w+ does each friend get\?", lambda a, b: a / b),
    (rf"\w+ has {N} \w+ and \w+ has {N} \w+\. How many more \w+ does \w+ have than \w+\?", lambda a, b: a - b),
    (rf"A pen costs {N} dollars\. How many dollars do {N} pens cost\?", lambda a, b: a * b),
    (rf"\w+ buys {N} packs of \w+ with {N} \w+ in each pack, then gives away {N} \w+\. "
     rf"How many \w+ does \w+ have left\?", lambda a, b, c: a * b - c),
    (rf"\w+ earns {N} dollars per hour\. (?:He|She) works {N} hours on Monday and {N} hours on Tuesday\. "
     rf"How many dollars does (?:he|she) earn in total\?", lambda a, b, c: a * (b + c)),
    (rf"A shop has {N} \w+\. It sells {N} in the morning and {N} in the afternoon, then receives a "
     rf"delivery of {N} more\. How many \w+ does the shop have now\?", lambda a, b, c, d: a - b - c + d),
    (rf"\w+ has {N} dollars\. (?:He|She) buys {N} notebooks that cost {N} dollars each\. "
     rf"How many dollars does \w+ have left\?", lambda a, b, c: a - b * c),
    (rf"A class of {N} students is split into groups of {N}\. Each group gets {N} markers\. "
     rf"How many markers are handed out\?", lambda n, g, k: n / g * k),
    (rf"\w+ reads {N} pages a day for {N} days, and then {N} more pages\. "
     rf"How many pages does (?:he|she) read in total\?", lambda a, b, c: a * b + c),
    (rf"Tickets cost {N} dollars for adults and {N} dollars for children\. \w+ buys {N} adult tickets "
     rf"and {N} child tickets for (?:his|her) family\. How many dollars does (?:he|she) spend\?",
     lambda a, b, c, d: a * c + b * d),
    (rf"What is {N}% of {N}\?", lambda p, n: p * n / 100),
    (rf"A \w+ costs {N} dollars and is on sale for {N}% off\. What is the sale price in dollars\?",
     lambda price, p: price - price * p / 100),
    (rf"\w+ scored {N}, {N}, {N} and {N} on four tests\. What is the average score\?",
     lambda a, b, c, d: (a + b + c + d) / 4),
    (rf"\w+ has {N} dollars and spends {N}/{N} of it\. How many dollars does \w+ have left\?",
     lambda t, n, d: t - t * n / d),
]


def rederive(question: str) -> Fraction:
    m = ARITHMETIC.fullmatch(question)
    if m:
        return safe_eval(m.group(1))
    hits = [(m, f) for p, f in WORD_PROBLEMS if (m := re.fullmatch(p, question))]
    assert len(hits) == 1, f"{len(hits)} word-problem patterns match {question!r}"
    m, f = hits[0]
    return f(*[Fraction(g) for g in m.groups()])


def test_math_answers_are_canonical_and_correct(rows):
    """Math answers are canonical, equal the value re-derived from the question, and have their level's form."""
    for name in ("math_train", "math_test"):
        for row in rows[name]:
            where = f"{row['id']} {row['question']!r}"
            value = as_number(row["answer"])
            assert rederive(row["question"]) == value, f"{where}: answer {row['answer']} is wrong"
            if row["level"] <= 3:
                assert ARITHMETIC.fullmatch(row["question"]), f"{where}: levels 1-3 are plain arithmetic"
            if row["level"] <= 5:
                assert INT.fullmatch(row["answer"]), f"{where}: levels 1-5 have whole-number answers"
            if row["level"] in (4, 5):
                assert value >= 0, f"{where}: a word problem with a negative answer"


def test_math_levels_get_harder(rows):
    """Math levels get harder: level 1 answers are at most 18, word problems longer, level 6 has non-integers."""
    # A crude difficulty proxy that needs no model: the numbers grow and the questions lengthen.
    by_level = {lv: [r for r in rows["math_train"] if r["level"] == lv] for lv in MATH_LEVELS}
    assert all(0 <= int(r["answer"]) <= 18 for r in by_level[1]), "level 1 is single-digit + and - only"
    mean_len = [sum(len(r["question"]) for r in by_level[lv]) / len(by_level[lv]) for lv in MATH_LEVELS]
    assert mean_len[0] < mean_len[3] < mean_len[4], f"word problems should be longer: {mean_len}"
    assert any("/" in r["answer"] or "." in r["answer"] for r in by_level[6]), "level 6 has no non-integer answer"


# -----------------------------------------------------------------------------
# Code: every solution passes its own tests; stubs that are wrong fail them.


@contextmanager
def time_limit(seconds: float):
    """SIGALRM-based deadline: our own generated programs are trusted, but a bug must not hang CI."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"ran longer than {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cases(tests: str) -> list[tuple[str, object]]:
    """(call, expected value) of each line `CALL == LITERAL` (parsed here with ast, independently
    of rewards.parse_cases); fails on a line of any other shape."""
    out = []
    for line in tests.split("\n"):
        node = ast.parse(line, mode="eval").body
        assert isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq), \
            f"not a case `CALL == LITERAL`: {line!r}"
        out.append((ast.get_source_segment(line, node.left), ast.literal_eval(node.comparators[0])))
    return out


def same(want, got) -> bool:
    """Equal with exactly the same types all the way down, as the reward compares (True is not 1)."""
    if type(want) is not type(got):
        return False
    if isinstance(want, (list, tuple)):
        return len(want) == len(got) and all(same(w, g) for w, g in zip(want, got))
    return want == got


def run_program(program: str, tests: str) -> str | None:
    """None if `program` gives every case's expected value, else the first failure."""
    env = {"__name__": "__data_check__"}
    try:
        with time_limit(5.0):
            exec(compile(program, "<program>", "exec"), env)
            for call, want in cases(tests):
                got = eval(compile(call, "<case>", "eval"), env)
                if not same(want, got):
                    return f"{call} gave {got!r}, expected {want!r}"
    except Exception as e:  # noqa: BLE001 - any failure is a fail
        return f"{type(e).__name__}: {e}"
    return None


def func_name(row) -> str:
    return re.match(r"(\w+)\(", row["tests"]).group(1)


def test_code_rows_are_well_formed(rows):
    """A code row has 4 or more `f(...) == LITERAL` cases, a question naming f and a solution defining it."""
    for name in ("code_train", "code_test"):
        for row in rows[name]:
            fn = func_name(row)
            lines = row["tests"].split("\n")
            assert len(lines) >= 4, f"{row['id']}: only {len(lines)} tests"
            assert all(re.match(rf"{fn}\(.*\) == ", t) for t in lines), f"{row['id']}: a test is not `{fn}(...) == ...`"
            assert len(cases(row["tests"])) == len(lines), f"{row['id']}: a line is not one case"
            assert f"`{fn}(" in row["question"], f"{row['id']}: the question does not name `{fn}(...)`"
            tree = ast.parse(row["solution"])
            assert fn in [n.name for n in tree.body if isinstance(n, ast.FunctionDef)], f"{row['id']}: no def {fn}"


def test_code_solutions_pass_their_tests(rows):
    """Every code row's own solution passes all of its test cases, compared with exact types."""
    for name in ("code_train", "code_test"):
        for row in rows[name]:
            err = run_program(row["solution"], row["tests"])
            assert err is None, f"{row['id']}: its own solution fails: {err}\n{row['solution']}\n{row['tests']}"


@pytest.mark.parametrize("body", ["pass", "return args[0] if args else None"], ids=["none", "identity"])
def test_code_tests_reject_wrong_stubs(rows, body):
    """A stub returning None or its first argument fails every code row's tests: the tests tell wrong apart."""
    for name in ("code_train", "code_test"):
        for row in rows[name]:
            stub = f"def {func_name(row)}(*args, **kwargs):\n    {body}\n"
            assert run_program(stub, row["tests"]) is not None, f"{row['id']}: a stub `{body}` passes its tests"


@pytest.mark.slow
def test_every_shipped_code_row_passes_the_full_check(rows):
    """Every shipped code row passes testcheck's full check: its solution passes, no trivial program does.

    On ba93cea 8 training rows were paid to a trivial program (issue 26, finding 3): 000110, 000383, 000470,
    000514, 000533, 000539 and 000591 to `return 0`, 000207 to `return len(xs)`."""
    import testcheck
    code = rows["code_train"] + rows["code_test"]
    # 11 sandbox runs a row, ~7,700 in all, over one reward worker per core. In the rlimits mode: every
    # program here is ours (the references, the trivial functions), and the full sandbox took 20 min
    # on 2 loaded cores where rlimits took 8.6; the verdict is computed the same way in every mode.
    problems = testcheck.row_problems([(r["tests"], r["solution"]) for r in code], sandbox="rlimits")
    bad = [f"{r['id']}: {why}" for r, why in zip(code, problems) if why]
    assert not bad, f"{len(bad)} shipped code rows fail the full check:\n" + "\n".join(bad[:20])


# -----------------------------------------------------------------------------
# The rewards the trainer uses agree with the data (a sample per domain: they spawn processes).


def test_rewards_score_reference_answers_as_correct(rows):
    """The trainer's rewards give sampled reference answers 1, and an answer off by one or a stub 0."""
    from test_rewards import code_reward, math_reward
    rng = random.Random(0)
    for row in rng.sample(rows["math_train"], 15) + rng.sample(rows["math_test"], 5):
        good = f"<think>...</think> <answer>\\boxed{{{row['answer']}}}</answer>"
        assert math_reward(good, row["answer"]) == 1.0, f"{row['id']}: math_reward rejects its own answer {row['answer']}"
        wrong = as_number(row["answer"]) + 1
        bad = f"<think>...</think> <answer>\\boxed{{{wrong}}}</answer>"
        assert math_reward(bad, row["answer"]) == 0.0, f"{row['id']}: math_reward accepts {wrong} for {row['answer']}"
    for row in rng.sample(rows["code_train"], 15) + rng.sample(rows["code_test"], 5):
        assert code_reward(row["solution"], row["tests"]) == 1.0, f"{row['id']}: code_reward fails its solution"
        stub = f"def {func_name(row)}(*args, **kwargs):\n    pass\n"
        assert code_reward(stub, row["tests"]) == 0.0, f"{row['id']}: code_reward passes a stub"
