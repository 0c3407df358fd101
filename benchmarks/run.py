"""rnnkit's benchmark harness: rnnkit and its peers side by side, in one process, on one machine.

Speed (the default mode). For each shape every implementation builds the same model (a recurrent
layer, a Linear(H, 10) head on the last output, cross-entropy, Adam 1e-3) on the same batch, then
all are timed round-robin, so drift in the machine's speed hits every implementation alike:

    warm-up   each implementation in turn: ``--warmup`` train steps and inference calls (at least 1)
    rounds    for each round, for each implementation (the order rotated by one each round):
                  one train step, timed; one inference call (forward under no_grad), timed
    memory    one more train step each: its peak memory above what was allocated before it

Time to accuracy (``--time-to-accuracy``). Full MNIST by rows, for each seed: the wall time until
the test accuracy first reaches the target, for rnnkit's default recipe (``rnnkit.app.train``) and
for a plain PyTorch loop (nn.LSTM(28, 128), batch 128, Adam 1e-3), both evaluated on the full test
set every ``--eval-every`` steps (the evaluations' time counts in both).

    .venv/bin/python benchmarks/run.py                        # speed at the five default shapes
    .venv/bin/python benchmarks/run.py --only nn.LSTM rnnkit.LSTM --shapes "T28 I28 H128 B128"
    .venv/bin/python benchmarks/run.py --compile --write      # with torch.compile; append to BENCHMARKS.md
    .venv/bin/python benchmarks/run.py --time-to-accuracy --data-dir ../shared/data/mnist --seeds 0 1 2

Importable (for ``rnnkit bench``): ``main(argv)`` is the command line; ``run_speed`` and
``run_time_to_accuracy`` return the markdown report. benchmarks/README.md says what each row is.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import importlib.metadata
import importlib.util
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import rnnkit
from rnnkit import fpmode
from rnnkit.backends import fused, native, triton_lstm

try:  # imported as benchmarks.run from the repository root
    from benchmarks import competitors as comp
except ImportError:  # run as a script, or loaded with benchmarks/ on sys.path
    import competitors as comp

Shape, Bench, Skip = comp.Shape, comp.Bench, comp.Skip

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "BENCHMARKS.md"
DEFAULT_SHAPES = ("T28 I28 H128 B128", "T28 I28 H256 B128", "T28 I28 H512 B512", "T784 I1 H128 B128",
                  "T784 I1 H256 B128")
# --quick: stand-ins for the headline (T28 H128) and long (T784) shapes, small enough for a smoke test.
QUICK_SHAPES = (Shape(6, 4, 8, 4, "headline"), Shape(40, 1, 8, 4, "long"))
LONG_T = 64  # shapes longer than this get fewer rounds by default

# Row names (the targets refer to them).
NN_LSTM = "torch.nn.LSTM"
NN_LSTM_FLUSH = "torch.nn.LSTM, flush-denormal on"
NN_LSTM_COMPILED = "torch.nn.LSTM, model under torch.compile"
LOOP = "Python-loop LSTM cell"
LOOP_COMPILED = "Python-loop cell, torch.compile"
LOOP_GRAPHS = "Python-loop model, torch.compile reduce-overhead"
JAX = "JAX lax.scan, jit"
KERAS = "Keras 3 LSTM"
RK_LSTM = "rnnkit.LSTM"
RK_GRU = "rnnkit.GRU"
NN_GRU = "torch.nn.GRU"
# rows of another model, shown beside their rnnkit counterpart but never an LSTM's best competitor
OTHER_MODELS = frozenset({NN_GRU})
RK_SEED000 = "Seed000Cell via rnnkit.unroll, backend=reference"
RK_SEED000_COMPILED = "Seed000Cell via rnnkit.unroll, backend=compiled"
RK_SEED000_TRACED = "Seed000Cell via rnnkit.unroll, backend=traced"
RK_STATES = "rnnkit.LSTM return_states=True"
RK_NO_FLUSH = "rnnkit.LSTM, set_flush_denormals(False)"
RK_COMPILED = "rnnkit.LSTM, model under torch.compile"


# -- rnnkit's implementations ----------------------------------------------------------------------
def build_rnnkit_lstm(shape: Shape, device: torch.device, backend: str = "auto", compile_model: bool = False) -> Bench:
    """rnnkit.LSTM, the drop-in layer, with the given backend (the model under torch.compile with
    ``compile_model``: its graph breaks at the layer, as at torch.nn.LSTM)."""
    torch.manual_seed(comp.SEED)  # the same weights as torch.nn.LSTM gets (same initialisation)
    layer = rnnkit.LSTM(shape.I, shape.H, batch_first=True, backend=backend)
    _require_backend(layer, shape, device, backend)
    return comp.torch_bench(comp.Classifier(comp.LastOutput(layer), shape.H), shape, device, compile_model)


def build_rnnkit_gru(shape: Shape, device: torch.device) -> Bench:
    """rnnkit.GRU, backend auto."""
    torch.manual_seed(comp.SEED)
    layer = rnnkit.GRU(shape.I, shape.H, batch_first=True)
    return comp.torch_bench(comp.Classifier(comp.LastOutput(layer), shape.H), shape, device)


def build_rnnkit_states(shape: Shape, device: torch.device) -> Bench:
    """rnnkit.LSTM returning every step's states; the loss still reads only the last output."""
    torch.manual_seed(comp.SEED)
    layer = rnnkit.LSTM(shape.I, shape.H, batch_first=True)
    return comp.torch_bench(comp.Classifier(LastOutputWithStates(layer), shape.H), shape, device)


def build_rnnkit_no_flush(shape: Shape, device: torch.device) -> Bench:
    """rnnkit.LSTM with its scoped flushing of denormals turned off (what the flushing buys)."""
    bench = build_rnnkit_lstm(shape, device)
    bench.scope = functools.partial(rnnkit_flushing, False)
    return bench


def build_seed000(shape: Shape, device: torch.device, backend: str = "reference") -> Bench:
    """A user's cell (examples/custom_cell.py) run by rnnkit.unroll: the reference loop (what "auto" picks
    for user cells below 256 steps) or the compiled backend (auto's choice from 256 steps when training),
    whose first call traces and compiles."""
    torch.manual_seed(comp.SEED)
    cell = seed000_cell_class()(shape.I, shape.H)
    if backend == "compiled" and device.type != "cpu":
        raise Skip("the compiled backend runs on the CPU only")
    return comp.torch_bench(comp.Classifier(Unrolled(cell, backend), shape.H), shape, device,
                            compiles=backend == "compiled")


class LastOutputWithStates(nn.Module):
    """An rnnkit layer called with ``return_states=True``, reduced to its last output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x, return_states=True).output[:, -1]


class Unrolled(nn.Module):
    """A cell run over time by ``rnnkit.unroll``, reduced to its last output."""

    def __init__(self, cell: nn.Module, backend: str) -> None:
        super().__init__()
        self.cell, self.backend = cell, backend

    def forward(self, x: Tensor) -> Tensor:
        return rnnkit.unroll(self.cell, x, backend=self.backend).outputs[:, -1]


def _require_backend(layer: nn.Module, shape: Shape, device: torch.device, backend: str) -> None:
    """Skip (rather than fail) when an explicitly named backend cannot run here, e.g. fused on CUDA."""
    if backend == "triton" and device.type != "cuda":
        raise Skip("the triton backend is timed on a GPU (on the CPU it could only run in Triton's interpreter)")
    module = {"fused": fused, "native": native, "triton": triton_lstm}.get(backend)
    if module is not None:
        reason = module.unsupported(layer.cell(), torch.empty(1, 1, shape.I, device=device))
        if reason:
            raise Skip(reason)


@contextlib.contextmanager
def rnnkit_flushing(enabled: bool) -> Iterator[None]:
    """``rnnkit.set_flush_denormals(enabled)`` inside the block, the previous switch restored after."""
    was = fpmode.flush_denormals_enabled()
    rnnkit.set_flush_denormals(enabled)
    try:
        yield
    finally:
        rnnkit.set_flush_denormals(was)


@functools.cache
def seed000_cell_class() -> type[nn.Module]:
    """``Seed000Cell`` from examples/custom_cell.py (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("custom_cell", ROOT / "examples" / "custom_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Seed000Cell


# -- the registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    """One row of the tables: a name, a builder, and whether it is rnnkit's (else a competitor)."""

    name: str
    build: Callable[[Shape, torch.device], Bench]
    rnnkit: bool
    needs_compile: bool = False  # run only with --compile (cold compiles take 10-35 s each)


IMPLEMENTATIONS: tuple[Impl, ...] = (
    Impl(NN_LSTM, comp.build_torch_lstm, False),
    Impl(NN_LSTM_FLUSH, comp.build_torch_lstm_flush, False),
    Impl(LOOP, comp.build_python_loop, False),
    Impl(LOOP_COMPILED, comp.build_compiled_cell, False, needs_compile=True),
    Impl(LOOP_GRAPHS, comp.build_compiled_graphs, False, needs_compile=True),
    Impl(NN_LSTM_COMPILED, functools.partial(comp.build_torch_lstm, compile_model=True), False, needs_compile=True),
    Impl(JAX, comp.build_jax, False),
    Impl(KERAS, comp.build_keras, False),
    Impl(RK_LSTM, build_rnnkit_lstm, True),
    *(Impl(f"{RK_LSTM} backend={b}", functools.partial(build_rnnkit_lstm, backend=b), True)
      for b in ("fused", "native", "triton", "reference")),
    Impl(RK_GRU, build_rnnkit_gru, True),
    Impl(NN_GRU, comp.build_torch_gru, False),
    Impl(RK_SEED000, build_seed000, True),
    Impl(RK_SEED000_COMPILED, functools.partial(build_seed000, backend="compiled"), True),
    Impl(RK_SEED000_TRACED, functools.partial(build_seed000, backend="traced"), True),
    Impl(RK_STATES, build_rnnkit_states, True),
    Impl(RK_NO_FLUSH, build_rnnkit_no_flush, True),
    Impl(RK_COMPILED, functools.partial(build_rnnkit_lstm, compile_model=True), True, needs_compile=True),
)


def select(only: Sequence[str] | None) -> list[Impl]:
    """The implementations whose name contains any of ``only`` (case-insensitive), or all."""
    if not only:
        return list(IMPLEMENTATIONS)
    wanted = [s.lower() for s in only]
    chosen = [i for i in IMPLEMENTATIONS if any(w in i.name.lower() for w in wanted)]
    if not chosen:
        names = "\n  ".join(i.name for i in IMPLEMENTATIONS)
        raise SystemExit(f"--only {' '.join(only)}: no implementation matches; the names are:\n  {names}")
    return chosen


# -- the timing core -------------------------------------------------------------------------------
@dataclass
class Result:
    """One implementation at one shape."""

    name: str
    rnnkit: bool
    status: str = "ok"  # ok, skipped, failed
    reason: str = ""
    train_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    first_step_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> float | None:
        return statistics.median(self.train_ms) if self.status == "ok" and self.train_ms else None


def timed_ms(bench: Bench, fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Milliseconds of one call of ``fn`` (inside the implementation's scope, work finished)."""
    with bench.scope():
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3


def _with_autocast(
    scope: Callable[[], contextlib.AbstractContextManager[Any]], device: torch.device
) -> Callable[[], Any]:
    """``scope`` plus bfloat16 autocast on ``device`` (for --bf16)."""

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with scope(), torch.autocast(device.type, dtype=torch.bfloat16):
            yield

    return both


def measure_shape(
    shape: Shape, impls: Sequence[Impl], device: torch.device, *, rounds: int, warmup: int, allow_compile: bool,
    memory: bool = True, log: Callable[[str], Any] = print, bf16: bool = False,
) -> list[Result]:
    """Build, warm up, time round-robin and measure the memory of every implementation at ``shape``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flushed = fpmode.denormals_are_flushed()  # the process's mode, which every call must leave alone
    results = {i.name: Result(i.name, i.rnnkit) for i in impls}
    benches: dict[str, Bench] = {}

    def fail(name: str, error: BaseException) -> None:
        text = str(error).strip().splitlines()
        results[name].status = "failed"
        results[name].reason = f"{type(error).__name__}: {text[0][:160] if text else ''}"
        benches.pop(name, None)

    def check_mode(name: str) -> None:
        if fpmode.denormals_are_flushed() != flushed:
            torch.set_flush_denormal(flushed)
            note = "changed the denormal mode of the thread and did not restore it (the harness did)"
            if note not in results[name].notes:
                results[name].notes.append(note)

    for impl in impls:
        if impl.needs_compile and not allow_compile:
            results[impl.name].status, results[impl.name].reason = "skipped", "needs --compile"
            continue
        try:
            benches[impl.name] = impl.build(shape, device)
        except Skip as e:
            results[impl.name].status, results[impl.name].reason = "skipped", str(e)
        except Exception as e:  # one broken implementation must not cost the others' figures
            fail(impl.name, e)
        else:
            results[impl.name].notes += benches[impl.name].notes
            if bf16 and benches[impl.name].torch_memory:  # torch's autocast: the torch implementations
                benches[impl.name].scope = _with_autocast(benches[impl.name].scope, device)

    for name, bench in list(benches.items()):
        log(f"{shape.name}: warming up {name}")
        try:
            for i in range(max(1, warmup)):
                ms = timed_ms(bench, bench.step, sync)
                if i == 0:
                    results[name].first_step_s = ms / 1e3
                timed_ms(bench, bench.infer, sync)
                check_mode(name)
        except Exception as e:
            fail(name, e)
            check_mode(name)

    names = list(benches)
    for r in range(rounds):
        log(f"{shape.name}: round {r + 1}/{rounds}")
        k = r % max(1, len(names))
        for name in names[k:] + names[:k]:
            bench = benches.get(name)
            if bench is None:
                continue
            try:
                results[name].train_ms.append(timed_ms(bench, bench.step, sync))
                results[name].infer_ms.append(timed_ms(bench, bench.infer, sync))
            except Exception as e:
                fail(name, e)
            check_mode(name)

    for name, bench in benches.items():
        if memory and bench.torch_memory:
            try:
                results[name].peak_bytes = peak_memory(bench, device, sync)
            except Exception as e:
                results[name].notes.append(f"peak memory not measured ({type(e).__name__}: {e})")
            check_mode(name)
    return [results[i.name] for i in impls]


def peak_memory(bench: Bench, device: torch.device, sync: Callable[[], None]) -> int:
    """Peak bytes allocated during one train step above what was allocated before it.

    CUDA: the caching allocator's own statistics. CPU: torch keeps no peak counter, so the step runs
    under ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
    of torch's CPU allocator; the peak of their running sum in time order is the answer. The raw
    records are read from the profiler's kineto results: ``prof.events()`` nets each op's
    allocations and frees and takes seconds to build for a 784-step Python loop.
    """
    with bench.scope():
        if device.type == "cuda":
            sync()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            bench.step()
            sync()
            return torch.cuda.max_memory_allocated(device) - before
        activities = [torch.profiler.ProfilerActivity.CPU]
        with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            bench.step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        running += record.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- the report ------------------------------------------------------------------------------------
def fmt_ms(ms: float) -> str:
    """Three significant figures, no exponent."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def best_competitor(results: Sequence[Result]) -> Result | None:
    """The fastest LSTM competitor (non-rnnkit row) that was measured, by median train step."""
    measured = [r for r in results if not r.rnnkit and r.name not in OTHER_MODELS and r.train is not None]
    return min(measured, key=lambda r: r.train) if measured else None


def shape_table(shape: Shape, results: Sequence[Result], rounds: int, warmup: int) -> str:
    """The markdown table of one shape, with notes under it."""
    best = best_competitor(results)
    lines = [
        f"### {shape.name}", "", f"{_count(rounds, 'interleaved round')} after {_count(warmup, 'warm-up step')}.", "",
        "| implementation | train ms, median | train ms, min-max | inference ms | peak memory | vs best competitor |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for r in results:
        if r.train is None:
            lines.append(f"| {r.name} | {r.status}: {r.reason} | - | - | - | - |")
            continue
        spread = f"{fmt_ms(min(r.train_ms))}-{fmt_ms(max(r.train_ms))}"
        infer = fmt_ms(statistics.median(r.infer_ms))
        mem = "n/a" if r.peak_bytes is None else fmt_bytes(r.peak_bytes)
        ratio = "-" if best is None else f"{best.train / r.train:.2f}x"
        lines.append(f"| {r.name} | {fmt_ms(r.train)} | {spread} | {infer} | {mem} | {ratio} |")
        slow_start = r.first_step_s is not None and r.first_step_s >= 1.0 and r.first_step_s * 1e3 > 5 * r.train
        first = [f"first train step {r.first_step_s:.1f} s (compilation, allocation)"] if slow_start else []
        notes += [f"- {r.name}: {n}" for n in r.notes + first]
    if best is not None:
        notes.insert(0, f"- best competitor: {best.name}, {fmt_ms(best.train)} ms per train step")
    return "\n".join(lines + ([""] + notes if notes else []))


@dataclass
class Target:
    """One line of the targets table: a ratio, and the bound it should meet (None: reported only)."""

    what: str
    shape: Shape
    value: float | None
    bound: float | None = None
    at_most: bool = False  # the value must stay at or below the bound (an overhead)

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if self.bound is None:
            return "no target"
        return "met" if (self.value <= self.bound if self.at_most else self.value >= self.bound) else "not met"


def targets(by_shape: dict[Shape, list[Result]], device: torch.device) -> list[Target]:
    """The stated targets, shape by shape (the speed targets were set for the CPU)."""
    cpu = device.type == "cpu"
    out: list[Target] = []
    for shape, results in by_shape.items():
        ms = {r.name: r.train for r in results}
        best = best_competitor(results)
        label = f"{RK_LSTM} vs best competitor" + (f" ({best.name})" if best else "")
        bound = 1.3 if cpu and shape.role == "headline" else None
        out.append(Target(label, shape, _speedup(ms.get(RK_LSTM), best.train if best else None), bound))
        if shape.role == "long":
            out.append(Target(f"{RK_LSTM} vs {NN_LSTM_FLUSH}", shape, _speedup(ms.get(RK_LSTM), ms.get(NN_LSTM_FLUSH)),
                              1.0 if cpu else None))
            for cell_row in (RK_SEED000, RK_SEED000_COMPILED, RK_SEED000_TRACED):
                out.append(Target(f"{cell_row} vs {RK_LSTM}", shape, _speedup(ms.get(cell_row), ms.get(RK_LSTM)),
                                  0.8 if cpu else None))
            for peer in (JAX, KERAS):  # only when importable in the benchmark's environment
                if ms.get(peer) is not None:
                    out.append(Target(f"{RK_LSTM} vs {peer}", shape, _speedup(ms.get(RK_LSTM), ms.get(peer)),
                                      1.2 if cpu else None))
        if shape.role == "headline":
            for cell_row in (RK_SEED000, RK_SEED000_COMPILED, RK_SEED000_TRACED):
                out.append(Target(f"{cell_row} vs {NN_LSTM}", shape, _speedup(ms.get(cell_row), ms.get(NN_LSTM)),
                                  1.0 if cpu else None))
        if ms.get(NN_GRU) is not None:
            out.append(Target(f"{RK_GRU} vs {NN_GRU}", shape, _speedup(ms.get(RK_GRU), ms.get(NN_GRU))))
        slowdown = _speedup(ms.get(RK_LSTM), ms.get(RK_STATES))  # time with the states / time without
        out.append(Target("return_states overhead (time with / without)", shape, slowdown, 1.2, at_most=True))
    return out


def _speedup(ms: float | None, other_ms: float | None) -> float | None:
    """How many times faster ``ms`` is than ``other_ms``; None when either was not measured."""
    return None if ms is None or other_ms is None else other_ms / ms


def targets_table(rows: Sequence[Target]) -> str:
    lines = ["### Targets", "",
             "Ratios of median train-step times; above 1 means the first named is faster (overhead: below 1.2).",
             "", "| target | shape | ratio | goal | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for t in rows:
        value = "-" if t.value is None else f"{t.value:.2f}x"
        goal = "-" if t.bound is None else f"{'<=' if t.at_most else '>='} {t.bound:.1f}x"
        lines.append(f"| {t.what} | {t.shape.name} | {value} | {goal} | {t.verdict} |")
    return "\n".join(lines)


# -- the environment -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, command: str) -> list[str]:
    """The header lines: machine, software, command."""
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if device.type == "cuda":
        machine += f"; GPU {torch.cuda.get_device_name(device)}"
    software = [f"Python {platform.python_version()}", f"torch {torch.__version__}",
                f"numpy {_version('numpy')}", f"rnnkit {rnnkit.__version__}"]
    for dist in ("jax", "jaxlib", "optax", "keras", "tensorflow"):
        if _version(dist):
            software.append(f"{dist} {_version(dist)}")
    return [
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine}",
        f"- OS: {platform.platform()}",
        f"- software: {', '.join(software)}",
        f"- command: `{command}`",
        f"- glibc malloc: {_allocator_line()}",
        f"- rnnkit's C++ CPU kernels: {_kernels_line()}",
    ]


def _kernels_line() -> str:
    from rnnkit.backends import cext

    why = cext.unavailable()
    return "loaded (the fused backend's LSTM and GRU loops run in C++)" if why is None else f"unavailable ({why})"


def _allocator_line() -> str:
    if rnnkit.allocator.allocator_tuned():
        return "tuned for every implementation (rnnkit.tune_allocator, or the environment)"
    return "defaults (rnnkit's layers leave it alone; rnnkit's Trainer tunes it during fit)"


def heading(device: torch.device) -> str:
    return f"## {datetime.now(timezone.utc):%Y-%m-%d} {machine_name(device)} ({device.type})"


def append_results(path: Path, block: str) -> None:
    """Append ``block`` to the results file, creating it with a short introduction if missing."""
    if not path.exists():
        path.write_text(
            "# rnnkit benchmarks\n\n"
            "Written by `benchmarks/run.py --write` (`make bench ARGS=--write`); benchmarks/README.md says what\n"
            "each row measures. Every section is one run in one process on one machine: compare ratios\n"
            "within a section, not figures across sections.\n",
            encoding="utf-8",
        )
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + block.rstrip() + "\n")


def side_report(command: str, title: str, intro: str, rows: list[str], write: bool) -> str:
    """A side script's CPU table under the harness's heading and environment lines: printed, and
    appended to BENCHMARKS.md with ``write``."""
    device = torch.device("cpu")
    report = "\n".join([heading(device), "", *environment(device, command), "", f"### {title}", "", intro, "",
                        *rows]) + "\n"
    print(report)
    if write:
        append_results(DEFAULT_RESULTS, report)
    return report


# -- the two modes ---------------------------------------------------------------------------------
def run_speed(args: argparse.Namespace, command: str, log: Callable[[str], Any] = print) -> str:
    """Time every selected implementation at every shape; return the markdown report."""
    device = torch.device(args.device)
    impls = select(args.only)
    shapes = list(QUICK_SHAPES) if args.quick else [Shape.parse(s) for s in args.shapes]
    tables = []
    by_shape: dict[Shape, list[Result]] = {}
    for shape in shapes:
        long = shape.T > LONG_T
        rounds = args.rounds if args.rounds is not None else 1 if args.quick else 5 if long else 20
        warmup = max(1, args.warmup if args.warmup is not None else 1 if args.quick or long else 3)
        by_shape[shape] = measure_shape(shape, impls, device, rounds=rounds, warmup=warmup,
                                        allow_compile=args.compile, log=log, bf16=args.bf16)
        tables.append(shape_table(shape, by_shape[shape], rounds, warmup) + "\n")
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "torch.profiler profile_memory: every allocation and free of torch's CPU allocator")
    method = (
        "- method: train step = forward + backward + Adam on Linear(H, 10) over the last output, cross-entropy, "
        "batch-first x in [0, 1]; inference = forward under no_grad; median (and min-max) over rounds that "
        "interleave the implementations in one process; peak memory of one train step above what was allocated "
        f"before it ({memory}; n/a: not torch's allocator); vs best competitor = best competitor's median / this "
        "row's (above 1: faster than every competitor)"
    )
    if args.quick:
        method += "\n- --quick: tiny stand-in shapes and one round: a smoke test of the harness, not results"
    if args.bf16:
        method += ("\n- --bf16: every torch implementation's train step and inference run under "
                   "torch.autocast(bfloat16); parameters and optimiser stay float32")
    blocks = [heading(device), "", *environment(device, command), method, "", *tables]
    blocks.append(targets_table(targets(by_shape, device)))
    return "\n".join(blocks) + "\n"


def _call(args: argparse.Namespace, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """``fn(*a, **kw)`` in a fresh Python process (unless --in-process), as a user would start it.

    Each training run then starts from the same state: its own malloc settings and heap (rnnkit's
    trainer tunes glibc's allocator while it trains; see rnnkit.allocator), caches and threads.
    """
    if args.in_process:
        return fn(*a, **kw)
    setup = (args.threads or torch.get_num_threads(), args.tune_allocator, __name__, __file__)
    here = str(Path(__file__).resolve().parent)
    added = here not in sys.path
    if added:  # the worker starts with this sys.path and must import competitors.py beside this file
        sys.path.insert(0, here)
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=comp.worker_setup, initargs=setup) as pool:
            return pool.submit(fn, *a, **kw).result()
    finally:
        if added:
            sys.path.remove(here)


def recipe_time_to_accuracy(
    data_dir: str, seed: int, *, target: float, eval_every: int, epochs: int, device: torch.device,
    recipe_sets: Sequence[str] = (),
) -> comp.TimeToAccuracy:
    """rnnkit's default recipe ``mnist-rows`` through ``rnnkit.app.train``, evaluated every ``eval_every``
    steps; the clock starts before its data are loaded. It trains its full ``epochs`` (the recipe has no
    stop at the target), so ``accuracy`` is the final one."""
    from rnnkit import app
    from rnnkit.config import apply_overrides
    from rnnkit.recipes import recipe_config

    with tempfile.TemporaryDirectory(prefix="rnnkit-bench-") as out:
        # The recipe runs as shipped (its own epochs, schedule and evaluation interval): only where and
        # with which seed change. ``eval_every`` and ``epochs`` apply to the plain loop.
        sets = [f"data.data_dir={data_dir}", "data.download=false", f"train.seed={seed}",
                f"train.target_accuracy={target}", f"train.device={device}", "train.progress=false",
                f"train.out={out}", *recipe_sets]
        cfg = apply_overrides(recipe_config("mnist-rows"), sets)
        summary = app.train(cfg, log=lambda _: None, start_time=time.perf_counter())
    return comp.TimeToAccuracy(summary.seconds_to_target, None, summary.test_accuracy)


def run_time_to_accuracy(args: argparse.Namespace, command: str, log: Callable[[str], Any] = print) -> str:
    """Seconds to the target test accuracy, rnnkit's recipe against a plain PyTorch loop, per seed."""
    if not args.data_dir:
        raise SystemExit("--time-to-accuracy trains on full MNIST: give --data-dir (e.g. ../shared/data/mnist)")
    device = torch.device(args.device)
    options = {"target": args.target, "eval_every": args.eval_every, "epochs": args.epochs, "device": device}
    pct = f"{100 * args.target:g}%"
    lines = [
        "### Time to accuracy", "",
        f"Wall seconds until the full-test-set accuracy first reaches {pct} (evaluation time included); the "
        "clock starts before the data are loaded (both use rnnkit's MNIST reader). rnnkit: the `mnist-rows` "
        "recipe as shipped, through `rnnkit.app.train` (its own epochs and evaluation interval; it trains all "
        "its epochs, so its accuracy is the final one). Plain PyTorch: nn.LSTM(28, 128) + Linear, batch 128, "
        f"Adam 1e-3, torch's default initialisation, evaluated every {args.eval_every} steps, at most "
        f"{args.epochs} epochs (stops at the target; its accuracy is the best "
        "seen). The two alternate in going first, seed by seed. Ratio: plain / rnnkit (above 1: rnnkit gets "
        "there sooner).", "",
        f"| seed | rnnkit recipe, s to {pct} | plain PyTorch, s to {pct} | ratio | rnnkit accuracy | "
        "plain accuracy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ours = (functools.partial(recipe_time_to_accuracy, recipe_sets=args.recipe_set) if args.recipe_set
            else recipe_time_to_accuracy)
    runs = {"rnnkit recipe": ours, "plain PyTorch loop": comp.plain_torch_time_to_accuracy}
    if args.recipe_set:
        lines[2] += " The recipe ran with " + ", ".join(f"`{s}`" for s in args.recipe_set) + "."
    for k, seed in enumerate(args.seeds):
        got = {}
        for name in list(runs)[:: 1 if k % 2 == 0 else -1]:  # who goes first alternates (warm caches)
            log(f"time to accuracy, seed {seed}: {name}")
            got[name] = _call(args, runs[name], args.data_dir, seed, **options)
        ours, plain = got["rnnkit recipe"], got["plain PyTorch loop"]
        ratio = "-"
        if ours.seconds and plain.seconds:
            ratio = f"{plain.seconds / ours.seconds:.2f}x"
        elif ours.seconds and plain.elapsed:  # the plain loop stopped at its cap without reaching the target
            ratio = f"> {plain.elapsed / ours.seconds:.2f}x"
        lines.append(f"| {seed} | {_seconds(ours)} | {_seconds(plain)} | {ratio} | {100 * ours.accuracy:.2f}% | "
                     f"{100 * plain.accuracy:.2f}% |")
    return "\n".join([heading(device), "", *environment(device, command), "", *lines]) + "\n"


# The seeds' recipes: (hidden, batch, lr, steps) of the plain loop, as the seeds wrote them.
SEED_RECIPES = {"seed002": (128, 128, 1e-3, 800), "seed003": (64, 64, 1e-2, 1200)}


def rnnkit_recipe(name: str, data_dir: str, seed: int, device: torch.device) -> comp.RecipeRun:
    """Recipe ``name`` as shipped through ``rnnkit.app.train``: its training seconds minus its evaluations."""
    from rnnkit import app
    from rnnkit.config import apply_overrides
    from rnnkit.recipes import recipe_config

    with tempfile.TemporaryDirectory(prefix="rnnkit-bench-") as out:
        sets = [f"data.data_dir={data_dir}", "data.download=false", f"train.seed={seed}",
                f"train.device={device}", "train.progress=false", f"train.out={out}"]
        summary = app.train(apply_overrides(recipe_config(name), sets), log=lambda _: None)
    return comp.RecipeRun(summary.train_seconds - summary.eval_seconds, summary.test_accuracy)


def run_seed_recipes(args: argparse.Namespace, command: str, log: Callable[[str], Any] = print) -> str:
    """The seeds' MNIST recipes: rnnkit's against a plain PyTorch loop with the seed's settings."""
    if not args.data_dir:
        raise SystemExit("--seed-recipes trains on full MNIST: give --data-dir (e.g. ../shared/data/mnist)")
    device = torch.device(args.device)
    lines = [
        "### The seeds' recipes", "",
        "Training seconds (evaluations and data loading excluded) and the final full-test-set accuracy. "
        "rnnkit: the recipe as shipped through `rnnkit.app.train` (which also evaluates on the test set "
        "during training; that time is subtracted). Plain PyTorch: nn.LSTM(28, H) + Linear with torch's "
        "default initialisation, Adam, the seed's batch size, learning rate and number of steps, no "
        "evaluation until the end. The two alternate in going first. Ratio: plain / rnnkit (above 1: "
        "rnnkit trains faster).", "",
        "| recipe | seed | rnnkit s | plain PyTorch s | ratio | rnnkit accuracy | plain accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (hidden, batch, lr, steps) in SEED_RECIPES.items():
        for k, seed in enumerate(args.seeds):
            got = {}
            for who in ("rnnkit", "plain")[:: 1 if k % 2 == 0 else -1]:
                log(f"{name}, seed {seed}: {who}")
                got[who] = (_call(args, rnnkit_recipe, name, args.data_dir, seed, device) if who == "rnnkit" else
                            _call(args, comp.plain_torch_recipe, args.data_dir, seed, hidden=hidden,
                                  batch_size=batch, lr=lr, steps=steps, device=device))
            ours, plain = got["rnnkit"], got["plain"]
            lines.append(f"| {name} | {seed} | {ours.train_seconds:.1f} | {plain.train_seconds:.1f} | "
                         f"{plain.train_seconds / ours.train_seconds:.2f}x | {100 * ours.accuracy:.2f}% | "
                         f"{100 * plain.accuracy:.2f}% |")
    return "\n".join([heading(device), "", *environment(device, command), "", *lines]) + "\n"


def _seconds(r: comp.TimeToAccuracy) -> str:
    if r.seconds is not None:
        return f"{r.seconds:.1f}"
    return "not reached" + (f" in {r.elapsed:.1f}" if r.elapsed else "")


# -- the command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Implementations: " + "; ".join(i.name for i in IMPLEMENTATIONS),
    )
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="SHAPE",
                   help='shapes like "T28 I28 H128 B128" (default: the five standard ones)')
    p.add_argument("--rounds", type=int, help="interleaved timed rounds (default 20; 5 when T > 64)")
    p.add_argument("--warmup", type=int, help="warm-up steps per implementation (default 3; 1 when T > 64)")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="keep implementations whose name contains any TEXT")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--compile", action="store_true", help="include the torch.compile competitors (slow to start)")
    p.add_argument("--tune-allocator", action="store_true",
                   help="tune glibc malloc for every implementation (rnnkit.tune_allocator; layers do not by default)")
    p.add_argument("--bf16", action="store_true",
                   help="run every torch implementation under bfloat16 autocast (rnnkit's and torch's alike)")
    p.add_argument("--quick", action="store_true", help="two tiny shapes, 1 round: a smoke test of the harness")
    p.add_argument("--write", action="store_true", help="append the report to BENCHMARKS.md")
    p.add_argument("--results-file", type=Path, default=DEFAULT_RESULTS, help="where --write appends")
    tta = p.add_argument_group("time to accuracy")
    tta.add_argument("--time-to-accuracy", action="store_true", help="train on full MNIST instead of timing steps")
    tta.add_argument("--seed-recipes", action="store_true",
                     help="train the seeds' MNIST recipes (seed002, seed003) against a plain PyTorch loop")
    tta.add_argument("--data-dir", help="the directory holding the four MNIST IDX files")
    tta.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                     help="a config override for rnnkit's recipe in --time-to-accuracy (repeatable)")
    tta.add_argument("--in-process", action="store_true",
                     help="train in this process (default: each training run in a fresh one)")
    tta.add_argument("--seeds", type=int, nargs="+", default=[0])
    tta.add_argument("--target", type=float, default=0.98, help="test accuracy to reach (default 0.98)")
    tta.add_argument("--eval-every", type=int, default=100, help="steps between test evaluations (default 100)")
    tta.add_argument("--epochs", type=int, default=6, help="the cap on epochs for both (default 6, the recipe's)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    for s in args.shapes:
        try:
            Shape.parse(s)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], Any] | None = None) -> str:
    """Run the command line; print the report to stdout (progress to stderr) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join([_relative(sys.executable), "benchmarks/run.py", *argv])
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = run_time_to_accuracy if args.time_to_accuracy else run_seed_recipes if args.seed_recipes else run_speed
    try:
        with rnnkit.tuned_allocator(args.tune_allocator) as tuned:
            if args.tune_allocator and not tuned:
                log("--tune-allocator: not applied (not glibc, or the environment sets malloc options)")
            report = mode(args, command, log)
    finally:
        torch.set_num_threads(threads)
    print(report)
    if args.write:
        append_results(args.results_file, report)
        log(f"appended to {args.results_file}")
    return report


def _relative(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


if __name__ == "__main__":
    main()
