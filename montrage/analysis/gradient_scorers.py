"""Gradient-based attribution baselines: TracIn-CP and D-TRAK, on the LoRA parameters only.

Both read the training images from the run store and rebuild the model at stored checkpoints
from the LoRA weights in the store. Options (``ctx.options``):

- ``grad_timesteps``: diffusion timesteps of the gradients (default: the run's capture timesteps)
- ``proj_dim`` (1024), ``proj_seed`` (0): the random projection (a CountSketch generated on the gradients'
  device, see :class:`~montrage.analysis.gradients.Projector`); ``proj_cache_mb`` (256): memory for keeping
  its generated blocks between calls
- ``grad_batch_size`` (32): items per batched per-sample gradient pass
- ``dtrak_lambda`` (0.1): D-TRAK damping, relative to the mean diagonal of G^T G
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from montrage.analysis.base import ScoringContext, register
from montrage.analysis.gradients import DEFAULT_PROJ_DIM, Projector, normalize_rows, trak_scores
from montrage.errors import ScorerError
from montrage.models.components import DiffusionComponents
from montrage.models.features import QUERY_SEED_OFFSET, TRAIN_SEED_OFFSET


@dataclass
class GradientSettings:
    timesteps: Tuple[int, ...]
    noise_seed: int
    proj_dim: int
    proj_seed: int
    batch_size: int
    cache_mb: float = 256.0

    @classmethod
    def from_ctx(cls, ctx: ScoringContext) -> "GradientSettings":
        capture = ctx.store.run_config.get("capture") or {}
        ts = ctx.options.get("grad_timesteps") or capture.get("timesteps")
        if not ts:
            raise ScorerError("no timesteps for the gradients: the run recorded none; pass grad_timesteps")
        try:
            settings = cls(timesteps=tuple(int(t) for t in ts), noise_seed=int(capture.get("seed", 0)),
                           proj_dim=int(ctx.options.get("proj_dim", DEFAULT_PROJ_DIM)),
                           proj_seed=int(ctx.options.get("proj_seed", 0)),
                           batch_size=int(ctx.options.get("grad_batch_size", 32)),
                           cache_mb=float(ctx.options.get("proj_cache_mb", 256.0)))
        except (TypeError, ValueError) as exc:
            raise ScorerError(f"bad gradient option: {exc}") from exc
        if settings.proj_dim <= 0 or settings.batch_size <= 0 or settings.cache_mb < 0:
            raise ScorerError("proj_dim and grad_batch_size must be > 0, proj_cache_mb >= 0")
        return settings

    def key(self) -> str:
        return f"{','.join(map(str, self.timesteps))}/{self.noise_seed}/{self.proj_dim}/{self.proj_seed}"


def checkpoint_components(ctx: ScoringContext, k: int) -> DiffusionComponents:
    """The model at checkpoint index ``k``, refusing checkpoints whose LoRA weights were not recorded."""
    require_lora(ctx, k)
    return ctx.components_at(k)


def require_lora(ctx: ScoringContext, k: int) -> None:
    """Refuse checkpoint indices out of range or whose LoRA weights were not recorded."""
    n = ctx.store.n_checkpoints
    if not 0 <= k < n:
        raise ScorerError(f"checkpoint index {k} is out of range: the store has {n} committed checkpoints")
    finite = ctx.cached(f"grad/lora-finite/{k}", lambda: all(np.isfinite(np.asarray(w)).all()
                                                             for w in ctx.store.lora_weights(k).values()))
    if not finite:
        raise ScorerError(f"checkpoint {k} has no recorded LoRA weights (CaptureConfig.record_lora=False, or "
                          "non-finite weights); gradient methods need them")


def projector(ctx: ScoringContext, comps: DiffusionComponents, s: GradientSettings) -> Projector:
    return ctx.cached(f"grad/projector/{s.proj_dim}/{s.proj_seed}",
                      lambda: Projector.for_unet(comps.unet, s.proj_dim, s.proj_seed, cache_mb=s.cache_mb))


def train_gradients(ctx: ScoringContext, k: int, output: str, s: GradientSettings) -> np.ndarray:
    """(N, T, D) projected gradients of the training images (their captions) at checkpoint k (cached): the
    features recorded with the run (:mod:`montrage.analysis.gradient_features`), computed once on first use."""
    from montrage.analysis.gradient_features import stored_features, train_features

    key = f"grad/stored/{output}/{k}/{s.key()}/{ctx.device}"  # store reads: kept for every call on this store
    if key in ctx.run_cache:
        return ctx.run_cache[key]
    stored = stored_features(ctx, k, output, s)
    if stored is not None:
        return ctx.cached(key, lambda: stored)
    return ctx.cached(f"grad/train/{output}/{k}/{s.key()}", lambda: train_features(ctx, k, output, s))


def query_key(ctx: ScoringContext, k: int, output: str, s: GradientSettings) -> str:
    """Cache key of the queries' projected gradients of ``output`` at checkpoint k."""
    return f"grad/query/{ctx.queries.key}/{output}/{k}/{s.key()}"


def query_gradients(ctx: ScoringContext, k: int, output: str, s: GradientSettings) -> np.ndarray:
    """(Q, T, D) projected gradients of the queries (their prompts; '' = null prompt) at checkpoint k (cached).
    Callers that walk several checkpoints ask :func:`query_gradients_at` for all of them first (one batched
    pass); this then reads the cache."""
    return query_gradients_at(ctx, [k], output, s)[0]


def query_seeds(queries) -> List[int]:
    """The item seeds that fix a query's noise (the offset keeps them apart from training images' and probes')."""
    return [QUERY_SEED_OFFSET + int(x) for x in queries.item_seeds]


def compute_query_gradients(ctx: ScoringContext, k: int, outputs: Sequence[str], s: GradientSettings,
                            aux_fn=None) -> Dict[str, np.ndarray]:
    """The queries' gradients of ``outputs`` at checkpoint k from ONE forward pass per item
    (:func:`~montrage.analysis.gradients.projected_gradients_shared`), cached where :func:`query_gradients` reads
    them; returns ``aux_fn``'s tensors of those forwards ({} without it)."""
    from montrage.analysis.gradients import projected_gradients_shared

    require_lora(ctx, k)
    q = ctx.queries
    comps = ctx.components_at(int(k))
    grads, kept = projected_gradients_shared(comps, q.images, list(q.prompts), query_seeds(q), outputs=list(outputs),
                                             timesteps=s.timesteps, noise_seed=s.noise_seed,
                                             projector=projector(ctx, comps, s), batch_size=s.batch_size,
                                             progress=ctx.progress, aux_fn=aux_fn)
    for o, g in grads.items():
        ctx.cached(query_key(ctx, int(k), o, s), lambda g=g: g)
    return kept


def query_gradients_shared(ctx: ScoringContext, k: int, outputs: Sequence[str], s: GradientSettings) -> List[np.ndarray]:
    """:func:`query_gradients` of several outputs at checkpoint k; those not cached yet from ONE forward pass per
    item (:func:`compute_query_gradients`): same numbers, one UNet forward instead of one per output."""
    todo = [o for o in dict.fromkeys(outputs) if not ctx.has(query_key(ctx, int(k), o, s))]
    if len(todo) > 1:
        compute_query_gradients(ctx, k, todo, s)
    return [query_gradients(ctx, k, o, s) for o in outputs]


def query_gradients_at(ctx: ScoringContext, ks: Sequence[int], output: str, s: GradientSettings) -> List[np.ndarray]:
    """:func:`query_gradients` at checkpoints ``ks``; the ones not cached yet in one batched pass over their LoRA
    weights (:func:`compute_query_gradients_at`)."""
    todo = [int(k) for k in dict.fromkeys(ks) if not ctx.has(query_key(ctx, int(k), output, s))]
    if todo:
        compute_query_gradients_at(ctx, todo, output, s)
    return [ctx.cached(query_key(ctx, int(k), output, s), lambda k=k: query_gradients_at(ctx, [k], output, s)[0])
            for k in ks]  # all filled above: the fallback never runs


def compute_query_gradients_at(ctx: ScoringContext, ks: Sequence[int], output: str, s: GradientSettings,
                               aux_fn=None) -> Dict[int, Dict[str, np.ndarray]]:
    """The queries' gradients of ``output`` at checkpoints ``ks`` (one batched pass over their LoRA weights:
    :func:`~montrage.analysis.gradients.projected_gradients_at_aux`), cached where :func:`query_gradients` reads
    them; returns per checkpoint ``aux_fn``'s tensors of those forwards ({} without it)."""
    from montrage.analysis.gradients import projected_gradients_at_aux
    from montrage.models.lora import lora_slots

    ks = [int(k) for k in dict.fromkeys(ks)]
    for k in ks:
        require_lora(ctx, k)
    if len(ks) == 1:
        return {ks[0]: compute_query_gradients(ctx, ks[0], [output], s, aux_fn=aux_fn)}
    q = ctx.queries
    comps = ctx.components_at(ks[-1])  # the LoRA tensors are passed per set; the model's own are not used
    name_of = {id(p): n for n, p in comps.unet.named_parameters()}
    slots = lora_slots(comps.unet)
    sets = []
    for k in ks:
        w = ctx.store.lora_weights(k)
        sets.append({name_of[id(p)]: torch.as_tensor(np.asarray(w[key])) for key, p in slots.items()})
    parts, kept = projected_gradients_at_aux(comps, sets, q.images, list(q.prompts), query_seeds(q), output=output,
                                             timesteps=s.timesteps, noise_seed=s.noise_seed,
                                             projector=projector(ctx, comps, s), batch_size=s.batch_size,
                                             aux_fn=aux_fn)
    for k, g in zip(ks, parts):
        ctx.cached(query_key(ctx, k, output, s), lambda g=g: g)
    return dict(zip(ks, kept))


# ----------------------------------------------------------------------------- TracIn-CP
def tracin_checkpoints(upto: int) -> List[int]:
    """Checkpoints 1..upto (index 0 is before training); [0] when only the initial one exists."""
    return list(range(1, upto + 1)) if upto >= 1 else [0]


def learning_rate(run_config: dict, step: int, recorded: Optional[float] = None) -> float:
    """The learning rate at a checkpoint: the one the monitor read from the optimizer there (``recorded``,
    exact for any schedule); for runs without it, ``montrage train``'s warm-up-then-constant schedule."""
    if recorded is not None and np.isfinite(recorded):
        return float(recorded)
    train = run_config.get("train") or {}
    if "lr" not in train:
        raise ScorerError("this run recorded no learning rate (no optimizer was given to the monitor); TracIn weights "
                          "checkpoints by it: record the run with TrainingMonitor(..., optimizer=optimizer)")
    lr = float(train["lr"])
    warmup = int(train.get("warmup_steps", 0) or 0)
    return lr * min(1.0, max(int(step), 1) / warmup) if warmup > 0 else lr


def tracin_combine(pairs: Sequence[Tuple[float, np.ndarray, np.ndarray]]) -> np.ndarray:
    """sum_k lr_k sum_t <g^_q,t(k), g^_i,t(k)> with per-sample, per-timestep unit-normalised gradients.

    ``pairs``: (lr_k, query grads (Q, T, D), train grads (N, T, D)) per checkpoint.
    """
    total = None
    for lr, gq, gt in pairs:
        s = lr * np.einsum("qtd,ntd->qn", normalize_rows(gq).astype(np.float64), normalize_rows(gt).astype(np.float64))
        total = s if total is None else total + s
    if total is None:
        raise ScorerError("TracIn needs at least one checkpoint")
    return total.astype(np.float32)


class TracInScorer:
    name = "tracin"
    description = ("TracIn-CP over the stored checkpoints: lr-weighted sum of per-timestep unit-normalised "
                   "LoRA gradient dot products of the denoising loss (random projection)")

    def score(self, ctx: ScoringContext) -> np.ndarray:
        s = GradientSettings.from_ctx(ctx)
        steps = np.asarray(ctx.store.steps)
        lrs = getattr(ctx.store, "learning_rates", None)
        pairs = []
        query_gradients_at(ctx, tracin_checkpoints(ctx.checkpoint), "denoise", s)  # one batched pass
        for k in tracin_checkpoints(ctx.checkpoint):
            gt = train_gradients(ctx, k, "denoise", s)
            gq = query_gradients(ctx, k, "denoise", s)
            pairs.append((learning_rate(ctx.store.run_config, int(steps[k]), None if lrs is None else float(lrs[k])), gq, gt))
        return tracin_combine(pairs)


# ----------------------------------------------------------------------------- D-TRAK
def dtrak_combine(train: np.ndarray, queries: np.ndarray, lam_rel: float = 0.1) -> np.ndarray:
    """D-TRAK scores from (N, T, D) / (Q, T, D) projected gradients: sum over timesteps, then the kernel solve."""
    return trak_scores(np.asarray(train).sum(1), np.asarray(queries).sum(1), lam_rel)


class DTrakScorer:
    name = "dtrak"
    description = ("D-TRAK (Zheng et al., ICLR 2024): projected LoRA gradients of the squared-norm output "
                   "function at the attributed checkpoint, scored with (G^T G + lambda I)^-1")

    def score(self, ctx: ScoringContext) -> np.ndarray:
        s = GradientSettings.from_ctx(ctx)
        k = ctx.checkpoint
        gt = train_gradients(ctx, k, "sqnorm", s)
        gq = query_gradients(ctx, k, "sqnorm", s)
        return dtrak_combine(gt, gq, float(ctx.options.get("dtrak_lambda", 0.1)))


@register("tracin")
def _tracin() -> TracInScorer:
    return TracInScorer()


@register("dtrak")
def _dtrak() -> DTrakScorer:
    return DTrakScorer()
