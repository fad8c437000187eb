"""The text-only baseline: prompt-vs-caption matching with no pixels, checked against the captions themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest

from montrage.analysis.base import QuerySet, ScoringContext, available, get_scorer
from montrage.errors import ScorerError
from montrage.storage import schema as S


class _CaptionStore:
    """Just what text-only reads: the training captions."""

    def __init__(self, captions):
        self.train_meta = {S.ATTR_CAPTIONS: list(captions)}


def _queries(prompts, n_pixels=4):
    q = len(prompts)
    return QuerySet(ids=[f"q{i}" for i in range(q)], images=np.zeros((q, n_pixels, n_pixels, 3), np.uint8),
                    prompts=list(prompts), seeds=[None] * q, item_seeds=list(range(q)))


def _score(captions, prompts, **options):
    ctx = ScoringContext(store=_CaptionStore(captions), queries=_queries(prompts), checkpoint=0, options=options)
    return get_scorer("text-only").score(ctx)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from montrage.data.synthetic import write_concept_dataset

    root = write_concept_dataset(tmp_path_factory.mktemp("text") / "d", n_artists=3, images_per_artist=6)
    return [json.loads(ln)["text"] for ln in (root / "metadata.jsonl").read_text().splitlines()]


def test_registered():
    assert "text-only" in available()


def test_a_training_caption_as_prompt_ranks_that_captions_images_first(captions):
    scores = _score(captions, captions)
    assert scores.shape == (len(captions), len(captions))
    for i, cap in enumerate(captions):
        same = {j for j, c in enumerate(captions) if c == cap}
        top = set(np.flatnonzero(np.isclose(scores[i], scores[i].max())).tolist())
        assert top == same, (cap, [captions[j] for j in top])
        others = [j for j in range(len(captions)) if j not in same]
        assert scores[i, others].max() < scores[i].max() - 1e-6


def test_the_artist_word_decides_a_new_composition():
    caps = ["a circle by artist-0", "a square by artist-0", "a star by artist-1", "a square by artist-1"]
    s = _score(caps, ["a star by artist-0"])[0]  # artist-0 never drew a star
    assert s[0] > s[3] and s[1] > s[3]  # the rarer shared word (artist-0 vs square) weighs as IDF says
    assert s[2] > s[3]  # 'star' matches artist-1's star more than artist-1's square


def test_image_only_queries_get_constant_scores(captions):
    scores = _score(captions, ["", "a circle by artist-0", "  "])
    for row in (0, 2):
        assert np.all(scores[row] == scores[row, 0])  # no information: every training image ties
    assert scores[1].std() > 0


def test_unknown_mode_and_missing_captions_are_clear_errors(captions):
    with pytest.raises(ScorerError, match="text_mode"):
        _score(captions, ["a circle"], text_mode="bag")
    with pytest.raises(ScorerError, match="captions"):
        _score([], ["a circle"])


def test_encoder_mode_on_a_run(tiny_run):
    """The run's own text encoder: a caption as prompt is most similar to itself (through attribute())."""
    from montrage.analysis.attribute import attribute
    from montrage.storage import RunStore

    store = RunStore.open(tiny_run)
    caps = store.train_meta[S.ATTR_CAPTIONS]
    res = attribute(tiny_run, "text-only", queries=_queries([caps[0], ""], n_pixels=16),
                    options={"text_mode": "encoder"}, write_store=False, progress=False)
    s = np.asarray(res.scores)
    same = [j for j, c in enumerate(caps) if c == caps[0]]
    assert np.allclose(s[0, same], s[0].max(), atol=1e-5) and np.all(s[1] == s[1, 0])
