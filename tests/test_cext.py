"""Building and loading rnnkit's C++ CPU kernels, and falling back to the Python loops without them.

What the kernels compute is checked in test_fused.py, which runs every fused-backend test with the
LSTM's time loops in C++ and in Python.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require_cpu_kernels

from rnnkit import LSTMCell, engine
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


@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """cext.build() against a temporary cache with a stand-in compiler: a list of the builds it ran."""
    class Runs(list):
        fail: str | None = None

    runs = Runs()
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cext, "compiler", lambda: "c++")
    monkeypatch.setattr(cext, "_key", lambda cxx: "k")

    def compile_(cxx, lib, quiet):
        runs.append(str(lib))
        if runs.fail:
            raise RuntimeError(runs.fail)
        data = b"\x7fELF a library" * 100
        cext._write_synced(lib, data)
        cext._write_synced(lib.with_name(lib.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())

    monkeypatch.setattr(cext, "_compile", compile_)
    return runs


def test_a_damaged_cached_library_is_built_again(fake_builds):
    lib = cext.build()
    assert len(fake_builds) == 1 and cext.build() == lib and len(fake_builds) == 1
    lib.write_bytes(lib.read_bytes()[:50])  # truncated (a crash mid-write, a full disk)
    assert cext.build() == lib and len(fake_builds) == 2
    lib.with_name(lib.name + ".sha256").unlink()  # a library without its record is not trusted either
    cext.build()
    assert len(fake_builds) == 3


def test_a_failed_build_is_remembered_until_retried(fake_builds):
    fake_builds.fail = "c++ failed (exit 1): boom"
    with pytest.raises(RuntimeError, match="boom"):
        cext.build()
    with pytest.raises(RuntimeError, match="an earlier build failed: c.. failed .exit 1.: boom .*rnnkit kernels"):
        cext.build()
    assert len(fake_builds) == 1  # the second process did not compile again
    fake_builds.fail = None
    lib = cext.build(retry=True)
    assert len(fake_builds) == 2 and lib.is_file() and not (lib.parent / "failed.txt").exists()


def test_temporaries_of_a_killed_build_are_cleared(fake_builds):
    folder = cext.cache_dir() / "kernels" / "k"
    folder.mkdir(parents=True)
    (folder / ".tmp-abc.so").write_bytes(b"half")
    cext.build()
    assert not list(folder.glob(".tmp-*"))


def test_a_cxx_that_is_not_a_program_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++") + " -O2")
    assert cext.compiler() == str(tmp_path / "no-such-c++") + " -O2"
    with pytest.raises(RuntimeError, match="no-such-c.. -O2.*not a program on the PATH"):
        cext.build()


def test_a_compiler_past_its_time_is_stopped(monkeypatch, tmp_path):
    cxx = tmp_path / "slow-c++"
    cxx.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo slow 1.0; exit 0; fi\nsleep 30 & wait\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setattr(cext, "_BUILD_SECONDS", 1)
    with pytest.raises(RuntimeError, match="took over 1 s and was stopped"):
        cext.build()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_the_kernels_check_their_arguments_sizes():
    ops = require_cpu_kernels()
    T, N, H = 3, 2, 4
    G = torch.zeros(T, N, 4 * H)
    hs, cs, h0, whh = torch.zeros(T - 1, N, H), torch.zeros(T, N, H), torch.zeros(N, H), torch.zeros(4 * H, H)
    none = torch.empty(0, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="hs has shape \\[2, 2, 4\\], expected \\[3, 2, 4\\]"):
        ops.lstm_forward_steps(G, hs, cs, cs, torch.zeros(T, N, 3), h0, h0, torch.zeros(4 * H, 3), whh, None, none,
                               T, True, False)
    with pytest.raises(RuntimeError, match="tcs has shape \\[2, 2, 4\\]"):
        ops.lstm_forward_steps(G, cs, cs, hs, torch.zeros(T, N, 3), h0, h0, torch.zeros(4 * H, 3), whh,
                               torch.zeros(4 * H), none, T, True, False)
    with pytest.raises(RuntimeError, match="x must be a \\(T, N, I\\) CPU tensor .* features are contiguous"):
        ops.lstm_forward_steps(G, cs, cs, None, torch.zeros(T, 3, N).transpose(1, 2), h0, h0, torch.zeros(4 * H, 3),
                               whh, torch.zeros(4 * H), none, T, True, False)
    x = torch.zeros(T, N, 3)
    with pytest.raises(RuntimeError, match="x, hs and dW come together \\(and h0 only with them\\)"):
        ops.lstm_backward_steps(G, cs, h0, None, G, cs, h0, None, None, h0, whh, None, None, none, T, 0, T, False,
                                x=x, hs=cs, h0=h0)
    with pytest.raises(RuntimeError, match="dW must be \\(at least 1 blocks, I \\(\\+ 1 with a bias\\) \\+ H, 4H\\)"):
        ops.lstm_backward_steps(G, cs, h0, None, G, cs, h0, None, None, h0, whh, None, None, none, T, 0, T, False,
                                x=x, hs=cs, h0=h0, dW=torch.zeros(1, 3 + 2 + H, 4 * H))
    with pytest.raises(RuntimeError, match="gh must be a CPU tensor of G's dtype whose units are contiguous"):
        ops.lstm_backward_steps(G, cs, h0, None, G, cs, h0, None, torch.zeros(T, H, N).transpose(1, 2), h0, whh,
                                None, None, none, T, 0, T, False)
    with pytest.raises(RuntimeError, match="w_hh has shape"):
        ops.lstm_backward_steps(G, cs, h0, None, G, cs, h0, None, None, h0, torch.zeros(H, 4 * H), None, None, none,
                                T, 0, T, False)
    with pytest.raises(RuntimeError, match="whh has shape"):
        ops.gru_forward_steps(torch.zeros(T, N, 3 * H), cs, cs, cs, h0, whh, torch.zeros(3 * H), none, T, True,
                              False)


@pytest.mark.parametrize("state", ["given", "zero"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "N, I, H, bias, chunk",
    [(300, 5, 3, True, 6), (7, 1, 20, False, 2), (64, 28, 64, True, 4), (13, 40, 37, True, 5)],
    ids=["deep_blocks_all_tail", "no_bias_chunks", "whole_vectors_chunks", "tails"],
)
def test_the_backward_sums_the_weight_gradient_as_it_goes(N, I, H, bias, chunk, threads, state):
    """The LSTM backward's weight gradient, summed by each block of rows a few steps at a time and added
    up at the end, is [x_t, 1, h_{t-1}]^T dG_t over all steps: blocks deeper than one group (300 rows),
    4H below a vector (every column one by one) and past whole vectors, chunks of steps that carry the
    sums on, no bias, one thread and two, an input read in place from a batch-first tensor, and a zero
    initial state passed as none (its step then adds nothing to W_hh's part)."""
    ops = require_cpu_kernels()
    T, dtype = 6, torch.float64
    torch.manual_seed(0)
    x = torch.randn(N, T, I, dtype=dtype).transpose(0, 1)  # batch-first, read in place
    h0, c0 = torch.randn(N, H, dtype=dtype) * (state == "given"), torch.randn(N, H, dtype=dtype)
    w_ih, w_hh = torch.randn(4 * H, I, dtype=dtype) * 0.3, torch.randn(4 * H, H, dtype=dtype) * 0.3
    b = torch.randn(4 * H, dtype=dtype) if bias else None
    G = torch.empty(T, N, 4 * H, dtype=dtype)
    hs, cs = torch.empty(T, N, H, dtype=dtype), torch.empty(T, N, H, dtype=dtype)
    none = torch.empty(0, dtype=torch.bool)
    K = I + bias + H
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.lstm_forward_steps(G, hs, cs, None, x, h0, c0, w_ih, w_hh, b, none, T, state == "zero", False)
        gh = torch.randn(T, N, H, dtype=dtype)
        dc, carry = torch.zeros(N, H, dtype=dtype), torch.empty(N, H, dtype=dtype)
        DH = torch.empty(2, N, H, dtype=dtype)
        dW = torch.full((threads, K, 4 * H), float("nan"), dtype=dtype)
        for hi in range(T, 0, -chunk):
            lo = max(0, hi - chunk)
            ops.lstm_backward_steps(G, cs, c0, None, G[lo:hi], DH, dc, None, gh[lo:hi], carry, w_hh, None, None, none,
                                    T, lo, hi, False, x=x, hs=hs, h0=h0 if state == "given" else None, dW=dW)
    finally:
        torch.set_num_threads(before)
    rows = [x, *([torch.ones(T, N, 1, dtype=dtype)] if bias else []), torch.cat((h0[None], hs[:-1]))]
    xh = torch.cat(rows, 2).reshape(T * N, K)
    torch.testing.assert_close(dW[0], xh.t() @ G.reshape(T * N, 4 * H), rtol=1e-10, atol=1e-10)


def test_an_unwritable_home_cache_falls_back_to_the_temporary_directory(fake_builds, monkeypatch, tmp_path):
    monkeypatch.delenv("RNNKIT_CACHE_DIR")
    blocked = tmp_path / "home-cache"
    blocked.write_text("a file where the cache directory should be")  # mkdir below it fails, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(cext.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = cext.build()
    assert lib.is_relative_to(tmp_path / "tmp") and len(fake_builds) == 1
    assert cext.build() == lib and len(fake_builds) == 1


def test_the_temporary_fallback_refuses_a_folder_others_can_write(fake_builds, monkeypatch, tmp_path):
    monkeypatch.delenv("RNNKIT_CACHE_DIR")
    blocked = tmp_path / "home-cache"
    blocked.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(cext.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    planted = tmp_path / "elsewhere"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    (tmp_path / "tmp" / f"rnnkit-{os.getuid()}").symlink_to(planted)  # someone's trap
    with pytest.raises(RuntimeError, match="not a directory of this user's.*RNNKIT_CACHE_DIR"):
        cext.build()
    (tmp_path / "tmp" / f"rnnkit-{os.getuid()}").unlink()
    (tmp_path / "tmp" / f"rnnkit-{os.getuid()}").mkdir(mode=0o777)
    (tmp_path / "tmp" / f"rnnkit-{os.getuid()}").chmod(0o777)
    with pytest.raises(RuntimeError, match="group- or world-writable"):
        cext.build()
    assert not fake_builds


def test_openmp_only_when_torch_runs_on_gnu_openmp(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "library_paths", lambda: [str(tmp_path)])  # a torch without libgomp beside it
    cext._flags.cache_clear()
    try:
        assert "-fopenmp" not in cext._flags()
        assert not cext.threaded()  # and the LSTM policy does not count on the kernels' threads
        assert not engine.fused_lstm_trains_faster(LSTMCell(28, 128), torch.zeros(1), 128)
        cext._flags.cache_clear()
        (tmp_path / "libgomp-a34b3233.so.1").write_bytes(b"")
        assert "-fopenmp" in cext._flags()
        assert cext.threaded()
    finally:
        cext._flags.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["avx2", "sse", "plain"])
def test_the_kernels_without_avx_build_and_agree(variant, tmp_path):
    """The kernels' other vector paths, built here without AVX-512: AVX2 (8 floats a vector), and
    without AVX: SSE (4 floats a vector, the reciprocal estimate, which needs FMA, replaced by a
    division) and plain C++ vectors (no intrinsics, as on AArch64). They must build, load, and pass
    the fused tests of tiles, chunks and partial losses."""
    require_cpu_kernels()
    flags = cext._cpu_flags().split()
    if variant == "avx2" and not {"avx512f", "avx2"} <= set(flags):
        pytest.skip("an AVX2 build made here by leaving AVX-512 out needs a processor with both")
    if "sse2" not in flags:
        pytest.skip("these builds turn x86 vector extensions off: an x86 processor's")
    cxx = cext.compiler()
    lib = tmp_path / "cache" / "kernels" / cext._key(cxx) / "rnnkit_cpu.so"
    lib.parent.mkdir(parents=True)
    extra = ["-mno-avx512f"] if variant == "avx2" else ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-avx512f"]
    if variant == "plain":
        extra += ["-U__SSE__", "-U__SSE2__"]
    built = subprocess.run([*cext._command(cxx, lib), *extra], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    lib.with_name(lib.name + ".sha256").write_text(cext._digest(lib))
    env = {**os.environ, "RNNKIT_CACHE_DIR": str(tmp_path / "cache")}
    where = subprocess.run([sys.executable, "-c", "from rnnkit.backends import cext; print(cext.build())"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert where.stdout.strip() == str(lib), where.stderr  # these tests load this build, not the usual one
    for name, pick in (("test_fused.py", ["-k", "tiles or chunked or partial or zero_initial or frozen"]),
                       ("test_traced.py", [])):  # the traced cells' loops, whole
        tests = Path(__file__).with_name(name)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), *pick],
                             capture_output=True, text=True, timeout=900, env=env, cwd=tests.parent.parent)
        assert run.returncode == 0, run.stdout[-3000:]
        assert " passed" in run.stdout.splitlines()[-1]
