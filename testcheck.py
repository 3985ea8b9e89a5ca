"""
Do a code row's tests test anything? A row whose tests pay a program that does not solve the
problem teaches the policy to write that program, so every row is checked before it is trained on:
by the loader (datafile.load_problems), by the data generator (data/make_data.py) and by converters of
outside data sets, which skip and count the rows this rejects.

Two levels, because they cost very different amounts:
  static  (every load, every row; parsing only): the tests parse (sandbox.check_tests), and every
          case or assert compares something computed by the program with something that is not.
          `# tests to be written`, `x = 1`, `assert True`, `add(1, 2)`, `print(add(1, 2))` and
          `1 == 1` all run to the end for any program; each is rejected here, with its reason.
  full    (the static check, then programs run through the trainer's own scoring, score_batch):
          a row with a reference solution passes with it, and no trivial program passes: a
          function with the tests' entry-point name (derived from the names the tests use but
          never define) returning 0, 1, -1, None, "", [], {}, its first argument, that
          argument's length or its sum; for the stdin/stdout form, a program that prints
          nothing, 0, 1, -1, YES, NO, Yes, No or its input back (TRIVIAL_STDIN). A trivial
          program that errors simply does not pass.

Where the full check runs, and why there: it costs 11 sandbox starts a row (~0.1 s each); the 700
shipped rows took 8.6 minutes on 2 shared cores. So the shipped rows are checked where that is paid
once: at generation (make_data.py, in-process on its own trusted functions, with TRIVIAL below) and
by tests/test_data.py, which runs this module's full check over every shipped row. A user's file is
checked fully at every start-up by default (srpo.py --check_tests full), spread over the reward
workers: seconds for a demo-sized run. `--check_tests static` skips the programs, and says so in
the log: never silently.

Public API:
    TRIVIAL                                      (label, return expression) of each trivial program
    TRIVIAL_STDIN                                (label, program) of each trivial stdin/stdout program
    entry_points(tests) -> list[str]             the program's names the tests use
    check_static(tests)                          ValueError naming the line (or case) unless the tests test
    trivial_programs(tests) -> list[(label, program)]
    row_problems(rows, sandbox, workers) -> list[str | None]   the full check of many rows
    check_rows(rows, full, sandbox, workers)     ValueError naming file:line, field and reason

    python testcheck.py FILE.jsonl... [--sandbox MODE] [--workers N]   the full check of files
"""
import argparse
import ast
import builtins
import json
import sys

import rewards
from sandbox import check_tests

# The trivial programs: `def NAME(*args, **kwargs): return EXPR` for each entry point NAME. A row
# that one of them passes rewards a policy for not reading the problem.
TRIVIAL = (("0", "0"), ("1", "1"), ("-1", "-1"), ("None", "None"), ('""', '""'), ("[]", "[]"),
           ("{}", "{}"), ("its first argument", "args[0]"), ("its length", "len(args[0])"),
           ("its sum", "sum(args[0])"))
# The stdin/stdout form's trivial programs: the answers a judge's problems most often have, and
# the input echoed back.
TRIVIAL_STDIN = (("prints nothing", "pass\n"), ("prints 0", "print(0)\n"),
                 ("prints 1", "print(1)\n"), ("prints -1", "print(-1)\n"),
                 ("prints YES", "print('YES')\n"), ("prints NO", "print('NO')\n"),
                 ("prints Yes", "print('Yes')\n"), ("prints No", "print('No')\n"),
                 ("prints its input back", "import sys\nsys.stdout.write(sys.stdin.read())\n"))


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _entry_points(tree: ast.AST) -> list[str]:
    """Names the tests read but never bind and Python does not define: what the program must."""
    bound, read = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.setdefault(node.id)
            else:
                bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return [n for n in read if n not in bound and not hasattr(builtins, n)]


def entry_points(tests: str) -> list[str]:
    """The program's names the tests use (`add` in `add(1, 2) == 3`; `has_close_elements` in
    HumanEval's `check(has_close_elements)`), in order of first use."""
    return _entry_points(ast.parse(tests))


def _program_values(tree: ast.AST, entries: list[str]) -> set[str]:
    """Every name of the tests that may hold something computed by the program: its entry points,
    what is assigned or iterated from them, and the parameters of the tests' own functions that
    are called with them (HumanEval's `candidate`). Scopes are ignored: a name is tainted
    everywhere, which can only let a test through here, for the trivial programs to judge."""
    tainted = set(entries)
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    while True:
        before = len(tainted)
        for node in ast.walk(tree):
            targets, sources = [], []
            if isinstance(node, ast.Assign):
                targets, sources = node.targets, [node.value]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) and node.value:
                targets, sources = [node.target], [node.value]
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                targets, sources = [node.target], [node.iter]
            elif isinstance(node, ast.withitem) and node.optional_vars:
                targets, sources = [node.optional_vars], [node.context_expr]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defs:
                f = defs[node.func.id]
                targets = [ast.Name(a.arg) for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
                sources = node.args + [k.value for k in node.keywords]
            if any(_names(s) & tainted for s in sources):
                tainted |= set().union(*(_names(t) for t in targets))
        if len(tainted) == before:
            return tainted


def check_static(tests: str | list) -> None:
    """Raise ValueError, naming the line, unless `tests` parse and every case or assert compares a
    value computed by the program with one that is not (see the module docstring). The stdin/stdout
    form (a list) compares the program's output with each case's by construction: its shape only."""
    check_tests(tests)  # parses; empty tests and malformed cases are refused there
    if isinstance(tests, list):
        return
    tree = ast.parse(tests)
    entries = _entry_points(tree)
    if not entries:
        raise ValueError("the tests use no function of the program: every name in them is a "
                         "builtin or defined by the tests themselves")
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Compare):
        # Case form (check_tests has made sure every line is `X == LITERAL`): X must call the program.
        for stmt in body:
            if not _names(stmt.value.left) & set(entries):
                raise ValueError(f"tests line {stmt.lineno}: the case "
                                 f"{ast.get_source_segment(tests, stmt)[:80]!r} computes nothing "
                                 f"with the program: both sides are the tests' own values")
        return
    # Assert form: the asserts are the checks; everything else is set-up.
    program = _program_values(tree, entries)
    checks = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert) or isinstance(node.test, ast.Constant):
            # A constant assert is a no-op, neither a check nor a fault: HumanEval's tests hold
            # `assert True, "This prints if this assert fails"` beside their real asserts.
            continue
        where = f"tests line {node.lineno}"
        if not _names(node.test) & program:
            raise ValueError(f"{where}: the assert checks nothing the program computed")
        if isinstance(node.test, ast.Compare):
            sides = [node.test.left] + node.test.comparators
            if all(_names(s) & program for s in sides):
                raise ValueError(f"{where}: the assert compares the program's values only with "
                                 f"each other, never with an expected value")
        checks += 1
    if not checks:
        raise ValueError("no case or assert checks a value the program computed (the tests run to "
                         "the end whatever the program does)")


def _static_problem(tests: str) -> str | None:
    """Why the static check refuses `tests`, or None."""
    try:
        check_static(tests)
    except ValueError as e:
        return str(e)
    return None


def trivial_programs(tests: str | list) -> list[tuple[str, str]]:
    """(label, source) of each trivial program for these tests: every entry point defined as a
    function that returns the same trivial value (the stdin/stdout form: TRIVIAL_STDIN)."""
    if isinstance(tests, list):
        return [(f"the program {label}", program) for label, program in TRIVIAL_STDIN]
    names = entry_points(tests)
    return [(f"every function returns {label}",
             "".join(f"def {n}(*args, **kwargs):\n    return {expr}\n" for n in names))
            for label, expr in TRIVIAL]


def _fenced(program: str) -> str:
    """A completion whose code block is `program`, as score_batch extracts it."""
    return f"<answer>```python\n{program}```</answer>"


def row_problems(rows: list[tuple[str | list, str | None]], sandbox: str | None = None,
                 workers: int | None = None) -> list[str | None]:
    """The full check of each (tests, reference solution or None): why it fails, or None. All
    programs of all rows go through one rewards.score_batch, so they are scored exactly as a
    rollout is (same sandbox mode, same verdict) and spread over the reward workers."""
    problems = [_static_problem(tests) for tests, _ in rows]
    items = []  # (row index, what, program)
    for i, (tests, solution) in enumerate(rows):
        if problems[i]:
            continue
        if solution is not None:
            items.append((i, "the reference solution", solution))
        items += [(i, label, program) for label, program in trivial_programs(tests)]
    # A program holding ``` cannot travel fenced; it is scored alone, the same way (run_program).
    fenced = [it for it in items if "```" not in it[2]]
    scores = rewards.score_batch([_fenced(p) for _, _, p in fenced], ["code"] * len(fenced),
                                 [rows[i][0] for i, _, _ in fenced], workers=workers, sandbox=sandbox)
    verdicts = [(it, s.accuracy == 1.0, s.error) for it, s in zip(fenced, scores)]
    verdicts += [(it, *rewards.run_program(it[2], rows[it[0]][0], sandbox=sandbox)[:2])
                 for it in items if "```" in it[2]]
    for (i, what, _), passed, error in verdicts:
        if problems[i] is not None:
            continue
        if what == "the reference solution" and not passed:
            problems[i] = f"the reference solution fails its tests ({error or 'a wrong result'})"
        elif what != "the reference solution" and passed:
            problems[i] = f"a trivial program passes the tests ({what}): they do not test the problem"
    return problems


def check_rows(rows: list[tuple[str | list, str | None, str]], full: bool = True, sandbox: str | None = None,
               workers: int | None = None) -> None:
    """The loader's check of (tests, reference solution or None, "file:line") rows: ValueError
    naming the first bad row's file, line, field and reason. `full` runs the programs too."""
    if full:
        problems = row_problems([(t, s) for t, s, _ in rows], sandbox, workers)
    else:
        problems = [_static_problem(tests) for tests, _, _ in rows]
    for (_, _, where), why in zip(rows, problems):
        if why:
            raise ValueError(f"{where}: field 'tests': {why}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The full check of the code rows of JSONL files: "
                                            "every failing row is printed; exit status 1 if any")
    p.add_argument("files", nargs="+")
    p.add_argument("--sandbox", default=None, help="sandbox mode (default: $SRPO_SANDBOX or full)")
    p.add_argument("--workers", type=int, default=None, help="reward workers (default: one per core)")
    args = p.parse_args(argv)
    rows, where = [], []
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    rows.append((row["tests"], row.get("solution")))
                    where.append(f"{path}:{lineno} ({row.get('id')})")
    problems = row_problems(rows, args.sandbox, args.workers)
    for w, why in zip(where, problems):
        if why:
            print(f"{w}: field 'tests': {why}")
    bad = sum(map(bool, problems))
    print(f"{len(rows) - bad} of {len(rows)} rows pass the full check")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
