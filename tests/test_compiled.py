"""The compiled backend (rnnkit.backends.compiled): a user's cell traced, compiled and checked.

Every case is held to the reference loop: values, final states, every-step states, and the
gradients of x, the initial state and the parameters. Compiling costs seconds per shape, so the
cases share a few shapes and cells (plans are cached per cell and shape).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import rnnkit
from rnnkit import unroll
from rnnkit.backends import compiled, reference, traced
from rnnkit.engine import tree_flatten
from rnnkit.errors import ShapeError

T, N, I, H = 7, 4, 3, 5
LENGTHS = [7, 3, 5, 7]

needs_compiler = pytest.mark.skipif(
    not compiled.available(), reason="Inductor cannot compile here (no C++ compiler): the backend falls back"
)


def _example_cell() -> type[nn.Module]:
    """``Seed000Cell`` from examples/custom_cell.py, the seed's LSTM variant (examples/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "custom_cell.py"
    spec = importlib.util.spec_from_file_location("custom_cell", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Seed000Cell


Seed000Cell = _example_cell()


class MinimalCell(nn.Module):
    """An Elman cell with separate input and recurrent maps (a bias-free product and an addmm)."""

    def __init__(self, input_size: int, hidden_size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size, self.scale = hidden_size, scale
        self.wx = nn.Linear(input_size, hidden_size)
        self.wh = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.wx(x) + self.scale * self.wh(h))


class GRULikeCell(nn.Module):
    """A GRU written out by hand, with a parameter used elementwise (a learnt per-unit gain)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.zr = nn.Linear(input_size + hidden_size, 2 * hidden_size)
        self.n = nn.Linear(input_size + hidden_size, hidden_size)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, hidden_size))

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z, r = torch.sigmoid(self.zr(torch.cat([x, h], 1))).chunk(2, 1)
        n = torch.tanh(self.n(torch.cat([x, r * h], 1))) * self.gain
        return (1 - z) * n + z * h


CELLS = {"seed000": Seed000Cell, "minimal": MinimalCell, "grulike": GRULikeCell}


def _leaves(tree) -> list[Tensor]:
    return [] if tree is None else tree_flatten(tree)[0]


def _run(cell: nn.Module, x: Tensor, state, backend: str, **kw):
    """Values and gradients (x, initial state, parameters) of a fixed random functional of every output."""
    cell.zero_grad()
    xg = x.detach().clone().requires_grad_()
    st = None if state is None else tree_flatten(state)[1]([s.detach().clone().requires_grad_()
                                                              for s in _leaves(state)])
    res = unroll(cell, xg, st, backend=backend, **kw)
    parts = [res.outputs, *_leaves(res.final_state), *_leaves(res.states)]
    gen = torch.Generator().manual_seed(1)
    loss = sum((p * torch.randn(p.shape, generator=gen, dtype=p.dtype)).sum() for p in parts)
    wants = [xg, *_leaves(st), *(p for p in cell.parameters() if p.requires_grad)]
    grads = torch.autograd.grad(loss, wants, allow_unused=True)
    return [p.detach() for p in parts], list(grads)


def _agree(cell: nn.Module, x: Tensor, state=None, monkeypatch=None, **kw) -> None:
    """The compiled backend equals the reference loop, and runs its own loop (never the reference)."""
    want_vals, want_grads = _run(cell, x, state, "reference", **kw)
    def boom(*a, **k):
        raise AssertionError("the compiled backend fell back to the reference loop")

    with contextlib.nullcontext() if monkeypatch is None else monkeypatch.context() as patch:
        if patch is not None:
            patch.setattr(reference, "run", boom)
        got_vals, got_grads = _run(cell, x, state, "compiled", **kw)
    tol = {"rtol": 1e-4, "atol": 1e-5} if x.dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for g, w in zip(got_vals + got_grads, want_vals + want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **tol)


@pytest.fixture(autouse=True)
def _auto_compiles(monkeypatch) -> None:
    """These tests are the compiled backend's: "auto" does not try the traced backend first here."""
    monkeypatch.setattr(traced, "worth_it", lambda *a: False)


@pytest.fixture(scope="module")
def cells() -> dict[str, nn.Module]:
    """One instance per cell kind for the whole module: plans are cached per cell, so shapes compile once."""
    torch.manual_seed(0)
    return {k: c(I, H) for k, c in CELLS.items()}


@needs_compiler
@pytest.mark.parametrize("kind", list(CELLS))
def test_matches_reference_with_every_step_state(kind, cells, monkeypatch) -> None:
    cell = cells[kind]
    x = torch.rand(N, T, I)
    state = tree_flatten(cell.init_state(N))[1]([torch.randn(N, H) for _ in _leaves(cell.init_state(N))])
    _agree(cell, x, state, monkeypatch, return_states=True)


@needs_compiler
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["seed000", "minimal"])
def test_matches_reference_with_lengths(kind, reverse, cells, monkeypatch) -> None:
    _agree(cells[kind], torch.rand(N, T, I), None, monkeypatch, lengths=LENGTHS, reverse=reverse,
           return_states=True)


@needs_compiler
def test_time_major_input_and_final_state_only(cells, monkeypatch) -> None:
    cell = cells["grulike"]
    x = torch.rand(T, N, I)
    want = unroll(cell, x, batch_first=False, backend="reference")
    monkeypatch.setattr(reference, "run", None)  # any fallback would fail loudly
    got = unroll(cell, x, batch_first=False, backend="compiled")
    torch.testing.assert_close(got.outputs, want.outputs)
    torch.testing.assert_close(got.final_state, want.final_state)
    assert got.states is None


@needs_compiler
def test_float64_gradcheck_and_second_derivatives() -> None:
    torch.manual_seed(0)
    cell = MinimalCell(2, 3).double()
    x = torch.rand(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0):
        res = unroll(cell, x, h0, lengths=[3, 2], return_states=True, backend="compiled")
        return res.outputs, res.final_state, res.states

    assert torch.autograd.gradcheck(f, (x, h0))
    assert torch.autograd.gradgradcheck(f, (x, h0))  # create_graph: differentiated through the reference loop
    _agree(cell, x.detach(), h0.detach(), lengths=[3, 2], return_states=True)


@needs_compiler
def test_frozen_parameters_get_no_gradient(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = MinimalCell(I, H)
    cell.wh.weight.requires_grad_(False)
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)
    res = unroll(cell, torch.rand(N, T, I), backend="compiled")
    res.outputs.sum().backward()
    assert cell.wh.weight.grad is None and cell.wx.weight.grad is not None


@needs_compiler
def test_changed_attribute_retraces(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = MinimalCell(I, H, scale=1.0)
    x = torch.rand(N, T, I)
    first = unroll(cell, x, backend="compiled").outputs
    cell.scale = -2.0  # a trace bakes the value in: the plan must be rebuilt, not reused
    _agree(cell, x, None, monkeypatch)
    assert not torch.allclose(unroll(cell, x, backend="compiled").outputs, first)


@needs_compiler
def test_inference_reuses_training_plans_or_builds_forward_only_ones(cells, monkeypatch) -> None:
    cell = cells["seed000"]
    x = torch.rand(N, T, I)
    unroll(cell, x, backend="compiled").outputs.sum().backward()  # builds (or reuses) the training plan
    built, real = [], (compiled._build, compiled._build_inference)
    monkeypatch.setattr(compiled, "_build", lambda *a: built.append("train") or real[0](*a))
    monkeypatch.setattr(compiled, "_build_inference", lambda *a: built.append("inference") or real[1](*a))
    with monkeypatch.context() as patch:
        patch.setattr(reference, "run", None)  # every call below runs compiled
        with torch.no_grad():
            same = unroll(cell, x, backend="compiled").outputs
        x_other = torch.rand(N + 3, T, I)
        with torch.inference_mode():
            other = unroll(cell, x_other, lengths=[T, 2, 5, T, 1, 3, 4], return_states=True, backend="compiled")
    assert built == ["inference"]  # the training plan served the first call
    torch.testing.assert_close(same, unroll(cell, x, backend="reference").outputs)
    want = unroll(cell, x_other, lengths=[T, 2, 5, T, 1, 3, 4], return_states=True, backend="reference")
    torch.testing.assert_close(other.outputs, want.outputs)
    torch.testing.assert_close(other.states, want.states)
    torch.testing.assert_close(other.final_state, want.final_state)


@needs_compiler
def test_denormals_flushed_inside_compiled_kernels(restore_fpmode) -> None:
    torch.set_flush_denormal(False)

    class Scale(nn.Module):  # h' = h * x * w: with x = h0 = 1e-20, w = 1 the first product is 1e-40
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def init_state(self, batch_size, device=None, dtype=None):
            return torch.full((batch_size, 1), 1e-20, device=device, dtype=dtype)

        def forward(self, x, h):
            return h * x * self.w

    x = torch.full((2, 2, 1), 1e-20)
    out = unroll(Scale(), x, backend="compiled").outputs
    out.sum().backward()
    assert out[0, 0, 0] == 0.0, "a denormal survived inside the flushed region"
    assert not rnnkit.fpmode.denormals_are_flushed(), "the caller's mode was not restored"


# ----------------------------------------------------------------------------- fallbacks and errors


class DropoutCell(MinimalCell):
    def __init__(self) -> None:
        super().__init__(I, H)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, h):
        return self.drop(super().forward(x, h))


class BranchyCell(MinimalCell):
    def forward(self, x, h):
        if h.sum() > 0:  # data-dependent Python control flow: a trace would freeze one branch
            return torch.tanh(self.wx(x))
        return super().forward(x, h)


@pytest.mark.parametrize("cls, why", [(DropoutCell, "random"), (BranchyCell, "")], ids=["dropout", "branchy"])
def test_untraceable_cells_fall_back_with_one_warning(cls, why) -> None:
    torch.manual_seed(0)
    cell = cls() if cls is DropoutCell else cls(I, H)
    cell.eval() if cls is BranchyCell else cell.train()
    x = torch.rand(N, T, I, requires_grad=True)
    compiled._WARNED.discard(cls)
    with pytest.warns(UserWarning, match="reference loop instead") as record:
        torch.manual_seed(5)
        got = unroll(cell, x, backend="compiled").outputs
    assert why in str(record[0].message)
    torch.manual_seed(5)
    want = unroll(cell, x, backend="reference").outputs
    torch.testing.assert_close(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per cell type, not every call
        unroll(cell, x, backend="compiled").outputs.sum().backward()
    assert x.grad is not None


def test_half_precision_gets_a_clear_error() -> None:
    with pytest.raises(ShapeError, match="float32 or float64"):
        unroll(MinimalCell(I, H).half(), torch.rand(N, T, I).half(), backend="compiled")


class TiedCell(nn.Module):
    """One submodule under two names (``self.b = self.a``): tracing must not untie or replace it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(I, H)
        self.a = nn.Linear(H, H)
        self.b = self.a

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, H, device=device, dtype=dtype)

    def forward(self, x, h):
        return torch.tanh(self.inp(x) + self.a(h) + 0.5 * self.b(h))


@needs_compiler
def test_tied_submodule_keeps_its_parameters(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = TiedCell()
    weight = cell.a.weight
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)
    assert cell.a.weight is weight and cell.b.weight is weight and isinstance(weight, nn.Parameter)
    unroll(cell, torch.rand(N, T, I), backend="compiled").outputs.sum().backward()
    assert weight.grad is not None


class ConfiguredCell(MinimalCell):
    """Reads a list, a dict and a callable attribute: all baked into a trace, so all part of its key."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self.gains = [1.0, 1.0]
        self.opts = {"act": "tanh"}
        self.squash = torch.tanh

    def forward(self, x, h):
        z = (self.wx(x) + self.wh(h)) * self.gains[0]
        act = torch.tanh if self.opts["act"] == "tanh" else torch.sigmoid
        return self.squash(act(z) * self.gains[1])


@needs_compiler
def test_plans_follow_changes_to_container_and_callable_attributes(monkeypatch) -> None:
    import functools

    torch.manual_seed(0)
    cell = ConfiguredCell()
    x = torch.rand(N, T, I)
    _agree(cell, x, None, monkeypatch)
    cell.gains[1] = 3.0  # in place: the list is the same object
    _agree(cell, x, None, monkeypatch)
    cell.opts["act"] = "sigmoid"
    _agree(cell, x, None, monkeypatch)
    del cell.squash  # a new partial may reuse the old one's id: the key must not confuse them
    cell.squash = functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.3)
    compiled._WARNED.discard(ConfiguredCell)
    with pytest.warns(UserWarning, match="compiles ConfiguredCell again whenever"):  # the fourth build in a row
        _agree(cell, x, None, monkeypatch)


class CountingCell(MinimalCell):
    """Changes its own attribute every step (a warm-up schedule): a trace cannot repeat that."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self.steps_seen = 0

    def forward(self, x, h):
        gain = 1.0 if self.steps_seen < 4 else 0.5
        self.steps_seen += 1
        return super().forward(x * gain, h)


def test_self_changing_cell_is_refused_once_and_left_as_it_was(monkeypatch) -> None:
    torch.manual_seed(0)
    cell, twin = CountingCell(), CountingCell()
    twin.load_state_dict(cell.state_dict())
    x = torch.rand(N, T, I)
    compiled._WARNED.discard(CountingCell)
    with pytest.warns(UserWarning, match="steps_seen"):
        got = unroll(cell, x, backend="compiled").outputs
    assert cell.steps_seen == T, "the trace's call must be undone"
    torch.testing.assert_close(got, unroll(twin, x, backend="reference").outputs)
    built = []
    monkeypatch.setattr(compiled, "_build", lambda *a: built.append(1))
    unroll(cell, x, backend="compiled")
    assert built == [] and cell.steps_seen == 2 * T


@needs_compiler
def test_module_hooks_send_the_call_to_the_reference_loop(cells) -> None:
    cell = cells["minimal"]
    x = torch.rand(N, T, I)
    unroll(cell, x, backend="compiled")  # a plan exists from before the hook
    calls = []
    handle = cell.wh.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
    try:
        compiled._WARNED.discard(MinimalCell)
        with pytest.warns(UserWarning, match="hooks"):
            got = unroll(cell, x, backend="compiled").outputs
        assert len(calls) == T
        torch.testing.assert_close(got, unroll(cell, x, backend="reference").outputs)
    finally:
        handle.remove()


class ReadoutCell(rnnkit.cells.Cell):
    """Its own ``output()``, a constant buffer, and a state field the next step never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(I + H, H)
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, H))

    def init_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, H, device=device, dtype=dtype)
        return (z, z)

    def forward(self, x, state):
        m = torch.tanh(self.lin(torch.cat([x, state[1]], 1)) + self.offset)
        return (2 * m, m)  # state[0] is a readout only

    def output(self, state):
        return state[0] * state[1]


@needs_compiler
def test_own_output_buffer_and_unread_state_field(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = ReadoutCell()
    _agree(cell, torch.rand(N, T, I), None, monkeypatch, lengths=LENGTHS, return_states=True)


class TwoProducts(MinimalCell):
    """A product of x alone, then one of cat([x, h]): the stages do not follow the graph's order."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self.lin = nn.Linear(I + H, H)

    def forward(self, x, h):
        m = torch.tanh(self.wx(x))
        return torch.tanh(self.lin(torch.cat([x, h], 1))) + 0.1 * m


@needs_compiler
def test_products_out_of_graph_order_compile(monkeypatch) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warnings while compiling must not break the build
        _agree(TwoProducts(), torch.rand(N, T, I), None, monkeypatch)


@needs_compiler
def test_saved_steps_go_through_autograd(cells) -> None:
    """Every step's saved tensors pass saved-tensor hooks (so checkpointing and offloading see them)
    and are freed by the backward."""
    import torch.utils.checkpoint as cp

    cell = cells["seed000"]
    x = torch.rand(N, T, I)
    unroll(cell, x, backend="compiled")
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.numel()) or t, lambda t: t):
        out = unroll(cell, x, backend="compiled").outputs
    assert sum(packed) >= T * N * 4 * H  # at least the gates of every step
    out.sum().backward()
    with pytest.raises(RuntimeError, match="second time|freed"):
        out.sum().backward()
    fresh = Seed000Cell(I, H)  # the first call, which builds the plan, inside checkpointing
    got = cp.checkpoint(lambda v: unroll(fresh, v, backend="compiled").outputs, x.requires_grad_(),
                        use_reentrant=False)
    got.sum().backward()
    assert x.grad is not None


def test_plain_tensor_attribute_warning_names_the_fix_and_the_caller() -> None:
    class Offset(MinimalCell):
        def __init__(self) -> None:
            super().__init__(I, H)
            self.offset = torch.zeros(H)

        def forward(self, x, h):
            return super().forward(x, h) + self.offset

    with pytest.warns(UserWarning, match="register_buffer") as record:
        unroll(Offset(), torch.rand(N, T, I), backend="compiled")
    assert record[0].filename == __file__


def test_layers_and_config_accept_the_backend() -> None:
    from rnnkit.recipes import ModelConfig

    layer = rnnkit.RNN(I, H, cell=MinimalCell, backend="compiled", batch_first=True)
    out, _ = layer(torch.rand(N, T, I))
    assert out.shape == (N, T, H)
    ModelConfig(backend="compiled").validate()
    from rnnkit.app import build_model
    from rnnkit.recipes import recipe_config

    cfg = recipe_config("mnist-rows")
    cfg.model.backend = "compiled"
    assert build_model(cfg, 28, 10).rnn.backend == "compiled"
    with pytest.raises(rnnkit.errors.ConfigError, match="backend"):
        ModelConfig(backend="fast").validate()


@needs_compiler
def test_state_gradient_product_is_narrowed_and_hoisted(cells) -> None:
    """Seed000Cell maps cat([x, s]): the backward's product for s must skip x's columns (a weight slice
    made once per sequence), not compute x's gradient and drop it."""
    cell = cells["seed000"]
    unroll(cell, torch.rand(N, T, I), backend="compiled").outputs.sum().backward()
    plan = list(compiled._PLANS.values())[-1]  # the one this call used (the cache is least-recently-used)
    code = plan.bw.code
    assert "invariant_0" in code and "aten.slice" not in code
    assert "clone" in plan.prologue.code


@needs_compiler
def test_auto_compiles_long_training_only(cells, monkeypatch) -> None:
    from rnnkit.cells import LSTMCell
    from rnnkit.engine import _pick_backend

    cell = cells["minimal"]
    long, short = compiled.AUTO_MIN_STEPS, compiled.AUTO_MIN_STEPS - 1
    x = torch.rand(N, long, I)
    assert _pick_backend(cell, x, long, N) == "compiled"
    assert _pick_backend(cell, x, short, N) == "reference"
    assert _pick_backend(LSTMCell(I, H), x, long, N) in ("native", "fused")
    with torch.no_grad():
        assert _pick_backend(cell, x, long, N) == "compiled"  # evaluation: a forward-only plan
    want = unroll(cell, x, backend="reference").outputs
    with monkeypatch.context() as patch:
        patch.setattr(reference, "run", None)  # the compiled loop, not a fallback
        torch.testing.assert_close(unroll(cell, x).outputs, want)  # same per-step shape: the cached plan
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(compiled, "_build_inference", None)  # auto never compiles for a one-off evaluation
        other = torch.rand(N + 1, long, I)
        torch.testing.assert_close(unroll(cell, other).outputs, unroll(cell, other, backend="reference").outputs)
    monkeypatch.setattr(compiled, "_AUTO", False)  # RNNKIT_COMPILE=0
    assert _pick_backend(cell, x, long, N) == "reference"


def test_auto_falls_back_silently() -> None:
    torch.manual_seed(0)
    cell = DropoutCell()
    x = torch.rand(N, compiled.AUTO_MIN_STEPS, I, requires_grad=True)
    compiled._WARNED.discard(DropoutCell)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(5)
        got = unroll(cell, x).outputs
    assert not [w for w in record if "rnnkit" in str(w.message)]
    torch.manual_seed(5)
    torch.testing.assert_close(got, unroll(cell, x, backend="reference").outputs)


class Knobs(MinimalCell):
    """A private attribute, a strided buffer, a readout submodule called ``output``, and a buffer the
    forward updates in place: each must behave exactly as in the reference loop."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self._gain = 1.0
        self.register_buffer("shift", torch.zeros(H, 3)[:, 0])  # stride 3
        self.output = nn.Linear(H, 2)

    def forward(self, x, h):
        return torch.tanh(self.wx(x) + self._gain * self.wh(h) + self.shift)


@needs_compiler
def test_private_attributes_strided_buffers_and_readout_submodules(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = Knobs()
    x = torch.rand(N, T, I)
    _agree(cell, x, None, monkeypatch)
    assert unroll(cell, x, backend="compiled").outputs.shape == (N, T, 2)  # cell.output(state), as cell_output
    cell._gain = -3.0
    _agree(cell, x, None, monkeypatch)


class StepCounter(MinimalCell):
    """Updates a buffer in place every step: not traceable, and the failed build must not count."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x, h):
        self.steps += 1
        return super().forward(x, h)


def test_a_failed_build_leaves_buffers_alone() -> None:
    cell = StepCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unroll(cell, torch.rand(N, T, I), backend="compiled")
    assert int(cell.steps) == T


def test_parametrize_cache_sends_the_call_to_the_reference_loop() -> None:
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    cell = MinimalCell(I, H)
    parametrize.register_parametrization(cell.wh, "weight", nn.Tanh())
    x = torch.rand(N, T, I)
    compiled._WARNED.discard(MinimalCell)
    with parametrize.cached(), pytest.warns(UserWarning, match="parametrize.cached"):
        got = unroll(cell, x, backend="compiled").outputs
    torch.testing.assert_close(got, unroll(cell, x, backend="reference").outputs)


@needs_compiler
def test_plans_are_shared_by_cells_of_one_kind_and_auto_does_not_build_without_training(monkeypatch) -> None:
    torch.manual_seed(0)
    first, second = MinimalCell(I, H), MinimalCell(I, H)
    x = torch.rand(N, T, I)
    # as _agree calls it (the input needs a gradient: part of a plan's key), so that this test does not
    # depend on a plan an earlier test left in the cache
    unroll(first, x.clone().requires_grad_(), backend="compiled").outputs.sum().backward()
    built = []
    monkeypatch.setattr(compiled, "_build", lambda *a: built.append(1))
    monkeypatch.setattr(compiled, "_build_inference", lambda *a: built.append(1))
    _agree(second, x, None)  # same type, configuration and layout: the first cell's plan
    frozen = MinimalCell(I, H).requires_grad_(False)
    long = torch.rand(N + 2, compiled.AUTO_MIN_STEPS, I)
    unroll(frozen, long)  # auto, grad mode on, but nothing to train: no build for a one-off call
    assert built == []


@needs_compiler
def test_second_derivatives_use_the_tensors_the_forward_used() -> None:
    """MAML-style: the forward runs with swapped-in parameters; create_graph must differentiate those."""
    torch.manual_seed(0)
    cell = MinimalCell(2, 3).double()
    x = torch.rand(2, 4, 2, dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_() for k, v in cell.named_parameters()}

    def meta_grads(backend: str) -> tuple[Tensor, ...]:
        names = list(params)
        grads = torch.autograd.grad(_loss(cell, params, x, backend), list(params.values()), create_graph=True)
        adapted = {k: params[k] - 0.1 * g for k, g in zip(names, grads)}
        return torch.autograd.grad(_loss(cell, adapted, x, backend), list(params.values()))

    for got, want in zip(meta_grads("compiled"), meta_grads("reference"), strict=True):
        torch.testing.assert_close(got, want)


def _loss(cell: nn.Module, params: dict[str, Tensor], x: Tensor, backend: str) -> Tensor:
    """The squared outputs of ``cell`` over ``x`` run with ``params`` swapped in (as functional_call does)."""
    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self) -> Tensor:
            return unroll(self.cell, x, backend=backend).outputs

    return torch.func.functional_call(Run(), {f"cell.{k}": v for k, v in params.items()}, ()).pow(2).sum()


@needs_compiler
def test_output_views_class_attributes_and_warnings_after_auto(monkeypatch) -> None:
    class ViewOut(rnnkit.cells.Cell):  # output() a view of the state; a class-level constant
        scale = 1.0

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(I + H, H)

        def init_state(self, batch_size, device=None, dtype=None):
            return torch.zeros(batch_size, H, device=device, dtype=dtype)

        def forward(self, x, h):
            return torch.tanh(self.lin(torch.cat([x, h], 1))) * self.scale

        def output(self, h):
            return h[:, :2]

    torch.manual_seed(0)
    cell, x = ViewOut(), torch.rand(N, T, I)
    _agree(cell, x, None, monkeypatch, lengths=LENGTHS)
    ViewOut.scale = -2.0  # a class attribute changes: a new plan
    _agree(cell, x, None, monkeypatch, lengths=LENGTHS)
    # a build that failed silently under auto still warns a caller who asks for this backend
    long = torch.rand(N, compiled.AUTO_MIN_STEPS, I, requires_grad=True)
    drop = DropoutCell()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unroll(drop, long)
    compiled._WARNED.discard(DropoutCell)
    with pytest.warns(UserWarning, match="random"):
        unroll(drop, long, backend="compiled")


@needs_compiler
def test_own_output_past_the_end_matches_the_reference_runner() -> None:
    """Below the engine (which zeroes padding): a finished row's output repeats, and so must its gradient."""
    from rnnkit.engine import _masks

    torch.manual_seed(0)
    cell = ReadoutCell()
    x = torch.rand(T, N, I)
    lengths = torch.tensor(LENGTHS)
    masks = _masks(lengths, T, x.device)
    results = []
    for runner in (reference.run, compiled.run):
        cell.zero_grad()
        outs, final, _ = runner(cell, x, cell.init_state(N), masks, lengths, False)
        gen = torch.Generator().manual_seed(3)
        (outs * torch.randn(outs.shape, generator=gen)).sum().backward()
        results.append([outs.detach(), *(p.grad.clone() for p in cell.parameters())])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class BatchCentredCell(nn.Module):
    """A cell that mixes batch rows (its pre-activations are centred over the batch)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z = self.lin(torch.cat([x, h], 1))
        return torch.tanh(z - z.mean(0))


class GatedCentredCell(BatchCentredCell):
    """Mixes rows through a learnt gain that starts at zero: at first only its gradient shows it."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z = self.lin(torch.cat([x, h], 1))
        return torch.tanh(z - self.alpha * z.mean(0))


class BackwardMixingCell(BatchCentredCell):
    """Rows apart in the forward, mixed in the backward (through a batch mean that adds zero)."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z = self.lin(torch.cat([x, h], 1))
        m = z.mean(0)
        return torch.tanh(z + (m - m.detach()))


class BatchSizeCell(BatchCentredCell):
    """Reads the batch size as a number (a trace bakes it in)."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.lin(torch.cat([x, h], 1)) * x.shape[0] ** -0.5)


def _count_builds(monkeypatch) -> list[str]:
    built, real = [], (compiled._build, compiled._build_inference)
    monkeypatch.setattr(compiled, "_build", lambda *a: built.append("train") or real[0](*a))
    monkeypatch.setattr(compiled, "_build_inference", lambda *a: built.append("inference") or real[1](*a))
    return built


@needs_compiler
def test_smaller_batches_run_padded_on_a_wider_plan(cells, monkeypatch) -> None:
    cell = cells["seed000"]
    _agree(cell, torch.rand(N, T, I), None, monkeypatch, return_states=True)  # the plan for N rows
    built = _count_builds(monkeypatch)
    # an epoch's last, smaller batch: padded to N rows; values and gradients are the reference loop's
    _agree(cell, torch.rand(N - 1, T, I), None, monkeypatch, lengths=LENGTHS[:N - 1], return_states=True)
    _agree(cell, torch.rand(N - 1, T, I), None, monkeypatch, lengths=LENGTHS[:N - 1], reverse=True)
    state = tree_flatten(cell.init_state(N - 1))[1]([torch.randn(N - 1, H) for _ in _leaves(cell.init_state(1))])
    _agree(cell, torch.rand(N - 1, T, I), state, monkeypatch, return_states=True)
    assert built == []
    # as a trainer calls it (x needs no gradient), and then its evaluation without gradients
    x = torch.rand(N + 2, T, I)
    unroll(cell, x, backend="compiled").outputs.sum().backward()
    assert built == ["train"]
    with torch.no_grad():
        got = unroll(cell, x[:N], backend="compiled")
    want = unroll(cell, x[:N], backend="reference")
    torch.testing.assert_close(got.outputs, want.outputs)
    torch.testing.assert_close(got.final_state, want.final_state)
    assert built == ["train"]


@needs_compiler
def test_much_smaller_batches_get_their_own_plan_when_they_keep_coming(cells, monkeypatch) -> None:
    cell = cells["minimal"]
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)
    built = _count_builds(monkeypatch)
    for _ in range(compiled._PAD_CALLS):  # a rare small batch pads (N rows for 1)
        _agree(cell, torch.rand(1, T, I), None, monkeypatch)
    assert built == []
    for _ in range(2):  # then it compiles once
        _agree(cell, torch.rand(1, T, I), None, monkeypatch)
    assert built == ["train"]


@needs_compiler
@pytest.mark.parametrize("cls", [BatchCentredCell, GatedCentredCell, BackwardMixingCell, BatchSizeCell])
def test_cells_that_mix_batch_rows_are_not_padded(cls, monkeypatch) -> None:
    torch.manual_seed(0)
    cell = cls(I, H)
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)
    built = _count_builds(monkeypatch)
    _agree(cell, torch.rand(N - 1, T, I), None, monkeypatch)  # padded, it would differ
    assert built == ["train"]


@needs_compiler
def test_evicted_plans_take_no_smaller_batches(monkeypatch) -> None:
    compiled.clear_cache()
    monkeypatch.setattr(compiled, "_MAX_PLANS", 1)
    torch.manual_seed(0)
    cell = GatedCentredCell(I, H)
    with torch.no_grad():
        cell.alpha.fill_(1.0)
    minimal = MinimalCell(I, H)
    _agree(minimal, torch.rand(N, T, I), None, monkeypatch)  # rows apart: smaller batches may use it
    assert len(compiled._ROWS) == 1
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)  # evicts it
    assert compiled._ROWS == {}
    built = _count_builds(monkeypatch)
    _agree(minimal, torch.rand(N - 1, T, I), None, monkeypatch)
    assert built == ["train"]


@needs_compiler
def test_activation_checkpointing_takes_one_plan_for_both_passes(cells, monkeypatch) -> None:
    from torch.utils.checkpoint import checkpoint

    cell = cells["grulike"]
    _agree(cell, torch.rand(N, T, I), None, monkeypatch)
    for _ in range(compiled._PAD_CALLS + 2):  # around the point where a small batch gets its own plan
        x = torch.rand(1, T, I, requires_grad=True)  # as in the plan's key: padded onto it
        out = checkpoint(lambda v: unroll(cell, v, backend="compiled").outputs, x, use_reentrant=False)
        out.sum().backward()  # the recomputed forward must match the first one's shapes


@needs_compiler
def test_auto_evaluation_keeps_running_padded(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = MinimalCell(I, H)
    steps = 8
    monkeypatch.setattr(compiled, "AUTO_MIN_STEPS", steps)
    unroll(cell, torch.rand(N, steps, I)).outputs.sum().backward()  # auto trains on its compiled plan
    built = _count_builds(monkeypatch)
    monkeypatch.setattr(reference, "run", None)  # the reference loop would fail loudly
    for _ in range(compiled._PAD_CALLS + 2):
        with torch.no_grad():
            unroll(cell, torch.rand(1, steps, I))  # auto never builds forward-only plans: keeps padding
    assert built == []


class FixedBatchCell(MinimalCell):
    """Keeps a per-row buffer, so it steps only the batch size it was made for."""

    def __init__(self, input_size: int, hidden_size: int, batch_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.register_buffer("row_gain", torch.linspace(0.5, 1.5, batch_size).unsqueeze(1))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return super().forward(x, h) * self.row_gain


@needs_compiler
def test_a_cell_that_steps_only_its_own_batch_size_still_compiles(monkeypatch) -> None:
    torch.manual_seed(0)
    cell = FixedBatchCell(I, H, N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the row check's failure is not the build's
        _agree(cell, torch.rand(N, T, I), None, monkeypatch)


@pytest.mark.parametrize("options", [{"zoneout": 0.1}, {"recurrent_dropout": 0.2}, {"zoneout": 0.1,
                                                                                  "recurrent_dropout": 0.2}])
@pytest.mark.parametrize("kind", [rnnkit.LSTM, rnnkit.GRU])
def test_the_per_call_wrappers_of_a_layer_key_one_plan(kind, options):
    # a wrapper made per call that kept bound methods or lambdas as attributes gave every call a new
    # plan key, so auto compiled again on every call (zoneout in eval mode, with gradients)
    layer = kind(4, 8, **options)
    x = torch.randn(5, 2, 4)
    cell = layer.cells()[0]
    first, second = (layer._training_wrapper(cell, 2, x) for _ in range(2))
    assert first is not second and compiled._attrs(first) == compiled._attrs(second)
    assert hasattr(first, "step") == hasattr(cell, "step")  # the hoisted input product is kept


class SingleRowDecay(MinimalCell):
    """Branches on the batch size in Python: one row decays its state more than a batch does."""

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        decay = 0.99 if x.shape[0] == 1 else 0.5
        return decay * h + torch.tanh(self.wx(x) + self.wh(h))


@needs_compiler
def test_a_batch_size_the_cell_branches_on_is_not_padded_onto_a_larger_plan() -> None:
    # the build checks half its batch (4 -> 2), which cannot see a branch on a batch of one
    torch.manual_seed(0)
    cell = SingleRowDecay(I, H)
    unroll(cell, torch.rand(4, T, I, requires_grad=True), backend="compiled")
    x = torch.rand(1, T, I, requires_grad=True)
    got = unroll(cell, x, backend="compiled").outputs
    (gx,) = torch.autograd.grad(got.sum(), x)
    want = unroll(cell, x, backend="reference").outputs
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)


class _Config:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


def test_config_objects_key_plans_by_content_at_any_depth() -> None:
    cell = MinimalCell(I, H)
    cell.cfg = _Config(model=_Config(act=_Config(gain=1.0)))
    cell.cfg.model.back = cell.cfg  # a cycle back to the top
    before = compiled._attrs(cell)
    cell.cfg.model.act.gain = 5.0  # three levels down: was keyed by identity, so a stale plan ran
    assert compiled._attrs(cell) != before
    cell.cfg.model.act.gain = 1.0
    assert compiled._attrs(cell) == before


def test_attributes_nested_too_deep_to_key_run_the_reference_loop() -> None:
    cell, twin = MinimalCell(I, H), MinimalCell(I, H)
    twin.load_state_dict(cell.state_dict())
    deep: list = []
    cell.chain = deep
    for _ in range(compiled._DEEPEST + 1):
        deep.append([])
        deep = deep[0]
    compiled._WARNED.discard(MinimalCell)
    x = torch.rand(N, T, I)
    with pytest.warns(UserWarning, match="nest more than 64 levels deep"):
        got = unroll(cell, x, backend="compiled").outputs
    torch.testing.assert_close(got, unroll(twin, x, backend="reference").outputs)


@pytest.fixture
def fresh_caches(monkeypatch):
    """Empty plan caches for a test that fakes builds (a faked build leaves a None plan behind)."""
    for name in ("_PLANS", "_WHY", "_SEEN"):
        monkeypatch.setattr(compiled, name, type(getattr(compiled, name))())
    monkeypatch.setattr(compiled, "_ROWS", {})
    monkeypatch.setattr(compiled, "_BUILDS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(compiled, "_WARNED", set())


@pytest.mark.usefixtures("fresh_caches")
def test_auto_stops_compiling_a_cell_whose_attributes_change_every_call(monkeypatch) -> None:
    builds = []
    monkeypatch.setattr(compiled, "_build", lambda *a: builds.append(1))  # no plan: the reference loop runs
    cell = MinimalCell(I, H)
    x = torch.rand(2, compiled.AUTO_MIN_STEPS, I)

    def call(scale: float, backend: str = "auto") -> None:
        cell.scale = scale
        unroll(cell, x, backend=backend).outputs.sum().backward()

    for step in range(6):
        call(1.0 - 0.01 * step)  # annealed by the training loop
    assert len(builds) == compiled._REBUILDS
    call(0.9)
    assert len(builds) == compiled._REBUILDS  # a value seen once more, after a change: still changing
    call(0.9)
    assert len(builds) == compiled._REBUILDS + 1  # the same as the call before: settled, compiled again
    compiled._WARNED.discard(MinimalCell)
    for scale in (0.5, 0.4, 0.3):  # changing again: two more builds in a row make three, then none
        call(scale)
    assert len(builds) == compiled._REBUILDS + 3
    with pytest.warns(UserWarning, match="compiles MinimalCell again whenever its attributes change"):
        call(0.2, "compiled")  # asked for: it builds, and says why it keeps building
    assert len(builds) == compiled._REBUILDS + 4


@pytest.mark.usefixtures("fresh_caches")
def test_a_change_now_and_then_keeps_auto_compiling(monkeypatch) -> None:
    builds = []
    monkeypatch.setattr(compiled, "_build", lambda *a: builds.append(1))
    layer = rnnkit.RNN(I, H, cell=MinimalCell, zoneout=0.1).eval()  # a wrapper per call around the cell
    x = torch.rand(compiled.AUTO_MIN_STEPS, 2, I, requires_grad=True)
    for epoch in range(5):  # once per epoch: each build is followed by calls that find the plan
        layer.cells()[0].scale = 1.0 + epoch
        for _ in range(3):
            layer(x)[0].sum().backward()
    assert len(builds) == 5
    for step in range(6):  # every call, through the layer's per-call wrapper
        layer.cells()[0].scale = 10.0 + step
        layer(x)[0].sum().backward()
    assert len(builds) == 5 + compiled._REBUILDS


@needs_compiler
def test_a_readout_no_loss_reads_gets_no_gradient_as_in_the_loop() -> None:
    # zeros instead of None made weight decay and momentum move it, and DDP count it as used
    torch.manual_seed(0)
    cell = Knobs()  # output() is a Linear readout of the state
    x = torch.rand(N, T, I)
    for backend in ("reference", "compiled"):
        cell.zero_grad(set_to_none=True)
        unroll(cell, x, backend=backend).final_state.sum().backward()
        assert cell.output.weight.grad is None and cell.output.bias.grad is None, backend
        assert cell.wh.weight.grad is not None, backend
    grads = {}
    for backend in ("reference", "compiled"):
        cell.zero_grad(set_to_none=True)
        unroll(cell, x, backend=backend).outputs.sum().backward()
        grads[backend] = cell.output.weight.grad.clone()
    torch.testing.assert_close(grads["compiled"], grads["reference"])


def test_a_key_walks_shared_objects_once_and_handles_by_identity(monkeypatch) -> None:
    import logging

    calls = []
    walk = compiled._fingerprint
    monkeypatch.setattr(compiled, "_fingerprint", lambda *a: calls.append(1) or walk(*a))
    cell = MinimalCell(I, H)
    node: object = _Config(gain=1.0)
    for _ in range(20):  # each level holds the one below twice: 2**20 paths, 21 objects
        node = _Config(left=node, right=node)
    cell.cfg, cell.log = node, logging.getLogger("rnnkit.tests")  # a logger reaches every logger
    before = compiled._attrs(cell)
    assert len(calls) < 200, len(calls)
    deepest = node
    while hasattr(deepest, "left"):
        deepest = deepest.left
    deepest.gain = 2.0
    assert compiled._attrs(cell) != before  # still by content, at the bottom


def test_attributes_too_many_to_key_run_the_reference_loop() -> None:
    cell, twin = MinimalCell(I, H), MinimalCell(I, H)
    twin.load_state_dict(cell.state_dict())
    cell.table = [(f"w{j}", j) for j in range(5000)]  # rows of plain values: keyed by content, not counted
    assert compiled._attrs(cell) is not None
    cell.entries = [_Config(gain=float(j)) for j in range(compiled._WALKED + 1)]  # objects: too many to walk
    compiled._WARNED.discard(MinimalCell)
    x = torch.rand(N, T, I)
    with pytest.warns(UserWarning, match="too many to key a plan by"):
        got = unroll(cell, x, backend="compiled").outputs
    torch.testing.assert_close(got, unroll(twin, x, backend="reference").outputs)


class _BoundCell(MinimalCell):
    """Holds a bound method of its own: its plan key refers back to the cell."""

    def __init__(self) -> None:
        super().__init__(I, H)
        self.act = self.squash

    def squash(self, t: Tensor) -> Tensor:
        return torch.tanh(t)


@pytest.mark.usefixtures("fresh_caches")
def test_counting_builds_keeps_no_cell_alive(monkeypatch) -> None:
    monkeypatch.setattr(compiled, "_build", lambda *a: None)
    cell = _BoundCell()
    unroll(cell, torch.rand(N, T, I), backend="compiled")
    alive = weakref.ref(cell)
    compiled._PLANS.clear()  # as when its plan is evicted: nothing else may hold the cell
    del cell
    gc.collect()
    assert alive() is None
