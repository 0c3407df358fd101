"""Cells: drop-in parity with torch.nn, the extras against hand-written formulas, gradcheck, errors."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_MODULES, BACKENDS, require_backend
from harness import check_cell
from torch import Tensor, nn

import rnnkit
from rnnkit import Cell, GRUCell, LayerNormLSTMCell, LSTMCell, LSTMState, RNNCell, ShapeError

pytestmark = pytest.mark.usefixtures("single_thread")

I, H, P, N = 3, 5, 2, 4

# kind -> (our class, torch's class, extra constructor arguments)
KINDS = {
    "lstm": (LSTMCell, nn.LSTMCell, {}),
    "gru": (GRUCell, nn.GRUCell, {}),
    "rnn_tanh": (RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}

# every built-in configuration, including all the extras (small sizes: gradcheck runs on these)
CELL_CONFIGS = {
    "lstm": lambda: LSTMCell(I, H),
    "lstm_nobias": lambda: LSTMCell(I, H, bias=False),
    "lstm_forget_bias": lambda: LSTMCell(I, H, forget_bias=1.0),
    "lstm_peepholes": lambda: LSTMCell(I, H, peepholes=True),
    "lstm_clip": lambda: LSTMCell(I, H, cell_clip=0.3),
    "lstm_proj": lambda: LSTMCell(I, H, proj_size=P),
    "lstm_all_extras": lambda: LSTMCell(I, H, forget_bias=1.0, peepholes=True, cell_clip=0.3, proj_size=P),
    "gru": lambda: GRUCell(I, H),
    "gru_nobias": lambda: GRUCell(I, H, bias=False),
    "gru_reset_before": lambda: GRUCell(I, H, reset_after=False),
    "rnn_tanh": lambda: RNNCell(I, H),
    "rnn_relu": lambda: RNNCell(I, H, nonlinearity="relu"),
    "rnn_nobias": lambda: RNNCell(I, H, bias=False),
    "layernorm_lstm": lambda: LayerNormLSTMCell(I, H),
    "layernorm_lstm_nobias_fb": lambda: LayerNormLSTMCell(I, H, bias=False, forget_bias=1.0),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-5}


def leaves(state) -> list[Tensor]:
    return [state] if isinstance(state, Tensor) else list(state)


def randomize_(module: nn.Module, scale: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def random_state(cell: nn.Module, batch: int, dtype=torch.float32, scale: float = 0.5):
    zero = cell.init_state(batch, dtype=dtype)
    return type(zero)(*(torch.randn_like(z) * scale for z in zero)) if isinstance(zero, tuple) else (
        torch.randn_like(zero) * scale
    )


# ----------------------------------------------------------------------------- parity with torch.nn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_parameter_names_and_shapes_equal_torch(kind: str, bias: bool) -> None:
    ours_cls, torch_cls, kw = KINDS[kind]
    ours, ref = ours_cls(I, H, bias=bias, **kw), torch_cls(I, H, bias=bias, **kw)
    assert {k: v.shape for k, v in ours.named_parameters()} == {k: v.shape for k, v in ref.named_parameters()}
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_loads_both_ways(kind: str) -> None:
    ours_cls, torch_cls, kw = KINDS[kind]
    ours, ref = ours_cls(I, H, **kw), torch_cls(I, H, **kw)
    ours.load_state_dict(randomize_(ref).state_dict())
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ours, name), p), name
    ref.load_state_dict(randomize_(ours).state_dict())
    for name, p in ours.named_parameters():
        assert torch.equal(getattr(ref, name), p), name


def test_default_init_is_torchs_uniform_bound() -> None:
    for cell in (LSTMCell(I, 16), GRUCell(I, 16), RNNCell(I, 16)):
        for name, p in cell.named_parameters():
            assert p.abs().max() <= 0.25, name  # 1/sqrt(16)
            assert p.std() > 0.05, name


@pytest.mark.parametrize("given_state", [False, True], ids=["state_none", "state_given"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_step_matches_torch(kind, direction, bias, dtype, batched, given_state) -> None:
    ours_cls, torch_cls, kw = KINDS[kind]
    ours = ours_cls(I, H, bias=bias, dtype=dtype, **kw)
    ref = torch_cls(I, H, bias=bias, dtype=dtype, **kw)
    if direction == "torch_to_ours":
        ours.load_state_dict(ref.state_dict())
    else:
        ref.load_state_dict(ours.state_dict())
    shape = (N, I) if batched else (I,)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    state = None
    if given_state:
        h_shape = (N, H) if batched else (H,)
        n_fields = 2 if kind == "lstm" else 1
        fields = [torch.randn(*h_shape, dtype=dtype, requires_grad=True) for _ in range(n_fields)]
        state = tuple(fields) if kind == "lstm" else fields[0]

    got = leaves(ours(x, LSTMState(*state) if kind == "lstm" and state is not None else state))
    want = leaves(ref(x, state))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol(dtype))

    weights = [torch.randn_like(w) for w in want]
    inputs_ours = [x, *([] if state is None else leaves(state)), *ours.parameters()]
    inputs_ref = [x, *([] if state is None else leaves(state)), *ref.parameters()]
    g_ours = torch.autograd.grad(sum((g * k).sum() for g, k in zip(got, weights)), inputs_ours)
    g_ref = torch.autograd.grad(sum((w * k).sum() for w, k in zip(want, weights)), inputs_ref)
    names = ["x", *(["state"] * (0 if state is None else len(leaves(state)))), *dict(ours.named_parameters())]
    for name, a, b in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m, name=name: f"grad of {name}: {m}")


def test_lstm_state_unpacks_like_torchs_tuple() -> None:
    cell = LSTMCell(I, H)
    h, c = cell(torch.randn(N, I))
    assert h.shape == c.shape == (N, H)
    assert LSTMState._fields == ("h", "c")


# ----------------------------------------------------------------------------- LSTM extras


def lstm_preacts(cell: LSTMCell, x: Tensor, h: Tensor) -> list[Tensor]:
    """The gate pre-activations i, f, g, o written out from the weights (no forget_bias)."""
    Wi, Wh = cell.weight_ih.chunk(4, 0), cell.weight_hh.chunk(4, 0)
    if cell.bias:
        bi, bh = cell.bias_ih.chunk(4), cell.bias_hh.chunk(4)
    else:
        bi = bh = [0.0] * 4
    return [x @ Wi[k].T + bi[k] + h @ Wh[k].T + bh[k] for k in range(4)]


@pytest.mark.parametrize("bias", [True, False])
def test_forget_bias_equals_shifted_forget_slice(bias: bool) -> None:
    fb = 1.5
    cell = LSTMCell(I, H, bias=bias, forget_bias=fb)
    plain = LSTMCell(I, H, bias=True)
    with torch.no_grad():
        plain.weight_ih.copy_(cell.weight_ih)
        plain.weight_hh.copy_(cell.weight_hh)
        plain.bias_ih.copy_(cell.bias_ih if bias else torch.zeros(4 * H))
        plain.bias_hh.copy_(cell.bias_hh if bias else torch.zeros(4 * H))
        plain.bias_ih[H : 2 * H] += fb
    x, state = torch.randn(N, I, requires_grad=True), random_state(cell, N)
    got, want = cell(x, state), plain(x, state)
    torch.testing.assert_close(got.h, want.h)
    torch.testing.assert_close(got.c, want.c)
    gx = torch.autograd.grad(got.h.sum() + got.c.sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(want.h.sum() + want.c.sum(), x)[0])
    assert "forget_bias" not in " ".join(cell.state_dict())  # a constant, not a parameter
    plain_nofb = LSTMCell(I, H, bias=bias)
    plain_nofb.load_state_dict(cell.state_dict())
    assert not torch.allclose(plain_nofb(x, state).c, got.c)  # it does change the result


def test_peepholes_match_formula() -> None:
    cell = LSTMCell(I, H, peepholes=True)
    for name in ("weight_ci", "weight_cf", "weight_co"):
        assert getattr(cell, name).shape == (H,)
    randomize_(cell)
    x, (h, c) = torch.randn(N, I), random_state(cell, N, scale=1.0)
    i, f, g, o = lstm_preacts(cell, x, h)
    i = torch.sigmoid(i + cell.weight_ci * c)
    f = torch.sigmoid(f + cell.weight_cf * c)
    c_new = f * c + i * torch.tanh(g)
    o = torch.sigmoid(o + cell.weight_co * c_new)  # the output gate peeks at the new cell state
    got = cell(x, LSTMState(h, c))
    torch.testing.assert_close(got.c, c_new)
    torch.testing.assert_close(got.h, o * torch.tanh(c_new))
    plain = LSTMCell(I, H)
    plain.load_state_dict({k: v for k, v in cell.state_dict().items() if not k.startswith("weight_c")})
    assert not torch.allclose(plain(x, LSTMState(h, c)).h, got.h)


def test_cell_clip_bounds_c_and_equals_clamp() -> None:
    clip = 0.5
    cell = randomize_(LSTMCell(I, H, cell_clip=clip), scale=2.0)
    plain = LSTMCell(I, H)
    plain.load_state_dict(cell.state_dict())
    x, (h, c) = torch.randn(N, I), random_state(cell, N, scale=3.0)
    got, unclipped = cell(x, LSTMState(h, c)), plain(x, LSTMState(h, c))
    assert (unclipped.c.abs() > clip).any() and (unclipped.c.abs() < clip).any()  # the test bites
    assert got.c.abs().max() <= clip
    torch.testing.assert_close(got.c, unclipped.c.clamp(-clip, clip))
    o = torch.sigmoid(lstm_preacts(cell, x, h)[3])
    torch.testing.assert_close(got.h, o * torch.tanh(got.c))
    states = rnnkit.unroll(cell, torch.randn(N, 7, I), return_states=True, backend="reference").states
    assert states.c.abs().max() <= clip


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_proj_size_matches_torch_lstm(bias: bool, given_state: bool) -> None:
    cell = LSTMCell(I, H, bias=bias, proj_size=P)
    ref = nn.LSTM(I, H, bias=bias, proj_size=P, batch_first=True)
    assert cell.weight_hr.shape == ref.weight_hr_l0.shape == (P, H)
    assert cell.weight_hh.shape == ref.weight_hh_l0.shape == (4 * H, P)
    ref.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    cell.load_state_dict({k[: -len("_l0")]: v for k, v in randomize_(ref).state_dict().items()})
    x = torch.randn(N, I, requires_grad=True)
    h0, c0 = (torch.randn(N, P), torch.randn(N, H)) if given_state else (torch.zeros(N, P), torch.zeros(N, H))
    got = cell(x, LSTMState(h0, c0) if given_state else None)
    assert got.h.shape == (N, P) and got.c.shape == (N, H)
    out, (h1, c1) = ref(x.unsqueeze(1), (h0.unsqueeze(0), c0.unsqueeze(0)))
    torch.testing.assert_close(got.h, h1[0])
    torch.testing.assert_close(got.c, c1[0])
    torch.testing.assert_close(got.h, out[:, 0])
    k = torch.randn(N, P)
    g_ours = torch.autograd.grad((got.h * k).sum(), [x, *cell.parameters()])
    g_ref = torch.autograd.grad((h1[0] * k).sum(), [x, *ref.parameters()])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- GRU / LayerNorm formulas


def test_gru_reset_before_matches_keras_v1_formula() -> None:
    cell = randomize_(GRUCell(I, H, reset_after=False))
    x, h = torch.randn(N, I), torch.randn(N, H)
    Wr, Wz, Wn = cell.weight_ih.chunk(3, 0)
    Ur, Uz, Un = cell.weight_hh.chunk(3, 0)
    bir, biz, bin_ = cell.bias_ih.chunk(3)
    bhr, bhz, bhn = cell.bias_hh.chunk(3)
    z = torch.sigmoid(x @ Wz.T + biz + h @ Uz.T + bhz)
    r = torch.sigmoid(x @ Wr.T + bir + h @ Ur.T + bhr)
    n = torch.tanh(x @ Wn.T + bin_ + (r * h) @ Un.T + bhn)  # reset applied before the matmul
    want = z * h + (1 - z) * n
    torch.testing.assert_close(cell(x, h), want)
    after = GRUCell(I, H)
    after.load_state_dict(cell.state_dict())
    assert not torch.allclose(after(x, h), want)  # the two variants really differ


def layer_norm(v: Tensor, ln: nn.LayerNorm) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_layernorm_lstm_matches_formula(forget_bias: float) -> None:
    cell = randomize_(LayerNormLSTMCell(I, H, forget_bias=forget_bias))
    assert {n for n, _ in cell.named_parameters()} == {
        "weight_ih", "weight_hh", "bias", "ln_ih.weight", "ln_ih.bias", "ln_hh.weight", "ln_hh.bias",
        "ln_c.weight", "ln_c.bias",
    }
    x, h, c = torch.randn(N, I), torch.randn(N, H), torch.randn(N, H)
    gates = layer_norm(x @ cell.weight_ih.T, cell.ln_ih) + layer_norm(h @ cell.weight_hh.T, cell.ln_hh)
    gates = gates + cell.bias
    i, f, g, o = gates.chunk(4, 1)
    c_new = torch.sigmoid(f + forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(layer_norm(c_new, cell.ln_c))
    got = cell(x, LSTMState(h, c))
    torch.testing.assert_close(got.c, c_new)
    torch.testing.assert_close(got.h, h_new)


def test_layernorm_lstm_starts_with_unit_gain() -> None:
    cell = LayerNormLSTMCell(I, H)
    for ln in (cell.ln_ih, cell.ln_hh, cell.ln_c):
        assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and not ln.bias.any()


# ----------------------------------------------------------------------------- gradcheck of one step


@pytest.mark.parametrize("config", list(CELL_CONFIGS))
def test_cell_step_gradcheck(config: str) -> None:
    """One step, float64, with respect to the input, the state and every parameter."""
    cell = CELL_CONFIGS[config]().double()
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x = torch.randn(2, I, dtype=torch.float64, requires_grad=True)
    state = [s.requires_grad_() for s in leaves(random_state(cell, 2, dtype=torch.float64))]

    def step(x, *rest):
        st = LSTMState(*rest[: len(state)]) if len(state) == 2 else rest[0]
        out = torch.func.functional_call(cell, dict(zip(names, rest[len(state) :])), (x, st))
        return tuple(leaves(out))

    assert torch.autograd.gradcheck(step, (x, *state, *params))


# ----------------------------------------------------------------------------- the reusable harness


class TinyState(NamedTuple):
    h: Tensor
    m: Tensor


class PlainTupleCell(nn.Module):
    """A user's cell: a plain nn.Module with forward and init_state only, and a tuple state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def init_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return (z, z.clone())

    def forward(self, x, state):
        h, m = state
        a, b = self.lin(torch.cat([x, h], 1)).chunk(2, 1)
        m = 0.5 * m + torch.tanh(a)
        return (torch.sigmoid(b) * torch.tanh(m), m)


class HoistedCell(Cell):
    """A user's cell on the Cell base class, with a hoisted input projection and a NamedTuple state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size)
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return TinyState(z, z.clone())

    def project_input(self, x):
        return self.inp(x)

    def step(self, xp, state):
        h = torch.tanh(xp + self.rec(state.h))
        return TinyState(h, state.m + h)

    def output(self, state):
        return state.h + state.m


def _harness_dtype(backend: str, config: str) -> torch.dtype:
    """float64 when the backend runs it; float32 when only that; else skip with the backend's reason."""
    for dtype in (torch.float64, torch.float32):
        cell = CELL_CONFIGS[config]().to(dtype)
        if not BACKEND_MODULES[backend].unsupported(cell, torch.zeros(3, 4, I, dtype=dtype)):
            return dtype
    require_backend(backend, CELL_CONFIGS[config]().double(), torch.zeros(3, 4, I, dtype=torch.float64))
    raise AssertionError("unreachable: require_backend skips")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CELL_CONFIGS))
def test_harness_on_builtin_cells(config: str, backend: str) -> None:
    dtype = _harness_dtype(backend, config)
    check_cell(CELL_CONFIGS[config], I, backend=backend, dtype=dtype, gradcheck=dtype == torch.float64)


@pytest.mark.parametrize("factory", [lambda: PlainTupleCell(I, H), lambda: HoistedCell(I, H)],
                         ids=["plain", "hoisted"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_harness_on_custom_cells(factory, backend: str) -> None:
    check_cell(factory, I, backend=backend)
    check_cell(factory, I, backend=backend, dtype=torch.float32, gradcheck=False, batch_size=2, seq_len=3)


def test_harness_catches_a_broken_cell() -> None:
    class NonZeroInit(PlainTupleCell):  # breaks the protocol: the initial state must be zeros
        def init_state(self, batch_size, device=None, dtype=None):
            return tuple(s + 1 for s in super().init_state(batch_size, device, dtype))

    with pytest.raises(AssertionError, match="not all zeros"):
        check_cell(lambda: NonZeroInit(I, H), I, gradcheck=False)


# ----------------------------------------------------------------------------- errors


def _check_both_bases(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, ShapeError)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh", "layernorm_lstm"])
def test_cell_wrong_feature_size(kind: str) -> None:
    cell = CELL_CONFIGS[kind]()
    with pytest.raises(ShapeError, match=rf"input has {I + 1} features, expected input_size={I}") as err:
        cell(torch.randn(N, I + 1))
    _check_both_bases(err)
    with pytest.raises(ShapeError, match=rf"input has {I + 1} features"):
        cell(torch.randn(I + 1))  # unbatched


@pytest.mark.parametrize(
    ("cell", "state", "expected", "got"),
    [
        (lambda: GRUCell(I, H), lambda: torch.zeros(N, H + 1), (N, H), (N, H + 1)),
        (lambda: RNNCell(I, H), lambda: torch.zeros(N + 1, H), (N, H), (N + 1, H)),
        (lambda: LSTMCell(I, H), lambda: (torch.zeros(N, H), torch.zeros(N, H + 2)), (N, H), (N, H + 2)),
        (lambda: LSTMCell(I, H, proj_size=P), lambda: (torch.zeros(N, H), torch.zeros(N, H)), (N, P), (N, H)),
    ],
    ids=["gru", "rnn_batch", "lstm_c", "lstm_proj_h"],
)
def test_cell_wrong_state_shape(cell, state, expected, got) -> None:
    with pytest.raises(ShapeError, match=rf"expected a state of shape \({expected[0]}, {expected[1]}\), "
                       rf"got \({got[0]}, {got[1]}\)") as err:
        cell()(torch.randn(N, I), state())
    _check_both_bases(err)


def test_cell_other_bad_inputs() -> None:
    lstm = LSTMCell(I, H)
    with pytest.raises(ShapeError, match=r"expected a state of 2 tensor\(s\), got 1"):
        lstm(torch.randn(N, I), torch.zeros(N, H))
    with pytest.raises(ShapeError, match=r"expected input of shape \(N, 3\) or \(3,\), got \(2, 4, 3\)"):
        lstm(torch.randn(2, 4, I))
    with pytest.raises(ShapeError, match="float64.*weights are torch.float32"):
        lstm(torch.randn(N, I, dtype=torch.float64))
    with pytest.raises(ShapeError, match="state is torch.float64"):
        GRUCell(I, H)(torch.randn(N, I), torch.zeros(N, H, dtype=torch.float64))
    with pytest.raises(ShapeError, match="proj_size"):
        LSTMCell(I, H, proj_size=H)
    with pytest.raises(ShapeError, match="cell_clip"):
        LSTMCell(I, H, cell_clip=0.0)
    with pytest.raises(ShapeError, match="nonlinearity"):
        RNNCell(I, H, nonlinearity="sigmoid")
    with pytest.raises(ShapeError, match="hidden_size must be a positive int"):
        GRUCell(I, 0)


def test_cells_reject_sequences_with_a_hint() -> None:
    with pytest.raises(ShapeError, match="rnnkit.unroll"):
        GRUCell(I, H)(torch.randn(N, 7, I))


def test_unbatched_state_given_unbatched() -> None:
    cell = LSTMCell(I, H)
    x, h, c = torch.randn(I), torch.randn(H), torch.randn(H)
    got = cell(x, LSTMState(h, c))
    want = cell(x.unsqueeze(0), LSTMState(h.unsqueeze(0), c.unsqueeze(0)))
    assert got.h.shape == (H,)
    torch.testing.assert_close(got.h, want.h[0])
    torch.testing.assert_close(got.c, want.c[0])



# -- what torch.nn users do with cells ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference", "native", "fused"])
def test_unroll_runs_a_cells_hooks_every_step(backend: str) -> None:
    """A pruned cell (torch.nn.utils.prune recomputes weight_hh in a forward pre-hook) unrolls as
    stepping it by hand does after its original weights change, also on a second backward; hooks
    run once a step; torch's kernels and the fused loops, which would skip them, say why."""
    import torch.nn.utils.prune as prune

    cell = LSTMCell(4, 6)
    prune.l1_unstructured(cell, "weight_hh", amount=0.5)
    with torch.no_grad():
        cell.weight_hh_orig.mul_(3.0)  # an optimiser's step: the pruned weight is stale until the hook runs
    x = torch.randn(3, 5, 4)
    if backend in ("native", "fused"):
        with pytest.raises(ShapeError, match="module hooks"):
            rnnkit.unroll(cell, x, backend=backend)
        return
    state, hand = None, []
    for t in range(5):
        state = cell(x[:, t], state)
        hand.append(state.h)
    for _ in range(2):  # the second backward needs the pruned weight made again, by the hook
        got = rnnkit.unroll(cell, x, backend=backend)
        torch.testing.assert_close(got.outputs, torch.stack(hand, 1))
        got.outputs.sum().backward()
    calls = []
    cell.register_forward_pre_hook(lambda m, a: calls.append(1))
    rnnkit.unroll(cell, x, backend=backend)
    assert len(calls) == 5


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_cells_take_torchs_keyword_arguments(name: str) -> None:
    """cell(input=x, hx=h) as torch.nn.LSTMCell/GRUCell/RNNCell take it."""
    ours = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}[name](4, 6)
    theirs = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[name](4, 6)
    theirs.load_state_dict(ours.state_dict())
    x, h = torch.randn(2, 4), torch.randn(2, 6)
    hx = (h, torch.randn(2, 6)) if name == "lstm" else h
    got, want = ours(input=x, hx=hx), theirs(input=x, hx=hx)
    for a, b in zip(got if name == "lstm" else [got], want if name == "lstm" else [want], strict=True):
        torch.testing.assert_close(a, b)
    for mixed in (ours(x, hx=hx), ours(x, state=hx)):  # state=, as rnnkit.Cell names it, too
        torch.testing.assert_close(mixed[0] if name == "lstm" else mixed, want[0] if name == "lstm" else want)
    with pytest.raises(ShapeError, match="once"):
        ours(x, hx, state=hx)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_vmap_over_unroll_and_layers_runs_the_reference_loop(name: str) -> None:
    """torch.func.vmap (alone, or over grad for per-sample gradients) of a built-in cell's unroll
    and of a layer: auto steps aside from torch's kernels, which have no vmap rule."""
    from torch.func import functional_call, grad, vmap

    cell = {"lstm": LSTMCell, "gru": GRUCell}[name](4, 6)
    x = torch.randn(5, 3, 7, 4)  # five independent batches
    got = vmap(lambda xx: rnnkit.unroll(cell, xx).outputs)(x)
    torch.testing.assert_close(got, torch.stack([rnnkit.unroll(cell, xx).outputs for xx in x]))
    layer = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[name](4, 6, batch_first=True)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p: dict, xx: Tensor) -> Tensor:
        return functional_call(layer, p, (xx.unsqueeze(0),))[0].square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[0])
    for i in (0, 2):
        want = grad(loss)(params, x[0, i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], want[k])


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_unbatched_input_with_a_batched_state_is_refused_as_torch_refuses_it(name: str) -> None:
    """An (I,) input with a (1, H) state: torch's cells raise; so do rnnkit's, saying what to pass."""
    ours = {"lstm": LSTMCell, "gru": GRUCell}[name](4, 6)
    theirs = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[name](4, 6)
    h = torch.zeros(1, 6)
    hx = (h, h) if name == "lstm" else h
    with pytest.raises(RuntimeError):
        theirs(torch.randn(4), hx)
    with pytest.raises(ShapeError, match=r"unbatched too, of shape \(6,\)"):
        ours(torch.randn(4), hx)


@pytest.mark.parametrize("name", ["lstm", "lstm_nobias", "gru", "rnn_tanh", "rnn_relu"])
def test_a_called_cell_steps_by_torchs_own_op_bit_for_bit(name: str) -> None:
    """cell(x, hx) of a built-in cell gives torch.nn's cell's values and gradients exactly (the same
    op); a subclass that overrides step() still steps by it; forget_bias folds into the bias."""
    kw = {"bias": False} if name == "lstm_nobias" else {"nonlinearity": name[4:]} if name.startswith("rnn") else {}
    kind = name.split("_")[0]
    ours = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}[kind](4, 6, **kw)
    theirs = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](4, 6, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, requires_grad=True)
    hx = (torch.randn(3, 6), torch.randn(3, 6)) if kind == "lstm" else torch.randn(3, 6)
    got, want = ours(x, hx), theirs(x, hx)
    leaves = (lambda s: list(s)) if kind == "lstm" else (lambda s: [s])
    for a, b in zip(leaves(got), leaves(want), strict=True):
        assert torch.equal(a, b)
    ga = torch.autograd.grad(sum(s.sum() for s in leaves(got)), [x, *ours.parameters()])
    gb = torch.autograd.grad(sum(s.sum() for s in leaves(want)), [x, *theirs.parameters()])
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)

    class Scaled(type(ours)):
        def step(self, xp: Tensor, state: object) -> object:
            new = super().step(xp, state)
            return type(new)(*(0.5 * s for s in new)) if isinstance(new, tuple) else 0.5 * new

    scaled = Scaled(4, 6, **kw)
    scaled.load_state_dict(ours.state_dict())
    for a, b in zip(leaves(scaled(x, hx)), leaves(want), strict=True):
        torch.testing.assert_close(a, 0.5 * b)
    if kind == "lstm":
        biased = LSTMCell(4, 6, forget_bias=1.0, **kw)
        state = biased.init_state(3)
        for a, b in zip(biased(x), biased.step(biased.project_input(x), state), strict=True):
            torch.testing.assert_close(a, b)


def test_a_called_cell_checks_each_calls_state_against_its_own_batch() -> None:
    """The state's expected shapes are remembered per batch size and dtype, not reused for another."""
    cell = LSTMCell(4, 6)
    cell(torch.randn(3, 4), (torch.zeros(3, 6), torch.zeros(3, 6)))
    with pytest.raises(ShapeError, match=r"expected a state of shape \(5, 6\)"):
        cell(torch.randn(5, 4), (torch.zeros(3, 6), torch.zeros(3, 6)))
    with pytest.raises(ShapeError, match="float64"):
        cell.double()(torch.randn(3, 4, dtype=torch.float64), (torch.zeros(3, 6), torch.zeros(3, 6)))


def test_a_called_cell_steps_by_its_own_maths_where_torchs_op_would_differ(monkeypatch) -> None:
    """torch's cell op is used only with both biases or none (CUDA's fused cell refuses a lone one,
    so forget_bias steps by rnnkit's maths), never under autocast (CUDA's cell ops would return
    lower-precision states), and not where a subclass or the instance overrides fused_bias or
    project_input; a learnt initial state made from a real tensor is checked on its device."""
    calls = []
    lstm_cell = torch._VF.lstm_cell

    def checked(x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        assert (b_ih is None) == (b_hh is None), "a lone bias"
        calls.append(1)
        return lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)

    monkeypatch.setattr(torch._VF, "lstm_cell", checked)
    x = torch.randn(3, 4)
    for kw in ({}, {"bias": False}, {"forget_bias": 1.0}, {"bias": False, "forget_bias": 1.0}):
        cell = LSTMCell(4, 6, **kw)
        got, want = cell(x), cell.step(cell.project_input(x), cell.init_state(3))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert len(calls) == 2  # the two cells without forget_bias
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LSTMCell(4, 6)(x)
    assert not calls

    class Shifted(LSTMCell):
        def fused_bias(self) -> Tensor:
            return super().fused_bias() + 0.5

    for cell in (Shifted(4, 6), LSTMCell(4, 6)):
        if type(cell) is LSTMCell:
            cell.project_input = lambda xx, c=cell: F.linear(xx, c.weight_ih, c.fused_bias()) - 0.25
        state = cell.init_state(3)
        for a, b in zip(cell(x, state), cell.step(cell.project_input(x), state), strict=True):
            torch.testing.assert_close(a, b)

    class Learnt(GRUCell):
        def __init__(self, *a: int) -> None:
            super().__init__(*a)
            self.h0 = nn.Parameter(torch.randn(self.hidden_size))

        def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
            return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype) + self.h0

    learnt = Learnt(4, 6)
    assert learnt(x, learnt.init_state(3)).shape == (3, 6)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_a_cell_stepped_by_hand_under_autocast_runs_as_torchs(name: str) -> None:
    """Three called steps under CPU autocast: a state autocast lowered (the RNN's) is taken back, as
    torch's cells take it, and the states' dtypes are torch's."""
    ours = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}[name](4, 6)
    theirs = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[name](4, 6)
    theirs.load_state_dict(ours.state_dict())
    x, dtypes = torch.randn(3, 4), []
    for cell in (ours, theirs):
        state = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                state = cell(x) if state is None else cell(x, state)
        dtypes.append([s.dtype for s in (state if isinstance(state, tuple) else [state])])
    assert dtypes[0] == dtypes[1]
