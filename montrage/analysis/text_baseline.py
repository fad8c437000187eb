"""``text-only``: how far prompt-vs-caption matching alone gets, with no pixels and no training dynamics.

When a query carries its prompt, a method can look right just by matching that prompt to the training
captions. This baseline measures exactly that, so that every other method's rows can be read as what they
add beyond text. Two similarity modes (``options['text_mode']``):

- ``tfidf`` (default): cosine of TF-IDF word vectors (IDF over the training captions; hyphenated names such
  as ``artist-3`` are one word). Needs no model, deterministic, and strong on templated captions.
- ``encoder``: ``(1 + cos) / 2`` of the run's own text encoder states, mean-pooled over tokens (the base
  text encoder the UNet was conditioned with).

A query without a prompt (an image given alone) carries no text: its row is constant (no information), so
image-only queries score at chance for this baseline.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Sequence

import numpy as np

from montrage.analysis.base import ScoringContext, register
from montrage.errors import ScorerError
from montrage.storage import schema as S

_WORD = re.compile(r"[a-z0-9]+(?:[-_'][a-z0-9]+)*")
NO_TEXT_SCORE = 0.5  # every training image equally likely: the row of a query without a prompt


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def tfidf_similarity(prompts: Sequence[str], captions: Sequence[str]) -> np.ndarray:
    """(len(prompts), len(captions)) cosine of smoothed TF-IDF vectors; IDF from the captions."""
    docs = [Counter(words(c)) for c in captions]
    n = len(docs)
    df: Counter = Counter()
    for d in docs:
        df.update(d.keys())
    idf: Dict[str, float] = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
    vocab = {w: i for i, w in enumerate(sorted(idf))}

    def vec(counts: Counter) -> np.ndarray:
        v = np.zeros(len(vocab), np.float64)
        for w, c in counts.items():
            if w in vocab:  # a word never seen in a caption cannot match any caption
                v[vocab[w]] = c * idf[w]
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    train = np.stack([vec(d) for d in docs]) if n else np.zeros((0, len(vocab)))
    query = np.stack([vec(Counter(words(p))) for p in prompts]) if len(prompts) else np.zeros((0, len(vocab)))
    return query @ train.T


def encoder_similarity(ctx: ScoringContext, prompts: Sequence[str], captions: Sequence[str]) -> np.ndarray:
    """``(1 + cos) / 2`` of mean-pooled text-encoder states (the run's base text encoder)."""
    import torch

    comps = ctx.components_at(ctx.checkpoint)

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                h = comps.encode_prompts(list(texts[i:i + 64])).hidden.float().mean(dim=1)
                out.append(torch.nn.functional.normalize(h, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    train = ctx.cached("text-only/encoder/captions", lambda: embed(captions))
    return (1.0 + embed(prompts) @ train.T) / 2.0


@register("text-only")
class TextOnlyScorer:
    name = "text-only"
    description = ("prompt vs training-caption similarity only (TF-IDF words, or the text encoder with "
                   "text_mode=encoder); no pixels: what text matching alone explains; constant without a prompt")

    def score(self, ctx: ScoringContext) -> np.ndarray:
        captions = [str(c) for c in ctx.store.train_meta.get(S.ATTR_CAPTIONS, [])]
        n_train = len(captions)
        if n_train == 0:
            raise ScorerError("text-only compares the query's prompt with the training captions, but this run "
                              "recorded none; record captions with the training set (imagefolder 'text' column)")
        prompts = [p or "" for p in ctx.queries.prompts]
        scores = np.full((len(prompts), n_train), NO_TEXT_SCORE, np.float32)
        has = [i for i, p in enumerate(prompts) if p.strip()]
        if not has:
            return scores
        mode = str(ctx.options.get("text_mode", "tfidf"))
        known = [prompts[i] for i in has]
        if mode == "tfidf":
            sim = tfidf_similarity(known, captions)
        elif mode == "encoder":
            sim = encoder_similarity(ctx, known, captions)
        else:
            raise ScorerError(f"text_mode must be 'tfidf' or 'encoder', got {mode!r}")
        scores[has] = sim.astype(np.float32)
        return scores
