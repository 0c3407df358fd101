"""Building and loading rnnkit's C++ CPU kernels, and falling back to the Python loops without them.

What the kernels compute is checked in test_fused.py, which runs every fused-backend test with the
LSTM's time loops in C++ and in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require_cpu_kernels

from rnnkit.backends import cext

# A fused LSTM forward and backward against the reference loop, and what cext says about itself.
_PROBE = textwrap.dedent(
    """
    import torch, rnnkit
    from rnnkit.backends import cext
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(3, 4)
    x = torch.randn(5, 2, 3)
    grads = []
    for backend in ("fused", "reference"):
        out = rnnkit.unroll(cell, x, backend=backend, batch_first=False).outputs
        grads.append(torch.autograd.grad(out.square().sum(), list(cell.parameters())))
    agree = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    print("ops", cext.ops() is not None, "agree", agree)
    print("why", cext.unavailable())
    """
)


def _probe(tmp_path: Path, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RNNKIT_CACHE_DIR": str(tmp_path / "cache"), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kernels_build_once_and_are_reused():
    require_cpu_kernels()
    path = cext.build()
    assert path.is_file() and path.parent.parent == cext.cache_dir() / "kernels"
    stamp = path.stat().st_mtime_ns
    assert cext.build() == path and path.stat().st_mtime_ns == stamp  # no second build
    assert not [p for p in path.parent.iterdir() if p.suffix == ".so" and p != path]  # no temporaries left


def test_turned_off_by_the_environment(tmp_path):
    out = _probe(tmp_path, RNNKIT_CPU_KERNELS="0")
    assert "ops False agree True" in out
    assert "RNNKIT_CPU_KERNELS=0" in out
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_a_failing_compiler_falls_back_to_the_python_loops(tmp_path):
    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                   "echo 'fused_cpu.cpp:1: error: boom' >&2\nexit 1\n")
    cxx.chmod(0o755)
    out = _probe(tmp_path, CXX=str(cxx))
    assert "ops False agree True" in out
    assert "failed (exit 1)" in out and "boom" in out
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-built library left to load


def test_no_compiler_is_a_clear_reason(monkeypatch):
    monkeypatch.setattr(cext, "compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C.. compiler found"):
        cext.build()


def test_the_cache_key_follows_the_source(tmp_path, monkeypatch):
    if cext.compiler() is None:
        pytest.skip("no C++ compiler here to key a build by")
    before = cext._key(cext.compiler())
    copy = tmp_path / "fused_cpu.cpp"
    copy.write_text(cext._SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(cext, "_SOURCE", copy)
    assert cext._key(cext.compiler()) != before


def test_concurrent_first_builds_share_one_library(tmp_path):
    require_cpu_kernels()
    code = "from rnnkit.backends import cext; print(cext.build())"
    env = {**os.environ, "RNNKIT_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    built = list(tmp_path.rglob("*.so"))
    assert [str(p) for p in built] == list(paths)  # one library, no stray temporaries
    assert built[0].stat().st_size > 0
