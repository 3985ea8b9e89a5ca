"""Shared test setup.

Triton picks between compiling for a GPU and its CPU interpreter when a kernel is *defined*, so
TRITON_INTERPRET must be set before anything imports `kernels`. Without a GPU we always interpret.
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


@pytest.fixture
def one_thread():
    """One intra-op thread for a module of tiny-model tests (opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models gain nothing from threads, and
    on a loaded 2-core machine OpenMP's barriers make every small op ~1000x slower. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is present")
    config.addinivalue_line("markers", "cxx: torch.compile for the CPU, which needs a C++ compiler; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        skips["cxx"] = pytest.mark.skip(reason="torch.compile on a CPU needs a C++ compiler")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)
