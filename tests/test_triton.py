"""The triton backend's LSTM kernels against the reference loop, values and gradients.

On a machine with a CUDA device the kernels run compiled on it; elsewhere on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, which conftest.py sets before anything imports Triton), which runs
the same kernel code, so their indexing, masking and maths are checked on every machine with Triton installed
(``make test`` installs it where torch did not bring it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import rnnkit
from rnnkit import ShapeError
from rnnkit.backends import triton_lstm
from rnnkit.cells import LSTMCell

pytest.importorskip("triton", reason="Triton is not installed here (make test installs it)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True, scope="module")
def _exact_products():
    """Exact float32 products on a GPU (TF32 is checked on its own); on the CPU the interpreter is exact."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _pair(I: int, H: int, dtype: torch.dtype, **kwargs: Any) -> tuple[rnnkit.LSTM, rnnkit.LSTM]:
    """The same LSTM on the reference loop and on the triton backend."""
    ref = rnnkit.LSTM(I, H, batch_first=True, backend="reference", **kwargs).to(DEVICE, dtype)
    tri = rnnkit.LSTM(I, H, batch_first=True, backend="triton", **kwargs).to(DEVICE, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _run(layer: rnnkit.LSTM, x: Tensor, hx: Any, lengths: Tensor | None) -> list[Tensor]:
    """Outputs, every step's c, the final state, and the gradients of a loss reading all of them."""
    r = layer(x, hx, lengths=lengths, return_states=True)
    h_n, c_n = r.hidden
    loss = (r.output**2).sum() + (r.states.c**3).sum() + 2 * h_n.sum() + (c_n * c_n.detach()).sum()
    wrt = [t for t in (x, *(hx or ())) if t.requires_grad] + list(layer.parameters())
    return [r.output, r.states.c, h_n, c_n, *torch.autograd.grad(loss, wrt)]


def _assert_close(got: list[Tensor], want: list[Tensor], dtype: torch.dtype) -> None:
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-4}
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, k=k: f"tensor {k}: {m}")


# (I, H, N, T, ragged): H below one tile, past one (two tiles of units and of depth, the last ones
# partial), batches that are not a whole number of programs' rows
CASES = [(7, 20, 5, 4, False), (3, 32, 18, 3, True), (5, 70, 3, 2, True), (1, 16, 17, 5, True)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("I", "H", "N", "T", "ragged"), CASES)
def test_values_and_gradients_match_the_reference_loop(I, H, N, T, ragged, dtype):
    torch.manual_seed(H + N)
    ref, tri = _pair(I, H, dtype)
    x = torch.randn(N, T, I, device=DEVICE, dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(1, N, H, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    lengths = None
    if ragged:
        lengths = torch.randint(1, T + 1, (N,))
        lengths[0] = T
    _assert_close(_run(tri, x, hx, lengths), _run(ref, x, hx, lengths), dtype)


@pytest.mark.parametrize("options", [{"bias": False}, {"forget_bias": 1.0}])
def test_bias_variants_match(options):
    torch.manual_seed(1)
    ref, tri = _pair(4, 24, F64, **options)
    x = torch.randn(6, 5, 4, device=DEVICE, dtype=F64, requires_grad=True)
    _assert_close(_run(tri, x, None, None), _run(ref, x, None, None), F64)


def test_stacked_bidirectional_layers_with_lengths_match():
    torch.manual_seed(2)
    ref, tri = _pair(3, 16, F64, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, device=DEVICE, dtype=F64, requires_grad=True)
    lengths = torch.tensor([6, 2, 4, 1])
    _assert_close(_run(tri, x, None, lengths), _run(ref, x, None, lengths), F64)


def test_packed_and_unbatched_inputs_match():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(8)
    ref, tri = _pair(3, 16, F64)
    x = torch.randn(4, 5, 3, device=DEVICE, dtype=F64)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4, 1]), batch_first=True, enforce_sorted=False)
    (want, (h_want, c_want)), (got, (h_got, c_got)) = ref(packed), tri(packed)
    _assert_close([got.data, h_got, c_got], [want.data, h_want, c_want], F64)
    _assert_close([tri(x[0])[0]], [ref(x[0])[0]], F64)


class _Unrolled(torch.nn.Module):
    """A cell run over time on the triton backend, every step's h and c out."""

    def __init__(self, cell: LSTMCell, lengths: Tensor) -> None:
        super().__init__()
        self.cell, self.lengths = cell, lengths

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
        r = rnnkit.unroll(self.cell, x, (h0, c0), lengths=self.lengths, return_states=True, backend="triton")
        return r.outputs, r.states.c


def test_gradcheck_float64():
    torch.manual_seed(3)
    model = _Unrolled(LSTMCell(2, 16), torch.tensor([3, 1, 2])).to(DEVICE, F64)
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 3, 2, device=DEVICE, dtype=F64, requires_grad=True)
    h0, c0 = (torch.randn(3, 16, device=DEVICE, dtype=F64, requires_grad=True) for _ in range(2))

    def f(x: Tensor, h0: Tensor, c0: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(model, dict(zip(names, weights)), (x, h0, c0))

    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), fast_mode=True)


def test_second_derivatives_by_recomputation_match():
    torch.manual_seed(4)
    ref, tri = _pair(3, 16, F64)
    x = torch.randn(2, 3, 3, device=DEVICE, dtype=F64, requires_grad=True)
    penalties = []
    for layer in (ref, tri):
        (gx,) = torch.autograd.grad(layer(x)[0].pow(2).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(gx.pow(2).sum(), [x, *layer.parameters()]))
    _assert_close(list(penalties[1]), list(penalties[0]), F64)


def test_inference_and_a_retained_graph():
    torch.manual_seed(5)
    ref, tri = _pair(3, 16, F32)
    x = torch.randn(5, 4, 3, device=DEVICE)
    with torch.no_grad():
        out = tri(x)[0]
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref(x)[0].detach(), rtol=1e-5, atol=1e-5)
    loss = tri(x)[0].sum()
    first = torch.autograd.grad(loss, list(tri.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(tri.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_tile_sizes_from_the_environment(monkeypatch):
    torch.manual_seed(6)
    ref, tri = _pair(3, 40, F64)
    x = torch.randn(40, 3, 3, device=DEVICE, dtype=F64, requires_grad=True)
    # three tiles of units and three of depth forward; one of 64 units, nine of depth backward
    monkeypatch.setenv("RNNKIT_TRITON_BLOCKS", "32,16,16,4/16,64,16,2")
    assert triton_lstm.blocks(40, 40) == (32, 16, 16, 4)
    assert triton_lstm.blocks(40, 40, backward=True) == (16, 64, 16, 2)
    _assert_close(_run(tri, x, None, None), _run(ref, x, None, None), F64)
    for bad, why in (("16,16,16", "must be 'BB,BU,BK,WARPS'"), ("16,24,16,4", "BU must be a power of two"),
                     ("16,16,16,3", "WARPS must be a power of two")):
        monkeypatch.setenv("RNNKIT_TRITON_BLOCKS", bad)
        with pytest.raises(ValueError, match=why):
            triton_lstm.blocks(8, 8)


def test_cells_it_cannot_run_are_refused_with_the_reason():
    x = torch.randn(2, 3, 4, device=DEVICE)
    for cell, why in ((rnnkit.cells.GRUCell(4, 8), "LSTMCell only"),
                      (LSTMCell(4, 8, peepholes=True), "no peepholes")):
        with pytest.raises(ShapeError, match=f"backend='triton' cannot run this cell: .*{why}"):
            rnnkit.unroll(cell.to(DEVICE), x, backend="triton")
    with pytest.raises(ShapeError, match="float32 and float64"):
        rnnkit.unroll(LSTMCell(4, 8).to(DEVICE, torch.bfloat16), x.bfloat16(), backend="triton")
    huge = torch.zeros(1, 1, 1, device=DEVICE).expand(2048, 1024, 1)  # no memory: one element, broadcast
    assert "32-bit offsets" in triton_lstm.unsupported(LSTMCell(1, 256), huge)
    assert triton_lstm.unsupported(LSTMCell(1, 255), huge) is None  # 2**31 - 2**23 elements of gates


def test_on_the_cpu_without_the_interpreter_it_says_where_it_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a GPU machine never sets it
    why = triton_lstm.unsupported(LSTMCell(4, 8), torch.randn(2, 3, 4))
    assert why is not None and "runs on a CUDA device" in why


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 products exist on a GPU only")
def test_tf32_products_stay_close(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(7)
    ref, tri = _pair(28, 128, F32)
    x = torch.randn(64, 28, 28, device=DEVICE, requires_grad=True)
    got, want = _run(tri, x, None, None), _run(ref, x, None, None)
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 5e-3


def test_the_kernels_compile_for_an_h100_without_spilling():
    """Triton and the ptxas it brings build the kernels for sm_90 on any machine: the interpreter above
    cannot catch what only the compiler refuses (types of both sides of a branch, tile shapes), nor
    tiles that spill registers or ask for more shared memory than a block may have."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--hidden", "20", "128"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["dtype"], r["kernel"], r["H"]) for r in rows] == [
        (d, k, H) for d in ("fp32", "fp64") for H in (20, 128) for k in ("forward", "backward")]
    assert all(r["stack"] == 0 and 0 < r["registers"] <= 255 and 0 < r["shared"] <= 232448 and r["fits"]
               for r in rows), rows


def test_the_gpu_tile_sweep_runs_and_checks_each_configuration(capsys):
    """benchmarks/triton_sweep.py, the script a GPU session runs first, here on a tiny shape."""
    from test_benchmarks import _script

    sweep = _script("triton_sweep")
    assert sweep.main(["--device", DEVICE.type, "--shapes", "T3 I2 H20 B5", "--rounds", "1",
                       "--blocks", "default", "16,16,16,4/16,32,16,4", "16,24,16,4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["impl"] for r in rows] == ["cudnn", "triton default", "triton 16,16,16,4/16,32,16,4",
                                         "triton 16,24,16,4"]
    assert all(r["ms"] > 0 for r in rows[:3]), rows
    assert "BU must be a power of two" in rows[3]["error"]
