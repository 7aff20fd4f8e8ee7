"""The engine's error hierarchy: one base class, one subclass per kind of unusable input.

Every error the engine raises about its *inputs* (hyperparameters, dataset folders, image files,
weights files, checkpoints, exports) derives from ``EngineError``, so a task can catch it and show
the message to the user, and treat anything else as a bug. Messages name the file or field and say
what a valid value looks like.

This module imports nothing beyond the standard library: the web process can use it to validate
task hyperparameters without loading torch.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EngineError",
    "ExportError",
    "ImageError",
    "WeightsError",
]


class EngineError(Exception):
    """Base class: an input the engine cannot use. The message is meant for the user."""


class ConfigError(EngineError, ValueError):
    """A hyperparameter has a value the engine cannot train with."""


class DatasetError(EngineError, ValueError):
    """A dataset folder or labels.csv that cannot be turned into a labelled dataset."""


class ImageError(EngineError, ValueError):
    """An image that cannot be used: corrupt, truncated, too large or in a format we refuse."""


class WeightsError(EngineError, ValueError):
    """A weights file cannot be used for the requested architecture."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint cannot be read or does not belong to this run."""


class ExportError(EngineError, RuntimeError):
    """An export could not be written, read back, or does not match the trained model."""
