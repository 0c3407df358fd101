"""Smoke test of the benchmark harness (benchmarks/run.py): tiny shapes, one round, every row present.

The figures of a --quick run mean nothing; what is checked is that the harness builds, times and
reports every implementation, writes the results file, and leaves the process as it found it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rnnkit import fpmode

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/run.py as a module (benchmarks/ is not a package; run.py imports competitors.py beside it)."""
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location("rnnkit_benchmarks_run", BENCH_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH_DIR))
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """One --quick run with --write into a temporary results file: (report, results file, state before)."""
    results = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    before = (torch.get_num_threads(), fpmode.denormals_are_flushed(), fpmode.flush_denormals_enabled())
    argv = ["--quick", "--threads", "1", "--write", "--results-file", str(results)]
    report = bench.main(argv, log=lambda _: None)
    return report, results, before


def _script(name: str):
    """A side script of benchmarks/ (``name``.py) loaded as a module."""
    spec = importlib.util.spec_from_file_location(f"rnnkit_benchmarks_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(report: str, title: str) -> str:
    return report.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


def _row(section: str, name: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"expected one row {name!r} in:\n{section}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_every_implementation_has_a_row_at_every_shape(bench, quick):
    report, _, _ = quick
    measured_here = [bench.NN_LSTM, bench.NN_LSTM_FLUSH, bench.LOOP, bench.RK_LSTM, bench.RK_GRU,
                     bench.RK_SEED000, bench.RK_SEED000_TRACED, bench.RK_STATES, bench.RK_NO_FLUSH]
    for shape in bench.QUICK_SHAPES:
        section = _section(report, shape.name)
        for impl in bench.IMPLEMENTATIONS:
            cells = _row(section, impl.name)
            assert not cells[1].startswith("failed"), f"{impl.name} at {shape.name}: {cells[1]}"
        for name in measured_here + [f"{bench.RK_LSTM} backend={b}" for b in ("fused", "native", "reference")]:
            median, spread, infer, memory, ratio = _row(section, name)[1:]
            assert float(median) > 0 and float(infer) > 0 and "-" in spread
            assert memory.endswith(("KiB", "MiB")) and ratio.endswith("x")
        assert _row(section, bench.LOOP_COMPILED)[1] == "skipped: needs --compile"


def test_targets_table_has_every_target(bench, quick):
    report, _, _ = quick
    section = _section(report, "Targets")
    headline, long = (s.name for s in bench.QUICK_SHAPES)
    expected = [
        (f"{bench.RK_LSTM} vs best competitor", headline), (f"{bench.RK_SEED000} vs {bench.NN_LSTM}", headline),
        (f"{bench.RK_SEED000_COMPILED} vs {bench.NN_LSTM}", headline),
        (f"{bench.RK_SEED000_TRACED} vs {bench.NN_LSTM}", headline), (f"{bench.RK_GRU} vs {bench.NN_GRU}", headline),
        ("return_states overhead", headline), (f"{bench.RK_LSTM} vs best competitor", long),
        (f"{bench.RK_LSTM} vs {bench.NN_LSTM_FLUSH}", long), (f"{bench.RK_SEED000} vs {bench.RK_LSTM}", long),
        (f"{bench.RK_SEED000_COMPILED} vs {bench.RK_LSTM}", long),
        (f"{bench.RK_SEED000_TRACED} vs {bench.RK_LSTM}", long), (f"{bench.RK_GRU} vs {bench.NN_GRU}", long),
        ("return_states overhead", long),
    ]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # past the header and its rule
    assert len(rows) == len(expected)
    for (what, shape), row in zip(expected, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(what) and cells[1] == shape, row
        assert cells[4] in ("met", "not met", "no target"), row  # measured, never "not measured"


def test_write_appends_header_and_tables(bench, quick):
    report, results, _ = quick
    text = results.read_text()
    assert text.startswith("# rnnkit benchmarks\n")
    assert text.rstrip().endswith(report.rstrip())
    header = report.split("\n### ", 1)[0]
    assert header.startswith("## ") and header.splitlines()[0].endswith("(cpu)")
    for key in ("- date:", "- machine:", "- OS:", "- software:", "- command:", "--quick"):
        assert key in header
    bench.append_results(results, "## second block\n")
    assert results.read_text().count("# rnnkit benchmarks") == 1 and results.read_text().endswith("## second block\n")


def test_the_run_leaves_the_process_as_it_found_it(quick):
    _, _, before = quick
    assert (torch.get_num_threads(), fpmode.denormals_are_flushed(), fpmode.flush_denormals_enabled()) == before


def test_a_failing_or_skipped_implementation_is_reported_not_raised(bench):
    def broken(shape, device):
        return bench.Bench(step=lambda: 1 / 0, infer=lambda: None)

    def absent(shape, device):
        raise bench.Skip("not installed")

    impls = [bench.Impl("broken", broken, False), bench.Impl("absent", absent, False),
             bench.Impl(bench.NN_LSTM, bench.comp.build_torch_lstm, False)]
    results = bench.measure_shape(bench.QUICK_SHAPES[0], impls, torch.device("cpu"), rounds=1, warmup=1,
                                  allow_compile=False, memory=False, log=lambda _: None)
    assert [(r.status, r.reason) for r in results[:2]] == [("failed", "ZeroDivisionError: division by zero"),
                                                           ("skipped", "not installed")]
    assert results[2].status == "ok" and len(results[2].train_ms) == 1


def test_shape_parsing(bench):
    Shape = bench.Shape
    assert Shape.parse("T28 I28 H128 B128") == Shape(28, 28, 128, 128, "headline")
    assert Shape.parse("t784,i1,h256,b128") == Shape(784, 1, 256, 128, "long")
    assert Shape.parse("T28 I28 H256 B128").role == ""
    for bad in ("T28 I28 H128", "T28 I28 H128 B128 X3", "T0 I1 H1 B1"):
        with pytest.raises(ValueError):
            Shape.parse(bad)


def test_time_to_accuracy_table(bench, monkeypatch):
    """The report of --time-to-accuracy, with the two training runs replaced by stand-ins."""
    calls = []

    def fake(kind, seconds):
        def run(data_dir, seed, *, target, eval_every, epochs, device):
            calls.append((kind, seed))
            return bench.comp.TimeToAccuracy(seconds, 10, 0.985 if seconds else 0.97)
        return run

    monkeypatch.setattr(bench, "recipe_time_to_accuracy", fake("rnnkit", 10.0))
    monkeypatch.setattr(bench.comp, "plain_torch_time_to_accuracy", fake("plain", None))
    args = bench.parse_args(["--time-to-accuracy", "--data-dir", "unused", "--seeds", "0", "1", "--in-process"])
    report = bench.run_time_to_accuracy(args, "cmd", log=lambda _: None)
    assert calls == [("rnnkit", 0), ("plain", 0), ("plain", 1), ("rnnkit", 1)]  # who goes first alternates
    rows = [line for line in _section(report, "Time to accuracy").splitlines() if line.startswith("| ")][2:]
    assert rows == [f"| {seed} | 10.0 | not reached | - | 98.50% | 97.00% |" for seed in (0, 1)]


def test_training_runs_go_to_a_fresh_process_with_the_runs_settings(bench):
    """``_call`` runs work in a spawned worker that can import run.py even when it was loaded from its
    path (as here), with --tune-allocator applied there (the parent stays as it was)."""
    args = bench.parse_args(["--time-to-accuracy", "--data-dir", "unused", "--tune-allocator", "--threads", "1"])
    assert bench._call(args, bench._allocator_line).startswith("tuned")
    args = bench.parse_args(["--time-to-accuracy", "--data-dir", "unused", "--in-process"])
    assert bench._call(args, bench._allocator_line) == bench._allocator_line()


def test_bf16_runs_the_torch_rows_under_autocast(bench):
    seen = []

    def probe(torch_memory):
        def build(shape, device):
            def step():
                seen.append((torch_memory, torch.is_autocast_enabled("cpu")))
            return bench.Bench(step=step, infer=lambda: None, torch_memory=torch_memory)
        return build

    impls = [bench.Impl("torch row", probe(True), False), bench.Impl("jax row", probe(False), False)]
    for bf16 in (False, True):
        seen.clear()
        bench.measure_shape(bench.QUICK_SHAPES[0], impls, torch.device("cpu"), rounds=1, warmup=1,
                            allow_compile=False, memory=False, log=lambda _: None, bf16=bf16)
        assert set(seen) == {(True, bf16), (False, False)}


def test_time_to_accuracy_passes_recipe_overrides(bench, monkeypatch):
    got = []

    def ours(data_dir, seed, *, target, eval_every, epochs, device, recipe_sets=()):
        got.append(list(recipe_sets))
        return bench.comp.TimeToAccuracy(10.0, 10, 0.985)

    monkeypatch.setattr(bench, "recipe_time_to_accuracy", ours)
    monkeypatch.setattr(bench.comp, "plain_torch_time_to_accuracy",
                        lambda *a, **k: bench.comp.TimeToAccuracy(30.0, 10, 0.98))
    args = bench.parse_args(["--time-to-accuracy", "--data-dir", "unused", "--in-process",
                             "--recipe-set", "train.bf16=true"])
    report = bench.run_time_to_accuracy(args, "cmd", log=lambda _: None)
    assert got == [["train.bf16=true"]]
    assert "The recipe ran with `train.bf16=true`." in report and "| 0 | 10.0 | 30.0 | 3.00x |" in report


def test_another_models_row_is_never_the_lstm_best_competitor(bench):
    rows = [bench.Result(bench.NN_GRU, False, train_ms=[1.0]), bench.Result(bench.NN_LSTM, False, train_ms=[5.0]),
            bench.Result(bench.RK_LSTM, True, train_ms=[0.5])]
    assert bench.best_competitor(rows).name == bench.NN_LSTM
    assert bench.best_competitor(rows[:1]) is None


def test_cell_step_benchmark_reports_every_cell_shape_and_call(bench):
    """benchmarks/cell_step.py: a row per cell, shape and kind of call, each with two times and their ratio."""
    module = _script("cell_step")
    rows = module.measure(rounds=1, block=1)
    assert len(rows) == len(module.KINDS) * len(module.SHAPES) * 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours, theirs, ratio = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
        assert ours > 0 and theirs > 0 and ratio == pytest.approx(theirs / ours, rel=0.05, abs=0.01)


def test_kernel_ab_alternates_two_builds_and_compares_their_results(monkeypatch):
    """benchmarks/kernel_ab.py with the tree's own library as "the revision's" (no build): both sides
    run, the report has the three ratios, the results compare equal, and the backends' hook is restored."""
    from rnnkit.backends import cext

    if cext.ops() is None:
        pytest.skip(f"rnnkit's C++ kernels are unavailable here: {cext.unavailable()}")
    module = _script("kernel_ab")
    monkeypatch.setattr(module, "build_revision", lambda revision: ("rnnkit_cpu", cext.build()))
    made, counted = [], module.Counted
    monkeypatch.setattr(module, "Counted", lambda ops: made.append(counted(ops)) or made[-1])
    lines = []
    original = cext.ops
    module.compare("HEAD", "GRU", (3, 2, 4, 5), rounds=4, log=lines.append)
    assert cext.ops is original
    assert len(made) == 2 and all(c.calls > 0 for c in made)  # each side's library was called
    text = "\n".join(lines)
    for part in ("forward  ms:", "backward ms:", "both     ms:"):
        assert part in text and "B/A" in text.split(part, 1)[1].split("\n", 1)[0]
    assert "bit for bit the same" in text
    # a layer that never reaches the kernels is an error, not a comparison of torch with itself
    monkeypatch.setattr(module, "make_layer", lambda kind, I, H: torch.nn.GRU(I, H, batch_first=True))
    with pytest.raises(SystemExit, match="never called"):
        module.compare("HEAD", "GRU", (3, 2, 4, 5), rounds=2, log=lines.append)


@pytest.mark.slow
def test_kernel_ab_builds_a_revision_under_its_own_namespace():
    """The revision's kernels are built with their op namespace renamed and load beside the tree's."""
    module = _script("kernel_ab")
    namespace, lib = module.build_revision("HEAD")
    assert namespace.startswith("rnnkit_ab_") and lib.exists()
    torch.ops.load_library(str(lib))
    assert hasattr(getattr(torch.ops, namespace), "lstm_forward")
