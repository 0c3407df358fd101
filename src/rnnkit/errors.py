"""Error and warning types raised at rnnkit's boundaries.

Every error names what was expected, what came, and how to fix it. Shape and type errors
subclass ``ValueError``, ``RuntimeError`` and ``TypeError`` so code written for ``torch.nn``
(which raises any of them, depending on the mistake: TypeError for a size that is not an int)
still catches them.
"""

from __future__ import annotations


class RnnkitError(Exception):
    """Base class of rnnkit's own errors."""


class ShapeError(RnnkitError, ValueError, RuntimeError, TypeError):
    """A tensor has the wrong rank, size, dtype or device for the call it was passed to."""


class ConfigError(RnnkitError, ValueError):
    """A configuration value, option or recipe name is invalid."""


class DataError(RnnkitError, ValueError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


class CheckpointError(RnnkitError, ValueError):
    """A checkpoint is foreign, corrupt, unsafe (pickle) or does not match the model.

    ``brief``, where set, states the problem in one line without the library-level fix (build the
    model differently, pass ``strict=False``), so the command line can put its own fix beside it.
    """

    def __init__(self, message: str, *, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief


class RnnkitWarning(UserWarning):
    """Warnings emitted by rnnkit itself (turned into errors in its own test suite)."""
