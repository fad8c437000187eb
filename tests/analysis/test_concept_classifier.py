"""The concept classifier channel: it recognises a concept on an object it never saw, and the fit's supervision
rows are scored by classifiers that never saw their anchor."""
import numpy as np
import pytest

from montrage.analysis import concept_classifier as CC
from montrage.data.synthetic import OBJECTS, make_artists, render
from montrage.errors import ScorerError

FAST = {"steps": 250, "ensemble": 1}


def _artist_images(objects, per_object: int, seed: int):
    """Images of 4 artists (palette, background, stroke) drawing ``objects``: (images, artist names)."""
    rng = np.random.default_rng(seed)
    artists = make_artists(4)
    imgs, names = [], []
    for a in artists:
        for obj in objects:
            for _ in range(per_object):
                imgs.append(render(obj, rng, 16, artist=a))
                names.append(a.name)
    return np.stack(imgs), names


def test_it_names_the_artist_of_an_object_no_training_image_shows():
    """Ground truth from the generator: trained on four objects, tested on two others drawn by the same artists."""
    train, concepts = _artist_images(OBJECTS[:4], 2, seed=0)
    unseen, truth = _artist_images(OBJECTS[4:], 2, seed=1)
    clf = CC.ConceptClassifier(train, concepts, **FAST)
    predicted = np.asarray(clf.labels)[clf.log_probs(unseen).argmax(1)]
    assert np.mean(predicted == np.asarray(truth)) >= 0.75  # chance .25
    # the channel puts the query's log-probability of each image's concept on that image
    chan = clf.channel(unseen[:3], concepts)
    assert chan.shape == (3, len(concepts))
    for row, lp in zip(chan, clf.log_probs(unseen[:3])):
        for j, c in enumerate(concepts):
            assert row[j] == pytest.approx(lp[clf.labels.index(c)])


def test_unlabelled_images_get_the_querys_mean_log_probability():
    train, concepts = _artist_images(OBJECTS[:2], 2, seed=0)
    clf = CC.ConceptClassifier(train, concepts, **FAST)
    chan = clf.channel(train[:2], concepts[:3] + ["", "nobody"])
    lp = clf.log_probs(train[:2])
    np.testing.assert_allclose(chan[:, 3], lp.mean(1), rtol=1e-6)
    np.testing.assert_allclose(chan[:, 4], lp.mean(1), rtol=1e-6)


def test_supervision_rows_are_scored_by_classifiers_that_never_saw_their_anchor():
    """Labels drawn at random on noise images: nothing generalises, so only memorising an image can name its label.
    A classifier trained on every image names the anchors' labels; the cross-fitted channel is near chance."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    concepts = [f"c{int(k)}" for k in rng.integers(0, 4, 40)]
    anchors = list(range(0, 40, 2))

    def accuracy(chan):
        own = np.array([chan[r, [j for j, c in enumerate(concepts) if c == concepts[a]][0]] for r, a in
                        enumerate(anchors)])
        best = np.array([max(chan[r, [j for j, c in enumerate(concepts) if c == lab][0]]
                             for lab in set(concepts)) for r in range(len(anchors))])
        return float(np.mean(own >= best))

    memorised = CC.ConceptClassifier(images, concepts, steps=400, ensemble=1).channel(images[anchors], concepts)
    crossfit = CC.crossfitted_channel(images, concepts, anchors, images[anchors], anchors, steps=400, ensemble=1)
    assert accuracy(memorised) >= 0.9
    assert accuracy(crossfit) <= 0.5


def test_bad_input_is_named():
    images = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ScorerError, match="2\\+ labelled concepts"):
        CC.ConceptClassifier(images, ["a", "a", "", ""], **FAST)
    with pytest.raises(ScorerError, match="supervision images"):
        CC.crossfitted_channel(images, ["a", "b", "a", "b"], [0, 1], images[:3], [0, 1], **FAST)


def test_large_images_are_downsampled_before_the_network():
    x = CC._inputs(np.zeros((2, 96, 96, 3), np.uint8))
    assert tuple(x.shape) == (2, 3, 32, 32) and float(x.min()) == -1.0


def test_a_large_run_trains_on_minibatches_and_still_learns(monkeypatch):
    """Above CLASSIFIER_BATCH images a step sees a random minibatch (the cost stays per step, not per image)."""
    monkeypatch.setattr(CC, "CLASSIFIER_BATCH", 8)
    train, concepts = _artist_images(OBJECTS[:4], 2, seed=0)
    unseen, truth = _artist_images(OBJECTS[4:], 1, seed=1)
    clf = CC.ConceptClassifier(train, concepts, **FAST)
    assert np.mean(np.asarray(clf.labels)[clf.log_probs(unseen).argmax(1)] == np.asarray(truth)) >= 0.75


def test_a_saved_classifier_gives_the_same_channel_and_is_reused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    train, concepts = _artist_images(OBJECTS[:2], 2, seed=0)
    monkeypatch.setattr(CC, "CLASSIFIER_STEPS", 30)
    ctx = SimpleNamespace(store=SimpleNamespace(run_dir=tmp_path), run_cache_get=lambda key, make: make())
    first = CC.classifier_for(ctx, train, concepts)
    saved = list((tmp_path / "montrage-models").glob("classifier-*.safetensors"))
    assert len(saved) == 1
    monkeypatch.setattr(CC.ConceptClassifier, "__init__", lambda *a, **k: pytest.fail("trained again"))
    again = CC.classifier_for(ctx, train, concepts)
    np.testing.assert_allclose(again.channel(train, concepts), first.channel(train, concepts), rtol=1e-6)
    assert again.labels == first.labels
    # other labels are another classifier
    assert CC.classifier_key(train, concepts) != CC.classifier_key(train, concepts[::-1])


def test_a_fold_that_leaves_one_concept_gives_constant_rows_not_an_error():
    """Tiny runs: holding out a fold of anchors can leave a single concept; those rows then carry nothing."""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    concepts = ["a", "b", "a", "b"]
    out = CC.crossfitted_channel(images, concepts, [1, 3], images[[1, 3]], [1, 3], folds=1, **FAST)
    assert out.shape == (2, 4) and (out == 0).all()


def test_fold_classifiers_are_kept_between_fits(monkeypatch):
    """One fit per checkpoint (``montrage compare``) trains the fold classifiers once: they depend on the training
    images only. Same values the second time, no training."""
    train, concepts = _artist_images(OBJECTS[:2], 2, seed=0)
    anchors = [0, 3, 4, 7]
    kept = {}
    first = CC.crossfitted_channel(train, concepts, anchors, train[anchors], anchors, folds=2, trained=kept, **FAST)
    assert len(kept) == 2
    monkeypatch.setattr(CC.ConceptClassifier, "__init__", lambda *a, **k: pytest.fail("trained again"))
    again = CC.crossfitted_channel(train, concepts, anchors, train[anchors], anchors, folds=2, trained=kept, **FAST)
    np.testing.assert_array_equal(first, again)
