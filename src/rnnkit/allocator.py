"""Keep glibc's malloc from handing training memory back to the kernel after every step.

On Linux, PyTorch's CPU tensors come from glibc's ``malloc``. Blocks above a threshold (128 KiB,
raised dynamically up to 32 MiB) are mapped fresh from the kernel and unmapped when freed, and the
heap's free top is trimmed back: a training step that allocates the same large buffers every time
then pays a page fault for every 4 KiB page of them, every step. Measured on a 2-core AMD EPYC
(Zen 5) with torch 2.13.0, one ``torch.nn.LSTM`` forward and backward:

* T=784, B=128, H=128: 553-592 ms with 191,000 page faults per step (half of it kernel time),
  239-263 ms with the settings below and no page faults;
* T=28, B=256, H=128: 30-42 ms (9,000 faults per step) against 16.5-18 ms;
* T=28, B=128, H=128: the same either way (its 7 MB of buffers stay below the threshold).

:func:`tune_allocator` sets ``M_MMAP_MAX = 0`` (every block comes from the heap, so freed memory
is reused) and ``M_TRIM_THRESHOLD`` to 1 GiB (freed memory stays in the process up to that much)
with ``mallopt``: the process keeps its peak heap instead of returning it between steps, which is
what jemalloc and tcmalloc do and what PyTorch's CPU tuning guide recommends them for.
:func:`restore_allocator` hands memory back again, at the thresholds glibc's own dynamic rule
settles on (glibc cannot return to its start-up rule; see the note at ``_CEILING_MMAP_THRESHOLD``).

These are process-wide settings of the C library, so rnnkit never changes them behind a caller's
back: rnnkit's :class:`~rnnkit.train.trainer.Trainer` applies them for the duration of ``fit`` on
the CPU and undoes them afterwards (``Trainer(tune_allocator=False)`` or ``train.tune_allocator =
false`` in a config turns that off), and a program of one's own can call :func:`tune_allocator`
once. The layers leave malloc alone; without the tuning their native backend runs long sequences
as a chain of shorter kernel calls instead (:func:`rnnkit.backends.native.chunk_steps`).

Nothing happens on a C library other than glibc, when ``RNNKIT_TUNE_MALLOC=0`` is set, or when the
environment already sets glibc's thresholds (``MALLOC_MMAP_MAX_`` and its siblings, or their
``GLIBC_TUNABLES``): the user's choice stands. Blocks nest and count: the settings stay in force
until the last open :func:`tuned_allocator` block ends (two trainers in two threads), and for good
after :func:`tune_allocator` until :func:`restore_allocator`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator

__all__ = ["tune_allocator", "restore_allocator", "allocator_tuned", "tuned_allocator"]

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
# Any mallopt call switches glibc's dynamic thresholds off for good, so "restore" cannot bring back
# the start-up values (128 KiB, which the dynamic rule raises as soon as large blocks are freed).
# It sets the ceiling the dynamic rule reaches instead (32 MiB to mmap, twice that to trim), where a
# process that has trained anything sits anyway. Restoring 128 KiB statically would map and fault
# every large tensor afresh, slower than before: the seed002 plain nn.LSTM loop (800 steps, B128)
# trained in 9.2 s in a fresh process, 20.0 s after such a restore and 8.6 s after this one.
# malloc_trim(0) then hands the free heap back at once.
_CEILING_MMAP_THRESHOLD, _CEILING_TRIM_THRESHOLD = 32 << 20, 64 << 20
_TUNED_TRIM_THRESHOLD = 1 << 30

_GLIBC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_GLIBC_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
                   "glibc.malloc.top_pad")

_lock = threading.Lock()
# applied: rnnkit's settings are in force; blocks: open tuned_allocator() blocks that count on them;
# kept: tune_allocator() asked for them beyond any block.
_state = {"applied": False, "blocks": 0, "kept": False}
_libc: ctypes.CDLL | None = None


def _user_has_chosen() -> bool:
    """The environment already configures glibc malloc's thresholds, or asks rnnkit to leave it alone."""
    if os.environ.get("RNNKIT_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(k in os.environ for k in _GLIBC_VARIABLES) or any(t in tunables for t in _GLIBC_TUNABLES)


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None on another C library or platform."""
    global _libc
    if _libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return None
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return None
    return _libc


def _env_tuned() -> bool:
    """Whether the environment itself keeps large blocks out of mmap (e.g. ``MALLOC_MMAP_MAX_=0``)."""
    return os.environ.get("MALLOC_MMAP_MAX_", "").strip() == "0" or "glibc.malloc.mmap_max=0" in os.environ.get(
        "GLIBC_TUNABLES", "")


def _apply() -> bool:
    """Put rnnkit's settings in force (under the lock); False where they cannot or should not be."""
    if _state["applied"]:
        return True
    libc = None if _user_has_chosen() else _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TUNED_TRIM_THRESHOLD) == 1
    _state["applied"] = True
    if not ok:  # half applied: undo what did take
        _undo()
    return ok


def _undo() -> None:
    """Take rnnkit's settings out of force (under the lock) and hand free heap back to the kernel."""
    if not _state["applied"]:
        return
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _CEILING_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _CEILING_TRIM_THRESHOLD)
        libc.malloc_trim(0)
    _state["applied"] = False


def tune_allocator() -> bool:
    """Keep freed memory in the process for reuse, until :func:`restore_allocator`; True if in force."""
    with _lock:
        ok = _apply()
        _state["kept"] = ok
        return ok


def restore_allocator() -> None:
    """Undo :func:`tune_allocator` (at once, or when the last open :func:`tuned_allocator` block ends)."""
    with _lock:
        _state["kept"] = False
        if _state["blocks"] == 0:
            _undo()


def allocator_tuned() -> bool:
    """Whether large CPU buffers are reused rather than mapped afresh (by rnnkit or by the environment)."""
    return _state["applied"] or _env_tuned()


@contextlib.contextmanager
def tuned_allocator(enabled: bool = True) -> Iterator[bool]:
    """Tune the allocator for the block; undone when the last block ends, unless :func:`tune_allocator` kept it."""
    if not enabled:
        yield allocator_tuned()
        return
    with _lock:
        _state["blocks"] += 1
        _apply()
    try:
        yield allocator_tuned()
    finally:
        with _lock:
            _state["blocks"] -= 1
            if _state["blocks"] == 0 and not _state["kept"]:
                _undo()
