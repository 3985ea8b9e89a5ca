"""
The code sandbox: runs a generated program against its unit tests and says whether it passed, with
the program unable to touch the trainer, the host or the verdict. rewards.py calls run_program
(through its worker pool); everything here is the sandbox's, so it can be read and tested on its own.

What it protects. The program is untrusted: the policy writes it and is paid when it passes, so it
will find any way to be paid or to do harm. Three things are kept from it. The verdict: in no form
of the tests is it computed in the program's process. The tests (trusted: they come from the data)
run in a tester, a process of their own; the program's functions are proxies there, and each call
crosses a pipe as plain data (its name and arguments in, its result, the arguments' new values or
its exception out), so comparisons, loops and the tests' helpers run on plain values the program
cannot make lie; in the stdin/stdout form each run's output crosses it, and the expected output
never enters the sandbox. The host: in the "full" and "namespaces" modes each run gets fresh PID,
network, mount and IPC namespaces, a private root (a size-capped tmpfs for everything it may write,
the system folders and the Python installation bound read-only, no home folders, repository or
data), a uid of its own, a scrubbed environment, rlimits and a seccomp filter that denies new
namespaces, mounts, ptrace, bpf, the keyring, perf events, userfaultfd, io_uring, kernel modules,
kexec, reboot, personality and more (_DENIED_SYSCALLS); "full" adds a memory and a pids cgroup
that cap the whole program, every child included. A user who is not root gets the same namespaces,
root and filter inside a user namespace, the program running as their own uid with no
capabilities (describe_sandbox says which here). The trainer: a wall-clock deadline kills the whole
run, nothing it writes reaches the host's disk, and what a killed run leaves behind (cgroups, run
folders) is removed at the next start-up.

How. A run starts the harness (_HARNESS_SOURCE, below) under `unshare` and the tester (_TESTER);
the harness builds the sandbox from the inside as init of its PID namespace, drops to the run's
uid, installs the filter, runs the program and answers the tester's calls. check_sandbox proves a
mode works here by running a real program through it, and raises SandboxUnavailable when it
cannot: code never runs with fewer protections than the mode named, and nothing falls back to a
weaker one.

What it does not protect. A kernel bug in a system call the filter allows is a way out; the
program can read everything in its view (the system folders, installed packages' data); CPU is
not shared out. Tests that call a helper the program defines (HumanEval/32's `poly`) trust that
helper's answers. "rlimits" mode isolates nothing (no namespaces, no filter): trusted code only.
Run code from untrusted users in a VM as well. The README's sandbox section is the full account.

Public API (rewards.py re-exports most of it):
    parse_cases(tests) -> list | None             the cases of case-form tests (None: assert form)
    check_tests(tests)                            ValueError naming the line if tests are unusable
    run_program(program, tests, timeout, sandbox=None) -> (passed, error, output)
    run_deadline(tests, timeout) -> float          a run's wall-clock deadline (per case in the stdin form)
    check_mode(mode) -> str                       ValueError unless `mode` is one of SANDBOX_MODES
    check_sandbox(mode=None) -> str               check that a sandbox mode works here, or raise
    describe_sandbox(mode=None) -> str            the checked mode, what a program gets in it here and why
    SandboxUnavailable, TestsUnsupported, SANDBOX_MODES, SANDBOX_ENV
"""
import ast
import builtins
import errno
import functools
import inspect
import itertools
import json
import linecache
import logging
import marshal
import math
import os
import re
import resource
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
import time
import traceback

log = logging.getLogger("srpo.sandbox")

CODE_TIMEOUT = 10.0    # wall-clock seconds per program run; HumanEval's slowest canonical takes ~1s

# The code sandbox (see "The code sandbox" below and the README). Modes, strongest first:
#   full        namespaces + private read-only root + own user + a cgroup capping the whole program
#   namespaces  the same without the cgroup: memory capped per process, processes by an rlimit
#   rlimits     no isolation at all: the real filesystem and network, rlimits and a process group
# The two namespace modes are built as root, or, for a user who is not root, inside a user
# namespace of their own ("rootless", as bubblewrap does): the same namespaces and private root,
# the program running as the user's own uid with no capabilities (see _run).
SANDBOX_MODES = ("full", "namespaces", "rlimits")
SANDBOX_ENV = "SRPO_SANDBOX"       # the mode when the caller names none; "full" when unset
SANDBOX_MEMORY = 1 << 30           # bytes: the whole program (cgroup); each process's address space
SANDBOX_FSIZE = 1 << 20            # largest file a program may write, its captured output included
SANDBOX_TMPFS = 64 << 20           # bytes of the program's private filesystem (/tmp, its home)
SANDBOX_NPROC = 32                 # processes+threads of the program under a pids cgroup ("full")
SANDBOX_NPROC_NO_CGROUP = 4        # the same without one: x SANDBOX_MEMORY bounds the total memory
_NO_CGROUP = (f"memory is capped per process only ({SANDBOX_MEMORY >> 30} GiB x "
              f"{SANDBOX_NPROC_NO_CGROUP} processes and threads)")
# What each mode gives up against the one above it: what the start-up error offers.
_GIVES_UP = {"namespaces": f"the cgroup ({_NO_CGROUP})",
             "rlimits": "all isolation (the real filesystem and network): for trusted code only"}
# Each run gets its own unprivileged uid (and gid): this base plus the host pid of the run's first
# process, which is unique among live processes. Far above login users (1000+), the usual
# subordinate-uid ranges of rootless containers (100000+) and systemd's dynamic users; below 2^31.
SANDBOX_UID_BASE = 2_000_000_000


def _check_str(value, what):
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")


def check_mode(mode: str) -> str:
    """`mode`, unless it names no sandbox mode: then ValueError. Whether it runs here is check_sandbox's."""
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {mode!r}")
    return mode


# -----------------------------------------------------------------------------
# The tests: their two forms, and the verdict

# `tests` comes in one of two forms. Both run in the *tester*, a trusted process of their own
# (below), never in the program's: the program's functions are there only as proxies, and what
# comes back through them is plain data.
#
# Case form (the project's own data, and what to train on): one case per line, `CALL == LITERAL`,
#     fizzbuzz(3) == ['1', 'Zap', '3']
#     is_divisible(0) == True
# The tester evaluates each CALL (its calls to the program's functions go through the proxies)
# and compares the result with the expected literal, which never leaves it.
#
# Assert form (HumanEval's `check(candidate)`, hand-written asserts): Python statements, run in the
# tester on plain values; they pass when they run to the end. Tests that hand the program
# something that is not data (a lambda, a class) or use its other objects (a class, a module)
# cannot run this way: run_program raises TestsUnsupported, and the row is a data error.
#
# Comparison of a case (decided here, documented in the README): the result must have exactly the
# expected types, all the way down (True is not 1, 3.0 is not 3, a tuple is not a list); floats
# compare within FLOAT_RTOL relative (FLOAT_ATOL absolute near 0), so -0.0 equals 0.0 and inf
# equals inf; NaN equals nothing (and no literal can expect it); set elements and dict keys must
# be equal exactly. Expected values are Python literals (what ast.literal_eval reads). The assert
# form compares as Python does, on the plain values.

FLOAT_RTOL = 1e-9
FLOAT_ATOL = 1e-12
TESTS_MAX_CHARS = 8 << 20  # a row's tests; real sets carry hundreds of cases, not megabytes
# The largest message the program may send the tester: far above any value a test expects (a
# value's tag is at most ~12 characters per character of its literal), and separate from the
# program's captured output, which SANDBOX_FSIZE caps.
REPLY_MIN_BYTES = 16 << 20
REPLY_BYTES_PER_TESTS_CHAR = 16
STDIO_RTOL = 1e-6  # stdin/stdout form: tokens that both read as numbers match within this, relative


class TestsUnsupported(ValueError):
    """Tests that cannot run with the program behind proxies: they hand it something that is not
    plain data, or use one of its objects that is not a function or plain data. A data error:
    such a row is skipped, never scored another way."""


class ProgramError(Exception):
    """In the tester: an exception the program raised whose type is not a builtin one."""


def _tag(value, depth=0):
    """`value` as a tree of tuples that names each type: ("int", "0x2a"), ("list", ...items),
    ("dict", (key, value)...). Plain data only, exact types: anything else (a subclass, an object
    with its own __eq__) raises TypeError. Equal tags mean equal values of the same types, in set
    elements and dict keys too. Ints travel as hex and floats as float.hex(): exact, with no
    4300-digit limit, inf and nan included; bytes as hex, so a tag is JSON. Its source is copied
    into the sandbox's harness, so both sides of the channel tag with the same code."""
    if depth > 100:  # deeper is not data a test expects; the bound keeps recursion shallow
        raise TypeError("nested deeper than 100 levels")
    kind = type(value)
    if value is None:
        return ("None",)
    if kind is bool or kind is str:
        return (kind.__name__, value)
    if kind is bytes:
        return ("bytes", value.hex())
    if kind is int:
        return ("int", hex(value))
    if kind is float:
        return ("float", value.hex())
    if kind is complex:
        return ("complex", value.real.hex(), value.imag.hex())
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return (kind.__name__,) + tuple(_tag(v, depth + 1) for v in value)
    if kind is dict:
        return ("dict",) + tuple((_tag(k, depth + 1), _tag(v, depth + 1)) for k, v in value.items())
    raise TypeError(f"a {kind.__name__} is not plain data")


def _value(tag, depth=0):
    """The value a tag names: the inverse of _tag, for tags as tuples or as JSON lists. Tags from
    the other side of the channel are untrusted: anything malformed raises (ValueError,
    TypeError, ...), and the caller treats that as a broken answer. Copied into the harness."""
    if type(tag) not in (list, tuple) or not tag or depth > 100:
        raise ValueError("not a tag")
    kind, rest = tag[0], tag[1:]
    one = rest[0] if len(rest) == 1 else None
    if kind == "None" and not rest:
        return None
    if kind in ("bool", "str") and type(one).__name__ == kind:
        return one
    if kind in ("bytes", "int", "float") and type(one) is str:
        return bytes.fromhex(one) if kind == "bytes" else int(one, 16) if kind == "int" \
            else float.fromhex(one)
    if kind == "complex" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if kind in ("list", "tuple", "set", "frozenset"):
        items = [_value(v, depth + 1) for v in rest]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
    if kind == "dict" and all(type(kv) in (list, tuple) and len(kv) == 2 for kv in rest):
        return {_value(k, depth + 1): _value(v, depth + 1) for k, v in rest}
    raise ValueError(f"malformed tag of kind {str(kind)[:20]!r}")


def _close(want_hex: str, got_hex: str) -> bool:
    want, got = float.fromhex(want_hex), float.fromhex(got_hex)
    return math.isclose(want, got, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)


def _same(want: tuple, got: tuple) -> bool:
    """Whether a result's tag `got` matches the expected tag `want`, by the rules above."""
    kind = want[0]
    if got[0] != kind:
        return False
    if kind == "float":
        return _close(want[1], got[1])
    if kind == "complex":
        return _close(want[1], got[1]) and _close(want[2], got[2])
    if kind in ("list", "tuple"):
        return len(got) == len(want) and all(_same(w, g) for w, g in zip(want[1:], got[1:]))
    if kind == "dict":
        items, expected = dict(got[1:]), dict(want[1:])
        return items.keys() == expected.keys() and all(_same(expected[k], items[k]) for k in expected)
    if kind in ("set", "frozenset"):
        return frozenset(got[1:]) == frozenset(want[1:])
    return got == want  # None, bool, int, str, bytes: exact


def _untag(tag, limit: int = 200) -> str:
    """A readable value for a failure message."""
    try:
        text = repr(_value(tag))
    except Exception:  # noqa: BLE001
        text = f"<unreadable {str(tag)[:limit]}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _parse(tests: str) -> ast.Module:
    _check_str(tests, "tests")
    if len(tests) > TESTS_MAX_CHARS:
        raise ValueError(f"tests are {len(tests):,} characters, more than {TESTS_MAX_CHARS:,}")
    try:
        return ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests line {e.lineno}: not valid Python ({e.msg})") from None
    except (ValueError, MemoryError, RecursionError) as e:  # null bytes, surrogates, nesting
        raise ValueError(f"tests do not parse: {type(e).__name__}: {str(e)[:200]}") from None


def _cases(tests: str, tree: ast.Module) -> list[tuple[ast.expr, str, tuple]] | None:
    """The cases of case-form tests as (call node, call source, expected value's tag), or None in
    assert form. Linear in the size of the tests: each case is sliced from its own line, once
    (ast.get_source_segment splits the whole source on every call, quadratic in the lines)."""
    bare = [isinstance(s, ast.Expr) and isinstance(s.value, ast.Compare) for s in tree.body]
    if not any(bare):
        return None  # a bare comparison checks nothing in assert form, so it marks a case
    lines = re.split(r"\r\n?|\n", tests)  # the tokenizer's line breaks (not str.splitlines')
    cases, seen = [], set()
    for stmt, is_case in zip(tree.body, bare):
        where = f"tests line {stmt.lineno}"
        shown = lambda node: repr(ast.unparse(node)[:80])  # only for the error raised at once
        if not is_case:
            raise ValueError(f"{where}: case-form tests hold only `CALL == LITERAL` lines, got "
                             f"{shown(stmt)}")
        if stmt.end_lineno != stmt.lineno or stmt.lineno in seen:
            raise ValueError(f"{where}: one case per line, each on a single line")
        seen.add(stmt.lineno)
        cmp = stmt.value
        if len(cmp.ops) != 1 or not isinstance(cmp.ops[0], ast.Eq):
            raise ValueError(f"{where}: a case is `CALL == LITERAL` with a single ==, got "
                             f"{shown(stmt)}")
        try:
            expected = _tag(ast.literal_eval(cmp.comparators[0]))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{where}: the expected value must be a Python literal, got "
                             f"{shown(cmp.comparators[0])}") from None
        line = lines[stmt.lineno - 1].encode()  # ast's column offsets count UTF-8 bytes
        call = line[cmp.left.col_offset:cmp.left.end_col_offset].decode()
        cases.append((cmp.left, call, expected))
    return cases


def parse_cases(tests: str) -> list[tuple[str, tuple]] | None:
    """The cases of case-form tests as (call source, expected value's tag), or None when `tests`
    is in assert form (no line is a bare `X == Y`). Raises ValueError, naming the line, for tests
    that do not parse, mix the forms, or have a case whose right side is not a literal."""
    cases = _cases(tests, _parse(tests))
    return None if cases is None else [(call, want) for _, call, want in cases]


@functools.lru_cache(maxsize=1024)
def _prepare(tests: str) -> dict:
    """What the tester needs to run `tests`: parsed and compiled once per tests string (a reward
    worker scores the same problem's tests for every rollout of it). Raises ValueError."""
    tree = _parse(tests)
    cases = _cases(tests, tree)
    # The names the tests read that are not builtins: the program's globals the tester asks for.
    names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load) and not hasattr(builtins, n.id)})
    if cases is None:
        code = compile(tree, "tests.py", "exec")
    else:
        code = [(compile(ast.Expression(node), f"<case {i}>", "eval"), call, want)
                for i, (node, call, want) in enumerate(cases, start=1)]
    return {"code": code, "source": tests, "names": names,
            "limit": REPLY_MIN_BYTES + REPLY_BYTES_PER_TESTS_CHAR * len(tests)}


def _prepare_stdio(tests: list) -> dict:
    """The stdin/stdout form: a list of {"input": str, "output": str}, each case a run of the
    program with `input` on its stdin, its stdout compared in the tester with `output` (which
    never enters the sandbox). Raises ValueError naming the case."""
    if not isinstance(tests, list) or not tests:
        raise ValueError("stdin/stdout tests must be a non-empty list of {input, output} objects")
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and case.keys() == {"input", "output"}
                and all(isinstance(v, str) for v in case.values())):
            raise ValueError(f"tests case {i}: not an object with str \"input\" and \"output\"")
    size = sum(len(c["input"]) + len(c["output"]) for c in tests)
    if size > TESTS_MAX_CHARS:
        raise ValueError(f"tests are {size:,} characters, more than {TESTS_MAX_CHARS:,}")
    return {"code": ("stdio", [(c["input"], c["output"]) for c in tests]), "source": "",
            "names": [], "limit": REPLY_MIN_BYTES + REPLY_BYTES_PER_TESTS_CHAR * size}


def _prepared(tests: str | list) -> dict:
    """_prepare (cached: strings, the case and assert forms) or _prepare_stdio (a list)."""
    return _prepare_stdio(tests) if isinstance(tests, list) else _prepare(tests)


def _same_output(want: str, got: str) -> bool:
    """The stdin/stdout form's comparison: line by line, trailing whitespace and trailing blank
    lines ignored; token by token, numbers (both tokens read as floats) within STDIO_RTOL
    relative, anything else exactly."""
    def lines(text):
        out = [line.rstrip() for line in text.split("\n")]
        while out and not out[-1]:
            out.pop()
        return [line.split() for line in out]
    want_lines, got_lines = lines(want), lines(got)
    if len(want_lines) != len(got_lines):
        return False
    for w_line, g_line in zip(want_lines, got_lines):
        if len(w_line) != len(g_line):
            return False
        for w, g in zip(w_line, g_line):
            if w == g:
                continue
            try:
                if not math.isclose(float(w), float(g), rel_tol=STDIO_RTOL):
                    return False
            except ValueError:
                return False
    return True


def check_tests(tests: str | list) -> None:
    """Raise ValueError (naming the line or case) unless `tests` is usable: a loader's check of a
    row. (Tests that cannot run with the program behind proxies show only when run:
    TestsUnsupported.)"""
    if isinstance(tests, str) and not tests.strip():
        raise ValueError("tests are empty")
    _prepared(tests)


# -----------------------------------------------------------------------------
# The tester: where the tests run and the verdict is computed
#
# A trusted process of its own (started by _run: rlimits, the run's deadline, a fresh interpreter
# that holds nothing of the trainer's), joined to the sandboxed program by two pipes. On them
# travel only JSON lines of plain data:
#   tester -> program   the harness's job (first), then ["call", name, [arg tags], {kw: tag}]
#                       (or, in the stdin/stdout form, ["run", stdin text]); a call's name is a
#                       function of the program's, or `Class().method` (LeetCode's
#                       `Solution().twoSum(...)`: the method of a fresh instance)
#   program -> tester   ["ready", {name: ["function"] | ["class"] | ["data", tag] | ["object", type]}]
#                       once the program has run (or ["crashed", why]), then per call
#                       ["return", tag, {arg index: new tag}, {kw: new tag}] (the arguments it
#                       changed, so an in-place sort tests right), ["raise", type, message] or
#                       ["notdata", why] (its result is not plain data); per run
#                       ["ran", stdout, "ok" | "timeout" | "exit N" | "killed by signal N"]
# Whatever the program writes on its pipe can only be an answer to a call: the verdict is the
# tests' own, run here on plain values, and its report goes to the worker on the tester's stdout,
# which the program cannot reach.

class _Broken(BaseException):
    """The program broke the protocol: a malformed or oversized answer, a result that is not plain
    data, or it ended. A BaseException, so that no `except Exception` in the tests swallows it."""


class _Unsupported(BaseException):
    """Raised in the tester when the tests hand the program something it cannot receive."""


def _exceptions() -> dict:
    """A program's exception of one of these types is raised in the tests as that type; any other
    (StopIteration would silently end a map() over the tests' inputs) as ProgramError."""
    return {name: cls for name, cls in vars(builtins).items() if isinstance(cls, type)
            and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                     StopAsyncIteration))}


_EXCEPTIONS = _exceptions()


class _Channel:
    """The tester's end of the pipes to the sandboxed program."""

    def __init__(self, to_program: int, from_program: int, limit: int):
        self.out = os.fdopen(to_program, "wb")
        self.inp = os.fdopen(from_program, "rb")
        self.limit = limit
        self.broken = self.unsupported = None  # kept, so a bare `except:` in the tests cannot hide it

    def send(self, message):
        try:
            self.out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            self.out.flush()
        except OSError:
            raise self.broke("the program's process ended") from None

    def receive(self) -> list:
        line = self.inp.readline(self.limit + 1)
        if not line.endswith(b"\n"):
            raise self.broke("the program's process ended" if len(line) <= self.limit else
                             f"an answer longer than {self.limit:,} bytes")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError, MemoryError):
            raise self.broke("a malformed answer") from None
        if type(message) is not list or not message or type(message[0]) is not str:
            raise self.broke("a malformed answer")
        return message

    def broke(self, why: str) -> _Broken:
        self.broken = self.broken or why
        return _Broken(why)

    def refuse(self, why: str) -> _Unsupported:
        self.unsupported = self.unsupported or why
        return _Unsupported(why)

    def call(self, name: str, args: tuple, kwargs: dict):
        """Run the program's `name` on `args` in the sandbox: its result, or its exception."""
        try:
            tags = [_tag(a) for a in args], {k: _tag(v) for k, v in kwargs.items()}
        except (TypeError, RecursionError) as e:
            raise self.refuse(f"the tests hand the program's {name}() something that is not "
                              f"plain data ({e})") from None
        self.send(["call", name, *tags])
        answer = self.receive()
        try:
            if answer[0] == "return" and len(answer) == 4:
                result = _value(answer[1])
                for where, new in ((args, answer[2]), (kwargs, answer[3])):
                    for key, tag in new.items():
                        _update(where[int(key) if where is args else key], _value(tag))
                return result
            if answer[0] == "raise" and len(answer) == 3:
                kind, message = str(answer[1])[:100], str(answer[2])[:300]
                error = _EXCEPTIONS.get(kind)
                try:
                    exc = error(message) if error else ProgramError(f"{kind}: {message}")
                except Exception:  # noqa: BLE001 - a builtin that takes other arguments
                    exc = ProgramError(f"{kind}: {message}")
            else:
                raise ValueError
        except Exception:  # noqa: BLE001 - anything malformed from the program
            if answer[0] == "notdata":
                raise self.broke(f"{name}() gave a result that is not plain data: "
                                 f"{str(answer[1:])[:200]}") from None
            raise self.broke(f"a malformed answer from {name}()") from None
        raise exc


def _update(arg, new):
    """Give an argument (a list, dict or set of the tests') the value the program left it with."""
    if type(arg) is not type(new) or type(arg) not in (list, dict, set):
        raise ValueError("only a list, dict or set argument can change, and keep its type")
    if type(arg) is list:
        arg[:] = new
    else:
        arg.clear()
        arg.update(new)


class _Function:
    """A function of the program, in the tester: calling it runs it in the sandbox."""

    def __init__(self, chan: _Channel, name: str):
        self._chan, self.__name__ = chan, name

    def __call__(self, *args, **kwargs):
        return self._chan.call(self.__name__, args, kwargs)

    def __getattr__(self, attr):
        raise self._chan.refuse(f"the tests read `{self.__name__}.{attr}`, an attribute of the "
                                f"program's function")

    def __repr__(self):
        return f"<the program's {self.__name__}>"


class _Class:
    """A class of the program, in the tester, as LeetCode's tests use one: `Solution().method(...)`
    calls `method` on a fresh instance made in the sandbox. Nothing else of the class can be used."""

    def __init__(self, chan: _Channel, name: str):
        self._chan, self.__name__ = chan, name

    def __call__(self, *args, **kwargs):
        if args or kwargs:
            raise self._chan.refuse(f"the tests construct the program's {self.__name__} with arguments")
        chan, name = self._chan, self.__name__

        class Instance:
            def __getattr__(self, attr):
                return _Function(chan, f"{name}().{attr}")
        return Instance()

    def __getattr__(self, attr):
        raise self._chan.refuse(f"the tests read `{self.__name__}.{attr}`, an attribute of the "
                                f"program's class")

    def __instancecheck__(self, obj):
        raise self._chan.refuse(f"the tests use the program's class `{self.__name__}` other than "
                                f"as `{self.__name__}().method(...)`")


def _test(job: dict, chan: _Channel) -> tuple[bool, str]:
    """Run the tests against the program behind `chan`: (passed, why not)."""
    chan.send(job["harness"])
    ready = chan.receive()
    if ready[0] == "crashed":
        return False, f"the program raised before the tests: {str(ready[1:])[:300]}"
    if ready[0] != "ready" or len(ready) != 2 or type(ready[1]) is not dict:
        raise chan.broke("a malformed answer")
    ns, objects = {"__name__": "__main__", "__builtins__": builtins}, {}
    for name, what in ready[1].items():
        if name not in job["names"] or type(what) is not list or not what:
            raise chan.broke("a malformed answer")
        if what[0] == "function":
            ns[name] = _Function(chan, name)
        elif what[0] == "class":
            ns[name] = _Class(chan, name)
        elif what[0] == "data":
            try:
                ns[name] = _value(what[1])
            except Exception:  # noqa: BLE001
                raise chan.broke(f"a malformed value of {name}") from None
        else:  # a class, a module...: not bound, and a NameError on it says why
            objects[name] = str(what[-1])[:40]
    try:
        if isinstance(job["code"], tuple):  # the stdin/stdout form: ("stdio", [(input, output)])
            return _run_stdio(job["code"][1], chan)
        if isinstance(job["code"], list):  # the case form
            for i, (code, call, want) in enumerate(job["code"], start=1):
                try:
                    got = _tag(eval(code, ns))
                except Exception as e:  # noqa: BLE001 - this case fails
                    return False, f"case {i}: {call} raised {type(e).__name__}: {str(e)[:300]}"
                if not _same(want, got):
                    return False, f"case {i}: {call} gave {_untag(got)}, expected {_untag(want)}"
        else:
            linecache.cache["tests.py"] = (len(job["source"]), None,
                                           job["source"].splitlines(True), "tests.py")
            exec(job["code"], ns)
    except (_Broken, _Unsupported):
        pass  # recorded on the channel, read below
    except NameError as e:
        if e.name in objects:
            chan.refuse(f"the tests use the program's `{e.name}` ({objects[e.name]}), which is "
                        f"neither a function nor plain data")
        else:
            return False, _failure(e)
    except BaseException as e:  # noqa: BLE001 - an assert, or anything the tests raised
        return False, _failure(e)
    if chan.unsupported or chan.broken:
        return False, chan.unsupported or chan.broken
    return True, ""


def _run_stdio(cases: list, chan: _Channel) -> tuple[bool, str]:
    """Run the program once per case, its stdin the case's input; all must pass. The fraction that
    passed is part of the reason, for the logs. A case that times out ends the run: the others are
    not run (counted as not passed), so a program that hangs costs one deadline, not one a case."""
    passed, first = 0, ""
    for i, (stdin_text, want) in enumerate(cases, start=1):
        chan.send(["run", stdin_text])
        answer = chan.receive()
        if len(answer) != 3 or answer[0] != "ran" or type(answer[1]) is not str:
            raise chan.broke("a malformed answer")
        ok = answer[2] == "ok" and _same_output(want, answer[1])
        passed += ok
        if not ok and not first:
            first = f"case {i}: " + ("wrong output" if answer[2] == "ok" else str(answer[2])[:100])
        if answer[2] == "timeout" and i < len(cases):
            first += f"; cases {i + 1}-{len(cases)} not run"
            break
    return passed == len(cases), f"{passed}/{len(cases)} cases passed" + (f"; {first}" if first else "")


def _failure(e: BaseException) -> str:
    """Where and how the tests failed: the last line of tests.py in the traceback."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "tests.py"]
    where = f"tests.py line {frames[-1].lineno}: {frames[-1].line} " if frames else ""
    return f"{where}-> {type(e).__name__}" + (f": {str(e)[:300]}" if str(e) else "")


def _die_with_parent(parent: int):
    """The first lines of a child process: Linux SIGKILLs it when the process that started it
    (`parent`) dies, so a killed worker cannot leave its sandbox (nor a dead trainer its workers)
    running. If the parent died before this call, the signal will never come: exit now. (Its
    source is copied into the harness and the tester too: no import there.)"""
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(1)


def _tester_main():
    """Entry point of the tester process: its job (marshal, from the worker) on stdin, its verdict
    (JSON) on stdout."""
    job = marshal.loads(sys.stdin.buffer.read())
    _die_with_parent(job["parent"])
    for limit, value in job["rlimits"]:
        resource.setrlimit(limit, (value, value))
    sys.path.extend(job["site"])
    report = os.dup(1)
    os.dup2(2, 1)  # what the tests print goes to stderr, so it cannot garble the verdict
    chan = _Channel(job["to_program"], job["from_program"], job["limit"])
    try:
        passed, why = _test(job, chan)
    except _Broken as e:
        passed, why = False, str(e)
    verdict = {"passed": passed, "why": why, "unsupported": chan.unsupported}
    os.write(report, json.dumps(verdict).encode())


# The tester's source: these functions, copied, so that it starts as a bare interpreter with a
# few imports rather than importing this module (ast, ctypes, subprocess...): it starts every run.
_TESTER = "\n\n".join(
    ["import builtins, json, linecache, marshal, math, os, resource, sys, traceback",
     f"FLOAT_RTOL, FLOAT_ATOL, STDIO_RTOL = {FLOAT_RTOL!r}, {FLOAT_ATOL!r}, {STDIO_RTOL!r}"]
    + [inspect.getsource(part) for part in (
        _die_with_parent, ProgramError, _tag, _value, _close, _same, _untag, _Broken, _Unsupported,
        _exceptions, _Channel, _update, _Function, _Class, _same_output, _test, _run_stdio, _failure,
        _tester_main)]
    + ["_EXCEPTIONS = _exceptions()", "_tester_main()"])
# -----------------------------------------------------------------------------
# The code sandbox
#
# A run: the worker starts the harness (below) and the tester (above), joined by two pipes; the
# tester sends the harness its job first: the program, the names the tests read, the seccomp
# filter. The harness builds the sandbox from the inside, runs the program, then answers the
# tester's calls; the program's stdout and stderr go to an anonymous in-memory file (memfd) that
# the worker reads afterwards, capped by RLIMIT_FSIZE. Per mode:
#   full, namespaces: `unshare --pid --fork --kill-child --net --mount --ipc` starts the harness in
#     fresh PID, network (a loopback that is down), mount and System V IPC namespaces (not root:
#     `--user --map-root-user` first, so that they belong to a user namespace of the run's own,
#     where the harness is uid 0 and holds the capabilities to build the rest). As init
#     (pid 1) of its PID namespace it mounts a size-capped tmpfs, binds the system folders and the
#     Python installation into it read-only, and pivots into it: the program sees /usr, /etc, the
#     interpreter, five devices and its own /proc, and can write only into that tmpfs (/tmp,
#     /var/tmp, /dev/shm and its home /sandbox). The program runs in a child that drops to the
#     run's own uid (not root: to the user's uid, in a nested user namespace, see drop) and
#     installs the seccomp filter (below). When the run ends its namespaces end, the tmpfs with
#     them, however the run was killed (or its worker: init watches a pipe only the worker writes
#     to): nothing of the program's files ever reaches the host's disk.
#   full: the harness also joins a memory and a pids cgroup of its own (its first lines, before
#     the program runs), so the whole program, every child included, is capped.
#   rlimits: none of the above; the harness runs in a host folder, as the run's uid when we are
#     root and the interpreter is readable by others, else as whoever runs the trainer.
# All modes: rlimits (CPU, address space, file size, no core dumps; processes where they bind),
# a scrubbed environment, stdin closed, a wall-clock deadline that kills the whole run.

_HARNESS_SOURCE = r'''
import json, os, resource, signal, sys, threading, time, traceback, types

SETUP_FAILED = 121  # exit code: the sandbox could not be built, and the program did not run

#<_tag>
#<_value>

#<_die_with_parent>

def enter(job):
    """The run's first lines, done here rather than between the worker's fork and exec (Python
    code there is unsafe when the forking process has threads): die with the worker, join the
    run's cgroups, set the rlimits but the process count (see drop)."""
    if not job["root"]:  # rlimits mode: the worker is our parent (else `unshare`: see become_init)
        _die_with_parent(job["parent"])
        os.close(job["lifeline"])  # watched by a namespace's init only
    for procs in job["cgroups"]:  # "0": this process; all it starts will be inside too
        with open(procs, "w") as f:
            f.write("0")
    for limit, value in job["rlimits"]:
        resource.setrlimit(limit, (value, value))


def new_root(plan):
    """Mount a tmpfs, bind into it what the program may see, and make it the root."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src, dst, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        rc = libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data))
        check(rc, f"mount {src} on {dst}")

    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096
    NOATIME, NODIRATIME, RELATIME, STRICTATIME = 1024, 2048, 1 << 21, 1 << 24

    def kept(path):
        """The flags a read-only remount must keep: in a user namespace the kernel refuses to
        clear noexec or change the atime mode of a mount inherited from the host."""
        have = os.statvfs(path).f_flag
        atime = NOATIME if have & os.ST_NOATIME else RELATIME if have & os.ST_RELATIME else STRICTATIME
        return atime | (have & (NOEXEC | NODIRATIME))  # ST_NOEXEC, ST_NODIRATIME are MS_'s values
    # Open every source first: the tmpfs goes over /tmp, where one of them may live (a venv).
    fds = [os.open(path, os.O_PATH) for path, _ in plan["binds"]]
    root = "/tmp"
    mount("tmpfs", root, "tmpfs", NOSUID | NODEV, plan["tmpfs"])
    for (path, kind), fd in zip(plan["binds"], fds):
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if kind == "dev":
            open(target, "x").close()
        else:
            os.makedirs(target, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", target, None, BIND)  # not MS_REC: no host sub-mounts
        if kind == "ro":
            mount(None, target, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV | kept(target))
        os.close(fd)
    for path, to in plan["links"]:
        os.symlink(to, root + path)
    for d in ("proc", "dev", "tmp", "var/tmp", "dev/shm"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    for d in ("tmp", "var/tmp", "dev/shm"):
        os.chmod(f"{root}/{d}", 0o1777)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{root}/dev/{name}")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)  # this PID namespace's
    os.chdir(root)
    check(libc.syscall(plan["pivot_root"], b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "detach the old root")  # 2 = MNT_DETACH
    os.chdir("/")


def become_init(lifeline):
    """As pid 1 of a fresh PID namespace: go on in a child, and here reap orphans and exit with
    the child's status, or as soon as the worker is gone. (Init ignores signals it has no handler
    for, and when it exits the kernel kills everything left in the namespace.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        os.close(lifeline)
        return

    def orphaned():
        # Only the worker holds the pipe's other end: EOF means it died (it closes it only after
        # killing this run). `unshare` gets no parent-death signal, so this is how the namespace
        # ends with its worker.
        os.read(lifeline, 1)
        os._exit(SETUP_FAILED)

    threading.Thread(target=orphaned, daemon=True).start()  # no fork follows in init
    while True:
        pid, status = os.wait()
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def drop(job):
    """Become the run's uid with no capabilities and no way to gain any, then cap its processes.
    As root: a uid of its own. Rootless: we are uid 0 of a user namespace whose only uid is the
    user's own, holding all capabilities in it; a nested user namespace maps `uid` (the user's
    uid, as outside) onto it, and the capabilities are cleared. The program then has none in the
    namespaces that hold its mounts, network and processes, and may not make another user
    namespace (max_user_namespaces 1 in ours, which it cannot raise)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = job["uid"], job["gid"]

    def check(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    if job["rootless"]:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("1")  # counted here: the nested one below, and nothing more
        check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
        for file, line in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1"), ("gid_map", f"{gid} 0 1")):
            with open(f"/proc/self/{file}", "w") as f:
                f.write(line)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset: clear all capabilities")
    else:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root to another uid: the capabilities go with it
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    # Set last, as the run's uid: RLIMIT_NPROC counts the processes of a uid in a user namespace
    # (Linux 5.14+), so this binds the program alone, and a lower limit set before the user
    # namespaces were made would have counted all of the user's processes outside too.
    if job["nproc"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))


def deny_syscalls(program_hex):
    """Install the seccomp filter (sandbox._seccomp_filter): from here on the denied system calls
    fail with EPERM in this process and everything it starts. Raises if it cannot."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(bytes.fromhex(program_hex))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = SockFprog(len(code.raw) // 8, ctypes.addressof(code))
    for args, what in (((38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS"),  # needed without CAP_SYS_ADMIN
                       ((22, 2, ctypes.addressof(prog), 0, 0), "PR_SET_SECCOMP")):  # MODE_FILTER
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)):
            raise OSError(ctypes.get_errno(), f"prctl({what})")


def send(chan, message):
    chan.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    chan.flush()
    for f in (sys.stdout, sys.stderr):  # the program's output so far, for the logs
        try:
            f.flush()
        except BaseException:
            pass


def describe(value):
    """What the tester gets of a global the tests read: a proxy, a copy, or nothing."""
    if isinstance(value, type) and value.__module__ == "__main__":
        return ["class"]
    if callable(value) and not isinstance(value, type):
        return ["function"]
    try:
        return ["data", _tag(value)]
    except BaseException:
        return ["object", type(value).__name__]


def call(ns, name, arg_tags, kw_tags):
    """One call of the program's function `name` (or `Class().method`): the answer the tester gets."""
    args = [_value(t) for t in arg_tags]
    kwargs = {k: _value(t) for k, t in kw_tags.items()}
    mutable = (list, dict, set)
    before = [_tag(a) if type(a) in mutable else None for a in args]
    kw_before = {k: _tag(v) for k, v in kwargs.items() if type(v) in mutable}
    try:
        owner, _, method = name.partition("().")
        function = getattr(ns[owner](), method) if method else ns[name]
        result = function(*args, **kwargs)
    except BaseException as e:
        try:
            return ["raise", type(e).__name__, str(e)[:300]]
        except BaseException:
            return ["raise", "Exception", "an exception that cannot be shown"]
    try:
        return ["return", _tag(result),
                {str(i): t for i, (a, b) in enumerate(zip(args, before))
                 if b is not None and (t := _tag(a)) != b},
                {k: t for k, b in kw_before.items() if (t := _tag(kwargs[k])) != b}]
    except BaseException as e:
        return ["notdata", str(e)[:200]]


def run_as_main(program):
    """Run the program as __main__; its namespace."""
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath("main.py")
    sys.modules["__main__"] = main
    exec(compile(program, "main.py", "exec"), main.__dict__)
    return main.__dict__


def run_case(job, stdin_text, channel):
    """The stdin/stdout form: one run of the program, in a child, with `stdin_text` on its stdin,
    under the run's deadline; its stdout (capped by RLIMIT_FSIZE) and how it ended."""
    inp, out = os.memfd_create("stdin"), os.memfd_create("stdout")
    data = stdin_text.encode("utf-8", "surrogateescape")
    while data:
        data = data[os.write(inp, data):]
    os.lseek(inp, 0, 0)
    for f in (sys.stdout, sys.stderr):
        f.flush()  # nothing of ours may reach the child's buffers
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # its own group: whatever it starts is killed with it
        os.dup2(inp, 0)
        os.dup2(out, 1)
        for fd in (inp, out, *channel):  # it gets no end of the channel
            os.close(fd)
        code = 0
        try:
            run_as_main(job["program"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except BaseException:
                code = code or 1  # output over the cap: EFBIG
        os._exit(code)
    deadline = time.monotonic() + job["case_timeout"]
    done, status = os.waitpid(pid, os.WNOHANG)
    while not done and time.monotonic() < deadline:
        time.sleep(0.002)
        done, status = os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, signal.SIGKILL)  # what it left running, or itself past the deadline
    except ProcessLookupError:
        pass
    if not done:
        os.waitpid(pid, 0)
        how = "timeout"
    else:
        code = os.waitstatus_to_exitcode(status)
        how = "ok" if code == 0 else f"exit {code}" if code > 0 else f"killed by signal {-code}"
    stdout = os.pread(out, os.fstat(out).st_size, 0).decode("utf-8", "replace")
    os.close(inp)
    os.close(out)
    return ["ran", stdout, how]


def serve(job, chan_in, chan_out):
    """Answer the tester until it hangs up. Function forms: run the program as __main__ first,
    then its calls; the stdin/stdout form: one run per case."""
    ns = {}
    if job["kind"] == "functions":
        try:
            ns = run_as_main(job["program"])
        except BaseException as e:
            traceback.print_exc()
            send(chan_out, ["crashed", f"{type(e).__name__}: {e}"[:300]])
            return
    send(chan_out, ["ready", {n: describe(ns[n]) for n in job["names"] if n in ns}])
    channel = (chan_in.fileno(), chan_out.fileno())
    for line in chan_in:  # ["call", name, args, kwargs] or ["run", stdin text]
        kind, *request = json.loads(line)
        send(chan_out, call(ns, *request) if kind == "call" else run_case(job, *request, channel))


def main():
    # The channel to the tester arrives as stdin and stdout; the program's own stdin is closed
    # and its stdout joins its stderr in the captured output.
    chan_in, chan_out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    job = json.loads(chan_in.readline())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        enter(job)
        if job["root"]:
            new_root(job["root"])
        os.makedirs(job["home"], exist_ok=True)
        os.chdir(job["home"])
        with open("main.py", "w") as f:
            f.write(job["program"])
        if job["uid"] >= 0 and not job["rootless"]:  # rootless: ours already, under any uid
            for path in (".", "main.py"):
                os.chown(path, job["uid"], job["uid"])
            os.chmod(".", 0o700)
        if os.getpid() == 1:
            become_init(job["lifeline"])
        if job["uid"] >= 0:
            drop(job)
        if job["seccomp"]:
            deny_syscalls(job["seccomp"])
    except Exception as e:
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(SETUP_FAILED)
    sys.path.extend(job["site"])
    serve(job, chan_in, chan_out)
    os._exit(0)  # the tester hung up: done, whatever threads the program left running


main()
'''
_HARNESS = (_HARNESS_SOURCE.replace("#<_tag>\n", inspect.getsource(_tag))
            .replace("#<_value>\n", inspect.getsource(_value))
            .replace("#<_die_with_parent>\n", inspect.getsource(_die_with_parent)))


# -----------------------------------------------------------------------------
# The seccomp filter (full and namespaces modes)
#
# A classic-BPF program the harness installs (PR_SET_SECCOMP) in the program's process after its
# own setup, just before the program runs; it holds for everything the program starts. It denies,
# with EPERM, what a test program never needs and what the known ways out of a container use:
# new namespaces (unshare, setns, clone with a CLONE_NEW* flag), mounts, ptrace and reading other
# processes' memory, bpf, the kernel keyring, perf events, userfaultfd, io_uring, kernel modules,
# kexec, reboot, personality, file handles (open_by_handle_at), swap, accounting, the clock,
# quotas, the kernel log, host names. clone3 fails with ENOSYS: its flags sit in memory a filter
# cannot read, and libc then falls back to clone, whose flags it can. A system call of another
# architecture (x86_64's 32-bit and x32 entry points) kills the process. No dependency: the
# filter is built here, as bytes.

_SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # AUDIT_ARCH_*: what the filter checks
# System call numbers: x86_64's own table; aarch64 uses the kernel's generic one.
_DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "move_mount": (429, 429),
    "open_tree": (428, 428), "mount_setattr": (442, 442), "chroot": (161, 51),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "bpf": (321, 280), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "personality": (135, 92), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "swapon": (167, 224), "swapoff": (168, 225),
    "acct": (163, 89), "quotactl": (179, 60), "syslog": (103, 116),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266),
    "adjtimex": (159, 171), "sethostname": (170, 161), "setdomainname": (171, 162),
    "vhangup": (153, 58), "fanotify_init": (300, 262), "lookup_dcookie": (212, 18),
    "iopl": (172, None), "ioperm": (173, None), "uselib": (134, None),  # x86 only
}
_CLONE, _CLONE3 = {"x86_64": 56, "aarch64": 220}, 435
_CLONE_NEW_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_X32_SYSCALL_BIT = 0x40000000


def _seccomp_filter(machine: str) -> bytes:
    """The filter for this machine's architecture, as the kernel reads it (struct sock_filter[]).
    Raises SandboxUnavailable for an architecture it does not know: no filter, no run."""
    if machine not in _SECCOMP_ARCH:
        raise SandboxUnavailable(f"no seccomp filter for this architecture ({machine}); the "
                                 f"namespace modes need one")
    column = 0 if machine == "x86_64" else 1
    denied = sorted(nrs[column] for nrs in _DENIED_SYSCALLS.values() if nrs[column] is not None)
    # Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]} (little endian)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|K ..., BPF_RET|K
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000, 0x80000000  # SECCOMP_RET_*
    DENY = "deny"  # a jump target, resolved below: the last instruction
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, _SECCOMP_ARCH[machine]), (RET, 0, 0, KILL),
            (LD, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((JGE, DENY, 0, _X32_SYSCALL_BIT))  # x32 calls share x86_64's arch value
    prog += [(JEQ, DENY, 0, nr) for nr in denied]
    prog += [(JEQ, 0, 1, _CLONE3), (RET, 0, 0, ERRNO | errno.ENOSYS),
             (JEQ, 0, 2, _CLONE[machine]), (LD, 0, 0, 16),  # clone's flags: args[0], low word
             (JSET, DENY, 0, _CLONE_NEW_FLAGS),
             (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO | errno.EPERM)]
    last = len(prog) - 1
    return b"".join(struct.pack("=HBBI", code, last - i - 1 if jt == DENY else jt, jf, k)
                    for i, (code, jt, jf, k) in enumerate(prog))
_SETUP_FAILED = 121
# check_sandbox's program: it imports, computes, and asks for a system call that the seccomp
# filter denies (personality's query, harmless when allowed): EPERM proves the filter is on.
_PROBE_PROGRAM = ("import collections, ctypes, decimal, hashlib, json, math\n\n"
                  "def probe():\n    libc = ctypes.CDLL(None, use_errno=True)\n"
                  "    denied = libc.personality(0xFFFFFFFF) == -1\n"
                  "    return json.dumps([1]), ctypes.get_errno() if denied else 0\n")
_TESTER_MEMORY = 4 << 30  # bytes of address space for the tester: it decodes answers of 100+ MiB

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # syscall numbers: glibc has no wrapper
_run_ids = itertools.count()
_sandbox_ok: set = set()   # modes whose check passed in this process
_cgroups: tuple | None = None
_stale_removed = False


class SandboxUnavailable(RuntimeError):
    """The sandbox mode asked for cannot run here. Code is then not run at all."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _hidden_ancestor(path: str) -> str | None:
    """The first folder on the way to `path` that other users cannot enter, or None."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _python_dirs() -> list[str]:
    """The interpreter's folders, installed packages included: what a program needs to run."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(sys.executable), *site.getsitepackages()}
    return sorted({os.path.realpath(d) for d in dirs if os.path.isdir(d)})


def _root_plan() -> dict:
    """What the harness builds the namespace modes' root from: read-only binds of the system
    folders and the interpreter, the top-level symlinks of a merged /usr, five devices."""
    binds, links = [], []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"):
        if os.path.islink(path):
            links.append([path, os.readlink(path)])
        elif os.path.isdir(path):
            binds.append([path, "ro"])
    for path in _python_dirs():  # sorted: a folder comes before the folders inside it
        if not any(path == b or path.startswith(b.rstrip("/") + "/") for b, _ in binds):
            binds.append([path, "ro"])
    binds += [[f"/dev/{d}", "dev"] for d in ("null", "zero", "full", "random", "urandom")
              if os.path.exists(f"/dev/{d}")]
    return {"binds": binds, "links": links, "pivot_root": _PIVOT_ROOT[os.uname().machine],
            "tmpfs": f"size={SANDBOX_TMPFS},nr_inodes=16384,mode=755"}


def _find_cgroups() -> tuple[str, list[str]]:
    """Where this process can make per-run cgroups with the memory and pids controllers:
    ("v2", [folder]) or ("v1", [memory folder, pids folder]), below its own cgroups, so that
    the limits of whatever contains the trainer still hold. Raises SandboxUnavailable."""
    mounts = {}  # "" (cgroup2), "memory", "pids" -> (mount point, root of the mount)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            head, tail = head.split(), tail.split()
            if len(tail) >= 3 and tail[0] == "cgroup2":
                mounts.setdefault("", (head[4], head[3]))
            elif len(tail) >= 3 and tail[0] == "cgroup":
                for opt in tail[2].split(","):
                    if opt in ("memory", "pids"):
                        mounts.setdefault(opt, (head[4], head[3]))
    mine = {}  # the same keys -> this process's cgroup path
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                mine[c] = path

    def folder(key):
        if key not in mounts or key not in mine:
            return None
        point, root = mounts[key]
        if not (mine[key] + "/").startswith(root.rstrip("/") + "/"):
            return None
        d = os.path.normpath(point + "/" + mine[key][len(root.rstrip("/")):])
        return d if os.path.isdir(d) and os.access(d, os.W_OK) else None

    def read(path):
        with open(path) as f:
            return set(f.read().split())

    tried = []
    v2 = folder("")
    if v2 and {"memory", "pids"} <= read(f"{v2}/cgroup.controllers"):
        if not {"memory", "pids"} <= read(f"{v2}/cgroup.subtree_control"):
            try:  # refused while this cgroup holds processes of its own: v2 wants delegation
                with open(f"{v2}/cgroup.subtree_control", "w") as f:
                    f.write("+memory +pids")
            except OSError as e:
                tried.append(f"cgroup v2 {v2} does not delegate memory and pids ({e.strerror})")
                v2 = None
        if v2:
            return "v2", [v2]
    else:
        tried.append("no writable cgroup v2 with the memory and pids controllers")
    v1 = [folder("memory"), folder("pids")]
    if all(v1):
        return "v1", v1
    tried.append("no writable cgroup v1 memory and pids hierarchies")
    raise SandboxUnavailable("; ".join(tried))


def _cgroup_layout() -> tuple[str, list[str]]:
    global _cgroups
    if _cgroups is None:  # a failure is not cached: the next check looks again
        _cgroups = _find_cgroups()
    return _cgroups


class _Cgroup:
    """One run's cgroup (v2), or its memory and pids cgroups (v1): made before the run, joined by
    the harness in its first lines (enter), so everything the program starts is inside and
    capped together; killed and removed after the run."""

    def __init__(self, layout: tuple[str, list[str]]):
        name = f"srpo-{os.getpid()}-{next(_run_ids)}"
        self.dirs = []
        # v2 names, then v1 names (memsw after limit_in_bytes: the kernel wants memsw >= mem).
        limits = [("memory.max", SANDBOX_MEMORY), ("memory.swap.max", 0),
                  ("memory.limit_in_bytes", SANDBOX_MEMORY),
                  ("memory.memsw.limit_in_bytes", SANDBOX_MEMORY),
                  ("pids.max", SANDBOX_NPROC + 1)]  # + the namespace's init (the harness)
        try:
            for parent in layout[1]:
                os.mkdir(os.path.join(parent, name))
                self.dirs.append(os.path.join(parent, name))
            written = set()
            for d in self.dirs:
                for file, value in limits:
                    if os.path.exists(os.path.join(d, file)):
                        with open(os.path.join(d, file), "w") as f:
                            f.write(str(value))
                        written.add(file)
            if not written & {"memory.max", "memory.limit_in_bytes"} or "pids.max" not in written:
                raise OSError(f"cgroup {name} has no memory or no pids limit to set")
        except BaseException:
            self.close()
            raise
        self.procs = [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def close(self):
        """Kill what is left inside and remove the cgroups. Never raises."""
        for d in reversed(self.dirs):
            for _ in range(300):
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids = [int(p) for p in f.read().split()]
                    if not pids:
                        os.rmdir(d)
                        break
                    for pid in pids:
                        _kill(pid)
                except FileNotFoundError:
                    break
                except OSError:
                    pass  # EBUSY: the last process is still on its way out
                time.sleep(0.01)
            else:
                log.warning("sandbox cgroup %s could not be removed; the next start-up retries", d)
        self.dirs = []


def _remove_stale():
    """Once per process: remove what sandboxes of dead processes left on the host (a SIGKILLed
    worker cannot clean up): empty cgroups and, from the rlimits mode, run folders. Only those
    whose owner (the pid in the name) is gone; a cgroup that still holds processes stays."""
    global _stale_removed
    if _stale_removed:
        return
    _stale_removed = True
    try:
        parents = _cgroup_layout()[1]
    except (SandboxUnavailable, OSError):
        parents = []
    folders = [(parent, r"srpo-(\d+)-\d+", os.rmdir) for parent in parents]
    folders.append((tempfile.gettempdir(), r"srpo-sandbox-(\d+)-[^/]+", _remove_tree))
    for parent, pattern, remove in folders:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = re.fullmatch(pattern, name)
            if m and not _alive(int(m.group(1))):
                try:
                    remove(os.path.join(parent, name))
                except OSError:
                    pass


def _remove_tree(path: str):
    """Delete a run folder whatever the program left in it: `rm -rf`, because Python 3.11's
    shutil.rmtree recurses and raises RecursionError on 1,100 nested folders. Never raises:
    clean-up must not kill a worker."""
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    except Exception as e:  # noqa: BLE001
        log.warning("could not remove sandbox folder %s: %s", path, e)


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


def _kill_uid(uid: int):
    """SIGKILL every process whose real uid is `uid`: in the rlimits mode the run's own uid, so
    this finds its processes even when they left its process group (setsid)."""
    for _ in range(100):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    real = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if real == uid:
                _kill(int(pid))
                found = True
        if not found:
            return
        time.sleep(0.01)


def _stop(proc: subprocess.Popen, namespaced: bool, uid: int):
    """Kill everything the run started, however it ended."""
    if proc.poll() is None and namespaced:
        # Kill unshare's child (the namespace's init) first and let unshare reap it: killing both
        # at once orphans the init, and a container's PID 1 may never reap the zombie.
        for pid in _children(proc.pid):
            _kill(pid)
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    _kill(-proc.pid)  # the whole process group: also sweeps up children of a normal exit
    proc.wait()
    if proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass
    if uid >= 0:
        _kill_uid(uid)


def _start_tester(to_program: int, from_program: int) -> subprocess.Popen:
    """The tester process (_TESTER): a fresh interpreter in a process group of its own, with a
    scrubbed environment; its rlimits and parent-death signal are its first lines (_tester_main)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _TESTER], cwd="/", env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            pass_fds=(to_program, from_program))


def _run(mode: str, program: str, tests: str,
         timeout: float) -> tuple[bool, str | None, str]:
    """One run of `program` and its tests in sandbox `mode` (already checked). See run_program."""
    prepared = _prepared(tests)
    stdio = isinstance(prepared["code"], tuple)
    site_dirs = [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]
    job = {"program": program, "names": prepared["names"], "home": "/sandbox", "uid": -1, "gid": -1,
           "root": None, "seccomp": "", "site": site_dirs,
           "kind": "stdio" if stdio else "functions", "case_timeout": timeout}
    timeout = run_deadline(tests, timeout)
    namespaced = mode != "rlimits"
    root = os.geteuid() == 0
    # Not root: the namespaces are made inside a user namespace of the run's own, where the harness
    # is uid 0 (the user outside) and the program runs as the user's uid (see the harness's drop).
    job["rootless"] = namespaced and not root
    drop, nproc = root or namespaced, SANDBOX_NPROC if mode == "full" else SANDBOX_NPROC_NO_CGROUP
    cpu = math.ceil(timeout) + 1
    job["rlimits"] = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, SANDBOX_MEMORY),
                      (resource.RLIMIT_FSIZE, SANDBOX_FSIZE), (resource.RLIMIT_CORE, 0)]
    job["parent"] = os.getpid()
    proc, tester, cgroup, run_dir, error, output = None, None, None, None, None, ""
    verdict, tester_err = b"", b""
    out = os.memfd_create("srpo-sandbox-output")
    to_program, from_program = os.pipe(), os.pipe()  # (read, write) each: the tester's channel
    # The harness's init sees EOF on the pipe's read end when this process (the write end) dies.
    job["lifeline"], lifeline = os.pipe()
    try:
        if namespaced:
            userns = ["--user", "--map-root-user"] if job["rootless"] else []
            prefix = [shutil.which("unshare") or "unshare", *userns, "--pid", "--fork",
                      "--kill-child", "--net", "--mount", "--ipc"]
            job["root"] = _root_plan()
            job["seccomp"] = _seccomp_filter(os.uname().machine).hex()
            if mode == "full":
                cgroup = _Cgroup(_cgroup_layout())
        else:
            prefix = []
            run_dir = tempfile.mkdtemp(prefix=f"srpo-sandbox-{os.getpid()}-")
            job["home"] = run_dir
            # Another uid can only run an interpreter that everyone can read (/root is not).
            drop = drop and all(_hidden_ancestor(p) is None for p in _python_dirs() + [run_dir])
        job["nproc"] = nproc if drop else 0  # RLIMIT_NPROC counts all of a user's processes
        job["cgroups"] = cgroup.procs if cgroup else []

        # A scrubbed environment: nothing of the trainer's (tokens, paths) reaches the program.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": job["home"],
               "TMPDIR": "/tmp" if namespaced else run_dir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        # -S skips the site module: its .pth hooks cost ~60ms a run in a big environment. The
        # site-packages folders go on sys.path directly, so installed packages still import.
        cmd = [*prefix, sys.executable, "-I", "-S", "-c", _HARNESS]
        # start_new_session: the run is its own process group, so one killpg reaches all of it.
        # Its stdin and stdout are the channel to the tester; the harness moves them aside.
        # No preexec_fn: the rlimits, the cgroup and the parent-death signal are the harness's
        # first lines (enter), and the tester's (_tester_main), as Python code between fork and
        # exec is unsafe in a process with threads (the trainer, when it checks the sandbox or
        # scores inline).
        proc = subprocess.Popen(cmd, cwd="/", env=env, stdin=to_program[0], stdout=from_program[1],
                                stderr=out, start_new_session=True, close_fds=True,
                                pass_fds=[job["lifeline"]])
        if job["rootless"]:  # the user's own ids, as the program will see them
            job["uid"], job["gid"] = os.getuid(), os.getgid()
        elif drop:
            job["uid"] = job["gid"] = SANDBOX_UID_BASE + proc.pid  # unique while the run lives
        tester = _start_tester(to_program[1], from_program[0])
        tester_job = {"harness": job, "code": prepared["code"], "source": prepared["source"],
                      "names": prepared["names"], "limit": prepared["limit"], "site": site_dirs,
                      "to_program": to_program[1], "from_program": from_program[0],
                      "parent": job["parent"], "rlimits": [(resource.RLIMIT_CPU, cpu),
                      (resource.RLIMIT_AS, _TESTER_MEMORY), (resource.RLIMIT_CORE, 0)]}
        for fd in (*to_program, *from_program):  # theirs now: EOF reaches each side when one ends
            os.close(fd)
        to_program = from_program = ()
        try:
            verdict, tester_err = tester.communicate(marshal.dumps(tester_job), timeout=timeout)
        except subprocess.TimeoutExpired:
            error = "timeout"
        else:  # the tester hung up, so the harness is on its way out: a normal exit is quieter
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
    except (OSError, subprocess.SubprocessError) as e:
        error, output = "sandbox_error", f"sandbox setup failed: {e}\n"
    finally:
        for fd in (*to_program, *from_program):
            os.close(fd)
        if tester is not None:
            _kill(-tester.pid)
            tester.wait()
            for pipe in (tester.stdin, tester.stdout, tester.stderr):  # a worker lives long:
                pipe.close()                                          # no descriptor may leak
        if proc is not None:
            _stop(proc, namespaced, job["uid"] if not namespaced else -1)
        size = os.fstat(out).st_size
        tail = os.pread(out, SANDBOX_FSIZE, max(0, size - SANDBOX_FSIZE))
        output += tail.decode("utf-8", "replace")
        os.close(out)
        os.close(lifeline)
        os.close(job["lifeline"])
        if cgroup:
            cgroup.close()
        if run_dir:
            _remove_tree(run_dir)
    if error is None and proc.returncode == _SETUP_FAILED:
        error = "sandbox_error"
    passed, why = False, error
    if error is None:
        try:
            result = json.loads(verdict)
            passed, why = result["passed"] is True, str(result["why"])
        except (ValueError, TypeError, KeyError):
            error = why = "sandbox_error"  # the tester died: the tests' fault or ours, never the program's
            output += f"\n[srpo] the tester failed: {tester_err.decode('utf-8', 'replace')[-2000:]}"
        else:
            if result.get("unsupported"):
                raise TestsUnsupported(result["unsupported"])
    note = f"\n[srpo] {'passed' if passed else 'not passed'}: {why}\n" if why else ""
    output = output[-(SANDBOX_FSIZE - len(note)):] + note
    return passed, error, output


def _userns_refused() -> str | None:
    """Why this kernel does not let this user make a rootless run's namespaces (a user namespace,
    then PID, network, mount and IPC ones, and a /proc mounted inside), or None. Tried for real:
    the settings that forbid it differ between distributions (_USERNS_SETTINGS)."""
    cmd = [shutil.which("unshare"), "--user", "--map-root-user", "--pid", "--fork", "--net",
           "--mount", "--ipc", "--mount-proc", "true"]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if p.returncode == 0 else (p.stderr.decode(errors="replace").strip()[-300:]
                                            or f"`unshare` exited with status {p.returncode}")


_USERNS_SETTINGS = ("user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 (Debian and "
                    "Ubuntu kernels), kernel.apparmor_restrict_unprivileged_userns = 0 (Ubuntu 23.10+), "
                    "and a /proc that is not partly hidden (containers often hide parts)")


def _requirement_missing(mode: str) -> str | None:
    """Why `mode` cannot run on this machine at all, or None."""
    if mode == "rlimits":
        return None
    if shutil.which("unshare") is None:
        return "it needs util-linux's `unshare`"
    if os.uname().machine not in _PIVOT_ROOT:
        return f"pivot_root's system call number is not known here ({os.uname().machine})"
    if os.geteuid() != 0:
        not_root = f"this user (uid {os.getuid()}) is not root, so it must be built in a user namespace"
        release = re.match(r"(\d+)\.(\d+)", os.uname().release)
        if not release or (int(release[1]), int(release[2])) < (5, 14):
            # Before 5.14 RLIMIT_NPROC counts all of the user's processes, the trainer's included,
            # so the program's process limit could not be its own.
            return f"{not_root}, which needs Linux 5.14 or later (this is {os.uname().release})"
        refused = _userns_refused()
        if refused:
            return (f"{not_root}, and this kernel refuses one ({refused}); it allows them with "
                    f"{_USERNS_SETTINGS}")
    if mode == "full":
        try:
            _cgroup_layout()
        except (SandboxUnavailable, OSError) as e:
            delegated = "" if os.geteuid() == 0 else \
                " (a user who is not root has one only where a cgroup subtree is delegated to it)"
            return f"it needs a cgroup per run: {e}{delegated}"
    return None


def _describe(mode: str) -> str:
    """What a program gets in `mode` (checked) on this machine, and why."""
    root = os.geteuid() == 0
    if mode == "rlimits":
        as_root = root and any(_hidden_ancestor(p) for p in _python_dirs())
        who = ("AS ROOT (the interpreter is in a folder other users cannot enter)" if as_root
               else "as a uid of its own" if root else f"as this user (uid {os.getuid()})")
        return (f"generated code runs on this machine's real filesystem and network, {who}, "
                f"limited only by rlimits and a deadline. Use it only for code you trust, or "
                f"inside a throwaway VM")
    isolation = "fresh PID, network, mount and IPC namespaces and a private read-only root"
    how = (f"as root: {isolation}, a uid of its own per run" if root else
           f"not root, so in a user namespace of its own: {isolation}; the program runs as this "
           f"user (uid {os.getuid()}) with no capabilities, not as a uid of its own")
    caps = (f"a memory and a pids cgroup (cgroup {_cgroup_layout()[0]}) cap the whole program"
            if mode == "full" else f"no cgroup: {_NO_CGROUP}")
    return f"{how}; {caps}"


def describe_sandbox(mode: str | None = None) -> str:
    """"MODE: what a program gets here, and why" for the sandbox mode code will run in (`mode`,
    else as check_sandbox decides it, which this checks first): the trainer's start-up line."""
    mode = check_sandbox(mode)
    return f"{mode}: {_describe(mode)}"


def check_sandbox(mode: str | None = None) -> str:
    """The sandbox mode code will run in: `mode`, else $SRPO_SANDBOX, else "full". Checked once
    per process by running a real program through it, retried (a check can fail for a passing
    reason, a full disk say, and a mode is never given up on one failure). Raises
    SandboxUnavailable when the mode cannot run here: nothing falls back to a weaker one."""
    mode = check_mode(mode or os.environ.get(SANDBOX_ENV) or "full")
    if mode in _sandbox_ok:
        return mode
    _remove_stale()
    why = _requirement_missing(mode)
    for attempt in range(3 if why is None else 0):
        time.sleep(0.25 * attempt)
        denied = errno.EPERM if mode != "rlimits" else 0  # the seccomp filter is on
        passed, error, output = _run(mode, _PROBE_PROGRAM, f"probe() == ('[1]', {denied})",
                                     timeout=5.0)
        if passed:
            break
        why = f"its check program failed ({error or 'wrong result'}): {output[-400:].strip()!r}"
    else:
        weaker = SANDBOX_MODES[SANDBOX_MODES.index(mode) + 1:]
        gives_up = "; ".join(f"{m!r} gives up {_GIVES_UP[m]}" for m in weaker)
        raise SandboxUnavailable(
            f"code sandbox {mode!r} is not available on this machine: {why}. Generated code is "
            f"never run with fewer protections than asked for: run where {mode!r} works, or "
            + (f"accept a weaker mode ({', '.join(weaker)}) with sandbox=... or {SANDBOX_ENV}=... "
               f"(the trainer's --sandbox): {gives_up}. The README's sandbox section says what "
               f"each gives, as root and without root" if weaker else "run as root"))
    _sandbox_ok.add(mode)
    # "full" as root is what everything is measured against; any other case says what it lacks.
    if mode != "full" or os.geteuid() != 0:
        log.warning("code sandbox %r: %s", mode, _describe(mode))
    return mode


def run_deadline(tests: str | list, timeout: float) -> float:
    """The wall-clock deadline of one run of a program against `tests`: `timeout`, or in the
    stdin/stdout form (a list) `timeout` per case, each case a run of its own, plus one for the
    sandbox's start-up (the harness holds each case to `timeout`)."""
    return timeout * (len(tests) + 1) if isinstance(tests, list) else timeout


def run_program(program: str, tests: str | list, timeout: float = CODE_TIMEOUT,
                sandbox: str | None = None) -> tuple[bool, str | None, str]:
    """Run `program` and then its tests in the code sandbox, mode `sandbox` (see check_sandbox).
    `tests` is a str (the case or assert form, see parse_cases) or a list of {"input", "output"}
    (the stdin/stdout form: each case has the deadline `timeout`). Returns (passed, error,
    output): error is "timeout" when the wall-clock deadline killed the run, "sandbox_error" when
    the sandbox could not be built (the program did not run) or the tester died, else None;
    output is the last SANDBOX_FSIZE characters of what it printed, ending with why it did not
    pass (the stdin/stdout form: how many cases passed, always). Raises ValueError for
    malformed tests, TestsUnsupported (a ValueError) for tests that cannot run with the program
    behind proxies, and SandboxUnavailable when the mode cannot run here."""
    _check_str(program, "program")
    _prepared(tests)  # malformed tests raise here, before any sandbox starts
    return _run(check_sandbox(sandbox), program, tests, timeout)
