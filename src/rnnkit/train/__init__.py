"""Training: the trainer, callbacks, optimisation toolbox, checkpoints and batching."""

from rnnkit.train.batching import Batches
from rnnkit.train.trainer import Callback, NonFiniteError, Trainer

__all__ = ["Trainer", "Callback", "NonFiniteError", "Batches"]
