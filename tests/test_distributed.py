"""Two-process CPU training (torchrun + gloo) into one run store, against single-process references.

At checkpoint 0 the weights are those of the base + LoRA init on every rank, so the features the two
ranks compute (each its strided share of the images) must equal a single-process run's. Later
checkpoints of the plain single-process run differ: with 2 processes each optimizer step averages the
gradients of two batches of ``batch_size`` (rank 0's batch is the single-process batch, rank 1 draws its
own), i.e. trains on 2x the batch. A single-process run fed the concatenation of both ranks' batches
takes exactly the same steps, so it must match the 2-process run at every checkpoint.

The 2-process launch trains twice: with inline capture (the ranks featurize their shards; the comparisons
above) and with background capture (train()'s default: rank 0's worker featurizes), which must record the
same store. The single-process references run in the test's own process while the launch runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from montrage.storage import RunStore
from montrage.storage import schema as S
from tests.dist_train_script import WORLD

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "dist_train_script.py"
TIMEOUT_S = 300  # generous: a deadlock never finishes, a loaded 2-core CI box is slow


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from montrage.data.synthetic import write_concept_dataset
    from tests.dist_train_script import reference

    tmp = tmp_path_factory.mktemp("dist")
    data = write_concept_dataset(tmp / "data", n_artists=2, images_per_artist=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(HELPER),
           "dist", str(data), str(tmp / "dist"), str(tmp / "info")]
    log = open(tmp / "dist.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        reference(data, tmp / "ref", tmp / "info")  # meanwhile, in this process (its torch: 1 thread)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a deadlock in a collective shows up here
            raise AssertionError(f"the 2-process run did not finish within {TIMEOUT_S} s:\n{_tail(log)}") from None
        assert rc == 0, f"the 2-process run failed ({rc}):\n{_tail(log)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return {"dist": tmp / "dist" / "inline", "dist-background": tmp / "dist" / "background",
            "single": tmp / "ref" / "single", "concat": tmp / "ref" / "concat", "info": tmp / "info"}


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def test_both_processes_joined_one_group(runs):
    for rank in range(WORLD):
        info = json.loads((runs["info"] / f"rank{rank}.json").read_text())
        assert info["world_size"] == WORLD and info["rank"] == rank, info
        assert info["distributed_type"].endswith("MULTI_CPU")
    assert json.loads((runs["info"] / "reference.json").read_text())["world_size"] == 1
    assert RunStore.open(runs["dist"]).run_config["world_size"] == WORLD


@pytest.mark.parametrize("which", ["dist", "dist-background"])
def test_store_is_complete_and_consistent(runs, which):
    st = RunStore.open(runs[which])
    assert st.steps.tolist() == [0, 2, 4]
    n_probes = len(st.probe_meta[S.ATTR_PROMPTS])
    assert n_probes % WORLD == 1 and len(st.anchor_indices) == 3  # uneven shards on purpose
    n = {S.TRAIN: 6, S.ANCHORS: 3, S.PROBES: n_probes}
    for kind in S.FEATURE_KINDS:
        assert st.losses(kind).shape == (3, n[kind], 2, 2)
        assert np.isfinite(st.losses(kind)).all()
        for m in st.modules:
            f = st.features(kind, m)
            assert f.shape[:4] == (3, n[kind], 2, 2) and np.isfinite(f).all()
            assert not (f == 0).all(axis=(2, 3, 4)).any(), f"{kind}/{m}: an item was never written"
    assert st.probe_images().shape == (n_probes, 16, 16, 3)
    loss = st.scalar_series(S.TRAIN_LOSS)
    assert np.isnan(loss[0]) and np.isfinite(loss[1:]).all()
    assert (runs[which] / S.FINAL_LORA_FILENAME).exists()
    # Anchors are the training images under a second noise draw: same images, different features.
    a, t = st.features(S.ANCHORS, st.modules[0]), st.features(S.TRAIN, st.modules[0])
    assert not np.allclose(a[0], t[0, st.anchor_indices])


def _assert_stores_match(a: RunStore, b: RunStore, checkpoints, atol: float) -> None:
    for kind in S.FEATURE_KINDS:
        for m in a.modules:
            np.testing.assert_allclose(a.features(kind, m, checkpoints), b.features(kind, m, checkpoints),
                                       rtol=1e-4, atol=atol, err_msg=f"{kind}/{m}")
        np.testing.assert_allclose(a.losses(kind, checkpoints), b.losses(kind, checkpoints), rtol=1e-4, atol=atol)


def test_checkpoint0_matches_single_process(runs):
    dist, single = RunStore.open(runs["dist"]), RunStore.open(runs["single"])
    assert single.steps.tolist() == [0, 2, 4]
    _assert_stores_match(dist, single, 0, atol=1e-5)  # observed: 9.5e-7 (other batch split)
    assert np.abs(dist.probe_images(0).astype(int) - single.probe_images(0).astype(int)).max() <= 1
    w0, w1 = dist.lora_weights(0), single.lora_weights(0)
    for k in w0:
        np.testing.assert_array_equal(np.asarray(w0[k]), np.asarray(w1[k]))


def test_later_checkpoints_differ_from_single_process_batch(runs):
    """2 processes x batch 2 is not the single-process run with batch 2: the LoRA moves differently."""
    dist, single = RunStore.open(runs["dist"]), RunStore.open(runs["single"])
    for c in (1, 2):
        diff = np.abs(dist.root[f"{S.LORA}/{S.WEIGHTS}"][c] - single.root[f"{S.LORA}/{S.WEIGHTS}"][c]).max()
        assert diff > 1e-5, c
        f_d, f_s = dist.features(S.TRAIN, dist.modules[0], c), single.features(S.TRAIN, single.modules[0], c)
        assert not np.allclose(f_d, f_s, rtol=1e-4, atol=1e-5)


def test_all_checkpoints_match_single_process_on_concatenated_batches(runs):
    dist, concat = RunStore.open(runs["dist"]), RunStore.open(runs["concat"])
    assert concat.steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(dist.root[f"{S.LORA}/{S.WEIGHTS}"][:], concat.root[f"{S.LORA}/{S.WEIGHTS}"][:],
                               rtol=1e-4, atol=1e-6)
    _assert_stores_match(dist, concat, slice(None), atol=2e-5)  # observed: 1.4e-6
    np.testing.assert_allclose(dist.scalar_series(S.TRAIN_LOSS)[1:], concat.scalar_series(S.TRAIN_LOSS)[1:], rtol=1e-4)


def test_background_capture_on_two_processes_records_the_inline_store(runs):
    """Rank 0's worker featurizes every item of the 2-process run: the same store as the ranks' shards."""
    inline, background = RunStore.open(runs["dist"]), RunStore.open(runs["dist-background"])
    assert background.run_config["world_size"] == WORLD and background.steps.tolist() == inline.steps.tolist()
    np.testing.assert_array_equal(background.root[f"{S.LORA}/{S.WEIGHTS}"][:], inline.root[f"{S.LORA}/{S.WEIGHTS}"][:])
    _assert_stores_match(background, inline, slice(None), atol=1e-5)  # another batch split of the same items
    assert np.abs(background.probe_images().astype(int) - inline.probe_images().astype(int)).max() <= 1
    np.testing.assert_array_equal(background.scalar_series(S.TRAIN_LOSS), inline.scalar_series(S.TRAIN_LOSS))


def test_rank_without_items_merges(tmp_path):
    """What record_checkpoint does on 2 ranks for a kind with a single item, without launching processes."""
    from montrage.callbacks.monitor import _concat_shards
    from montrage.config import CaptureConfig
    from montrage.models.features import FeatureExtractor
    from montrage.models.loading import load_base
    from tests.models.tiny_pipeline import write_tiny_pipeline

    comps = load_base(str(write_tiny_pipeline(tmp_path / "sd")))
    capture = CaptureConfig(timesteps=(100,), modules=("mid_block",))
    rank0, rank1 = FeatureExtractor(comps, capture), FeatureExtractor(comps, capture)
    rank0.feature_dims()  # rank 0 runs it in open_store (StoreDims); the other ranks never do
    image = np.zeros((1, 16, 16, 3), np.uint8)
    mine0, mine1 = rank0.extract(image, ["a circle"], [0]), rank1.extract(image[:0], [], [])
    full = _concat_shards([{"f": mine0.features, "l": mine0.losses}, {"f": mine1.features, "l": mine1.losses}], 1)
    assert full["f"]["mid_block"].shape == mine0.features["mid_block"].shape


def test_single_process_accelerator_in_multi_process_launch_is_refused(monkeypatch):
    """torchrun without CUDA + plain Accelerator(): each process would run alone on one shared store."""
    from types import SimpleNamespace

    from montrage.distributed import ProcessContext
    from montrage.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"Accelerator\(cpu=True\)"):
        ProcessContext(SimpleNamespace(num_processes=1, process_index=0))
    assert ProcessContext(SimpleNamespace(num_processes=2, process_index=1)).rank == 1
    assert ProcessContext(None).world_size == 1  # the save_state-hook path: main process alone
