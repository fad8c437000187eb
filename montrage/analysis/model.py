"""The learned attribution model: a convex combination of dynamics channels, plus a calibration.

score_raw(q, i) = sum_c softmax(theta)_c * channel_c(q, i)   (each channel a shifted cosine in [0, 1])
score(q, i)     = sigmoid(a * (score_raw - b))                (calibrated to the soft ground truth)

Supervision comes from the run itself, with no extra labels: the store's *anchors* are training images
recorded again under a second noise draw. Pair (anchor of i, i) -> 1, same concept -> 0.5, else 0.
Without concept labels only identity supervises. The loss is :func:`montrage.losses.attribution.attribution_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import torch

from montrage.analysis.trajectories import Dynamics, QueryTrajectory
from montrage.losses.attribution import attribution_loss

SAME_CONCEPT_TARGET = 0.5
MAX_FIT_COLUMNS = 4096


@dataclass
class AttributionModel:
    weights: np.ndarray  # (n_channels,), convex
    scale: float = 1.0
    bias: float = 0.0
    history: List[float] = field(default_factory=list)

    @classmethod
    def uniform(cls, mask: np.ndarray) -> "AttributionModel":
        w = mask.astype(np.float64)
        return cls(weights=w / w.sum(), scale=1.0, bias=0.0)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        if self.scale == 1.0 and self.bias == 0.0:
            return raw
        return 1.0 / (1.0 + np.exp(-self.scale * (raw - self.bias)))


def supervision_targets(anchor_indices: Sequence[int], columns: np.ndarray, concepts: Sequence[str]) -> np.ndarray:
    """Soft ground truth (anchors x columns): identity 1, same (non-empty) concept 0.5, else 0."""
    cols = np.asarray(columns)
    col_concepts = np.array([concepts[i] for i in cols]) if len(concepts) else np.array([""] * len(cols))
    y = np.zeros((len(anchor_indices), len(cols)), np.float32)
    for a, i in enumerate(anchor_indices):
        c = concepts[i] if len(concepts) else ""
        if c:
            y[a, col_concepts == c] = SAME_CONCEPT_TARGET
        y[a, cols == i] = 1.0
    return y


def fit_attribution_model(dyn: Dynamics, anchors: QueryTrajectory, anchor_indices: Sequence[int],
                          concepts: Sequence[str], mask: np.ndarray, steps: int = 300, lr: float = 0.05,
                          seed: int = 0) -> AttributionModel:
    """Fit channel weights (restricted to ``mask``) and calibration on anchor supervision."""
    rng = np.random.default_rng(seed)
    if dyn.N <= MAX_FIT_COLUMNS:
        columns = np.arange(dyn.N)
    else:
        others = rng.choice(dyn.N, MAX_FIT_COLUMNS, replace=False)
        columns = np.unique(np.concatenate([others, np.asarray(anchor_indices)]))
    feats = torch.from_numpy(dyn.channel_tensor(anchors, columns)[mask]).double()  # (C, A, n)
    target = torch.from_numpy(supervision_targets(anchor_indices, columns, concepts)).double()
    theta = torch.zeros(feats.shape[0], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(np.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(float(feats.mean()), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, log_scale, bias], lr=lr)
    history = []
    for _ in range(steps):
        w = torch.softmax(theta, 0)
        raw = torch.einsum("c,cqn->qn", w, feats)
        cal = torch.sigmoid(log_scale.exp() * (raw - bias))
        loss = attribution_loss(raw, cal, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    full = np.zeros(mask.shape[0])
    full[mask] = torch.softmax(theta, 0).detach().numpy()
    return AttributionModel(weights=full, scale=log_scale.exp().item(), bias=bias.item(), history=history)
