"""The montrage scorers end to end: each query kind routed to its model, the JSON saying which channels each query
used, and compare's checkpoint-channels-only fit."""
import shutil

import numpy as np
import pytest

from montrage.analysis.attribute import attribute
from montrage.analysis.base import ScoringContext, available, get_scorer
from montrage.analysis.fused import channels as FC
from montrage.analysis.fused import kinds as FK
from montrage.analysis.fused import scorer as FSc
from montrage.analysis.queries import probe_queries
from montrage.storage import RunStore
from tests.analysis.fused.helpers import CHANNELS, planted_values


def test_scorer_routes_each_query_kind_to_its_model_and_reports_it(planted_run, monkeypatch):
    path, targets = planted_run
    store = RunStore.open(path)
    n = len(targets)

    def fake_channels(ctx, kind, final_only, families=("rep", "grad", "pixel")):
        t = [int(i.split("-")[1]) for i in ctx.queries.ids]
        return planted_values(t, n, kind, seed=len(t) + (kind == FK.PROMPT))

    def fake_supervision(ctx, kind, final_only, families=FK.FAMILIES):
        anchors = list(store.anchor_indices)
        from montrage.analysis.model import supervision_targets

        return (planted_values(anchors, n, kind, seed=7), supervision_targets(anchors, np.arange(n), store.concepts),
                "planted")

    monkeypatch.setattr(FSc, "channel_values", fake_channels)
    monkeypatch.setattr(FSc, "supervision_values", fake_supervision)
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
        kind = FK.IMAGE if i in image_only else FK.PROMPT
        assert row["query_kind"] == kind
        w = row["channels"]
        assert set(w) == set(CHANNELS)
        assert max(w, key=w.get) == ("rep/null/move" if kind == FK.IMAGE else "grad/dtrak")
    saved = sorted(p.name for p in (path / "montrage-models").iterdir())
    assert len(saved) == 2 and any("-prompt-" in s for s in saved) and any("-image-" in s for s in saved)


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
                                                        options=dict(opts)), FK.IMAGE)
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
    q = FC.subset(q, [0] * len(picks), [captions[i] for i in picks])
    q.ids = [f"exact-{i}" for i in picks]
    exact = attribute(run, "montrage", queries=q, options=dict(opts), write_store=False, progress=False)
    rows = exact.payload["queries"]
    assert [r["exact_caption_first"] for r in rows] == [[i] for i in picks]
    assert list(exact.scores.argmax(1)) == picks


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
                             options={"query_mode": "B", FK.CHECKPOINT_ONLY_OPTION: only})
        models[only] = FSc.fitted_model(ctx, "montrage-all", FK.IMAGE, final_only=False)
        paths[only] = FSc._model_path(ctx, "montrage-all", FK.IMAGE)
    ordinary = {FK.family(c) for c in models[False].channels}
    assert {"pixel", "class"} <= ordinary  # what the option must take away is there without it
    only = {FK.family(c) for c in models[True].channels}
    assert only and not only & set(FK.CHECKPOINT_FREE_FAMILIES) and only <= {"rep", "grad", "dyn", "steps"}
    assert paths[True] != paths[False] and paths[True].is_file() and paths[False].is_file()
