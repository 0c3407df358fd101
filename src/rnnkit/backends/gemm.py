"""The GEMMs of the fused CPU backend: on oneDNN where torch ships it and the processor has AVX-512, on BLAS otherwise.

torch's float32 ``mm`` on the CPU goes to MKL, whose kernels on AMD processors stop at AVX2;
oneDNN (which also runs ``torch.nn.LSTM`` on the CPU) uses AVX-512 where the processor has it.
Measured on an AMD EPYC (Zen 5, 2 cores, torch 2.13.0) for the LSTM's per-step product,
(128 x 128) times (128 x 512): 52 us through oneDNN against 90-120 us through ``torch.mm``; the
chunk-sized products gained 2-3.4x. Both are IEEE float32 products (no reduced precision unless
the user asks torch for it), so results agree to rounding.

Every function here takes the weight as ``w`` of shape (out, in) and computes ``a @ w.T``, the
layout oneDNN's inner-product wants; callers prepare contiguous weights once per call, not per step.
``RNNKIT_GEMM=blas`` turns oneDNN off (an escape hatch if a torch build misbehaves).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["addmm_", "avx512", "linear", "linear_add", "linear_add_", "mm", "onednn_available"]


def _onednn_runs() -> bool:
    """Whether torch's oneDNN inner product runs here and agrees with ``torch.mm``."""
    if os.environ.get("RNNKIT_GEMM", "").lower() == "blas":
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.arange(12.0).view(3, 4)
        w = torch.arange(8.0).view(2, 4)
        return bool(torch.equal(op(a, w, None, "none", [], ""), a @ w.t()))
    except (RuntimeError, NotImplementedError):
        return False


def avx512() -> bool:
    """Whether torch's CPU kernels run AVX-512 code here (the rules of this module and of engine's
    backend choice were measured on both kinds of processor)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _probe() -> bool:
    """Whether the float32 GEMMs go to oneDNN here: where it runs and the processor has AVX-512.

    Without AVX-512 both libraries run AVX2 code, and BLAS reads transposed operands in place where
    oneDNN copies them first (measured 2026-12-02 on an AMD EPYC Zen 3: the LSTM weight gradient's
    transposed 2.2 MB operand took 2 ms to copy before a 5 ms product).
    """
    return avx512() and _onednn_runs()


_ONEDNN = _probe()


def onednn_available() -> bool:
    """Whether the fused backend's float32 GEMMs run on oneDNN."""
    return _ONEDNN


# oneDNN's inner product copies a transposed left operand into a contiguous one first. For the
# weight gradients of a whole sequence (a = dG^T over T*N rows) that copy is a cache-unfriendly
# transpose of tens of MB, slower than BLAS, which reads transposes in place.
_STRIDED_COPY_LIMIT = 1 << 20  # elements


def _dense(t: Tensor) -> bool:
    """Contiguous, or the transpose of a contiguous matrix."""
    return t.is_contiguous() or t.t().is_contiguous()


def _use_onednn(a: Tensor, w: Tensor) -> bool:
    # Other strides (a column slice of a wider tensor, say) send oneDNN down a generic path that
    # was measured at 16 ms for a (200 x 128) @ (128 x 15) product BLAS does in 0.05 ms.
    return (_ONEDNN and a.dtype == torch.float32 and w.dtype == torch.float32 and a.device.type == "cpu"
            and a.numel() > 0 and w.numel() > 0
            and _dense(w) and (a.is_contiguous() or (a.numel() <= _STRIDED_COPY_LIMIT and _dense(a))))


def linear(a: Tensor, w: Tensor, out: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``a @ w.T (+ bias)``, written into ``out`` when given."""
    if _use_onednn(a, w):
        r = torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")
        return r if out is None else out.copy_(r)
    if bias is not None:
        return torch.addmm(bias, a, w.t(), out=out) if out is not None else torch.addmm(bias, a, w.t())
    return torch.mm(a, w.t(), out=out) if out is not None else torch.mm(a, w.t())


def linear_add(c: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """``c + a @ w.T`` as a new tensor (oneDNN has no in-place form: this saves ``linear_add_``'s copy)."""
    if _use_onednn(a, w):
        return torch.ops.mkldnn._linear_pointwise.binary(a, c, w, None, "add")
    return torch.addmm(c, a, w.t())


def linear_add_(c: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """``c += a @ w.T`` in place; returns ``c``."""
    if _use_onednn(a, w):
        return c.copy_(linear_add(c, a, w))
    return c.addmm_(a, w.t())


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` like ``torch.mm`` (a transposed ``b`` costs nothing: oneDNN takes strides)."""
    return linear(a, b.t(), out)


def addmm_(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c += a @ b`` in place like ``Tensor.addmm_``; returns ``c``."""
    return linear_add_(c, a, b.t())

