"""rnnkit.allocator: the glibc malloc settings, who applies them, and that they are put back."""

from __future__ import annotations

import platform

import pytest
import torch

from rnnkit import allocator
from rnnkit.models import SequenceClassifier
from rnnkit.train.batching import Batches
from rnnkit.train.trainer import Callback, Trainer


class FakeLibc:
    """Records mallopt and malloc_trim calls; answers 1 (success) as glibc does, or 0 for ``refuse``."""

    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == self.refuse else 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    for name in (*allocator._GLIBC_VARIABLES, "RNNKIT_TUNE_MALLOC", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for key, value in (("applied", False), ("blocks", 0), ("kept", False)):
        monkeypatch.setitem(allocator._state, key, value)
    yield fake


def test_tune_and_restore_set_the_documented_options(libc):
    assert not allocator.allocator_tuned()
    assert allocator.tune_allocator()
    assert libc.calls == [(-4, 0), (-1, 1 << 30)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB
    assert allocator.allocator_tuned()
    assert allocator.tune_allocator()  # idempotent: no second round of calls
    assert len(libc.calls) == 2
    allocator.restore_allocator()
    assert libc.calls[2:] == [(-4, 65536), (-3, 32 << 20), (-1, 64 << 20), ("trim", 0)]
    assert not allocator.allocator_tuned()
    allocator.restore_allocator()  # nothing to undo
    assert len(libc.calls) == 6


def test_a_half_applied_tuning_is_undone(libc):
    libc.refuse = -1  # the trim threshold does not take
    assert not allocator.tune_allocator()
    assert not allocator.allocator_tuned()
    assert libc.calls[:2] == [(-4, 0), (-1, 1 << 30)]
    assert (-4, 65536) in libc.calls[2:]  # M_MMAP_MAX put back


@pytest.mark.parametrize("name, value", [("RNNKIT_TUNE_MALLOC", "0"), ("MALLOC_TRIM_THRESHOLD_", "1000"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000")])
def test_the_environment_wins(libc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not allocator.tune_allocator()
    with allocator.tuned_allocator():
        pass
    assert libc.calls == []


def test_environment_that_already_tunes_counts_as_tuned(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert allocator.allocator_tuned() and not allocator.tune_allocator()


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setitem(allocator._state, "applied", False)
    monkeypatch.delenv("RNNKIT_TUNE_MALLOC", raising=False)
    assert not allocator.tune_allocator()
    assert not allocator.allocator_tuned()


def test_blocks_count_and_tune_allocator_keeps(libc):
    outer = allocator.tuned_allocator()
    inner = allocator.tuned_allocator()
    assert outer.__enter__() and inner.__enter__()
    outer.__exit__(None, None, None)  # another block (a second trainer's fit) is still open
    assert allocator.allocator_tuned()
    inner.__exit__(None, None, None)
    assert not allocator.allocator_tuned()
    with allocator.tuned_allocator():  # tune_allocator() inside a block keeps the settings after it
        allocator.tune_allocator()
    assert allocator.allocator_tuned()
    with allocator.tuned_allocator():  # restore_allocator() inside a block takes effect when it ends
        allocator.restore_allocator()
        assert allocator.allocator_tuned()
    assert not allocator.allocator_tuned()
    with allocator.tuned_allocator(enabled=False) as tuned:
        assert not tuned
    calls = len(libc.calls)
    with pytest.raises(RuntimeError):  # undone on the way out of an exception too
        with allocator.tuned_allocator():
            raise RuntimeError
    assert not allocator.allocator_tuned() and len(libc.calls) > calls


class Seen(Callback):
    def __init__(self) -> None:
        self.during: list[bool] = []

    def on_step_end(self, trainer, logs):
        self.during.append(allocator.allocator_tuned())


@pytest.mark.parametrize("tune", [True, False])
def test_fit_tunes_for_its_duration_on_the_cpu(libc, tune):
    torch.manual_seed(0)
    model = SequenceClassifier(3, 4, hidden_size=5)
    seen = Seen()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[seen], tune_allocator=tune)
    x, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    trainer.fit(Batches(x, y, 4), steps=2)
    assert seen.during == [tune, tune]
    assert not allocator.allocator_tuned()  # put back when fit ends
    assert (libc.calls != []) == tune


def test_cuda_trainers_leave_malloc_alone(libc):
    model = SequenceClassifier(3, 4, hidden_size=5)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cuda")
    assert not trainer.tune_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_real_glibc_accepts_the_settings(monkeypatch):
    monkeypatch.delenv("RNNKIT_TUNE_MALLOC", raising=False)
    for name in allocator._GLIBC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert not allocator._state["applied"]
    try:
        assert allocator.tune_allocator()
        big = torch.ones(64 << 20, dtype=torch.uint8)  # above any mmap threshold: now from the heap
        assert int(big.sum()) == 64 << 20
    finally:
        allocator.restore_allocator()
    assert not allocator.allocator_tuned()
