"""Typed errors raised by montrage library code.

Every error names the problem and the fix, so callers (and the CLI) can print it as is.
"""
from __future__ import annotations


class MontrageError(Exception):
    """Base class of every error montrage raises for caller mistakes or bad input."""


class ConfigError(MontrageError, ValueError):
    """A configuration value is out of range or inconsistent."""


class DataError(MontrageError):
    """The training-data folder, its metadata or an image in it is unusable."""


class ProbeFileError(DataError):
    """A probe file (jsonl of prompt/seed) is malformed."""


class ModelLoadError(MontrageError):
    """A base model folder is missing a component or cannot be loaded."""


class CaptureError(MontrageError):
    """Capture cannot be set up, e.g. a configured module name does not exist in the UNet."""


class StoreError(MontrageError):
    """The run store cannot be opened, written or read as asked."""


class StoreConfigMismatchError(StoreError):
    """An existing store was written with another config; resuming into it would mix runs."""


class StoreLayoutError(StoreError):
    """An existing store has a layout version this montrage cannot read or append to."""


class StoreLockedError(StoreError):
    """Another process is writing this store."""


class TrainingImagesChangedError(StoreError, DataError):
    """A run recorded without pixels (store_images=False) whose source images are gone or changed."""


class CheckpointNotFoundError(StoreError, KeyError):
    """A requested checkpoint step is not among the committed checkpoints."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ScorerError(MontrageError):
    """An attribution method is unknown or cannot run on this store."""
