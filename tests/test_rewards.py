"""Tests for rewards.py: the template, math equivalence, code_reward, the worker pool. The code
sandbox (sandbox.py) has its own, in test_sandbox.py, which shares code_reward from here.

Where possible a verdict is checked against a real peer: math-verify called directly for the math
labels.
"""
import logging
import os
import random
import re
import signal
import subprocess
import time

import pytest

import rewards
from rewards import (CODE_TIMEOUT, MATH_TIMEOUT, extract_code, format_prompt, format_reward,
                     parse_response, run_program, score_batch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def math_reward(completion: str, answer: str, timeout: float = MATH_TIMEOUT) -> float:
    """1.0 iff the final answer of `completion` is equivalent to `answer`: one item through the
    worker pool, as the trainer scores it, so the deadline holds even when the verifier hangs."""
    return score_batch([completion], ["math"], [answer], math_timeout=timeout)[0].accuracy


def code_reward(program: str, tests: str, timeout: float = CODE_TIMEOUT,
                sandbox: str | None = None) -> float:
    """1.0 iff `program` passes `tests` in the sandbox (case form: every CALL gives its LITERAL;
    assert form: the statements run to the end). Runs in this process, no worker."""
    passed, _, _ = run_program(program, tests, timeout, sandbox)
    return 1.0 if passed else 0.0


# A reference that kills the reward worker scoring it, as a segfault would (crashing_workers).
CRASH = "<<test: crash this worker>>"


@pytest.fixture
def crashing_workers(monkeypatch):
    """Reward workers that die on an item whose reference is CRASH. A worker is `python -c CODE`
    (rewards._Worker); its CODE gets a prelude that wraps rewards._score_item, so the production
    path holds no hook. Starts a fresh pool, so every worker is patched, and ends it after. Yields
    CRASH."""
    prelude = (f"import os, sys; sys.path.insert(0, {ROOT!r}); import rewards; "
               f"score = rewards._score_item; rewards._score_item = lambda d, c, r, *a: "
               f"os._exit(70) if r == {CRASH!r} else score(d, c, r, *a); ")
    popen = subprocess.Popen

    def start(args, **kwargs):
        if isinstance(args, list) and args[1:2] == ["-c"] and "rewards._worker_loop(" in args[2]:
            args = [args[0], "-c", prelude + args[2]]
        return popen(args, **kwargs)

    rewards.shutdown()
    monkeypatch.setattr(subprocess, "Popen", start)
    yield CRASH
    rewards.shutdown()


def answer(text):
    return f"<think>Let me work it out.</think> <answer>{text}</answer>"


def fenced(program):
    return f"<think>Plan.</think> <answer>```python\n{program}\n```</answer>"


# -----------------------------------------------------------------------------
# The template

def test_format_prompt_has_instructions_and_question():
    """Each domain's prompt shows the four tags and answer form (box, fence) and ends with the question."""
    for domain in ("math", "code"):
        p = format_prompt("What is 2+2?", domain)
        assert p.endswith("What is 2+2?"), f"{domain} prompt must end with the question: {p!r}"
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            assert tag in p, f"{domain} prompt must show the {tag} tag"
    assert "\\boxed{}" in format_prompt("q", "math"), "math prompt must ask for \\boxed{}"
    assert "```python" in format_prompt("q", "code"), "code prompt must ask for a fenced block"


def test_parse_response():
    """parse_response splits reasoning and answer despite prefilled, missing, cut-off tags; the last wins."""
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
    """format_reward is 1 only for one non-empty think block, then one non-empty answer, nothing around."""
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


def _format_reward_regex(text):
    """format_reward as a backtracking regex: the reference for the linear version."""
    m = re.fullmatch(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", text, re.DOTALL)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return 0.0
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return 1.0 if all(text.count(t) == 1 for t in tags) else 0.0


def test_format_reward_is_linear_and_agrees_with_the_regex():
    """Past bug: format_reward's regex was quadratic (44 s on 500k characters); this agrees, fast."""
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u00a0", "\x1c", "a",
              "<", "think>", "b c"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert format_reward(text) == _format_reward_regex(text), f"disagrees on {text!r}"
    ordinary = [" <think>I add.</think>\n<answer>\\boxed{4}</answer> ",
                "<think>a</think>b<answer>c</answer>"]
    for text in ordinary:
        assert format_reward(text) == _format_reward_regex(text), f"disagrees on {text!r}"

    def too_slow(*_):
        raise TimeoutError("format_reward is not linear: 1 s on a 500k-character response")
    adversarial = "<think>" + "</think><answer>" * 31_000  # the regex needs minutes on this
    long_good = "<think>" + "x " * 250_000 + "</think> <answer>4</answer>"
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # a bound, not a measurement: it takes ~1 ms
    try:
        assert format_reward(adversarial) == 0.0, "repeated tags are not the template"
        assert format_reward(long_good) == 1.0, "a long well-formed response follows the template"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_bad_input_raises_clear_value_error():
    """Bad arguments raise a ValueError naming the argument (and its index); an empty batch scores to []."""
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
    ("25\\%", "25", True), ("50\\%", "50", True),
    ("[1, 2)", "[1,2)", True), ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("x^2-1", "(x-1)(x+1)", True), ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\frac{\\pi}{4}", "\\pi/4", True), ("x=5", "5", True), ("12", "12^\\circ", True),
    # near-misses
    ("\\frac{1}{2}", "0.25", False), ("3", "3.01", False), ("-5", "5", False),
    ("1/3", "0.33", False), ("\\pi", "3.14", False), ("50\\%", "0.05", False),
    # The percent sign is a unit (README, rewards): math-verify also reads 25% as 0.25, we do not.
    ("25\\%", "\\frac{1}{4}", False), ("0.5", "50\\%", False),
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
    """A MATH pair scores 1 exactly when equivalent, with no error, format 1 and reward equal to accuracy."""
    ref, pred, same = MATH[i]
    s = math_scores[i]
    assert s.accuracy == float(same), f"reference {ref!r} vs answer {pred!r}: expected " \
        f"{'equivalent' if same else 'different'}, got accuracy {s.accuracy} (error {s.error})"
    assert s.error is None, f"{ref!r} vs {pred!r} should verify cleanly, got error {s.error}"
    assert s.format == 1.0 and s.reward == s.accuracy, "format and reward must follow the score"


def test_math_labels_agree_with_math_verify_called_directly():
    """math-verify called directly agrees with every MATH label: the table tests our pipeline, not labels."""
    # The peer: math-verify on the bare boxed strings, in this process. Our pipeline (template
    # parsing, box extraction, worker processes) must not change its verdicts.
    # The only departures are the percent pairs below (one reading of %, tested in
    # test_math_percent_has_one_reading), where math-verify accepts both readings.
    from math_verify import parse, verify
    departures = {("25\\%", "\\frac{1}{4}"), ("0.5", "50\\%")}
    for ref, pred, same in MATH:
        direct = verify(parse("\\boxed{" + ref + "}"), parse("\\boxed{" + pred + "}"))
        want = not same if (ref, pred) in departures else same
        assert direct == want, f"math-verify itself says {ref!r} vs {pred!r} is {direct}"


def test_math_answer_location():
    """The answer part's last box counts (else its text, or the last box if untagged), not the reasoning's."""
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
    """A response with no usable answer scores 0 as a wrong answer, not as an error."""
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
def test_pathological_math_returns_within_deadline(name, pred, caplog):
    """Deeply nested or 100k-character math answers score 0 by the deadline; a timeout or error is logged."""
    timeout = 2.0
    caplog.set_level(logging.WARNING, logger="srpo.rewards")
    t0 = time.monotonic()
    s = score_batch([answer(pred)], ["math"], ["3"], math_timeout=timeout)[0]
    elapsed = time.monotonic() - t0
    # Slack covers dispatch and, after an earlier kill, waiting for a fresh worker to be ready.
    assert elapsed < timeout + 2.5, f"{name}: deadline {timeout}s but took {elapsed:.1f}s"
    assert s.accuracy == 0.0, f"{name}: a pathological answer must score 0"
    if s.error:
        assert s.error in ("timeout", "verifier_error"), f"{name}: unexpected error {s.error}"
        logged = [r.getMessage() for r in caplog.records if r.name == "srpo.rewards"]
        assert any(f"reward item 0 (math): {s.error}" in m for m in logged), \
            f"{name}: error {s.error} was not logged: {logged}"


def test_math_reward_uses_reference_wrapping():
    """A reference wrapped in $...$ or already boxed is understood by math_reward."""
    assert math_reward(answer("\\boxed{\\frac{1}{2}}"), "$\\frac{1}{2}$") == 1.0, \
        "a reference in $...$ must be understood"
    assert math_reward(answer("\\boxed{2}"), "\\boxed{2}") == 1.0, \
        "a reference already in \\boxed{} must be understood"


def _scores(pairs):
    """score_batch over (boxed answer, reference) pairs: their accuracies, in order."""
    scores = score_batch([answer(p) for p, _ in pairs], ["math"] * len(pairs), [r for _, r in pairs])
    return [s.accuracy for s in scores]


def test_math_equation_in_box_counts_only_as_variable_equals_value():
    """A boxed equation pays only as `variable = value`: `26 = 25`, `x = 26 = 25` (math-verify pays) get 0."""
    from math_verify import parse, verify
    false_equations = ["\\boxed{26 = 25}", "\\boxed{x = 26 = 25}", "\\boxed{5^2 = 25}",
                       "\\boxed{25 = 25}", "\\boxed{2x = 25}", "\\boxed{\\pi = 25}"]
    for pred in false_equations[:2]:  # the peer pays these: the reason for our rule
        assert verify(parse("\\boxed{25}"), parse(pred)), f"math-verify no longer pays {pred}: recheck"
    got = _scores([(p, "25") for p in false_equations])
    assert got == [0.0] * len(false_equations), \
        f"an equation that is not `variable = value` must score 0: {dict(zip(false_equations, got))}"
    ok = ["\\boxed{x = 25}", "\\boxed{x_1 = 25}", "\\boxed{\\theta = 25}", "\\boxed{x = y = 25}"]
    got = _scores([(p, "25") for p in ok] + [("\\boxed{x = 24}", "25")])
    assert got == [1.0] * len(ok) + [0.0], f"`variable = value` is read as its value: {got}"
    pairs = [("\\boxed{x = 5, y = 3}", "x=5, y=3"), ("\\boxed{x = 5, y = 3}", "(5, 3)"),
             ("\\boxed{x = 5, y = 4 = 3}", "x=5, y=3")]
    got = _scores(pairs)
    assert got == [1.0, 1.0, 0.0], f"a list of equations is read item by item: {dict(zip(pairs, got))}"


def test_math_percent_has_one_reading():
    """`%` is a unit: 25% is 25, never 0.25, and 2500% is not 25 (math-verify reads both ways)."""
    pairs = [("\\boxed{25\\%}", "25"), ("\\boxed{25\\%}", "0.25"), ("\\boxed{2500\\%}", "25"),
             ("\\boxed{25}", "25\\%"), ("\\boxed{0.25}", "25\\%"), ("\\boxed{25%}", "0.25")]
    got = _scores(pairs)
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], f"one reading of %: {dict(zip(pairs, got))}"


def test_math_box_spellings_are_read():
    """`\\boxed {25}` (a space before the brace) and `\\fbox{25}` read as 25, which math-verify rejects."""
    pairs = [("\\boxed {25}", "25"), ("\\fbox{25}", "25"), ("\\boxed  {x = 25}", "25"),
             ("\\fbox{24}", "25")]
    got = _scores(pairs)
    assert got == [1.0, 1.0, 1.0, 0.0], f"box spellings: {dict(zip(pairs, got))}"


def test_check_answer_rejects_unreadable_references():
    """rewards.check_answer (the loader's check of a math row) rejects `\\boxed{` and "", accepts answers."""
    for bad in ("\\boxed{", "", "   "):
        with pytest.raises(ValueError, match="cannot read the answer"):
            rewards.check_answer(bad)
    for good in ("25", "\\frac{1}{2}", "x=5", "$3$", "\\boxed{7}", "25\\%"):
        rewards.check_answer(good)


# -----------------------------------------------------------------------------
# The pool: crashes, deadlines, reuse

def test_worker_crash_costs_one_item(crashing_workers):
    """A worker crash zeroes only its own item, marked worker_crash; the same pool keeps scoring after it."""
    pool_before = rewards._get_pool(rewards.default_workers())  # the pool score_batch will use
    comps = [answer("\\boxed{4}")] * 4
    refs = ["4", "4", crashing_workers, "5"]
    scores = score_batch(comps, ["math"] * 4, refs)
    assert [s.accuracy for s in scores] == [1.0, 1.0, 0.0, 0.0], \
        f"a crash must only zero its own item: {scores}"
    assert scores[2].error == "worker_crash", f"crashed item must say so: {scores[2]}"
    assert all(s.error is None for i, s in enumerate(scores) if i != 2), \
        "other items must not inherit the crash"
    again = score_batch([answer("\\boxed{9}")], ["math"], ["9"])[0]
    assert again.accuracy == 1.0 and again.error is None, "the pool must keep working after a crash"
    assert rewards._pool is pool_before, "the pool must be reused, not rebuilt"


def test_stop_signals_to_the_process_group_do_not_kill_reward_workers():
    """Reward workers survive SIGTERM, SIGHUP and SIGINT, even while starting, and keep scoring.

    Past bug: a scheduler's SIGTERM (or SIGHUP) to the whole job killed the reward workers, so
    the step the trainer was finishing before its checkpoint scored its rollouts 0."""
    rewards.shutdown()
    pool = rewards._get_pool(2)  # signalled at once: a worker still starting must not die either
    for w in pool.workers:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(w.proc.pid, sig)
    time.sleep(0.5)
    assert all(w.proc.poll() is None for w in rewards._pool.workers), "a stop signal killed a worker"
    scores = score_batch([answer("\\boxed{4}")] * 2, ["math"] * 2, ["4", "4"], workers=2)
    assert [(s.accuracy, s.error) for s in scores] == [(1.0, None)] * 2, scores


def test_hanging_program_in_a_batch_only_times_out_itself():
    """A looping program times out alone: the rest of its batch scores, and the batch returns soon after."""
    comps = [fenced("while True: pass"), fenced("def f(): return 1"), answer("\\boxed{2}")]
    t0 = time.monotonic()
    scores = score_batch(comps, ["code", "code", "math"],
                         ["assert True", "assert f() == 1", "2"], code_timeout=1.5)
    elapsed = time.monotonic() - t0
    assert scores[0].error == "timeout" and scores[0].accuracy == 0.0, f"{scores[0]}"
    assert [s.accuracy for s in scores[1:]] == [1.0, 1.0], f"the rest must score: {scores}"
    assert elapsed < 1.5 + 4, f"a 1.5s deadline held the batch for {elapsed:.1f}s"


def test_pool_shutdown_and_restart():
    """shutdown() stops every worker and drops the pool, is safe twice, and a new pool starts on demand."""
    score_batch([answer("\\boxed{1}")], ["math"], ["1"])
    procs = [w.proc for w in rewards._pool.workers]
    rewards.shutdown()
    assert rewards._pool is None, "shutdown must drop the pool"
    assert all(p.poll() is not None for p in procs), "shutdown must stop every worker"
    rewards.shutdown()  # twice is fine
    assert math_reward(answer("\\boxed{1}"), "1") == 1.0, "a new pool must start on demand"


def test_inline_mode_matches_pool():
    """Scoring inline (workers=0) gives the same verdicts as scoring on the worker pool."""
    comps = [answer("\\boxed{0.5}"), answer("\\boxed{0.4}"), fenced("x = 1")]
    refs = ["\\frac12", "\\frac12", "assert x == 1"]
    domains = ["math", "math", "code"]
    inline = [s.accuracy for s in score_batch(comps, domains, refs, workers=0)]
    pooled = [s.accuracy for s in score_batch(comps, domains, refs)]
    assert inline == pooled == [1.0, 0.0, 1.0], f"inline {inline} vs pool {pooled}"


def test_language_penalty_is_optional():
    """The mixed-language penalty is off by default, hits only mixed English and Chinese, spares accuracy."""
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
# Code: extraction and code_reward

def test_extract_code():
    """extract_code takes the last closed fenced block, language named or not; else an empty program."""
    assert extract_code("```python\na = 1\n```") == "a = 1\n"
    assert extract_code("```\nb = 2\n```") == "b = 2\n", "a fence without a language counts"
    assert extract_code("```python\nold\n```\ntext\n```py\nnew\n```") == "new\n", "last block wins"
    assert extract_code("no code here") == "", "no block gives an empty program"
    assert extract_code("```python\ncut off") == "", "an unclosed block is not a program"


def test_code_reward_basic():
    """code_reward passes a right program, fails a wrong one or a syntax error; stdlib, packages import."""
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


def test_the_worked_examples_earn_their_reward():
    """The one-shot examples the prompt shows (rewards.EXAMPLES) are right by the reward itself."""
    references = {"math": "8", "code": "double(3) == 6\ndouble(-1) == -2"}
    math_q, math_a = rewards.EXAMPLES["math"]
    assert math_reward(math_a, references["math"]) == 1.0, "the math example"
    code_q, code_a = rewards.EXAMPLES["code"]
    assert rewards.parse_cases(references["code"]), "the code example is case form"
    assert code_reward(extract_code(code_a), references["code"]) == 1.0
    assert format_reward(math_a) == format_reward(code_a) == 1.0, "both follow the template"


def test_a_mixed_batch_scores_each_item_on_its_own(crashing_workers):
    """A right and a wrong answer in each domain and a worker crash, in one pool batch: each scored alone."""
    good = "<think>2+2</think> <answer>\\boxed{4}</answer>"
    prog = "<think>easy</think> <answer>```python\ndef add(a, b):\n    return a + b\n```</answer>"
    scores = score_batch([good, good, prog, prog, good], ["math", "math", "code", "code", "math"],
                         ["4", "5", "add(1, 2) == 3", "add(1, 2) == 4", crashing_workers])
    assert [s.accuracy for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0], scores
    assert scores[-1].error == "worker_crash", scores[-1]
