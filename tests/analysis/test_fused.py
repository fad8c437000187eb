"""The fused montrage model: per-query-kind weights pick the channel that carries the ground truth, and the
JSON says which channels each query used."""
import shutil

import numpy as np
import pytest

from montrage.analysis import fused as F
from montrage.analysis.attribute import attribute
from montrage.analysis.base import available
from montrage.analysis.queries import probe_queries
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

    def fake_supervision(ctx, kind, final_only):
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
    assert np.mean(res.scores.argmax(1) == targets) >= 0.9
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
    res = attribute(run, "montrage", options=dict(opts), write_store=False, progress=False)
    assert np.isfinite(res.scores).all()
    rows = res.payload["queries"]
    assert all(r["query_kind"] == "prompt" for r in rows)
    used = rows[0]["channels"]
    assert {"rep/null/sim-final", "rep/caption/sim-final", "rep/null/move", "grad/dtrak", "pixel"} <= set(used)
    st = RunStore.open(run)
    q = probe_queries(st)
    q.prompts = [""] * len(q)
    img = attribute(run, "montrage", queries=q, options=dict(opts), write_store=False, progress=False)
    assert all(r["query_kind"] == "image" for r in img.payload["queries"])
    assert not any(c.startswith("rep/caption") for c in img.payload["queries"][0]["channels"])
    final = attribute(run, "montrage-final", options=dict(opts), write_store=False, progress=False)
    chans = final.payload["queries"][0]["channels"]
    assert not any(("move" in c or "sim-path" in c or c == "rep/null/loss") for c in chans)
    conc = attribute(run, "montrage", options={**opts, "concept": "by artist-0"}, write_store=False, progress=False)
    assert conc.payload["concept"] == "by artist-0" and np.isfinite(conc.scores).all()
