"""
Rule-based rewards for SRPO: the R1-Zero prompt template, a format reward, verified math answers
and sandboxed code tests. No reward model: a math answer is right when math-verify finds it
equivalent to the reference, a program is right when it passes the problem's unit tests.

Rewards are where RL trainers fail silently, and the policy is an adversary that searches for any
way to be paid, so four rules hold everywhere below:
  1. Nothing hangs the trainer. Every item is scored under a deadline enforced from outside the
     code doing the work (a worker process that is killed, a sandbox whose processes are killed).
  2. Nothing crashes the trainer. A verifier error, a timeout or a dead worker scores that one item
     0, sets Score.error (the trainer counts them) and is logged; the rest of the batch goes on.
  3. Nothing lies. A verdict rests on nothing the program can reach: in the case form of the tests
     (`CALL == LITERAL` per line) the expected values never enter the sandbox, and the program's
     results are compared with them out here; exit code 0 proves nothing.
  4. Nothing runs with less protection than asked for. The code sandbox runs in the mode the
     caller names ("full" unless told otherwise) or not at all: SandboxUnavailable, never a
     silent fallback to something weaker.

Public API (what srpo.py calls):
    format_prompt(question, domain) -> str        user message: instructions + question
    parse_response(text) -> (reasoning, answer)   split a response along the template's tags
    format_reward(text) -> float                  1.0 iff <think>...</think><answer>...</answer>
    extract_code(completion) -> str               the last fenced code block
    score_batch(completions, domains, references, workers=..., sandbox=None) -> list[Score]
    default_workers() -> int                      reward workers per rank: its CPUs / ranks on the node
    shutdown()                                    stop the worker pool (also runs at exit)
From sandbox.py, which runs the programs (re-exported here, so callers need only this module):
    parse_cases(tests) -> list | None             the cases of case-form tests (None: assert form)
    check_tests(tests)                            ValueError naming the line if tests are unusable
    run_program(program, tests, timeout, sandbox=None) -> (passed, error, output)
    check_mode(mode) -> str                       ValueError unless `mode` is one of SANDBOX_MODES
    check_sandbox(mode=None) -> str               check that a sandbox mode works here, or raise
    describe_sandbox(mode=None) -> str            the checked mode, what a program gets in it here and why
    SandboxUnavailable, SANDBOX_MODES, SANDBOX_ENV
"""
import atexit
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

# The sandbox's public names, re-exported (rewards.run_program, rewards.check_sandbox, ...), and two
# helpers shared with it: the str check of inputs, and the parent-death signal the workers use too.
from sandbox import (CODE_TIMEOUT, SANDBOX_ENV, SANDBOX_MODES, SandboxUnavailable,  # noqa: F401
                     _check_str, _die_with_parent, check_mode, check_sandbox, check_tests,
                     describe_sandbox, parse_cases, run_deadline, run_program)

log = logging.getLogger("srpo.rewards")

DOMAINS = ("math", "code")
MATH_TIMEOUT = 5.0     # seconds per math item, parse + verify; math-verify itself defaults to 5
# CODE_TIMEOUT, the wall-clock seconds per program run, and the sandbox's modes and limits are
# sandbox.py's.


@dataclass
class Score:
    accuracy: float               # 1.0 when the answer is right, else 0.0: SRPO's reward
    format: float                 # 1.0 when the response follows the template, else 0.0
    reward: float                 # R_i for the advantage: accuracy, less any language penalty
    mixed_language: bool = False  # the response mixes scripts (e.g. English and Chinese)
    error: str | None = None      # why accuracy is 0 for reasons other than a wrong answer


# -----------------------------------------------------------------------------
# The template: prompts, parsing, format reward

_INSTRUCTIONS = {
    "math": ("Solve the problem below. Think it through step by step inside <think> </think> "
             "tags, then write the final answer inside <answer> </answer> tags, with the final "
             "result in \\boxed{}. For example: <think> reasoning here </think> "
             "<answer> The answer is \\boxed{42}. </answer>"),
    "code": ("Solve the programming problem below in Python. Think it through step by step inside "
             "<think> </think> tags, then write the answer inside <answer> </answer> tags: one "
             "complete program in a ```python fenced code block, including the imports it needs. "
             "For example: <think> reasoning here </think> <answer> ```python\n"
             "def f(x):\n    return x\n``` </answer>"),
}


# One worked example per domain, which the trainer shows as an earlier chat turn (srpo.py
# --one_shot). Small instruct models do not pick up the <think>/<answer> template from
# instructions alone: SmolLM2-135M earned a reward on 2 of 96 samples (levels 1-3, temperature
# 0.7) with the bare instructions, and on 25 of 48 level-1 samples with this example in front
# (README, "The demo"). The reward stays as strict; only the prompt shows a well-formed answer.
EXAMPLES = {
    "math": ("What is 4 + 4?",
             "<think> 4 + 4 = 8 </think> <answer> The answer is \\boxed{8}. </answer>"),
    "code": ("Write a function `double(x)` that returns twice x.",
             "<think> Multiply x by 2. </think> <answer> ```python\ndef double(x):\n"
             "    return 2 * x\n``` </answer>"),
}


def _check_domain(domain, what="domain"):
    if domain not in DOMAINS:
        raise ValueError(f"{what} must be one of {DOMAINS}, got {domain!r}")




def format_prompt(question: str, domain: str) -> str:
    """The user message: instructions, then the question. The trainer applies the chat template."""
    _check_str(question, "question")
    _check_domain(domain)
    return f"{_INSTRUCTIONS[domain]}\n\n{'Problem' if domain == 'math' else 'Task'}:\n{question}"


def parse_response(text: str) -> tuple[str, str]:
    """Split a response into (reasoning, answer). Lenient, because accuracy should not depend on
    perfect tags (the format reward judges those): reasoning is what precedes </think> (a leading
    <think> removed), answer is the last <answer> block, or what follows </think> when there is
    none. A response with no tags at all is all reasoning and no answer."""
    _check_str(text, "response")
    head, sep, tail = text.rpartition("</think>")
    reasoning = head if sep else text
    reasoning = reasoning.split("<think>", 1)[-1].strip()
    rest = tail if sep else text
    start = rest.rfind("<answer>")
    if start >= 0:
        # An unclosed <answer> is a response cut off at max length; its answer may still be whole.
        answer = rest[start + len("<answer>"):].split("</answer>", 1)[0]
    else:
        answer = rest if sep else ""
    return reasoning, answer.strip()


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(text: str) -> float:
    r"""1.0 iff the response is exactly <think>...</think> <answer>...</answer>, both non-empty,
    each tag once, nothing outside them but whitespace. Linear time: a few passes of str methods
    over the text. (The regex r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*" says the
    same but backtracks quadratically: 44 s on a 500k-character response, in the trainer, with no
    deadline; tests/test_rewards.py keeps it as the reference this must agree with.)"""
    _check_str(text, "response")
    if any(text.count(t) != 1 for t in _TAGS):
        return 0.0
    body = text.strip()  # the regex's outer \s*: str.strip and re's \s agree on what is space
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return 0.0
    think_end, answer_start = body.find("</think>"), body.find("<answer>")
    thought = body[len("<think>"):think_end]
    between = body[think_end + len("</think>"):answer_start]
    answer = body[answer_start + len("<answer>"):-len("</answer>")]
    # Each tag occurs once, so `between` is negative-length (tags out of order) exactly when
    # answer_start < think_end; slicing then gives "" for it, hence the explicit order check.
    ok = think_end < answer_start and not between.strip() and thought.strip() and answer.strip()
    return 1.0 if ok else 0.0


def is_mixed_language(text: str, min_share: float = 0.05, min_letters: int = 20) -> bool:
    """True when the letters of `text` come from two or more scripts, each with at least
    `min_share` of them (and `min_letters`). A heuristic for the report's language-mixing penalty:
    Greek is ignored (math symbols), Chinese/Japanese kana count as one script."""
    scripts = Counter()
    for ch in text:
        if ch.isalpha():
            script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
            if script in ("HIRAGANA", "KATAKANA"):
                script = "CJK"
            if script != "GREEK":
                scripts[script] += 1
    total = sum(scripts.values())
    big = [n for n in scripts.values() if n >= min_letters and n >= min_share * total]
    return len(big) >= 2


# -----------------------------------------------------------------------------
# Math: the final answer and the equivalence check (math-verify)

# `\boxed{x}`, `\boxed {x}` (TeX skips the space) and `\fbox{x}` (the same box in plain TeX).
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced, or None."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: cut off mid-answer


def final_answer(completion: str) -> str:
    """What gets verified: the last \\boxed{} of the answer part, else the answer part itself.
    With no answer part (no tags), the last \\boxed{} anywhere still counts, so a policy that has
    not learned the tags yet still gets an accuracy signal; bare reasoning text never does."""
    _, answer = parse_response(completion)
    box = last_boxed(answer if answer else completion)
    if box is not None:
        return "\\boxed{" + box + "}"
    return answer


# A variable on the left of `=` in a box: x, y_1, x_{n}, x', \theta, \text{area}.
_VARIABLE = re.compile(r"(?:[A-Za-z]\w*|\\(?!pi\b|infty\b)[A-Za-z]+|\\(?:text|mathrm)\{[A-Za-z ]+\})"
                       r"(?:_\w|_\{\w+\})?'*")


def _split_top(text: str, sep: str) -> list[str]:
    """`text` cut at each `sep` outside braces, parentheses and brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "(": 1, "[": 1, "}": -1, ")": -1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _box_value(box: str) -> str | None:
    """The value a box states. An equation counts only as `variable = value` (a chain
    `x = y = value` too): its right side is the answer. Any other equation (`26 = 25`,
    `x = 26 = 25`, `5^2 = 25`, `2x = 25`) states no value and gives None, where math-verify would
    verify its last side and pay for a false equation. A list is read item by item
    (`x = 5, y = 3` states `5, 3`); a box without a top-level `=` is itself."""
    values = []
    for item in _split_top(box, ","):
        sides = _split_top(item, "=")
        if not all(_VARIABLE.fullmatch(side.strip()) for side in sides[:-1]):
            return None
        values.append(sides[-1])
    return ",".join(values)


def _verified_text(text: str) -> str | None:
    """The text math-verify reads for an answer (the policy's or the reference): a box reduced to
    the value it states, None when it states none. The percent sign is read as a unit and
    dropped (`25\\%` is 25, never 0.25): math-verify reads it both ways, so `25\\%` matched 25 and
    0.25 and `2500\\%` matched 25; one reading, stated in the README, keeps each answer to one value."""
    text = re.sub(r"\\?%", "", text)
    box = last_boxed(text)
    if box is None:
        return text
    value = _box_value(box)
    return None if value is None else "\\boxed{" + value + "}"


def _gold_text(reference: str) -> str:
    """A reference answer as math-verify reads it: boxed (it may come boxed, or in $...$)."""
    ref = reference.strip().strip("$")
    boxed = ref if last_boxed(ref) is not None else "\\boxed{" + ref + "}"
    return _verified_text(boxed) or boxed  # a reference's equation is trusted as it stands


def check_answer(reference: str) -> None:
    """Raise ValueError unless math-verify can read the reference answer: a loader's check of a
    math row (an unreadable answer would score every rollout 0, as "bad_reference")."""
    from math_verify import parse
    try:
        gold = parse(_gold_text(reference), parsing_timeout=5, raise_on_error=True)
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, the answer is unusable
        raise ValueError(f"math-verify cannot read the answer {reference[:80]!r} ({e})") from None
    if not gold:
        raise ValueError(f"math-verify cannot read the answer {reference[:80]!r}")


def _check_math(completion: str, reference: str, timeout: float) -> tuple[float, str | None]:
    """Runs inside a worker process (main thread), so math-verify's signal.alarm timeouts work;
    they keep the worker alive on slow items, while the pool's deadline is the hard limit."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
    pred_text = _verified_text(final_answer(completion))
    if pred_text is None or not pred_text.strip():
        return 0.0, None  # no answer given, or a box that states no value: wrong, not an error
    gold_text = _gold_text(reference)
    inner = max(1, int(timeout / 3))  # alarm() takes whole seconds
    try:
        gold = parse(gold_text, parsing_timeout=inner, raise_on_error=True)
        pred = parse(pred_text, parsing_timeout=inner, raise_on_error=True)
    except TimeoutException:
        return 0.0, "timeout"
    except Exception:
        return 0.0, "verifier_error"
    if not gold:
        return 0.0, "bad_reference"  # a data problem, not the policy's: make it loud
    # Compare every (gold, pred) reading ourselves rather than in one verify() call, so that one
    # reading that throws is recorded and does not hide another that matches.
    err = None
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=inner, raise_on_error=True):
                    return 1.0, None
            except TimeoutException:
                err = "timeout"
            except Exception:
                err = err or "verifier_error"
    return 0.0, err


# -----------------------------------------------------------------------------
# Code: extraction (the tests' two forms, their verdict and the sandbox are in sandbox.py)

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The body of the last fenced code block (``` or ```python), or "" if there is none."""
    _check_str(completion, "completion")
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else ""


# -----------------------------------------------------------------------------
# Scoring one code item (in a worker process, or inline)

def _check_code(completion: str, tests: str | list, timeout: float,
                sandbox: str | None) -> tuple[float, str | None]:
    program = extract_code(completion)
    if not program.strip():
        return 0.0, None  # no code block: wrong, not an error
    try:
        passed, error, _ = run_program(program, tests, timeout, sandbox)
    except ValueError:
        return 0.0, "bad_reference"  # malformed tests: a data problem, not the policy's
    except SandboxUnavailable:
        return 0.0, "sandbox_unavailable"  # this worker could not build it: 0, never weaker
    return (1.0 if passed else 0.0), error


def _score_item(domain, completion, reference, timeout, sandbox=None) -> tuple[float, str | None]:
    """One item's accuracy. Runs in a worker (or inline with workers=0)."""
    if domain == "math":
        return _check_math(completion, reference, timeout)
    return _check_code(completion, reference, timeout, sandbox)


# -----------------------------------------------------------------------------
# The worker pool: N processes, one item each at a time, each under a deadline

# Stop signals are the trainer's to handle: Ctrl-C, or a scheduler's SIGTERM/SIGHUP sent to the
# whole process group, must not kill the items of the step the trainer is finishing. A worker starts
# with them blocked (a blocked signal stays pending, across exec too) and ignores them in its first
# lines, which discards any that came meanwhile: immune from its first instruction. It still ends
# with the trainer (parent-death signal) or when its socket closes.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_workers() -> int:
    """Reward workers for this rank when none are asked for: the CPUs this process may run on
    (its affinity: a Slurm allocation, a taskset) shared with the other ranks of its node
    (torchrun's LOCAL_WORLD_SIZE), at least 1. os.cpu_count() per rank would start 1,600 workers
    on a 200-core node with 8 ranks."""
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if not ranks.isdigit() or int(ranks) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a whole number >= 1, got {ranks!r}")
    return max(1, len(os.sched_getaffinity(0)) // int(ranks))


def _worker_loop(fd: int, parent: int):
    """Entry point of a worker process: import the verifier once, then score items until EOF."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent(parent)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs whole 100k inputs
    import math_verify  # noqa: F401  (sympy takes ~1s to import: pay it before "ready")
    conn = Connection(fd)
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone or closed the pool
        conn.send(_score_item(*task))


class _Worker:
    """A worker process and our end of its socket. Started with subprocess, not multiprocessing,
    so the trainer's script is never re-imported in the child (spawn does that, and a script
    without a __main__ guard would start training again in every worker). No preexec_fn: Python
    code between fork and exec is unsafe in the trainer, which has threads (CUDA's, NCCL's), so
    whatever a worker sets up, it does in its first lines (_worker_loop)."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import rewards; " \
               f"rewards._worker_loop({theirs.fileno()}, {os.getpid()})"
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # this thread's, inherited
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        self.started = time.monotonic()
        self.task = None  # (index, deadline) of the item it is scoring

    def kill(self):
        self.conn.close()
        self.proc.kill()
        self.proc.wait()


class RewardPool:
    """Keeps `n` workers alive across calls: starting one costs a Python start-up and a sympy
    import (about 1-2s), far too much to pay every step."""

    def __init__(self, n: int):
        self.n = n
        self.workers = [_Worker() for _ in range(n)]

    def map(self, tasks: list[tuple], timeouts: list[float]) -> list[tuple[float, str | None]]:
        try:
            return self._map(tasks, timeouts)
        except BaseException:
            # Interrupted (Ctrl-C) or failed: busy workers would deliver stale results into the
            # next call, so replace them before letting the exception through.
            for w in list(self.workers):
                if w.task or not w.ready:
                    self._replace(w)
            raise

    def _map(self, tasks, timeouts):
        results = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        while todo or any(w.task for w in self.workers):
            now = time.monotonic()
            for w in self.workers:  # hand out work to idle, ready workers
                if w.ready and w.task is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send(tasks[i])
                        w.task = (i, now + timeouts[i])
                    except OSError:  # it died while idle: the item was never tried, retry it
                        todo.appendleft(i)
                        self._replace(w)
            deadlines = [w.task[1] for w in self.workers if w.task]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            for conn in wait([w.conn for w in self.workers], timeout=wait_s):
                w = next(w for w in self.workers if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if w.task is None and not w.ready and w.proc.poll() is not None:
                        raise RuntimeError(f"reward worker failed to start (exit code "
                                           f"{w.proc.returncode}); see its stderr above")
                    if w.task:
                        results[w.task[0]] = (0.0, "worker_crash")
                    self._replace(w)
                    continue
                if msg == "ready":
                    w.ready = True
                else:
                    results[w.task[0]] = msg
                    w.task = None
            now = time.monotonic()
            for w in self.workers:  # the hard deadline: kill the worker, not just the item
                if w.task and now > w.task[1]:
                    results[w.task[0]] = (0.0, "timeout")
                    self._replace(w)
                elif not w.ready and now - w.started > 120:
                    raise RuntimeError("reward worker did not start within 120s")
        return results

    def _replace(self, w: "_Worker"):
        w.kill()
        self.workers[self.workers.index(w)] = _Worker()

    def close(self):
        for w in self.workers:
            w.kill()
        self.workers = []


_pool: RewardPool | None = None


def _get_pool(workers: int) -> RewardPool:
    global _pool
    if _pool is None or _pool.n != workers:
        shutdown()
        _pool = RewardPool(workers)
    return _pool


def shutdown():
    """Stop the worker pool. Safe to call twice; the next score_batch starts a new one."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


atexit.register(shutdown)


# -----------------------------------------------------------------------------
# Batch scoring: what the trainer calls once per step

def score_batch(completions: list[str], domains: list[str], references: list[str | list],
                workers: int | None = None, math_timeout: float = MATH_TIMEOUT,
                code_timeout: float = CODE_TIMEOUT, language_penalty: float = 0.0,
                sandbox: str | None = None) -> list[Score]:
    """Score a whole step's rollouts at once, in parallel over `workers` processes (default:
    default_workers(), this rank's share of the CPUs; 0 scores inline in this process, for
    debugging, with no hard deadline on math).
    references[i] is the answer (math) or the tests (code: a str, or a list of {"input", "output"}
    for the stdin/stdout form). language_penalty > 0 subtracts that much from the reward of
    mixed-language responses (the report's penalty; off by default).
    `sandbox` is the code sandbox's mode (see check_sandbox); when the batch holds code, it is
    checked here first, and SandboxUnavailable stops the caller rather than scoring the batch."""
    if not (len(completions) == len(domains) == len(references)):
        raise ValueError(f"completions, domains and references must have the same length, got "
                         f"{len(completions)}, {len(domains)}, {len(references)}")
    for i, (c, d, r) in enumerate(zip(completions, domains, references)):
        _check_str(c, f"completions[{i}]")
        _check_domain(d, f"domains[{i}]")
        if not (d == "code" and isinstance(r, list)):  # a list: the stdin/stdout form of tests
            _check_str(r, f"references[{i}]")
    if sandbox is not None:
        check_mode(sandbox)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if not completions:
        return []

    if "code" in domains:
        sandbox = check_sandbox(sandbox)  # decided here, once; the workers use exactly this mode
    timeouts = [math_timeout if d == "math" else code_timeout for d in domains]
    tasks = [(d, c, r, t, sandbox)
             for c, d, r, t in zip(completions, domains, references, timeouts)]
    if workers == 0:
        results = [_score_item(*t) for t in tasks]
    else:
        # The pool's deadline for code adds slack for the sandbox's own start-up and clean-up:
        # the sandbox enforces the program's deadline itself and reports "timeout". The
        # stdin/stdout form runs the program once per case, each case under the deadline.
        hard = [t if d == "math" else run_deadline(r, t) + 5.0
                for d, t, r in zip(domains, timeouts, references)]
        results = _get_pool(workers).map(tasks, hard)

    scores = []
    for i, (c, (acc, err)) in enumerate(zip(completions, results)):
        if err:
            log.warning("reward item %d (%s): %s, scored 0", i, domains[i], err)
        mixed = is_mixed_language(c)
        reward = acc - (language_penalty if mixed else 0.0)
        scores.append(Score(accuracy=acc, format=format_reward(c), reward=reward,
                            mixed_language=mixed, error=err))
    return scores

