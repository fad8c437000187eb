"""Warm extra queries: attribute calls sharing a RunStore reuse the run's model and training-side reads (the
store's reader_cache), with the same scores as a cold call; post-hoc training gradients stay per call."""
import numpy as np
import pytest

from montrage.analysis import base as B
from montrage.analysis import gradient_features as GF
from montrage.analysis import trajectories as TR
from montrage.analysis.attribute import attribute
from montrage.analysis.base import ScoringContext
from montrage.analysis.queries import probe_queries
from montrage.analysis.trajectories import Dynamics, QueryTrajectory
from montrage.models.lora import load_lora_state, lora_state
from montrage.storage import RunStore
from tests.analysis.test_trajectories import M, make_store

OPTS = {"proj_dim": 64}


def _count_models(monkeypatch) -> list:
    built = []
    real = B.RunModel

    def counting(*a, **kw):
        built.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(B, "RunModel", counting)
    return built


@pytest.mark.parametrize("method", ["dtrak", "tracin", "montrage-dynamics"])
def test_calls_sharing_a_store_load_the_model_once_and_score_as_a_cold_call(tiny_run_copy, monkeypatch, method):
    st = RunStore.open(tiny_run_copy)
    built = _count_models(monkeypatch)
    queries = [probe_queries(st, indices=[j]) for j in (0, 1)]
    warm = [attribute(tiny_run_copy, method, queries=q, options=dict(OPTS), write_store=False, progress=False,
                      store=st).scores for q in queries]
    assert len(built) == 1 and any(k.startswith("model/") for k in st.reader_cache)
    for q, w in zip(queries, warm):  # a fresh store object: nothing warm
        cold = attribute(tiny_run_copy, method, queries=q, options=dict(OPTS), write_store=False, progress=False,
                         store=RunStore.open(tiny_run_copy)).scores
        np.testing.assert_array_equal(w, cold)
    assert len(built) == 3


def test_dtrak_with_unstored_settings_recomputes_training_gradients_per_call(tiny_run_copy, monkeypatch):
    """What 'today's dtrak' costs: training gradients computed in memory are never kept across calls."""
    st = RunStore.open(tiny_run_copy)
    rows = []
    real = GF._compute
    monkeypatch.setattr(GF, "_compute", lambda ctx, k, output, s, sl: rows.append(1) or real(ctx, k, output, s, sl))
    opts = {**OPTS, "store_gradients": False, "proj_seed": 5}
    for j in (0, 1):
        attribute(tiny_run_copy, "dtrak", queries=probe_queries(st, indices=[j]), options=dict(opts),
                  write_store=False, progress=False, store=st)
    assert len(rows) == 2
    assert not any(k.startswith("grad/stored/") for k in st.reader_cache)


def test_components_at_follows_the_checkpoint_on_a_shared_model(tiny_run):
    st = RunStore.open(tiny_run)
    q = probe_queries(st, indices=[0])
    a, b = ScoringContext(store=st, queries=q, checkpoint=2), ScoringContext(store=st, queries=q, checkpoint=2)
    assert a.model is b.model
    for ctx, k in ((a, 1), (b, 2), (a, 0), (b, 2), (b, 1)):
        unet = ctx.components_at(k).unet
        got = lora_state(unet)
        want = st.lora_weights(k)
        assert all(np.array_equal(got[n].numpy(), want[n]) for n in want), k
    from montrage.models.checkpoints import RunModel

    ref = RunModel(st.run_config)  # peft's loader on a fresh model gives the same forward pass
    load_lora_state(ref.components.unet, st.lora_weights(1))
    import torch

    x, t = torch.randn(1, *ref.components.latent_shape), torch.tensor([300])
    cond = ref.components.encode_prompts(["x"])
    with torch.no_grad():
        assert torch.equal(ref.components.predict(x, t, cond), a.components_at(1).predict(x, t, cond))


@pytest.mark.parametrize("chunk", [2, 64])
def test_resident_training_features_score_as_streamed_blocks(tmp_path, monkeypatch, chunk):
    rng = np.random.default_rng(1)
    K, N, T, F, Q = 3, 7, 2, 5, 3
    st = make_store(tmp_path / "s", rng.normal(size=(K, N, T, F)).astype(np.float32),
                    rng.random((K, N, T)).astype(np.float32))
    q = QueryTrajectory({M: rng.normal(size=(K, Q, T, F)).astype(np.float32)}, rng.random((K, Q, T)).astype(np.float32))
    held = Dynamics(st, chunk=chunk)
    assert held.resident() is not None
    monkeypatch.setattr(TR, "RESIDENT_BYTES", 0)
    streamed = Dynamics(st, chunk=chunk)
    assert streamed.resident() is None
    w = rng.random(len(held.channels))
    np.testing.assert_array_equal(held.channel_tensor(q), streamed.channel_tensor(q))
    np.testing.assert_array_equal(held.score(q, w), streamed.score(q, w))
    idx = np.array([5, 1, 3])
    np.testing.assert_array_equal(held.channel_tensor(q, idx), streamed.channel_tensor(q, idx))
    sparse = np.zeros(len(held.channels))
    sparse[[0, len(sparse) - 1]] = 1.0  # non-consecutive checkpoints: orthogonal reads
    np.testing.assert_array_equal(held.score(q, sparse), streamed.score(q, sparse))


@pytest.mark.parametrize("vmap", [True, False])
def test_gradients_at_several_weight_sets_equal_one_call_per_set(vmap):
    """One batched pass over per-item LoRA tensors (a query's trajectory) = one projected_gradients call per
    checkpoint, and what each forward saw (``aux_fn``) = that of one call per set; the loop fallback too, leaving
    the UNet's own LoRA tensors as they were."""
    import torch

    from montrage.analysis import gradients as G
    from tests.analysis.test_gradients import random_images, randomize_lora, tiny_components

    comps = tiny_components(0)
    images, prompts, seeds = random_images(2, 3), ["a cat", ""], [7, 8]
    proj = G.Projector.for_unet(comps.unet, 32, 0)
    sets = []
    for seed in (21, 22, 23):
        randomize_lora(comps.unet, seed)
        sets.append({n: p.clone() for n, p in G.lora_parameters(comps.unet).items()})
    from montrage.losses.diffusion import per_sample_mse

    def aux(pred, item):  # what the forward saw, row by row: its loss and pooled prediction
        return {"loss": per_sample_mse(pred, item["target"]), "pooled": pred.mean((2, 3))}

    one_each, seen_each = [], []
    for w in sets:
        with torch.no_grad():
            for n, p in comps.unet.named_parameters():
                if n in w:
                    p.copy_(w[n])
        one_each.append(G.projected_gradients(comps, images, prompts, seeds, output="denoise", timesteps=(100, 700),
                                              projector=proj))
        seen_each.append(G.projected_gradients_shared(comps, images, prompts, seeds, outputs=["denoise"],
                                                      timesteps=(100, 700), projector=proj, aux_fn=aux)[1])
    before = {n: p.clone() for n, p in G.lora_parameters(comps.unet).items()}
    if not vmap:
        setattr(comps.unet, G._VMAP_FAILED, True)
    batched, seen = G.projected_gradients_at_aux(comps, sets, images, prompts, seeds, output="denoise",
                                                 timesteps=(100, 700), projector=proj, batch_size=5, aux_fn=aux)
    assert len(batched) == 3 and len(seen) == 3
    for a, b in zip(seen_each, seen):  # the same forwards' tensors, per set, (image, timestep, ...)
        assert set(b) == {"loss", "pooled"} and b["loss"].shape == (2, 2) and b["pooled"].shape[:2] == (2, 2)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert not np.allclose(seen[0]["pooled"], seen[1]["pooled"])
    for a, b in zip(one_each, batched):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # float rounding only
    assert not np.allclose(batched[0], batched[1])
    after = G.lora_parameters(comps.unet)
    assert all(torch.equal(before[n], after[n]) for n in before)
