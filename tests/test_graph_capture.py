"""rnnkit's layers under torch.compile, torch.export and torch.jit.trace, as torch.nn's work there.

torch.compile runs the recurrence eagerly in a graph break (rnnkit.engine.eagerly), at rnnkit's
own speed; torch.export and tracers record torch's kernels. Each result is checked against the
same module run eagerly: outputs, final states and every gradient.
"""

from __future__ import annotations

import pytest
import torch
from test_traced import LerpGRU  # a user's cell: only the reference loop or rnnkit's own loops run it
from torch import Tensor, nn

import rnnkit
from rnnkit import engine
from rnnkit.backends import fused
from rnnkit.engine import tree_flatten

LAYERS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}
# (N, H): a batch where auto picks torch's kernel, one where it picks the fused loops
SHAPES = [(6, 16), (128, 128)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: no graph or guard of another test's is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Model(nn.Module):
    """The recurrent layer, after a linear map or straight on the input, then a linear map."""

    def __init__(self, kind: str, H: int, linear_in: bool = True, **kwargs: object) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(5, 7), nn.ReLU()) if linear_in else nn.Identity()
        self.rnn = LAYERS[kind](7 if linear_in else 5, H, batch_first=True, **kwargs)
        self.out = nn.Linear(H * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x: Tensor, **kwargs: object) -> tuple[Tensor, ...]:
        r = self.rnn(self.inp(x), **kwargs)
        out, hidden = r[0], r[1]
        flat = tree_flatten(hidden)[0] + (tree_flatten(r.states)[0] if kwargs.get("return_states") else [])
        return (self.out(out).square().mean(), *flat)


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _run(fn, model: nn.Module, x: Tensor, **kwargs: object) -> tuple[list[Tensor], list[Tensor]]:
    """fn's outputs and the gradients of their sum (each output's sum, so every state is used)."""
    model.zero_grad()
    outs = fn(x, **kwargs)
    sum(o.sum() for o in outs).backward()
    return [o.detach() for o in outs], _grads(model)


def _assert_same(got: tuple[list[Tensor], list[Tensor]], want: tuple[list[Tensor], list[Tensor]]) -> None:
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("linear_in", [False, True])
def test_torch_compile_trains_like_eager(kind: str, N: int, H: int, linear_in: bool) -> None:
    """torch.compile (Inductor) of a model holding each layer trains as eagerly: before the graph
    break, torch 2.13's Inductor failed on the training graphs of an LSTM whose input needs no
    gradient and of every GRU."""
    model = Model(kind, H, linear_in)
    x = torch.randn(N, 9, 5)
    want = _run(model, model, x)
    compiled = torch.compile(model)
    _assert_same(_run(compiled, model, x), want)
    _assert_same(_run(compiled, model, x), want)  # the second call reuses the compiled graphs
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], want[0][0], rtol=1e-5, atol=1e-5)


def test_torch_compile_keeps_the_fused_lstm_loops(monkeypatch) -> None:
    """Under torch.compile an LSTM of the fused loops' sizes still trains and infers on them."""
    calls = []
    sequence = fused.lstm_sequence

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return sequence(*args, **kwargs)

    monkeypatch.setattr(fused, "lstm_sequence", counted)
    model = Model("lstm", 128)
    x = torch.randn(128, 9, 5)
    _run(model, model, x)
    with torch.no_grad():
        model(x)
    auto, calls[:] = list(calls), []
    if not auto:
        pytest.skip("auto runs torch's kernel for this LSTM here (no C++ kernels or one thread)")
    compiled = torch.compile(model)
    _run(compiled, model, x)
    with torch.no_grad():
        compiled(x)
    assert calls == auto == [True, False]


@pytest.mark.parametrize("kind", ["lstm", "gru", "user"])
def test_torch_compile_runs_stacks_lengths_and_every_step_states_like_eager(kind: str, monkeypatch) -> None:
    """Two bidirectional layers with variable lengths and return_states, and rnnkit.unroll of a
    user's cell, compile to the eager results."""
    x = torch.randn(5, 11, 5)
    lengths = torch.tensor([11, 4, 7, 1, 11])
    if kind == "user":
        cell = LerpGRU(5, 6)

        def fn(x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
            r = rnnkit.unroll(cell, x, lengths=lengths, reverse=True, return_states=True)
            return r.outputs, r.final_state, r.states

        model = cell
    else:
        model = Model(kind, 6, num_layers=2, bidirectional=True)

        def fn(x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
            return model(x, lengths=lengths, return_states=True)

    want = _run(fn, model, x, lengths=lengths)
    compiling = []  # whether each unroll ran while torch.compile traced it (an inlined loop agrees too)
    validate = engine._validate
    monkeypatch.setattr(engine, "_validate", lambda *a: compiling.append(torch.compiler.is_compiling()) or validate(*a))
    _assert_same(_run(torch.compile(fn), model, x, lengths=lengths), want)
    assert compiling and not any(compiling)


def test_torch_compile_takes_packed_sequences_and_initial_states() -> None:
    """A PackedSequence and a given (h0, c0), through a compiled function, as eagerly."""
    from torch.nn.utils.rnn import pack_padded_sequence

    lstm = rnnkit.LSTM(5, 6, num_layers=2, batch_first=True)
    x, lengths = torch.randn(4, 7, 5), torch.tensor([7, 3, 5, 2])
    h0, c0 = torch.randn(2, 4, 6), torch.randn(2, 4, 6)

    def fn(x: Tensor) -> tuple[Tensor, ...]:
        out, (h, c) = lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), (h0, c0))
        return out.data, h, c

    _assert_same(_run(torch.compile(fn), lstm, x), _run(fn, lstm, x))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("kind", LAYERS)
def test_torch_export_records_torchs_kernels(kind: str, N: int, H: int, strict: bool) -> None:
    """torch.export (strict and not) of a two-layer model in training mode records torch's kernels,
    whatever backend auto would run eagerly, and the exported program computes the eager outputs."""
    model = Model(kind, H, num_layers=2)
    x = torch.randn(N, 9, 5)
    program = torch.export.export(model, (x,), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("rnnkit" in t for t in targets), targets
    assert any(kind in t for t in targets), targets  # aten.lstm, aten.gru or aten.rnn_tanh
    x2 = torch.randn(N, 9, 5)  # other values than the ones traced
    for got, want in zip(program.module()(x2), model(x2), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks, as any trace has
def test_jit_trace_records_torchs_kernel() -> None:
    """torch.jit.trace of an LSTM of the fused loops' sizes records torch's kernel, which replays."""
    model = Model("lstm", 128).eval()
    x = torch.randn(128, 9, 5)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        assert "aten::lstm" in str(traced.inlined_graph)
        x2 = torch.randn(128, 9, 5)
        for got, want in zip(traced(x2), model(x2), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "traced"])
def test_an_explicit_backend_torch_cannot_record_says_so_and_records_one_it_can(backend: str) -> None:
    """torch.export of a layer set to rnnkit's own loops warns and records torch's kernel (a user's
    cell: the reference loop) instead of failing on an opaque operator."""
    model = Model("lstm", 8, backend=backend) if backend == "fused" else Model("lstm", 8)
    if backend == "traced":
        model.rnn = rnnkit.RNN(7, 8, batch_first=True, cell=LerpGRU, backend="traced")
    x = torch.randn(4, 9, 5)
    with pytest.warns(rnnkit.RnnkitWarning, match="cannot record rnnkit's own loops"):
        program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("rnnkit" in t for t in targets), targets
    x2 = torch.randn(4, 9, 5)
    torch.testing.assert_close(program.module()(x2)[0], model(x2)[0], rtol=1e-5, atol=1e-5)


def test_importing_rnnkit_leaves_torch_dynamo_unimported() -> None:
    """The graph break is set up lazily: importing torch._dynamo with rnnkit doubled its import time."""
    import subprocess
    import sys

    code = "import sys, rnnkit; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
