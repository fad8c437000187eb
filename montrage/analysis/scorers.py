"""Training-dynamics scorers (MONTRAGE and its ablations) and the pixel baseline.

All share :class:`~montrage.analysis.trajectories.Dynamics`; they differ in which channels they use
and whether the channel weights are learned (the attribution model) or equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from montrage.analysis.base import ScoringContext, register
from montrage.analysis.model import AttributionModel, fit_attribution_model
from montrage.analysis.trajectories import (Dynamics, QueryTrajectory, anchor_trajectory, probe_trajectory,
                                            reencode_trajectory)
from montrage.errors import ScorerError


def trajectory_key(ctx: ScoringContext, final_only: bool = False) -> str:
    """Cache key of the queries' mode-B trajectory under ctx's condition (``final_only``: the attributed checkpoint
    alone), for :func:`query_trajectory` and for passes that encode the queries while doing other work."""
    return f"traj/B/{ctx.queries.key}/{ctx.condition}/{ctx.checkpoint}" + ("/final" if final_only else "")


def query_trajectory(ctx: ScoringContext, final_only: bool = False) -> QueryTrajectory:
    """Mode B (default): final images re-encoded under each checkpoint; mode A: probes as generated at k.
    ``final_only`` (mode B): only the attributed checkpoint is needed, so only it is re-encoded (earlier ones NaN),
    unless the whole trajectory is already at hand."""
    mode = str(ctx.options.get("query_mode", "B")).upper()
    q = ctx.queries
    if mode == "A":
        if q.probe_indices is None:
            raise ScorerError("query mode A needs the run's probes as queries; use mode B for --images")
        return ctx.cached(f"traj/A/{q.key}/{ctx.condition}/{ctx.checkpoint}",
                          lambda: probe_trajectory(ctx.store, ctx.condition, ctx.checkpoint, q.probe_indices))
    if mode != "B":
        raise ScorerError(f"query_mode must be A or B, got {mode!r}")
    key = trajectory_key(ctx)
    if final_only and not ctx.has(key):
        return ctx.cached(trajectory_key(ctx, final_only=True), lambda: reencode_trajectory(
            ctx.store, ctx.components_at, q.images, q.prompts, q.item_seeds, ctx.condition, ctx.checkpoint,
            ctx.progress, only=[ctx.checkpoint]))
    return ctx.cached(key, lambda: reencode_trajectory(ctx.store, ctx.components_at, q.images, q.prompts,
                                                       q.item_seeds, ctx.condition, ctx.checkpoint, ctx.progress))


@dataclass
class DynamicsScorer:
    name: str
    description: str
    kinds: Tuple[str, ...]
    final_only: bool = False  # keep only the attributed checkpoint's 'sim' channels
    learned: bool = False

    def dynamics(self, ctx: ScoringContext) -> Dynamics:
        return ctx.cached(f"dyn/{ctx.condition}/{ctx.checkpoint}/{','.join(self.kinds)}",
                          lambda: Dynamics(ctx.store, ctx.condition, ctx.checkpoint, self.kinds, progress=ctx.progress))

    def mask(self, dyn: Dynamics) -> np.ndarray:
        if not self.final_only:
            return np.ones(len(dyn.channels), bool)
        return np.array([c.kind == "sim" and c.k == dyn.K - 1 for c in dyn.channels])

    def model(self, ctx: ScoringContext, dyn: Dynamics) -> AttributionModel:
        mask = self.mask(dyn)
        if not self.learned:
            return AttributionModel.uniform(mask)
        store = ctx.store
        if not store.anchor_indices:
            raise ScorerError(f"{self.name} learns from anchors, but this run recorded none "
                              "(CaptureConfig.anchors=0); use montrage-unsupervised")
        anchors = anchor_trajectory(store, ctx.condition, ctx.checkpoint)
        return fit_attribution_model(dyn, anchors, store.anchor_indices, store.concepts, mask)

    def score(self, ctx: ScoringContext) -> np.ndarray:
        dyn = self.dynamics(ctx)
        model = self.model(ctx, dyn)
        ctx.options.setdefault("_models", {})[self.name] = model
        return model.calibrate(dyn.score(query_trajectory(ctx), model.weights)).astype(np.float32)


def _factory(**kw):
    return lambda: DynamicsScorer(**kw)


_SCORERS: Sequence[dict] = (
    dict(name="montrage-dynamics", kinds=("sim", "move", "loss"), learned=True,
         description="similarity, co-movement and loss co-descent over all checkpoints, learned weights (attribution "
         "loss): the representation channels of montrage alone"),
    dict(name="montrage-unsupervised", kinds=("sim", "move", "loss"),
         description="the same channels with equal weights (no attribution model)"),
    dict(name="final-sim", kinds=("sim",), final_only=True,
         description="shifted cosine of final-checkpoint representations only (no dynamics)"),
    dict(name="final-sim-learned", kinds=("sim",), final_only=True, learned=True,
         description="final-checkpoint channels with learned weights (attribution model, no dynamics)"),
    dict(name="dynamics-only", kinds=("move",),
         description="co-movement of representation changes across checkpoints only"),
    dict(name="loss-codescent", kinds=("loss",),
         description="co-descent of denoising losses across checkpoints only"),
)
for _kw in _SCORERS:
    register(_kw["name"])(_factory(**_kw))


def training_pixels(ctx: ScoringContext) -> np.ndarray:
    """The training images at the run's resolution, read from the recorded data folder."""
    from montrage.analysis.gradients import training_images

    return ctx.cached("grad/training_images", lambda: training_images(ctx.store)).images


@register("pixel")
class PixelScorer:
    name = "pixel"
    description = "shifted cosine of centred raw pixels (a sanity baseline that needs no model)"

    def score(self, ctx: ScoringContext) -> np.ndarray:
        pixels = training_pixels(ctx)
        train = pixels.reshape(len(pixels), -1).astype(np.float32)
        q = ctx.queries.images.reshape(len(ctx.queries), -1).astype(np.float32)
        mean = train.mean(0)
        a, b = q - mean, train - mean
        a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-6
        b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-6
        return ((1 + a @ b.T) / 2).astype(np.float32)
