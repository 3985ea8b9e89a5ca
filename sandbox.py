"""
The code sandbox: runs a generated program against its unit tests and says whether it passed, with
the program unable to touch the trainer, the host or the verdict. rewards.py calls run_program
(through its worker pool); everything here is the sandbox's, so it can be read and tested on its own.

What it protects. The program is untrusted: the policy writes it and is paid when it passes, so it
will find any way to be paid or to do harm. Three things are kept from it. The verdict: in the
case form of the tests (`CALL == LITERAL` per line) only the calls enter the sandbox; their
results come back as plain data, read with ast.literal_eval out here and compared with the
expected literals, which never left this process. The host: in the "full" and "namespaces" modes
each run gets fresh PID, network, mount and IPC namespaces, a private root (a size-capped tmpfs
for everything it may write, the system folders and the Python installation bound read-only, no
home folders, repository or data), a uid of its own, a scrubbed environment and rlimits; "full"
adds a memory and a pids cgroup that cap the whole program, every child included. A user who is
not root gets the same namespaces and root inside a user namespace, the program running as their
own uid with no capabilities (describe_sandbox says which here). The trainer: a
wall-clock deadline kills the whole run, nothing it writes reaches the host's disk, and what a
killed run leaves behind (cgroups, run folders) is removed at the next start-up.

How. A run starts the harness (_HARNESS_SOURCE, below) under `unshare`; the harness builds the
sandbox from the inside as init of its PID namespace, drops to the run's uid, runs the program
and reports on a captured, size-capped output. check_sandbox proves a mode works here by running
a real program through it, and raises SandboxUnavailable when it cannot: code never runs with
fewer protections than the mode named, and nothing falls back to a weaker one.

What it does not protect. There is no seccomp filter, so a kernel bug is a way out; the program
can read everything in its view (the system folders, installed packages' data); CPU is not
shared out. The assert form of the tests (HumanEval's check(candidate)) is hardened but can be
forged by a program written to do so. "rlimits" mode isolates nothing: trusted code only. Run
code from untrusted users in a VM as well. The README's sandbox section is the full account.

Public API (rewards.py re-exports all of it):
    parse_cases(tests) -> list | None             the cases of case-form tests (None: assert form)
    check_tests(tests)                            ValueError naming the line if tests are unusable
    run_program(program, tests, timeout, sandbox=None) -> (passed, error, output)
    check_mode(mode) -> str                       ValueError unless `mode` is one of SANDBOX_MODES
    check_sandbox(mode=None) -> str               check that a sandbox mode works here, or raise
    describe_sandbox(mode=None) -> str            the checked mode, what a program gets in it here and why
    SandboxUnavailable, SANDBOX_MODES, SANDBOX_ENV
"""
import ast
import inspect
import itertools
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
import subprocess
import sys
import tempfile
import time

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

# `tests` comes in one of two forms.
#
# Case form (the project's own data, and what to train on): one case per line, `CALL == LITERAL`,
#     fizzbuzz(3) == ['1', 'Zap', '3']
#     is_divisible(0) == True
# Only the CALLs enter the sandbox. The harness evaluates each after the program has run and
# prints its result through `_tag` (below), which accepts plain data only; out here the printed
# line is read back with ast.literal_eval and compared with the expected literal, which never left
# this process. A program that tampers with the harness can at most print values, and it still
# needs the right ones, which it can only get by solving the problem.
#
# Assert form (HumanEval's `check(candidate)`, hand-written asserts): Python statements run after
# the program, in the sandbox; the program passes when they run to the end, which the harness
# reports with a random marker. This form is hardened (`_harden_asserts` and the harness's
# `execute`) but not unforgeable: see the README's sandbox section for what remains.
#
# Comparison of a case (decided here, documented in the README): the result must have exactly the
# expected types, all the way down (True is not 1, 3.0 is not 3, a tuple is not a list); floats
# compare within FLOAT_RTOL relative (FLOAT_ATOL absolute near 0), so -0.0 equals 0.0 and inf
# equals inf; NaN equals nothing (and no literal can expect it); set elements and dict keys must
# be equal exactly. Expected values are Python literals (what ast.literal_eval reads).

FLOAT_RTOL = 1e-9
FLOAT_ATOL = 1e-12


def _tag(value, depth=0):
    """`value` as a tree of tuples that names each type: ("int", "0x2a"), ("list", ...items),
    ("dict", (key, value)...). Plain data only, exact types: anything else (a subclass, an object
    with its own __eq__) raises TypeError. Equal tags mean equal values of the same types, in set
    elements and dict keys too. Ints travel as hex and floats as float.hex(): exact, with no
    4300-digit limit, inf and nan included. Its source is copied into the sandbox's harness, so
    the results printed there and the expected values here are tagged by the same code."""
    if depth > 100:  # deeper is not data a test expects; the bound keeps recursion shallow
        raise TypeError("nested deeper than 100 levels")
    kind = type(value)
    if value is None:
        return ("None",)
    if kind is bool or kind is str or kind is bytes:
        return (kind.__name__, value)
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


def _close(want_hex: str, got_hex: str) -> bool:
    want, got = float.fromhex(want_hex), float.fromhex(got_hex)
    return math.isclose(want, got, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)


def _same(want: tuple, got) -> bool:
    """Whether a result's tag `got` (read from the sandbox's output: anything at all) matches the
    expected tag `want`, by the rules above. Malformed input raises, which the caller counts as a
    mismatch; `want` is trusted."""
    kind = want[0]
    if type(got) is not tuple or not got or got[0] != kind:
        return False
    if kind == "float":
        return len(got) == 2 and _close(want[1], got[1])
    if kind == "complex":
        return len(got) == 3 and _close(want[1], got[1]) and _close(want[2], got[2])
    if kind in ("list", "tuple"):
        return len(got) == len(want) and all(_same(w, g) for w, g in zip(want[1:], got[1:]))
    if kind == "dict":
        items = dict(got[1:])
        expected = dict(want[1:])
        return (len(items) == len(got) - 1 and items.keys() == expected.keys()
                and all(_same(expected[k], items[k]) for k in expected))
    if kind in ("set", "frozenset"):
        return frozenset(got[1:]) == frozenset(want[1:])
    return got == want  # None, bool, int, str, bytes: exact


def parse_cases(tests: str) -> list[tuple[str, tuple]] | None:
    """The cases of case-form tests as (call source, expected value's tag), or None when `tests`
    is in assert form (no line is a bare `X == Y`). Raises ValueError, naming the line, for tests
    that do not parse, mix the forms, or have a case whose right side is not a literal."""
    _check_str(tests, "tests")
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests line {e.lineno}: not valid Python ({e.msg})") from None
    bare = [isinstance(s, ast.Expr) and isinstance(s.value, ast.Compare) for s in tree.body]
    if not any(bare):
        return None  # a bare comparison checks nothing in assert form, so it marks a case
    cases, lines = [], set()
    for stmt, is_case in zip(tree.body, bare):
        where = f"tests line {stmt.lineno}"
        text = ast.get_source_segment(tests, stmt) or ""
        if not is_case:
            raise ValueError(f"{where}: case-form tests hold only `CALL == LITERAL` lines, got "
                             f"{text[:80]!r}")
        if stmt.end_lineno != stmt.lineno or stmt.lineno in lines:
            raise ValueError(f"{where}: one case per line, each on a single line")
        lines.add(stmt.lineno)
        cmp = stmt.value
        if len(cmp.ops) != 1 or not isinstance(cmp.ops[0], ast.Eq):
            raise ValueError(f"{where}: a case is `CALL == LITERAL` with a single ==, got "
                             f"{text[:80]!r}")
        try:
            expected = _tag(ast.literal_eval(cmp.comparators[0]))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            literal = ast.get_source_segment(tests, cmp.comparators[0])
            raise ValueError(f"{where}: the expected value must be a Python literal, got "
                             f"{literal[:80]!r}") from None
        cases.append((ast.get_source_segment(tests, cmp.left), expected))
    return cases


def check_tests(tests: str) -> None:
    """Raise ValueError (naming the line) unless `tests` is usable: a loader's check of a row."""
    if not tests.strip():
        raise ValueError("tests are empty")
    parse_cases(tests)


# Assert form: every operand that a test's verdict is computed from must be plain data. The
# classic hack returns an object whose __eq__ always says True (or __bool__, __sub__, __abs__,
# __lt__...); with every operand of a comparison, a boolean or arithmetic operator, every call
# argument and the asserted value itself passed through __srpo_plain__ (the harness's `plain`,
# which raises on anything _tag refuses), such an object fails the test where it first appears.
_PLAIN = "__srpo_plain__"  # dunder-shaped, so that no class body mangles the name


def _plain_call(node: ast.expr) -> ast.expr:
    if isinstance(node, (ast.GeneratorExp, ast.Lambda, ast.Starred)):
        return node  # test code's own iterators and functions, not values from the program
    return ast.copy_location(ast.Call(ast.Name(_PLAIN, ast.Load()), [node], []), node)


class _StrictOperands(ast.NodeTransformer):
    """Inside one assert's test expression: operands and arguments wrapped in __srpo_plain__."""

    def visit_Compare(self, node):
        self.generic_visit(node)
        node.left = _plain_call(node.left)
        node.comparators = [_plain_call(c) for c in node.comparators]
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        node.values = [_plain_call(v) for v in node.values]
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        node.operand = _plain_call(node.operand)
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        node.left, node.right = _plain_call(node.left), _plain_call(node.right)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        node.args = [_plain_call(a) for a in node.args]
        for k in node.keywords:
            if k.arg is not None:  # not **kwargs
                k.value = _plain_call(k.value)
        return node


class _HardenAsserts(ast.NodeTransformer):
    def visit_Assert(self, node):
        node.test = _plain_call(_StrictOperands().visit(node.test))
        return node


def _harden_asserts(tests: str) -> str:
    """Assert-form tests with every assert made strict (above); other statements unchanged."""
    tree = _HardenAsserts().visit(ast.parse(tests))
    return ast.unparse(ast.fix_missing_locations(tree))


def _verdict(output: str, marker: str, cases) -> tuple[bool, str]:
    """(passed, why not) from the harness's report: the last line that starts with the marker.
    Assert form: the report says "passed". Case form: it holds the tagged results, compared here
    with the expected values. Everything the program printed is untrusted; a malformed report
    is a failure, never an exception."""
    at = output.rfind("\n" + marker)
    if at < 0:
        return False, "no report: the program or its tests did not run to the end"
    report = output[at + 1 + len(marker):].split("\n", 1)[0]
    if cases is None:
        return report == "passed", "" if report == "passed" else "malformed report"
    try:
        results = ast.literal_eval(report)
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError, MemoryError, RecursionError...
        return False, "malformed report"
    if type(results) is not list or len(results) != len(cases):
        return False, "malformed report"
    for i, ((call, want), got) in enumerate(zip(cases, results), start=1):
        try:
            same = _same(want, got)
        except Exception:  # noqa: BLE001 - a malformed tag from the program
            same = False
        if not same:
            shown = got[1] if type(got) is tuple and got[:1] == ("error",) else _untag(got)
            return False, f"case {i}: {call} gave {shown}, expected {_untag(want)}"
    return True, ""


def _untag(tag, limit: int = 200) -> str:
    """A readable value for a failure message (best effort: the tag may come from the program)."""
    def value(t):
        kind, rest = t[0], t[1:]
        if kind == "None":
            return None
        if kind == "int":
            return int(rest[0], 16)
        if kind == "float":
            return float.fromhex(rest[0])
        if kind == "complex":
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if kind in ("list", "tuple", "set", "frozenset"):
            items = [value(v) for v in rest]
            return items if kind == "list" else tuple(items) if kind == "tuple" else set(items)
        if kind == "dict":
            return {value(k): value(v) for k, v in rest}
        return rest[0]
    try:
        text = repr(value(tag))
    except Exception:  # noqa: BLE001
        text = f"<unreadable {str(tag)[:limit]}>"
    return text if len(text) <= limit else text[:limit] + "..."


# -----------------------------------------------------------------------------
# The code sandbox
#
# A run: the worker starts the harness (below) and writes it a job on stdin: the program, the
# case calls or the hardened tests, a random marker. The harness builds the sandbox from the
# inside, runs the program and reports; stdout and stderr go to an anonymous in-memory file
# (memfd) that the worker reads afterwards, capped by RLIMIT_FSIZE. Per mode:
#   full, namespaces: `unshare --pid --fork --kill-child --net --mount --ipc` starts the harness in
#     fresh PID, network (a loopback that is down), mount and System V IPC namespaces (not root:
#     `--user --map-root-user` first, so that they belong to a user namespace of the run's own,
#     where the harness is uid 0 and holds the capabilities to build the rest). As init
#     (pid 1) of its PID namespace it mounts a size-capped tmpfs, binds the system folders and the
#     Python installation into it read-only, and pivots into it: the program sees /usr, /etc, the
#     interpreter, five devices and its own /proc, and can write only into that tmpfs (/tmp,
#     /var/tmp, /dev/shm and its home /sandbox). The program runs in a child that drops to the
#     run's own uid (not root: to the user's uid, in a nested user namespace, see drop). When the
#     run ends its namespaces end, the tmpfs with them, however the run was killed (or its worker:
#     init watches a pipe only the worker writes to): nothing of the program's files ever reaches
#     the host's disk.
#   full: the harness also joins a memory and a pids cgroup of its own (its first lines, before
#     the program runs), so the whole program, every child included, is capped.
#   rlimits: none of the above; the harness runs in a host folder, as the run's uid when we are
#     root and the interpreter is readable by others, else as whoever runs the trainer.
# All modes: rlimits (CPU, address space, file size, no core dumps; processes where they bind),
# a scrubbed environment, stdin closed, a wall-clock deadline that kills the whole run.

def _die_with_parent(parent: int):
    """The first lines of a child process: Linux SIGKILLs it when the process that started it
    (`parent`) dies, so a killed worker cannot leave its sandbox (nor a dead trainer its workers)
    running. If the parent died before this call, the signal will never come: exit now. (Its
    source is copied into the sandbox's harness too: no import there.)"""
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(1)


_HARNESS_SOURCE = r'''
import builtins, json, linecache, os, resource, sys, threading, types

SETUP_FAILED = 121  # exit code: the sandbox could not be built, and the program did not run
PRISTINE = dict(builtins.__dict__)  # the builtins before the program could rebind any
# Captured before the program runs: it can rebind these names, not change the functions.
HOOK_RESETS = (sys.settrace, sys.setprofile, threading.settrace, threading.setprofile)

#<_tag>

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


def plain(value):
    """__srpo_plain__ in hardened assert-form tests: plain data passes, anything else fails."""
    _tag(value)
    return value


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


def make_finish(marker):
    """The report writer. The marker lives only in this closure, and main() holds the closure on
    its evaluation stack rather than in a variable: no frame's locals or globals lead to it."""
    line = "\n" + marker

    def finish(report):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except BaseException:
                pass
        data = (line + report + "\n").encode()
        while data:
            data = data[os.write(1, data):]
        os._exit(0)
    return finish


def case(src, i, ns):
    try:
        return _tag(eval(compile(src, f"<case {i}>", "eval"), ns))
    except BaseException as e:  # this case fails; the others still run
        try:
            return ("error", f"{type(e).__name__}: {e}"[:300])
        except BaseException:
            return ("error", "an exception that cannot be shown")


def execute(job):
    """Run the program as __main__, then the cases or the tests; return the report."""
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath("main.py")
    sys.modules["__main__"] = main
    ns = main.__dict__
    exec(compile(job["program"], "main.py", "exec"), ns)
    for reset in HOOK_RESETS:  # a trace hook left by the program could skip the tests' lines
        reset(None)
    if "calls" in job:
        return repr([case(src, i, ns) for i, src in enumerate(job["calls"], start=1)])
    # The tests see the builtins as they were before the program ran: a global of the program
    # that shadows a builtin (abs = lambda x: 0) is left out of their namespace.
    names = {k: v for k, v in ns.items() if k.startswith("__") or PRISTINE.get(k, v) is v}
    names["__builtins__"] = dict(PRISTINE)
    names["__srpo_plain__"] = plain
    tests = job["tests"]
    linecache.cache["tests.py"] = (len(tests), None, tests.splitlines(True), "tests.py")
    exec(compile(tests, "tests.py", "exec"), names)
    return "passed"


def main():
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
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
    except Exception as e:
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(SETUP_FAILED)
    sys.path.extend(job["site"])
    # make_finish(...) is evaluated, and held on this frame's stack, before execute() runs.
    make_finish(job.pop("marker"))(execute(job))


main()
'''
_HARNESS = (_HARNESS_SOURCE.replace("#<_tag>\n", inspect.getsource(_tag))
            .replace("#<_die_with_parent>\n", inspect.getsource(_die_with_parent)))
_SETUP_FAILED = 121
_PROBE_PROGRAM = ("import collections, decimal, hashlib, json, math\n\n"
                  "def probe():\n    return json.dumps([1])\n")
_PROBE_TESTS = "probe() == '[1]'"

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


def _run(mode: str, program: str, tests: str, cases,
         timeout: float) -> tuple[bool, str | None, str]:
    """One run of `program` and its tests in sandbox `mode` (already checked). See run_program."""
    marker = "SRPO-REPORT-" + secrets.token_hex(16)
    job = {"program": program, "marker": marker, "home": "/sandbox", "uid": -1, "gid": -1, "root": None,
           "site": [os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)]}
    if cases is None:
        job["tests"] = _harden_asserts(tests)
    else:
        job["calls"] = [call for call, _ in cases]
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
    proc, cgroup, run_dir, error, output = None, None, None, None, ""
    out = os.memfd_create("srpo-sandbox-output")
    # The harness's init sees EOF on the pipe's read end when this process (the write end) dies.
    job["lifeline"], lifeline = os.pipe()
    try:
        if namespaced:
            userns = ["--user", "--map-root-user"] if job["rootless"] else []
            prefix = [shutil.which("unshare") or "unshare", *userns, "--pid", "--fork",
                      "--kill-child", "--net", "--mount", "--ipc"]
            job["root"] = _root_plan()
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
        # No preexec_fn: the rlimits, the cgroup and the parent-death signal are the harness's
        # first lines (enter), as Python code between fork and exec is unsafe in a process with
        # threads (the trainer, when it checks the sandbox or scores inline).
        proc = subprocess.Popen(cmd, cwd="/", env=env, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                pass_fds=[job["lifeline"]])
        if job["rootless"]:  # the user's own ids, as the program will see them
            job["uid"], job["gid"] = os.getuid(), os.getgid()
        elif drop:
            job["uid"] = job["gid"] = SANDBOX_UID_BASE + proc.pid  # unique while the run lives
        try:
            proc.communicate(json.dumps(job).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            error = "timeout"
    except (OSError, subprocess.SubprocessError) as e:
        error, output = "sandbox_error", f"sandbox setup failed: {e}\n"
    finally:
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
    passed, why = _verdict(output, marker, cases) if error is None else (False, error)
    note = "" if passed else f"\n[srpo] not passed: {why}\n"
    output = output.replace(marker, "<marker>")[-(SANDBOX_FSIZE - len(note)):] + note
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
        passed, error, output = _run(mode, _PROBE_PROGRAM, _PROBE_TESTS,
                                     parse_cases(_PROBE_TESTS), timeout=5.0)
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


def run_program(program: str, tests: str, timeout: float = CODE_TIMEOUT,
                sandbox: str | None = None) -> tuple[bool, str | None, str]:
    """Run `program` and then its tests (either form, see parse_cases) in the code sandbox, mode
    `sandbox` (see check_sandbox). Returns (passed, error, output): error is "timeout" when the
    wall-clock deadline killed the run, "sandbox_error" when the sandbox could not be built (the
    program did not run), else None; output is the last SANDBOX_FSIZE characters of what it
    printed, ending with why it did not pass. Raises ValueError for malformed tests and
    SandboxUnavailable when the mode cannot run here."""
    _check_str(program, "program")
    _check_str(tests, "tests")
    cases = parse_cases(tests)
    return _run(check_sandbox(sandbox), program, tests, cases, timeout)
