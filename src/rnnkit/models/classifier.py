"""Sequence classification: an RNN over a sequence, a readout that pools it, a linear head.

Pipeline (every stage optional but the RNN)::

    x (N, T, I) ──[frontend="cnn": image (N, H, W) -> columns (N, W', C*H')]
                ──[input_projection: Linear + tanh/relu to P features]
                ──rnnkit.LSTM/GRU/RNN (batch_first, lengths)──> outputs (N, T, D*H)
                ──readout──> features (N, F) ──dropout──Linear──> logits (N, num_classes)

Readouts (each sequence uses only its own valid steps when ``lengths`` is given):

==========  ==================================================================================
last        output at the sequence's last valid step; bidirectional: the forward half there and
            the reverse half at step 0 (the reverse direction's final state, i.e. the last
            layer's ``h_n``), concatenated: F = D*H
last_k      the k outputs ending at the sequence's last step, oldest first, concatenated; zeros
            stand in for steps before the start when a sequence is shorter than k: F = k*D*H
mean        mean of the outputs over the valid steps: F = D*H
attention   softmax-weighted sum of the outputs, weights from a learned score
            ``v . tanh(W o_t)`` with padding masked out before the softmax: F = D*H
==========  ==================================================================================

The building blocks (:func:`make_rnn`, :class:`Readout`, :class:`ConvFrontend`,
:class:`InputProjection`) are public so the regressor and user models can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.errors import ConfigError, ShapeError
from rnnkit.init import chrono_init_, keras_init_
from rnnkit.layers import GRU, LSTM, RNN

__all__ = [
    "SequenceClassifier",
    "Readout",
    "ConvFrontend",
    "InputProjection",
    "make_rnn",
    "rnn_output_size",
    "lengths_tensor",
    "sequence_mask",
    "READOUTS",
    "CELLS",
]

CellSpec = str | type[nn.Module] | Callable[[int, int], nn.Module]
ReadoutKind = Literal["last", "last_k", "mean", "attention"]
READOUTS: tuple[str, ...] = ("last", "last_k", "mean", "attention")
#: cell names accepted wherever a model takes ``cell=``
CELLS: dict[str, type[nn.Module]] = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}


# --------------------------------------------------------------------------------------------------
# shared building blocks


def lengths_tensor(lengths: Tensor | list[int] | None, N: int, T: int, device: torch.device) -> Tensor:
    """``lengths`` as a long tensor (N,) on ``device``, checked to lie in [1, T]; all T when None."""
    if lengths is None:
        return torch.full((N,), T, dtype=torch.long, device=device)
    t = torch.as_tensor(lengths)
    if t.dim() != 1 or t.shape[0] != N or t.is_floating_point() or t.dtype == torch.bool:
        raise ShapeError(
            f"lengths must be integers of shape ({N},), one per sequence, got {tuple(t.shape)} {t.dtype}; "
            f"pass e.g. torch.tensor([len(s) for s in batch])"
        )
    if N and (int(t.min()) < 1 or int(t.max()) > T):
        raise ShapeError(f"lengths must be in [1, T={T}], got values from {int(t.min())} to {int(t.max())}")
    return t.to(device=device, dtype=torch.long)


def sequence_mask(lengths: Tensor, T: int) -> Tensor:
    """(N, T) bool: True where step t lies inside sequence n."""
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def zero_padding(x: Tensor, lengths: Tensor | list[int] | None) -> Tensor:
    """``x`` (N, T, ...) with the steps past each length zeroed: a layer applied before the recurrent
    one (an input projection) would turn NaN or -inf padding into NaN gradients (0 * NaN)."""
    if lengths is None:
        return x
    N, T = x.shape[0], x.shape[1]
    mask = sequence_mask(lengths_tensor(lengths, N, T, x.device), T)
    return x.masked_fill(~mask.view(N, T, *([1] * (x.dim() - 2))), 0)


def make_rnn(
    cell: CellSpec,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    forget_bias: float = 0.0,
    backend: str = "auto",
) -> nn.Module:
    """A batch-first rnnkit layer for ``cell``: "lstm", "gru", "rnn", or a cell class/factory ``f(I, H)``."""
    # the layers apply dropout between layers only; passing it to a single layer would just warn
    common: dict[str, Any] = {
        "num_layers": num_layers,
        "batch_first": True,
        "dropout": dropout if num_layers > 1 else 0.0,
        "bidirectional": bidirectional,
        "backend": backend,
    }
    if isinstance(cell, str):
        kind = cell.lower()
        if kind not in CELLS:
            raise ConfigError(f"cell={cell!r} is not known; use one of {sorted(CELLS)} or pass a cell class/factory")
        if forget_bias and kind != "lstm":
            raise ConfigError(f"forget_bias={forget_bias} applies to LSTM cells only, got cell={cell!r}; drop it")
        if kind == "lstm":
            return LSTM(input_size, hidden_size, forget_bias=forget_bias, **common)
        return (GRU if kind == "gru" else RNN)(input_size, hidden_size, **common)
    if not callable(cell):
        raise ConfigError(f"cell= must be 'lstm', 'gru', 'rnn' or a cell class/factory, got {cell!r}")
    if forget_bias:
        raise ConfigError("forget_bias applies to the built-in cells; pass it to your own cell's constructor instead")
    # any layer class runs a custom cell; RNN is the neutral name for "some recurrent cell"
    return RNN(input_size, hidden_size, cell=cell, **common)


def rnn_output_size(rnn: nn.Module, input_size: int) -> int:
    """Feature width of a batch-first layer's output (D*H for built-in cells), measured on one zero step."""
    p = next(rnn.parameters())
    was = rnn.training
    rnn.eval()  # no dropout: the probe must not consume random numbers
    try:
        with torch.no_grad():
            out = rnn(torch.zeros(1, 1, input_size, device=p.device, dtype=p.dtype))
    finally:
        rnn.train(was)
    out = out[0] if isinstance(out, tuple) else out
    return int(out.shape[-1])


class InputProjection(nn.Module):
    """``act(Linear(x))`` applied to every step: (N, T, I) -> (N, T, P); act is "tanh" or "relu"."""

    def __init__(self, input_size: int, size: int, activation: Literal["tanh", "relu"] = "tanh") -> None:
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise ConfigError(f"projection activation must be 'tanh' or 'relu', got {activation!r}")
        self.linear = nn.Linear(input_size, size)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        """Project every step of ``x``."""
        y = self.linear(x)
        return torch.tanh(y) if self.activation == "tanh" else torch.relu(y)


class ConvFrontend(nn.Module):
    """A small CNN turning images (N, H, W) or (N, C, H, W) into column sequences (N, W', C'*H').

    Each block is 3x3 conv (padding 1) + ReLU + 2x2 max-pool, so H' = H // 2**blocks and likewise W';
    the RNN then reads the feature map left to right, one column per step.
    """

    def __init__(self, height: int, in_channels: int = 1, channels: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        if height < 2 ** len(channels):
            raise ConfigError(
                f"ConvFrontend: images of height {height} are too small for {len(channels)} pooling blocks; "
                f"use fewer channels entries or larger images"
            )
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.net = nn.Sequential(*blocks)
        self.height, self.in_channels = height, in_channels
        self.output_size = c_in * (height // 2 ** len(channels))

    def forward(self, images: Tensor) -> Tensor:
        """(N, H, W) or (N, C, H, W) images to (N, W', C'*H') sequences of feature columns."""
        if images.dim() == 3 and self.in_channels == 1:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != self.in_channels or images.shape[2] != self.height:
            alt = f" or (N, {self.height}, W)" if self.in_channels == 1 else ""
            raise ShapeError(
                f"ConvFrontend: expected images (N, {self.in_channels}, {self.height}, W){alt}, "
                f"got {tuple(images.shape)}; input_size must be the image height when frontend='cnn'"
            )
        fmap = self.net(images)
        N, C, H, W = fmap.shape
        # columns become time steps: (N, C, H, W) -> (N, W, C, H) -> (N, W, C*H)
        return fmap.permute(0, 3, 1, 2).reshape(N, W, C * H)


class Readout(nn.Module):
    """Pools RNN outputs (N, T, D*H) over valid steps into one vector per sequence (see module doc)."""

    def __init__(self, kind: ReadoutKind, features: int, *, directions: int = 1, k: int = 3) -> None:
        super().__init__()
        if kind not in READOUTS:
            raise ConfigError(f"readout={kind!r} is not known; use one of {READOUTS}")
        if kind == "last_k" and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"readout='last_k' needs k >= 1, got k={k!r}")
        if features % directions:
            raise ConfigError(f"Readout: {features} features do not split into {directions} directions")
        self.kind, self.features, self.directions, self.k = kind, features, directions, k
        if kind == "attention":
            self.score = nn.Sequential(nn.Linear(features, features), nn.Tanh(), nn.Linear(features, 1, bias=False))
        self.output_size = features * (k if kind == "last_k" else 1)

    def forward(self, outputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Pool ``outputs`` (N, T, F) with ``lengths`` (N,) (all T when None) to (N, output_size)."""
        N, T, Fe = outputs.shape
        if lengths is None and (self.kind in ("last", "mean") or (self.kind == "last_k" and T >= self.k)):
            return self._full_length(outputs)  # every sequence T long: views, no gathers to differentiate
        lengths = lengths_tensor(lengths, N, T, outputs.device)
        rows = torch.arange(N, device=outputs.device)
        if self.kind == "last":
            last = outputs[rows, lengths - 1]
            if self.directions == 1:
                return last
            half = Fe // 2
            # the reverse direction has read the whole sequence when it reaches step 0
            return torch.cat([last[:, :half], outputs[:, 0, half:]], dim=-1)
        if self.kind == "last_k":
            steps = lengths.unsqueeze(1) - self.k + torch.arange(self.k, device=outputs.device)  # (N, k)
            picked = outputs[rows.unsqueeze(1), steps.clamp(min=0)]  # (N, k, F)
            picked = picked * (steps >= 0).unsqueeze(-1).to(picked.dtype)
            return picked.reshape(N, self.k * Fe)  # (N, k, F) -> (N, k*F), oldest step first
        mask = sequence_mask(lengths, T)  # (N, T)
        if self.kind == "mean":
            total = (outputs * mask.unsqueeze(-1).to(outputs.dtype)).sum(1)
            return total / lengths.unsqueeze(1).to(outputs.dtype)
        return torch.bmm(self.weights(outputs, lengths).unsqueeze(1), outputs).squeeze(1)

    def _full_length(self, outputs: Tensor) -> Tensor:
        """The pooling of "last", "last_k" (T >= k) and "mean" when every sequence is T steps long."""
        N, T, Fe = outputs.shape
        if self.kind == "last":
            if self.directions == 1:
                return outputs[:, -1]
            half = Fe // 2
            return torch.cat([outputs[:, -1, :half], outputs[:, 0, half:]], dim=-1)
        if self.kind == "mean":
            return outputs.mean(1)
        return outputs[:, T - self.k :].reshape(N, self.k * Fe)

    def weights(self, outputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Attention readout only: the pooling weights (N, T), summing to 1 over valid steps, 0 on padding."""
        if self.kind != "attention":
            raise ConfigError(f"Readout.weights exists for readout='attention' only, this one is {self.kind!r}")
        N, T, _ = outputs.shape
        mask = sequence_mask(lengths_tensor(lengths, N, T, outputs.device), T)
        scores = self.score(outputs).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=1)


# --------------------------------------------------------------------------------------------------
# the classifier


class SequenceClassifier(nn.Module):
    """Many-to-one classifier: (frontend) -> (projection) -> RNN -> readout -> dropout -> Linear."""

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        *,
        hidden_size: int = 128,
        num_layers: int = 1,
        cell: CellSpec = "lstm",
        bidirectional: bool = False,
        readout: ReadoutKind = "last",
        k: int = 3,
        input_projection: int | None = None,
        projection_activation: Literal["tanh", "relu"] = "tanh",
        frontend: Literal["cnn"] | None = None,
        image_channels: int = 1,
        dropout: float = 0.0,
        forget_bias: float = 0.0,
        init: Literal["torch", "keras", "chrono"] = "torch",
        chrono_t_max: int | None = None,
        head_init: Literal["default", "normal"] = "default",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for label, value in (("input_size", input_size), ("num_classes", num_classes), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"SequenceClassifier: {label} must be a positive int, got {value!r}")
        if frontend not in (None, "cnn"):
            raise ConfigError(f"SequenceClassifier: frontend must be None or 'cnn', got {frontend!r}")
        if init not in ("torch", "keras", "chrono"):
            raise ConfigError(f"SequenceClassifier: init must be 'torch', 'keras' or 'chrono', got {init!r}")
        if init == "chrono" and chrono_t_max is None:
            raise ConfigError("SequenceClassifier: init='chrono' needs chrono_t_max (the sequence length, e.g. 784)")
        if head_init not in ("default", "normal"):
            raise ConfigError(f"SequenceClassifier: head_init must be 'default' or 'normal', got {head_init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"SequenceClassifier: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.num_classes = input_size, num_classes
        size = input_size
        self.frontend: ConvFrontend | None = None
        if frontend == "cnn":
            # with a CNN front end input_size is the image height; the RNN sees C'*H' features per column
            self.frontend = ConvFrontend(input_size, image_channels)
            size = self.frontend.output_size
        self.projection: InputProjection | None = None
        if input_projection is not None:
            self.projection = InputProjection(size, input_projection, projection_activation)
            size = input_projection
        self.rnn = make_rnn(
            cell, size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
            dropout=dropout, forget_bias=forget_bias, backend=backend,
        )
        directions = 2 if bidirectional else 1
        width = rnn_output_size(self.rnn, size)
        self.readout = Readout(readout, width, directions=directions, k=k)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(self.readout.output_size, num_classes)
        if init in ("keras", "chrono"):
            keras_init_(self, linear=True)
        if init == "chrono":  # Keras' weights, gate biases for memories up to chrono_t_max steps
            chrono_init_(self, chrono_t_max)
        if head_init == "normal":
            # the TF1 tutorials' readout, tf.random_normal weights and bias: large initial logits
            # give the recurrent weights strong gradients early (seed 002: +1.1 points at 800 steps)
            with torch.no_grad():
                nn.init.normal_(self.head.weight)
                nn.init.normal_(self.head.bias)

    def features(self, x: Tensor, lengths: Tensor | list[int] | None = None) -> Tensor:
        """The pooled representation (N, F) that the head classifies."""
        if self.frontend is not None:
            if lengths is not None:
                raise ShapeError(
                    "SequenceClassifier: lengths are not supported with frontend='cnn' (images have one width); "
                    "pad the images instead and pass lengths=None"
                )
            x = self.frontend(x)
        elif x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ShapeError(
                f"SequenceClassifier: expected x of shape (N, T, {self.input_size}), got {tuple(x.shape)}; "
                f"for one feature per step use x.unsqueeze(-1)"
            )
        if self.projection is not None:
            x = self.projection(zero_padding(x, lengths))
        outputs = self.rnn(x, lengths=lengths)[0]
        return self.readout(outputs, lengths)

    def forward(self, x: Tensor, lengths: Tensor | list[int] | None = None) -> Tensor:
        """Logits (N, num_classes) for sequences ``x`` (N, T, I) (or images with the CNN front end)."""
        return self.head(self.dropout(self.features(x, lengths)))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of ``logits`` (N, C) against class indices ``targets`` (N,)."""
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def predict(self, x: Tensor, lengths: Tensor | list[int] | None = None) -> Tensor:
        """Predicted class indices (N,)."""
        return self(x, lengths).argmax(-1)
