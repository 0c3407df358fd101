"""Many-to-many models: an RNN with a linear head on every step (regression or sequence tagging).

``forward(x, state, lengths)`` takes and returns the recurrent state, so a long stream can be cut
into windows for truncated backpropagation through time::

    state = None
    for x_win, y_win in windows:
        y, state = model(x_win, state)
        loss = model.loss(y, y_win)
        ...
        state = detach_state(state)   # keep the values, cut the graph at the window boundary

The state has the layer's stacked layout, ``(D*L, N, H)`` per tensor (``LSTMState(h, c)`` for an
LSTM). Padding never counts in the losses: :func:`masked_mse` and :func:`masked_cross_entropy`
average over valid steps only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.engine import tree_map
from rnnkit.errors import ConfigError, ShapeError
from rnnkit.init import keras_init_
from rnnkit.models.classifier import (
    CellSpec,
    InputProjection,
    lengths_tensor,
    make_rnn,
    rnn_output_size,
    sequence_mask,
    zero_padding,
)

__all__ = ["SequenceRegressor", "masked_mse", "masked_cross_entropy", "detach_state"]


def detach_state(state: Any) -> Any:
    """The state with every tensor detached from the graph (for truncated backprop); None stays None."""
    return None if state is None else tree_map(lambda t: t.detach(), state)


def _check_pair(name: str, y: Tensor, target: Tensor) -> None:
    if y.shape != target.shape:
        raise ShapeError(f"{name}: predictions {tuple(y.shape)} and targets {tuple(target.shape)} must match")
    if y.dim() < 2:
        raise ShapeError(f"{name}: expected (N, T, ...) tensors, got {tuple(y.shape)}; add a time axis")


def masked_mse(y: Tensor, target: Tensor, lengths: Tensor | list[int] | None = None) -> Tensor:
    """Mean squared error over the valid steps of (N, T, ...) tensors; padding never counts."""
    _check_pair("masked_mse", y, target)
    if lengths is None:
        return F.mse_loss(y, target)
    N, T = y.shape[:2]
    mask = sequence_mask(lengths_tensor(lengths, N, T, y.device), T)  # (N, T)
    sq = (y - target).pow(2).reshape(N, T, -1)  # (N, T, F): features flattened
    per_step = sq.sum(-1) * mask.to(sq.dtype)
    return per_step.sum() / (mask.sum() * sq.shape[-1]).to(sq.dtype)


def masked_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    lengths: Tensor | list[int] | None = None,
    *,
    ignore_index: int | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, T, C) against ``targets`` (N, T) over valid tokens only.

    A token is valid when it lies within its sequence's length (if ``lengths`` is given) and is not
    ``ignore_index`` (if given, e.g. the PAD id). ``weights`` (N, T) weigh the valid tokens: the
    loss is then ``sum(w * ce) / sum(w)`` over valid tokens (TensorFlow's ``sequence_loss``).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ShapeError(
            f"masked_cross_entropy: expected logits (N, T, C) and targets (N, T), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    N, T, C = logits.shape
    valid = torch.ones(N, T, dtype=torch.bool, device=logits.device)
    if lengths is not None:
        valid &= sequence_mask(lengths_tensor(lengths, N, T, logits.device), T)
    if ignore_index is not None:
        valid &= targets != ignore_index
    # -100 is cross_entropy's own "skip this token"; it also keeps padded garbage ids out of range checks
    safe = torch.where(valid, targets, torch.full_like(targets, -100))
    # (N, T, C) -> (N*T, C) and (N, T) -> (N*T,): one token per row
    if weights is None:
        return F.cross_entropy(logits.reshape(N * T, C), safe.reshape(N * T), ignore_index=-100)
    if weights.shape != targets.shape:
        raise ShapeError(
            f"masked_cross_entropy: weights must be (N, T) = {tuple(targets.shape)}, got {tuple(weights.shape)}"
        )
    ce = F.cross_entropy(logits.reshape(N * T, C), safe.reshape(N * T), ignore_index=-100, reduction="none")
    w = weights.reshape(N * T).to(ce.dtype) * valid.reshape(N * T)
    return (ce * w).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


class SequenceRegressor(nn.Module):
    """Many-to-many RNN: a Linear head on every step's output; carries its state across calls."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        hidden_size: int = 64,
        num_layers: int = 1,
        cell: CellSpec = "lstm",
        bidirectional: bool = False,
        input_projection: int | None = None,
        projection_activation: Literal["tanh", "relu"] = "tanh",
        dropout: float = 0.0,
        forget_bias: float = 0.0,
        task: Literal["regression", "tagging"] = "regression",
        init: Literal["torch", "keras"] = "torch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for label, value in (("input_size", input_size), ("output_size", output_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"SequenceRegressor: {label} must be a positive int, got {value!r}")
        if task not in ("regression", "tagging"):
            raise ConfigError(f"SequenceRegressor: task must be 'regression' or 'tagging', got {task!r}")
        if init not in ("torch", "keras"):
            raise ConfigError(f"SequenceRegressor: init must be 'torch' or 'keras', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"SequenceRegressor: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.output_size, self.task = input_size, output_size, task
        size = input_size
        self.projection: InputProjection | None = None
        if input_projection is not None:
            self.projection = InputProjection(input_size, input_projection, projection_activation)
            size = input_projection
        self.rnn = make_rnn(
            cell, size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
            dropout=dropout, forget_bias=forget_bias, backend=backend,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(rnn_output_size(self.rnn, size), output_size)
        if init == "keras":
            keras_init_(self, linear=True)

    def forward(
        self, x: Tensor, state: Any = None, lengths: Tensor | list[int] | None = None
    ) -> tuple[Tensor, Any]:
        """``x`` (N, T, I) and an optional state to ``(y (N, T, output_size), final_state)``.

        ``y`` is zero past each sequence's end; the final state is each sequence's state at its
        own last valid step.
        """
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ShapeError(
                f"SequenceRegressor: expected x of shape (N, T, {self.input_size}), got {tuple(x.shape)}; "
                f"for one feature per step use x.unsqueeze(-1)"
            )
        if self.projection is not None:
            x = self.projection(zero_padding(x, lengths))
        outputs, final = self.rnn(x, state, lengths=lengths)
        y = self.head(self.dropout(outputs))
        if lengths is not None:
            N, T = y.shape[:2]
            # the head's bias would otherwise leak into the padded steps
            y = y * sequence_mask(lengths_tensor(lengths, N, T, y.device), T).unsqueeze(-1).to(y.dtype)
        return y, final

    def loss(self, y: Tensor, target: Tensor, lengths: Tensor | list[int] | None = None) -> Tensor:
        """Masked MSE (regression) or masked cross-entropy over tag ids (N, T) (tagging)."""
        if self.task == "tagging":
            return masked_cross_entropy(y, target, lengths)
        return masked_mse(y, target, lengths)
