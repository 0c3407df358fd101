"""rnnkit's C++ kernels for the CPU: built once per machine with the system's C++ compiler, then loaded.

The fused backend's LSTM and GRU time loops (``csrc/fused_cpu.cpp``) run in C++ when these kernels are
available and in Python otherwise; both paths give the same results to rounding and are tested
against each other. The library is compiled for the processor it runs on (``-march=native``) into
a cache directory keyed by the source, torch's version, the compiler and the processor's flags:
``$RNNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/rnnkit``, else ``~/.cache/rnnkit`` (and the system's
temporary directory when that cannot be written). A build takes 10-30 seconds (8-10 on a Zen 5, 25
on a Zen 3 with g++ 12); ``make`` does it at set-up (``rnnkit kernels``), and otherwise the first
call that wants the kernels does it, once. Concurrent builders wait on a file lock, and
the library is renamed into place whole, so a reader never loads a half-written file.

Nothing here is required: with no compiler, an unwritable cache, a failed build or
``RNNKIT_CPU_KERNELS=0``, :func:`ops` returns None and :func:`unavailable` says why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["ops", "unavailable", "build", "cache_dir", "compiler", "disabled"]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "fused_cpu.cpp"
_NAMESPACE = "rnnkit_cpu"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-w")
_BUILD_SECONDS = 300  # a build past this is abandoned (a wedged compiler must not hang training)

_lock = threading.Lock()
_state: dict[str, Any] = {}


def disabled() -> bool:
    """Whether ``RNNKIT_CPU_KERNELS=0`` (or false/no/off) turns the kernels off."""
    return os.environ.get("RNNKIT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("RNNKIT_CACHE_DIR"):
        return Path(os.environ["RNNKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnkit"


def compiler() -> str | None:
    """The C++ compiler command builds use: ``$CXX`` as given (``ccache g++`` works), else the first
    of c++, g++, clang++ on the PATH; None when there is none."""
    if os.environ.get("CXX", "").strip():
        return os.environ["CXX"].strip()
    return next((name for name in ("c++", "g++", "clang++") if shutil.which(name)), None)


def _cpu_flags() -> str:
    """The processor's feature flags (``-march=native`` code must not run on another processor)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


@functools.cache
def _flags() -> tuple[str, ...]:
    """The compiler's flags: with GNU OpenMP only when torch runs on it (libgomp beside its libraries).

    The kernels split the batch's rows over torch's threads through ATen's OpenMP header; a torch
    built on another OpenMP runtime (Intel's, LLVM's) would meet a second runtime in the same
    process, so there the kernels are built without it and run whole loops on one thread.
    """
    from torch.utils.cpp_extension import library_paths

    beside = any(any(Path(d).glob("libgomp*.so*")) for d in library_paths())
    gnu = beside and "OpenMP" in torch.__config__.parallel_info()
    return (*_FLAGS, "-fopenmp") if gnu else _FLAGS


def threaded() -> bool:
    """Whether the kernels run on torch's threads (built with OpenMP) rather than on one thread."""
    return "-fopenmp" in _flags()


def _argv(cxx: str) -> list[str]:
    argv = shlex.split(cxx)
    if not argv or shutil.which(argv[0]) is None:
        raise RuntimeError(f"the C++ compiler {cxx!r} (from $CXX) is not a program on the PATH")
    return argv


def _key(cxx: str) -> str:
    version = subprocess.run([*_argv(cxx), "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [_SOURCE.read_bytes().decode(), torch.__version__, version, _cpu_flags(), " ".join(_flags()),
             str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.platform]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    return [*_argv(cxx), *_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{p}" for p in include_paths()), str(_SOURCE), "-o", str(out),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


@contextlib.contextmanager
def _file_lock(path: Path):  # noqa: ANN202
    """An exclusive lock on ``path`` across processes (where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux or macOS
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _private_dir(path: Path) -> Path:
    """``path`` as a directory of this user's that no one else can write to, made so if it is not there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is not a directory of this user's that only it can write (a symlink, another "
                           "user's, or group- or world-writable): set RNNKIT_CACHE_DIR to a directory of your own")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    """``data`` into ``path`` whole: written beside it, flushed to disk, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _intact(lib: Path) -> bool:
    """Whether ``lib`` is the library a finished build wrote (its recorded SHA-256 matches)."""
    record = lib.with_name(lib.name + ".sha256")
    try:
        return lib.is_file() and record.read_text().strip() == _digest(lib)
    except OSError:
        return False


def _compile(cxx: str, lib: Path, quiet: bool) -> None:
    """Run the compiler into a temporary file, then put the library and its checksum in place."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent, prefix=".tmp-")
    os.close(fd)
    try:
        start = time.perf_counter()
        if not quiet:
            print(f"rnnkit: building the CPU kernels with {cxx} (once per machine)", file=sys.stderr)
        # its own process group: a time-out kills the compiler's children too, not just the driver
        proc = subprocess.Popen(_command(cxx, Path(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=_BUILD_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{cxx} took over {_BUILD_SECONDS} s and was stopped") from None
        if proc.returncode != 0:
            tail = (err or out).strip().splitlines()[-5:]
            raise RuntimeError(f"{cxx} failed (exit {proc.returncode}): " + " | ".join(tail))
        data = Path(tmp).read_bytes()
        _write_synced(lib, data)
        _write_synced(lib.with_name(lib.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
        if not quiet:
            print(f"rnnkit: built {lib} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build(quiet: bool = True, retry: bool = False, force: bool = False) -> Path:
    """Compile the kernels for this machine unless an intact build is cached; return the library's path.

    A failed build is remembered (``failed.txt`` beside it) so that later processes do not pay for
    it again; ``retry=True`` (``rnnkit kernels``) tries again. ``force=True`` builds
    even over an intact library (one that did not load).
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        raise RuntimeError(f"rnnkit builds its CPU kernels on Linux only (this is {sys.platform} {platform.machine()})")
    if not _SOURCE.is_file():
        raise RuntimeError(f"the kernels' source {_SOURCE} is missing from this installation")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    key = _key(cxx)
    folder = cache_dir() / "kernels" / key
    lib, failed = folder / "rnnkit_cpu.so", folder / "failed.txt"
    if not force and _intact(lib):
        return lib
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "build.lock").touch()
    except OSError:
        if os.environ.get("RNNKIT_CACHE_DIR"):
            raise
        # a home directory one cannot write to (some CI runners): the system's temporary directory,
        # in a folder only this user can write (anyone who can could plant a library for us to load)
        folder = _private_dir(Path(tempfile.gettempdir()) / f"rnnkit-{os.getuid()}") / "kernels" / key
        lib, failed = folder / "rnnkit_cpu.so", folder / "failed.txt"
        if not force and _intact(lib):
            return lib
        folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / "build.lock"):
        if not force and _intact(lib):  # another process built it while this one waited
            return lib
        if not (force or retry) and failed.is_file():
            raise RuntimeError(f"an earlier build failed: {failed.read_text().strip()} "
                               "(`rnnkit kernels` tries again)")
        for stale in folder.glob(".tmp-*"):  # left by a build that was killed (none runs: we hold the lock)
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            _compile(cxx, lib, quiet)
        except RuntimeError as e:
            with contextlib.suppress(OSError):
                _write_synced(failed, str(e).encode())
            raise
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()
    return lib


def _load() -> Any:
    if disabled():
        raise RuntimeError("turned off by RNNKIT_CPU_KERNELS=0")
    if not hasattr(torch.ops, _NAMESPACE) or not hasattr(getattr(torch.ops, _NAMESPACE), "lstm_forward_steps"):
        lib = build(quiet=False)
        try:
            torch.ops.load_library(str(lib))
        except (OSError, RuntimeError):  # a library that passed its checksum but does not load: build it anew
            torch.ops.load_library(str(build(quiet=False, force=True)))
    return getattr(torch.ops, _NAMESPACE)


def ops() -> Any | None:
    """The loaded kernels (``torch.ops.rnnkit_cpu``), building them on first use; None if unavailable."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                try:
                    _state["ops"], _state["why"] = _load(), None
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    _state["ops"], _state["why"] = None, str(e)
    return _state["ops"]


def unavailable() -> str | None:
    """Why the C++ kernels cannot be used here, or None when they can."""
    ops()
    return _state["why"]


def main() -> int:
    """Build (or retry building) the kernels and say where they are: ``rnnkit kernels``; 0 when ready."""
    if disabled():
        print("rnnkit: the CPU kernels are turned off (RNNKIT_CPU_KERNELS=0); the Python loops run", file=sys.stderr)
        return 1
    try:
        path = build(quiet=False, retry=True)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"rnnkit: CPU kernels not built, the Python loops will run instead: {e}", file=sys.stderr)
        return 1
    print(f"rnnkit: CPU kernels ready ({path})")
    return 0
