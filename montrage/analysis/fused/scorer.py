"""The ``montrage``, ``montrage-all`` and ``montrage-final`` scorers: a fitted model per query kind (from the context
cache, the run folder, or fitted now and saved under a key of everything it depends on), applied to the queries'
channels."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from montrage.analysis.base import ScoringContext, register
from montrage.analysis.fused.channels import channel_values, scored_families, sub_context, subset
from montrage.analysis.fused.fit import FusedModel, choose_channel_set, fit
from montrage.analysis.fused.kinds import CHECKPOINT_ONLY_OPTION, IMAGE, PROMPT, family, query_kind
from montrage.analysis.fused.rules import (exact_caption_check, exact_caption_first, exact_caption_share,
                                           fit_with_counterfactual, share_others)
from montrage.analysis.fused.supervision import (load_counterfactual, memorised_share, supervision_anchors,
                                                 supervision_values)

log = logging.getLogger(__name__)

MODEL_VERSION = 15  # 14: the concept classifier channel (image only); 15: the exemplar-out concept term
COUNTERFACTUAL_RULE = 4  # part of a saved model's key when the run has targets: a model fitted under another rule is refit


def _counterfactual_fingerprint(ctx: ScoringContext) -> str:
    from montrage.storage import schema as S

    path = S.retrain_targets_path(ctx.store.run_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else ""


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
        values = channel_values(sub_context(ctx, subset(ctx.queries, idx, prompts)), kind,
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
