"""Shared fixtures and helpers of rnnkit's tests (cells, engine, fpmode)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import rnnkit.fpmode as fpmode
from rnnkit.backends import fused, native, reference

# Without a GPU the triton backend's kernels run in Triton's CPU interpreter (tests/test_triton.py),
# which must be switched on before anything imports Triton (torch._dynamo does): triton.language's
# own functions are made interpreted or compiled when it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/harness.py is importable as `harness` from every test module.
sys.path.insert(0, os.path.dirname(__file__))

#: the concrete backends every engine test runs on ("auto" picks one of these)
BACKENDS = ["reference", "native", "fused"]
BACKEND_MODULES = {"reference": reference, "native": native, "fused": fused}


def require_backend(backend: str, cell: nn.Module, x: torch.Tensor) -> None:
    """Skip the test only when the backend itself says it cannot run ``cell`` on ``x``."""
    reason = BACKEND_MODULES[backend].unsupported(cell, x)
    if reason:
        pytest.skip(f"backend {backend!r} does not support {type(cell).__name__}: {reason}")


def require_cpu_kernels() -> object:
    """rnnkit's C++ kernels; the test is skipped only where they cannot be built at all.

    No C++ compiler, or ``RNNKIT_CPU_KERNELS=0``, is a skip that says so; a compiler whose build
    fails is a test failure with the compiler's message.
    """
    from rnnkit.backends import cext

    ops = cext.ops()
    if ops is None:
        why = cext.unavailable()
        if cext.compiler() is None or cext.disabled():
            pytest.skip(f"rnnkit's C++ CPU kernels are unavailable here: {why}")
        pytest.fail(f"rnnkit's C++ CPU kernels did not build: {why}")
    return ops


@pytest.fixture(params=["cpp", "python"])
def lstm_loops(request, monkeypatch) -> str:
    """The fused LSTM's time loops: the C++ kernels, then the Python loops they replace."""
    if request.param == "cpp":
        require_cpu_kernels()
    else:
        monkeypatch.setattr(fused, "_USE_KERNELS", False)
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread: the tensors are tiny, and on a small, busy machine
    OpenMP's thread hand-off costs milliseconds per op (LayerNorm ran 500x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_fpmode():
    """Restore the thread's denormal mode and rnnkit's flushing switch after the test."""
    was_flushed, was_enabled = fpmode.denormals_are_flushed(), fpmode.flush_denormals_enabled()
    yield
    torch.set_flush_denormal(was_flushed)
    fpmode.set_flush_denormals(was_enabled)
