"""The fused model's channels of (query, training image) pairs, computed from the run: representation
trajectories, gradient kernels, pixels, learned dynamics, text, per-step signals and the concept classifier. Each
family is computed only when the run can provide it (:func:`try_family`); shared forward passes fill the caches
the families read."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from montrage.analysis.base import QuerySet, ScoringContext
from montrage.analysis.fused.kinds import (CHECKPOINT_FREE_FAMILIES, CHECKPOINT_ONLY_OPTION, FAMILIES, IMAGE,
                                          PROMPT)
from montrage.errors import MontrageError, ScorerError

log = logging.getLogger(__name__)

def subset(q: QuerySet, idx: Sequence[int], prompts: Optional[Sequence[str]] = None) -> QuerySet:
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return QuerySet(ids=pick(q.ids), images=q.images[idx], prompts=list(prompts) if prompts is not None else pick(q.prompts),
                    seeds=pick(q.seeds), item_seeds=pick(q.item_seeds),
                    probe_indices=[q.probe_indices[i] for i in idx] if q.probe_indices is not None else None,
                    concepts=pick(q.concepts), meta=pick(q.meta))


def near_duplicate(similarity: np.ndarray) -> np.ndarray:
    """Per query, a ratio test on a shifted-cosine similarity (1 + cos) / 2: log(d2 / d_i) for the training image
    nearest to the query (d = 1 - cos; d2 = the second-nearest's distance), 0 for every other image. Large only
    when one training image is far closer than all others -- a copy. Kept on its own scale (not standardised):
    a per-query z-score would make every query's nearest image look equally duplicated."""
    dist = np.clip(1.0 - (2.0 * np.asarray(similarity, np.float64) - 1.0), 1e-6, None)
    out = np.zeros_like(dist)
    if dist.shape[-1] < 2:
        return out.astype(np.float32)
    order = np.argsort(dist, axis=-1)
    rows = np.arange(dist.shape[0])
    d1, d2 = dist[rows, order[:, 0]], dist[rows, order[:, 1]]
    out[rows, order[:, 0]] = np.log(d2 / d1)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)


def sub_context(ctx: ScoringContext, queries: QuerySet, **options) -> ScoringContext:
    """A context for other queries sharing the model, cache and options of ``ctx``."""
    sub = ScoringContext(store=ctx.store, queries=queries, checkpoint=ctx.checkpoint, condition=ctx.condition,
                         device=ctx.device, progress=False, options={**ctx.options, **options},
                         _model=ctx._model, _cache=ctx._cache)
    return sub


def rep_groups(dyn, final_only: bool) -> Dict[str, np.ndarray]:
    last = dyn.K - 1
    masks = {"sim-final": [c.kind == "sim" and c.k == last for c in dyn.channels]}
    if not final_only:
        masks.update({"sim-path": [c.kind == "sim" and c.k < last for c in dyn.channels],
                      "move": [c.kind == "move" for c in dyn.channels],
                      "loss": [c.kind == "loss" for c in dyn.channels]})
    return {g: np.asarray(m, bool) for g, m in masks.items() if any(m)}


def rep_channels(ctx: ScoringContext, condition: str, final_only: bool) -> Dict[str, np.ndarray]:
    from montrage.analysis.scorers import query_trajectory
    from montrage.analysis.trajectories import Dynamics

    if condition not in ctx.store.conditions:
        return {}
    dyn = ctx.cached(f"dyn/{condition}/{ctx.checkpoint}/sim,move,loss",
                     lambda: Dynamics(ctx.store, condition, ctx.checkpoint, ("sim", "move", "loss")))
    q = query_trajectory(_with_condition(ctx, condition), final_only=final_only)
    out = {}
    for g, mask in rep_groups(dyn, final_only).items():
        out[f"rep/{condition}/{g}"] = dyn.score(q, mask / mask.sum())
    return out


def _with_condition(ctx: ScoringContext, condition: str) -> ScoringContext:
    sub = sub_context(ctx, ctx.queries)
    sub.condition = condition
    return sub


def _shared_settings(ctx: ScoringContext, condition: str):
    """(gradient settings, capture config) when the queries' gradients and their ``condition`` representations read
    the same noised inputs (mode B, the capture's timesteps and noise seed, the condition captured); else None."""
    from montrage.analysis.gradient_scorers import GradientSettings
    from montrage.config import CaptureConfig, from_dict

    if str(ctx.options.get("query_mode", "B")).upper() != "B" or condition not in ctx.store.conditions:
        return None
    s = GradientSettings.from_ctx(ctx)
    capture = from_dict(CaptureConfig, ctx.store.capture)
    if tuple(s.timesteps) != tuple(capture.timesteps) or int(s.noise_seed) != int(capture.seed):
        return None
    capture.conditions = (condition,)
    return s, capture


def _encoding_while(ctx: ScoringContext, capture, k: int, compute: Callable[[Callable], Dict[int, Dict[str, np.ndarray]]]
                    ) -> Dict[int, Tuple[Dict[str, np.ndarray], np.ndarray]]:
    """Run ``compute(aux_fn)`` (a gradient pass over the queries) with the feature extractor's hooks on the model,
    ``aux_fn`` keeping what :meth:`FeatureExtractor.extract` would keep from each forward; returns per checkpoint
    the queries' ((Q, T, F) features per module, (Q, T) losses)."""
    import torch

    from montrage.losses.diffusion import per_sample_mse
    from montrage.models.features import FeatureExtractor

    extractor = FeatureExtractor(ctx.components_at(k), capture)
    captured, handles = extractor.hook()

    def seen(pred: torch.Tensor, item) -> Dict[str, torch.Tensor]:
        return {**{m: extractor.pool(captured[m]) for m in extractor.modules},
                "loss": per_sample_mse(pred, item["target"])}

    try:
        kept = compute(seen)
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    n, T = len(ctx.queries.images), len(capture.timesteps)
    return {kk: ({m: extractor.project(m, torch.from_numpy(v[m]).flatten(0, 1)).view(n, T, -1).cpu().numpy()
                  for m in extractor.modules}, v["loss"]) for kk, v in kept.items()}


def shared_prompt_pass(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """Prompt-known queries on the final checkpoint's channels: their caption-condition representations and their
    D-TRAK and TracIn gradients at the attributed checkpoint come from ONE UNet forward per item: both read the same
    noised inputs (the capture seed and timesteps, the query's item seed), its prompt and the same LoRA weights.
    Fills the caches :func:`rep_channels` and :func:`grad_channels` read (returns no channel itself); does nothing
    where the two would differ (other gradient timesteps or noise, query mode A, no caption condition captured) or
    where either is already computed."""
    from montrage.analysis.gradient_scorers import compute_query_gradients, query_key, require_lora
    from montrage.analysis.scorers import trajectory_key
    from montrage.analysis.trajectories import one_checkpoint_trajectory

    k = ctx.checkpoint
    shared = _shared_settings(ctx, "caption")
    if shared is None:
        return {}
    s, capture = shared
    caption = _with_condition(ctx, "caption")
    outputs = ("sqnorm", "denoise")
    if any(ctx.has(key) for key in (trajectory_key(caption), trajectory_key(caption, final_only=True),
                                    *(query_key(ctx, k, o, s) for o in outputs))):
        return {}
    require_lora(ctx, k)
    feats, losses = _encoding_while(ctx, capture, k, lambda seen: {
        k: compute_query_gradients(ctx, k, outputs, s, aux_fn=seen)})[k]
    ctx.cached(trajectory_key(caption, final_only=True),
               lambda: one_checkpoint_trajectory(feats, losses, k, ctx.checkpoint))
    return {}


def shared_trajectory_pass(ctx: ScoringContext, kind: str) -> Dict[str, np.ndarray]:
    """Queries on every channel: their representations at checkpoints 1..k, under the condition their gradients are
    taken in (the null prompt for an image-only query, the caption condition for a prompt-known one), come from the
    forwards of TracIn's batched gradient pass over those checkpoints (same noised inputs, same LoRA weights);
    checkpoint 0 (before training, no TracIn term) is re-encoded alone. Fills the caches :func:`rep_channels`,
    :func:`dyn_channel` and :func:`grad_channels` read (returns no channel itself); does nothing where the inputs
    would differ or where either is already computed."""
    from montrage.analysis.gradient_scorers import compute_query_gradients_at, query_key, tracin_checkpoints
    from montrage.analysis.scorers import trajectory_key
    from montrage.analysis.trajectories import QueryTrajectory, reencode_trajectory

    k, q = ctx.checkpoint, ctx.queries
    condition = "caption" if kind == PROMPT else "null"
    shared = _shared_settings(ctx, condition)
    if shared is None:
        return {}
    s, capture = shared
    sub = _with_condition(ctx, condition)
    ks = tracin_checkpoints(k)
    if ctx.has(trajectory_key(sub)) or any(ctx.has(query_key(ctx, kk, "denoise", s)) for kk in ks):
        return {}
    seen_at = _encoding_while(ctx, capture, ks[-1], lambda seen: compute_query_gradients_at(
        ctx, ks, "denoise", s, aux_fn=seen))
    rest = [kk for kk in range(k + 1) if kk not in seen_at]
    first = (reencode_trajectory(ctx.store, ctx.components_at, q.images, q.prompts, q.item_seeds, condition, k,
                                 only=rest) if rest else None)

    def at(kk: int, m: Optional[str]) -> np.ndarray:
        if kk in seen_at:
            feats, losses = seen_at[kk]
            return np.asarray(feats[m] if m else losses, np.float32)
        return (first.features[m] if m else first.losses)[kk]

    ctx.cached(trajectory_key(sub), lambda: QueryTrajectory(
        {m: np.stack([at(kk, m) for kk in range(k + 1)]) for m in ctx.store.modules},
        np.stack([at(kk, None) for kk in range(k + 1)])))
    return {}


def grad_channels(ctx: ScoringContext, final_only: bool) -> Dict[str, np.ndarray]:
    from montrage.analysis.gradient_scorers import (GradientSettings, dtrak_combine, query_gradients,
                                                   query_gradients_at, query_gradients_shared, tracin_checkpoints,
                                                   train_gradients)
    from montrage.analysis.gradients import normalize_rows

    s = GradientSettings.from_ctx(ctx)
    k = ctx.checkpoint
    if final_only:  # D-TRAK's and TracIn's query gradients at k from one forward pass
        query_gradients_shared(ctx, k, ("sqnorm", "denoise"), s)
    else:  # the query's gradients at every TracIn checkpoint in one batched pass
        query_gradients_at(ctx, tracin_checkpoints(k), "denoise", s)
    out = {"grad/dtrak": dtrak_combine(train_gradients(ctx, k, "sqnorm", s), query_gradients(ctx, k, "sqnorm", s),
                                       float(ctx.options.get("dtrak_lambda", 0.1)))}
    for kk in ([k] if final_only else tracin_checkpoints(k)):
        gt, gq = train_gradients(ctx, kk, "denoise", s), query_gradients(ctx, kk, "denoise", s)
        out[f"grad/tracin/k{kk}"] = np.einsum("qtd,ntd->qn", normalize_rows(gq), normalize_rows(gt))
    return out


def pixel_channel(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    from montrage.analysis.scorers import PixelScorer

    pixel = PixelScorer().score(ctx)
    return {"pixel": pixel, "dup/pixel": near_duplicate(pixel)}


def dyn_channel(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """``dyn/learned``: what ``montrage-dynamics`` computes (per module / timestep / checkpoint softmax weights on
    the raw shifted cosines, fitted on the stored anchor trajectories) as ONE channel, so that its fine weighting
    is not averaged away by the per-group means of ``rep/*``."""
    from montrage.analysis.scorers import DynamicsScorer

    scorer = DynamicsScorer("montrage-dynamics", "", ("sim", "move", "loss"), learned=True)
    sub = _with_condition(ctx, "null")
    dyn = scorer.dynamics(sub)
    model = ctx.cached(f"fused/dyn-model/{ctx.checkpoint}", lambda: scorer.model(sub, dyn))
    from montrage.analysis.scorers import query_trajectory

    return {"dyn/learned": model.calibrate(dyn.score(query_trajectory(sub), model.weights)).astype(np.float32)}


def text_channels(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """``text/encoder`` (prompt-known queries): the query prompt vs each training caption through the run's own
    text encoder, i.e. the path by which the prompt conditions the UNet -- influence through it is real
    influence when the prompt is known. Word matching (TF-IDF) is deliberately NOT a channel: it is the
    ``text-only`` baseline, which the benchmark reports next to ``montrage`` so that text matching cannot pass
    for attribution."""
    from montrage.analysis.text_baseline import encoder_similarity
    from montrage.storage import schema as S

    captions = [str(c) for c in ctx.store.train_meta.get(S.ATTR_CAPTIONS, [])]
    if not captions or not any(c.strip() for c in captions):
        raise ScorerError("no training captions recorded")
    prompts = list(ctx.queries.prompts)
    sim = encoder_similarity(ctx, prompts, captions).astype(np.float32)
    return {"text/encoder": sim, "text/concept": concept_mean(sim, ctx.store.concepts)}


def concept_mean(values: np.ndarray, concepts: Sequence[str]) -> np.ndarray:
    """Each image's value replaced by the mean over its concept's images (unlabelled images keep their own): the
    prompt's pull towards a concept as a whole -- a concept's word in a prompt acts through what all of its
    captioned images taught the LoRA, whatever object the prompt pairs it with."""
    out = np.array(values, np.float32, copy=True)
    arr = np.asarray(concepts)
    for c in set(concepts) - {""}:
        cols = arr == c
        out[:, cols] = values[:, cols].mean(1, keepdims=True)
    return out


def steps_channel(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """``steps/learned``: how much of each training image the LoRA learned, from the per-step losses the loop
    recorded (:mod:`montrage.analysis.step_signals`); the same row for every query (a per-image prior)."""
    from montrage.analysis.step_signals import loss_trajectory

    learned = ctx.cached(f"fused/steps/{ctx.checkpoint}", lambda: loss_trajectory(ctx.store, ctx.checkpoint).learned())
    if not np.isfinite(learned).any():
        raise ScorerError("the run recorded no per-step signals")
    return {"steps/learned": np.broadcast_to(learned, (len(ctx.queries), len(learned))).astype(np.float32)}


def class_channel(ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """``class/concept`` (image-only queries): each training image's value is the query's log-probability of that
    image's concept under a small CNN trained on the run's own training images and concept labels
    (:mod:`montrage.analysis.concept_classifier`): the style of a concept apart from any one image's object."""
    from montrage.analysis.concept_classifier import classifier_for
    from montrage.analysis.scorers import training_pixels

    concepts = list(ctx.store.concepts)
    clf = classifier_for(ctx, training_pixels(ctx), concepts)
    return {"class/concept": clf.channel(ctx.queries.images, concepts)}


def try_family(name: str, fn, ctx: ScoringContext) -> Dict[str, np.ndarray]:
    """A channel family, or nothing when the run cannot provide it (remembered per context)."""
    key = f"fused/unavailable/{name}"
    if ctx.has(key):
        return {}
    try:
        return fn()
    except (MontrageError, OSError, KeyError) as exc:
        log.info("montrage: %s channels unavailable for this run (%s)", name, exc)
        ctx.cached(key, lambda: True)
        return {}


def scored_families(ctx: ScoringContext) -> Tuple[str, ...]:
    """The families a fit may use under ``ctx.options``."""
    if ctx.options.get(CHECKPOINT_ONLY_OPTION):
        return tuple(f for f in FAMILIES if f not in CHECKPOINT_FREE_FAMILIES)
    return FAMILIES


def channel_values(ctx: ScoringContext, kind: str, final_only: bool, families: Sequence[str] = FAMILIES
                   ) -> Dict[str, np.ndarray]:
    """Raw channel values {name: (Q, N)} of ctx.queries, all of one kind."""
    out: Dict[str, np.ndarray] = {}
    if "rep" in families and "grad" in families:  # one forward for both, then read from the cache below
        if final_only and kind == PROMPT:
            try_family("shared-pass", lambda: shared_prompt_pass(ctx), ctx)
        elif not final_only:
            try_family(f"shared-trajectory-pass/{kind}", lambda: shared_trajectory_pass(ctx, kind), ctx)
    if "rep" in families:
        for cond in (("null", "caption") if kind == PROMPT else ("null",)):
            out.update(try_family(f"rep/{cond}", lambda: rep_channels(ctx, cond, final_only), ctx))
    if "grad" in families:
        out.update(try_family("grad", lambda: grad_channels(ctx, final_only), ctx))
    if "pixel" in families:
        out.update(try_family("pixel", lambda: pixel_channel(ctx), ctx))
    if "dyn" in families and not final_only:
        out.update(try_family("dyn", lambda: dyn_channel(ctx), ctx))
    if "text" in families and kind == PROMPT:
        out.update(try_family("text", lambda: text_channels(ctx), ctx))
    if "steps" in families and not final_only:
        out.update(try_family("steps", lambda: steps_channel(ctx), ctx))
    if "class" in families and kind == IMAGE:
        out.update(try_family("class", lambda: class_channel(ctx), ctx))
    if not out:
        raise ScorerError("montrage: no attribution channel could be computed for this run (no recorded features, "
                          "LoRA weights or training images)")
    return out
