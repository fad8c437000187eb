"""How attribution changed across checkpoints: learning curves per concept and the probes that moved most.

At each checkpoint k the probes *generated at k* are attributed with the method at k (which sees
checkpoints 0..k only), so a concept's curve shows when its prompts started producing its style.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from tqdm.auto import tqdm

from montrage.analysis.attribute import attribute, concept_scores, proportions
from montrage.analysis.fused import CHECKPOINT_ONLY_OPTION
from montrage.analysis.queries import probe_queries
from montrage.errors import ScorerError
from montrage.storage import RunStore
from montrage.storage import schema as S

log = logging.getLogger(__name__)
LEARNED_THRESHOLD = 0.75  # share of a concept's probes attributed to it, from then on


def compare(run_dir: str | Path, method: str = "montrage", from_step: Optional[int] = None,
            to_step: Optional[int] = None, plot: Optional[str | Path] = None, progress: bool = True,
            top_changed: int = 5, options: Optional[dict] = None, image_only: bool = True) -> dict:
    """``options``: scorer options passed to every attribution (e.g. ``{"base": PATH}`` for a moved base model).

    ``image_only`` (default): each checkpoint's probe generations are attributed as images, their prompts
    withheld. "When was a concept learned" is a question about what the generations look like: with the
    prompt, text-path channels attribute even the base model's generations to the concept the prompt names
    (the fused model did so at step 0 on the demo), which would date every concept to the first checkpoint.

    For the same reason the fused model is fitted at each checkpoint on the channels that read that checkpoint's
    model only (``checkpoint_channels_only``): pixel and concept-classifier channels are the same at every
    checkpoint and judge how the base model's generations already look (they dated a demo artist to step 0)."""
    options = {CHECKPOINT_ONLY_OPTION: True, **(options or {})}
    store = RunStore.open(run_dir)
    steps = store.steps
    k0 = store.checkpoint_index(from_step) if from_step is not None else 0
    k1 = store.checkpoint_index(to_step) if to_step is not None else len(steps) - 1
    if k1 < k0:
        raise ScorerError(f"--from {from_step} is after --to {to_step}")
    concepts = store.concepts
    probe_concepts = store.probe_meta[S.ATTR_CONCEPTS]
    names = sorted(set(concepts) - {""})
    curves: Dict[str, Dict[str, List[Optional[float]]]] = {c: {"accuracy": [], "own_score": []} for c in names}
    shares_at: Dict[int, List[Dict[str, float]]] = {}
    top_at: Dict[int, List[int]] = {}
    used_steps = []
    for k in tqdm(range(k0, k1 + 1), disable=not progress, desc="compare checkpoints"):
        try:
            queries = probe_queries(store, checkpoint=k)
            if image_only:
                queries.prompts = [""] * len(queries.prompts)
            res = attribute(run_dir, method, int(steps[k]), queries=queries,
                            write_store=False, progress=False, store=store, options=options)
        except ScorerError as exc:  # e.g. a dynamics-only method at checkpoint 0
            log.info("checkpoint %d skipped: %s", int(steps[k]), exc)
            continue
        used_steps.append(int(steps[k]))
        per = concept_scores(res.scores, concepts)
        preds = [max(per, key=lambda c: per[c][q]) if per else None for q in range(len(probe_concepts))]
        shares_at[k] = [proportions({c: float(per[c][q]) for c in per}) for q in range(len(probe_concepts))]
        top_at[k] = [int(np.argmax(res.scores[q])) for q in range(len(probe_concepts))]
        for c in names:
            own = [q for q, pc in enumerate(probe_concepts) if pc == c]
            curves[c]["accuracy"].append(float(np.mean([preds[q] == c for q in own])) if own else None)
            curves[c]["own_score"].append(float(np.mean(per[c][own])) if own else None)
    if not used_steps:
        raise ScorerError(f"{method} could not score any checkpoint between steps {int(steps[k0])} and {int(steps[k1])}")
    learned_at = {}
    for c in names:
        acc = curves[c]["accuracy"]
        learned_at[c] = None
        for i in range(len(acc)):
            if acc[i] is not None and all(a is not None and a >= LEARNED_THRESHOLD for a in acc[i:]):
                learned_at[c] = used_steps[i]
                break
    ka, kb = min(shares_at), max(shares_at)
    changes = []
    for q in range(len(probe_concepts)):
        a, b = shares_at[ka][q], shares_at[kb][q]
        delta = float(sum(abs(a.get(c, 0) - b.get(c, 0)) for c in set(a) | set(b)))
        changes.append({"probe": q, "prompt": store.probe_meta[S.ATTR_PROMPTS][q], "share_change": delta,
                        "top_from": store.train_meta[S.ATTR_FILE_NAMES][top_at[ka][q]],
                        "top_to": store.train_meta[S.ATTR_FILE_NAMES][top_at[kb][q]]})
    changes.sort(key=lambda r: -r["share_change"])
    out = {"run": str(run_dir), "method": method, "steps": used_steps, "from": int(steps[ka]), "to": int(steps[kb]),
           "learned_at": learned_at, "curves": curves, "most_changed": changes[:top_changed], "plot": None}
    if plot is not None:
        out["plot"] = str(plot_curves(out, plot))
    return out


def plot_curves(result: dict, path: str | Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    path = Path(path)
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for c, cur in result["curves"].items():
        axes[0].plot(result["steps"], [np.nan if v is None else v for v in cur["accuracy"]], marker="o", label=c)
        axes[1].plot(result["steps"], [np.nan if v is None else v for v in cur["own_score"]], marker="o", label=c)
    axes[0].set(title="probes attributed to their own concept", xlabel="training step", ylabel="top-1 share",
                ylim=(-0.05, 1.05))
    axes[1].set(title="own-concept attribution score", xlabel="training step", ylabel="score")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['method']}: when each concept was learned")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
