"""Tests for testcheck.py: tests that check nothing, or that a trivial program passes, are refused,
with a reason, by the check itself and by the loader (datafile.load_problems), naming file, line and
field. The check over every shipped row is in test_data.py."""
import json

import pytest

import datafile
import testcheck

# Tests the static check refuses, and the reason it gives. All but the last parse (sandbox.check_tests
# accepts them), and most run to the end whatever the program does: `def add(a, b): return 0` passes.
NOTHING = {
    "# tests to be written": "use no function of the program",
    "x = 1": "use no function of the program",
    "assert True": "use no function of the program",
    "add(1, 2)": "no case or assert checks",
    "print(add(1, 2))": "no case or assert checks",
    "1 == 1": "use no function of the program",
    "add(1, 2) == 3\n4 == 4": "line 2: the case '4 == 4' computes nothing",
    "assert add(1, 2) == 3\nassert len([1]) == 1": "line 2: the assert checks nothing the program",
    "assert add(1, 2) == add(2, 1)": "compares the program's values only with each other",
    "foo(": "not valid Python",
}


@pytest.mark.parametrize("tests", NOTHING, ids=range(len(NOTHING)))
def test_static_check_refuses_tests_that_check_nothing(tests):
    """Each do-nothing test (and a row with one such line) is refused with its reason."""
    with pytest.raises(ValueError, match=NOTHING[tests]) as e:
        testcheck.check_static(tests)
    assert str(e.value), "the refusal must say why"


# HumanEval's shape: the asserts live in check(candidate), `assert True` lines are no-ops, and the
# converter appends the call with the entry point.
HUMANEVAL_LIKE = '''
METADATA = {}


def check(candidate):
    assert candidate([1, 2, 3]) == 6
    for x in range(3):
        got = candidate([x])
        assert abs(got - x) < 1e-6
    assert not candidate([])
    assert True, "This prints if this assert fails (good for debugging!)"

check(total)
'''


def test_static_check_accepts_tests_that_test():
    """Case form and HumanEval-shaped asserts (helpers, loops, `assert True` no-ops) pass the static check."""
    testcheck.check_static("add(1, 2) == 3\nadd(-1, 1) == 0")
    testcheck.check_static(HUMANEVAL_LIKE)
    assert testcheck.entry_points(HUMANEVAL_LIKE) == ["total"], \
        "the entry point is the name the tests use and never define"
    assert testcheck.entry_points("f(len([1])) == 1") == ["f"], "builtins are not the program's"


def test_trivial_programs_define_every_entry_point():
    """Each trivial program defines every entry point, one per TRIVIAL return value."""
    programs = testcheck.trivial_programs("a(1) == 2\nb(2) == 3")
    assert len(programs) == len(testcheck.TRIVIAL) == 10, "one program per trivial value"
    for label, program in programs:
        env = {}
        exec(program, env)
        assert callable(env.get("a")) and callable(env.get("b")), f"{label}: entry points missing"


# (tests, reference solution, expected reason or None): each trivial value testcheck.TRIVIAL names.
FULL = [
    ("add(1, 2) == 3\nadd(0, 5) == 5", "def add(a, b):\n    return a + b\n", None),
    ("add(1, 2) == 3", "def add(a, b):\n    return a - b\n", "the reference solution fails"),
    ("f(3) == 0\nf(4) == 0", None, "returns 0"),
    ("f(3) == 1", None, "returns 1"),
    ("f(3) == -1", None, "returns -1"),
    ("f(3) == None", None, "returns None"),
    ("f(3) == ''", None, 'returns ""'),
    ("f(3) == []", None, "returns []"),
    ("f(3) == {}", None, "returns {}"),
    ("f(3) == 3\nf(7) == 7", None, "returns its first argument"),
    ("count([5, 6]) == 2\ncount([]) == 0", None, "returns its length"),
    ("total([5, 6]) == 11", None, "returns its sum"),
    ("assert f(3) == 0", None, "returns 0"),  # the assert form too
    ("f(1) == 2\nf(2) == 4", None, None),
]


def test_full_check_runs_reference_and_trivial_programs():
    """The full check refuses a row whose reference fails or that any trivial program passes, and no other."""
    problems = testcheck.row_problems([(t, s) for t, s, _ in FULL], workers=2)
    for (tests, _, want), got in zip(FULL, problems):
        if want is None:
            assert got is None, f"{tests!r} is a good row, refused: {got}"
        else:
            assert got is not None and want in got, \
                f"{tests!r}: expected a refusal naming {want!r}, got {got!r}"


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_loader_refuses_code_rows_that_do_not_test(tmp_path):
    """The loader stops on tests that check nothing, or (full) that `return 0` passes: file:line, field."""
    good = {"id": "c1", "question": "q", "tests": "add(1, 2) == 3",
            "solution": "def add(a, b):\n    return a + b\n"}
    path = write_rows(tmp_path / "code.jsonl", [good, {"id": "c2", "question": "q", "tests": "assert True"}])
    with pytest.raises(ValueError, match=r"code.jsonl:2: field 'tests': the tests use no function"):
        datafile.load_problems(path, "code", check_tests="static")
    path = write_rows(tmp_path / "code2.jsonl", [good, {"id": "c2", "question": "q", "tests": "f(1) == 0"}])
    assert len(datafile.load_problems(path, "code", check_tests="static")) == 2, "statically the row is fine"
    with pytest.raises(ValueError, match=r"code2.jsonl:2: field 'tests': a trivial program passes"):
        datafile.load_problems(path, "code", check_tests="full", workers=1)


def test_loader_refuses_an_unreadable_math_answer(tmp_path):
    """The loader stops on a math answer math-verify cannot read (`\\boxed{`), naming file:line and field."""
    path = write_rows(tmp_path / "math.jsonl", [{"id": "m1", "question": "q", "answer": "25"},
                                                {"id": "m2", "question": "q", "answer": "\\boxed{"}])
    with pytest.raises(ValueError, match=r"math.jsonl:2: field 'answer': math-verify cannot read"):
        datafile.load_problems(path, "math")
