"""The fused attribution model behind ``montrage``: every channel the run records, combined per query kind.

Channels of a (query j, training image i) pair, each standardised per query across training images
(z-score over i, so channels of any unit can be added):

* ``rep/<condition>/<group>``: the training-dynamics channels (:mod:`montrage.analysis.kernel`) averaged
  per group -- ``sim-final`` (the attributed checkpoint), ``sim-path`` (earlier checkpoints), ``move``
  (co-movement), ``loss`` (loss co-descent) -- under the null prompt, and, when the query has a prompt,
  also under its prompt (the store's ``caption`` condition);
* ``grad/dtrak``: D-TRAK at the attributed checkpoint; ``grad/tracin/k<k>``: per-timestep normalised
  gradient dot products of the training loss at each checkpoint k (TracIn's terms, unweighted: the model
  learns their weights). Training-side gradients are the features stored with the run
  (:mod:`montrage.analysis.gradient_features`); query gradients are taken under the query's prompt, or the
  null prompt when the query is an image only;
* ``pixel``: cosine of centred pixels; ``dup/pixel``: a near-duplicate ratio test (distance to the nearest
  training image over the second nearest), kept on its own scale: it separates copies from generations,
  which a per-query z-score of ``pixel`` cannot when siblings share a palette;
* ``dyn/learned``: the learned per-module/timestep dynamics score (``montrage-dynamics``), which the group
  means of ``rep/*`` average away;
* ``text/encoder`` (prompt known): prompt vs training caption through the run's own text encoder, the path by
  which the prompt conditions the UNet; ``text/concept``: its mean over each concept's images (the prompt's pull
  towards a concept as a whole, which is what a new composition's concept word carries). Word matching (TF-IDF)
  is never a channel: it is the ``text-only`` baseline that ``montrage`` is reported against;
* ``steps/learned``: how much of each image the LoRA learned, from the per-step losses the loop recorded
  (a per-image prior; only when the run recorded per-step signals);
* ``class/concept`` (image only): the query's log-probability of each image's concept under a small CNN trained on
  the run's own training images and concept labels (:mod:`montrage.analysis.concept_classifier`; cross-fitted on
  the fit's supervision rows): a concept's style apart from any one image's object.

score_raw(j, i) = sum_c w_c z_c(j, i) with w_c >= 0, score = sigmoid(a (score_raw - b)), fitted with the
attribution loss (:mod:`montrage.losses.attribution`) SEPARATELY for the two query kinds: ``prompt``
(``QuerySet.prompts[j] != ''``) and ``image`` (no prompt). Supervision, no extra labels: the run's anchor
training images, *perturbed* at two strengths (a shift of 1/32 of the side, colour jitter, pixel noise: image-only
kind; and near-copies: both kinds; exact copies would make pixels look perfect), plus the run's own generations of
the anchors' captions at the attributed checkpoint (fresh seeds), scored as queries -- each kind is fitted on
the queries of that kind users bring -- target 1 for the source image,
0.5 for its concept's other images, 0 otherwise; the image-only kind adds the concept term once more with each
row's own image left out (an image-only query may show a concept on an object no training image shows). When the
run's model cannot be loaded (e.g. a synthetic store), the stored
anchor trajectories (a second noise draw, no perturbation) supervise the representation channels alone.
Channels that cannot be computed for a run (no LoRA weights, no training images) are left out, and the
JSON of ``montrage attribute`` lists per query the channels and weights used. Under the ``checkpoint_channels_only``
option (set by ``montrage compare``) the fit leaves out the families whose values are the same at every checkpoint
(pixel, text, class): "when did generations start to look like the concept" is asked of each checkpoint's model,
and those channels would credit the base model's generations at step 0.

Exact caption first (prompt known): training images whose caption IS the prompt (cosine 1 through the run's text
encoder, fewer than all images) are ranked above every other image, each just above the best of the rest; the
rest of the ranking and the scores' scale are untouched. Such an image was trained under exactly the
conditioning that made the generation -- the most direct path of influence a prompt has -- but the channels'
weighted sum can let a sibling of the same concept (or a hub image) outscore it. Rank-only, so the graded scores
the LDS reads stay as fitted. The fit adopts the rule only if it does not lower R@1 on its generated supervision
(the anchors' own captions), and the JSON lists per query the images it lifted. On such a query the other images'
scores are then multiplied by a share (``others_share``): chosen held out on the counterfactual targets when the run
has retrains (:func:`exact_caption_share`), else by the memorisation test (:func:`memorised_share`: 0 when most of
the run's generations of training captions reproduce their image, 1 otherwise).

Channel set (``montrage``): every channel, or the attributed checkpoint's only, chosen per run and query kind by the
held-out value of the fit's objective on the anchors (:func:`choose_channel_set`). ``montrage-final`` is the same
model always restricted to the attributed checkpoint (``rep/*/sim-final``, ``grad/dtrak``, ``grad/tracin/k<last>``,
``pixel``, text) and ``montrage-all`` always with every channel: the dynamics ablation. On the attributed
checkpoint's channels a prompt-known query costs one UNet forward per (image, timestep) item and two backward
passes: its caption-condition representations, D-TRAK's and TracIn's gradients share that forward
(:func:`shared_prompt_pass`), and the null prompt's representations take a second forward without gradients. On
every channel a query's representations at checkpoints 1..k under its gradients' condition (null prompt when image
only) come from the forwards of TracIn's batched gradient pass (:func:`shared_trajectory_pass`; an image-only extra
query 0.76 -> 0.57 s on the 56-image typeface run, same scores). Concept
queries
(``--concept PHRASE``): score(prompt with the phrase) - score(prompt without it), Concept-TRAK's utility
direction, answered by the same fitted model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.analysis.base import QuerySet, ScoringContext, register
from montrage.analysis.model import supervision_targets
from montrage.errors import MontrageError, ScorerError

log = logging.getLogger(__name__)

PROMPT, IMAGE = "prompt", "image"
MAX_FIT_ANCHORS = 32
FIT_STEPS = 400
FIT_SEED_OFFSET = 700_000  # noise draws of the perturbed anchors (distinct from probes / training queries)
WEIGHT_DECAY = 1e-3
RANK_TEMPERATURE = 0.1  # of the image-level listwise term, in z-score units of the combined score
CONCEPT_TEMPERATURE = 0.2  # of the concept-level term
CONCEPT_WEIGHT = 3.0
EXEMPLAR_OUT_FILL = -1e6  # a left-out image's raw score in the exemplar-out concept term: below every concept's top 3
MODEL_VERSION = 15  # 14: the concept classifier channel (image only); 15: the exemplar-out concept term
EXACT_CAPTION_TOLERANCE = 1e-4  # of the text-encoder cosine: 1 - this counts as the same caption
EXACT_CAPTION_MARGIN = 0.1  # in standard deviations of the query's raw scores: how far above the rest a lifted image goes
# candidate shares of the influence left to the other images on an exact-caption query, chosen on the counterfactual
# targets (`montrage fit --retrains`): 1 keeps the fitted scores; 0 says the generation owes its loss to its own image
EXACT_CAPTION_SHARES = (1.0, 0.5, 0.2, 0.1, 0.0)
COUNTERFACTUAL_WEIGHT = 1.0  # of the LDS-style term, when the run has retrained subsets (`montrage fit --retrains`)
# the term is adopted only when it raises the held-out LDS by more than this and 2 standard errors: forced on 4
# retrains, it traded new compositions for LDS (typefaces s0 composition 1.00 -> .53; synthetic s0 LDS .52 -> .44)
COUNTERFACTUAL_ADOPT_MARGIN = 0.02
COUNTERFACTUAL_RULE = 4  # part of a saved model's key when the run has targets: a model fitted under another rule is refit
# Without retrains, the share is read from how much the run memorised: a generation of a training caption reproduces
# its image when that image is its nearest training image (pixels, RMS, at most MEMO_SIDE px a side) and closer
# than MEMO_RATIO x the mean distance to the next MEMO_NEIGHBOURS (the ratio test of memorisation studies, e.g.
# Carlini et al. 2023, on the run's own generations); when at least MEMO_FRACTION of them do, share 0.
MEMO_RATIO = 0.5
MEMO_NEIGHBOURS = 5
MEMO_FRACTION = 0.5
MEMO_SIDE = 64
# The channel set is chosen per run and query kind on held-out anchors: every channel, or the attributed
# checkpoint's only (what montrage-final uses), whichever has the lower held-out value of the fit's own objective
# over CHANNEL_SET_REPEATS random CHANNEL_SET_FOLDS-fold splits of the anchors (scored on the held-out anchors'
# rows of the last supervision set: the run's generations of their captions when there are any). More channels
# are more weights to fit on a few dozen anchors: on the four benchmark runs of model version 12 the trajectory
# channels lowered the in-sample loss but raised the held-out one.
CHANNEL_SET_FOLDS = 4
CHANNEL_SET_LABELS = {"final": "the final checkpoint's channels only", "all": "every channel"}  # for fit and report
CHANNEL_SET_REPEATS = 2


def query_kind(prompt: str) -> str:
    return PROMPT if prompt.strip() else IMAGE


def subset(q: QuerySet, idx: Sequence[int], prompts: Optional[Sequence[str]] = None) -> QuerySet:
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return QuerySet(ids=pick(q.ids), images=q.images[idx], prompts=list(prompts) if prompts is not None else pick(q.prompts),
                    seeds=pick(q.seeds), item_seeds=pick(q.item_seeds),
                    probe_indices=[q.probe_indices[i] for i in idx] if q.probe_indices is not None else None,
                    concepts=pick(q.concepts), meta=pick(q.meta))


def perturb(images: np.ndarray, seed: int, strength: Optional[Sequence[float]] = None) -> np.ndarray:
    """Deterministic small perturbations of strength s in [0, 1] per image (default 1): a shift by s x 1/32 of the
    side (at least s x 1 pixel; linear between the image and its shifted copy; edge padding), brightness/colour
    jitter of +-10% / +-5% x s and pixel noise of 4 x s grey levels."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    strength = np.ones(len(images)) if strength is None else np.asarray(strength, np.float64)
    for n, (im, st) in enumerate(zip(images, strength)):
        h, w = im.shape[:2]
        m = max(1, min(h, w) // 32)
        dy, dx = rng.choice([-m, m], 2)
        x0 = im.astype(np.float32)
        pad = np.pad(x0, ((m, m), (m, m), (0, 0)), mode="edge")
        x = (1.0 - st) * x0 + st * pad[m + dy: m + dy + h, m + dx: m + dx + w]
        x = (x * rng.uniform(1 - 0.1 * st, 1 + 0.1 * st) * rng.uniform(1 - 0.05 * st, 1 + 0.05 * st, size=3)
             + rng.normal(0.0, 4.0 * st, size=x.shape))
        out[n] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def augment_prompt(prompt: str, rng: np.random.Generator) -> str:
    """A prompt-known supervision query's prompt: its caption with one word dropped (3+ words), so an exact
    caption match cannot stand in for every other channel when the weights are fitted."""
    words = prompt.split()
    if len(words) < 3:
        return prompt
    drop = int(rng.integers(len(words)))
    return " ".join(w for i, w in enumerate(words) if i != drop)


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


def exact_caption_first(raw: np.ndarray, text: np.ndarray) -> Tuple[np.ndarray, List[List[int]]]:
    """Per query, the images whose caption is the prompt (``text``: text-encoder cosine, (Q, N)) ranked first, each
    lifted to at least EXACT_CAPTION_MARGIN row-std above the best other image; nothing changes for a query that
    matches no caption or every caption. Returns the new raw scores and, per query, the lifted images."""
    out = np.array(raw, np.float32, copy=True)
    lifted: List[List[int]] = []
    for j in range(len(out)):
        exact = np.asarray(text[j], np.float64) >= 1.0 - EXACT_CAPTION_TOLERANCE
        if not exact.any() or exact.all():
            lifted.append([])
            continue
        floor = out[j][~exact].max() + max(EXACT_CAPTION_MARGIN * float(out[j].std()), 1e-3)
        out[j][exact] = np.maximum(out[j][exact], floor)
        lifted.append([int(i) for i in np.flatnonzero(exact)])
    return out, lifted


def share_others(scores: np.ndarray, lifted: Sequence[Sequence[int]], share: float) -> np.ndarray:
    """``scores`` with the images other than each row's lifted ones multiplied by ``share`` (rows that lifted
    nothing unchanged): how much of an exact-caption generation is owed to the rest of the training set."""
    out = np.array(scores, np.float32, copy=True)
    if share == 1.0:
        return out
    for j, lift in enumerate(lifted):
        if len(lift):
            keep = out[j][list(lift)].copy()
            out[j] *= np.float32(share)
            out[j][list(lift)] = keep
    return out


def recall_at_1(scores: np.ndarray, target: np.ndarray) -> float:
    """Share of rows whose target-1 image scores strictly above every other image."""
    top = target.argmax(1)
    rows = np.arange(len(scores))
    best = scores[rows, top]
    others = np.where(np.arange(scores.shape[1])[None] == top[:, None], -np.inf, scores).max(1)
    return float(np.mean(best > others))


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


# ---------------------------------------------------------------------------------------------- channels
def _sub(ctx: ScoringContext, queries: QuerySet, **options) -> ScoringContext:
    """A context for other queries sharing the model, cache and options of ``ctx``."""
    sub = ScoringContext(store=ctx.store, queries=queries, checkpoint=ctx.checkpoint, condition=ctx.condition,
                         device=ctx.device, progress=False, options={**ctx.options, **options},
                         _model=ctx._model, _cache=ctx._cache)
    return sub


def _rep_groups(dyn, final_only: bool) -> Dict[str, np.ndarray]:
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
    for g, mask in _rep_groups(dyn, final_only).items():
        out[f"rep/{condition}/{g}"] = dyn.score(q, mask / mask.sum())
    return out


def _with_condition(ctx: ScoringContext, condition: str) -> ScoringContext:
    sub = _sub(ctx, ctx.queries)
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


def _try(name: str, fn, ctx: ScoringContext) -> Dict[str, np.ndarray]:
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


FAMILIES = ("rep", "grad", "pixel", "dyn", "text", "steps", "class")
TRAJECTORY_FAMILIES = ("dyn", "steps")  # no final-checkpoint version: left out of montrage-final
# channels whose value is the same at every checkpoint (the query's pixels or prompt against the training set's):
# left out under the ``checkpoint_channels_only`` option, which `montrage compare` sets to ask what each checkpoint's
# model learned rather than what its generations already look like
CHECKPOINT_FREE_FAMILIES = ("pixel", "text", "class")
CHECKPOINT_ONLY_OPTION = "checkpoint_channels_only"


def scored_families(ctx: ScoringContext) -> Tuple[str, ...]:
    """The families a fit may use under ``ctx.options``."""
    if ctx.options.get(CHECKPOINT_ONLY_OPTION):
        return tuple(f for f in FAMILIES if f not in CHECKPOINT_FREE_FAMILIES)
    return FAMILIES


def family(channel: str) -> str:
    """The family that computes a channel (``dup/pixel`` comes with ``pixel``)."""
    head = channel.split("/")[0]
    return "pixel" if head == "dup" else head


def channel_values(ctx: ScoringContext, kind: str, final_only: bool, families: Sequence[str] = FAMILIES
                   ) -> Dict[str, np.ndarray]:
    """Raw channel values {name: (Q, N)} of ctx.queries, all of one kind."""
    out: Dict[str, np.ndarray] = {}
    if "rep" in families and "grad" in families:  # one forward for both, then read from the cache below
        if final_only and kind == PROMPT:
            _try("shared-pass", lambda: shared_prompt_pass(ctx), ctx)
        elif not final_only:
            _try(f"shared-trajectory-pass/{kind}", lambda: shared_trajectory_pass(ctx, kind), ctx)
    if "rep" in families:
        for cond in (("null", "caption") if kind == PROMPT else ("null",)):
            out.update(_try(f"rep/{cond}", lambda: rep_channels(ctx, cond, final_only), ctx))
    if "grad" in families:
        out.update(_try("grad", lambda: grad_channels(ctx, final_only), ctx))
    if "pixel" in families:
        out.update(_try("pixel", lambda: pixel_channel(ctx), ctx))
    if "dyn" in families and not final_only:
        out.update(_try("dyn", lambda: dyn_channel(ctx), ctx))
    if "text" in families and kind == PROMPT:
        out.update(_try("text", lambda: text_channels(ctx), ctx))
    if "steps" in families and not final_only:
        out.update(_try("steps", lambda: steps_channel(ctx), ctx))
    if "class" in families and kind == IMAGE:
        out.update(_try("class", lambda: class_channel(ctx), ctx))
    if not out:
        raise ScorerError("montrage: no attribution channel could be computed for this run (no recorded features, "
                          "LoRA weights or training images)")
    return out


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class Counterfactual:
    """Denoising losses of supervision rows under LoRAs retrained on subsets of the training set: what removing
    training images actually did, the target D-TRAK's LDS scores attribution against."""
    rows: np.ndarray  # (R,) indices of the supervised rows (the run's generations of the anchors' captions)
    masks: np.ndarray  # (M, N): 1 where training image i was in retrained subset m
    losses: np.ndarray  # (M, R)

    def take(self, subsets: Sequence[int]) -> "Counterfactual":
        return Counterfactual(self.rows, self.masks[list(subsets)], self.losses[list(subsets)])


@dataclass
class FusedModel:
    kind: str
    channels: List[str]
    weights: np.ndarray
    scale: float = 1.0
    bias: float = 0.0
    supervision: str = ""
    history: List[float] = field(default_factory=list)
    counterfactual: Dict[str, object] = field(default_factory=dict)  # retrains used, and held-out LDS
    exact_caption: Dict[str, object] = field(default_factory=dict)  # the exact-caption rule: adopted, and why
    channel_set: Dict[str, object] = field(default_factory=dict)  # every channel or the final checkpoint's, and why

    @property
    def final_only(self) -> bool:
        """Whether the held-out choice kept the attributed checkpoint's channels only (queries then compute no
        trajectory channel)."""
        return self.channel_set.get("chosen") == "final"

    @property
    def exact_caption_first(self) -> bool:
        return bool(self.exact_caption.get("adopted"))

    @property
    def others_share(self) -> float:
        """On an exact-caption query, the factor on the other images' scores (1 unless the counterfactual targets
        chose less: see :func:`exact_caption_share`)."""
        return float(self.exact_caption.get("others_share", 1.0)) if self.exact_caption_first else 1.0

    def raw(self, values: Dict[str, np.ndarray]) -> np.ndarray:
        missing = [c for c in self.channels if c not in values]
        if missing:
            raise ScorerError(f"montrage: channels {missing} were fitted but are not available for these queries")
        return sum(np.float32(w) * feature(c, values[c]) for c, w in zip(self.channels, self.weights))

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-self.scale * (raw - self.bias)))).astype(np.float32)

    def used(self) -> Dict[str, float]:
        return {c: round(float(w), 6) for c, w in zip(self.channels, self.weights)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "weights": [float(w) for w in self.weights],
                "scale": self.scale, "bias": self.bias, "supervision": self.supervision,
                "counterfactual": self.counterfactual, "exact_caption": self.exact_caption,
                "channel_set": self.channel_set}

    @classmethod
    def from_json(cls, d: dict) -> "FusedModel":
        return cls(d["kind"], list(d["channels"]), np.asarray(d["weights"], np.float64), float(d["scale"]),
                   float(d["bias"]), d.get("supervision", ""), counterfactual=dict(d.get("counterfactual") or {}),
                   exact_caption=dict(d.get("exact_caption") or {}), channel_set=dict(d.get("channel_set") or {}))


def concept_membership(concepts: Optional[Sequence[str]], target: np.ndarray):
    """(members (L, N) bool, own (A,) index into members' rows or -1) for the concept term, or (None, None) with fewer
    than two concepts: a supervision row's own concept is that of its target-1 image."""
    import torch

    labels = sorted(set(concepts or []) - {""})
    if len(labels) < 2:
        return None, None
    members = torch.tensor(np.array([[c == lab for c in concepts] for lab in labels]))
    own = torch.tensor([labels.index(concepts[int(j)]) if row.max() >= 1.0 and concepts[int(j)] else -1
                        for row, j in zip(target, target.argmax(1))])
    return members, own


def objective(raw, cal, y, members, own, exemplar_out: bool = False):
    """The fit's objective without its regularisers: the attribution loss, plus the between-concept ranking term
    when there are concepts (on the raw combination: tried on the calibrated score (v7), it drove the sigmoid's scale
    to 10-40, so top scores saturated at 1.0 in float32 and tied). With ``exemplar_out`` (image-only kind), the
    concept term once more with each row's own image left out of the ranking: an image-only query may show a
    concept on something no training image shows (an artist's new work), so its concept must come first from the
    concept's other images too -- without it the fit weighs only what finds the exemplar (v15)."""
    from montrage.losses.attribution import attribution_loss, concept_ranking_loss

    loss = attribution_loss(raw, cal, y, temperature=RANK_TEMPERATURE)
    if members is not None:
        loss = loss + CONCEPT_WEIGHT * concept_ranking_loss(raw, members, own, temperature=CONCEPT_TEMPERATURE)
        if exemplar_out:
            without = raw.masked_fill(y >= 1.0, float(EXEMPLAR_OUT_FILL))
            loss = loss + CONCEPT_WEIGHT * concept_ranking_loss(without, members, own,
                                                                temperature=CONCEPT_TEMPERATURE)
    return loss


def fit(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
        concepts: Optional[Sequence[str]] = None, steps: int = FIT_STEPS, lr: float = 0.05,
        counterfactual: Optional[Counterfactual] = None) -> FusedModel:
    """Non-negative channel weights + calibration minimising the attribution loss on (A, N) supervision, plus
    (with training-image ``concepts``) the between-concept ranking term: each supervision query's own concept
    (that of its target-1 image) should have the best concept score; plus (with ``counterfactual``, 2+ retrained
    subsets) the LDS-style term on the calibrated scores of its rows."""
    import torch

    from montrage.losses.attribution import counterfactual_loss

    names = sorted(values)
    feats = torch.from_numpy(np.stack([feature(c, values[c]) for c in names])).double()  # (C, A, N)
    y = torch.from_numpy(target).double()
    members, own = concept_membership(concepts, target)
    use_cf = counterfactual is not None and len(counterfactual.masks) >= 2
    if use_cf:
        cf_rows = torch.from_numpy(np.asarray(counterfactual.rows, np.int64))
        cf_masks = torch.from_numpy(np.asarray(counterfactual.masks, np.float64))
        cf_losses = torch.from_numpy(np.asarray(counterfactual.losses, np.float64))
    theta = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, log_scale, bias], lr=lr)
    history = []
    for _ in range(steps):
        w = torch.nn.functional.softplus(theta)
        raw = torch.einsum("c,can->an", w, feats)
        cal = torch.sigmoid(log_scale.exp() * (raw - bias))
        loss = objective(raw, cal, y, members, own, kind == IMAGE) + WEIGHT_DECAY * (w ** 2).sum()
        if use_cf:
            loss = loss + COUNTERFACTUAL_WEIGHT * counterfactual_loss(cal[cf_rows], cf_masks, cf_losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    w = torch.nn.functional.softplus(theta).detach().numpy()
    return FusedModel(kind, names, w, float(log_scale.detach().exp()), float(bias.detach()), supervision, history)


def final_channels(names: Sequence[str], k: int) -> List[str]:
    """Of ``names``, the channels ``montrage-final`` computes at checkpoint index ``k``: no trajectory family, the
    representation similarity at k only, the TracIn term at k only."""
    def at_k(c: str) -> bool:
        if family(c) in TRAJECTORY_FAMILIES:
            return False
        if c.startswith("rep/"):
            return c.endswith("/sim-final")
        return not c.startswith("grad/tracin/k") or c == f"grad/tracin/k{k}"

    return [c for c in names if at_k(c)]


def heldout_objective(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, concepts: Sequence[str],
                      n_anchors: int, seed: int, folds: int = CHANNEL_SET_FOLDS) -> np.ndarray:
    """(folds,) the fit's objective on held-out anchors: the anchors split at random (``seed``) into ``folds``; fitted
    on every supervision row of the other anchors, scored on the held-out anchors' rows of the last supervision set.
    Rows are stacked per set, ``n_anchors`` per set."""
    import torch

    n_sets = len(target) // n_anchors
    perm = np.random.default_rng(seed).permutation(n_anchors)
    out = np.empty(folds)
    for f in range(folds):
        held = np.sort(perm[f::folds])
        kept = np.setdiff1d(np.arange(n_anchors), held)
        rows = np.concatenate([kept + s * n_anchors for s in range(n_sets)])
        model = fit({c: v[rows] for c, v in values.items()}, target[rows], kind, "", concepts)
        test = held + (n_sets - 1) * n_anchors
        raw = model.raw({c: v[test] for c, v in values.items()})
        y = target[test]
        members, own = concept_membership(concepts, y)
        with torch.no_grad():
            out[f] = float(objective(torch.from_numpy(raw).double(), torch.from_numpy(model.calibrate(raw)).double(),
                                     torch.from_numpy(y).double(), members, own, kind == IMAGE))
    return out


def choose_channel_set(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, concepts: Sequence[str],
                       n_anchors: int, k: int) -> Dict[str, object]:
    """Every channel, or the attributed checkpoint's only: whichever fits held-out anchors better (the lower mean of
    the fit's objective over the same CHANNEL_SET_REPEATS x CHANNEL_SET_FOLDS splits), recorded with the figures. With
    too few anchors to hold any out, every channel is kept."""
    names = sorted(values)
    final = final_channels(names, k)
    if not final or len(final) == len(names):
        return {"chosen": "all", "why": "no separate final-checkpoint channel set"}
    if n_anchors < 2 * CHANNEL_SET_FOLDS:
        return {"chosen": "all", "why": f"not measured ({n_anchors} anchors; needs {2 * CHANNEL_SET_FOLDS}+)"}
    if len(target) % n_anchors:
        return {"chosen": "all", "why": f"not measured ({len(target)} supervision rows are not sets of {n_anchors})"}
    loss = {name: np.concatenate([heldout_objective({c: values[c] for c in chans}, target, kind, concepts, n_anchors,
                                                    seed) for seed in range(CHANNEL_SET_REPEATS)])
            for name, chans in (("all", names), ("final", final))}
    diff = loss["final"] - loss["all"]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    chosen = "final" if diff.mean() < 0 else "all"
    a, f = float(loss["all"].mean()), float(loss["final"].mean())
    return {"chosen": chosen, "heldout_all": round(a, 4), "heldout_final": round(f, 4), "difference_se": round(se, 4),
            "channels_final": final,
            "why": (f"held-out objective {f:.3f} with the final checkpoint's channels, {a:.3f} with every channel "
                    f"(difference s.e. {se:.3f}; {CHANNEL_SET_REPEATS} x {CHANNEL_SET_FOLDS}-fold over the anchors)")}


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation, across subsets, of -(sum of the query's scores over the subset) with its loss under
    the model retrained on it (NaN where either is constant or there are fewer than 2 subsets). (Q, N), (M, N),
    (M, Q). The benchmark's LDS (``benchmarks.metrics.lds_per_query``) is this."""
    from scipy import stats

    pred = -(np.asarray(masks, np.float64) @ np.asarray(scores, np.float64).T)
    loss = np.asarray(losses, np.float64)
    out = np.full(pred.shape[1], np.nan)
    for q in range(pred.shape[1]):
        if len(pred) >= 2 and np.ptp(pred[:, q]) > 0 and np.ptp(loss[:, q]) > 0:
            out[q] = float(stats.spearmanr(pred[:, q], loss[:, q]).statistic)
    return out


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """D-TRAK's linear datamodeling score: the mean of :func:`lds_per_query`."""
    v = lds_per_query(scores, masks, losses)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def lifted_scores(model: FusedModel, rows: Dict[str, np.ndarray]) -> Tuple[np.ndarray, List[List[int]]]:
    """The calibrated scores of supervision rows with exact captions lifted (as the scorer lifts them), and per row
    the lifted images: what :func:`share_others` scales."""
    raw, lifted = exact_caption_first(model.raw(rows), rows["text/encoder"])
    return model.calibrate(raw), lifted


def scored_rows(model: FusedModel, rows: Dict[str, np.ndarray], share: float = 1.0) -> np.ndarray:
    """The model's scores of supervision rows for the counterfactual term's check: with ``share`` < 1, exact captions
    lifted and the other images' scores scaled; the calibrated scores alone otherwise (the check as it was before
    the share)."""
    if share == 1.0 or "text/encoder" not in rows:
        return model.calibrate(model.raw(rows))
    return share_others(*lifted_scores(model, rows), share)


def counterfactual_check(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
                         concepts: Sequence[str], cf: Counterfactual, plain: Optional[FusedModel] = None,
                         share: float = 1.0) -> Dict[str, object]:
    """Held-out LDS of the counterfactual term: fitted on one half of the retrained subsets, scored on the other
    half (both ways round), against the same model fitted without it -- never on subsets it was fitted on. Both
    are scored with the other images' ``share`` already chosen for the plain model, so the term is credited only
    with what the share does not already give."""
    m = len(cf.masks)
    out: Dict[str, object] = {"retrains": m, "weight": COUNTERFACTUAL_WEIGHT}
    if m < 4:
        out["heldout"] = "needs 4+ retrained subsets (2 to fit, 2 to score)"
        return out
    halves = (list(range(m // 2)), list(range(m // 2, m)))
    rows = {c: v[cf.rows] for c, v in values.items()}
    plain = plain or fit(values, target, kind, supervision, concepts)
    with_cf, without = [], []
    for a, b in ((0, 1), (1, 0)):
        model = fit(values, target, kind, supervision, concepts, counterfactual=cf.take(halves[a]))
        held = cf.take(halves[b])
        with_cf.append(lds_per_query(scored_rows(model, rows, share), held.masks, held.losses))
        without.append(lds_per_query(scored_rows(plain, rows, share), held.masks, held.losses))
    w, wo = np.concatenate(with_cf), np.concatenate(without)
    diff = (w - wo)[np.isfinite(w) & np.isfinite(wo)]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    out.update(heldout_lds_with=round(float(np.nanmean(w)), 4), heldout_lds_without=round(float(np.nanmean(wo)), 4),
               heldout_gain_se=round(se, 4),
               heldout="2-fold over the retrained subsets, on the run's generations of the anchors' captions")
    return out


def fit_with_counterfactual(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
                            concepts: Sequence[str], cf: Counterfactual, plain: Optional[FusedModel] = None,
                            share: float = 1.0) -> FusedModel:
    """The model with the counterfactual term if it raises the held-out LDS (by more than
    COUNTERFACTUAL_ADOPT_MARGIN; both scored with the other images' ``share``), else the plain fit; either way
    ``model.counterfactual`` says what was measured and decided. The choice is made on retrained subsets only, never
    on a benchmark."""
    plain = plain or fit(values, target, kind, supervision, concepts)
    check = counterfactual_check(values, target, kind, supervision, concepts, cf, plain, share)
    gain = (None if check.get("heldout_lds_with") is None
            else float(check["heldout_lds_with"]) - float(check["heldout_lds_without"]))
    se = float(check.get("heldout_gain_se", float("inf")))
    if gain is not None and gain > max(COUNTERFACTUAL_ADOPT_MARGIN, 2.0 * se):
        model = fit(values, target, kind, supervision + f"; counterfactual: losses of the generations under "
                    f"{len(cf.masks)} retrained subsets", concepts, counterfactual=cf)
        check.update(adopted=True, why=f"held-out LDS +{gain:.3f} (standard error {se:.3f}) with the term")
    else:
        model = plain
        check.update(adopted=False, why=("held-out LDS not measured" if gain is None else
                                         f"held-out LDS {gain:+.3f} with the term (standard error {se:.3f}; "
                                         f"adopted above +{COUNTERFACTUAL_ADOPT_MARGIN} and 2 standard errors)"))
    model.counterfactual = check
    return model


def load_counterfactual(ctx: ScoringContext, anchors: Sequence[int], n_rows: int) -> Optional[Counterfactual]:
    """The run's counterfactual targets (``montrage fit --retrains``) when they were measured on this checkpoint's
    generations of these anchors' captions, the last ``len(anchors)`` of ``n_rows`` supervision rows."""
    from montrage.storage import schema as S

    path = S.retrain_targets_path(ctx.store.run_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            masks, losses, got_anchors, step = z["masks"], z["losses"], list(z["anchors"]), int(z["step"])
    except (OSError, KeyError, ValueError) as exc:
        log.warning("montrage: counterfactual targets %s unreadable (%s); fitting without them", path, exc)
        return None
    if got_anchors != list(anchors) or step != int(ctx.store.steps[ctx.checkpoint]) or n_rows < len(anchors):
        return None  # measured for another checkpoint or anchor set
    return Counterfactual(np.arange(n_rows - len(anchors), n_rows), masks, losses)


def _counterfactual_fingerprint(ctx: ScoringContext) -> str:
    from montrage.storage import schema as S

    path = S.retrain_targets_path(ctx.store.run_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else ""


def supervision_anchors(store, seed: int = 0) -> List[int]:
    """The stored anchors the fit is supervised on (at most MAX_FIT_ANCHORS, evenly spread): also the images whose
    captions' generations the counterfactual targets measure."""
    idx = list(store.anchor_indices)
    if len(idx) > MAX_FIT_ANCHORS:
        pick = np.linspace(0, len(idx) - 1, MAX_FIT_ANCHORS).round().astype(int)
        idx = [idx[i] for i in pick]
    return idx


def supervision_values(ctx: ScoringContext, kind: str, final_only: bool, families: Sequence[str] = FAMILIES
                       ) -> Tuple[Dict[str, np.ndarray], np.ndarray, str]:
    """Channel values of the supervision queries and their targets (A, N)."""
    from montrage.analysis.gradients import training_images

    store = ctx.store
    anchors = supervision_anchors(store)
    if not anchors:
        raise ScorerError("montrage learns from anchors, but this run recorded none (CaptureConfig.anchors=0); "
                          "use montrage-unsupervised")
    n = len(store.train_meta["file_names"])
    target = supervision_targets(anchors, np.arange(n), store.concepts)
    captions = list(store.train_meta.get("captions") or [""] * n)
    try:
        ts = ctx.cached("grad/training_images", lambda: training_images(store))
        ctx.model  # noqa: B018  (the run's model must load to re-encode perturbed anchors)
    except (MontrageError, OSError) as exc:
        log.info("montrage: supervising with the stored anchor trajectories (%s)", exc)
        return stored_anchor_values(ctx, anchors, kind, final_only), target, "stored anchors (second noise draw)"
    sets = supervision_sets(ctx, ts.images[anchors], anchors, captions, kind)
    parts = []
    for q in sets:
        sub = _sub(ctx, q, query_mode="B")
        # class/concept apart: the classifier of every image has seen the anchors, so the rows get the cross-fit
        parts.append(channel_values(sub, kind, final_only, tuple(f for f in families if f != "class")))
        if ctx._model is None:
            ctx._model = sub._model
    names = sorted(set.intersection(*[set(p) for p in parts]))
    values = {c: np.concatenate([p[c] for p in parts]) for c in names}
    if "class" in families and kind == IMAGE:
        values.update(_try("class/cross-fit", lambda: {
            "class/concept": crossfitted_class_channel(ctx, ts.images, anchors, sets)}, ctx))
    how = (f"{len(anchors)} anchors x {len(sets)}: "
           + ("perturbed copies (full-strength shift, colour jitter, noise), " if kind == IMAGE else "")
           + "near-copies (strength 0.1-0.6)"
           + (", generations of their captions at the attributed checkpoint" if sets[-1].ids[0].startswith("generation")
              else "")
           + ("; prompts: captions with one word dropped (near-copies), the caption (generations)" if kind == PROMPT
              else "")
           + "; concept labels")
    return values, np.concatenate([target] * len(sets)), how


def crossfitted_class_channel(ctx: ScoringContext, train_images: np.ndarray, anchors: Sequence[int],
                              sets: Sequence[QuerySet]) -> np.ndarray:
    """``class/concept`` of the supervision rows (sets stacked, each in anchor order), each row from a classifier
    trained without its anchor; the fold classifiers are kept in the run cache (they depend on the images only)."""
    from montrage.analysis.concept_classifier import concept_labels, crossfitted_channel

    concepts = list(ctx.store.concepts)
    concept_labels(concepts)  # as for the classifier of every image: no channel (a fold alone gives constant rows)
    return crossfitted_channel(train_images, concepts, anchors, np.concatenate([q.images for q in sets]),
                               np.concatenate([list(anchors)] * len(sets)),
                               trained=ctx.run_cache.setdefault("fused/classifier/folds", {}))


def supervision_sets(ctx: ScoringContext, images: np.ndarray, anchors: Sequence[int], captions: Sequence[str],
                     kind: str) -> List[QuerySet]:
    """The supervision queries, each targeting its anchor: the queries users bring, of this kind, made from the run
    itself -- perturbed copies (full strength: image-only kind; near-copies: both kinds, so the model sees both what
    pixels can and cannot match) and the run's own generations of the anchors' captions at the attributed checkpoint
    (fresh seeds: what a generation of a training caption looks like), always last. No benchmark query or label
    is used."""
    store = ctx.store
    concepts = [store.concepts[i] for i in anchors]
    n = len(anchors)

    def qset(tag: str, imgs: np.ndarray, prompts: Sequence[str], offset: int) -> QuerySet:
        return QuerySet(ids=[f"{tag}-{i}" for i in anchors], images=imgs, prompts=list(prompts), seeds=[None] * n,
                        item_seeds=[FIT_SEED_OFFSET + offset + i for i in anchors], concepts=concepts)

    out = []
    if kind == IMAGE:
        # full-strength copies only for image-only queries (a perturbed copy given alone is a query users bring); a
        # prompt-known query is a generation of (or an image given with) its prompt: fitted on copies with a
        # word-dropped caption, the prompt model learnt to trust pixels over the prompt, and lost new compositions
        # (typefaces .84 / .88 with them, 1.00 / 1.00 without; model version 10)
        out.append(qset("anchor", perturb(images, seed=1234), [""] * n, 0))
    rng = np.random.default_rng(4322)
    strength = np.random.default_rng(99).uniform(0.1, 0.6, n)
    out.append(qset("near-copy", perturb(images, seed=1235, strength=strength),
                    [augment_prompt(captions[i], rng) if kind == PROMPT else "" for i in anchors], 50_000))
    try:
        gen = supervision_generations(ctx, anchors, captions)
    except (MontrageError, OSError, ValueError) as exc:
        log.info("montrage: no generated supervision (%s)", exc)
        return out
    out.append(qset("generation", gen, [captions[i] if kind == PROMPT else "" for i in anchors], 60_000))
    return out


def supervision_generations(ctx: ScoringContext, anchors: Sequence[int], captions: Sequence[str]) -> np.ndarray:
    """The run's own generations of the anchors' captions at the attributed checkpoint (fixed fresh seeds): the
    generation supervision set, and the images whose losses under retrained LoRAs are the counterfactual targets."""
    from montrage.models.sampling import generate

    cap = ctx.store.capture or {}
    return ctx.cached(f"fused/supervision-generations/{ctx.checkpoint}", lambda: generate(
        ctx.components_at(ctx.checkpoint), [captions[i] for i in anchors],
        [FIT_SEED_OFFSET + 77_000 + i for i in anchors], int(cap.get("probe_steps") or 25),
        float(cap.get("guidance_scale") or 1.5), sampler=str(cap.get("probe_sampler") or "ddim")))


def stored_anchor_values(ctx: ScoringContext, anchors: Sequence[int], kind: str, final_only: bool
                         ) -> Dict[str, np.ndarray]:
    """Representation channels of the anchors as recorded during training (no model needed)."""
    from montrage.analysis.trajectories import Dynamics, QueryTrajectory, anchor_trajectory

    store = ctx.store
    pos = [store.anchor_indices.index(i) for i in anchors]
    out: Dict[str, np.ndarray] = {}
    for cond in (("null", "caption") if kind == PROMPT else ("null",)):
        if cond not in store.conditions:
            continue
        dyn = ctx.cached(f"dyn/{cond}/{ctx.checkpoint}/sim,move,loss",
                         lambda: Dynamics(store, cond, ctx.checkpoint, ("sim", "move", "loss")))
        qa = anchor_trajectory(store, cond, ctx.checkpoint)
        qa = QueryTrajectory({m: v[:, pos] for m, v in qa.features.items()}, qa.losses[:, pos])
        for g, mask in _rep_groups(dyn, final_only).items():
            out[f"rep/{cond}/{g}"] = dyn.score(qa, mask / mask.sum())
    return out


def exact_caption_check(model: FusedModel, values: Dict[str, np.ndarray], target: np.ndarray, n_generated: int
                        ) -> Dict[str, object]:
    """Whether the exact-caption rule helps on the fit's own generated supervision (the last ``n_generated`` rows:
    the anchors' captions as prompts): R@1 of the anchor with and without it; adopted unless it lowers R@1."""
    if "text/encoder" not in values or n_generated < 1:
        return {"adopted": False, "why": "no text-encoder channel or no generated supervision"}
    rows = slice(len(target) - n_generated, len(target))
    raw = model.raw({c: v[rows] for c, v in values.items()})
    lifted, which = exact_caption_first(raw, values["text/encoder"][rows])
    before, after = recall_at_1(raw, target[rows]), recall_at_1(lifted, target[rows])
    return {"adopted": after >= before and any(which), "supervision_r1": [round(before, 4), round(after, 4)],
            "rows": n_generated}


def exact_caption_share(model: FusedModel, values: Dict[str, np.ndarray], cf: Counterfactual,
                        shares: Sequence[float] = EXACT_CAPTION_SHARES,
                        refit: Optional[Callable[[Sequence[int]], FusedModel]] = None) -> Dict[str, object]:
    """The share of the other images' scores on an exact-caption query, chosen on the counterfactual targets (whose
    rows are the run's generations of its anchors' captions: exact-caption queries by construction). Held out like
    the counterfactual term: the share is picked on one half of the retrained subsets and its LDS read on the other
    (both ways round), against share 1; a share below 1 is kept only if that held-out gain exceeds
    COUNTERFACTUAL_ADOPT_MARGIN and two standard errors. Then the share best on all subsets is used. ``refit(subsets)``
    gives the model fitted on those subsets only, when the model itself was fitted to the targets (the
    counterfactual term), so that the scored half stays unseen."""
    m = len(cf.masks)
    out: Dict[str, object] = {"others_share": 1.0, "shares_tried": [float(x) for x in shares]}
    if m < 4 or "text/encoder" not in values:
        out["share_why"] = ("needs 4+ retrained subsets (2 to pick, 2 to score)" if m < 4
                            else "no text-encoder channel")
        return out
    rows = {c: v[cf.rows] for c, v in values.items()}

    def shared(fitted: FusedModel) -> Dict[float, np.ndarray]:
        cal, lifted = lifted_scores(fitted, rows)
        return {x: share_others(cal, lifted, x) for x in shares}

    def per_query(scored: Dict[float, np.ndarray], x: float, take: Sequence[int]) -> np.ndarray:
        held = cf.take(take)
        return lds_per_query(scored[x], held.masks, held.losses)

    halves = (list(range(m // 2)), list(range(m // 2, m)))
    picked, kept, base = [], [], []
    for a, b in ((0, 1), (1, 0)):
        fold = shared(refit(halves[a]) if refit is not None else model)
        best = max(shares, key=lambda x: (np.nanmean(per_query(fold, x, halves[a])), x))
        picked.append(float(best))
        kept.append(per_query(fold, best, halves[b]))
        base.append(per_query(fold, 1.0, halves[b]))
    k, b0 = np.concatenate(kept), np.concatenate(base)
    diff = (k - b0)[np.isfinite(k) & np.isfinite(b0)]
    gain = float(diff.mean()) if len(diff) else 0.0
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    per = shared(model)
    lds_all = {x: float(np.nanmean(per_query(per, x, range(m)))) for x in shares}
    best_all = float(max(shares, key=lambda x: (lds_all[x], x)))
    adopt = best_all < 1.0 and gain > max(COUNTERFACTUAL_ADOPT_MARGIN, 2.0 * se)
    out.update(others_share=best_all if adopt else 1.0, heldout_picked=picked, heldout_lds_gain=round(gain, 4),
               heldout_gain_se=round(se, 4), lds_by_share={str(x): round(v, 4) for x, v in lds_all.items()},
               share_why=(f"share {best_all:g} of the other images: held-out LDS {gain:+.3f} (standard error "
                          f"{se:.3f}) over share 1, picked on the other half of the {m} retrained subsets" if adopt
                          else f"share 1 kept: held-out LDS {gain:+.3f} (standard error {se:.3f}) for the share "
                          f"picked on the other half; adopted above +{COUNTERFACTUAL_ADOPT_MARGIN} and 2 standard "
                          f"errors"))
    return out


def downsample(images: np.ndarray, side: int = MEMO_SIDE) -> np.ndarray:
    """(B, H, W, C) uint8 -> float32 in [0, 1], block-averaged by the smallest integer factor that brings the
    larger side to at most ``side`` (memorisation is a question about the picture, not its finest pixels)."""
    x = np.asarray(images, np.float32) / 255.0
    f = max(1, int(np.ceil(max(x.shape[1:3]) / side)))
    if f > 1:
        h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
        x = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f, x.shape[3]).mean((2, 4))
    return x.reshape(len(x), -1)


def reproduces(generations: np.ndarray, training: np.ndarray, sources: Sequence[int]) -> np.ndarray:
    """Per generation of a training caption, whether it reproduces its source image (``sources[j]``): the source is
    its nearest training image and closer than MEMO_RATIO x the mean distance to the next MEMO_NEIGHBOURS."""
    if generations.shape[1:] != training.shape[1:]:
        raise ScorerError(f"generations {generations.shape[1:]} and training images {training.shape[1:]} differ in "
                          "shape; generate at the run's resolution")
    from scipy.spatial.distance import cdist

    g, t = downsample(generations), downsample(training)
    dist = cdist(g, t) / np.sqrt(g.shape[1])  # RMS per pixel value
    out = np.zeros(len(g), bool)
    for j, src in enumerate(sources):
        others = np.sort(np.delete(dist[j], int(src)))[:MEMO_NEIGHBOURS]
        out[j] = len(others) > 0 and dist[j, src] < others[0] and dist[j, src] < MEMO_RATIO * others.mean()
    return out


def memorised_share(ctx: ScoringContext, anchors: Sequence[int]) -> Dict[str, object]:
    """The other images' share on an exact-caption query read from the run itself (no retrains): 0 when at least
    MEMO_FRACTION of its generations of the anchors' captions reproduce their images (a generation of a training
    caption then owes its loss to that caption's image, as the retrains of such runs showed), else 1; not measured
    (share left at 1) when the run's model or training images cannot be loaded."""
    from montrage.analysis.gradients import training_images

    try:
        ts = ctx.cached("grad/training_images", lambda: training_images(ctx.store))
        captions = list(ctx.store.train_meta.get("captions") or [])
        hit = reproduces(supervision_generations(ctx, anchors, captions), ts.images, anchors)
    except (MontrageError, OSError, ValueError) as exc:
        return {"memorised": None, "memorised_why": f"not measured ({exc})"}
    rate = float(hit.mean()) if len(hit) else 0.0
    share = 0.0 if rate >= MEMO_FRACTION else 1.0
    return {"memorised": [int(hit.sum()), int(len(hit))], "memorised_share": share,
            "memorised_why": (f"{int(hit.sum())} of {len(hit)} of the run's generations of its anchors' captions "
                              f"reproduce their image (nearest, and under {MEMO_RATIO:g} x the mean distance to the "
                              f"next {MEMO_NEIGHBOURS}); share {share:g} "
                              + (f"(at least {MEMO_FRACTION:g} reproduce)" if share == 0.0
                                 else f"(fewer than {MEMO_FRACTION:g} reproduce)"))}


def _model_path(ctx: ScoringContext, name: str, kind: str):
    store = ctx.store
    targets = _counterfactual_fingerprint(ctx) if kind == PROMPT else ""
    ident = json.dumps([MODEL_VERSION, name, kind, int(store.steps[ctx.checkpoint]), store.n_checkpoints,
                        supervision_anchors(store), sorted((k, str(v)) for k, v in ctx.options.items()
                                                if k in ("proj_dim", "proj_seed", "grad_timesteps", "dtrak_lambda"))]
                       + ([CHECKPOINT_ONLY_OPTION] if ctx.options.get(CHECKPOINT_ONLY_OPTION) else [])
                       + ([COUNTERFACTUAL_RULE, targets] if kind == PROMPT and targets else []))
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return store.run_dir / "montrage-models" / f"{name}-{kind}-{key}.json"


def fitted_model(ctx: ScoringContext, name: str, kind: str, final_only: bool, choose: bool = False) -> FusedModel:
    """The fitted model of one query kind: from the context cache, the run folder, or fitted now (and saved). With
    ``choose``, the channel set (every channel, or the final checkpoint's) is chosen on held-out anchors first."""
    def make() -> FusedModel:
        path = _model_path(ctx, name, kind)
        if path.is_file():
            try:
                return FusedModel.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError):
                pass
        values, target, how = supervision_values(ctx, kind, final_only, scored_families(ctx))
        cf = (load_counterfactual(ctx, supervision_anchors(ctx.store), len(target))
              if kind == PROMPT and "generations" in how else None)
        concepts, n_anchors = ctx.store.concepts, len(supervision_anchors(ctx.store))
        channel_set = (choose_channel_set(values, target, kind, concepts, n_anchors, ctx.checkpoint)
                       if choose and not final_only else {})
        if channel_set.get("chosen") == "final":
            values = {c: values[c] for c in channel_set["channels_final"]}
        model = fit(values, target, kind, how, concepts)
        if kind == PROMPT and "generations" in how:
            model.exact_caption = exact_caption_check(model, values, target, n_anchors)
            if model.exact_caption_first:  # what the run memorised; it sets the share unless retrains are there
                memo = memorised_share(ctx, supervision_anchors(ctx.store))
                model.exact_caption.update(memo)
                if cf is None and memo.get("memorised_share") is not None:
                    model.exact_caption.update(others_share=memo["memorised_share"], share_why=memo["memorised_why"])
        if cf is not None:
            # the share first, on the plain model (it moves no weight, so it costs no other query); the term is
            # then adopted only for a held-out gain beyond what the share gives
            if model.exact_caption_first:
                model.exact_caption.update(exact_caption_share(model, values, cf))
            plain = model
            model = fit_with_counterfactual(values, target, kind, how, concepts, cf, plain, plain.others_share)
            if model is not plain:
                model.exact_caption = exact_caption_check(model, values, target, n_anchors)
                model.exact_caption.update({k: v for k, v in plain.exact_caption.items() if k.startswith("memorised")})
                if model.exact_caption_first:
                    model.exact_caption.update(exact_caption_share(model, values, cf, refit=lambda take: fit(
                        values, target, kind, how, concepts, counterfactual=cf.take(take))))
        model.channel_set = channel_set
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(model.to_json(), indent=1))
            tmp.replace(path)
        except OSError as exc:
            log.info("montrage: fitted model not saved (%s)", exc)
        return model

    return ctx.cached(f"fused/model/{name}/{kind}/{ctx.checkpoint}", make)


# ---------------------------------------------------------------------------------------------- the scorer
@dataclass
class FusedScorer:
    name: str
    description: str
    final_only: bool = False  # the attributed checkpoint's channels only, always (the dynamics ablation)
    choose_channels: bool = False  # every channel or the final checkpoint's, chosen per run on held-out anchors

    def model(self, ctx: ScoringContext, kind: str) -> FusedModel:
        return fitted_model(ctx, self.name, kind, self.final_only, self.choose_channels)

    def _score_kind(self, ctx: ScoringContext, idx: List[int], kind: str, prompts: Sequence[str]
                    ) -> Tuple[np.ndarray, FusedModel, List[List[int]]]:
        model = self.model(ctx, kind)
        families = {family(c) for c in model.channels}
        if model.exact_caption_first:
            families.add("text")
        values = channel_values(_sub(ctx, subset(ctx.queries, idx, prompts)), kind,
                                self.final_only or model.final_only, tuple(families))
        raw, lifted = model.raw(values), [[] for _ in idx]
        if model.exact_caption_first and "text/encoder" in values:
            raw, lifted = exact_caption_first(raw, values["text/encoder"])
        return raw, model, lifted

    def _raw(self, ctx: ScoringContext, prompts: Sequence[str]) -> Tuple[np.ndarray, List[dict]]:
        n = len(ctx.store.train_meta["file_names"])
        raw = np.zeros((len(prompts), n), np.float32)
        info: List[dict] = [{} for _ in prompts]
        for kind in (PROMPT, IMAGE):
            idx = [i for i, p in enumerate(prompts) if query_kind(p) == kind]
            if not idx:
                continue
            r, model, lifted = self._score_kind(ctx, idx, kind, [prompts[i] for i in idx])
            raw[idx] = r
            for i, lift in zip(idx, lifted):
                info[i] = {"query_kind": kind, "channels": model.used()}
                if model.channel_set.get("chosen"):  # montrage: the channel set held-out anchors chose, and why
                    info[i].update(channel_set=model.channel_set["chosen"],
                                   channel_set_why=str(model.channel_set.get("why") or ""))
                if kind == PROMPT:
                    info[i]["exact_caption_first"] = lift
        return raw, info

    def score(self, ctx: ScoringContext) -> np.ndarray:
        q = ctx.queries
        concept = ctx.options.get("concept")
        if isinstance(concept, str) and concept.strip():
            from montrage.losses.concept import concept_prompts

            pairs = [concept_prompts(p, concept.strip()) for p in q.prompts]
            with_c, info = self._raw(ctx, [c for c, _ in pairs])
            without, _ = self._raw(ctx, [m for _, m in pairs])
            for i, (c, m) in enumerate(pairs):
                info[i] = {**info[i], "concept_prompts": [c, m]}
            ctx.options["_query_info"] = info
            return (with_c - without).astype(np.float32)
        raw, info = self._raw(ctx, list(q.prompts))
        ctx.options["_query_info"] = info
        out = np.empty_like(raw)
        for kind in (PROMPT, IMAGE):
            idx = [i for i, p in enumerate(q.prompts) if query_kind(p) == kind]
            if idx:
                model = self.model(ctx, kind)
                lifted = [info[i].get("exact_caption_first") or [] for i in idx]
                cal = model.calibrate(raw[idx])
                out[idx] = share_others(cal, lifted, model.others_share)
                if model.others_share != 1.0:
                    for i, lift, row in zip(idx, lifted, cal):
                        if lift:
                            info[i]["others_share"] = model.others_share
                            info[i]["others_share_why"] = str(model.exact_caption.get("share_why") or "")
                            # a share of 0 ties the other images: listed in the model's own order all the same
                            info[i]["_order"] = np.argsort(-row, kind="stable")
        return out


register("montrage")(lambda: FusedScorer(
    "montrage", "the fused attribution model: representation trajectories (null prompt, and the query's prompt when "
    "known), co-movement, loss co-descent, gradient kernels per checkpoint (D-TRAK, TracIn terms) and pixels, "
    "per-query standardised, weights fitted per query kind (prompt / image only) with the attribution loss; per "
    "run and kind, every channel or the final checkpoint's only, whichever fits held-out anchors better",
    choose_channels=True))
register("montrage-all")(lambda: FusedScorer(
    "montrage-all", "the fused model with every channel, trajectory included, never reduced to the final "
    "checkpoint's: the dynamics ablation's 'with' side"))
register("montrage-final")(lambda: FusedScorer(
    "montrage-final", "the fused model restricted to the attributed checkpoint (no trajectory channels): the "
    "dynamics ablation's 'without' side", final_only=True))
