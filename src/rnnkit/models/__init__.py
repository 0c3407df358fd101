"""Ready-made models: sequence classifiers, many-to-many regressors/taggers and seq2seq with attention.

Every model runs its recurrences through rnnkit's layers or :func:`rnnkit.unroll`; none writes
its own time loop over an RNN (the seq2seq decoder is a cell, stepped by hand only to decode).
"""

from rnnkit.init import keras_init_
from rnnkit.models.classifier import (
    ConvFrontend,
    InputProjection,
    Readout,
    SequenceClassifier,
    lengths_tensor,
    make_rnn,
    rnn_output_size,
    sequence_mask,
)
from rnnkit.models.regressor import SequenceRegressor, detach_state, masked_cross_entropy, masked_mse
from rnnkit.models.seq2seq import (
    AttentionDecoderCell,
    BahdanauAttention,
    BoundDecoder,
    DecoderState,
    Encoded,
    LuongAttention,
    Memory,
    Seq2Seq,
    exact_match,
)

__all__ = [
    "SequenceClassifier",
    "SequenceRegressor",
    "Seq2Seq",
    "AttentionDecoderCell",
    "BoundDecoder",
    "DecoderState",
    "Memory",
    "Encoded",
    "BahdanauAttention",
    "LuongAttention",
    "Readout",
    "ConvFrontend",
    "InputProjection",
    "make_rnn",
    "rnn_output_size",
    "lengths_tensor",
    "sequence_mask",
    "masked_mse",
    "masked_cross_entropy",
    "detach_state",
    "exact_match",
    "keras_init_",
]
