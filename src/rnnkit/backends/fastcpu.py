"""Faster CPU kernels for a user's cell, applied inside the reference loop without changing the cell.

:class:`FastCPUMode` is a ``TorchFunctionMode`` that the unroll engine's reference backend enters
around the time loop on the CPU (float32). It reroutes two operations whose stock CPU kernels are
slow, and passes everything else through untouched:

* ``F.linear`` (so ``nn.Linear``) on 2-D input: oneDNN's inner product forward and backward, 1.8-2x
  faster than torch's BLAS path on AMD processors (see :mod:`rnnkit.backends.gemm`);
* ``torch.tanh``: computed as ``2 sigmoid(2x) - 1``. Measured with torch 2.13.0 on an AMD EPYC
  (Zen 5, 2 cores, quiet machine), ``tanh`` of a (128 x 512) float32 tensor took 89-158 us (two
  threads / one), ``sigmoid`` 12-17 us and this route 28-37 us; at (128 x 128), 25-39 us against
  17-18 us (the autograd Function's own overhead dominates there). The identity is exact in real
  arithmetic; in float32 the absolute error stays below 2.5e-7 (relative error grows only for
  |x| < 1e-3, where tanh(x) ~ x is tiny).
  The fused backend uses the same identity.

``RNNKIT_FAST_CPU=0`` in the environment turns the mode off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rnnkit.backends.gemm import _use_onednn, linear, mm
from rnnkit.fpmode import transforming as _transforming

__all__ = ["FastCPUMode", "fast_cpu_enabled"]

_ENABLED = os.environ.get("RNNKIT_FAST_CPU", "1").strip().lower() not in ("0", "false", "no", "off")


def fast_cpu_enabled() -> bool:
    """Whether the reference loop enters :class:`FastCPUMode` on the CPU."""
    return _ENABLED


class _Linear(torch.autograd.Function):
    """``F.linear`` for 2-D float32 CPU input with oneDNN products forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return linear(x, w, bias=b)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable for a second derivative
            return (g @ w if need_x else None, g.t() @ x if need_w else None,
                    g.sum(0) if need_b and ctx.has_b else None)
        return (mm(g, w) if need_x else None, mm(g.t(), x) if need_w else None,
                g.sum(0) if need_b and ctx.has_b else None)


_MINUS_ONE = torch.tensor(-1.0, dtype=torch.float32, device="cpu")  # the only case the mode reroutes


class _Tanh(torch.autograd.Function):
    """``tanh(x) = 2 sigmoid(2x) - 1``, with tanh's own derivative ``1 - y^2``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        # no Python-scalar operands: each costs a conversion to a tensor (3 of 7 us measured per call)
        y = torch.add(_MINUS_ONE, torch.sigmoid(torch.add(x, x)), alpha=2)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable in y as well
            return g * (1.0 - y * y)
        return torch.ops.aten.tanh_backward(g, y)


_TANH = (torch.tanh, Tensor.tanh, torch.nn.functional.tanh)


class FastCPUMode(torch.overrides.TorchFunctionMode):
    """Reroutes ``F.linear`` and ``tanh`` on float32 CPU tensors to faster kernels (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and not _transforming():
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _linear_fits(x, w, b):
                return _Linear.apply(x, w, b)
        elif func in _TANH and len(args) == 1 and not kwargs and not _transforming():
            x = args[0]
            if isinstance(x, Tensor) and x.dtype == torch.float32 and x.device.type == "cpu":
                return _Tanh.apply(x)
        return func(*args, **kwargs)


def _linear_fits(x: object, w: object, b: object) -> bool:
    """2-D float32 CPU operands oneDNN takes, and a bias of shape (out,) or none (torch broadcasts others)."""
    if not (isinstance(x, Tensor) and isinstance(w, Tensor) and x.dim() == 2 and w.dim() == 2):
        return False
    if x.shape[1] != w.shape[1]:  # torch's own linear then names the mismatch (oneDNN's error does not)
        return False
    if w.device.type != "cpu" or not _use_onednn(x, w):
        return False
    return b is None or (isinstance(b, Tensor) and b.dim() == 1 and b.shape[0] == w.shape[0]
                         and b.dtype == torch.float32 and b.device.type == "cpu")
