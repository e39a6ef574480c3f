"""Errors raised by edgetrain.

Every error a user can cause (bad config, bad data file, unknown layer, infeasible budget, corrupt
checkpoint, diverged loss) is an :class:`EdgetrainError` with a one-line message that names the
offending thing and what is wrong with it. The CLI prints ``edgetrain: error: <message>`` and exits 2
for these, without a traceback.
"""

from __future__ import annotations


class EdgetrainError(Exception):
    """Base class of all user-facing edgetrain errors."""


class ConfigError(EdgetrainError, ValueError):
    """A technique config, recipe, target or option is invalid."""


class DataError(EdgetrainError, ValueError):
    """A data file or directory is missing, truncated or malformed."""


class WeightsError(EdgetrainError, FileNotFoundError):
    """Pretrained weights are absent or do not match the model."""


class CheckpointError(EdgetrainError, ValueError):
    """A checkpoint is missing, corrupt or incompatible."""


class BudgetError(EdgetrainError, ValueError):
    """A memory budget is malformed or cannot be met."""


class TrainingDiverged(EdgetrainError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
