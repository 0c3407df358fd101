"""The fused backend's GEMM routines and the oneDNN linear mode agree with torch's products."""

from __future__ import annotations

import pytest
import torch

from rnnkit.backends import fastcpu, gemm


@pytest.fixture(params=[True, False], ids=["onednn", "blas"])
def route(request, monkeypatch):
    """Run a test through oneDNN (where torch has it) and through torch's BLAS path."""
    if request.param and not gemm._onednn_runs():
        pytest.skip("this torch build has no oneDNN inner product")  # pragma: no cover
    monkeypatch.setattr(gemm, "_ONEDNN", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_match_torch(route, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g, dtype=dtype)
    w = torch.randn(7, 5, generator=g, dtype=dtype)
    b = torch.randn(7, generator=g, dtype=dtype)
    c = torch.randn(6, 7, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gemm.linear(a, w), a @ w.t(), **tol)
    torch.testing.assert_close(gemm.linear(a, w, bias=b), a @ w.t() + b, **tol)
    out = torch.empty(6, 7, dtype=dtype)
    assert gemm.linear(a, w, out=out) is out
    torch.testing.assert_close(out, a @ w.t(), **tol)
    want = c + a @ w.t()
    assert gemm.linear_add_(c, a, w) is c
    torch.testing.assert_close(c, want, **tol)
    # transposed (strided) operands, as the weight-gradient products pass them
    torch.testing.assert_close(gemm.mm(w.t()[:, :3].t(), a.t()[:, :4]), w[:3] @ a[:4].t(), **tol)
    d = torch.zeros(5, 5, dtype=dtype)
    torch.testing.assert_close(gemm.addmm_(d, a.t(), a), a.t() @ a, **tol)


def test_env_switch_turns_onednn_off(monkeypatch):
    monkeypatch.setenv("RNNKIT_GEMM", "blas")
    assert gemm._probe() is False


def test_onednn_only_where_the_processor_has_avx512(monkeypatch):
    monkeypatch.setattr(gemm, "_onednn_runs", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert gemm._probe() is False
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert gemm._probe() is True


def test_linear_mode_values_and_gradients(route):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7)
    x = torch.randn(4, 5, requires_grad=True)
    want = lin(x)
    gx, gw, gb = torch.autograd.grad(want.square().sum(), [x, lin.weight, lin.bias])
    with fastcpu.FastCPUMode():
        got = lin(x)
        x3 = lin(x.detach().unsqueeze(0))  # not 2-D: passes through to torch
    assert (type(got.grad_fn).__name__ == "_LinearBackward") is route  # rerouted only where oneDNN runs
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x3[0], want.detach())
    hx, hw, hb = torch.autograd.grad(got.square().sum(), [x, lin.weight, lin.bias])
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw, gw)
    torch.testing.assert_close(hb, gb)


def test_linear_mode_second_derivative():
    """create_graph=True keeps the backward differentiable (a gradient penalty works)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)

    def penalty() -> torch.Tensor:
        (gx,) = torch.autograd.grad(torch.tanh(lin(x)).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), lin.weight)[0]

    want = penalty()
    with fastcpu.FastCPUMode():
        got = penalty()
    torch.testing.assert_close(got, want)


def test_only_dense_operands_go_to_onednn(monkeypatch):
    """A column slice of a wider tensor (a batch-first sequence's step, say) stays on BLAS."""
    monkeypatch.setattr(gemm, "_ONEDNN", True)
    seq = torch.randn(4, 9, 15)  # (N, T, I) batch first: seq[:, t] has row stride 135
    w = torch.randn(7, 15)
    assert gemm._use_onednn(seq[:, 0].contiguous(), w) and gemm._use_onednn(w.t().contiguous().t(), w)
    assert not gemm._use_onednn(torch.randn(6, 4), seq[:, 0].t())
    assert not gemm._use_onednn(seq[:, 0], w)
    torch.testing.assert_close(gemm.linear(seq[:, 0], w), seq[:, 0] @ w.t())
    big = torch.randn(1 << 11, 1 << 10)  # a transposed operand this large is not copied for oneDNN
    assert not gemm._use_onednn(big.t(), torch.randn(3, 1 << 11))


def test_fast_tanh_matches_torch_values_and_gradients():
    x = torch.cat([torch.linspace(-12, 12, 2001), torch.tensor([0.0, 1e-6, -1e-4, 30.0, -30.0])])
    x = x.view(-1, 1).repeat(1, 3).requires_grad_()
    want = torch.tanh(x)
    (gw,) = torch.autograd.grad(want.square().sum(), x)
    with fastcpu.FastCPUMode():
        got = [torch.tanh(x), x.tanh(), torch.nn.functional.tanh(x), torch.nn.Tanh()(x)]
    for y in got:
        assert type(y.grad_fn).__name__ == "_TanhBackward"  # the rerouted kernel, not torch's TanhBackward0
        torch.testing.assert_close(y, want, rtol=0, atol=2.5e-7)
        (gg,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-6)
    with fastcpu.FastCPUMode():  # float64 passes through to torch's own tanh
        d = torch.tanh(x.detach().double())
    assert torch.equal(d, torch.tanh(x.detach().double()))


def test_fast_tanh_second_derivative():
    x = torch.randn(5, requires_grad=True)

    def curvature() -> torch.Tensor:
        (g,) = torch.autograd.grad(torch.tanh(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    want = curvature()
    with fastcpu.FastCPUMode():
        got = curvature()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("enabled", [True, False])
def test_reference_loop_enters_the_mode_unless_switched_off(monkeypatch, enabled):
    import rnnkit

    class TanhCell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3 + 4, 4)

        def init_state(self, batch_size, device=None, dtype=None):
            return torch.zeros(batch_size, 4, device=device, dtype=dtype)

        def forward(self, x, h):
            return torch.tanh(self.lin(torch.cat([x, h], 1)))

    monkeypatch.setattr(fastcpu, "_ENABLED", enabled)
    out = rnnkit.unroll(TanhCell(), torch.randn(2, 5, 3), backend="reference").final_state
    seen, todo = set(), [out.grad_fn]
    while todo:  # every node of the graph
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    assert ("_TanhBackward" in {type(f).__name__ for f in seen}) is enabled


def test_linear_mode_passes_through_what_onednn_cannot_take(route):
    """Keyword arguments work; scalar and 2-D biases (torch broadcasts them) stay with torch."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    for bias in (torch.tensor(1.0), torch.randn(4, 3), torch.randn(3), None):
        want = torch.nn.functional.linear(x, w, bias)
        with fastcpu.FastCPUMode():
            got = torch.nn.functional.linear(input=x, weight=w, bias=bias)
            got_pos = torch.nn.functional.linear(x, w, bias)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_pos, want)


def test_fast_cpu_mode_steps_aside_for_torch_func():
    x = torch.randn(3, 4)
    lin = torch.nn.Linear(4, 2)

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(lin(v))

    want = torch.func.vmap(torch.func.jacrev(f))(x)
    with fastcpu.FastCPUMode():
        got = torch.func.vmap(torch.func.jacrev(f))(x)
    torch.testing.assert_close(got, want)


def test_empty_operands_take_torch_path(route):
    a, w = torch.randn(0, 5), torch.randn(7, 5)
    assert gemm.linear(a, w).shape == (0, 7)
    assert torch.equal(gemm.mm(torch.randn(3, 0), torch.randn(0, 4)), torch.zeros(3, 4))


def test_a_cell_with_mismatched_sizes_gets_torchs_error_not_onednns():
    from torch import nn

    import rnnkit

    class WrongState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3 + 4, 4)

        def init_state(self, n, device=None, dtype=None):
            return torch.zeros(n, 5, device=device, dtype=dtype)  # one unit too many for its Linear

        def forward(self, x, h):
            return torch.tanh(self.lin(torch.cat([x, h], 1)))

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        rnnkit.unroll(WrongState(), torch.randn(2, 5, 3), backend="reference")
