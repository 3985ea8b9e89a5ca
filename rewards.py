"""
Rule-based rewards for SRPO: the R1-Zero prompt template, a format reward, verified math answers
and sandboxed code tests. No reward model: a math answer is right when math-verify finds it
equivalent to the reference, a program is right when the problem's unit tests run to the end.

Rewards are where RL trainers fail silently, so three rules hold everywhere below:
  1. Nothing hangs the trainer. Every item is scored under a deadline enforced from outside the
     code doing the work (a worker process that is killed, a sandbox whose process group is killed).
  2. Nothing crashes the trainer. A verifier error, a timeout or a dead worker scores that one item
     0, sets Score.error, is counted in `error_counts` and logged; the rest of the batch goes on.
  3. Nothing lies. A program passes only if a random marker printed *after* its tests shows up at
     the end of its output; exit code 0 proves nothing (sys.exit(0) before the tests gives 0 too).

Public API (what srpo.py calls):
    format_prompt(question, domain) -> str        user message: instructions + question
    parse_response(text) -> (reasoning, answer)   split a response along the template's tags
    format_reward(text) -> float                  1.0 iff <think>...</think><answer>...</answer>
    math_reward(completion, answer) -> float      1.0 iff the final answer is equivalent
    extract_code(completion) -> str               the last fenced code block
    code_reward(program, tests) -> float          1.0 iff program + tests run to the end
    score_batch(completions, domains, references, workers=...) -> list[Score]
    shutdown()                                    stop the worker pool (also runs at exit)

Run `python rewards.py` for a small self-check.
"""
import atexit
import ctypes
import json
import logging
import math
import os
import re
import resource
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

log = logging.getLogger("srpo.rewards")

DOMAINS = ("math", "code")
MATH_TIMEOUT = 5.0     # seconds per math item, parse + verify; math-verify itself defaults to 5
CODE_TIMEOUT = 10.0    # wall-clock seconds per program run; HumanEval's slowest canonical takes ~1s
SANDBOX_UID = 65534    # "nobody": programs run as this user when we are root
SANDBOX_MEMORY = 1 << 30   # address-space limit (bytes) per sandboxed process
SANDBOX_FSIZE = 1 << 20    # largest file a program may write, its captured output included
SANDBOX_NPROC = 32         # processes+threads the sandbox user may hold (binds only non-root)

# A documented hook for tests: an item whose *reference* equals this string makes its worker
# process die on the spot, exactly as a segfault would. References come from the dataset, never
# from the policy, so a model cannot trigger it. The trainer's tests use it to check that a
# worker crash costs one item, not the run.
CRASH_FOR_TESTS = "<<srpo-rewards: crash this worker>>"

# Errors seen since import, by kind ("timeout", "verifier_error", "worker_crash", ...). The
# trainer may log these; a sudden rise means the rewards, not the policy, changed.
error_counts: Counter = Counter()


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
# (README, "The demo"). The reward
# stays as strict as ever; only the prompt shows what a well-formed answer looks like.
EXAMPLES = {
    "math": ("What is 4 + 4?",
             "<think> 4 + 4 = 8 </think> <answer> The answer is \\boxed{8}. </answer>"),
    "code": ("Write a function `double(x)` that returns twice x.",
             "<think> Multiply x by 2. </think> <answer> ```python\ndef double(x):\n    return 2 * x\n``` </answer>"),
}
EXAMPLE_REFERENCES = {"math": "8", "code": "assert double(3) == 6\nassert double(-1) == -2"}


def _check_domain(domain, what="domain"):
    if domain not in DOMAINS:
        raise ValueError(f"{what} must be one of {DOMAINS}, got {domain!r}")


def _check_str(value, what):
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")


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


_TEMPLATE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(text: str) -> float:
    """1.0 iff the response is exactly <think>...</think> <answer>...</answer>, both non-empty,
    each tag once, nothing outside them."""
    _check_str(text, "response")
    m = _TEMPLATE.fullmatch(text)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return 0.0
    # Non-greedy groups can still swallow a second tag pair; count tags to be sure.
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return 1.0 if all(text.count(t) == 1 for t in tags) else 0.0


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

def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
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


def _check_math(completion: str, reference: str, timeout: float) -> tuple[float, str | None]:
    """Runs inside a worker process (main thread), so math-verify's signal.alarm timeouts work;
    they keep the worker alive on slow items, while the pool's deadline is the hard limit."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
    pred_text = final_answer(completion)
    if not pred_text.strip():
        return 0.0, None  # no answer given: wrong, not an error
    ref = reference.strip().strip("$")
    gold_text = ref if "\\boxed" in ref else "\\boxed{" + ref + "}"
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
# Code: extraction and the sandbox

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The body of the last fenced code block (``` or ```python), or "" if there is none."""
    _check_str(completion, "completion")
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else ""


# The program runs inside this harness: `python -I -c HARNESS <config json>`, in the run folder.
# It reads the marker from stdin (so the marker is in no file and no argv), closes stdin, sets up
# the sandbox's private mounts, drops to the sandbox user, runs main.py as __main__, and prints
# the marker only if that returned.
_HARNESS = r"""
import ctypes, json, os, sys, types
def overlay(libc, hide, keep, mode):
    # Cover `hide` with an empty tmpfs, then bind each path of `keep` back at the same place.
    fds = [os.open(k, os.O_RDONLY | os.O_DIRECTORY) for k in keep]
    if libc.mount(b"tmpfs", hide.encode(), b"tmpfs", 0, f"mode={mode},size=64m".encode()):
        raise OSError(ctypes.get_errno(), "mount tmpfs on " + hide)
    for k, fd in zip(keep, fds):
        os.makedirs(k, exist_ok=True)
        if libc.mount(f"/proc/self/fd/{fd}".encode(), k.encode(), None, 4096 | 16384, None):
            raise OSError(ctypes.get_errno(), "bind " + k)  # 4096|16384 = MS_BIND|MS_REC
        os.close(fd)
def run():
    marker = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    cfg = json.loads(sys.argv[1])
    if cfg["overlays"]:
        libc = ctypes.CDLL(None, use_errno=True)
        for hide, keep, mode in cfg["overlays"]:
            overlay(libc, hide, keep, mode)
    if os.getpid() == 1:
        # We are init of a fresh PID namespace. Init ignores most signals and reaps orphans, so
        # the program runs in a child instead; when init exits the kernel kills everything left.
        child = os.fork()
        if child:
            while True:
                pid, status = os.wait()
                if pid == child:
                    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if cfg["uid"] >= 0:
        os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
    sys.path.extend(cfg["site"])
    src = open("main.py").read()
    main = types.ModuleType("__main__"); main.__file__ = os.path.abspath("main.py")
    sys.modules["__main__"] = main
    exec(compile(src, "main.py", "exec"), main.__dict__)
    for f in (sys.stdout, sys.stderr):
        try: f.flush()
        except Exception: pass
    os.write(1, ("\n" + marker + "\n").encode())
    os._exit(0)
run()
"""

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_sandbox_cache: tuple | None = None


def _die_with_parent():
    # Linux kills this process when the one that started it dies: a killed worker cannot leave
    # its sandbox (or a dead trainer its workers) running.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _hidden_ancestor(path: str) -> str | None:
    """The first folder on the way to `path` that other users cannot enter, or None."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _overlays(run_dir: str) -> list:
    """(hide, keep, mode) mounts that make the sandbox's view of the filesystem: private empty
    /tmp, /var/tmp and /dev/shm (its own folder bound back in), and, where the interpreter sits
    in a folder other users cannot enter (here /root), that folder covered too, with only the
    interpreter's own tree bound back, so the sandbox user can import the standard library."""
    mounts = {}
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)})
    for prefix in prefixes:
        hide = _hidden_ancestor(prefix)
        if hide:
            mounts.setdefault(hide, ["755", []])[1].append(prefix)
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            entry = mounts.setdefault(tmp, ["1777", []])
            entry[0] = "1777"
            # Bound back: the program's own folder, and the interpreter when it lives here (a
            # virtualenv made in /tmp), or the sandbox could not even import the standard library.
            for keep in [os.path.realpath(run_dir)] + prefixes:
                if keep.startswith(tmp + os.sep) and keep not in entry[1]:
                    entry[1].append(keep)
    # Parents before children, so that a later tmpfs does not hide an earlier one.
    return [(hide, keep, mode) for hide, (mode, keep) in sorted(mounts.items())]


def _sandbox() -> tuple:
    """The strongest sandbox this machine allows: (unshare prefix, use overlays, drop user).
    Probed once per process by running a real program through each candidate, strongest first,
    so a machine that refuses a namespace or a mount degrades loudly instead of scoring 0."""
    global _sandbox_cache
    if _sandbox_cache is None:
        root = os.geteuid() == 0
        # Without our own mount namespace the sandbox user can only run an interpreter that
        # everyone can read; otherwise the program has to keep running as root.
        reachable = all(_hidden_ancestor(p) is None for p in (sys.base_prefix, sys.prefix))
        ns = ["unshare", "--pid", "--fork", "--kill-child"]
        candidates = [(ns + ["--net", "--mount-proc"], True, root),
                      (ns + ["--net"], False, root and reachable),
                      (ns, False, root and reachable),
                      ([], False, root and reachable),
                      ([], False, False)]
        probe = "import hashlib, json, math, decimal, collections\nok = json.dumps([1])"
        for cand in candidates:
            if cand[0] and shutil.which("unshare") is None:
                continue
            _sandbox_cache = cand
            try:
                passed, _, out = run_program(probe, "assert ok == '[1]'", timeout=20)
            except OSError as e:
                passed, out = False, str(e)
            if passed:
                break
            log.info("sandbox %s failed its probe: %s", cand, out[-300:])
        prefix, overlays, drop = _sandbox_cache
        if "--net" not in prefix or not overlays or not drop:
            log.warning("weaker code sandbox on this machine: namespaces %s, private mounts %s, "
                        "separate user %s", " ".join(prefix[1:]) or "none", overlays, drop)
    return _sandbox_cache


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _kill(pid: int):
    """SIGKILL a process (pid > 0) or a process group (pid < 0); already gone is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, tests: str, timeout: float = CODE_TIMEOUT):
    """Run `program` then `tests` in a sandbox. Returns (passed, error, output): passed only if
    the per-run marker printed after the tests ends the output; error is "timeout" when the
    wall-clock deadline killed it (None for an ordinary failure); output is the last
    SANDBOX_FSIZE bytes at most."""
    _check_str(program, "program")
    _check_str(tests, "tests")
    prefix, overlays, drop = _sandbox()
    marker = "SRPO-TESTS-PASSED-" + secrets.token_hex(16)
    run_dir = tempfile.mkdtemp(prefix="srpo-sandbox-")
    try:
        main_py = os.path.join(run_dir, "main.py")
        with open(main_py, "w") as f:
            f.write(program + "\n\n" + tests + "\n")
        if drop:  # the sandbox user owns its folder and nothing else
            os.chown(run_dir, SANDBOX_UID, SANDBOX_UID)
            os.chown(main_py, SANDBOX_UID, SANDBOX_UID)
        cpu = math.ceil(timeout) + 1

        def limits():  # runs in the child between fork and exec
            _die_with_parent()
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_AS, (SANDBOX_MEMORY, SANDBOX_MEMORY))
            resource.setrlimit(resource.RLIMIT_FSIZE, (SANDBOX_FSIZE, SANDBOX_FSIZE))
            resource.setrlimit(resource.RLIMIT_NPROC, (SANDBOX_NPROC, SANDBOX_NPROC))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        # A scrubbed environment: nothing of the trainer's (tokens, paths) reaches the program.
        private_tmp = "/tmp" if overlays else run_dir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": private_tmp,
               "TMPDIR": private_tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        # -S skips the site module: its .pth hooks cost ~60ms a run in a big environment. The
        # site-packages folders go on sys.path directly, so installed packages still import.
        cfg = {"uid": SANDBOX_UID if drop else -1, "site": site.getsitepackages(),
               "overlays": _overlays(run_dir) if overlays else []}
        cmd = [*prefix, sys.executable, "-I", "-S", "-c", _HARNESS, json.dumps(cfg)]
        # Output goes to a file: RLIMIT_FSIZE caps it, so a program printing gigabytes dies of
        # SIGXFSZ instead of filling our memory or a pipe.
        with open(os.path.join(run_dir, "out.txt"), "w+b") as out:
            error = None
            # start_new_session: the sandbox is its own process group, so one killpg reaches all
            # of it (and with unshare, killing unshare tears down the whole PID namespace).
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.PIPE, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=limits,
                                    start_new_session=True, close_fds=True)
            try:
                proc.stdin.write((marker + "\n").encode())
                proc.stdin.close()
            except OSError:
                pass  # it died before reading: no marker will appear, which is the verdict
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                error = "timeout"
                if prefix:
                    # Kill unshare's child (the namespace's init) first and let unshare reap it:
                    # killing both at once orphans the init, and a container's PID 1 may never
                    # reap the zombie.
                    for pid in _children(proc.pid):
                        _kill(pid)
                    try:
                        proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
            _kill(-proc.pid)  # the whole process group: also sweeps up children of a normal exit
            proc.wait()
            out.seek(0, os.SEEK_END)
            out.seek(max(0, out.tell() - SANDBOX_FSIZE))
            output = out.read().decode("utf-8", "replace")
        passed = error is None and output.rstrip("\n").endswith("\n" + marker)
        return passed, error, output.replace(marker, "<marker>")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def code_reward(program: str, tests: str, timeout: float = CODE_TIMEOUT) -> float:
    """1.0 iff `program` followed by `tests` (asserts, or a check(...) call) runs to the end."""
    passed, error, _ = run_program(program, tests, timeout)
    if error:
        error_counts[error] += 1
        log.warning("code_reward: %s after %.1fs, scored 0", error, timeout)
    return 1.0 if passed else 0.0


def _check_code(completion: str, tests: str, timeout: float) -> tuple[float, str | None]:
    program = extract_code(completion)
    if not program.strip():
        return 0.0, None  # no code block: wrong, not an error
    passed, error, _ = run_program(program, tests, timeout)
    return (1.0 if passed else 0.0), error


def _score_item(domain, completion, reference, timeout) -> tuple[float, str | None]:
    """One item's accuracy. Runs in a worker (or inline with workers=0)."""
    if reference == CRASH_FOR_TESTS:
        os._exit(70)  # the documented test hook: die like a segfault would
    if domain == "math":
        return _check_math(completion, reference, timeout)
    return _check_code(completion, reference, timeout)


# -----------------------------------------------------------------------------
# The worker pool: N processes, one item each at a time, each under a deadline

def _worker_loop(fd: int):
    """Entry point of a worker process: import the verifier once, then score items until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    _die_with_parent()
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
    without a __main__ guard would start training again in every worker)."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import rewards; " \
               f"rewards._worker_loop({theirs.fileno()})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL)
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

def score_batch(completions: list[str], domains: list[str], references: list[str],
                workers: int | None = None, math_timeout: float = MATH_TIMEOUT,
                code_timeout: float = CODE_TIMEOUT, language_penalty: float = 0.0) -> list[Score]:
    """Score a whole step's rollouts at once, in parallel over `workers` processes (default: one
    per core; 0 scores inline in this process, for debugging, with no hard deadline on math).
    references[i] is the answer (math) or the test code (code). language_penalty > 0 subtracts
    that much from the reward of mixed-language responses (the report's penalty; off by default)."""
    if not (len(completions) == len(domains) == len(references)):
        raise ValueError(f"completions, domains and references must have the same length, got "
                         f"{len(completions)}, {len(domains)}, {len(references)}")
    for i, (c, d, r) in enumerate(zip(completions, domains, references)):
        _check_str(c, f"completions[{i}]")
        _check_domain(d, f"domains[{i}]")
        _check_str(r, f"references[{i}]")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if not completions:
        return []

    timeouts = [math_timeout if d == "math" else code_timeout for d in domains]
    tasks = [(d, c, r, t) for c, d, r, t in zip(completions, domains, references, timeouts)]
    if workers == 0:
        results = [_score_item(*t) for t in tasks]
    else:
        # The pool's deadline for code adds slack for the sandbox's own start-up and clean-up:
        # the sandbox enforces the program's deadline itself and reports "timeout".
        hard = [t if d == "math" else t + 5.0 for d, t in zip(domains, timeouts)]
        results = _get_pool(workers).map(tasks, hard)

    scores = []
    for i, (c, (acc, err)) in enumerate(zip(completions, results)):
        if err:
            error_counts[err] += 1
            log.warning("reward item %d (%s): %s, scored 0", i, domains[i], err)
        mixed = is_mixed_language(c)
        reward = acc - (language_penalty if mixed else 0.0)
        scores.append(Score(accuracy=acc, format=format_reward(c), reward=reward,
                            mixed_language=mixed, error=err))
    return scores


def math_reward(completion: str, answer: str, timeout: float = MATH_TIMEOUT) -> float:
    """1.0 iff the final answer of `completion` is equivalent to `answer`. Runs in the worker pool,
    so the deadline holds even when the verifier hangs."""
    return score_batch([completion], ["math"], [answer], math_timeout=timeout)[0].accuracy


if __name__ == "__main__":
    # Self-check: a right and a wrong answer in each domain, plus a worker crash.
    logging.basicConfig(level=logging.INFO)
    good = "<think>2+2</think> <answer>\\boxed{4}</answer>"
    prog = "<think>easy</think> <answer>```python\ndef add(a, b):\n    return a + b\n```</answer>"
    t0 = time.time()
    scores = score_batch([good, good, prog, prog, good], ["math", "math", "code", "code", "math"],
                         ["4", "5", "assert add(1, 2) == 3", "assert add(1, 2) == 4",
                          CRASH_FOR_TESTS])
    for s in scores:
        print(s)
    assert [s.accuracy for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert scores[-1].error == "worker_crash"
    print(f"ok in {time.time() - t0:.1f}s; code sandbox (unshare flags, private mounts, "
          f"separate user): {_sandbox()}")
