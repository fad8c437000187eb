"""Query kinds and channel names: what every layer of the fused model agrees on (no run, no model)."""
from __future__ import annotations

import numpy as np

PROMPT, IMAGE = "prompt", "image"


def query_kind(prompt: str) -> str:
    return PROMPT if prompt.strip() else IMAGE


RAW_SCALE_PREFIXES = ("dup/",)  # channels used on their own scale


def feature(name: str, values: np.ndarray) -> np.ndarray:
    """A channel as the model uses it: standardised per query, except the ratio-test channels."""
    if name.startswith(RAW_SCALE_PREFIXES):
        v = np.asarray(values, np.float32)
        return np.where(np.isfinite(v), v, 0.0).astype(np.float32)
    return standardise(values)


def standardise(values: np.ndarray) -> np.ndarray:
    """Per query (row), z-score across training images; constant or non-finite rows -> 0."""
    v = np.asarray(values, np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    mean = np.nanmean(v, axis=-1, keepdims=True) if v.shape[-1] else v
    std = np.nanstd(v, axis=-1, keepdims=True) if v.shape[-1] else v
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (v - mean) / std
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


FAMILIES = ("rep", "grad", "pixel", "dyn", "text", "steps", "class")
TRAJECTORY_FAMILIES = ("dyn", "steps")  # no final-checkpoint version: left out of montrage-final
# channels whose value is the same at every checkpoint (the query's pixels or prompt against the training set's):
# left out under the ``checkpoint_channels_only`` option, which `montrage compare` sets to ask what each checkpoint's
# model learned rather than what its generations already look like
CHECKPOINT_FREE_FAMILIES = ("pixel", "text", "class")
CHECKPOINT_ONLY_OPTION = "checkpoint_channels_only"


def family(channel: str) -> str:
    """The family that computes a channel (``dup/pixel`` comes with ``pixel``)."""
    head = channel.split("/")[0]
    return "pixel" if head == "dup" else head
