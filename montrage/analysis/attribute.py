"""Run a scorer on a run's queries and produce the stable JSON contract.

JSON contract (``montrage attribute --out FILE.json``)::

    {"run": str, "method": str, "checkpoint": int (training step), "condition": "null"|"caption",
     "concept": str|null (Concept-TRAK's phrase), "score_path": "attribution/<method>/<step>/<query_set>",
     "queries": [{"id": str, "prompt": str, "seed": int|null, "image": str|null,
                  "concept_scores": {concept: score}, "concept_proportions": {concept: share},
                  "predicted_concept": str|null,
                  "query_kind": "prompt"|"image", "channels": {channel: weight}|null,
                  "top": [{"train_index": int, "file_name": str, "concept": str, "score": float}]}]}

``concept_scores`` aggregate a concept's training images (mean of its top-3 scores); proportions are
the softmax of those scores in units of the query's score spread over all training images (shares for
mixed prompts; every concept keeps a positive share, see :func:`proportions`).
``query_kind`` is "prompt" when the query carries a prompt, else "image"; ``channels`` are the channels and
fitted weights the fused ``montrage`` / ``montrage-final`` model used for that query (its fitted model for
that query kind; null for other methods). The fused model adds, per prompt-known query, ``exact_caption_first``
(training images ranked first because their caption is the prompt), ``others_share`` and ``others_share_why`` (when the
run's counterfactual targets, or without them its memorisation test, chose to scale the other images' scores on such
a query) and, for a ``--concept`` query,
``concept_prompts`` (the prompt with and without the concept).
The full (query x train) matrix is written to the store at ``score_path`` (``<query_set>`` is the query set's
key, so scores of other query sets at the same step are kept; ``RunStore.attributions()`` lists them).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from montrage.analysis.base import QuerySet, ScoringContext, get_scorer
from montrage.analysis.queries import image_queries, probe_queries
from montrage.storage import RunStore
from montrage.storage import schema as S

log = logging.getLogger(__name__)
TOP_PER_CONCEPT = 3


def concept_scores(scores: np.ndarray, concepts: List[str], top: int = TOP_PER_CONCEPT) -> Dict[str, np.ndarray]:
    """Per concept, the mean of each query's ``top`` best scores among that concept's images: {c: (Q,)}."""
    out = {}
    arr = np.asarray(concepts)
    for c in sorted(set(concepts) - {""}):
        cols = np.flatnonzero(arr == c)
        sub = np.sort(scores[:, cols], axis=1)[:, ::-1][:, : min(top, len(cols))]
        out[c] = sub.mean(1)
    return out


def proportions(per_concept: Dict[str, float], scale: Optional[float] = None) -> Dict[str, float]:
    """Shares of the concepts for one query: softmax of its concept scores in units of ``scale``.

    ``scale`` is the spread (std) of the query's scores over all training images (given by
    :func:`build_payload`; default: the spread of the concept scores). Every concept keeps a positive share
    (the weakest is not forced to 0, as min-shifting did), equal scores get equal shares, and the result
    does not depend on a method's score offset or units.
    """
    if not per_concept:
        return {}
    vals = np.array(list(per_concept.values()), dtype=np.float64)
    if not np.isfinite(vals).all():
        vals = np.nan_to_num(vals, nan=np.nanmin(vals) if np.isfinite(vals).any() else 0.0)
    s = float(scale) if scale is not None and np.isfinite(scale) and scale > 0 else float(vals.std())
    if s <= 0:
        return {c: 1.0 / len(vals) for c in per_concept}
    e = np.exp((vals - vals.max()) / s)
    return {c: float(v) for c, v in zip(per_concept, e / e.sum())}


@dataclass
class AttributionResult:
    method: str
    step: int
    scores: np.ndarray
    queries: QuerySet
    payload: dict


def attribute(run_dir: str | Path, method: str = "montrage", checkpoint_step: Optional[int] = None,
              top_k: int = 10, images_dir: Optional[str | Path] = None, condition: str = "null",
              options: Optional[dict] = None, queries: Optional[QuerySet] = None, write_store: bool = True,
              progress: bool = True, store: Optional[RunStore] = None, ctx_cache: Optional[dict] = None,
              scheduler=None) -> AttributionResult:
    """Score queries (the run's probes by default, or ``images_dir``) against every training image.

    ``scheduler``: run the dynamics scoring with dask there ('threads', 'local', 'tcp://host:8786' or a
    dask.distributed Client; see :mod:`montrage.analysis.dask_scoring`); None scores in-process.
    """
    store = store or RunStore.open(run_dir)
    k = store.checkpoint_index(checkpoint_step)
    step = int(store.steps[k])
    options = dict(options or {})
    if queries is None:
        if images_dir is not None:
            queries = image_queries(images_dir, int(store.run_config.get("resolution") or store.probe_images().shape[1]),
                                    prompt=options.get("prompt", ""))
        else:
            queries = probe_queries(store, checkpoint=k)
    if options.get("prompt"):
        queries.prompts = [options["prompt"]] * len(queries)
    scorer = get_scorer(method)
    ctx = ScoringContext(store=store, queries=queries, checkpoint=k, condition=condition, progress=progress,
                         options=options)
    if ctx_cache is not None:
        ctx._cache = ctx_cache
    if scheduler is not None:
        from montrage.analysis.dask_scoring import scoring_on

        with scoring_on(scheduler):
            scores = np.asarray(scorer.score(ctx), dtype=np.float32)
    else:
        scores = np.asarray(scorer.score(ctx), dtype=np.float32)
    payload = build_payload(store, method, step, scores, queries, top_k, condition, options)
    if write_store:
        payload["score_path"] = _write(store, method, step, scores, queries)
    return AttributionResult(method, step, scores, queries, payload)


def _write(store: RunStore, method: str, step: int, scores: np.ndarray, queries: QuerySet) -> str:
    return store.write_attribution(method, step, scores, queries.ids, queries.key)


def build_payload(store: RunStore, method: str, step: int, scores: np.ndarray, queries: QuerySet, top_k: int,
                  condition: str, options: dict) -> dict:
    meta = store.train_meta
    files, concepts = meta[S.ATTR_FILE_NAMES], meta[S.ATTR_CONCEPTS]
    per_concept = concept_scores(scores, concepts)
    info = options.get("_query_info") or [{} for _ in range(len(queries))]
    out_queries = []
    for qi in range(len(queries)):
        cs = {c: float(v[qi]) for c, v in per_concept.items()}
        spread = float(np.nanstd(scores[qi])) if scores.shape[1] else None
        order = np.asarray(info[qi].get("_order", np.argsort(-scores[qi], kind="stable")))[:top_k]
        out_queries.append({
            "id": queries.ids[qi], "prompt": queries.prompts[qi], "seed": queries.seeds[qi],
            "image": queries.meta[qi].get("file") if queries.meta else None,
            "expected_concept": queries.concepts[qi] if queries.concepts else "",
            "concept_scores": cs, "concept_proportions": proportions(cs, spread),
            "predicted_concept": max(cs, key=cs.get) if cs else None,
            "query_kind": info[qi].get("query_kind") or ("prompt" if queries.prompts[qi].strip() else "image"),
            "channels": info[qi].get("channels"),
            "top": [{"train_index": int(i), "file_name": files[i], "concept": concepts[i],
                     "score": float(scores[qi, i])} for i in order],
            # what the fused model adds per query: exact_caption_first, others_share(_why), concept_prompts
            **{k: v for k, v in info[qi].items() if k not in ("query_kind", "channels") and not k.startswith("_")},
        })
    return {"run": str(store.run_dir), "method": method, "checkpoint": step, "condition": condition,
            "concept": options.get("concept"), "score_path": None, "queries": out_queries}


def between_concept_accuracy(payload: dict) -> Optional[float]:
    """Share of queries with an expected concept whose predicted concept matches it."""
    rows = [q for q in payload["queries"] if q.get("expected_concept")]
    if not rows:
        return None
    return float(np.mean([q["predicted_concept"] == q["expected_concept"] for q in rows]))


def write_json(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path
