"""The losses the trainer offers by name; sequence losses never count padding.

* :func:`cross_entropy`: class indices (N,) or one-hot / soft labels (N, C).
* :func:`sigmoid_cross_entropy`: independent binary labels (multi-label), from logits.
* :func:`masked_cross_entropy` and :func:`masked_mse`: per-step losses over (N, T, ...) with
  lengths, an ignored id and per-step weights (defined with the sequence models).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rnnkit.errors import ShapeError
from rnnkit.models.regressor import masked_cross_entropy, masked_mse

__all__ = ["cross_entropy", "sigmoid_cross_entropy", "masked_cross_entropy", "masked_mse"]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy with class indices (N,) or one-hot / soft labels (N, C)."""
    return F.cross_entropy(logits, targets)


def sigmoid_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of independent labels in [0, 1], computed stably from logits."""
    if logits.shape != targets.shape:
        raise ShapeError(f"sigmoid_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must have the same shape")
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
