"""The fused CPU backend agrees with the reference loop: outputs, states and every gradient."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit import GRUCell, LayerNormLSTMCell, LSTMCell, LSTMState, RNNCell, engine
from rnnkit.backends import cext, fused, gemm, native
from rnnkit.engine import _pick_backend, tree_flatten
from rnnkit.fpmode import denormals_are_flushed

CELLS = {
    "lstm": lambda I, H, bias: LSTMCell(I, H, bias=bias),
    "lstm_forget_bias": lambda I, H, bias: LSTMCell(I, H, bias=bias, forget_bias=1.0),
    "gru": lambda I, H, bias: GRUCell(I, H, bias=bias),
    "gru_reset_before": lambda I, H, bias: GRUCell(I, H, bias=bias, reset_after=False),
    "rnn_tanh": lambda I, H, bias: RNNCell(I, H, bias=bias),
    "rnn_relu": lambda I, H, bias: RNNCell(I, H, bias=bias, nonlinearity="relu"),
}
# Every test here runs twice: with the LSTM's time loops in C++ and in Python.
pytestmark = pytest.mark.usefixtures("lstm_loops")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def make_cell(
    name: str, I: int, H: int, dtype: torch.dtype, bias: bool = True, seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    cell = CELLS[name](I, H, bias).to(dtype)
    if name == "rnn_relu":  # smaller recurrent weights keep a relu RNN from blowing up over time
        with torch.no_grad():
            cell.weight_hh.mul_(0.5)
    return cell


def random_state(cell: torch.nn.Module, N: int, dtype: torch.dtype) -> object:
    leaves, unflatten = tree_flatten(cell.init_state(N, dtype=dtype))
    return unflatten([torch.randn_like(s) * 0.5 for s in leaves])


def run_with_grads(cell, x, state, backend, loss_fn, **kw):
    """Outputs, final state and states of one unroll, and the gradients of loss_fn's loss."""
    x = x.detach().clone().requires_grad_()
    leaves, unflatten = tree_flatten(state)
    leaves = [s.detach().clone().requires_grad_() for s in leaves]
    res = rnnkit.unroll(cell, x, unflatten(leaves), return_states=True, backend=backend, **kw)
    inputs = [x, *leaves, *cell.parameters()]
    grads = torch.autograd.grad(loss_fn(res), inputs, allow_unused=True)
    values = [res.outputs, *tree_flatten(res.final_state)[0], *tree_flatten(res.states)[0]]
    return values, [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def everything(res) -> torch.Tensor:
    """A loss that reaches every output of the unroll with distinct weights."""
    loss = (res.outputs * torch.linspace(-1, 1, res.outputs.shape[-1], dtype=res.outputs.dtype)).sum()
    loss = loss + (res.outputs**2).sum()
    for i, leaf in enumerate(tree_flatten(res.final_state)[0]):
        loss = loss + (i + 1.5) * (leaf**2).sum()
    for i, leaf in enumerate(tree_flatten(res.states)[0]):
        loss = loss + (0.3 + i) * leaf.sin().sum()
    return loss


def assert_agree(cell, x, state, loss_fn=everything, **kw):
    tol = TOL[x.dtype]
    ref_vals, ref_grads = run_with_grads(cell, x, state, "reference", loss_fn, **kw)
    got_vals, got_grads = run_with_grads(cell, x, state, "fused", loss_fn, **kw)
    for i, (a, b) in enumerate(zip(ref_vals, got_vals)):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, i=i: f"value {i}: {m}")
    names = ["x", *[f"state{i}" for i in range(len(tree_flatten(state)[0]))], *dict(cell.named_parameters())]
    weights = set(dict(cell.named_parameters()))
    for name, a, b in zip(names, ref_grads, got_grads):
        # A weight's gradient sums T N terms, in another order here than in the reference: its
        # rounding error scales with the gradient's size, not with each element's (where terms
        # cancel, both loops are off by as much in float32, measured against float64)
        atol = tol["atol"] * (max(1.0, a.abs().max().item()) if name in weights else 1.0)
        torch.testing.assert_close(b, a, rtol=tol["rtol"], atol=atol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize(
    "lengths, reverse",
    [(None, False), ([3, 9, 1, 6, 9], False), ([3, 9, 1, 6, 9], True)],
    ids=["full", "lengths", "reverse"],
)
def test_matches_reference(name, dtype, lengths, reverse):
    N, T, I, H = 5, 9, 6, 7
    cell = make_cell(name, I, H, dtype)
    torch.manual_seed(1)
    x = torch.randn(N, T, I, dtype=dtype)
    assert_agree(cell, x, random_state(cell, N, dtype), lengths=lengths, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CELLS))
def test_no_bias(name, dtype):
    N, T, I, H = 4, 7, 3, 5
    cell = make_cell(name, I, H, dtype, bias=False)
    x = torch.randn(N, T, I, dtype=dtype)
    state = random_state(cell, N, dtype)
    assert_agree(cell, x, state)
    assert_agree(cell, x, state, lengths=[7, 2, 1, 5], reverse=True)


@pytest.mark.parametrize("name", list(CELLS))
def test_time_major_and_full_lengths(name):
    dtype = torch.float64
    cell = make_cell(name, 3, 4, dtype)
    x = torch.randn(6, 2, 3, dtype=dtype)  # (T, N, I)
    assert_agree(cell, x, random_state(cell, 2, dtype), batch_first=False, lengths=[6, 6])


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("name", list(CELLS))
def test_chunked_time_loops(name, keep, monkeypatch):
    # Tiny chunks: the LSTM's input projection, backward loop and weight gradients, and the
    # GRU's precomputed factors, all run a few steps at a time; the LSTM's forward keeps tanh(c) and
    # the weight gradients' rows [x_t, 1, h_{t-1}] (sliced per chunk), or the backward recomputes them.
    N, H = 4, 8
    monkeypatch.setattr(fused, "_CHUNK_GATE_BYTES", 3 * N * 4 * H * 8)
    monkeypatch.setattr(fused, "_KERNEL_CHUNK_SCALE", 1)
    monkeypatch.setattr(fused, "_ONE_CHUNK_GATE_BYTES", 0)
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 3 * N * 4 * H * 8)
    if keep:
        monkeypatch.setattr(fused, "_KERNELS_KEEP_TANH_C", True)  # the C++ loops' other way (they recompute it)
    else:
        monkeypatch.setattr(fused, "_KEEP_TANH_C_BYTES", 0)
    assert fused._lstm_chunk(11, N, H, 8, fused._KERNEL_CHUNK_SCALE) == 3  # the C++ loops' chunks too
    dtype = torch.float64
    cell = make_cell(name, 3, H, dtype)
    x = torch.randn(N, 11, 3, dtype=dtype)
    state = random_state(cell, N, dtype)
    assert_agree(cell, x, state)
    assert_agree(cell, x, state, lengths=[11, 2, 7, 5], reverse=True)
    assert_agree(cell, x, state, lengths=[11, 9, 10, 4])  # lengths.min() inside a later chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, I, H", [(1, 1, 8), (7, 40, 20), (13, 33, 37), (2, 5, 64), (12, 9, 16), (25, 70, 3)])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_tiles_and_their_edges(name, N, I, H, dtype, monkeypatch):
    """The C++ loops work in tiles of rows and vectors of units: whole vectors and a vector's tail, a
    tile's rows and the rows left over, fewer rows than threads, the LSTM's input gradients wider than
    one tile (I up to 70) and one input, its backward in chunks of time that hand their gradient on."""
    cell = make_cell(name, I, H, dtype)
    x = torch.randn(N, 6, I, dtype=dtype)
    state = random_state(cell, N, dtype)
    assert_agree(cell, x, state)
    lengths = [6 - k % 6 for k in range(N)]
    assert_agree(cell, x, state, lengths=lengths, reverse=True)
    assert_agree(cell, x, tree_flatten(cell.init_state(N, dtype=dtype))[1](
        [torch.zeros_like(s) for s in tree_flatten(cell.init_state(N, dtype=dtype))[0]]))  # step 0 skips its product
    monkeypatch.setattr(fused, "_CHUNK_GATE_BYTES", 2 * N * 4 * H * 8)
    monkeypatch.setattr(fused, "_KERNEL_CHUNK_SCALE", 1)
    monkeypatch.setattr(fused, "_ONE_CHUNK_GATE_BYTES", 0)
    monkeypatch.setattr(fused, "_KEEP_TANH_C_BYTES", 0)  # the LSTM's backward recomputes tanh(c)
    assert_agree(cell, x, state, lengths=lengths)


def test_lstm_with_frozen_weights_and_the_bias_gradient_on_its_own(monkeypatch):
    """Weights that need no gradient: the C++ backward computes no weight gradient for them, and the
    input's and bias's gradients are still right. The bias gradient owns its memory (a view would keep the
    threads' partial weight gradients alive as .grad)."""
    dtype = torch.float64
    cell = make_cell("lstm", 3, 5, dtype)
    x = torch.randn(4, 6, 3, dtype=dtype)
    with_dw = []  # for each C++ backward, whether it computed a weight gradient
    ops = cext.ops() if fused.kernels_available() else None

    class Spy:
        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(ops, name)

        def lstm_backward(self, *args):  # noqa: ANN002, ANN201
            with_dw.append(bool(args[14] & (8 | 16 | 32)))  # need: bits 3-5 ask for w_ih's, w_hh's, the bias's
            return ops.lstm_backward(*args)

    monkeypatch.setattr(cext, "ops", Spy)

    def grads(backend, wrt):
        xx = x.clone().requires_grad_()
        out = rnnkit.unroll(cell, xx, lengths=[6, 2, 5, 6], backend=backend).outputs
        return torch.autograd.grad(out.pow(2).sum(), [xx, *wrt])

    for p in cell.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        rnnkit.unroll(cell, x, backend="fused")
    for a, b in zip(grads("fused", []), grads("reference", [])):
        torch.testing.assert_close(a, b, **TOL[dtype])
    cell.bias_ih.requires_grad_(True)
    for a, b in zip(grads("fused", [cell.bias_ih]), grads("reference", [cell.bias_ih])):
        torch.testing.assert_close(a, b, **TOL[dtype])
    if ops is not None:
        assert with_dw == [False, True]
    rnnkit.unroll(cell, x, backend="fused").outputs.sum().backward()
    assert cell.bias_ih.grad.untyped_storage().nbytes() == cell.bias_ih.grad.numel() * 8
    # and so do the weights' gradients, in torch's layout
    for p in cell.parameters():
        p.requires_grad_(True)
    for g in torch.autograd.grad(rnnkit.unroll(cell, x, backend="fused").outputs.sum(), list(cell.parameters())):
        assert g.is_contiguous() and g.untyped_storage().nbytes() == g.numel() * 8


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunks"])
def test_lstm_backward_twice_through_a_retained_graph(chunked, monkeypatch):
    """The C++ backward writes the gate gradients over the saved gates: a second backward through the
    same graph (retain_graph=True) computes the gates again, and both agree with the reference loop."""
    N, H = 4, 6
    if chunked:  # chunks of 3 steps
        monkeypatch.setattr(fused, "_CHUNK_GATE_BYTES", 3 * N * 4 * H * 8)
        monkeypatch.setattr(fused, "_KERNEL_CHUNK_SCALE", 1)
        monkeypatch.setattr(fused, "_ONE_CHUNK_GATE_BYTES", 0)
    dtype = torch.float64
    cell = make_cell("lstm", 3, H, dtype)
    x = torch.randn(N, 9, 3, dtype=dtype, requires_grad=True)
    leaves, unflatten = tree_flatten(random_state(cell, N, dtype))
    state = unflatten([s.requires_grad_() for s in leaves])
    wrt = [x, *cell.parameters(), *leaves]

    def loss(backend):
        res = rnnkit.unroll(cell, x, state, lengths=[9, 4, 7, 9], backend=backend)
        return res.outputs.pow(2).sum() + res.final_state.c.sum()

    want = torch.autograd.grad(loss("reference"), wrt)
    fused_loss = loss("fused")
    first = torch.autograd.grad(fused_loss, wrt, retain_graph=True)
    second = torch.autograd.grad(fused_loss, wrt)
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c, **TOL[dtype])
        torch.testing.assert_close(b, c, **TOL[dtype])


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
def test_lstm_weight_gradients_on_either_gemm(onednn, chunked, monkeypatch):
    """With oneDNN's GEMMs (processors with AVX-512) the C++ loops' backward transposes the weight
    gradient's rows [x_t, 1, h_{t-1}] into a contiguous operand, a chunk at a time (the last one shorter);
    with BLAS the transpose is read in place. Both agree with the reference loop, in float32."""
    if onednn and not gemm._onednn_runs():
        pytest.skip("torch's oneDNN inner product does not run in this torch build")
    monkeypatch.setattr(gemm, "_ONEDNN", onednn)
    N, H = 7, 20
    if chunked:  # chunks of 3 steps: 3, 3, 3 and 2 of the 11
        monkeypatch.setattr(fused, "_CHUNK_GATE_BYTES", 3 * N * 4 * H * 4)
        monkeypatch.setattr(fused, "_KERNEL_CHUNK_SCALE", 1)
        monkeypatch.setattr(fused, "_ONE_CHUNK_GATE_BYTES", 0)
        assert fused._lstm_chunk(11, N, H, 4, fused._KERNEL_CHUNK_SCALE) == 3
    dtype = torch.float32
    for keep in (True, False):  # the forward's rows (and tanh(c)) kept, or laid out again by the backward
        monkeypatch.setattr(fused, "_KERNELS_KEEP_TANH_C", keep)
        if not keep:
            monkeypatch.setattr(fused, "_KEEP_TANH_C_BYTES", 0)
        cell = make_cell("lstm", 5, H, dtype)
        x = torch.randn(N, 11, 5, dtype=dtype)
        assert_agree(cell, x, random_state(cell, N, dtype), lengths=[11, 2, 7, 5, 11, 9, 1])
        assert gemm.onednn_available() == onednn


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_initial_state(name, dtype):
    # The zero state skips step 0's recurrent GEMM; gradients w.r.t. it must still be right.
    cell = make_cell(name, 3, 5, dtype)
    x = torch.randn(4, 6, 3, dtype=dtype)
    assert_agree(cell, x, cell.init_state(4, dtype=dtype), lengths=[6, 3, 1, 5])


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
def test_backward_twice_with_retain_graph(name):
    cell = make_cell(name, 3, 4, torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    loss = rnnkit.unroll(cell, x, lengths=[5, 2], backend="fused").outputs.pow(2).sum()
    first = torch.autograd.grad(loss, [x, *cell.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *cell.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def final_only(res):
    return sum((leaf * leaf.cos()).sum() for leaf in tree_flatten(res.final_state)[0])


def outputs_only(res):
    return (res.outputs**3).sum()


def cell_states_only(res):
    return (res.states.c**2).sum()


def final_c_only(res):
    return res.final_state.c.sum()


@pytest.mark.parametrize("loss_fn", [final_only, outputs_only, cell_states_only, final_c_only])
@pytest.mark.parametrize("lengths", [None, [4, 1, 7]])
def test_lstm_partial_losses(loss_fn, lengths):
    dtype = torch.float64
    cell = make_cell("lstm", 4, 5, dtype)
    x = torch.randn(3, 7, 4, dtype=dtype)
    assert_agree(cell, x, random_state(cell, 3, dtype), loss_fn=loss_fn, lengths=lengths)


@pytest.mark.parametrize("name", ["gru", "gru_reset_before", "rnn_tanh"])
@pytest.mark.parametrize("loss_fn", [final_only, outputs_only])
def test_partial_losses(name, loss_fn):
    dtype = torch.float64
    cell = make_cell(name, 4, 5, dtype)
    x = torch.randn(3, 7, 4, dtype=dtype)
    assert_agree(cell, x, random_state(cell, 3, dtype), loss_fn=loss_fn, lengths=[4, 1, 7])


class _Unrolled(torch.nn.Module):
    """The fused unroll as a module, so gradcheck can swap the cell's parameters functionally."""

    def __init__(self, cell: torch.nn.Module, lengths: torch.Tensor) -> None:
        super().__init__()
        self.cell, self.lengths = cell, lengths

    def forward(self, x, *state_leaves):
        unflatten = tree_flatten(self.cell.init_state(x.shape[0], dtype=x.dtype))[1]
        res = rnnkit.unroll(
            self.cell,
            x,
            unflatten(list(state_leaves)),
            lengths=self.lengths,
            return_states=True,
            backend="fused",
        )
        return (res.outputs, *tree_flatten(res.final_state)[0], *tree_flatten(res.states)[0])


@pytest.mark.parametrize("name", list(CELLS))
def test_gradcheck(name):
    N, T, I, H = 3, 5, 2, 4
    dtype = torch.float64
    module = _Unrolled(make_cell(name, I, H, dtype), torch.tensor([5, 2, 4]))
    names = [f"cell.{n}" for n, _ in module.cell.named_parameters()]
    state = [s.requires_grad_() for s in tree_flatten(random_state(module.cell, N, dtype))[0]]
    params = [p.detach().clone().requires_grad_() for p in module.cell.parameters()]
    x = torch.randn(N, T, I, dtype=dtype, requires_grad=True)
    n_state = len(state)

    def fn(x, *args):
        return torch.func.functional_call(module, dict(zip(names, args[n_state:])), (x, *args[:n_state]))

    assert torch.autograd.gradcheck(fn, (x, *state, *params))


def test_forget_bias_and_bias_grads_reach_both_biases():
    dtype = torch.float64
    cell = LSTMCell(3, 4, forget_bias=1.0).to(dtype)
    x = torch.randn(2, 5, 3, dtype=dtype)
    rnnkit.unroll(cell, x, backend="fused").outputs.sum().backward()
    torch.testing.assert_close(cell.bias_ih.grad, cell.bias_hh.grad)
    assert cell.bias_ih.grad.abs().sum() > 0


def test_no_grad_and_params_only():
    cell = make_cell("lstm", 3, 4, torch.float32)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        a = rnnkit.unroll(cell, x, backend="fused").outputs
    b = rnnkit.unroll(cell, x, backend="reference").outputs
    torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
    rnnkit.unroll(cell, x, backend="fused").outputs.sum().backward()
    assert all(p.grad is not None for p in cell.parameters())


@pytest.mark.parametrize("caller_flushes", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_caller_denormal_mode_is_kept(name, caller_flushes):
    was = denormals_are_flushed()
    try:
        torch.set_flush_denormal(caller_flushes)
        before = denormals_are_flushed()
        cell = make_cell(name, 3, 4, torch.float32)
        x = torch.randn(2, 6, 3, requires_grad=True)
        res = rnnkit.unroll(cell, x, lengths=[6, 3], backend="fused")
        assert denormals_are_flushed() == before
        res.outputs.sum().backward()
        assert denormals_are_flushed() == before
    finally:
        torch.set_flush_denormal(was)


def test_auto_on_cpu_picks_by_workload(monkeypatch):
    """Small float32 LSTM/RNN training and their inference go to torch's kernel (long sequences in chunks
    of time); training with steps too wide for useful chunks goes to the fused one. GRU training always
    does (torch's CPU GRU kernel is not oneDNN's), GRU inference does once it is not tiny. (The rules
    where the LSTM's register-blocked loops do not run; test_auto_trains_lstms_up_to_256_units... has theirs.)"""
    monkeypatch.setattr(engine, "allocator_tuned", lambda: False)
    monkeypatch.setattr(cext, "threaded", lambda: False)
    tiny = torch.randn(3, 2, 4)
    for name in CELLS:
        cell = make_cell(name, 4, 5, torch.float32)
        native_ok = name != "gru_reset_before"  # torch's GRU has only reset_after=True
        want_native = "native" if native_ok else "fused"
        want_train = "fused" if name.startswith("gru") else want_native
        assert _pick_backend(cell, tiny, 3, 2) == want_train
        with torch.no_grad():
            assert _pick_backend(cell, tiny, 3, 2) == want_native
        # a long sequence of narrow steps: torch's kernel, chunked over time (backends.native.chunk_steps)
        step = 2 * 4 * engine._gate_width(cell)
        T_long = native.WHOLE_GATE_BYTES // step + 1
        assert _pick_backend(cell, tiny, T_long, 2) == want_train
        # ... but variable lengths run packed, in one call: the fused loop
        assert _pick_backend(cell, tiny, T_long, 2, ragged=True) == "fused"
        # steps so wide that a chunk would hold fewer than _MIN_CHUNK_STEPS of them: the fused loop
        N_wide = native.CHUNK_GATE_BYTES // (engine._MIN_CHUNK_STEPS * 4 * engine._gate_width(cell)) + 1
        T_wide = native.WHOLE_GATE_BYTES // (N_wide * 4 * engine._gate_width(cell)) + 1
        assert _pick_backend(cell, tiny, T_wide, N_wide) == "fused"
        with torch.no_grad():
            wide_gru = name == "gru" and fused.kernels_available()
            assert _pick_backend(cell, tiny, T_wide, N_wide) == ("fused" if wide_gru else want_native)
        # every step's c: in float32 oneDNN's workspace has them, training or not; torch's kernel
        assert _pick_backend(cell, tiny, 3, 2, return_states=True) == want_train
        with torch.no_grad():
            assert _pick_backend(cell, tiny, 3, 2, return_states=True) == want_native
        # ... but packed sequences run elsewhere, so they would cost the native backend a batched matmul
        want = "fused" if name.startswith(("lstm", "gru")) else "native"
        assert _pick_backend(cell, tiny, 3, 2, return_states=True, ragged=True) == want
        if name.startswith("lstm"):
            # inference would have to keep the workspace just for the states: long ones go to the fused loop
            with torch.no_grad():
                assert _pick_backend(cell, tiny, T_long, 2, return_states=True) == "fused"
            assert _pick_backend(cell, tiny, T_long, 2, return_states=True) == "native"
            # float64 checks numerics: torch's kernel, which has second derivatives
            assert _pick_backend(cell.double(), tiny.double(), 3, 2, return_states=True) == "native"
            cell.float()
        # half precision: neither fused nor (on the CPU, where torch's half kernels are uneven) native
        assert _pick_backend(cell.bfloat16(), tiny.bfloat16(), 3, 2) == "reference"
        cell.float()
        # float64 checks numerics (gradcheck, gradgradcheck): torch's kernel, which has second derivatives
        assert _pick_backend(cell.double(), tiny.double(), 3, 2) == ("native" if native_ok else "reference")


def test_auto_gru_inference_goes_fused_from_a_few_thousand_units(monkeypatch):
    """Without gradients the GRU's C++ loops beat torch's kernel from batch x hidden = 2048 (not below)."""
    gru = make_cell("gru", 4, 64, torch.float32)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        monkeypatch.setattr(fused, "kernels_available", lambda: True)
        assert _pick_backend(gru, x, 28, 32) == "fused"  # 32 x 64 = 2048 units
        assert _pick_backend(gru, x, 28, 31) == "native"
        monkeypatch.setattr(fused, "kernels_available", lambda: False)  # the Python loops are not faster there
        assert _pick_backend(gru, x, 28, 32) == "native"
    assert _pick_backend(gru, x, 28, 1) == "fused"  # training: always


def test_auto_with_a_tuned_allocator_runs_whole_lstm_sequences_natively(monkeypatch):
    """With malloc reusing memory torch's LSTM kernel wins up to 256 MB of gates in one call; the GRU's stays 8 MB.
    (The rules where the LSTM's register-blocked loops do not run; see the next test for theirs.)"""
    monkeypatch.setattr(engine, "allocator_tuned", lambda: True)
    monkeypatch.setattr(cext, "threaded", lambda: False)
    tiny = torch.randn(3, 2, 4)
    lstm, gru = make_cell("lstm", 4, 5, torch.float32), make_cell("gru", 4, 5, torch.float32)
    N = native.CHUNK_GATE_BYTES // (engine._MIN_CHUNK_STEPS * 4 * engine._gate_width(lstm)) + 1
    T_mid = native.WHOLE_GATE_BYTES // (N * 4 * engine._gate_width(lstm)) + 1
    assert _pick_backend(lstm, tiny, T_mid, N) == "native"
    T_gru = native.WHOLE_GATE_BYTES // (2 * 4 * engine._gate_width(gru)) + 1
    assert _pick_backend(gru, tiny, T_gru, 2) == "fused"
    T_huge = engine._NATIVE_TRAIN_GATE_BYTES_TUNED[LSTMCell] // (N * 4 * engine._gate_width(lstm)) + 1
    assert _pick_backend(lstm, tiny, T_huge, N) == "fused"
    monkeypatch.setattr(engine, "allocator_tuned", lambda: False)
    assert _pick_backend(lstm, tiny, T_mid, N) == "fused"


@pytest.mark.parametrize("name", ["lstm", "lstm_forget_bias", "gru", "rnn_tanh", "rnn_relu"])
def test_native_chunks_of_time_match_one_call(monkeypatch, name):
    """Torch's kernel over chunks of time, the state handed on, equals one call: values and gradients."""
    from rnnkit.backends import native as native_backend

    monkeypatch.setattr(native_backend, "allocator_tuned", lambda: False)
    cell = make_cell(name, 3, 4, torch.float32)
    x = torch.randn(2, 11, 3, requires_grad=True)
    state = random_state(cell, 2, torch.float32)

    def run(whole: int, chunk: int):
        monkeypatch.setattr(native_backend, "WHOLE_GATE_BYTES", whole)
        monkeypatch.setattr(native_backend, "CHUNK_GATE_BYTES", chunk)
        res = rnnkit.unroll(cell, x, state, backend="native", return_states=True)
        leaves = [res.outputs, *tree_flatten(res.final_state)[0], *tree_flatten(res.states)[0]]
        grads = torch.autograd.grad(sum((leaf * torch.randn_like(leaf, generator=torch.Generator().manual_seed(
            k))).sum() for k, leaf in enumerate(leaves)), [x, *cell.parameters()])
        return leaves, grads

    step = 2 * 4 * cell.weight_ih.shape[0]
    assert native_backend.chunk_steps(cell, x.transpose(0, 1), [cell.weight_ih]) == 11
    whole = run(1 << 40, 1 << 40)
    monkeypatch.setattr(native_backend, "WHOLE_GATE_BYTES", 0)
    monkeypatch.setattr(native_backend, "CHUNK_GATE_BYTES", 3 * step)
    assert native_backend.chunk_steps(cell, x.transpose(0, 1), [cell.weight_ih]) == 3  # chunks of 3, 3, 3, 2
    chunked = run(0, 3 * step)
    for a, b in zip(whole[0] + list(whole[1]), chunked[0] + list(chunked[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # chunks whenever the kernel keeps a workspace for backward: a state that needs gradients counts too
    frozen = [w.detach() for w in (cell.weight_ih, cell.weight_hh)]
    x_tm = x.detach().transpose(0, 1)
    assert native_backend.chunk_steps(cell, x_tm, frozen) == 11
    assert native_backend.chunk_steps(cell, x_tm, [*frozen, torch.zeros(1, 2, 4, requires_grad=True)]) == 3
    with torch.no_grad():
        assert native_backend.chunk_steps(cell, x_tm, [*frozen, torch.zeros(1, 2, 4, requires_grad=True)]) == 11


@pytest.mark.parametrize(
    "cell, dtype, device, needle",
    [
        (LSTMCell(4, 5, peepholes=True), torch.float32, "cpu", "peephole"),
        (LSTMCell(4, 5, cell_clip=3.0), torch.float32, "cpu", "clip"),
        (LSTMCell(4, 5, proj_size=2), torch.float32, "cpu", "proj"),
        (LayerNormLSTMCell(4, 5), torch.float32, "cpu", "LayerNormLSTMCell"),
        (LSTMCell(4, 5), torch.bfloat16, "cpu", "float"),
        (LSTMCell(4, 5), torch.float32, "meta", "CPU"),
    ],
)
def test_unsupported_reasons(cell, dtype, device, needle):
    x = torch.empty(2, 3, 4, dtype=dtype, device=device)
    reason = fused.unsupported(cell, x)
    assert reason and needle in reason


def test_unsupported_cells_fall_back_to_reference():
    cell = LSTMCell(4, 5, peepholes=True)
    x = torch.randn(2, 3, 4)
    assert _pick_backend(cell, x, 3, 2) == "reference"
    with pytest.raises(rnnkit.ShapeError, match="peephole"):
        rnnkit.unroll(cell, x, backend="fused")


def test_lstm_final_state_is_frozen_state():
    cell = make_cell("lstm", 3, 4, torch.float64)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([2, 6, 4])
    res = rnnkit.unroll(cell, x, lengths=lengths, return_states=True, backend="fused")
    assert isinstance(res.final_state, LSTMState)
    for n, L in enumerate(lengths.tolist()):
        torch.testing.assert_close(res.final_state.h[n], res.states.h[n, L - 1])
        torch.testing.assert_close(res.final_state.c[n], res.states.c[n, -1])
        assert (res.outputs[n, L:] == 0).all()


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_ignores_autocast(monkeypatch, name, onednn):
    """The hand-written backwards are float32 maths, so the forwards must not run autocast to bfloat16."""
    from rnnkit.backends import gemm

    monkeypatch.setattr(gemm, "_ONEDNN", onednn and gemm._ONEDNN)
    cell = make_cell(name, 3, 4, torch.float32)
    x = torch.randn(2, 6, 3, requires_grad=True)
    want = rnnkit.unroll(cell, x, backend="fused").outputs
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rnnkit.unroll(cell, x, backend="fused").outputs
    (gx_got,) = torch.autograd.grad(got.sum(), x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(gx_got, gx_want, rtol=0, atol=0)


def test_training_only_the_biases_counts_as_training(monkeypatch):
    """A long LSTM whose weights are frozen but whose biases train still keeps a workspace: chunks apply."""
    monkeypatch.setattr(engine, "allocator_tuned", lambda: False)
    cell = make_cell("lstm", 4, 5, torch.float32)
    tiny = torch.randn(3, 2, 4)
    T_long = native.WHOLE_GATE_BYTES // (2 * 4 * engine._gate_width(cell)) + 1
    for name, p in cell.named_parameters():
        p.requires_grad_(name.startswith("bias"))
    assert _pick_backend(cell, tiny, T_long, 2, return_states=True) == "native"
    for p in cell.parameters():
        p.requires_grad_(False)
    assert _pick_backend(cell, tiny, T_long, 2, return_states=True) == "fused"  # inference


def test_auto_under_cpu_autocast_keeps_torchs_kernel_and_dtypes(monkeypatch):
    """Where auto would train on the fused backend, CPU autocast keeps torch's kernel: outputs in torch's
    dtype. Where oneDNN has no reduced-precision LSTM (processors without the instructions), the LSTM
    takes the fused backend's float32 maths instead."""
    monkeypatch.setattr(engine, "allocator_tuned", lambda: False)
    monkeypatch.setattr(cext, "threaded", lambda: False)
    x = torch.randn(3, 2, 4)
    for runs in (True, False):
        monkeypatch.setattr(engine, "_autocast_kernel_runs", lambda cell, runs=runs: runs or type(cell) is not LSTMCell)
        for name in ("lstm", "gru"):
            cell = make_cell(name, 4, 5, torch.float32)
            N_wide = native.CHUNK_GATE_BYTES // (engine._MIN_CHUNK_STEPS * 4 * engine._gate_width(cell)) + 1
            T_wide = native.WHOLE_GATE_BYTES // (N_wide * 4 * engine._gate_width(cell)) + 1
            assert _pick_backend(cell, x, T_wide, N_wide) == "fused"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want = "native" if runs or name == "gru" else "fused"
                assert _pick_backend(cell, x, T_wide, N_wide) == want
                assert _pick_backend(cell, x, 3, 2) == want  # small calls too


def test_the_autocast_probe_asks_torch_without_touching_the_random_stream():
    """auto asks torch whether its LSTM runs under autocast by running one; zero weights, so the caller's
    random numbers stay as they were; float32 autocast always runs."""
    engine._torch_lstm_runs.cache_clear()
    before = torch.random.get_rng_state()
    engine._torch_lstm_runs(torch.bfloat16, True)
    engine._torch_lstm_runs(torch.float16, False)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert engine._torch_lstm_runs(torch.float32, True)
    assert engine._autocast_kernel_runs(make_cell("gru", 2, 3, torch.float32))  # only the LSTM is asked


def test_layers_run_under_cpu_autocast_where_torchs_lstm_cannot():
    """On this processor: torch.nn.LSTM's bfloat16 outputs where oneDNN has a bfloat16 LSTM; where it has
    none, torch.nn.LSTM fails to build its primitive and rnnkit's layer returns float32 outputs."""
    bf16_lstm = engine._autocast_kernel_runs(make_cell("lstm", 4, 8, torch.float32))
    ref = torch.nn.LSTM(4, 8)
    layer = rnnkit.LSTM(4, 8)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if bf16_lstm:
            assert layer(x)[0].dtype == ref(x)[0].dtype == torch.bfloat16
            return
        with pytest.raises(RuntimeError):
            ref(x)
        out = layer(x)[0]
        out.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x)[0], atol=0.03, rtol=0)  # the float32 answer, up to autocast's inputs
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("name", list(CELLS))
def test_second_derivatives_recompute_the_sequence(name):
    """create_graph=True (a gradient penalty, a Hessian): the backward recomputes the sequence with torch
    ops, so its result is differentiable again and agrees with the reference loop's."""
    cell = make_cell(name, 3, 4, torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    lengths = [5, 3]
    assert torch.autograd.gradgradcheck(lambda x: rnnkit.unroll(cell, x, backend="fused", lengths=lengths).outputs,
                                        (x,))
    penalties = []
    for backend in ("fused", "reference"):
        res = rnnkit.unroll(cell, x, backend=backend, lengths=lengths, return_states=True)
        loss = res.outputs.square().sum() + sum(s.sin().sum() for s in tree_flatten(res.states)[0])
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), list(cell.parameters())))
    for got, want in zip(*penalties):
        torch.testing.assert_close(got, want)


def test_a_default_gru_takes_a_gradient_penalty():
    """auto trains float32 GRUs on the fused backend, which must not refuse create_graph=True."""
    gru = rnnkit.GRU(3, 8)
    x = torch.randn(4, 6, 3, requires_grad=True)
    (g,) = torch.autograd.grad(gru(x)[0].square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in gru.parameters())


def test_a_backward_runs_the_loops_its_forward_ran(monkeypatch, lstm_loops):
    """Switching the C++ loops off between a GRU's forward and backward (their saved tensors differ)."""
    cell = make_cell("gru", 3, 4, torch.float32)
    x = torch.randn(5, 2, 3)
    out = rnnkit.unroll(cell, x, backend="fused").outputs
    monkeypatch.setattr(fused, "_USE_KERNELS", lstm_loops == "python")
    got = torch.autograd.grad(out.sum(), list(cell.parameters()))
    want = torch.autograd.grad(rnnkit.unroll(cell, x, backend="reference").outputs.sum(), list(cell.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_auto_trains_lstms_up_to_512_units_on_the_register_blocked_loops(monkeypatch):
    """With the C++ loops threaded, an LSTM of up to 512 units, a batch of at least an eighth of them and
    1,024 units of batch x hidden trains, and infers, on the fused backend at any length and allocator;
    not wider, not smaller, not in float64, not elsewhere."""
    x = torch.randn(3, 2, 4)
    monkeypatch.setattr(fused, "kernels_available", lambda: True)
    monkeypatch.setattr(cext, "threaded", lambda: True)
    for tuned in (True, False):
        monkeypatch.setattr(engine, "allocator_tuned", lambda tuned=tuned: tuned)
        lstm, wide = make_cell("lstm", 4, 128, torch.float32), make_cell("lstm", 4, 513, torch.float32)
        assert _pick_backend(lstm, x, 28, 16) == "fused"  # a batch of an eighth of the units
        assert _pick_backend(lstm, x, 28, 15) == "native"
        assert _pick_backend(make_cell("lstm", 4, 512, torch.float32), x, 28, 64) == "fused"
        assert _pick_backend(make_cell("lstm", 4, 256, torch.float32), x, 28, 31) == "native"
        assert _pick_backend(make_cell("lstm", 4, 32, torch.float32), x, 28, 32) == "fused"  # 1,024 units
        assert _pick_backend(make_cell("lstm", 4, 32, torch.float32), x, 28, 31) == "native"
        assert _pick_backend(wide, x, 2, 128) == "native"
        with torch.no_grad():  # inference: the same rule (the C++ forward then keeps no gates)
            assert _pick_backend(lstm, x, 28, 16) == "fused"
            assert _pick_backend(lstm, x, 28, 15) == "native"
            assert _pick_backend(wide, x, 2, 128) == "native"
        assert _pick_backend(lstm.double(), x.double(), 28, 128) == "native"
        with torch.no_grad():
            assert _pick_backend(lstm.double(), x.double(), 28, 128) == "native"
        lstm.float()
    monkeypatch.setattr(cext, "threaded", lambda: False)  # one thread: torch's kernel
    assert _pick_backend(make_cell("lstm", 4, 128, torch.float32), x, 28, 128) == "native"
    with torch.no_grad():
        assert _pick_backend(make_cell("lstm", 4, 128, torch.float32), x, 28, 128) == "native"
    monkeypatch.setattr(cext, "threaded", lambda: True)
    monkeypatch.setattr(fused, "kernels_available", lambda: False)
    assert _pick_backend(make_cell("lstm", 4, 128, torch.float32), x, 28, 128) == "native"

    def no_build() -> bool:
        raise AssertionError("a small LSTM must not make auto build the kernels")

    monkeypatch.setattr(fused, "kernels_available", no_build)
    assert _pick_backend(make_cell("lstm", 4, 16, torch.float32), x, 28, 8) == "native"
    with torch.no_grad():  # nor its inference
        assert _pick_backend(make_cell("lstm", 4, 16, torch.float32), x, 28, 8) == "native"


def test_auto_runs_torchs_kernel_while_exporting_or_tracing(monkeypatch):
    """torch.export and tracers see the fused loops as an opaque custom op: LSTM and GRU training
    and inference run torch's kernel while they record, and the fused loops again once they stop."""
    x = torch.randn(3, 2, 4)
    cells = make_cell("lstm", 4, 128, torch.float32), make_cell("gru", 4, 128, torch.float32)
    monkeypatch.setattr(fused, "kernels_available", lambda: True)
    monkeypatch.setattr(cext, "threaded", lambda: True)
    for cell in cells:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                assert _pick_backend(cell, x, 28, 128) == "fused"
                monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
                assert _pick_backend(cell, x, 28, 128) == "native"
                assert not engine.fused_infers_faster(cell, x, 128)
                monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
                monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
                assert _pick_backend(cell, x, 28, 128) == "native"
                monkeypatch.setattr(torch.jit, "is_tracing", lambda: False)
                assert _pick_backend(cell, x, 28, 128) == "fused"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_lstm_inference_without_a_graph_equals_the_functions_forward(mode):
    """The LSTM's no-graph call (the loops without the autograd Function, no gates kept) gives the
    Function's outputs and final states exactly, with variable lengths and an initial state, on the
    C++ and the Python loops."""
    cell = make_cell("lstm_forget_bias", 3, 6, torch.float32)
    N, T = 5, 7
    x = torch.randn(N, T, 3)
    lengths = torch.tensor([7, 3, 5, 1, 7])
    h0 = random_state(cell, N, torch.float32)
    want = rnnkit.unroll(cell, x.requires_grad_(), h0, lengths=lengths, backend="fused")
    assert want.outputs.grad_fn is not None  # the Function's forward
    x = x.detach()
    if mode == "frozen":
        for p in cell.parameters():
            p.requires_grad_(False)
        got = rnnkit.unroll(cell, x, h0, lengths=lengths, backend="fused")
    else:
        with getattr(torch, mode)():
            got = rnnkit.unroll(cell, x, h0, lengths=lengths, backend="fused")
    assert got.outputs.grad_fn is None
    torch.testing.assert_close(got.outputs, want.outputs, rtol=0, atol=0)
    for a, b in zip(tree_flatten(got.final_state)[0], tree_flatten(want.final_state)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_with_the_cpu_kernels_wants_longer_chunks_for_torchs_kernel(monkeypatch):
    """Untuned, a long LSTM sequence whose chunks of time hold 8-31 steps trains on the fused backend when its
    loops run in C++ (faster there), and on torch's kernel in chunks when they run in Python."""
    monkeypatch.setattr(cext, "threaded", lambda: False)  # the LSTM's register-blocked loops are off
    monkeypatch.setattr(engine, "allocator_tuned", lambda: False)
    cell = make_cell("lstm", 4, 5, torch.float32)
    x = torch.randn(3, 2, 4)
    step_bytes_per_row = 4 * engine._gate_width(cell)
    N = native.CHUNK_GATE_BYTES // (16 * step_bytes_per_row)  # a chunk holds 16 steps
    T = native.WHOLE_GATE_BYTES // (N * step_bytes_per_row) + 1  # too long for one call
    monkeypatch.setattr(fused, "kernels_available", lambda: True)
    assert _pick_backend(cell, x, T, N) == "fused"
    monkeypatch.setattr(fused, "kernels_available", lambda: False)
    assert _pick_backend(cell, x, T, N) == "native"


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
def test_vectorised_jacobians_and_hessians(name):
    """is_grads_batched / vectorize=True send vmap-batched gradients through the backward."""
    cell = make_cell(name, 3, 4, torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def f(x):
        return rnnkit.unroll(cell, x, backend="fused", batch_first=False).outputs.sum(0)

    def loss(x):
        return rnnkit.unroll(cell, x, backend="fused", batch_first=False).outputs.square().sum()

    torch.testing.assert_close(torch.autograd.functional.jacobian(f, x, vectorize=True),
                               torch.autograd.functional.jacobian(f, x, vectorize=False))
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, x, vectorize=True),
                               torch.autograd.functional.hessian(loss, x, vectorize=False))


@pytest.mark.parametrize("name", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
def test_backward_inside_cpu_autocast_stays_float32(name):
    """A backward called inside an autocast region runs the forward's float32 maths (and its differentiable
    form too; only the penalty's own backward, run inside the region, is autocast, as any op there is)."""
    cell = make_cell(name, 3, 4, torch.float32)
    x = torch.randn(2, 5, 3, requires_grad=True)
    grads = []
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = rnnkit.unroll(cell, x, backend="fused").outputs
            (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            grads.append([g, *torch.autograd.grad(g.square().sum(), list(cell.parameters()))])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_outputs_and_final_state_may_be_edited_in_place_as_torchs(kind):
    """torch.nn.GRU's outputs may be edited in place before backward (its CPU kernel keeps none); so may
    rnnkit's fused GRU's. Every layer's final state is a copy: editing it leaves the outputs alone."""
    torch.manual_seed(0)
    ref = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(3, 5)
    ours = (rnnkit.GRU if kind == "gru" else rnnkit.LSTM)(3, 5, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    out, hidden = ours(x)
    h = hidden if kind == "gru" else hidden[0]
    before = out[-1].clone()
    h.add_(1.0)
    assert torch.equal(out[-1], before)
    if kind == "gru":
        grads = []
        for m in (ours, ref):
            o = m(x)[0]
            o.relu_()
            grads.append(torch.autograd.grad(o.sum(), list(m.parameters())))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_an_input_edited_in_place_before_backward_is_refused_at_backward(kind, batch_first):
    """The fused backend reads the input where it lies at backward (README, "where the layers still
    differ"): an input edited in place in between makes the backward raise autograd's usual in-place
    error, never give a gradient of the edited values. The edit itself goes through, as with torch's
    layers (a view of the input that the forward made with grad off would have autograd refuse the
    edit at once, with a message about no_grad views). torch's kernels raise alike for a time-major
    input and keep a copy of a batch-first one."""
    torch.manual_seed(0)
    cls = {"gru": (torch.nn.GRU, rnnkit.GRU), "lstm": (torch.nn.LSTM, rnnkit.LSTM), "rnn": (torch.nn.RNN, rnnkit.RNN)}
    ref = cls[kind][0](3, 5, batch_first=batch_first)
    ours = cls[kind][1](3, 5, batch_first=batch_first, backend="fused")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    want = torch.autograd.grad(ref(x * 1.0)[0].sum(), ref.weight_ih_l0)[0]
    for m in (ours, ref):
        y = x * torch.ones((), requires_grad=True)  # a non-leaf input, which may be edited in place
        out = m(y)[0]
        y.add_(1.0)
        if m is ours or not batch_first:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        else:
            (got,) = torch.autograd.grad(out.sum(), ref.weight_ih_l0)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_huge_gate_inputs_saturate_instead_of_turning_into_nan(name):
    """Gate inputs far past the float range of exp (a diverging model) give saturated gates as torch's do,
    not NaN: the C++ loops' exp clamps its input on both sides."""
    cell = make_cell(name, 3, 17, torch.float32)
    x = torch.randn(5, 4, 3) * 1e20
    with torch.no_grad():
        got = rnnkit.unroll(cell, x, backend="fused").outputs
        want = rnnkit.unroll(cell, x, backend="reference").outputs
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_nan_inputs_give_nan_outputs_as_in_the_reference_loop(name, lstm_loops):
    """A NaN in the input stays NaN through the fused loops' activations (their exp clamps its input
    with vector min/max, which must not turn a NaN into a bound), where the reference loop has NaN."""
    cell = make_cell(name, 3, 20, torch.float32)  # 20 units: whole vectors and a partial one
    x = torch.randn(6, 5, 3)
    x[2, 1, 0] = float("nan")
    got = rnnkit.unroll(cell, x, backend="fused").outputs
    want = rnnkit.unroll(cell, x, backend="reference").outputs
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), **TOL[torch.float32])
