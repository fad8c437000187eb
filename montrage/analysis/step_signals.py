"""The per-step signals of a run as a per-training-image channel: what the loop saw, at no extra forward pass.

The monitor stores, for every optimizer step, each batch item's training image index, the diffusion timestep
drawn for it and its per-sample training loss (``signals/*``, dimension ``sample``). Grouped by training image
and checkpoint interval they give each image's *observed* loss trajectory under the real training noise: how
fast each image was learned, which the representation channels (fixed noise, fixed timesteps) do not see.
It is a property of a training image, not of a (query, image) pair, so scorers use it as a per-column feature
(a prior or a weight), e.g. in a fused attribution model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from montrage.storage import RunStore
from montrage.storage import schema as S


@dataclass
class LossTrajectory:
    """Mean observed training loss per (checkpoint interval, training image); NaN where an image was not drawn."""

    intervals: np.ndarray  # (K, 2) int64: (after step, up to step) of each interval between checkpoints
    loss: np.ndarray  # (K, n_train) float32
    count: np.ndarray  # (K, n_train) int64: draws of each image in each interval

    def learned(self) -> np.ndarray:
        """(n_train,) first observed mean loss minus the last one: how much of each image the LoRA learned."""
        first = _first_finite(self.loss)
        last = _first_finite(self.loss[::-1])
        return (first - last).astype(np.float32)


def _first_finite(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:  # no interval yet (the first checkpoint): nothing observed
        return np.full(x.shape[1:], np.nan, np.float32)
    ok = np.isfinite(x)
    idx = np.where(ok.any(0), ok.argmax(0), 0)
    out = x[idx, np.arange(x.shape[1])]
    return np.where(ok.any(0), out, np.nan)


def loss_trajectory(store: RunStore, upto: Optional[int] = None,
                    timestep_range: Optional[Sequence[int]] = None) -> LossTrajectory:
    """Each training image's mean per-sample loss between consecutive committed checkpoints (0..``upto``),
    optionally only over draws with timestep in ``[lo, hi)``."""
    sig = store.step_signals()
    steps = store.steps[: None if upto is None else upto + 1]
    n = len(store.train_meta.get(S.ATTR_FILE_NAMES, []))
    k = max(len(steps) - 1, 0)
    total = np.zeros((k, n), np.float64)
    count = np.zeros((k, n), np.int64)
    idx, st, t, loss = (sig[S.SIGNAL_INDEX], sig[S.SIGNAL_STEP], sig[S.SIGNAL_TIMESTEP], sig[S.SIGNAL_LOSS])
    keep = (idx >= 0) & (idx < n) & np.isfinite(loss)
    if timestep_range is not None:
        keep &= (t >= timestep_range[0]) & (t < timestep_range[1])
    if k and keep.any():
        interval = np.searchsorted(steps, st, side="left") - 1  # step s belongs to (steps[j], steps[j + 1]]
        keep &= (interval >= 0) & (interval < k)
        np.add.at(total, (interval[keep], idx[keep]), loss[keep])
        np.add.at(count, (interval[keep], idx[keep]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    intervals = np.stack([steps[:-1], steps[1:]], 1) if k else np.zeros((0, 2), np.int64)
    return LossTrajectory(intervals=intervals.astype(np.int64), loss=mean, count=count)
