"""rnnkit: recurrent neural networks on PyTorch.

Drop-in ``LSTM``/``GRU``/``RNN`` layers that also return every step's states, cells you write
in a few lines, one unroll engine with fast backends, and an end-to-end trainer and CLI.
"""

import torch

from rnnkit.allocator import tune_allocator, tuned_allocator
from rnnkit.cells import Cell, GRUCell, LayerNormLSTMCell, LSTMCell, LSTMState, RNNCell
from rnnkit.engine import UnrollResult, unroll
from rnnkit.errors import CheckpointError, ConfigError, DataError, RnnkitError, RnnkitWarning, ShapeError
from rnnkit.fpmode import set_flush_denormals
from rnnkit.layers import GRU, LSTM, RNN, LayerResult

__version__ = "0.1.0"

# torch.nn's layers return plain tuples, which torch.load's default (weights_only) reads back; these
# named tuples of tensors carry nothing else, so a saved hidden state or result loads the same way
# wherever rnnkit is imported
torch.serialization.add_safe_globals([LSTMState, UnrollResult, LayerResult])

__all__ = [
    "Cell",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "LayerNormLSTMCell",
    "LSTMState",
    "LSTM",
    "GRU",
    "RNN",
    "LayerResult",
    "unroll",
    "UnrollResult",
    "set_flush_denormals",
    "tune_allocator",
    "tuned_allocator",
    "RnnkitError",
    "ShapeError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "RnnkitWarning",
]
