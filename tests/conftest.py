"""Shared test setup.

Triton picks between compiling for a GPU and its CPU interpreter when a kernel is *defined*, so
TRITON_INTERPRET must be set before anything imports `kernels`. Without a GPU we always interpret.
"""
import os
import shutil
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project's modules live at the repository root, next to tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is present")
    config.addinivalue_line("markers", "cxx: torch.compile for the CPU, which needs a C++ compiler; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    import pytest
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        skips["cxx"] = pytest.mark.skip(reason="torch.compile on a CPU needs a C++ compiler")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)
