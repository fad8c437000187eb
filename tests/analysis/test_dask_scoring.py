"""Dask scoring (montrage.analysis.dask_scoring) equals the in-process Dynamics scores.

Uses a LocalCluster of 2 *process* workers (processes=True: the graph, including the Zarr arrays, is
pickled to the workers as it would be for a remote cluster) on small synthetic stores written directly
through RunStore.append (no training).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from montrage.storage import CheckpointRecord, RunStore, StoreDims
from montrage.storage import schema as S

MODULES = ["mid_block", "up_blocks.0"]
METHODS = ["final-sim", "montrage-unsupervised", "montrage", "dynamics-only", "loss-codescent"]


def build_store(path, n=45, K=4, P=5, dtype="float32", nan_row=None):
    """n training images of 3 concepts drifting apart over K checkpoints; 2 conditions, 2 timesteps, F=6."""
    C, T, F, A = 2, 2, 6, 3
    anchors = [0, n // 2, n - 1]
    dims = StoreDims(n_train=n, n_probes=P, n_anchors=A, n_conditions=C, n_timesteps=T,
                     feature_dims={m: F for m in MODULES}, image_shape=(4, 4, 3), lora_names=["w"],
                     lora_shapes=[[4]], feature_dtype=dtype)
    concepts = [f"artist-{i % 3}" for i in range(n)]
    run_config = {"capture": {"modules": MODULES, "conditions": ["null", "caption"], "timesteps": [100, 500]},
                  "base": "embedded", "resolution": 4}
    train_meta = {S.ATTR_FILE_NAMES: [f"{i:03d}.png" for i in range(n)], S.ATTR_CAPTIONS: [f"x by {c}" for c in concepts],
                  S.ATTR_CONCEPTS: concepts, S.ATTR_EXTRA: [{} for _ in range(n)], S.ATTR_DATASET_FINGERPRINT: "synthetic"}
    probe_meta = {S.ATTR_PROMPTS: [f"p{j}" for j in range(P)], S.ATTR_SEEDS: list(range(P)),
                  S.ATTR_CONCEPTS: [f"artist-{j % 3}" for j in range(P)], S.ATTR_KINDS: ["between"] * P,
                  S.ATTR_META: [{} for _ in range(P)]}
    rng = np.random.default_rng(0)
    base = {m: rng.normal(size=(n, C, T, F)) for m in MODULES}
    pbase = {m: rng.normal(size=(P, C, T, F)) for m in MODULES}
    direction = {m: rng.normal(size=(3, C, T, F)) for m in MODULES}
    cidx = np.arange(n) % 3
    with RunStore.create_or_resume(path, run_config, {"test": 1}, dims, train_meta, probe_meta, anchors) as st:
        for k in range(K):
            feats = {S.TRAIN: {}, S.ANCHORS: {}, S.PROBES: {}}
            for m in MODULES:
                tr = base[m] + 0.4 * k * direction[m][cidx] + 0.1 * rng.normal(size=base[m].shape)
                if nan_row is not None and k == K - 1:
                    tr[nan_row] = np.nan
                feats[S.TRAIN][m] = tr
                feats[S.ANCHORS][m] = base[m][anchors] + 0.4 * k * direction[m][cidx[anchors]] + 0.1 * rng.normal(size=(A, C, T, F))
                feats[S.PROBES][m] = pbase[m] + 0.4 * k * direction[m][np.arange(P) % 3]
            losses = {kind: rng.random((cnt, C, T)) / (k + 1) for kind, cnt in ((S.TRAIN, n), (S.ANCHORS, A), (S.PROBES, P))}
            st.append(CheckpointRecord(step=10 * k, wall_time=float(k), train_loss=0.1, features=feats, losses=losses,
                                       probe_images=rng.integers(0, 255, (P, 4, 4, 3), dtype=np.uint8),
                                       lora=np.arange(4, dtype=np.float32) + k))
    return path


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def store32(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("dask") / "run32")


@pytest.mark.parametrize("method", METHODS)
def test_attribute_on_cluster_equals_in_process(store32, client, method):
    from montrage.analysis.attribute import attribute

    kw = dict(options={"query_mode": "A"}, write_store=False, progress=False)
    local = attribute(store32, method, **kw)
    remote = attribute(store32, method, scheduler=client, **kw)
    assert remote.scores.shape == local.scores.shape == (5, 45)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-5, atol=1e-6)
    assert [q["top"][0]["train_index"] for q in remote.payload["queries"]] == \
           [q["top"][0]["train_index"] for q in local.payload["queries"]]


@pytest.mark.parametrize("dtype,nan_row", [("float32", None), ("float16", None), ("float32", 7)])
def test_stats_and_multi_chunk_scores_equal(tmp_path, client, dtype, nan_row):
    """Many dask chunks along the training axis (chunk=8 of 45), float16 stores, a NaN training row."""
    from montrage.analysis import dask_scoring as D
    from montrage.analysis.trajectories import Dynamics, probe_trajectory

    store = RunStore.open(build_store(tmp_path / "run", dtype=dtype, nan_row=nan_row))
    if dtype == "float16":
        assert store.array(S.feature_path(S.TRAIN, MODULES[0])).dtype == np.float16
    rtol = 1e-5  # one kernel: both paths cast blocks to float32 the same way
    for condition in (("null", "caption") if dtype == "float32" and nan_row is None else ("null",)):
        dyn = Dynamics(store, condition)
        q = probe_trajectory(store, condition, dyn.K - 1, range(5))
        weights = np.random.default_rng(1).random(len(dyn.channels))
        local = dyn.score(q, weights)
        ref_stats = dyn.stats()
        dd = Dynamics(store, condition)
        got_stats = D.stats(dd, chunk=8, scheduler=client)
        assert set(got_stats) == set(ref_stats)
        for key, (mean, std) in ref_stats.items():
            np.testing.assert_allclose(got_stats[key][0], mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got_stats[key][1], std, rtol=1e-5, atol=1e-6)
        dd._stats = got_stats
        got = D.score(dd, q, weights, chunk=8, scheduler=client)
        np.testing.assert_allclose(got, local, rtol=rtol, atol=1e-6)


def test_cli_scheduler_local(store32, capsys):
    from montrage.cli import main

    assert main(["--quiet", "attribute", str(store32), "--method", "montrage-unsupervised", "--query-mode", "A",
                 "--out", str(store32 / "local.json")]) == 0
    first = RunStore.open(store32).read_attribution("montrage-unsupervised", 30)[0]
    assert main(["--quiet", "attribute", str(store32), "--method", "montrage-unsupervised", "--query-mode", "A",
                 "--scheduler", "local", "--out", str(store32 / "dask.json")]) == 0
    second = RunStore.open(store32).read_attribution("montrage-unsupervised", 30)[0]
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)
    a, b = (json.loads((store32 / f).read_text()) for f in ("local.json", "dask.json"))
    assert [q["predicted_concept"] for q in a["queries"]] == [q["predicted_concept"] for q in b["queries"]]


def test_unreachable_scheduler_is_a_clean_error(store32, capsys, monkeypatch):
    from montrage.analysis import dask_scoring
    from montrage.cli import main

    monkeypatch.setattr(dask_scoring, "CONNECT_TIMEOUT_S", 1.0)

    assert main(["--quiet", "attribute", str(store32), "--method", "final-sim", "--query-mode", "A",
                 "--scheduler", "tcp://127.0.0.1:9", "--out", str(store32 / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "dask scheduler" in err


@pytest.mark.slow
def test_scale_memory_20k(tmp_path):
    """Small version of `python -m benchmarks.scale`: 20,000 images x 20 checkpoints x 512 float16;
    attribution of 64 probes in a subprocess stays far below 2 GB peak RSS, in-process and with dask."""
    from benchmarks import scale

    build = scale.build_store(tmp_path / "run", n_train=20_000, checkpoints=20, progress=False)
    assert build["dtype"] == "float16"
    for method in ("final-sim", "montrage-unsupervised"):
        for sched in (None, "threads"):
            m = scale.measure_scoring(tmp_path / "run", method, sched, timeout=900)
            assert m["rc"] == 0, m
            assert m["peak_rss_mb"] < scale.RSS_TARGET_MB, m
