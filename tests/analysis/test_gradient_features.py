"""Gradient features recorded with the run: `montrage featurize`, first-use storage, reuse, resume."""
import shutil

import numpy as np
import pytest

from montrage.analysis import gradient_features as GF
from montrage.analysis.attribute import attribute
from montrage.cli import main
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.storage.store import GradientFeatures

OPTS = {"proj_dim": 64}


@pytest.fixture()
def run(tiny_run_copy):
    """These tests write gradient features: never into the session's shared run."""
    return tiny_run_copy


def _dtrak(run, **options):
    return attribute(run, "dtrak", options={**OPTS, **options}, write_store=False, progress=False).scores


def test_featurize_stores_named_arrays_and_dtrak_reads_them(run, monkeypatch, capsys):
    assert main(["--quiet", "featurize", str(run), "--proj-dim", "64"]) == 0
    assert "sqnorm: checkpoints [1, 2]" in capsys.readouterr().out
    st = RunStore.open(run)
    n, T = len(st.train_meta[S.ATTR_FILE_NAMES]), len(st.timesteps)
    for output in GF.STORED_OUTPUTS:
        arr = st.array(S.gradient_path(output))
        assert arr.shape == (st.n_checkpoints, n, T, 64) and arr.dtype == np.float16
        assert tuple(arr.metadata.dimension_names) == ("checkpoint", "train", "timestep", "projection")
        gf = GradientFeatures(st, output)
        assert gf.complete(1) and gf.complete(2) and not gf.complete(0)
        unit, norms = gf.read(2)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=2e-3)
        assert (norms > 0).all()
    stored = _dtrak(run)

    def fail(*a, **k):
        raise AssertionError("training gradients recomputed although they are stored")

    monkeypatch.setattr(GF, "_compute", fail)
    np.testing.assert_array_equal(_dtrak(run), stored)  # read, not recomputed
    monkeypatch.undo()
    fresh = _dtrak(run, store_gradients=False, proj_dim=64)
    assert np.array_equal(fresh.argmax(1), stored.argmax(1))
    np.testing.assert_allclose(stored, fresh, atol=2e-3 * np.abs(fresh).max())  # float16 unit vectors


def test_first_use_stores_then_reuses_and_other_settings_stay_in_memory(run, monkeypatch):
    first = _dtrak(run)  # computes and stores the final checkpoint's sqnorm features
    st = RunStore.open(run)
    gf = GradientFeatures(st, "sqnorm")
    assert gf.complete(st.n_checkpoints - 1) and gf.settings()["proj_dim"] == 64
    monkeypatch.setattr(GF, "_compute", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(_dtrak(run), first)
    monkeypatch.undo()
    other = _dtrak(run, proj_dim=32)  # other settings: computed in memory, the stored features untouched
    assert other.shape == first.shape
    assert GradientFeatures(RunStore.open(run), "sqnorm").settings()["proj_dim"] == 64


def test_featurize_resumes_after_an_interruption(run, monkeypatch):
    monkeypatch.setattr(S, "GRADIENT_ROWS_PER_CHUNK", 3)  # 8 training images: blocks of 3, 3, 2
    calls = {"n": 0}
    real = GradientFeatures.write

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(GradientFeatures, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        GF.featurize(run, ["sqnorm"], [2], OPTS, progress=False)
    gf = GradientFeatures(RunStore.open(run), "sqnorm")
    assert gf.rows_done() == {2: 3} and not gf.complete(2)
    GF.featurize(run, ["sqnorm"], [2], OPTS, progress=False)
    assert gf.complete(2)
    resumed = gf.read(2)
    shutil.rmtree(run / S.STORE_DIRNAME / S.TRAIN / S.GRADIENTS)
    shutil.rmtree(run / S.STORE_DIRNAME / S.TRAIN / S.GRADIENT_NORMS)
    monkeypatch.setattr(GradientFeatures, "write", real)
    GF.featurize(run, ["sqnorm"], [2], OPTS, progress=False)
    again = GradientFeatures(RunStore.open(run), "sqnorm").read(2)
    np.testing.assert_allclose(resumed[0], again[0], atol=1e-3)
    np.testing.assert_allclose(resumed[1], again[1], rtol=1e-4)


def test_featurize_takes_both_outputs_from_one_pass_with_the_numbers_of_each_alone(run, monkeypatch):
    groups = []
    real = GF._compute

    def spy(ctx, k, outputs, s, rows):
        groups.append(list(outputs))
        return real(ctx, k, outputs, s, rows)

    monkeypatch.setattr(GF, "_compute", spy)
    res = GF.featurize(run, ["sqnorm", "denoise"], [1, 2], OPTS, progress=False)
    assert groups == [["sqnorm", "denoise"]] * 2 and res["sqnorm"]["seconds"] == res["denoise"]["seconds"] > 0
    st = RunStore.open(run)
    together = {o: GradientFeatures(st, o).read(2) for o in ("sqnorm", "denoise")}
    assert not np.allclose(together["sqnorm"][1], together["denoise"][1])
    for o in ("sqnorm", "denoise"):
        shutil.rmtree(run / S.STORE_DIRNAME / S.TRAIN / S.GRADIENTS)
        shutil.rmtree(run / S.STORE_DIRNAME / S.TRAIN / S.GRADIENT_NORMS)
        groups.clear()
        GF.featurize(run, [o], [2], OPTS, progress=False)
        assert groups == [[o]]
        unit, norms = GradientFeatures(RunStore.open(run), o).read(2)
        np.testing.assert_allclose(unit, together[o][0], atol=2e-3)
        np.testing.assert_allclose(norms, together[o][1], rtol=1e-4)


def test_featurize_refuses_other_settings_without_overwrite(run):
    GF.featurize(run, ["sqnorm"], [2], OPTS, progress=False)
    with pytest.raises(Exception, match="overwrite"):
        GF.featurize(run, ["sqnorm"], [2], {"proj_dim": 32}, progress=False)
    GF.featurize(run, ["sqnorm"], [2], {"proj_dim": 32}, overwrite=True, progress=False)
    assert GradientFeatures(RunStore.open(run), "sqnorm").settings()["proj_dim"] == 32
