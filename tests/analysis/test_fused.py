"""The fused montrage model: per-query-kind weights pick the channel that carries the ground truth, and the
JSON says which channels each query used."""
import shutil

import numpy as np
import pytest

from montrage.analysis import fused as F
from montrage.analysis.attribute import attribute
from montrage.analysis.base import ScoringContext, available, get_scorer
from montrage.analysis.queries import probe_queries
from montrage.errors import ScorerError
from montrage.storage import RunStore
from tests.analysis.planted import make_planted_store

CHANNELS = ("grad/dtrak", "rep/null/move", "pixel")


def planted_values(targets, n, kind, seed):
    """Channel values where exactly one channel carries the identity, and which one depends on the query kind:
    the gradient kernel for prompt-known queries, co-movement for image-only ones; the others are noise."""
    rng = np.random.default_rng(seed)
    informative = "grad/dtrak" if kind == F.PROMPT else "rep/null/move"
    out = {}
    for c in CHANNELS:
        v = rng.normal(size=(len(targets), n))
        if c == informative:
            v[np.arange(len(targets)), targets] += 5.0
        else:  # a distractor that points at the wrong image
            v[np.arange(len(targets)), (np.asarray(targets) + 1) % n] += 1.5
        out[c] = v.astype(np.float32)
    return out


def test_fit_puts_weight_on_the_channel_with_the_ground_truth():
    n = 30
    targets = np.arange(n)
    for kind, right in ((F.PROMPT, "grad/dtrak"), (F.IMAGE, "rep/null/move")):
        y = np.zeros((n, n), np.float32)
        y[targets, targets] = 1.0
        model = F.fit(planted_values(targets, n, kind, 0), y, kind, "planted", steps=300)
        w = model.used()
        assert max(w, key=w.get) == right, w
        held_out = model.raw(planted_values(targets, n, kind, 1))
        assert np.mean(held_out.argmax(1) == targets) >= 0.9


def _supervision_with_signal_in(signal: set, copies_only: set = frozenset(), n_anchors: int = 16, n_sets: int = 2,
                                seed: int = 0):
    """Supervision rows (stacked per set) of 4 concepts x 6 images, anchors = the first n_anchors images; channels in
    ``signal`` carry the target plus noise, channels in ``copies_only`` carry it in every set but the last (the
    generations: pixels and gradients of a copy match, a generation's may not), the others are noise."""
    rng = np.random.default_rng(seed)
    n = 24
    concepts = [f"c{i // 6}" for i in range(n)]
    from montrage.analysis.model import supervision_targets

    one = supervision_targets(list(range(n_anchors)), np.arange(n), concepts)
    target = np.concatenate([one] * n_sets)
    last = np.zeros_like(target, bool)
    last[-n_anchors:] = True
    names = ("rep/null/sim-final", "grad/dtrak", "grad/tracin/k2", "pixel", "grad/tracin/k1", "rep/null/move",
             "dyn/learned")
    values = {}
    for c in names:
        on = 1.5 * target * ((c in signal) | ((c in copies_only) & ~last))
        values[c] = (on + rng.normal(0, 1, target.shape)).astype(np.float32)
    return values, target.astype(np.float32), concepts, n_anchors


def test_final_channels_are_what_montrage_final_computes():
    names = ["dup/pixel", "dyn/learned", "grad/dtrak", "grad/tracin/k1", "grad/tracin/k2", "pixel", "rep/caption/move",
             "rep/caption/sim-final", "rep/null/loss", "rep/null/sim-path", "rep/null/sim-final", "steps/learned",
             "text/concept", "text/encoder"]
    assert F.final_channels(names, 2) == ["dup/pixel", "grad/dtrak", "grad/tracin/k2", "pixel",
                                          "rep/caption/sim-final", "rep/null/sim-final", "text/concept", "text/encoder"]


def test_the_channel_set_that_generalises_to_held_out_anchors_is_chosen():
    """Trajectory channels that fit the copies but not the held-out anchors' generations are dropped; trajectory
    channels that carry the signal everywhere are kept, although final-checkpoint channels are there either way."""
    values, target, concepts, a = _supervision_with_signal_in({"rep/null/sim-final"},
                                                              copies_only={"rep/null/move", "dyn/learned"})
    choice = F.choose_channel_set(values, target, F.IMAGE, concepts, a, k=2)
    assert choice["chosen"] == "final", choice
    assert choice["heldout_final"] < choice["heldout_all"]
    assert choice["channels_final"] == ["grad/dtrak", "grad/tracin/k2", "pixel", "rep/null/sim-final"]
    values, target, concepts, a = _supervision_with_signal_in({"rep/null/move", "dyn/learned", "grad/tracin/k1"})
    choice = F.choose_channel_set(values, target, F.IMAGE, concepts, a, k=2)
    assert choice["chosen"] == "all" and choice["heldout_all"] < choice["heldout_final"], choice
    # too few anchors to hold out a quarter: every channel, and the reason
    values, target, concepts, a = _supervision_with_signal_in({"grad/dtrak"}, n_anchors=6)
    choice = F.choose_channel_set(values, target, F.IMAGE, concepts, a, k=2)
    assert choice["chosen"] == "all" and "not measured" in choice["why"]


@pytest.fixture()
def planted_run(tmp_path):
    path = tmp_path / "run"
    targets, concepts = make_planted_store(path)
    return path, targets


def test_scorer_routes_each_query_kind_to_its_model_and_reports_it(planted_run, monkeypatch):
    path, targets = planted_run
    store = RunStore.open(path)
    n = len(targets)

    def fake_channels(ctx, kind, final_only, families=("rep", "grad", "pixel")):
        t = [int(i.split("-")[1]) for i in ctx.queries.ids]
        return planted_values(t, n, kind, seed=len(t) + (kind == F.PROMPT))

    def fake_supervision(ctx, kind, final_only, families=F.FAMILIES):
        anchors = list(store.anchor_indices)
        from montrage.analysis.model import supervision_targets

        return (planted_values(anchors, n, kind, seed=7), supervision_targets(anchors, np.arange(n), store.concepts),
                "planted")

    monkeypatch.setattr(F, "channel_values", fake_channels)
    monkeypatch.setattr(F, "supervision_values", fake_supervision)
    q = probe_queries(store)
    image_only = list(range(0, n, 2))
    for i in image_only:
        q.prompts[i] = ""
    res = attribute(path, "montrage", queries=q, options={"query_mode": "A"}, write_store=False, progress=False,
                    store=store)
    # .89 (16 of 18): the planted distractor (the next image) is mostly of the query's own concept, which the image
    # model's exemplar-out concept term gives some weight (at least .9 before that term, model version 14)
    assert np.mean(res.scores.argmax(1) == targets) >= 0.85
    assert ((res.scores >= 0) & (res.scores <= 1)).all()
    for i, row in enumerate(res.payload["queries"]):
        kind = F.IMAGE if i in image_only else F.PROMPT
        assert row["query_kind"] == kind
        w = row["channels"]
        assert set(w) == set(CHANNELS)
        assert max(w, key=w.get) == ("rep/null/move" if kind == F.IMAGE else "grad/dtrak")
    saved = sorted(p.name for p in (path / "montrage-models").iterdir())
    assert len(saved) == 2 and any("-prompt-" in s for s in saved) and any("-image-" in s for s in saved)


def test_standardise_and_perturb():
    z = F.standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [np.nan, 1.0, 3.0]]))
    np.testing.assert_allclose(z[0], [-1.2247, 0.0, 1.2247], atol=1e-3)
    assert (z[1] == 0).all() and z[2, 0] == 0 and z[2, 1] < 0 < z[2, 2]
    im = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    p1, p2 = F.perturb(im, 1), F.perturb(im, 1)
    assert np.array_equal(p1, p2) and not np.array_equal(p1, im) and p1.dtype == np.uint8


def test_near_duplicate_fires_only_for_a_copy():
    """Ratio test on planted similarities: a copy (one image far closer than the rest) gets a large value at its
    source and 0 elsewhere; a generation-like query (several images about equally close) gets a small one."""
    rng = np.random.default_rng(0)
    sim = 0.5 + 0.4 * rng.random((2, 20))
    sim[0, 7] = 0.998  # the copy's source: cos 0.996 vs at most 0.8 for the rest
    sim[1, 3], sim[1, 4] = 0.93, 0.925  # two nearly equal neighbours
    dup = F.near_duplicate(sim)
    assert dup[0].argmax() == 7 and dup[0, 7] > 2.0 and np.count_nonzero(dup[0]) == 1
    assert dup[1].argmax() == 3 and dup[1, 3] < 0.2
    # kept on its own scale: not standardised per query like the other channels
    np.testing.assert_array_equal(F.feature("dup/pixel", dup), dup)


def planted_copy_and_generation(n_concepts, per, n_queries, seed):
    """Channel values of copy queries and generation-like queries with known sources. Pixels: same-concept images
    look alike (one palette); a copy is far closer to its source than to anything else, a generation is not.
    Co-movement identifies a generation's source, but for a copy it points at a sibling of the same concept, so
    no single weighting of the standardised channels serves both kinds of query."""
    rng = np.random.default_rng(seed)
    n = n_concepts * per
    concept = np.arange(n) // per
    values = {"pixel": [], "rep/null/move": []}
    targets = []
    for j in range(n_queries):
        copy = j % 2 == 0
        t = int(rng.integers(n))
        sibling = int(rng.choice([i for i in range(n) if concept[i] == concept[t] and i != t]))
        pix = np.where(concept == concept[t], 0.95 + 0.01 * rng.normal(size=n), rng.uniform(0.3, 0.9, n))
        move = rng.normal(size=n) + 2.0 * (concept == concept[t])
        if copy:  # pixels nearly identical to the source; the representation moves like a sibling's
            pix[t] = 0.997
            move[sibling] += 3.0
        else:  # a generation reproduces no pixels (its nearest image is any sibling); co-movement finds the source
            pix[sibling] = 0.975
            move[t] += 3.0
        values["pixel"].append(pix)
        values["rep/null/move"].append(move)
        targets.append(t)
    out = {c: np.asarray(v, np.float32) for c, v in values.items()}
    out["dup/pixel"] = F.near_duplicate(out["pixel"])
    return out, np.asarray(targets), [f"c{c}" for c in concept]


def test_copy_queries_rank_their_source_first_once_the_near_duplicate_channel_is_fitted():
    n_concepts, per = 4, 8
    values, targets, concepts = planted_copy_and_generation(n_concepts, per, 64, seed=0)
    y = np.zeros((len(targets), n_concepts * per), np.float32)
    y[np.arange(len(targets)), targets] = 1.0
    test, t_test, _ = planted_copy_and_generation(n_concepts, per, 40, seed=1)
    copy = np.arange(len(t_test)) % 2 == 0
    with_dup = F.fit(values, y, F.IMAGE, "planted", concepts, steps=300)
    hit = with_dup.raw(test).argmax(1) == t_test
    assert hit[copy].mean() == 1.0 and hit[~copy].mean() >= 0.9, (hit[copy].mean(), hit[~copy].mean())
    assert with_dup.used()["dup/pixel"] > 0.1
    without = F.fit({c: v for c, v in values.items() if c != "dup/pixel"}, y, F.IMAGE, "planted", concepts, steps=300)
    hit0 = without.raw({c: v for c, v in test.items() if c != "dup/pixel"}).argmax(1) == t_test
    # the standardised channels alone trade copies against generations
    assert hit0.mean() <= hit.mean() - 0.1, (hit0[copy].mean(), hit0[~copy].mean())


def test_perturbation_strength():
    im = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(F.perturb(im, 3, strength=[0.0] * 4), im)
    full, default = F.perturb(im, 3, strength=[1.0] * 4), F.perturb(im, 3)
    assert np.array_equal(full, default)
    mild = F.perturb(im, 3, strength=[0.3] * 4)
    err = lambda x: np.abs(x.astype(float) - im).mean()  # noqa: E731
    assert 0 < err(mild) < err(full)


def test_channels_follow_what_the_run_recorded(planted_run, monkeypatch):
    """The planted store has representation trajectories and anchors but no model, pixels, captions or per-step
    signals: the image-only query JSON lists exactly the channels it could use; per-step signals, once recorded,
    add ``steps/learned`` with each image's observed first-minus-last loss."""
    path, targets = planted_run
    store = RunStore.open(path)
    q = probe_queries(store)
    q.prompts = [""] * len(q)
    res = attribute(path, "montrage", queries=q, options={"query_mode": "A"}, write_store=False, progress=False,
                    store=store)
    used = res.payload["queries"][0]["channels"]
    assert all(r["query_kind"] == "image" for r in res.payload["queries"])
    assert set(used) == {"rep/null/sim-final", "rep/null/sim-path", "rep/null/move", "rep/null/loss"}, used
    assert np.mean(res.scores.argmax(1) == targets) >= 0.9
    from montrage.storage import schema as S

    ctx = ScoringContext(store=store, queries=q, checkpoint=store.n_checkpoints - 1, options={"query_mode": "A"})
    assert "steps/learned" not in F.channel_values(ctx, F.IMAGE, False, ("rep", "steps"))
    n = len(targets)
    steps = np.repeat(np.arange(1, 41), n)  # 40 steps, every image drawn at each; checkpoints at 0, 10, ..., 40
    idx = np.tile(np.arange(n), 40)
    loss = 1.0 - 0.02 * idx * (steps / 40.0)  # image i learns 0.02 i over training
    monkeypatch.setattr(store, "step_signals", lambda: {S.SIGNAL_STEP: steps, S.SIGNAL_INDEX: idx,
                                                        S.SIGNAL_TIMESTEP: np.zeros_like(steps),
                                                        S.SIGNAL_LOSS: loss.astype(np.float32)})
    ctx = ScoringContext(store=store, queries=q, checkpoint=store.n_checkpoints - 1, options={"query_mode": "A"})
    learned = F.channel_values(ctx, F.IMAGE, False, ("rep", "steps"))["steps/learned"]
    assert learned.shape == (len(q), n)
    assert (np.diff(learned[0]) > 0).all()  # ranks the images by how much of them was learned
    assert "steps/learned" not in F.channel_values(ctx, F.IMAGE, True, ("rep", "steps"))  # montrage-final
    # the first checkpoint has no interval before it (e.g. `montrage compare` over every checkpoint): no channel,
    # no error
    first = ScoringContext(store=store, queries=q, checkpoint=0, options={"query_mode": "A"})
    assert "steps/learned" not in F.channel_values(first, F.IMAGE, False, ("rep", "steps"))


def test_registered_with_the_ablation_and_baselines():
    names = set(available())
    assert {"montrage", "montrage-final", "montrage-dynamics", "montrage-unsupervised", "final-sim",
            "final-sim-learned", "dynamics-only", "loss-codescent", "pixel", "tracin", "dtrak",
            "concept-trak"} <= names


@pytest.mark.slow
def test_end_to_end_on_a_tiny_run(tmp_path, tiny_run):
    """Every channel family on a real (tiny) run: prompt-known probes and image-only queries, JSON fields,
    a concept query, and montrage-final without trajectory channels."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    opts = {"proj_dim": 32}
    res = attribute(run, "montrage-all", options=dict(opts), write_store=False, progress=False)
    assert np.isfinite(res.scores).all()
    rows = res.payload["queries"]
    assert all(r["query_kind"] == "prompt" for r in rows)
    used = rows[0]["channels"]
    assert {"rep/null/sim-final", "rep/caption/sim-final", "rep/null/move", "grad/dtrak", "pixel", "dup/pixel",
            "dyn/learned", "text/encoder", "text/concept", "steps/learned"} <= set(used)
    assert "text/tfidf" not in used  # word matching is the text-only baseline, never a montrage channel
    st = RunStore.open(run)
    q = probe_queries(st)
    q.prompts = [""] * len(q)
    img = attribute(run, "montrage-all", queries=q, options=dict(opts), write_store=False, progress=False)
    assert all(r["query_kind"] == "image" for r in img.payload["queries"])
    assert not any(c.startswith(("rep/caption", "text/")) for c in img.payload["queries"][0]["channels"])
    # the concept classifier: image-only queries only (a prompt names its concept itself)
    assert "class/concept" in img.payload["queries"][0]["channels"] and "class/concept" not in used
    # montrage: the channel set it chose on held-out anchors, per kind, is the one its queries use
    chosen = attribute(run, "montrage", queries=q, options=dict(opts), write_store=False, progress=False)
    model = get_scorer("montrage").model(ScoringContext(store=st, queries=q, checkpoint=st.n_checkpoints - 1,
                                                        options=dict(opts)), F.IMAGE)
    assert model.channel_set["chosen"] in ("all", "final")
    assert set(chosen.payload["queries"][0]["channels"]) == set(model.channels)
    if model.final_only:
        assert set(model.channels) <= set(model.channel_set["channels_final"])
    final = attribute(run, "montrage-final", options=dict(opts), write_store=False, progress=False)
    chans = final.payload["queries"][0]["channels"]
    assert not any(("move" in c or "sim-path" in c or c == "rep/null/loss" or c.startswith(("dyn/", "steps/")))
                   for c in chans)
    conc = attribute(run, "montrage", options={**opts, "concept": "by artist-0"}, write_store=False, progress=False)
    assert conc.payload["concept"] == "by artist-0" and np.isfinite(conc.scores).all()
    # a generation of an exact training caption: the image trained under it is ranked first, and the JSON says so
    captions = list(st.train_meta["captions"])
    picks = [i for i in range(len(captions)) if captions.count(captions[i]) == 1][:3]
    q = probe_queries(st)
    q = F.subset(q, [0] * len(picks), [captions[i] for i in picks])
    q.ids = [f"exact-{i}" for i in picks]
    exact = attribute(run, "montrage", queries=q, options=dict(opts), write_store=False, progress=False)
    rows = exact.payload["queries"]
    assert [r["exact_caption_first"] for r in rows] == [[i] for i in picks]
    assert list(exact.scores.argmax(1)) == picks


def test_concept_mean_spreads_a_prompts_pull_over_its_concept():
    """A prompt naming concept b with an object only a drew: per image, text similarity peaks on a's image of that
    object; averaged per concept, b's images lead (the composition's concept), unlabelled images keep their own."""
    sim = np.array([[0.9, 0.1, 0.6, 0.6, 0.3]], np.float32)  # a's circle, a's square, b's two images, unlabelled
    out = F.concept_mean(sim, ["a", "a", "b", "b", ""])
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.6, 0.6, 0.3]])
    assert sim.argmax() == 0 and out[0, :4].argmax() == 2


def test_each_query_kind_is_supervised_by_the_queries_of_that_kind(tiny_run):
    """Image-only kind: full-strength copies, near-copies and prompt-less generations; prompt kind: no full-strength
    copies (a prompt-known query is a generation of its prompt -- fitted on copies the model trusted pixels over
    the prompt and lost new compositions), near-copies with a word-dropped caption, generations with the caption."""
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.gradients import training_images

    store = RunStore.open(tiny_run)
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1)
    anchors = F.supervision_anchors(store)
    captions = list(store.train_meta["captions"])
    images = training_images(store).images[anchors]
    image_sets = F.supervision_sets(ctx, images, anchors, captions, F.IMAGE)
    prompt_sets = F.supervision_sets(ctx, images, anchors, captions, F.PROMPT)
    assert [q.ids[0].split("-")[0] for q in image_sets] == ["anchor", "near", "generation"]
    assert [q.ids[0].split("-")[0] for q in prompt_sets] == ["near", "generation"]
    assert all(p == "" for q in image_sets for p in q.prompts)
    near, gen = prompt_sets
    assert all(len(p.split()) == len(captions[a].split()) - 1 for p, a in zip(near.prompts, anchors))
    assert gen.prompts == [captions[a] for a in anchors]
    np.testing.assert_array_equal(near.images, image_sets[1].images)  # same near-copies for both kinds
    np.testing.assert_array_equal(gen.images, image_sets[2].images)  # and the same generations


def test_final_checkpoint_channels_need_only_the_final_checkpoints_encoding(tiny_run):
    """A model that uses the final checkpoint's channels only re-encodes its queries under that checkpoint alone; its
    values are those the whole trajectory gives (the earlier checkpoints are left NaN, and nothing reads them)."""
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.scorers import query_trajectory

    store = RunStore.open(tiny_run)
    q = probe_queries(store)
    last = store.n_checkpoints - 1
    alone = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B"})
    got = F.rep_channels(alone, "null", final_only=True)
    traj = query_trajectory(F._with_condition(alone, "null"), final_only=True)
    assert np.isnan(traj.losses[:last]).all() and np.isfinite(traj.losses[last]).all()
    whole = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B"})
    full = F.rep_channels(whole, "null", final_only=False)  # the whole trajectory first: then it is reused
    assert set(got) == {"rep/null/sim-final"} and "rep/null/move" in full
    np.testing.assert_allclose(got["rep/null/sim-final"], full["rep/null/sim-final"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(F.rep_channels(whole, "null", final_only=True)["rep/null/sim-final"],
                                  full["rep/null/sim-final"])


def test_final_checkpoint_gradient_channels_take_one_shared_pass_with_dtraks_numbers(tiny_run_copy, monkeypatch):
    """On the final checkpoint's channels the query's D-TRAK and TracIn gradients come from one forward pass (one
    call of the shared path, none of the one-output path), and give the numbers of the scorers computed apart."""
    from montrage.analysis import gradients as G
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.gradient_scorers import DTrakScorer, GradientSettings, query_gradients, train_gradients

    store = RunStore.open(tiny_run_copy)
    q = probe_queries(store)
    last = store.n_checkpoints - 1
    calls = {"shared": 0, "one": 0}
    shared, one = G.projected_gradients_shared, G.projected_gradients

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    ctx = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B", "proj_dim": 64})
    for output in ("sqnorm", "denoise"):  # the training side first: only the query's passes are counted
        train_gradients(ctx, last, output, GradientSettings.from_ctx(ctx))
    monkeypatch.setattr(G, "projected_gradients_shared", count("shared", shared))
    monkeypatch.setattr(G, "projected_gradients", count("one", one))
    got = F.grad_channels(ctx, final_only=True)
    assert set(got) == {"grad/dtrak", f"grad/tracin/k{last}"} and calls == {"shared": 1, "one": 0}
    monkeypatch.setattr(G, "projected_gradients_shared", shared)
    apart = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B", "proj_dim": 64})
    ref = DTrakScorer().score(apart)
    np.testing.assert_allclose(got["grad/dtrak"], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    s = GradientSettings.from_ctx(apart)
    gq, gt = query_gradients(apart, last, "denoise", s), train_gradients(apart, last, "denoise", s)
    tracin = np.einsum("qtd,ntd->qn", G.normalize_rows(gq), G.normalize_rows(gt))
    np.testing.assert_allclose(got[f"grad/tracin/k{last}"], tracin, rtol=1e-4, atol=1e-5)


def test_prompt_queries_take_caption_features_and_gradients_from_one_forward(tiny_run_copy, monkeypatch):
    """On the final checkpoint's channels a prompt-known query's caption-condition representations come from its
    gradient pass (one forward per item): the feature extractor runs for the null condition only, and the
    channels equal those computed apart."""
    from montrage.analysis import gradients as G
    from montrage.analysis.base import ScoringContext
    from montrage.models.features import FeatureExtractor

    store = RunStore.open(tiny_run_copy)
    assert "caption" in store.conditions
    q = probe_queries(store)
    last = store.n_checkpoints - 1
    opts = {"query_mode": "B", "proj_dim": 64}
    apart = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    ref = {**F.rep_channels(apart, "caption", final_only=True), **F.grad_channels(apart, final_only=True)}
    calls = {"extract": [], "shared": 0}
    extract, shared = FeatureExtractor.extract, G.projected_gradients_shared

    def counted_extract(self, *a, **kw):
        calls["extract"].append(tuple(self.capture.conditions))
        return extract(self, *a, **kw)

    def counted_shared(*a, **kw):
        calls["shared"] += 1
        return shared(*a, **kw)

    monkeypatch.setattr(FeatureExtractor, "extract", counted_extract)
    monkeypatch.setattr(G, "projected_gradients_shared", counted_shared)
    ctx = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    got = F.channel_values(ctx, F.PROMPT, final_only=True, families=("rep", "grad"))
    assert calls == {"extract": [("null",)], "shared": 1}
    assert {"rep/caption/sim-final", "rep/null/sim-final", "grad/dtrak", f"grad/tracin/k{last}"} <= set(got)
    for c, v in ref.items():
        np.testing.assert_allclose(got[c], v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max())))
    # with other gradient timesteps the inputs differ: no shared pass, the extractor encodes the caption itself
    calls["extract"].clear()
    other = ScoringContext(store=store, queries=q, checkpoint=last, options={**opts, "grad_timesteps": [300]})
    F.channel_values(other, F.PROMPT, final_only=True, families=("rep", "grad"))
    assert ("caption",) in calls["extract"]



@pytest.mark.parametrize("kind", ["image", "prompt"])
def test_every_channel_queries_take_their_trajectory_from_tracins_gradient_pass(tiny_run_copy, monkeypatch, kind):
    """On every channel, a query's representations at checkpoints 1..k under the condition of its gradients (null
    prompt for an image-only query, caption for a prompt-known one) come from the forwards of TracIn's batched
    gradient pass: the extractor encodes that condition at checkpoint 0 alone, and every channel equals the one
    computed apart."""
    from montrage.analysis.base import ScoringContext
    from montrage.models.features import FeatureExtractor

    store = RunStore.open(tiny_run_copy)
    assert store.n_checkpoints >= 3 and "caption" in store.conditions
    q = probe_queries(store)
    if kind == "image":
        q = F.subset(q, list(range(len(q))), [""] * len(q))
    last = store.n_checkpoints - 1
    opts = {"query_mode": "B", "proj_dim": 64}
    apart = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    ref = F.grad_channels(apart, final_only=False)
    conditions = ("null", "caption") if kind == "prompt" else ("null",)
    for cond in conditions:
        ref.update(F.rep_channels(apart, cond, final_only=False))
    encoded = []
    extract = FeatureExtractor.extract

    def counted(self, *a, **kw):
        encoded.append(tuple(self.capture.conditions))
        return extract(self, *a, **kw)

    monkeypatch.setattr(FeatureExtractor, "extract", counted)
    ctx = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    got = F.channel_values(ctx, kind, final_only=False, families=("rep", "grad"))
    shared = "caption" if kind == "prompt" else "null"
    assert encoded.count((shared,)) == 1  # checkpoint 0 only; 1..last came with the gradients
    if kind == "prompt":
        assert encoded.count(("null",)) == store.n_checkpoints  # the null prompt: its own forwards, every checkpoint
    assert set(ref) == set(got) and f"rep/{shared}/move" in got and f"grad/tracin/k{last}" in got
    for c, v in ref.items():
        np.testing.assert_allclose(got[c], v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max())), err_msg=c)
    # with other gradient timesteps the inputs differ: no shared pass, every checkpoint is encoded apart
    encoded.clear()
    other = ScoringContext(store=store, queries=q, checkpoint=last, options={**opts, "grad_timesteps": [300]})
    F.channel_values(other, kind, final_only=False, families=("rep", "grad"))
    assert encoded.count((shared,)) == store.n_checkpoints


def planted_influence(seed, m, n=40, q=30):
    """Two channels that both find every query's source (the anchor supervision cannot tell them apart); only
    ``grad/dtrak`` also says how much the OTHER images matter (a hidden influence), and the losses of models
    retrained on ``m`` random halves follow that influence. Returns (rng, values, targets, masks, losses)."""
    rng = np.random.default_rng(seed)
    targets = np.arange(q)
    influence = rng.gamma(1.0, size=(q, n))  # how much image i lowers query j's loss (hidden)
    influence[targets, targets] = 0.0
    right = np.log1p(influence) + rng.normal(0, 0.05, (q, n))
    wrong = rng.normal(0, 1.0, (q, n))
    for v in (right, wrong):
        v[targets, targets] = 8.0
    values = {"grad/dtrak": right.astype(np.float32), "rep/null/move": wrong.astype(np.float32)}
    y = np.zeros((q, n), np.float32)
    y[targets, targets] = 1.0
    masks = (rng.random((m, n)) < 0.5).astype(np.float64)
    losses = 5.0 - masks @ influence.T + rng.normal(0, 0.1, (m, q))
    return rng, values, y, masks, losses


def test_counterfactual_term_moves_weight_to_the_channel_that_predicts_retrained_losses():
    """With the counterfactual term the fit moves weight to the channel the retrained losses follow, and the LDS of
    held-out subsets rises."""
    _, values, y, masks, losses = planted_influence(0, 12)
    cf = F.Counterfactual(np.arange(len(y)), masks[:8], losses[:8])
    plain = F.fit(values, y, F.PROMPT, "planted", steps=300)
    with_cf = F.fit(values, y, F.PROMPT, "planted", steps=300, counterfactual=cf)
    share = lambda mod: mod.used()["grad/dtrak"] / sum(mod.used().values())  # noqa: E731
    assert share(with_cf) > share(plain) + 0.1, (plain.used(), with_cf.used())
    held_plain = F.lds(plain.calibrate(plain.raw(values)), masks[8:], losses[8:])
    held_cf = F.lds(with_cf.calibrate(with_cf.raw(values)), masks[8:], losses[8:])
    assert held_cf > held_plain + 0.1, (held_plain, held_cf)


def test_counterfactual_term_is_adopted_only_when_held_out_subsets_confirm_it():
    """Retrained losses that follow a channel: the term raises the held-out LDS and is adopted. Losses that are
    noise: no held-out gain, the plain fit is kept (the same weights as without targets)."""
    rng, values, y, masks, losses = planted_influence(1, 16)
    rows = np.arange(len(y))
    real = F.Counterfactual(rows, masks, losses)
    noise = F.Counterfactual(rows, masks, rng.normal(size=losses.shape))
    adopted = F.fit_with_counterfactual(values, y, F.PROMPT, "planted", [], real)
    assert adopted.counterfactual["adopted"] and "counterfactual" in adopted.supervision
    kept = F.fit_with_counterfactual(values, y, F.PROMPT, "planted", [], noise)
    assert not kept.counterfactual["adopted"] and "held-out LDS" in kept.counterfactual["why"]
    np.testing.assert_allclose(kept.weights, F.fit(values, y, F.PROMPT, "planted", []).weights)


def test_lds_is_the_spearman_of_predicted_effect_and_loss():
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], float)
    scores = np.array([[3.0, 2.0, 1.0]])
    losses = -(masks @ scores.T)  # a perfect prediction: more attributed images in -> lower loss
    assert F.lds(scores, masks, losses) == pytest.approx(1.0)
    assert F.lds(scores, masks, -losses) == pytest.approx(-1.0)


def test_exact_caption_first_lifts_only_the_images_trained_under_the_prompt():
    """Query 0's prompt is image 2's caption but a sibling (image 1) scores higher: image 2 goes first, just above
    the rest, whose order is kept; query 1 matches no caption and query 2 matches every caption: unchanged."""
    raw = np.array([[0.1, 3.0, 2.0, -1.0, 0.5],
                    [0.1, 3.0, 2.0, -1.0, 0.5],
                    [0.1, 3.0, 2.0, -1.0, 0.5]], np.float32)
    text = np.array([[0.90, 0.95, 1.0, 0.20, 0.30],
                     [0.90, 0.95, 0.99, 0.20, 0.30],
                     [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    out, lifted = F.exact_caption_first(raw, text)
    assert lifted == [[2], [], []]
    assert out[0].argmax() == 2 and out[0, 2] - 3.0 < 0.5
    others = [0, 1, 3, 4]
    np.testing.assert_array_equal(out[0, others], raw[0, others])
    np.testing.assert_array_equal(out[1:], raw[1:])
    # an exact match that already leads keeps its score
    out2, _ = F.exact_caption_first(np.array([[5.0, 1.0, 0.0]], np.float32), np.array([[1.0, 0.5, 0.1]], np.float32))
    np.testing.assert_array_equal(out2, [[5.0, 1.0, 0.0]])


def test_exact_caption_rule_is_adopted_only_when_the_supervision_confirms_it():
    """On the fit's generated supervision (anchor j's caption as prompt, target j): adopted when the caption names
    the source (R@1 rises), refused when the matching caption belongs to another image (R@1 would fall)."""
    n = 12
    targets = np.arange(n)
    y = np.zeros((n, n), np.float32)
    y[targets, targets] = 1.0
    rng = np.random.default_rng(0)
    rep = rng.normal(size=(n, n)).astype(np.float32)
    rep[targets, targets] += 2.0
    rep[targets, (targets + 1) % n] += 2.5  # a sibling outscores the source on half the rows
    rep[targets[::2], targets[::2]] += 1.0
    model = F.FusedModel(F.PROMPT, ["rep/null/move"], np.array([1.0]))
    right = np.full((n, n), 0.5, np.float32)
    right[targets, targets] = 1.0
    check = F.exact_caption_check(model, {"rep/null/move": rep, "text/encoder": right}, y, n_generated=n)
    assert check["adopted"] and check["supervision_r1"][1] == 1.0 > check["supervision_r1"][0]
    wrong = np.full((n, n), 0.5, np.float32)
    wrong[targets, (targets + 3) % n] = 1.0
    check = F.exact_caption_check(model, {"rep/null/move": rep, "text/encoder": wrong}, y, n_generated=n)
    assert not check["adopted"] and check["supervision_r1"][1] < check["supervision_r1"][0]
    assert not F.exact_caption_check(model, {"rep/null/move": rep}, y, n_generated=n)["adopted"]
    restored = F.FusedModel.from_json(model.to_json())
    assert restored.exact_caption == model.exact_caption


def _exact_caption_rows(n: int = 16, seed: int = 0):
    """A model and supervision rows where row j is a generation of image j's caption (text cosine 1 on j only)."""
    rng = np.random.default_rng(seed)
    rep = rng.normal(size=(n, n)).astype(np.float32)
    rep[np.arange(n), np.arange(n)] += 3.0
    text = np.full((n, n), 0.5, np.float32)
    text[np.arange(n), np.arange(n)] = 1.0
    model = F.FusedModel(F.PROMPT, ["rep/null/move"], np.array([1.0]), exact_caption={"adopted": True})
    return model, {"rep/null/move": rep, "text/encoder": text}, rng


def test_exact_caption_share_follows_what_the_retrained_subsets_show():
    """Counterfactual targets where a generation's loss depends only on whether its own image was kept choose a
    share below 1 for the other images, held out; targets that follow the model's graded scores keep share 1."""
    n, m = 16, 12
    model, values, rng = _exact_caption_rows(n)
    masks = np.zeros((m, n), np.float32)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = 1.0
    rows = np.arange(n)
    own_only = -masks + 0.01 * rng.normal(size=(m, n))  # (M, R): kept exemplar -> lower loss, nothing else matters
    check = F.exact_caption_share(model, values, F.Counterfactual(rows, masks, own_only))
    assert check["others_share"] < 1.0 and check["heldout_lds_gain"] > F.COUNTERFACTUAL_ADOPT_MARGIN
    assert check["lds_by_share"]["0.0"] > check["lds_by_share"]["1.0"]
    graded = -(masks @ model.calibrate(model.raw(values)).T)  # the model's own scores, others included, are right
    check = F.exact_caption_share(model, values, F.Counterfactual(rows, masks, graded))
    assert check["others_share"] == 1.0 and "share 1 kept" in check["share_why"]
    # a model fitted to the targets is refitted per fold, on the half it picks the share on, never the scored half
    folds = []
    check = F.exact_caption_share(model, values, F.Counterfactual(rows, masks, own_only),
                                  refit=lambda take: folds.append(list(take)) or model)
    assert folds == [list(range(m // 2)), list(range(m // 2, m))] and check["others_share"] < 1.0
    # too few subsets to hold any out: nothing chosen
    assert F.exact_caption_share(model, values, F.Counterfactual(rows, masks[:3], own_only[:3]))["others_share"] == 1.0


def test_the_other_images_share_applies_only_to_rows_that_lifted_an_exact_caption():
    scores = np.array([[0.9, 0.5, 0.2], [0.9, 0.5, 0.2]], np.float32)
    out = F.share_others(scores, [[1], []], 0.1)
    np.testing.assert_allclose(out, [[0.09, 0.5, 0.02], [0.9, 0.5, 0.2]], rtol=1e-6)
    model = F.FusedModel(F.PROMPT, ["a"], np.array([1.0]), exact_caption={"adopted": True, "others_share": 0.2})
    assert F.FusedModel.from_json(model.to_json()).others_share == 0.2
    model.exact_caption["adopted"] = False  # the share belongs to the exact-caption rule
    assert model.others_share == 1.0


def test_the_counterfactual_term_is_credited_only_beyond_the_other_images_share():
    """When a generation's loss follows its own image alone, the share (0) already gives what the retrains show:
    scored with it, a model refitted to the targets gains nothing held out, so it is not adopted and no weight
    moves (the weights are what the other query kinds rank by)."""
    n, m = 16, 12
    model, values, rng = _exact_caption_rows(n)
    masks = np.zeros((m, n), np.float32)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = 1.0
    y = np.eye(n, dtype=np.float32)
    cf = F.Counterfactual(np.arange(n), masks, -masks + 0.01 * rng.normal(size=(m, n)))
    plain = F.fit(values, y, F.PROMPT, "planted", [])
    kept = F.fit_with_counterfactual(values, y, F.PROMPT, "planted", [], cf, plain, share=0.0)
    check = kept.counterfactual
    assert kept is plain and not check["adopted"]
    assert check["heldout_lds_with"] == pytest.approx(check["heldout_lds_without"])


def test_a_generation_reproduces_its_image_only_when_nearest_and_well_clear_of_the_rest():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(train[:4].astype(int) + rng.integers(-6, 7, (4, 16, 16, 3)), 0, 255).astype(np.uint8)
    blend = ((train[4:6].astype(int) + train[6:8].astype(int)) // 2).astype(np.uint8)  # halfway between two images
    gens = np.concatenate([noisy, blend, noisy[:1]])
    hit = F.reproduces(gens, train, [0, 1, 2, 3, 4, 5, 7])  # the last: a copy of image 0 named as 7's generation
    assert hit.tolist() == [True] * 4 + [False] * 3
    with pytest.raises(ScorerError, match="differ in shape"):
        F.reproduces(gens[:, :8], train, range(7))
    big = np.repeat(np.repeat(train[:2], 8, 1), 8, 2)  # 128 px: block-averaged to 64 px before comparing
    assert F.downsample(big).shape == (2, 64 * 64 * 3)
    np.testing.assert_allclose(F.downsample(big).reshape(2, 64, 64, 3)[:, ::4, ::4], train[:2] / 255.0, atol=1e-6)


def test_without_retrains_the_share_follows_what_the_run_memorised(tiny_run):
    """The run's own generations of its anchors' captions decide: copies of their images -> share 0 (the
    generation owes its loss to its own image); generations unlike any training image -> share 1."""
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.gradients import training_images

    store = RunStore.open(tiny_run)
    anchors = F.supervision_anchors(store)
    images = training_images(store).images
    k = store.n_checkpoints - 1
    for gens, share in ((images[anchors], 0.0),
                        (np.random.default_rng(1).integers(0, 256, images[anchors].shape).astype(np.uint8), 1.0)):
        ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=k, progress=False)
        ctx._cache[f"fused/supervision-generations/{k}"] = gens  # stands in for generating them with the run's model
        out = F.memorised_share(ctx, anchors)
        assert out["memorised_share"] == share
        assert out["memorised"] == [len(anchors) if share == 0.0 else 0, len(anchors)]


def test_the_fit_sees_the_concept_classifier_cross_fitted(tiny_run, monkeypatch):
    """The supervision rows' ``class/concept`` values come from classifiers trained without each row's anchor
    (rows stacked per supervision set, each set in anchor order), never from the classifier of every image."""
    from montrage.analysis import concept_classifier as CC
    from montrage.analysis.base import ScoringContext

    store = RunStore.open(tiny_run)
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1)
    n = len(store.train_meta["file_names"])
    asked = []

    def channel_values(sub, kind, final_only, families=F.FAMILIES):
        asked.append(tuple(families))
        return {"pixel": np.zeros((len(sub.queries), n), np.float32),
                **({"class/concept": np.zeros((len(sub.queries), n), np.float32)}
                   if kind == F.IMAGE and "class" in families else {})}

    monkeypatch.setattr(F, "channel_values", channel_values)
    seen = {}

    def crossfitted(train_images, concepts, anchors, query_images, row_anchor, **kw):
        seen.update(anchors=list(anchors), rows=list(row_anchor), n_images=len(query_images))
        return np.ones((len(query_images), len(concepts)), np.float32)

    monkeypatch.setattr(CC, "crossfitted_channel", crossfitted)
    values, target, _ = F.supervision_values(ctx, F.IMAGE, False)
    anchors = F.supervision_anchors(store)
    assert seen["anchors"] == anchors and seen["rows"] == anchors * 3 and seen["n_images"] == len(target)
    assert (values["class/concept"] == 1).all() and (values["pixel"] == 0).all()
    assert asked and all("class" not in f for f in asked)  # the all-image classifier never scores these rows
    prompt_values, _, _ = F.supervision_values(ctx, F.PROMPT, False)
    assert "class/concept" not in prompt_values


def _exemplar_or_concept(seed: int, n_concepts: int = 4, per: int = 6, exemplar: bool = True):
    """Rows of a query per training image (image j of concept j // per, object j % per): ``rep/null/sim-final``
    finds the exemplar (when ``exemplar``) but otherwise favours the same object drawn in other concepts;
    ``class/concept`` knows the concept only, noisily. What an unseen object in a concept's style looks like."""
    rng = np.random.default_rng(seed)
    n = n_concepts * per
    concepts = [f"c{j // per}" for j in range(n)]
    rep = rng.normal(0, 0.3, (n, n))
    for a in range(n):
        rep[a, [j for j in range(n) if j % per == a % per and j // per != a // per]] += 2.0
        if exemplar:
            rep[a, a] += 4.0
    u = rng.normal(0, 1, (n, n_concepts))
    u[np.arange(n), np.arange(n) // per] += 1.2
    cls = u[:, np.arange(n) // per]
    y = np.array([[1.0 if j == a else (0.5 if j // per == a // per else 0.0) for j in range(n)] for a in range(n)],
                 np.float32)
    return {"rep/null/sim-final": rep.astype(np.float32), "class/concept": cls.astype(np.float32)}, y, concepts


def test_the_image_only_fit_names_a_concept_without_its_exemplar():
    """Ground truth by construction: the image-only kind's exemplar-out concept term moves weight to the channel that
    knows the concept, so queries with no exemplar in the training set (unseen objects) get their concept right;
    the prompt kind (no such term) keeps trusting the exemplar channel and names the distractors' concepts."""
    from benchmarks.attribution import between_correct

    values, y, concepts = _exemplar_or_concept(0)
    unseen, _, _ = _exemplar_or_concept(1, exemplar=False)
    truth = [concepts[a] for a in range(len(concepts))]
    top1, ratio = {}, {}
    for kind in (F.PROMPT, F.IMAGE):
        model = F.fit(values, y, kind, "planted", concepts, steps=300)
        w = model.used()
        ratio[kind] = w["class/concept"] / w["rep/null/sim-final"]
        top1[kind] = float(between_correct(model.raw(unseen), concepts, truth).mean())
    assert ratio[F.IMAGE] >= 4 * ratio[F.PROMPT], ratio  # measured .15 -> .99 (seeds 0-8: .13-.17 -> .72-1.19)
    assert top1[F.IMAGE] >= top1[F.PROMPT] + 0.15, top1  # 0 -> .29 (0 -> .21-.33)


def test_checkpoint_channels_only_fits_on_what_the_checkpoints_model_gives(tiny_run_copy):
    """``montrage compare`` asks what each checkpoint's model learned: under ``checkpoint_channels_only`` the fit
    leaves out pixel, text and concept-classifier channels (the same at every checkpoint), and is saved apart from
    the ordinary model, which does use them."""
    from montrage.analysis.base import ScoringContext

    store = RunStore.open(tiny_run_copy)
    last = store.n_checkpoints - 1
    models, paths = {}, {}
    for only in (False, True):
        ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=last,
                             options={"query_mode": "B", F.CHECKPOINT_ONLY_OPTION: only})
        models[only] = F.fitted_model(ctx, "montrage-all", F.IMAGE, final_only=False)
        paths[only] = F._model_path(ctx, "montrage-all", F.IMAGE)
    ordinary = {F.family(c) for c in models[False].channels}
    assert {"pixel", "class"} <= ordinary  # what the option must take away is there without it
    only = {F.family(c) for c in models[True].channels}
    assert only and not only & set(F.CHECKPOINT_FREE_FAMILIES) and only <= {"rep", "grad", "dyn", "steps"}
    assert paths[True] != paths[False] and paths[True].is_file() and paths[False].is_file()
