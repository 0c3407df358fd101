"""Scoped flush-to-zero of denormals: on inside rnnkit's forward and backward, the caller's mode after."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, require_backend
from torch import nn

import rnnkit
from rnnkit import GRUCell, LSTMCell, unroll
from rnnkit.fpmode import denormals_are_flushed, denormals_flushed, flush_denormals_enabled


def _cpu_can_flush() -> bool:
    was = denormals_are_flushed()
    ok = bool(torch.set_flush_denormal(True))
    torch.set_flush_denormal(was)
    return ok


pytestmark = [
    pytest.mark.usefixtures("single_thread", "restore_fpmode"),
    pytest.mark.skipif(not _cpu_can_flush(), reason="this CPU cannot flush denormals (no FTZ/DAZ)"),
]

I, H, N, T = 3, 4, 2, 5
TINY = 1e-20  # TINY * TINY = 1e-40: a float32 denormal unless flushed


class RecordingCell(nn.Module):
    """A user's cell (reference loop only) that records the denormal mode in its forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(I + H, H)
        self.forward_modes: list[bool] = []
        self.backward_modes: list[bool] = []

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, H, device=device, dtype=dtype)

    def forward(self, x, h):
        self.forward_modes.append(denormals_are_flushed())
        return _Record.apply(self, torch.tanh(self.lin(torch.cat([x, h], 1))))


class _Record(torch.autograd.Function):
    """Identity whose backward, a computation of the step's, records the denormal mode it runs in."""

    @staticmethod
    def forward(ctx, cell, h):
        ctx.cell = cell
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.cell.backward_modes.append(denormals_are_flushed())
        return None, grad


class DenormalCell(nn.Module):
    """h' = h * x: with x = h0 = 1e-20 the first product is 1e-40, a float32 denormal."""

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.full((batch_size, 1), TINY, device=device, dtype=dtype)

    def forward(self, x, h):
        return h * x


@pytest.fixture(params=[False, True], ids=["caller_off", "caller_on"])
def caller_mode(request) -> bool:
    torch.set_flush_denormal(request.param)
    assert denormals_are_flushed() is request.param
    return request.param


def test_probe_reads_the_mode() -> None:
    torch.set_flush_denormal(True)
    assert denormals_are_flushed()
    torch.set_flush_denormal(False)
    assert not denormals_are_flushed()
    assert flush_denormals_enabled()  # on by default


@pytest.mark.parametrize("needs_grad", ["x", "params_only"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_restored_after_forward_and_backward(backend, kind, needs_grad, caller_mode) -> None:
    cell = LSTMCell(I, H) if kind == "lstm" else GRUCell(I, H)
    x = torch.randn(N, T, I, requires_grad=needs_grad == "x")
    require_backend(backend, cell, x)
    res = unroll(cell, x, lengths=[T, 2], reverse=True, return_states=True, backend=backend)
    assert denormals_are_flushed() is caller_mode, "the forward changed the caller's mode"
    (res.outputs.sum() + res.states[0].sum()).backward()
    assert denormals_are_flushed() is caller_mode, "the backward changed the caller's mode"
    assert all(p.grad is not None for p in cell.parameters())
    with torch.no_grad():
        unroll(cell, x, backend=backend)
    assert denormals_are_flushed() is caller_mode, "a no-grad forward changed the caller's mode"


def test_reference_cell_runs_flushed_forward_and_backward(caller_mode) -> None:
    cell = RecordingCell()
    x = torch.randn(N, T, I, requires_grad=True)
    res = unroll(cell, x, lengths=[T, 3])
    assert cell.forward_modes == [True] * T
    res.outputs.sum().backward()
    assert cell.backward_modes == [True] * T, "some step's backward ran without flushing"
    assert denormals_are_flushed() is caller_mode


def test_callers_own_ops_backward_in_callers_mode() -> None:
    """Only the region flushes: the caller's ops after and before unroll run their backward unflushed."""
    torch.set_flush_denormal(False)
    cell, modes = RecordingCell(), {}

    def record(where):
        def hook(grad):
            modes[where] = denormals_are_flushed()

        return hook

    x0 = torch.randn(N, T, I, requires_grad=True)
    x = x0 * 2.0  # the caller's op before the region
    x.register_hook(record("before"))
    out = unroll(cell, x).outputs
    y = out * 3.0  # the caller's op after the region
    y.register_hook(record("after"))
    y.sum().backward()
    assert cell.backward_modes == [True] * T
    assert modes == {"before": False, "after": False}
    assert not denormals_are_flushed()


def test_reference_cell_backward_flushed_when_only_params_need_grad() -> None:
    torch.set_flush_denormal(False)
    cell = RecordingCell()
    unroll(cell, torch.randn(N, T, I)).final_state.sum().backward()
    assert cell.backward_modes == [True] * T
    assert not denormals_are_flushed()


def test_stacked_unrolls_and_repeated_backward() -> None:
    torch.set_flush_denormal(False)
    first, second = RecordingCell(), RecordingCell()
    second.lin = nn.Linear(H + H, H)
    x = torch.randn(N, T, I, requires_grad=True)
    out = unroll(second, unroll(first, x).outputs).outputs
    out.sum().backward(retain_graph=True)
    assert first.backward_modes == second.backward_modes == [True] * T
    assert not denormals_are_flushed()
    out.pow(2).sum().backward()  # a second backward through the same graph flushes and restores again
    assert first.backward_modes == second.backward_modes == [True] * (2 * T)
    assert not denormals_are_flushed()


def test_set_flush_denormals_false_disables(caller_mode) -> None:
    rnnkit.set_flush_denormals(False)
    assert not flush_denormals_enabled()
    cell = RecordingCell()
    x = torch.randn(N, T, I, requires_grad=True)
    unroll(cell, x).outputs.sum().backward()
    # rnnkit leaves the mode alone: whatever the caller chose is what the cell sees
    assert cell.forward_modes == [caller_mode] * T
    assert cell.backward_modes == [caller_mode] * T
    assert denormals_are_flushed() is caller_mode


def test_flushing_really_zeroes_denormals() -> None:
    torch.set_flush_denormal(False)
    x = torch.full((1, 2, 1), TINY)
    on = unroll(DenormalCell(), x).outputs
    rnnkit.set_flush_denormals(False)
    off = unroll(DenormalCell(), x).outputs
    assert on[0, 0, 0] == 0.0, "1e-40 survived inside rnnkit's flushed region"
    assert 0.0 < off[0, 0, 0] < 1.2e-38, "with flushing off the denormal must be kept"


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_grads_equal_with_and_without_flushing(backend: str, kind: str) -> None:
    torch.set_flush_denormal(False)
    cell = LSTMCell(I, H) if kind == "lstm" else GRUCell(I, H)
    x = torch.randn(N, T, I)
    require_backend(backend, cell, x)

    def run():
        xg = x.clone().requires_grad_()
        res = unroll(cell, xg, lengths=[T, 3], reverse=True, return_states=True, backend=backend)
        parts = [res.outputs, *res.states] if kind == "lstm" else [res.outputs, res.states]
        loss = sum((p * torch.linspace(-1, 1, p.numel()).view_as(p)).sum() for p in parts)
        return [p.detach() for p in parts], torch.autograd.grad(loss, [xg, *cell.parameters()])

    vals_on, grads_on = run()
    rnnkit.set_flush_denormals(False)
    vals_off, grads_off = run()
    for a, b in zip([*vals_on, *grads_on], [*vals_off, *grads_off], strict=True):
        assert torch.equal(a, b)


def test_context_manager_restores_on_exit_and_error() -> None:
    torch.set_flush_denormal(False)
    with denormals_flushed():
        assert denormals_are_flushed()
    assert not denormals_are_flushed()
    with pytest.raises(KeyError), denormals_flushed():
        raise KeyError("boom")
    assert not denormals_are_flushed()
    torch.set_flush_denormal(True)
    with denormals_flushed():
        assert denormals_are_flushed()
    assert denormals_are_flushed()  # a caller's own flushing is left on
    torch.set_flush_denormal(False)
    with denormals_flushed("meta"):  # not a CPU: nothing to do
        assert not denormals_are_flushed()


def _node_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    return {type(f).__name__ for f in seen}


def test_forward_only_scope_keeps_the_markers(caller_mode) -> None:
    """A block around the forward alone: its backward, run after the block, is still flushed."""
    cell = RecordingCell()
    x = torch.randn(N, T, I, requires_grad=True)
    with denormals_flushed():
        res = unroll(cell, x)
    assert "_ExitFlushBackward" in _node_names(res.outputs)
    res.outputs.sum().backward()
    assert cell.backward_modes == [True] * T
    assert denormals_are_flushed() is caller_mode


def test_outer_scope_covers_inner_layers_without_markers(caller_mode) -> None:
    """Inside one block that covers the backward (the trainer's step) layers add no autograd markers,
    and forward and backward still run flushed; the caller's mode comes back when the block ends."""
    cell = RecordingCell()
    x = torch.randn(N, T, I, requires_grad=True)
    with denormals_flushed(covers_backward=True):
        res = unroll(cell, x)
        names = []
        fn = res.outputs.grad_fn
        while fn is not None:  # walk the first-input chain down to x
            names.append(type(fn).__name__)
            fn = next((f for f, _ in fn.next_functions if f is not None), None)
        res.outputs.sum().backward()
        assert denormals_are_flushed()
    assert not any("Flush" in n for n in names), names
    assert cell.forward_modes == [True] * T and cell.backward_modes == [True] * T
    assert denormals_are_flushed() is caller_mode


def test_trainer_step_runs_flushed_and_restores(caller_mode) -> None:
    from rnnkit.train.trainer import Trainer

    cell = RecordingCell()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = cell, nn.Linear(H, 2)

        def forward(self, x):
            return self.head(unroll(self.cell, x).outputs[:, -1])

    model = Model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train_step(torch.randn(N, T, I), torch.tensor([0, 1]))
    assert cell.forward_modes == [True] * T and cell.backward_modes == [True] * T
    assert denormals_are_flushed() is caller_mode


def test_the_fast_mode_probe_agrees_with_torch_kernels() -> None:
    from rnnkit import fpmode

    if not fpmode._cpu_supports_flush():
        pytest.skip("this CPU cannot flush denormals")
    was = fpmode._tensor_probe()
    try:
        for mode in (True, False, True):
            torch.set_flush_denormal(mode)
            assert fpmode.denormals_are_flushed() is mode is fpmode._tensor_probe()
    finally:
        torch.set_flush_denormal(was)


def test_a_backward_that_raises_has_its_mode_restored_by_the_next_call() -> None:
    torch.set_flush_denormal(False)
    layer = rnnkit.GRU(3, 4, backend="reference")
    out = layer(torch.randn(5, 2, 3))[0]
    with torch.no_grad():
        layer.weight_hh_l0.add_(1.0)  # saved for the backward, which now raises
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    layer(torch.randn(5, 2, 3))  # autograd dropped the end-of-pass restore: the next call does it
    assert not denormals_are_flushed()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_write_into_a_view_output_keeps_the_kernel_backward_flushed(kind) -> None:
    torch.set_flush_denormal(False)
    cell = GRUCell(3, 4) if kind == "gru" else LSTMCell(3, 4)
    res = unroll(cell, torch.randn(2, 5, 3, requires_grad=True), backend="native")
    h = res.final_state if kind == "gru" else res.final_state.h
    assert h._is_view()
    kernel = h.grad_fn.next_functions[0][0]  # what the view views: torch's RNN kernel
    seen = []
    kernel.register_prehook(lambda grads: seen.append(denormals_are_flushed()))
    h[0] = 0.0  # a finished sequence's state reset in place: the view's own node leaves the graph
    h.sum().backward()
    assert seen == [True]
    assert not denormals_are_flushed()
