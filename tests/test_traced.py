"""The traced backend (rnnkit.backends.traced): a user's cell read into products and an elementwise
program that rnnkit's C++ loops run.

Every case is held to the reference loop: outputs, final and every-step states, and the gradients
of x, the initial state and every parameter, over shapes whose rows and units do not fill the
loops' tiles (N 7, H 5 and 37).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import require_cpu_kernels
from test_compiled import MinimalCell, Seed000Cell
from torch import Tensor, nn

import rnnkit
from rnnkit import RNN, unroll
from rnnkit.backends import compiled, traced
from rnnkit.engine import _pick_backend, tree_flatten

Elman = MinimalCell  # one product of the state alone; the input enters through a product too


class TwoProductLSTM(nn.Module):
    """torch.nn.LSTMCell's maths written out: an input product and a recurrent one, added."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        z = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return z, z

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Exotic(nn.Module):
    """A GRU-like cell with separate products, per-unit and scalar parameters, numbers, every
    elementwise op the backend runs, and a state passed through unchanged."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.peep = nn.Parameter(torch.randn(hidden_size) * 0.5)
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("shift", torch.full((1, hidden_size), 0.1))

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[Tensor, Tensor, Tensor]:
        z = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return z, z, z + 1

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        h, m, k = state
        a, b = self.ih(x), self.hh(h)
        r = torch.sigmoid(a[:, :self.hidden_size] + b[:, :self.hidden_size] + self.peep * m)
        z = torch.sigmoid(a[:, self.hidden_size:2 * self.hidden_size] - b[:, self.hidden_size:2 * self.hidden_size])
        n = torch.tanh(a[:, 2 * self.hidden_size:] + r * b[:, 2 * self.hidden_size:]) * self.gain
        n = n + 0.1 * torch.relu(b[:, 2 * self.hidden_size:])  # relu's gradient reads a product's slot itself
        m = 0.9 * m + torch.relu(n - self.shift) / (1.5 + torch.exp(-z)) - (-n) ** 2 / 4
        h = (1 - z) * n + z * h + 0.1 * (2 / (2 + torch.sigmoid(m)))
        return h, m, k.clone()


class LerpGRU(nn.Module):
    """The README's MinimalGRU: torch.lerp between the candidate and the old state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z, n = self.gates(torch.cat([x, h], 1)).chunk(2, 1)
        return torch.lerp(torch.tanh(n), h, torch.sigmoid(z))


class SharedBias(nn.Module):
    """Two input products sharing one bias parameter (its gradient is the sum of both), and a
    recurrent product without one."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.wx = nn.Parameter(torch.randn(hidden_size, input_size) * 0.3)
        self.wz = nn.Parameter(torch.randn(hidden_size, input_size) * 0.3)
        self.ws = nn.Parameter(torch.randn(hidden_size, hidden_size) * 0.3)
        self.b = nn.Parameter(torch.randn(hidden_size) * 0.5)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z = torch.sigmoid(F.linear(x, self.wz, self.b))
        return z * torch.tanh(F.linear(x, self.wx, self.b) + F.linear(h, self.ws)) + (1 - z) * h


class TiedWeight(nn.Module):
    """One weight read by two products, the input's and the state's (input size = hidden size): its
    gradient is the sum of both."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.w = nn.Parameter(torch.randn(hidden_size, hidden_size) * 0.3)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(x @ self.w + h @ self.w)


def test_a_weight_read_by_two_products_sums_their_gradients() -> None:
    torch.manual_seed(0)
    cell = TiedWeight(6, 6).double()
    _assert_match(cell, torch.randn(5, 4, 6, dtype=torch.float64), _random_state(cell, 5, torch.float64))


CELLS = [Seed000Cell, TwoProductLSTM, Exotic, Elman, LerpGRU, SharedBias]


@pytest.fixture(autouse=True)
def _kernels() -> None:
    require_cpu_kernels()
    traced.clear_cache()


def _random_state(cell: nn.Module, n: int, dtype: torch.dtype) -> object:
    leaves, unflatten = tree_flatten(cell.init_state(n, dtype=dtype))
    return unflatten([torch.randn_like(s) * 0.5 for s in leaves])


def _grads(cell: nn.Module, x: Tensor, state: object, backend: str, **kw) -> list[Tensor]:
    """Outputs, final and every-step states, and the gradients of x, the state and the parameters."""
    x = x.detach().clone().requires_grad_(True)
    leaves, unflatten = tree_flatten(state)
    leaves = [s.detach().clone().requires_grad_(True) for s in leaves]
    r = unroll(cell, x, unflatten(leaves), backend=backend, return_states=True, **kw)
    got = [r.outputs, *tree_flatten(r.final_state)[0], *tree_flatten(r.states)[0]]
    gen = torch.Generator().manual_seed(1)
    loss = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in got)
    params = list(cell.parameters())
    grads = torch.autograd.grad(loss, [x, *leaves, *params], allow_unused=True)
    return got + [torch.zeros_like(w) if g is None else g for g, w in zip(grads, [x, *leaves, *params])]


def _assert_match(cell: nn.Module, x: Tensor, state: object, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn: it must not happen here
        got = _grads(cell, x, state, "traced", **kw)
    expected = _grads(cell, x, state, "reference", **kw)
    assert list(traced._PROGRAMS.values())[-1] is not None, traced._WHY
    tol = 1e-10 if x.dtype == torch.float64 else 2e-5
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize(("N", "H"), [(7, 5), (13, 37)])
def test_matches_reference_values_states_and_gradients(cls, N, H) -> None:
    torch.manual_seed(0)
    cell = cls(3, H).double()
    x = torch.randn(N, 6, 3, dtype=torch.float64)
    _assert_match(cell, x, _random_state(cell, N, torch.float64))


@pytest.mark.parametrize("cls", CELLS)
def test_float32_from_the_zero_state(cls) -> None:
    torch.manual_seed(1)
    cell = cls(4, 20)
    x = torch.randn(9, 5, 4)
    _assert_match(cell, x, cell.init_state(9) if cls is not Exotic else _random_state(cell, 9, torch.float32))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cls", [Seed000Cell, Exotic])
def test_variable_lengths_freeze_ended_rows(cls, reverse) -> None:
    torch.manual_seed(2)
    cell = cls(3, 6).double()
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    _assert_match(cell, x, _random_state(cell, 5, torch.float64), lengths=torch.tensor([7, 2, 5, 1, 7]),
                  reverse=reverse)


def test_gradcheck_float64() -> None:
    torch.manual_seed(3)
    cell = Exotic(2, 3).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    s = [t.requires_grad_(True) for t in tree_flatten(_random_state(cell, 4, torch.float64))[0]]
    params = list(cell.parameters())

    def f(x: Tensor, h: Tensor, m: Tensor, *ps: Tensor) -> tuple[Tensor, ...]:
        with torch.nn.utils.stateless._reparametrize_module(cell, dict(zip([n for n, _ in cell.named_parameters()],
                                                                            ps))):
            r = unroll(cell, x, (h, m, s[2].detach()), backend="traced")
        return r.outputs, r.final_state[1]

    assert torch.autograd.gradcheck(f, (x, s[0], s[1], *params))


def test_kept_values_and_pre_activations() -> None:
    # the backward reads what the forward kept; the products' slots only where the adjoint needs them
    for cls, keep in ((Seed000Cell, False), (Exotic, True)):
        cell = cls(3, 4)
        unroll(cell, torch.randn(2, 3, 3), cell.init_state(2), backend="traced")
        prog = list(traced._PROGRAMS.values())[-1]
        assert prog.keep_z is keep and prog.n_saved > 0


def test_auto_picks_it_where_it_would_compile() -> None:
    # long float32 sequences (where auto used to compile); shorter ones stay in the loop, as a trace
    # does not follow a cell's Python side effects (globals, printing): asked for there, not assumed
    cell = Seed000Cell(3, 8)
    assert _pick_backend(cell, torch.randn(2, 4, 3), 4, 2) == "reference"
    assert _pick_backend(cell, torch.randn(2, 300, 3), 300, 2) == "traced"
    assert _pick_backend(cell.double(), torch.randn(2, 300, 3).double(), 300, 2) != "traced"


class _ZeroState(nn.Module):
    hidden_size = 4

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)


class LayerNormCell(_ZeroState):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.lin(torch.cat([x, h], 1))))


class DerivedProduct(_ZeroState):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.wx = nn.Linear(input_size, hidden_size)
        self.wh = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.wx(x) + self.wh(torch.tanh(h)))


@pytest.mark.parametrize(("cls", "why"), [(LayerNormCell, "native_layer_norm"),
                                          (DerivedProduct, "left operand is neither")])
def test_steps_it_cannot_read_fall_back_with_the_reason(cls, why) -> None:
    torch.manual_seed(4)
    cell = cls(3, 4)
    x = torch.randn(3, 5, 3)
    h0 = torch.zeros(3, 4)
    with pytest.warns(UserWarning, match=why):
        got = unroll(cell, x, h0, backend="traced").outputs
    torch.testing.assert_close(got, unroll(cell, x, h0, backend="reference").outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(unroll(cell, x, h0).outputs, got)  # auto: quietly elsewhere
        long = torch.randn(3, 260, 3)
        torch.testing.assert_close(unroll(cell, long, h0).outputs, unroll(cell, long, h0, backend="reference").outputs,
                                   rtol=1e-4, atol=1e-5)  # tried the traced backend, quietly on


def test_second_derivatives_are_refused_clearly() -> None:
    cell = Elman(2, 3)
    x = torch.randn(2, 3, 2, requires_grad=True)
    out = unroll(cell, x, backend="traced").outputs.sum()
    with pytest.raises(RuntimeError, match="second derivatives.*backend='reference'"):
        torch.autograd.grad(out, x, create_graph=True)


def test_a_changed_attribute_is_traced_again() -> None:
    cell = Elman(2, 3, scale=1.0)
    x = torch.randn(2, 3, 2)
    a = unroll(cell, x, backend="traced").outputs
    cell.scale = 0.5
    b = unroll(cell, x, backend="traced").outputs
    torch.testing.assert_close(b, unroll(cell, x, backend="reference").outputs)
    assert not torch.allclose(a, b)


def test_a_stacked_bidirectional_layer_with_lengths_matches_the_loop() -> None:
    torch.manual_seed(5)
    fast = RNN(6, 8, num_layers=2, bidirectional=True, cell=LerpGRU, backend="traced", batch_first=True)
    slow = RNN(6, 8, num_layers=2, bidirectional=True, cell=LerpGRU, backend="reference", batch_first=True)
    slow.load_state_dict(fast.state_dict())
    x, lengths = torch.randn(5, 9, 6), torch.tensor([9, 3, 7, 9, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fast(x, lengths=lengths)[0]
    expected = slow(x, lengths=lengths)[0]
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    got.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_weight_gradients_without_an_input_gradient_keep_only_a_ring_of_steps() -> None:
    # no input gradient: the backward keeps a few steps of the slots' gradients, not all of them
    torch.manual_seed(6)
    cell = Seed000Cell(3, 20)
    x = torch.randn(130, 11, 3)  # 130 rows: each thread's block sums few steps at a time, the ring wraps
    for backend in ("traced", "reference"):
        cell.zero_grad()
        unroll(cell, x, backend=backend).outputs.square().mean().backward()
        if backend == "traced":
            got = [p.grad.clone() for p in cell.parameters()]
    for g, p in zip(got, cell.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


class NegativeSlices(LerpGRU):
    """Slices from the end of a product (a[:, -H:], a[:, :-H]), the state first in the product."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        a = self.gates(torch.cat([h, x], 1))
        return torch.tanh(a[:, -self.hidden_size:]) * torch.sigmoid(a[:, :-self.hidden_size])


def test_slices_from_the_end_and_a_sum_loss() -> None:
    # a .sum() loss hands the backward a broadcast gradient (every stride 0)
    torch.manual_seed(7)
    cell = NegativeSlices(3, 6)
    x = torch.randn(4, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = unroll(cell, x, backend="traced").outputs
    got.sum().backward()
    grads = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    expected = unroll(cell, x, backend="reference").outputs
    expected.sum().backward()
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    for g, p in zip(grads, cell.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


class Counting(Elman):
    """Counts its steps in a buffer, in place: a trace would count once per call, not per step."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        self.steps.add_(1)
        return super().forward(x, h)


class Float64Scale(Elman):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.register_buffer("gain", torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return super().forward(x, h) * self.gain


@pytest.mark.parametrize(("cls", "why"), [(Counting, "in place"), (Float64Scale, "torch.float64 where the input")])
def test_in_place_updates_and_other_dtypes_fall_back_every_call(cls, why) -> None:
    cell = cls(2, 3)
    x = torch.randn(2, 5, 2)
    for call in range(2):  # the refusal is remembered: the second call must not run an unchecked program
        if call == 0:
            with pytest.warns(UserWarning, match=why):
                got = unroll(cell, x, backend="traced").outputs
        else:
            got = unroll(cell, x, backend="traced").outputs
        torch.testing.assert_close(got, unroll(cell, x, backend="reference").outputs)
    if cls is Counting:
        assert int(cell.steps) == 4 * 5  # every step counted, in both backends' calls


@pytest.mark.parametrize("cls", [Seed000Cell, Exotic])
def test_evaluation_keeps_nothing_for_a_backward_and_agrees(cls) -> None:
    torch.manual_seed(8)
    cell = cls(3, 7)
    x, state = torch.randn(4, 6, 3), _random_state(cell, 4, torch.float32)
    expected = unroll(cell, x, state, backend="reference", return_states=True)
    with torch.no_grad():
        got = unroll(cell, x, state, backend="traced", return_states=True)
    for e, g in zip(tree_flatten(tuple(expected))[0], tree_flatten(tuple(got))[0], strict=True):
        torch.testing.assert_close(g, e.detach(), rtol=2e-5, atol=2e-5)


class Annealed(Elman):
    """A temperature kept as a float and changed before every call: a new key each time."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return super().forward(x, h) * self.temperature


def test_auto_stops_tracing_a_cell_whose_attributes_change_every_call() -> None:
    cell = Annealed(2, 3)
    x = torch.randn(2, 4, 2)
    for k in range(6):
        cell.temperature = 1.0 + k / 10
        got = traced.run_quietly(cell, x.transpose(0, 1), cell.init_state(2), None, None, False)[0]
        torch.testing.assert_close(got.transpose(0, 1), unroll(cell, x, backend="reference").outputs)
    traces = sum(1 for key in traced._PROGRAMS if key[0] is Annealed)
    assert traces == compiled._REBUILDS  # then the loop, without tracing again


class SelfChanging(Elman):
    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x, h)


def test_a_cell_that_changes_its_own_attributes_is_refused_once() -> None:
    cell = SelfChanging(2, 3)
    x = torch.randn(2, 4, 2)
    with pytest.warns(UserWarning, match="own attributes"):
        unroll(cell, x, backend="traced")
    unroll(cell, x, backend="traced")
    assert sum(1 for key in traced._PROGRAMS if key[0] is SelfChanging) == 1  # not traced again


def _scaled_step(base: type[nn.Module]) -> type[nn.Module]:
    """A built-in cell with the documented project_input/step split overridden: its state scaled."""

    class Scaled(base):
        def step(self, xp: Tensor, state: object) -> object:
            new = super().step(xp, state)
            return type(new)(*(0.9 * s for s in new)) if isinstance(new, tuple) else 0.9 * new

    return Scaled


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("base", [rnnkit.LSTMCell, rnnkit.GRUCell, rnnkit.RNNCell], ids=lambda c: c.__name__)
def test_a_built_in_cell_with_its_own_step_runs_here(base: type[nn.Module], bias: bool) -> None:
    """A subclass of a built-in cell that overrides step() is read by its split step (the built-in
    forward's state check made zeros the reader refused) and addmm(xp, h, W^T) onto the projected
    input is read as a product plus an addition: values, states and gradients as the loop's."""
    torch.manual_seed(0)
    cell = _scaled_step(base)(3, 5, bias=bias).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    _assert_match(cell, x, _random_state(cell, 4, torch.float64), lengths=torch.tensor([6, 2, 5, 1]))
