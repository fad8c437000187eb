"""Gradient features recorded with the run: training-side gradients computed once, then only read.

At stored checkpoints, the projected per-sample LoRA gradients of every training image (its caption,
fixed per-image noise = ``TRAIN_SEED_OFFSET + i`` at the run's capture timesteps) for the two output
functions the gradient scorers use: ``sqnorm`` (D-TRAK) and ``denoise`` (TracIn, the training loss).
They are stored per timestep as float16 unit vectors plus float32 norms
(``train/gradients/<output>``, ``train/gradient_norms/<output>``; see :mod:`montrage.storage.schema`), so
per-timestep normalisation (TracIn, Concept-TRAK) reads the unit vectors and D-TRAK the raw
``unit x norm``. A query then costs its own gradients plus a product, never a pass over the training set.

Written by ``montrage featurize RUN`` (resumable: rows are committed in blocks) or on first use by a
gradient scorer; the settings (timesteps, noise seed, projection dimension/seed/device type, LoRA layout)
are recorded with them, and features are reused only when a scorer asks for the same settings (other
``proj_dim`` options are computed in memory as before). First use and later reads return the same
(stored, float16-rounded) numbers, so scores do not change between the first and the second call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from montrage.analysis.base import QuerySet, ScoringContext
from montrage.analysis.gradient_scorers import (GradientSettings, checkpoint_components, projector,
                                               tracin_checkpoints)
from montrage.analysis.gradients import Projector, projected_gradients, projected_gradients_shared, training_images
from montrage.errors import ScorerError, StoreError
from montrage.models.features import TRAIN_SEED_OFFSET
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.storage.store import GradientFeatures

log = logging.getLogger(__name__)

STORED_OUTPUTS = ("sqnorm", "denoise")
FEATURE_VERSION = 1  # bump when what is stored changes meaning


def _lora_layout(store: RunStore) -> str:
    attrs = store.root[S.LORA].attrs
    blob = json.dumps([attrs.get(S.ATTR_PARAM_NAMES), attrs.get(S.ATTR_PARAM_SHAPES)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def feature_settings(ctx: ScoringContext, s: GradientSettings) -> dict:
    """What identifies stored features: reused only when a scorer asks for exactly these."""
    import torch

    return {"version": FEATURE_VERSION, "timesteps": [int(t) for t in s.timesteps], "noise_seed": int(s.noise_seed),
            "proj_dim": int(s.proj_dim), "proj_seed": int(s.proj_seed),
            "projection": Projector.KIND, "projection_device": torch.device(ctx.device).type,
            "lora": _lora_layout(ctx.store),
            "train_seed_offset": int(TRAIN_SEED_OFFSET), "prompts": "captions"}


def _stored(ctx: ScoringContext, output: str) -> Optional[GradientFeatures]:
    return GradientFeatures(ctx.store, output) if isinstance(ctx.store, RunStore) else None


def _compute(ctx: ScoringContext, k: int, outputs: Sequence[str], s: GradientSettings, rows: slice
             ) -> Dict[str, np.ndarray]:
    """Projected training gradients of rows ``rows`` at checkpoint k for each output; several outputs share one
    forward pass per item (:func:`~montrage.analysis.gradients.projected_gradients_shared`)."""
    ts = ctx.cached("grad/training_images", lambda: training_images(ctx.store))
    comps = checkpoint_components(ctx, k)
    idx = range(len(ts))[rows]
    args = (comps, ts.images[rows], list(ts.captions[rows]), [TRAIN_SEED_OFFSET + i for i in idx])
    kw = dict(timesteps=s.timesteps, noise_seed=s.noise_seed, projector=projector(ctx, comps, s),
              batch_size=s.batch_size, progress=ctx.progress)
    if len(outputs) == 1:
        return {outputs[0]: projected_gradients(*args, output=outputs[0], **kw)}
    return projected_gradients_shared(*args, outputs=list(outputs), **kw)[0]


def _fill(ctx: ScoringContext, gfs: Dict[str, GradientFeatures], k: int, s: GradientSettings) -> None:
    """Compute and store the rows of checkpoint k not written yet, for each output in ``gfs`` (in blocks: an
    interruption loses one block). Outputs written up to the same row take their next block in one shared pass."""
    n = len(ctx.store.train_meta[S.ATTR_FILE_NAMES])
    block = S.GRADIENT_ROWS_PER_CHUNK
    while True:
        todo = {o: d for o, gf in gfs.items() if (d := gf.rows_done().get(k, 0)) < n}
        if not todo:
            return
        start = min(todo.values())
        group = [o for o, d in todo.items() if d == start]
        got = _compute(ctx, k, group, s, slice(start, min(n, start + block)))
        for o in group:
            g = got[o].astype(np.float64)
            norms = np.linalg.norm(g, axis=-1)
            gfs[o].write(k, start, g / np.where(norms > 0, norms, 1.0)[..., None], norms)


def stored_features(ctx: ScoringContext, k: int, output: str, s: GradientSettings) -> Optional[np.ndarray]:
    """(N, T, D) float32 training gradients at checkpoint k as stored with these settings; None when the run
    holds none complete for them."""
    gf = _stored(ctx, output)
    if gf is None or gf.settings() != feature_settings(ctx, s) or not gf.complete(k):
        return None
    unit, norms = gf.read(k)
    return unit * norms[..., None]


def train_features(ctx: ScoringContext, k: int, output: str, s: GradientSettings) -> np.ndarray:
    """(N, T, D) float32 projected training gradients at checkpoint k: read from the store when recorded
    with these settings; else computed, stored (first use) and read back; else (other settings, a read-only
    run, a store-like object) computed in memory."""
    gf = _stored(ctx, output)
    if gf is None:
        return _compute(ctx, k, [output], s, slice(None))[output]
    want = feature_settings(ctx, s)
    have = gf.settings()
    if have == want and gf.complete(k):
        unit, norms = gf.read(k)
        return unit * norms[..., None]
    if have not in (None, want) or not ctx.options.get("store_gradients", True):
        return _compute(ctx, k, [output], s, slice(None))[output]
    try:
        gf.prepare(want, ctx.store.n_checkpoints, len(s.timesteps), s.proj_dim)
        _fill(ctx, {output: gf}, k, s)
    except (OSError, StoreError) as exc:  # e.g. a read-only run folder: still answer, without storing
        log.warning("could not store %s gradient features in %s (%s); computing them in memory", output,
                    ctx.store.run_dir, exc)
        return _compute(ctx, k, [output], s, slice(None))[output]
    unit, norms = gf.read(k)
    return unit * norms[..., None]


def default_checkpoints(store: RunStore) -> List[int]:
    """The checkpoints the gradient scorers read at the last step: TracIn's 1..K (D-TRAK's K among them)."""
    return tracin_checkpoints(store.n_checkpoints - 1)


def featurize(run_dir, outputs: Sequence[str] = STORED_OUTPUTS, checkpoints: Optional[Sequence[int]] = None,
              options: Optional[dict] = None, device: str = "cpu", overwrite: bool = False,
              progress: bool = True) -> Dict[str, dict]:
    """Compute and store the gradient features of a run (resumable; already complete checkpoints are skipped).
    The outputs are computed together: one forward pass per training item gives every output's gradient.

    Returns per output: checkpoints, stored bytes, settings, and ``seconds``: the time of the whole call, the same
    for every output (they share their passes). ``options`` are the gradient scorers' (``proj_dim``,
    ``proj_seed``, ``grad_timesteps``, ``grad_batch_size``).
    """
    store = RunStore.open(run_dir)
    if store.n_checkpoints == 0:
        raise ScorerError(f"{run_dir} has no committed checkpoint to featurize")
    unknown = [o for o in outputs if o not in STORED_OUTPUTS]
    if unknown:
        raise ScorerError(f"unknown gradient output(s) {unknown}; stored outputs are {list(STORED_OUTPUTS)}")
    empty = QuerySet(ids=[], images=np.zeros((0, 1, 1, 3), np.uint8), prompts=[], seeds=[], item_seeds=[])
    ctx = ScoringContext(store=store, queries=empty, checkpoint=store.n_checkpoints - 1, device=device,
                         progress=progress, options=dict(options or {}))
    s = GradientSettings.from_ctx(ctx)
    ks = list(default_checkpoints(store) if checkpoints is None else checkpoints)
    bad = [k for k in ks if not 0 <= int(k) < store.n_checkpoints]
    if bad:
        raise ScorerError(f"checkpoint index(es) {bad} out of range: {store.n_checkpoints} committed checkpoints")
    t0 = time.perf_counter()
    gfs = {o: GradientFeatures(store, o) for o in dict.fromkeys(outputs)}
    for gf in gfs.values():
        gf.prepare(feature_settings(ctx, s), store.n_checkpoints, len(s.timesteps), s.proj_dim, overwrite=overwrite)
    for k in ks:
        _fill(ctx, gfs, int(k), s)
    seconds = time.perf_counter() - t0
    return {o: {"checkpoints": [int(k) for k in ks], "seconds": seconds, "bytes": gf.nbytes(),
                "settings": gf.settings()} for o, gf in gfs.items()}
