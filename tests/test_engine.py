"""The unroll engine: every-step states, lengths, reverse, layouts, backends agreeing, user cells, errors."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from conftest import BACKENDS, require_backend
from harness import step_by_hand
from torch import Tensor, nn

from rnnkit import GRUCell, LayerNormLSTMCell, LSTMCell, LSTMState, RNNCell, ShapeError, UnrollResult, unroll
from rnnkit.engine import tree_flatten

pytestmark = pytest.mark.usefixtures("single_thread")

I, H, P, N, T = 3, 4, 2, 3, 5
LENGTHS = [5, 2, 3]
SHORT = [3, 1, 2]  # every sequence ends before T

CELLS = {
    "lstm": lambda: LSTMCell(I, H),
    "gru": lambda: GRUCell(I, H),
    "rnn": lambda: RNNCell(I, H),
}
AGREE_CELLS = {
    **CELLS,
    "lstm_forget_bias": lambda: LSTMCell(I, H, forget_bias=1.0),
    "lstm_nobias": lambda: LSTMCell(I, H, bias=False),
    "lstm_nobias_forget_bias": lambda: LSTMCell(I, H, bias=False, forget_bias=1.0),
    "lstm_proj": lambda: LSTMCell(I, H, proj_size=P),
    "gru_nobias": lambda: GRUCell(I, H, bias=False),
    "rnn_relu": lambda: RNNCell(I, H, nonlinearity="relu"),
    "rnn_nobias": lambda: RNNCell(I, H, bias=False),
    # no native kernel for these: compared wherever a backend's unsupported() lets them run
    "lstm_peepholes": lambda: LSTMCell(I, H, peepholes=True),
    "lstm_clip": lambda: LSTMCell(I, H, cell_clip=0.5),
    "gru_reset_before": lambda: GRUCell(I, H, reset_after=False),
    "layernorm_lstm": lambda: LayerNormLSTMCell(I, H),
}


def flat(state) -> list[Tensor]:
    return tree_flatten(state)[0]


def assert_trees_close(got, want, **kw) -> None:
    assert type(got) is type(want), f"{type(got).__name__} != {type(want).__name__}"
    for g, w in zip(flat(got), flat(want), strict=True):
        torch.testing.assert_close(g, w, **kw)


def make_case(backend: str, make=CELLS["lstm"], dtype=torch.float32, n: int = N, t: int = T):
    cell = make().to(dtype)
    x = torch.randn(n, t, I, dtype=dtype)
    require_backend(backend, cell, x)
    return cell, x


# ----------------------------------------------------------------------------- every-step states


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_states_equal_stepping_by_hand(backend: str, kind: str) -> None:
    cell, x = make_case(backend, CELLS[kind])
    res = unroll(cell, x, return_states=True, backend=backend)
    state = cell.init_state(N)
    hs, cs = [], []
    for t in range(T):
        state = cell(x[:, t], state)
        hs.append(state.h if kind == "lstm" else state)
        cs.append(state.c if kind == "lstm" else None)
    if kind == "lstm":
        assert isinstance(res.states, LSTMState)
        assert res.states.h.shape == res.states.c.shape == (N, T, H)
        torch.testing.assert_close(res.states.h, torch.stack(hs, 1))
        torch.testing.assert_close(res.states.c, torch.stack(cs, 1))
        torch.testing.assert_close(res.outputs, res.states.h)
    else:
        assert res.states.shape == (N, T, H)
        torch.testing.assert_close(res.states, torch.stack(hs, 1))
        torch.testing.assert_close(res.outputs, res.states)
    assert_trees_close(res.final_state, state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proj_lstm_states_have_projected_h(backend: str) -> None:
    cell, x = make_case(backend, AGREE_CELLS["lstm_proj"])
    res = unroll(cell, x, lengths=LENGTHS, return_states=True, backend=backend)
    assert res.outputs.shape == res.states.h.shape == (N, T, P)
    assert res.states.c.shape == (N, T, H)
    assert res.final_state.h.shape == (N, P) and res.final_state.c.shape == (N, H)


# ----------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("lengths", [LENGTHS, SHORT], ids=["some_full", "all_short"])
@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_semantics(backend: str, kind: str, lengths: list[int]) -> None:
    cell, x = make_case(backend, CELLS[kind])
    zero = cell.init_state(N)
    state0 = tree_flatten(zero)[1]([torch.randn_like(z) for z in flat(zero)])
    res = unroll(cell, x, state0, lengths=lengths, return_states=True, backend=backend)
    for n, L in enumerate(lengths):
        # each sequence alone, run for its own length only
        own_state0 = tree_flatten(zero)[1]([s[n : n + 1] for s in flat(state0)])
        own = unroll(cell, x[n : n + 1, :L], own_state0, return_states=True, backend=backend)
        torch.testing.assert_close(res.outputs[n, :L], own.outputs[0])
        for got, want in zip(flat(res.final_state), flat(own.final_state), strict=True):
            torch.testing.assert_close(got[n], want[0])  # the final state is at the sequence's own end
        for got, want in zip(flat(res.states), flat(own.states), strict=True):
            torch.testing.assert_close(got[n, :L], want[0])
        # outputs past the end are exactly zero; states past the end repeat the final state exactly
        assert torch.equal(res.outputs[n, L:], torch.zeros_like(res.outputs[n, L:]))
        for st, fin in zip(flat(res.states), flat(res.final_state), strict=True):
            assert torch.equal(st[n, L:], fin[n].expand_as(st[n, L:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_forms_and_full_lengths(backend: str) -> None:
    cell, x = make_case(backend, CELLS["gru"])
    base = unroll(cell, x, lengths=LENGTHS, backend=backend)
    for lengths in (torch.tensor(LENGTHS), torch.tensor(LENGTHS, dtype=torch.int32), tuple(LENGTHS)):
        torch.testing.assert_close(unroll(cell, x, lengths=lengths, backend=backend).outputs, base.outputs)
    full = unroll(cell, x, lengths=[T] * N, backend=backend)
    torch.testing.assert_close(full.outputs, unroll(cell, x, backend=backend).outputs)


# ----------------------------------------------------------------------------- reverse


def flip_within(x: Tensor, lengths: list[int]) -> Tensor:
    """Reverse each sequence (batch-first) within its own length; padding stays where it is."""
    out = x.clone()
    for n, L in enumerate(lengths):
        out[n, :L] = x[n, :L].flip(0)
    return out


@pytest.mark.parametrize("use_lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_equals_forward_on_flipped_sequences(backend: str, kind: str, use_lengths: bool) -> None:
    cell, x = make_case(backend, CELLS[kind])
    lengths = LENGTHS if use_lengths else [T] * N
    res = unroll(cell, x, lengths=lengths if use_lengths else None, reverse=True, return_states=True,
                 backend=backend)
    fwd = unroll(cell, flip_within(x, lengths), lengths=lengths, return_states=True, backend=backend)
    torch.testing.assert_close(res.outputs, flip_within(fwd.outputs, lengths))
    assert_trees_close(res.final_state, fwd.final_state)
    for got, want in zip(flat(res.states), flat(fwd.states)):
        torch.testing.assert_close(got, flip_within(want, lengths))
    for n, L in enumerate(lengths):
        assert not res.outputs[n, L:].any()
    # and it is not the forward pass: the first step of a reversed run has seen the whole sequence
    plain = unroll(cell, x, lengths=lengths, backend=backend)
    assert not torch.allclose(plain.outputs, res.outputs)


# ----------------------------------------------------------------------------- layout, state, result type


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_first_false_transposes(backend: str, kind: str) -> None:
    cell, x = make_case(backend, CELLS[kind])
    bf = unroll(cell, x, lengths=LENGTHS, reverse=True, return_states=True, backend=backend)
    tf = unroll(cell, x.transpose(0, 1).contiguous(), lengths=LENGTHS, reverse=True, return_states=True,
                batch_first=False, backend=backend)
    assert tf.outputs.shape == (T, N, H)
    torch.testing.assert_close(tf.outputs, bf.outputs.transpose(0, 1))
    assert_trees_close(tf.final_state, bf.final_state)
    for a, b in zip(flat(tf.states), flat(bf.states)):
        torch.testing.assert_close(a, b.transpose(0, 1))


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_state_is_used(backend: str, kind: str) -> None:
    cell, x = make_case(backend, CELLS[kind])
    zero = cell.init_state(N)
    state = tree_flatten(zero)[1]([torch.randn_like(z) for z in flat(zero)])
    res = unroll(cell, x, state, lengths=LENGTHS, return_states=True, backend=backend)
    out, final, states = step_by_hand(cell, x, state, LENGTHS, reverse=False)
    torch.testing.assert_close(res.outputs, out)
    assert_trees_close(res.final_state, final)
    assert_trees_close(res.states, states)
    assert not torch.allclose(res.outputs, unroll(cell, x, lengths=LENGTHS, backend=backend).outputs)
    if kind == "lstm":  # a plain (h, c) tuple is accepted like torch's and comes back as LSTMState
        plain = unroll(cell, x, (state.h, state.c), lengths=LENGTHS, backend=backend)
        assert isinstance(plain.final_state, LSTMState)
        torch.testing.assert_close(plain.outputs, res.outputs)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_result_type_and_states_only_when_asked(backend: str) -> None:
    for kind, make in CELLS.items():
        cell = make()
        x = torch.randn(N, T, I)
        if backend != "auto":
            require_backend(backend, cell, x)
        for kw in ({}, {"lengths": LENGTHS}, {"reverse": True}, {"lengths": LENGTHS, "reverse": True}):
            res = unroll(cell, x, backend=backend, **kw)
            assert type(res) is UnrollResult and res.states is None, (kind, kw)
            assert res.outputs.shape == (N, T, H)
            res = unroll(cell, x, backend=backend, return_states=True, **kw)
            assert type(res) is UnrollResult and res.states is not None, (kind, kw)
            assert type(res.states) is type(res.final_state) is type(cell.init_state(N))


# ----------------------------------------------------------------------------- backends agree


def _values_and_grads(cell, x, state, backend, **kw):
    x = x.detach().requires_grad_()
    state = tree_flatten(state)[1]([s.detach().requires_grad_() for s in flat(state)])
    res = unroll(cell, x, state, return_states=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    parts = [res.outputs, *flat(res.final_state), *flat(res.states)]
    loss = sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() for p in parts)
    grads = torch.autograd.grad(loss, [x, *flat(state), *cell.parameters()])
    return parts, grads


@pytest.mark.parametrize(
    "kw",
    [{}, {"lengths": LENGTHS}, {"reverse": True}, {"lengths": SHORT, "reverse": True}],
    ids=["plain", "lengths", "reverse", "short_lengths_reverse"],
)
@pytest.mark.parametrize("kind", list(AGREE_CELLS))
@pytest.mark.parametrize("backend", ["native", "fused", "auto"])
def test_backends_agree_with_reference(backend: str, kind: str, kw: dict) -> None:
    cell, x = make_case("reference", AGREE_CELLS[kind], dtype=torch.float64)
    if backend != "auto":
        require_backend(backend, cell, x)
    zero = cell.init_state(N)
    state = tree_flatten(zero)[1]([torch.randn_like(z) for z in flat(zero)])
    want_vals, want_grads = _values_and_grads(cell, x, state, "reference", **kw)
    got_vals, got_grads = _values_and_grads(cell, x, state, backend, **kw)
    for g, w in zip(got_vals, want_vals, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
    names = ["x", *(f"state{k}" for k in range(len(flat(zero)))), *dict(cell.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("kind", list(AGREE_CELLS))
@pytest.mark.parametrize("backend", ["native", "fused"])
def test_float32_backends_agree(backend: str, kind: str) -> None:
    cell, x = make_case(backend, AGREE_CELLS[kind])
    want = unroll(cell, x, lengths=LENGTHS, reverse=True, return_states=True, backend="reference")
    got = unroll(cell, x, lengths=LENGTHS, reverse=True, return_states=True, backend=backend)
    torch.testing.assert_close(got.outputs, want.outputs, atol=1e-5, rtol=1e-4)
    assert_trees_close(got.final_state, want.final_state, atol=1e-5, rtol=1e-4)
    assert_trees_close(got.states, want.states, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unroll_matches_torch_layers(backend: str, kind: str) -> None:
    """Independent oracle: torch.nn.LSTM/GRU/RNN over whole sequences, packed for variable lengths."""
    cell, x = make_case(backend, AGREE_CELLS[kind])
    if kind.startswith("lstm"):
        ref = nn.LSTM(I, H, batch_first=True, proj_size=cell.proj_size)
    elif kind == "gru":
        ref = nn.GRU(I, H, batch_first=True)
    else:
        ref = nn.RNN(I, H, batch_first=True, nonlinearity=cell.nonlinearity)
    ref.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True,
                                               enforce_sorted=False)
    out, final = ref(packed)
    out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
    res = unroll(cell, x, lengths=LENGTHS, backend=backend)
    torch.testing.assert_close(res.outputs, out)
    for got, want in zip(flat(res.final_state), final if isinstance(final, tuple) else [final]):
        torch.testing.assert_close(got, want[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unroll_gradcheck_lengths_reverse(backend: str) -> None:
    for kind in ("lstm", "gru", "rnn"):
        cell, x = make_case(backend, CELLS[kind], dtype=torch.float64, n=2, t=3)
        x.requires_grad_()
        zero = cell.init_state(2)
        leaves, rebuild = tree_flatten(zero)
        leaves = [torch.randn_like(z).requires_grad_() for z in leaves]

        def fn(x, *state, cell=cell, rebuild=rebuild):
            res = unroll(cell, x, rebuild(list(state)), lengths=[3, 2], reverse=True, return_states=True,
                         backend=backend)
            return (res.outputs, *flat(res.final_state), *flat(res.states))

        assert torch.autograd.gradcheck(fn, (x, *leaves))


# ----------------------------------------------------------------------------- user cells


class PeepState(NamedTuple):
    h: Tensor
    acc: Tensor


class UserTupleCell(nn.Module):
    """No rnnkit base class: forward(x, state) and init_state only, a plain tuple state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.wx = nn.Linear(input_size, hidden_size)
        self.wh = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return (z, z.clone())

    def forward(self, x, state):
        h, acc = state
        h = torch.tanh(self.wx(x) + self.wh(h))
        return (h, acc + h)


class UserNamedTupleCell(UserTupleCell):
    def init_state(self, batch_size, device=None, dtype=None):
        return PeepState(*super().init_state(batch_size, device, dtype))

    def forward(self, x, state):
        return PeepState(*super().forward(x, state))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("make", [UserTupleCell, UserNamedTupleCell], ids=["tuple", "namedtuple"])
def test_user_cell_runs_with_lengths_reverse_states(make, reverse: bool) -> None:
    cell = make(I, H)
    x = torch.randn(N, T, I, requires_grad=True)
    res = unroll(cell, x, lengths=LENGTHS, reverse=reverse, return_states=True)
    out, final, states = step_by_hand(cell, x, cell.init_state(N), LENGTHS, reverse)
    want_type = PeepState if make is UserNamedTupleCell else tuple
    assert type(res.final_state) is want_type and type(res.states) is want_type
    torch.testing.assert_close(res.outputs, out)
    assert_trees_close(res.final_state, final)
    assert_trees_close(res.states, states)
    assert res.states[1].shape == (N, T, H)
    res.outputs.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in cell.parameters())
    with pytest.raises(ShapeError, match="backend='native' cannot run"):
        unroll(cell, x, backend="native")


def test_user_namedtuple_state_given_as_plain_tuple_keeps_type() -> None:
    cell = UserNamedTupleCell(I, H)
    x, h0, acc0 = torch.randn(N, T, I), torch.randn(N, H), torch.ones(N, H)
    res = unroll(cell, x, (h0, acc0), return_states=True)
    assert type(res.final_state) is PeepState and type(res.states) is PeepState
    assert_trees_close(res.states, step_by_hand(cell, x, PeepState(h0, acc0), [T] * N, False)[2])


# ----------------------------------------------------------------------------- errors


class CountingLSTM(LSTMCell):
    """Counts every step and input projection, to prove errors come before any computation."""

    calls = 0

    def project_input(self, x):
        type(self).calls += 1
        return super().project_input(x)

    def step(self, xp, state):
        type(self).calls += 1
        return super().step(xp, state)


def _raises(match: str, *args, **kwargs) -> ShapeError:
    CountingLSTM.calls = 0
    with pytest.raises(ShapeError, match=match) as err:
        unroll(*args, **kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    assert CountingLSTM.calls == 0, "the cell ran before the error"
    return err.value


def test_error_wrong_rank() -> None:
    cell = CountingLSTM(I, H)
    _raises(r"expected x of shape \(N, T, I\) \(batch_first=True\), got \(3, 3\)", cell, torch.randn(N, I))
    _raises(r"expected x of shape \(T, N, I\) \(batch_first=False\), got \(1, 3, 5, 3\)",
            cell, torch.randn(1, N, T, I), batch_first=False)
    _raises("empty time axis", cell, torch.randn(N, 0, I))


def test_error_wrong_feature_size() -> None:
    _raises(rf"x has {I + 2} features but the cell expects input_size={I}", CountingLSTM(I, H),
            torch.randn(N, T, I + 2))


def test_error_wrong_state_shape() -> None:
    cell = CountingLSTM(I, H)
    _raises(r"expected a state like LSTMState\(Tensor\(3, 4\), Tensor\(3, 4\)\), "
            r"got LSTMState\(Tensor\(3, 4\), Tensor\(3, 5\)\)",
            cell, torch.randn(N, T, I), LSTMState(torch.zeros(N, H), torch.zeros(N, H + 1)))
    _raises(r"expected a state like Tensor\(3, 4\), got Tensor\(2, 4\)",
            GRUCell(I, H), torch.randn(N, T, I), torch.zeros(2, H))
    _raises(r"the state is torch.float64 on cpu, expected torch.float32",
            GRUCell(I, H), torch.randn(N, T, I), torch.zeros(N, H, dtype=torch.float64))


def test_error_wrong_state_structure() -> None:
    x = torch.randn(N, T, I)
    h = torch.zeros(N, H)
    _raises(r"expected a state like LSTMState\(Tensor\(3, 4\), Tensor\(3, 4\)\), got Tensor\(3, 4\)",
            CountingLSTM(I, H), x, h)
    _raises(r"got tuple\(Tensor\(3, 4\), Tensor\(3, 4\), Tensor\(3, 4\)\)", CountingLSTM(I, H), x, (h, h, h))
    _raises(r"expected a state like Tensor\(3, 4\), got tuple\(Tensor\(3, 4\)\)", GRUCell(I, H), x, (h,))
    _raises(r"got tuple\(tuple\(Tensor\(3, 4\), Tensor\(3, 4\)\)\)", CountingLSTM(I, H), x, ((h, h),))
    _raises(r"got LSTMState\(Tensor\(3, 4\), tuple\(Tensor\(3, 4\)\)\)", CountingLSTM(I, H), x,
            LSTMState(h, (h,)))
    _raises(r"got str", GRUCell(I, H), x, "h")
    _raises(r"got tuple\(Tensor\(3, 4\), NoneType\)", CountingLSTM(I, H), x, (h, None))


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([0, 2, 3], r"lengths must be in \[1, T=5\], got values from 0 to 3"),
        ([6, 2, 3], r"lengths must be in \[1, T=5\], got values from 2 to 6"),
        ([5, 2], r"lengths must have shape \(3,\), one per sequence, got \(2,\)"),
        ([[5, 2, 3]], r"lengths must have shape \(3,\), one per sequence, got \(1, 3\)"),
        ([5.0, 2.0, 3.0], "lengths must be integers, got torch.float32"),
        (torch.tensor([5, 2, 3], dtype=torch.float64), "lengths must be integers, got torch.float64"),
        (torch.tensor([True, True, True]), "lengths must be integers, got torch.bool"),
    ],
    ids=["zero", "too_long", "too_few", "2d", "float_list", "float_tensor", "bool"],
)
def test_error_bad_lengths(lengths, match: str) -> None:
    _raises(match, CountingLSTM(I, H), torch.randn(N, T, I), lengths=lengths)


def test_error_dtype_mismatch_and_non_floating_x() -> None:
    _raises(r"x is torch.float64 on cpu but the cell's parameters are torch.float32 on cpu",
            CountingLSTM(I, H), torch.randn(N, T, I, dtype=torch.float64))
    _raises(r"x must be floating point, got torch.int64", CountingLSTM(I, H),
            torch.ones(N, T, I, dtype=torch.long))
    _raises(r"expected x to be a Tensor, got list", CountingLSTM(I, H), [[[0.0] * I]])


def test_error_unknown_backend() -> None:
    _raises(r"backend must be one of \('auto', 'reference', 'native', 'fused', 'compiled', 'traced', 'triton'\), "
            r"got 'cudnn'",
            CountingLSTM(I, H), torch.randn(N, T, I), backend="cudnn")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: LSTMCell(I, H, peepholes=True), "peepholes"),
        (lambda: LSTMCell(I, H, cell_clip=1.0), "clipping"),
        (lambda: GRUCell(I, H, reset_after=False), "reset_after"),
        (lambda: LayerNormLSTMCell(I, H), "LayerNormLSTMCell"),
        (lambda: CountingLSTM(I, H), "CountingLSTM"),
    ],
)
def test_error_forcing_native_on_unsupported_cell(make, reason: str) -> None:
    CountingLSTM.calls = 0
    with pytest.raises(ShapeError, match=rf"backend='native' cannot run this cell: .*{reason}") as err:
        unroll(make(), torch.randn(N, T, I), backend="native")
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    assert CountingLSTM.calls == 0


def test_unsupported_cells_run_under_auto() -> None:
    for make in (lambda: LSTMCell(I, H, peepholes=True), lambda: GRUCell(I, H, reset_after=False),
                 lambda: LayerNormLSTMCell(I, H)):
        cell = make()
        x = torch.randn(N, T, I)
        torch.testing.assert_close(unroll(cell, x, lengths=LENGTHS).outputs,
                                   unroll(cell, x, lengths=LENGTHS, backend="reference").outputs)


def test_counting_cell_counts() -> None:  # the guard of the error tests is live
    CountingLSTM.calls = 0
    unroll(CountingLSTM(I, H), torch.randn(N, T, I))
    assert CountingLSTM.calls == T + 1  # one hoisted projection, T steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_non_finite_padding_past_the_lengths_leaves_gradients_finite(backend, kind):
    torch.manual_seed(0)
    cell = CELLS[kind]()
    x = torch.randn(N, T, I)
    for n, length in enumerate(SHORT):  # the log of a zero pad, say: never read by the result
        x[n, length:] = float("-inf") if n % 2 else float("nan")
    require_backend(backend, cell, x)
    r = unroll(cell, x, lengths=SHORT, backend=backend)
    clean = unroll(cell, x.nan_to_num(0.0, 0.0, 0.0), lengths=SHORT, backend=backend)
    torch.testing.assert_close(r.outputs, clean.outputs)
    loss = r.outputs.sum() + tree_flatten(r.final_state)[0][0].sum()
    grads = torch.autograd.grad(loss, list(cell.parameters()))
    assert all(bool(g.isfinite().all()) for g in grads)


class _StepCell(nn.Module):
    """A cell whose forward is given: for the mistakes a user's step can make."""

    def __init__(self, step, init=None) -> None:
        super().__init__()
        self.lin = nn.Linear(I + H, H)
        self.step_fn, self.init = step, init

    def init_state(self, batch_size: int, device=None, dtype=None):
        if self.init is not None:
            return self.init(batch_size)
        return torch.zeros(batch_size, H, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor):
        return self.step_fn(torch.tanh(self.lin(torch.cat([x, h], 1))), h)


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("step, says", [
    (lambda new, h: torch.cat([new, h[:, :2]], 1), f"returned Tensor({N}, {H + 2}) for a state of Tensor({N}, {H})"),
    (lambda new, h: new.double(), "torch.float64 for a state of"),
    (lambda new, h: (new, new.sum(1)), f"returned tuple(Tensor({N}, {H}), Tensor({N},)) for a state of Tensor"),
    (lambda new, h: None, "returned NoneType for a state of"),
])
def test_a_step_that_returns_another_kind_of_state_is_one_clear_error(backend, step, says):
    with pytest.raises(ShapeError, match=r"unroll: _StepCell.forward\(x, state\) returned") as e:
        unroll(_StepCell(step), torch.randn(N, T, I), backend=backend)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_init_state_that_ignores_its_dtype_is_one_clear_error():
    cell = _StepCell(lambda new, h: new.to(h.dtype), init=lambda n: torch.zeros(n, H)).double()
    with pytest.raises(ShapeError, match=r"init_state\(3, device=cpu, dtype=torch.float64\) returned torch.float32"):
        unroll(cell, torch.randn(N, T, I, dtype=torch.float64))


class _MatCell(nn.Module):
    """A user cell whose products run in the autocast dtype (``@`` is on autocast's list)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(I + H, H) * 0.3)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, H, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(torch.cat([x, h.to(x.dtype)], 1) @ self.w)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_user_cell_under_autocast_steps_in_the_autocast_dtype(backend):
    # the state check takes the autocast dtype for the state's own, as torch's cells return it
    x = torch.randn(N, T, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = unroll(_MatCell(), x, backend=backend)
    assert r.outputs.dtype == torch.bfloat16 and bool(r.outputs.isfinite().all())


class _SplitCell(_StepCell):
    """A cell with project_input/step whose step returns half the state."""

    def project_input(self, x: Tensor) -> Tensor:
        return x

    def step(self, xp: Tensor, h: Tensor) -> Tensor:
        return h[:, : H // 2]


@pytest.mark.parametrize("options", [{}, {"zoneout": 0.1}, {"recurrent_dropout": 0.1}])
def test_a_bad_state_names_the_users_cell_and_method_not_a_wrapper(options):
    from rnnkit import RNN

    layer = RNN(I, H, cell=lambda i, h: _SplitCell(lambda new, old: new), **options)
    with pytest.raises(ShapeError, match=r"^unroll: _SplitCell.step\(xp, state\) returned Tensor\(3, 2\)"):
        layer(torch.randn(T, N, I))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_built_in_cells_in_the_reference_loop_step_under_autocast(kind):
    from rnnkit import GRU, LSTM, RNN

    layer = {"rnn": RNN, "gru": GRU, "lstm": LSTM}[kind](I, H, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(torch.randn(T, N, I))
    out.float().sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in layer.parameters())


class _Narrowing(_StepCell):
    """A step that returns one column of a five-wide state: zoneout's mixing would broadcast it."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h[:, :1]


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_does_not_broadcast_a_wrong_state_away(training):
    from rnnkit import RNN

    layer = RNN(I, H, cell=lambda i, h: _Narrowing(None), zoneout=0.1).train(training)
    with pytest.raises(ShapeError, match=rf"_Narrowing.forward\(x, state\) returned Tensor\({N}, 1\)"):
        layer(torch.randn(T, N, I))


def test_zoneout_in_eval_mode_runs_under_autocast():
    from rnnkit import RNN

    layer = RNN(I, H, zoneout=0.1, backend="reference").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(torch.randn(T, N, I))
    assert bool(out.float().isfinite().all())


@pytest.mark.parametrize("returned", [lambda new: (new, new), lambda new: None, lambda new: [new]])
def test_zoneout_names_a_step_that_returns_another_kind_of_state(returned):
    from rnnkit import RNN

    layer = RNN(I, H, cell=lambda i, h: _StepCell(lambda new, old: returned(new)), zoneout=0.1)
    with pytest.raises(ShapeError, match=r"_StepCell.forward\(x, state\) returned"):
        layer(torch.randn(T, N, I))


class _PairState(_StepCell):
    """A cell with an (h, c) state whose step returns three leaves."""

    def init_state(self, batch_size: int, device=None, dtype=None):
        z = torch.zeros(batch_size, H, device=device, dtype=dtype)
        return (z, z)

    def forward(self, x: Tensor, state):
        new = torch.tanh(self.lin(torch.cat([x, state[0]], 1)))
        return (new, new, new)


def test_zoneout_does_not_drop_extra_state_leaves():
    from rnnkit import RNN

    layer = RNN(I, H, cell=lambda i, h: _PairState(None), zoneout=0.1)
    with pytest.raises(ShapeError, match=r"_PairState.forward\(x, state\) returned tuple\("):
        layer(torch.randn(T, N, I))
