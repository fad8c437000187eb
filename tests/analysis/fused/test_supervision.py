"""The fit's supervision made from the run: perturbations, supervision sets per query kind, memorisation and the
cross-fitted concept classifier."""
import numpy as np
import pytest

from montrage.analysis.base import ScoringContext
from montrage.analysis.fused import kinds as FK
from montrage.analysis.fused import supervision as FS
from montrage.analysis.queries import probe_queries
from montrage.errors import ScorerError
from montrage.storage import RunStore


def test_standardise_and_perturb():
    z = FK.standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [np.nan, 1.0, 3.0]]))
    np.testing.assert_allclose(z[0], [-1.2247, 0.0, 1.2247], atol=1e-3)
    assert (z[1] == 0).all() and z[2, 0] == 0 and z[2, 1] < 0 < z[2, 2]
    im = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    p1, p2 = FS.perturb(im, 1), FS.perturb(im, 1)
    assert np.array_equal(p1, p2) and not np.array_equal(p1, im) and p1.dtype == np.uint8


def test_perturbation_strength():
    im = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(FS.perturb(im, 3, strength=[0.0] * 4), im)
    full, default = FS.perturb(im, 3, strength=[1.0] * 4), FS.perturb(im, 3)
    assert np.array_equal(full, default)
    mild = FS.perturb(im, 3, strength=[0.3] * 4)
    err = lambda x: np.abs(x.astype(float) - im).mean()  # noqa: E731
    assert 0 < err(mild) < err(full)


def test_each_query_kind_is_supervised_by_the_queries_of_that_kind(tiny_run):
    """Image-only kind: full-strength copies, near-copies and prompt-less generations; prompt kind: no full-strength
    copies (a prompt-known query is a generation of its prompt -- fitted on copies the model trusted pixels over
    the prompt and lost new compositions), near-copies with a word-dropped caption, generations with the caption."""
    from montrage.analysis.gradients import training_images

    store = RunStore.open(tiny_run)
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1)
    anchors = FS.supervision_anchors(store)
    captions = list(store.train_meta["captions"])
    images = training_images(store).images[anchors]
    image_sets = FS.supervision_sets(ctx, images, anchors, captions, FK.IMAGE)
    prompt_sets = FS.supervision_sets(ctx, images, anchors, captions, FK.PROMPT)
    assert [q.ids[0].split("-")[0] for q in image_sets] == ["anchor", "near", "generation"]
    assert [q.ids[0].split("-")[0] for q in prompt_sets] == ["near", "generation"]
    assert all(p == "" for q in image_sets for p in q.prompts)
    near, gen = prompt_sets
    assert all(len(p.split()) == len(captions[a].split()) - 1 for p, a in zip(near.prompts, anchors))
    assert gen.prompts == [captions[a] for a in anchors]
    np.testing.assert_array_equal(near.images, image_sets[1].images)  # same near-copies for both kinds
    np.testing.assert_array_equal(gen.images, image_sets[2].images)  # and the same generations


def test_a_generation_reproduces_its_image_only_when_nearest_and_well_clear_of_the_rest():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(train[:4].astype(int) + rng.integers(-6, 7, (4, 16, 16, 3)), 0, 255).astype(np.uint8)
    blend = ((train[4:6].astype(int) + train[6:8].astype(int)) // 2).astype(np.uint8)  # halfway between two images
    gens = np.concatenate([noisy, blend, noisy[:1]])
    hit = FS.reproduces(gens, train, [0, 1, 2, 3, 4, 5, 7])  # the last: a copy of image 0 named as 7's generation
    assert hit.tolist() == [True] * 4 + [False] * 3
    with pytest.raises(ScorerError, match="differ in shape"):
        FS.reproduces(gens[:, :8], train, range(7))
    big = np.repeat(np.repeat(train[:2], 8, 1), 8, 2)  # 128 px: block-averaged to 64 px before comparing
    assert FS.downsample(big).shape == (2, 64 * 64 * 3)
    np.testing.assert_allclose(FS.downsample(big).reshape(2, 64, 64, 3)[:, ::4, ::4], train[:2] / 255.0, atol=1e-6)


def test_without_retrains_the_share_follows_what_the_run_memorised(tiny_run):
    """The run's own generations of its anchors' captions decide: copies of their images -> share 0 (the
    generation owes its loss to its own image); generations unlike any training image -> share 1."""
    from montrage.analysis.gradients import training_images

    store = RunStore.open(tiny_run)
    anchors = FS.supervision_anchors(store)
    images = training_images(store).images
    k = store.n_checkpoints - 1
    for gens, share in ((images[anchors], 0.0),
                        (np.random.default_rng(1).integers(0, 256, images[anchors].shape).astype(np.uint8), 1.0)):
        ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=k, progress=False)
        ctx._cache[f"fused/supervision-generations/{k}"] = gens  # stands in for generating them with the run's model
        out = FS.memorised_share(ctx, anchors)
        assert out["memorised_share"] == share
        assert out["memorised"] == [len(anchors) if share == 0.0 else 0, len(anchors)]


def test_the_fit_sees_the_concept_classifier_cross_fitted(tiny_run, monkeypatch):
    """The supervision rows' ``class/concept`` values come from classifiers trained without each row's anchor
    (rows stacked per supervision set, each set in anchor order), never from the classifier of every image."""
    from montrage.analysis import concept_classifier as CC

    store = RunStore.open(tiny_run)
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1)
    n = len(store.train_meta["file_names"])
    asked = []

    def channel_values(sub, kind, final_only, families=FK.FAMILIES):
        asked.append(tuple(families))
        return {"pixel": np.zeros((len(sub.queries), n), np.float32),
                **({"class/concept": np.zeros((len(sub.queries), n), np.float32)}
                   if kind == FK.IMAGE and "class" in families else {})}

    monkeypatch.setattr(FS, "channel_values", channel_values)
    seen = {}

    def crossfitted(train_images, concepts, anchors, query_images, row_anchor, **kw):
        seen.update(anchors=list(anchors), rows=list(row_anchor), n_images=len(query_images))
        return np.ones((len(query_images), len(concepts)), np.float32)

    monkeypatch.setattr(CC, "crossfitted_channel", crossfitted)
    values, target, _ = FS.supervision_values(ctx, FK.IMAGE, False)
    anchors = FS.supervision_anchors(store)
    assert seen["anchors"] == anchors and seen["rows"] == anchors * 3 and seen["n_images"] == len(target)
    assert (values["class/concept"] == 1).all() and (values["pixel"] == 0).all()
    assert asked and all("class" not in f for f in asked)  # the all-image classifier never scores these rows
    prompt_values, _, _ = FS.supervision_values(ctx, FK.PROMPT, False)
    assert "class/concept" not in prompt_values
