"""The fused model's channels: what each family computes, which families a run can give, and the shared passes
that compute representations and gradients from one forward."""
import numpy as np
import pytest

from montrage.analysis.attribute import attribute
from montrage.analysis.base import ScoringContext
from montrage.analysis.fused import channels as FC
from montrage.analysis.fused import kinds as FK
from montrage.analysis.queries import probe_queries
from montrage.storage import RunStore


def test_near_duplicate_fires_only_for_a_copy():
    """Ratio test on planted similarities: a copy (one image far closer than the rest) gets a large value at its
    source and 0 elsewhere; a generation-like query (several images about equally close) gets a small one."""
    rng = np.random.default_rng(0)
    sim = 0.5 + 0.4 * rng.random((2, 20))
    sim[0, 7] = 0.998  # the copy's source: cos 0.996 vs at most 0.8 for the rest
    sim[1, 3], sim[1, 4] = 0.93, 0.925  # two nearly equal neighbours
    dup = FC.near_duplicate(sim)
    assert dup[0].argmax() == 7 and dup[0, 7] > 2.0 and np.count_nonzero(dup[0]) == 1
    assert dup[1].argmax() == 3 and dup[1, 3] < 0.2
    # kept on its own scale: not standardised per query like the other channels
    np.testing.assert_array_equal(FK.feature("dup/pixel", dup), dup)


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
    assert "steps/learned" not in FC.channel_values(ctx, FK.IMAGE, False, ("rep", "steps"))
    n = len(targets)
    steps = np.repeat(np.arange(1, 41), n)  # 40 steps, every image drawn at each; checkpoints at 0, 10, ..., 40
    idx = np.tile(np.arange(n), 40)
    loss = 1.0 - 0.02 * idx * (steps / 40.0)  # image i learns 0.02 i over training
    monkeypatch.setattr(store, "step_signals", lambda: {S.SIGNAL_STEP: steps, S.SIGNAL_INDEX: idx,
                                                        S.SIGNAL_TIMESTEP: np.zeros_like(steps),
                                                        S.SIGNAL_LOSS: loss.astype(np.float32)})
    ctx = ScoringContext(store=store, queries=q, checkpoint=store.n_checkpoints - 1, options={"query_mode": "A"})
    learned = FC.channel_values(ctx, FK.IMAGE, False, ("rep", "steps"))["steps/learned"]
    assert learned.shape == (len(q), n)
    assert (np.diff(learned[0]) > 0).all()  # ranks the images by how much of them was learned
    assert "steps/learned" not in FC.channel_values(ctx, FK.IMAGE, True, ("rep", "steps"))  # montrage-final
    # the first checkpoint has no interval before it (e.g. `montrage compare` over every checkpoint): no channel,
    # no error
    first = ScoringContext(store=store, queries=q, checkpoint=0, options={"query_mode": "A"})
    assert "steps/learned" not in FC.channel_values(first, FK.IMAGE, False, ("rep", "steps"))


def test_concept_mean_spreads_a_prompts_pull_over_its_concept():
    """A prompt naming concept b with an object only a drew: per image, text similarity peaks on a's image of that
    object; averaged per concept, b's images lead (the composition's concept), unlabelled images keep their own."""
    sim = np.array([[0.9, 0.1, 0.6, 0.6, 0.3]], np.float32)  # a's circle, a's square, b's two images, unlabelled
    out = FC.concept_mean(sim, ["a", "a", "b", "b", ""])
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.6, 0.6, 0.3]])
    assert sim.argmax() == 0 and out[0, :4].argmax() == 2


def test_final_checkpoint_channels_need_only_the_final_checkpoints_encoding(tiny_run):
    """A model that uses the final checkpoint's channels only re-encodes its queries under that checkpoint alone; its
    values are those the whole trajectory gives (the earlier checkpoints are left NaN, and nothing reads them)."""
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.scorers import query_trajectory

    store = RunStore.open(tiny_run)
    q = probe_queries(store)
    last = store.n_checkpoints - 1
    alone = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B"})
    got = FC.rep_channels(alone, "null", final_only=True)
    traj = query_trajectory(FC._with_condition(alone, "null"), final_only=True)
    assert np.isnan(traj.losses[:last]).all() and np.isfinite(traj.losses[last]).all()
    whole = ScoringContext(store=store, queries=q, checkpoint=last, options={"query_mode": "B"})
    full = FC.rep_channels(whole, "null", final_only=False)  # the whole trajectory first: then it is reused
    assert set(got) == {"rep/null/sim-final"} and "rep/null/move" in full
    np.testing.assert_allclose(got["rep/null/sim-final"], full["rep/null/sim-final"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(FC.rep_channels(whole, "null", final_only=True)["rep/null/sim-final"],
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
    got = FC.grad_channels(ctx, final_only=True)
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
    ref = {**FC.rep_channels(apart, "caption", final_only=True), **FC.grad_channels(apart, final_only=True)}
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
    got = FC.channel_values(ctx, FK.PROMPT, final_only=True, families=("rep", "grad"))
    assert calls == {"extract": [("null",)], "shared": 1}
    assert {"rep/caption/sim-final", "rep/null/sim-final", "grad/dtrak", f"grad/tracin/k{last}"} <= set(got)
    for c, v in ref.items():
        np.testing.assert_allclose(got[c], v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max())))
    # with other gradient timesteps the inputs differ: no shared pass, the extractor encodes the caption itself
    calls["extract"].clear()
    other = ScoringContext(store=store, queries=q, checkpoint=last, options={**opts, "grad_timesteps": [300]})
    FC.channel_values(other, FK.PROMPT, final_only=True, families=("rep", "grad"))
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
        q = FC.subset(q, list(range(len(q))), [""] * len(q))
    last = store.n_checkpoints - 1
    opts = {"query_mode": "B", "proj_dim": 64}
    apart = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    ref = FC.grad_channels(apart, final_only=False)
    conditions = ("null", "caption") if kind == "prompt" else ("null",)
    for cond in conditions:
        ref.update(FC.rep_channels(apart, cond, final_only=False))
    encoded = []
    extract = FeatureExtractor.extract

    def counted(self, *a, **kw):
        encoded.append(tuple(self.capture.conditions))
        return extract(self, *a, **kw)

    monkeypatch.setattr(FeatureExtractor, "extract", counted)
    ctx = ScoringContext(store=store, queries=q, checkpoint=last, options=dict(opts))
    got = FC.channel_values(ctx, kind, final_only=False, families=("rep", "grad"))
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
    FC.channel_values(other, kind, final_only=False, families=("rep", "grad"))
    assert encoded.count((shared,)) == store.n_checkpoints
