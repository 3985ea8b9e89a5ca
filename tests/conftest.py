"""Shared test setup.

Triton picks between compiling for a GPU and its CPU interpreter when a kernel is *defined*, so
TRITON_INTERPRET must be set before anything imports `srpo_kernels`. Without a GPU we always interpret.
"""
import os
import shutil
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project's modules live at the repository root, next to tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The reason GPU-only tests are skipped without a GPU: the one skip --only-gpu-skips allows.
GPU_SKIP = "needs a CUDA GPU"


@pytest.fixture
def one_thread():
    """One intra-op thread for a module of tiny-model tests (opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain nothing from threads, and
    on a loaded 2-core machine OpenMP's barriers make every small op ~1000x slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--only-gpu-skips", action="store_true",
                     help=f"fail the run if a test is skipped for any reason but {GPU_SKIP!r} (.ci/run)")


class OnlyGpuSkips:
    """--only-gpu-skips: a test skipped for another reason (a missing package, most often) fails
    the run, listed with its reason: a missing install step cannot hide behind a green run."""

    def __init__(self):
        self.offending = []   # "test id: reason"

    def _record(self, report):
        # A skip's report, at collection or in a test, holds (file, line, reason). An xfail is no skip.
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            if reason != GPU_SKIP:
                self.offending.append(f"{report.nodeid}: {reason}")

    pytest_runtest_logreport = pytest_collectreport = _record

    def pytest_sessionfinish(self, session):
        # Every test skipped at collection reads "no tests collected" (5): a failure too, named so.
        if self.offending and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.offending:
            title = f"--only-gpu-skips: skipped for a reason other than {GPU_SKIP!r} (the run fails)"
            terminalreporter.section(title, red=True)
            terminalreporter.line("\n".join(self.offending))


def pytest_configure(config):
    if config.getoption("only_gpu_skips"):
        config.pluginmanager.register(OnlyGpuSkips(), "only_gpu_skips")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is present")
    config.addinivalue_line("markers", "cxx: torch.compile for the CPU, which needs a C++ compiler; skipped without one")
    config.addinivalue_line("markers", "rootless: runs only without root (as root, the sandbox's nobody test runs it)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason=GPU_SKIP)
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        skips["cxx"] = pytest.mark.skip(reason="torch.compile on a CPU needs a C++ compiler")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)
    if os.geteuid() == 0:
        # 'rootless' tests check what a user who is not root gets; as root they are not collected
        # (a skip would fail .ci/run) because test_the_sandbox_tests_pass_for_a_user_who_is_not_root
        # runs them as nobody, where they must pass.
        rootless = [item for item in items if item.get_closest_marker("rootless")]
        if rootless:
            config.hook.pytest_deselected(items=rootless)
            items[:] = [item for item in items if not item.get_closest_marker("rootless")]
