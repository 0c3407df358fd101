"""Every step's c from the native LSTM backend: read from oneDNN's workspace, checked, or recomputed."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit import LSTMCell, LSTMState, fpmode
from rnnkit.backends import native
from rnnkit.engine import tree_flatten

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN: no workspace to read"
)


def _cell(bias: bool = True, forget_bias: float = 0.0) -> LSTMCell:
    torch.manual_seed(0)
    return LSTMCell(3, 5, bias=bias, forget_bias=forget_bias)


def _run(cell, x, state, backend, read_states=True):
    """Values (outputs, final state, states) and gradients of a loss that reads all of them."""
    x = x.detach().requires_grad_()
    state = LSTMState(*(s.detach().requires_grad_() for s in state))
    res = rnnkit.unroll(cell, x, state, return_states=True, backend=backend)
    parts = [res.outputs, *res.final_state, *(res.states if read_states else ())]
    g = torch.Generator().manual_seed(1)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in parts)
    grads = torch.autograd.grad(loss, [x, *state, *cell.parameters()])
    return [res.outputs, *res.final_state, *res.states], grads


def _spy(monkeypatch) -> dict[str, int]:
    """Counts of workspace reads and of recomputations of every step's c."""
    calls = {"workspace": 0, "recomputed": 0}
    apply, states = native._CellStatesFromWorkspace.apply, native.cell_states

    def counted_apply(*a):
        calls["workspace"] += 1
        return apply(*a)

    def counted_states(*a, **k):
        calls["recomputed"] += 1
        return states(*a, **k)

    monkeypatch.setattr(native._CellStatesFromWorkspace, "apply", counted_apply)
    monkeypatch.setattr(native, "cell_states", counted_states)
    return calls


def _assert_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def _agrees(monkeypatch, cell, x, state, calls, read_states=True):
    """The native backend matches the reference loop, values and gradients, with these ``calls``."""
    want = _run(cell, x, state, "reference", read_states)
    counted = _spy(monkeypatch)
    got = _run(cell, x, state, "native", read_states)
    assert counted == calls
    _assert_close(got[0], want[0])
    _assert_close(got[1], want[1])


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("kind", ["bias", "no_bias", "forget_bias"])
def test_workspace_states_match_the_reference(monkeypatch, T, kind):
    cell = _cell(bias=kind != "no_bias", forget_bias=1.0 if kind == "forget_bias" else 0.0)
    x, state = torch.randn(4, T, 3), LSTMState(torch.randn(4, 5), torch.randn(4, 5))
    # read in the forward, recomputed by the backward only
    _agrees(monkeypatch, cell, x, state, {"workspace": 1, "recomputed": 1})


def test_unread_states_cost_no_backward(monkeypatch):
    cell, x = _cell(), torch.randn(4, 6, 3)
    state = LSTMState(torch.zeros(4, 5), torch.zeros(4, 5))
    _agrees(monkeypatch, cell, x, state, {"workspace": 1, "recomputed": 0}, read_states=False)


def test_chunks_of_time_read_each_chunks_workspace(monkeypatch):
    monkeypatch.setattr(native, "allocator_tuned", lambda: False)
    monkeypatch.setattr(native, "WHOLE_GATE_BYTES", 0)
    monkeypatch.setattr(native, "CHUNK_GATE_BYTES", 3 * 4 * 4 * 20)  # 3 steps of N=4, 4H=20 floats
    cell, x = _cell(), torch.randn(4, 11, 3)
    state = LSTMState(torch.randn(4, 5), torch.randn(4, 5))
    _agrees(monkeypatch, cell, x, state, {"workspace": 1, "recomputed": 1})  # four chunks (3, 3, 3, 2 steps), one read


def test_a_wrong_slot_is_caught_and_the_states_recomputed(monkeypatch):
    cell, x = _cell(), torch.randn(4, 7, 3)
    state = LSTMState(torch.randn(4, 5), torch.randn(4, 5))
    _run(cell, x, state, "native")  # calibrates where this shape's states are
    (key,) = [k for k in native._SLOTS if k[:4] == (7, 4, 3, 5)]
    start, floats = native._SLOTS[key]
    monkeypatch.setitem(native._SLOTS, key, (start + 4 * 5, floats))  # one step off: the checks must reject it
    _agrees(monkeypatch, cell, x, state, {"workspace": 0, "recomputed": 1})


def test_each_shape_is_calibrated_once(monkeypatch):
    cell, x = _cell(), torch.randn(4, 5, 3)
    runs = []
    calibrate = native._calibrate
    monkeypatch.setattr(native, "_calibrate", lambda *a: runs.append(a) or calibrate(*a))
    monkeypatch.setattr(native, "_SLOTS", {})
    for _ in range(3):
        rnnkit.unroll(cell, x, return_states=True, backend="native")
    assert runs == [(5, 4, 3, 5, True)]


@pytest.mark.parametrize("bias", [True, False])
def test_flat_data_cannot_mislead_the_lookup(monkeypatch, bias):
    """Silence at both ends and a zero state: the checks on this call's data alone would pass anywhere."""
    monkeypatch.setattr(native, "_SLOTS", {})
    torch.manual_seed(0)
    cell = LSTMCell(4, 32, bias=bias)
    x = torch.zeros(8, 40, 4)
    x[:, 2:8] = torch.randn(8, 6, 4) * 3
    for chunked in (False, True):
        if chunked:  # the first chunks are all silence and the later ones trust their check
            monkeypatch.setattr(native, "allocator_tuned", lambda: False)
            monkeypatch.setattr(native, "WHOLE_GATE_BYTES", 0)
            monkeypatch.setattr(native, "CHUNK_GATE_BYTES", 2 * 8 * 4 * 128)
        got = rnnkit.unroll(cell, x, return_states=True, backend="native")
        want = rnnkit.unroll(cell, x, return_states=True, backend="reference")
        _assert_close([got.outputs, *got.states], [want.outputs, *want.states])


@pytest.mark.parametrize("bias", [True, False])
def test_second_derivatives_through_the_states(bias):
    torch.manual_seed(0)
    cell = LSTMCell(3, 8, bias=bias)
    x = torch.randn(4, 6, 3, requires_grad=True)
    got = []
    for backend in ("native", "reference"):
        r = rnnkit.unroll(cell, x, return_states=True, backend=backend)
        (g,) = torch.autograd.grad(r.states.c.square().sum() + r.outputs.sum(), x, create_graph=True)
        got.append(torch.autograd.grad(g.square().sum(), [x, *cell.parameters()]))
    _assert_close(*got)


def test_states_not_found_are_recomputed(monkeypatch):
    monkeypatch.setattr(native, "_find_block", lambda flat, block: None)
    monkeypatch.setattr(native, "_SLOTS", {})
    cell, x = _cell(), torch.randn(4, 5, 3)
    state = LSTMState(torch.randn(4, 5), torch.randn(4, 5))
    _agrees(monkeypatch, cell, x, state, {"workspace": 0, "recomputed": 1})


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_reads_the_workspace_too(monkeypatch, mode):
    cell, x = _cell(), torch.randn(4, 8, 3)
    with mode():
        want = rnnkit.unroll(cell, x, return_states=True, backend="reference")
        calls = _spy(monkeypatch)
        got = rnnkit.unroll(cell, x, return_states=True, backend="native")
    assert calls == {"workspace": 1, "recomputed": 0}
    assert not got.states.c.requires_grad
    _assert_close(tree_flatten(got.states)[0], tree_flatten(want.states)[0])


def test_layers_stack_both_ways_with_every_state():
    torch.manual_seed(0)
    fast = rnnkit.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True, backend="native")
    slow = rnnkit.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True, backend="reference")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(5, 7, 3)
    got, want = fast(x, return_states=True), slow(x, return_states=True)
    _assert_close([got.output, *got.states], [want.output, *want.states])
    # like torch's, the final state is a tensor of its own: the truncated-backprop idiom works on it
    h_n = got.hidden[0]
    h_n.detach_()
    assert not got.output.requires_grad or got.output.grad_fn is not None
    (got.states.c.square().sum() + got.output.sum()).backward()
    (want.states.c.square().sum() + want.output.sum()).backward()
    _assert_close([p.grad for p in fast.parameters()], [p.grad for p in slow.parameters()])


def test_flushed_region_passes_no_gradient_to_outputs_the_loss_never_reads():
    """None, not zeros: zeros would make every node behind an unread output compute."""
    ran = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.set_materialize_grads(False)
            return a * 3

        @staticmethod
        def backward(ctx, g):
            ran.append(g)
            return None if g is None else g * 3

    a = torch.randn(3, requires_grad=True)
    used, unused = fpmode.flushed_region(lambda t: (t * 2, Spy.apply(t)), (a,))
    used.sum().backward()
    assert all(g is None for g in ran)
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0))


def test_without_the_expected_op_the_states_are_recomputed(monkeypatch):
    """A torch whose ``aten.mkldnn_rnn_layer`` differs from the one this code knows is never called."""
    monkeypatch.setattr(native, "_LAYER_OP_OK", False)
    cell, x = _cell(), torch.randn(4, 6, 3)
    state = LSTMState(torch.randn(4, 5), torch.randn(4, 5))
    assert not native.states_from_workspace(cell, x)
    _agrees(monkeypatch, cell, x, state, {"workspace": 0, "recomputed": 1})


def test_the_op_is_recognised_in_this_torch():
    assert native._LAYER_OP_OK  # else every LSTM return_states call would silently take the slower route


def test_inference_in_chunks_of_time(monkeypatch):
    """Without gradients the calls keep their workspace for the states, so long ones are chunked too."""
    monkeypatch.setattr(native, "allocator_tuned", lambda: False)
    monkeypatch.setattr(native, "WHOLE_GATE_BYTES", 0)
    monkeypatch.setattr(native, "CHUNK_GATE_BYTES", 3 * 4 * 4 * 20)
    cell, x = _cell(), torch.randn(4, 11, 3)
    assert native.chunk_steps(cell, x.transpose(0, 1), [cell.weight_ih], workspace=True) == 3
    with torch.no_grad():
        assert native.chunk_steps(cell, x.transpose(0, 1), [cell.weight_ih]) == 11
        want = rnnkit.unroll(cell, x, return_states=True, backend="reference")
        calls = _spy(monkeypatch)
        got = rnnkit.unroll(cell, x, return_states=True, backend="native")
    assert calls == {"workspace": 1, "recomputed": 0}
    _assert_close([got.outputs, *tree_flatten(got.states)[0]], [want.outputs, *tree_flatten(want.states)[0]])


@pytest.mark.parametrize("N, H, T", [(1, 1, 5), (1, 1, 2), (2, 1, 3), (3, 5, 4), (1, 16, 3)])
def test_tiny_states_are_recomputed_not_looked_up(monkeypatch, N, H, T):
    """A step's c of fewer than 16 floats could match anywhere by chance: those are recomputed."""
    torch.manual_seed(0)
    cell, x = LSTMCell(2, H), torch.randn(N, T, 2)
    state = LSTMState(torch.randn(N, H), torch.randn(N, H))
    looked_up = N * H >= native._MIN_BLOCK
    _agrees(monkeypatch, cell, x, state, {"workspace": int(looked_up), "recomputed": 1})


def test_the_shapes_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(native, "_SLOTS", {})
    monkeypatch.setattr(native, "_MAX_SHAPES", 2)
    cell = _cell()
    for T in (3, 4, 5):
        rnnkit.unroll(cell, torch.randn(4, T, 3), return_states=True, backend="native")
    assert [k[0] for k in native._SLOTS] == [4, 5]
