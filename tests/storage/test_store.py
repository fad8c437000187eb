import numpy as np
import pytest
import zarr

from montrage.errors import (CheckpointNotFoundError, StoreConfigMismatchError, StoreError, StoreLayoutError,
                             StoreLockedError, TrainingImagesChangedError)
from montrage.storage import CheckpointRecord, RunStore, StoreDims
from montrage.storage import schema as S

MODULES = ["mid_block", "up_blocks.0"]


def dims(n=5, p=3, a=2):
    return StoreDims(n_train=n, n_probes=p, n_anchors=a, n_conditions=2, n_timesteps=3,
                     feature_dims={m: 8 for m in MODULES}, image_shape=(4, 4, 3), lora_names=["a", "b"],
                     lora_shapes=[[2, 3], [4]])


def run_config():
    return {"capture": {"modules": MODULES, "conditions": ["null", "caption"], "timesteps": [1, 2, 3]}, "base": "x"}


def record(step, n=5, p=3, a=2, value=None):
    rng = np.random.default_rng(step)
    f = lambda k: {m: (rng.normal(size=(k, 2, 3, 8)) if value is None else np.full((k, 2, 3, 8), value)) for m in MODULES}
    return CheckpointRecord(step=step, wall_time=float(step), train_loss=0.5,
                            features={S.TRAIN: f(n), S.ANCHORS: f(a), S.PROBES: f(p)},
                            losses={S.TRAIN: rng.random((n, 2, 3)), S.ANCHORS: rng.random((a, 2, 3)),
                                    S.PROBES: rng.random((p, 2, 3))},
                            probe_images=rng.integers(0, 255, (p, 4, 4, 3), dtype=np.uint8),
                            lora=np.arange(10, dtype=np.float32) + step)


def create(tmp_path, fingerprint=None):
    return RunStore.create_or_resume(tmp_path, run_config(), fingerprint or {"a": 1}, dims(),
                                     {S.ATTR_FILE_NAMES: [f"f{i}" for i in range(5)], S.ATTR_CONCEPTS: list("aabbb")},
                                     {S.ATTR_PROMPTS: ["p"] * 3}, [0, 3])


def test_append_and_read_back(tmp_path):
    with create(tmp_path) as st:
        recs = [record(s) for s in (0, 10, 20)]
        for r in recs:
            st.append(r)
    ro = RunStore.open(tmp_path)
    assert ro.n_checkpoints == 3 and ro.steps.tolist() == [0, 10, 20]
    np.testing.assert_allclose(ro.features(S.TRAIN, "mid_block")[1], recs[1].features[S.TRAIN]["mid_block"], rtol=1e-6)
    np.testing.assert_array_equal(ro.probe_images(2), recs[2].probe_images)
    w = ro.lora_weights(1)
    np.testing.assert_array_equal(w["a"], (np.arange(6) + 10).reshape(2, 3))
    np.testing.assert_array_equal(w["b"], np.arange(6, 10) + 10)
    assert ro.anchor_indices == [0, 3]
    assert ro.checkpoint_index(20) == 2 and ro.checkpoint_index(None) == 2
    with pytest.raises(CheckpointNotFoundError, match="committed steps"):
        ro.checkpoint_index(15)


def test_dimension_names_for_labelled_readers(tmp_path):
    create(tmp_path).close()
    arr = zarr.open_array(RunStore.store_path(tmp_path) / "train/features/mid_block", mode="r")
    assert arr.metadata.dimension_names == ("checkpoint", "train", "condition", "timestep", "feature")
    arr = zarr.open_array(RunStore.store_path(tmp_path) / "probes/images", mode="r")
    assert arr.metadata.dimension_names == ("checkpoint", "probe", "height", "width", "channel")


def test_uncommitted_checkpoint_invisible_and_trimmed(tmp_path):
    st = create(tmp_path)
    st.append(record(0))
    # simulate a writer killed after appending arrays but before the commit marker
    st.root[S.feature_path(S.TRAIN, "mid_block")].append(np.ones((1, 5, 2, 3, 8), np.float32))
    st.root[f"{S.CHECKPOINTS}/{S.STEP}"].append(np.array([10]))
    reader = RunStore.open(tmp_path)
    assert reader.n_checkpoints == 1 and reader.steps.tolist() == [0]
    assert reader.features(S.TRAIN, "mid_block").shape[0] == 1
    st.close()
    st2 = create(tmp_path)  # resume trims the partial checkpoint
    assert st2.root[S.feature_path(S.TRAIN, "mid_block")].shape[0] == 1
    st2.append(record(10))
    st2.close()
    assert RunStore.open(tmp_path).steps.tolist() == [0, 10]


def test_second_writer_is_refused(tmp_path):
    st = create(tmp_path)
    with pytest.raises(StoreLockedError, match="another process"):
        create(tmp_path)
    st.close()
    create(tmp_path).close()  # released lock can be taken again


def test_other_config_is_refused(tmp_path):
    create(tmp_path, {"capture": {"pooling_grid": 2}}).close()
    with pytest.raises(StoreConfigMismatchError, match="pooling_grid.*store has 2, requested 4"):
        create(tmp_path, {"capture": {"pooling_grid": 4}})


def test_other_layout_version_is_refused(tmp_path):
    create(tmp_path).close()
    g = zarr.open_group(RunStore.store_path(tmp_path), mode="r+")
    g.attrs[S.ATTR_LAYOUT] = 999
    with pytest.raises(StoreLayoutError, match="layout version 999"):
        RunStore.open(tmp_path)
    with pytest.raises(StoreLayoutError):
        create(tmp_path)


def test_steps_must_increase(tmp_path):
    with create(tmp_path) as st:
        st.append(record(10))
        with pytest.raises(StoreError, match="not after"):
            st.append(record(10))


def test_nonfinite_values_recorded_and_flagged(tmp_path, caplog):
    with create(tmp_path) as st:
        st.append(record(0))
        with caplog.at_level("WARNING"):
            st.append(record(1, value=np.nan))
            st.append(record(2, value=np.inf))
        assert sum("non-finite" in r.message for r in caplog.records) == 1  # warned once
    ro = RunStore.open(tmp_path)
    assert ro.nonfinite_checkpoints == [1, 2]
    assert np.isnan(ro.features(S.TRAIN, "mid_block")[1]).all()
    assert np.isfinite(ro.features(S.TRAIN, "mid_block")[0]).all()


def test_attribution_roundtrip_keeps_every_query_set(tmp_path):
    with create(tmp_path) as st:
        st.append(record(0))
    ro = RunStore.open(tmp_path)
    rng = np.random.default_rng(0)
    probes, images = rng.random((3, 5)).astype(np.float32), rng.random((2, 5)).astype(np.float32)
    path = ro.write_attribution("montrage", 0, probes, ["q0", "q1", "q2"], "probeskey")
    assert path == "attribution/montrage/0/probeskey"
    got, ids = ro.read_attribution("montrage", 0)  # one set: no key needed
    np.testing.assert_array_equal(got, probes)
    assert ids == ["q0", "q1", "q2"]
    ro.write_attribution("montrage", 0, images, ["a.png", "b.png"], "imageskey")  # another set keeps the first
    listed = ro.attributions()
    assert [(a["query_set"], a["query_ids"], a["shape"]) for a in listed] == [
        ("imageskey", ["a.png", "b.png"], [2, 5]), ("probeskey", ["q0", "q1", "q2"], [3, 5])]
    np.testing.assert_array_equal(ro.read_attribution("montrage", 0, "probeskey")[0], probes)
    np.testing.assert_array_equal(ro.read_attribution("montrage", 0, "imageskey")[0], images)
    with pytest.raises(StoreError, match="2 query sets"):
        ro.read_attribution("montrage", 0)
    ro.write_attribution("montrage", 0, probes * 2, ["q0", "q1", "q2"], "probeskey")  # same set: replaced
    np.testing.assert_array_equal(ro.read_attribution("montrage", 0, "probeskey")[0], probes * 2)
    with pytest.raises(StoreError, match="no scores"):
        ro.read_attribution("dtrak", 0, "probeskey")


def images5(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)


def test_training_images_stored_in_chunks_with_hashes(tmp_path, monkeypatch):
    from montrage.storage import store as store_mod

    monkeypatch.setattr(store_mod, "IMAGE_CHUNK_BYTES", 2 * 4 * 4 * 3)  # 2 images per chunk: 3 reads
    imgs, reads = images5(), []

    def read(idx):
        reads.append(list(idx))
        return imgs[idx]

    RunStore.create_or_resume(tmp_path, run_config(), {"a": 1}, dims(), {S.ATTR_FILE_NAMES: [f"f{i}" for i in range(5)]},
                              {S.ATTR_PROMPTS: ["p"] * 3}, [0, 3], train_images=read).close()
    assert reads == [[0, 1], [2, 3], [4]]
    ro = RunStore.open(tmp_path)
    assert ro.images_stored
    np.testing.assert_array_equal(ro.train_images(), imgs)
    np.testing.assert_array_equal(ro.train_images([4, 1]), imgs[[4, 1]])
    arr = zarr.open_array(RunStore.store_path(tmp_path) / "train/images", mode="r")
    assert arr.metadata.dimension_names == ("train", "height", "width", "channel") and arr.chunks[0] == 2
    ro.verify_train_images(imgs)
    changed = imgs.copy()
    changed[3, 0, 0, 0] ^= 1
    with pytest.raises(TrainingImagesChangedError, match=r"f3 \(row 3\)"):
        ro.verify_train_images(changed)


def test_paths_only_store_keeps_hashes_not_pixels(tmp_path):
    d = dims()
    d.store_train_images = False
    imgs = images5(1)
    RunStore.create_or_resume(tmp_path, run_config(), {"a": 1}, d,
                              {S.ATTR_FILE_NAMES: [f"f{i}" for i in range(5)], S.ATTR_SOURCE_ROOT: "/data/x"},
                              {S.ATTR_PROMPTS: ["p"] * 3}, [0, 3], train_images=lambda idx: imgs[idx]).close()
    ro = RunStore.open(tmp_path)
    assert not ro.images_stored and "images" not in ro.root["train"]
    assert ro.source_paths()[2] == "/data/x/f2"
    with pytest.raises(StoreError, match="store_images=False"):
        ro.train_images()
    ro.verify_train_images(imgs[[1, 2]], [1, 2])
    with pytest.raises(TrainingImagesChangedError, match="/data/x/f1"):
        ro.verify_train_images(imgs[[2, 2]], [1, 2])


def test_wrong_image_shape_from_source_leaves_no_store(tmp_path):
    with pytest.raises(StoreError, match="expected uint8"):
        RunStore.create_or_resume(tmp_path, run_config(), {"a": 1}, dims(), {S.ATTR_FILE_NAMES: list("abcde")},
                                  {S.ATTR_PROMPTS: ["p"] * 3}, [], train_images=lambda idx: np.zeros((len(idx), 8, 8, 3)))
    with pytest.raises(StoreError, match="not initialised"):
        RunStore.open(tmp_path)  # half-created: invisible to readers, recreated by the next writer
    create(tmp_path).close()


def test_commit_marker_and_nonfinite_list_in_one_metadata_write(tmp_path, monkeypatch):
    """zarr's attrs.update writes zarr.json once per key: a crash between would leave the marker without the flag."""
    st = create(tmp_path)
    writes = []
    real = type(st.root._async_group)._save_metadata

    async def counting(self, *a, **kw):
        writes.append(dict(self.metadata.attributes))
        return await real(self, *a, **kw)

    monkeypatch.setattr(type(st.root._async_group), "_save_metadata", counting)
    st.append(record(0, value=np.nan))
    root = [w for w in writes if S.ATTR_LAYOUT in w]  # the featurized commit marker (root)
    snapshot = [w for w in writes if S.ATTR_SNAPSHOTS in w]  # the snapshot marker (checkpoints group)
    assert len(root) == 1 and len(snapshot) == 1 and len(writes) == 2
    assert root[0][S.ATTR_COMMITTED] == 1 and root[0][S.ATTR_NONFINITE] == [0]
    st.close()


def test_learning_rate_series_and_discard_uncommitted(tmp_path):
    st = create(tmp_path)
    rec = record(0)
    rec.learning_rate = 1e-3
    st.append(rec)
    st.append(record(5))  # no optimizer known: NaN
    np.testing.assert_array_equal(st.learning_rates[:1], [1e-3])
    assert np.isnan(st.learning_rates[1])
    st.root[f"{S.CHECKPOINTS}/{S.STEP}"].append(np.array([9]))  # a capture that failed midway
    st.discard_uncommitted()
    assert st.root[f"{S.CHECKPOINTS}/{S.STEP}"].shape == (2,)
    st.close()


def test_missing_store_error(tmp_path):
    with pytest.raises(StoreError, match="no montrage run store"):
        RunStore.open(tmp_path / "nothing")
