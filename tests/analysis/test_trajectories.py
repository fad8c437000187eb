"""Dynamics channels against a naive per-pair reference and small hand-computed cases."""
import numpy as np
import pytest

from montrage.analysis.trajectories import Channel, Dynamics, QueryTrajectory, probe_trajectory
from montrage.storage import CheckpointRecord, RunStore, StoreDims
from montrage.storage import schema as S

M = "mid_block"


def make_store(path, feats, losses):
    """feats (K, N, T, F), losses (K, N, T) -> store with those training features (one condition)."""
    K, N, T, F = feats.shape
    dims = StoreDims(n_train=N, n_probes=1, n_anchors=0, n_conditions=1, n_timesteps=T, feature_dims={M: F},
                     image_shape=(2, 2, 3), lora_names=["w"], lora_shapes=[[1]])
    cfg = {"capture": {"modules": [M], "conditions": ["null"], "timesteps": list(range(T))}, "base": "none"}
    st = RunStore.create_or_resume(path, cfg, {"t": 1}, dims, {S.ATTR_FILE_NAMES: [str(i) for i in range(N)],
                                   S.ATTR_CONCEPTS: [""] * N}, {S.ATTR_PROMPTS: ["p"]}, [])
    for k in range(K):
        st.append(CheckpointRecord(step=k, wall_time=0.0, train_loss=None,
                                   features={S.TRAIN: {M: feats[k][:, None]}, S.PROBES: {M: feats[k][:1, None]},
                                             S.ANCHORS: {M: np.zeros((0, 1, T, F))}},
                                   losses={S.TRAIN: losses[k][:, None], S.PROBES: losses[k][:1, None],
                                           S.ANCHORS: np.zeros((0, 1, T))},
                                   probe_images=np.zeros((1, 2, 2, 3), np.uint8), lora=np.zeros(1, np.float32)))
    st.close()
    return RunStore.open(path)


def shifted_cos(a, b):
    """(1 + cos) / 2; a vector with a non-finite entry, or a zero vector, carries no signal: 0.5."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.5
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.5 if na == 0 or nb == 0 else (1 + a @ b / (na * nb)) / 2


def naive_stats(rows):
    """Mean/std over the training rows whose vector is finite; relative std floor (README, kernel docs)."""
    ok = rows[np.isfinite(rows).all(1)].astype(np.float64)
    mu, sd = ok.mean(0), ok.std(0)
    scale = sd.mean()
    return mu, (np.maximum(sd, 1e-2 * scale) if scale > 0 else np.ones_like(sd))


def naive_channels(feats, losses, qf, ql, ch):
    """The documented formulas, one pair at a time (independent of the vectorised implementation)."""
    K, N, T, F = feats.shape
    Q = qf.shape[1]
    out = np.zeros((Q, N))
    if ch.kind == "loss":
        tr = np.diff(losses, axis=0).transpose(1, 0, 2).reshape(N, -1)
        q = np.diff(ql, axis=0).transpose(1, 0, 2).reshape(Q, -1)
    else:
        k, t = ch.k, ch.t
        if ch.kind == "sim":
            tr, q = feats[k, :, t], qf[k, :, t]
        else:
            tr, q = feats[k, :, t] - feats[k - 1, :, t], qf[k, :, t] - qf[k - 1, :, t]
    mu, sd = naive_stats(tr)
    for j in range(Q):
        for i in range(N):
            out[j, i] = shifted_cos((q[j] - mu) / sd, (tr[i] - mu) / sd)
    return out


@pytest.mark.parametrize("chunk", [2, 64])
def test_vectorised_channels_match_naive_reference(tmp_path, chunk):
    rng = np.random.default_rng(0)
    K, N, T, F, Q = 3, 7, 2, 5, 4
    feats = rng.normal(size=(K, N, T, F)).astype(np.float32)
    losses = rng.random((K, N, T)).astype(np.float32)
    st = make_store(tmp_path / "s", feats, losses)
    q = QueryTrajectory({M: rng.normal(size=(K, Q, T, F)).astype(np.float32)}, rng.random((K, Q, T)).astype(np.float32))
    dyn = Dynamics(st, chunk=chunk)
    tensor = dyn.channel_tensor(q)
    assert len(dyn.channels) == K * T + (K - 1) * T + 1
    for c, ch in enumerate(dyn.channels):
        np.testing.assert_allclose(tensor[c], naive_channels(feats, losses, q.features[M], q.losses, ch),
                                   atol=2e-4, err_msg=ch.label())
    w = rng.random(len(dyn.channels))
    np.testing.assert_allclose(dyn.score(q, w), np.einsum("c,cqn->qn", w, tensor), rtol=1e-4, atol=1e-4)
    idx = np.array([5, 1, 3])
    np.testing.assert_allclose(dyn.channel_tensor(q, idx), tensor[:, :, idx], atol=1e-5)


@pytest.mark.parametrize("backend", ["in-process", "dask"])
def test_nan_rows_and_features_follow_one_rule(tmp_path, backend):
    """NaN training rows, a NaN feature, a NaN query and a NaN loss: in-process and dask agree with the
    naive reference (no signal = 0.5 for exactly the pairs that vector enters), for channels and scores."""
    from montrage.analysis import dask_scoring as D

    rng = np.random.default_rng(3)
    K, N, T, F, Q = 3, 9, 2, 4, 3
    feats = rng.normal(size=(K, N, T, F)).astype(np.float32)
    feats[2, 4] = np.nan  # a whole row at the last checkpoint (sim k=2, move k=2)
    feats[0, 6, 1, 2] = np.inf  # one feature of one timestep at k=0 (sim k=0, move k=1; t=1 only)
    feats[:, :, 0, 3] = 5.0  # a constant feature: the relative floor keeps a query's deviation bounded
    losses = rng.random((K, N, T)).astype(np.float32)
    losses[1, 2, 0] = np.nan
    qf = rng.normal(size=(K, Q, T, F)).astype(np.float32)
    qf[1, 1, 0, 0] = np.nan
    ql = rng.random((K, Q, T)).astype(np.float32)
    st = make_store(tmp_path / "s", feats, losses)
    q = QueryTrajectory({M: qf}, ql)
    dyn = Dynamics(st, chunk=4)
    ref = np.stack([naive_channels(feats, losses, qf, ql, ch) for ch in dyn.channels])
    w = rng.random(len(dyn.channels))
    w[3] = 0.0
    if backend == "dask":
        dyn._stats = D.stats(dyn, chunk=4, scheduler="sync")
        got = D.score(dyn, q, w, chunk=4, scheduler="sync")
    else:
        got = dyn.score(q, w)
    np.testing.assert_allclose(dyn.channel_tensor(q), ref, atol=2e-4)
    np.testing.assert_allclose(got, np.einsum("c,cqn->qn", w, ref), rtol=1e-4, atol=1e-4)
    assert np.isfinite(got).all()
    sim_last = [c for c, ch in enumerate(dyn.channels) if ch.kind == "sim" and ch.k == 2]
    assert np.all(ref[sim_last][:, :, 4] == 0.5)


def test_std_floor_is_relative(tmp_path):
    """Scaling every feature by 1e-6 (or 1e3) leaves every channel unchanged: no absolute floor."""
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(2, 8, 1, 5)).astype(np.float32)
    feats[:, :, 0, 4] = feats[:, :1, 0, 4]  # nearly constant feature
    feats[1, 3, 0, 4] += 1e-3
    q = rng.normal(size=(2, 2, 1, 5)).astype(np.float32)
    out = []
    for i, scale in enumerate((1e-6, 1.0, 1e3)):
        st = make_store(tmp_path / f"s{i}", feats * scale, np.ones((2, 8, 1), np.float32))
        out.append(Dynamics(st, kinds=("sim", "move")).channel_tensor(QueryTrajectory({M: q * scale},
                                                                                     np.ones((2, 2, 1), np.float32))))
    np.testing.assert_allclose(out[0], out[1], atol=1e-3)
    np.testing.assert_allclose(out[2], out[1], atol=1e-3)


def test_hand_computed_identity_and_opposite(tmp_path):
    # three training rows; z-normalised they are exactly +-1 patterns; a query equal to row 0 has cos 1
    feats = np.array([[[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 0.0]]]], np.float32)  # (K=1, N=3, T=1, F=2)
    st = make_store(tmp_path / "s", feats, np.ones((1, 3, 1), np.float32))
    dyn = Dynamics(st, kinds=("sim",))
    q = QueryTrajectory({M: feats[:, :2]}, np.ones((1, 2, 1), np.float32))
    tensor = dyn.channel_tensor(q)[0]
    # feature 0: mean 0, std sqrt(2/3); feature 1 constant -> z = 0. Row 0 vs itself: cos 1 -> 1.0;
    # row 0 vs row 1: cos -1 -> 0.0; row 2 is the mean (zero vector): cos 0 -> 0.5
    np.testing.assert_allclose(tensor, [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], atol=1e-4)


def test_move_channel_sees_shared_change_not_shared_state(tmp_path):
    rng = np.random.default_rng(1)
    N, F = 6, 8
    base = rng.normal(size=(N, 1, F)) * 10
    step = rng.normal(size=(N, 1, F))
    feats = np.stack([base, base + step]).astype(np.float32)  # (2, N, 1, F)
    st = make_store(tmp_path / "s", feats, np.ones((2, N, 1), np.float32))
    dyn = Dynamics(st, kinds=("move",))
    # a query with unrelated state that moves like training image 4
    start = rng.normal(size=(1, 1, F)).astype(np.float32) * 10
    q = QueryTrajectory({M: np.stack([start, start + step[4:5]]).astype(np.float32)}, np.ones((2, 1, 1), np.float32))
    assert dyn.channels == [Channel("move", M, 0, 1)]
    assert int(np.argmax(dyn.channel_tensor(q)[0, 0])) == 4


def test_probe_trajectory_reads_mode_a(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(2, 3, 1, 4)).astype(np.float32)
    st = make_store(tmp_path / "s", feats, np.ones((2, 3, 1), np.float32))
    tr = probe_trajectory(st, "null", 1, [0])
    np.testing.assert_allclose(tr.features[M][:, 0], feats[:, 0])
