"""The fit's supervision, made from the run itself: its anchor images perturbed and its own generations of their
captions, scored as queries, with targets from the anchors and concept labels; the counterfactual targets of
``montrage fit --retrains``; and how much the run memorised (the exact-caption share without retrains)."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.analysis.base import QuerySet, ScoringContext
from montrage.analysis.fused.channels import channel_values, rep_groups, sub_context, try_family
from montrage.analysis.fused.fit import Counterfactual
from montrage.analysis.fused.kinds import FAMILIES, IMAGE, PROMPT
from montrage.analysis.model import supervision_targets
from montrage.errors import MontrageError, ScorerError

log = logging.getLogger(__name__)

MAX_FIT_ANCHORS = 32
FIT_SEED_OFFSET = 700_000  # noise draws of the perturbed anchors (distinct from probes / training queries)
# Without retrains, the share is read from how much the run memorised: a generation of a training caption reproduces
# its image when that image is its nearest training image (pixels, RMS, at most MEMO_SIDE px a side) and closer
# than MEMO_RATIO x the mean distance to the next MEMO_NEIGHBOURS (the ratio test of memorisation studies, e.g.
# Carlini et al. 2023, on the run's own generations); when at least MEMO_FRACTION of them do, share 0.
MEMO_RATIO = 0.5
MEMO_NEIGHBOURS = 5
MEMO_FRACTION = 0.5
MEMO_SIDE = 64


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
        sub = sub_context(ctx, q, query_mode="B")
        # class/concept apart: the classifier of every image has seen the anchors, so the rows get the cross-fit
        parts.append(channel_values(sub, kind, final_only, tuple(f for f in families if f != "class")))
        if ctx._model is None:
            ctx._model = sub._model
    names = sorted(set.intersection(*[set(p) for p in parts]))
    values = {c: np.concatenate([p[c] for p in parts]) for c in names}
    if "class" in families and kind == IMAGE:
        values.update(try_family("class/cross-fit", lambda: {
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
        for g, mask in rep_groups(dyn, final_only).items():
            out[f"rep/{cond}/{g}"] = dyn.score(qa, mask / mask.sum())
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
