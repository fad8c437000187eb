"""End-to-end: monitored LoRA training on the embedded base into a run store."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from montrage.models.checkpoints import RunModel
from montrage.models.sampling import generate
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.training import train
from tests.conftest import tiny_configs

INLINE = {"capture_mode": "inline", "progress": False}  # capture modes: tests/callbacks/test_capture_modes.py


def small_configs():
    """A small run (4 steps, checkpoints 0/2/4; 1 module, 1 timestep, 1 anchor, 1 probe: ``small_probes``) for
    what happens around a run (resuming, reruns, refusals, images kept as paths): not a matter of its size."""
    from montrage.config import CaptureConfig

    cfg, _ = tiny_configs(steps=4)
    return cfg, CaptureConfig(every_n_steps=2, probe_steps=2, timesteps=(100,), anchors=1, modules=("mid_block",))


@pytest.fixture(scope="module")
def small_probes(tmp_path_factory) -> Path:
    from montrage.data.probes import Probe, save_probe_file

    return save_probe_file([Probe("a circle by artist-0", 1, "artist-0")], tmp_path_factory.mktemp("p") / "probes.jsonl")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data, small_probes) -> Path:
    """A finished small run (checkpoints 0, 2, 4), trained once; tests that train on top of it use a copy."""
    cfg, capture = small_configs()
    run = tmp_path_factory.mktemp("finished") / "r"
    train(tiny_data, run, cfg=cfg, capture=capture, probes_file=small_probes, **INLINE)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "r"))


def test_store_shapes(tiny_run):
    st = RunStore.open(tiny_run)
    assert st.steps.tolist() == [0, 3, 6]
    n_probes = len(st.probe_meta[S.ATTR_PROMPTS])
    for m in st.modules:
        f = st.features(S.TRAIN, m)
        assert f.shape[:4] == (3, 8, 2, 2)  # checkpoints, images, conditions, timesteps
        assert st.features(S.PROBES, m).shape[:4] == (3, n_probes, 2, 2)
        assert st.features(S.ANCHORS, m).shape[:4] == (3, 4, 2, 2)
    assert st.losses(S.TRAIN).shape == (3, 8, 2, 2)
    assert st.probe_images().shape == (n_probes, 16, 16, 3)
    assert st.train_meta[S.ATTR_CONCEPTS] == ["artist-0"] * 4 + ["artist-1"] * 4
    assert np.isnan(st.scalar_series(S.TRAIN_LOSS)[0]) and np.isfinite(st.scalar_series(S.TRAIN_LOSS)[1:]).all()
    assert (tiny_run / S.FINAL_LORA_FILENAME).exists()


def test_representations_change_across_checkpoints(tiny_run):
    st = RunStore.open(tiny_run)
    f = st.features(S.TRAIN, st.modules[0])
    assert not np.allclose(f[0], f[2], atol=1e-5)
    lora = st.root[f"{S.LORA}/{S.WEIGHTS}"][:]
    assert not np.allclose(lora[0], lora[2])


def test_null_and_caption_conditions_differ(tiny_run):
    st = RunStore.open(tiny_run)
    f = st.features(S.TRAIN, st.modules[0])
    assert not np.allclose(f[:, :, 0], f[:, :, 1])


def test_probes_are_deterministic_given_lora_weights(tiny_run):
    st = RunStore.open(tiny_run)
    model = RunModel(st.run_config)
    comps = model.set_weights(st.lora_weights(1), tag=1)
    cap = st.capture
    meta = st.probe_meta
    again = generate(comps, meta[S.ATTR_PROMPTS], meta[S.ATTR_SEEDS], num_steps=cap["probe_steps"],
                     guidance_scale=cap["guidance_scale"], sampler=cap["probe_sampler"])
    stored = st.probe_images(1)
    assert np.abs(again.astype(int) - stored.astype(int)).max() <= 1


def test_monitor_does_not_change_training(tmp_path, tiny_data, tiny_run):
    cfg, capture = tiny_configs()
    train(tiny_data, tmp_path / "plain", cfg=cfg, capture=capture, monitor=False, progress=False)
    with_cb = load_file(tiny_run / S.FINAL_LORA_FILENAME)
    without = load_file(tmp_path / "plain" / S.FINAL_LORA_FILENAME)
    assert with_cb.keys() == without.keys()
    for k in with_cb:
        assert torch.equal(with_cb[k], without[k]), k
    assert not (tmp_path / "plain" / S.STORE_DIRNAME).exists()


def test_resume_after_interruption(tmp_path, tiny_data, finished_run, small_probes, monkeypatch):
    import montrage.training as T

    cfg, capture = small_configs()
    real = T.step_batch

    def dying(step, *a, **kw):
        if step == 4:  # step 3 trained after checkpoint 2 is lost too: the resumed run replays it
            raise KeyboardInterrupt("simulated preemption")
        return real(step, *a, **kw)

    monkeypatch.setattr(T, "step_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, tmp_path / "run", cfg=cfg, capture=capture, probes_file=small_probes, **INLINE)
    assert RunStore.open(tmp_path / "run").steps.tolist() == [0, 2]
    monkeypatch.setattr(T, "step_batch", real)
    res = train(tiny_data, tmp_path / "run", cfg=cfg, capture=capture, probes_file=small_probes, **INLINE)
    assert res.start_step == 2
    resumed, ref = RunStore.open(tmp_path / "run"), RunStore.open(finished_run)  # ref: uninterrupted, same config
    assert resumed.steps.tolist() == [0, 2, 4]  # nothing lost, nothing duplicated
    for m in ref.modules:
        np.testing.assert_allclose(resumed.features(S.TRAIN, m), ref.features(S.TRAIN, m), rtol=1e-5, atol=1e-5)
    a = load_file(tmp_path / "run" / S.FINAL_LORA_FILENAME)
    b = load_file(finished_run / S.FINAL_LORA_FILENAME)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_rerun_of_finished_run_adds_nothing(tmp_path, tiny_data, finished_run, small_probes):
    cfg, capture = small_configs()
    run = _copy(finished_run, tmp_path)
    assert RunStore.open(run).steps.tolist() == [0, 2, 4]
    res = train(tiny_data, run, cfg=cfg, capture=capture, probes_file=small_probes, **INLINE)
    assert res.start_step == 4
    assert RunStore.open(run).steps.tolist() == [0, 2, 4]


def test_other_config_on_existing_output_is_refused(tmp_path, tiny_data, finished_run, small_probes):
    from montrage.config import CaptureConfig
    from montrage.errors import StoreConfigMismatchError

    cfg, capture = small_configs()
    run = _copy(finished_run, tmp_path)
    other = CaptureConfig(**{**capture.__dict__, "pooling_grid": 4})
    with pytest.raises(StoreConfigMismatchError, match="pooling_grid"):
        train(tiny_data, run, cfg=cfg, capture=other, probes_file=small_probes, **INLINE)


def test_run_is_self_contained(tiny_run, tiny_data):
    """Training images, LoRA config (from the model), optimizer and lr per checkpoint live in the run."""
    from pathlib import Path

    from montrage.data.imagefolder import load_imagefolder

    st = RunStore.open(tiny_run)
    cfg = st.run_config
    assert Path(cfg["data_dir"]).is_absolute() and Path(cfg["data_dir"]) == Path(tiny_data).resolve()
    np.testing.assert_array_equal(st.train_images(), load_imagefolder(tiny_data, 16).images)
    assert cfg["lora"]["r"] == 8 and cfg["lora"]["lora_alpha"] == 8 and "to_q" in cfg["lora"]["target_modules"]
    assert cfg["optimizer"]["class"] == "torch.optim.adamw.AdamW" and cfg["optimizer"]["defaults"]["lr"] == 2e-3
    # LambdaLR warm-up over 2 steps: the optimizer holds lr/2 before the first update, lr from step 1 on
    np.testing.assert_allclose(st.learning_rates, [1e-3, 2e-3, 2e-3])
    assert cfg["base"] == "embedded" and len(cfg["base_identity"]) == 32


def test_other_lora_config_on_resume_is_refused(tmp_path, tiny_data, finished_run, small_probes):
    from dataclasses import replace

    from montrage.config import LoraSettings
    from montrage.errors import StoreConfigMismatchError

    cfg, capture = small_configs()
    run = _copy(finished_run, tmp_path)
    before = sorted(p.name for p in (run / S.STORE_DIRNAME).rglob("*"))
    other = replace(cfg, lora=LoraSettings(rank=4, alpha=2.0))
    with pytest.raises(StoreConfigMismatchError, match=r"lora\.lora_alpha.*lora\.r: store has 8, requested 4"):
        train(tiny_data, run, cfg=other, capture=capture, probes_file=small_probes, **INLINE)
    assert sorted(p.name for p in (run / S.STORE_DIRNAME).rglob("*")) == before  # nothing written
    assert RunStore.open(run).steps.tolist() == [0, 2, 4]


def test_paths_only_run_checks_image_hashes(tmp_path, tiny_data, small_probes):
    """store_images=False keeps paths + hashes; a changed file is one typed error naming it, nothing written."""
    import shutil

    from PIL import Image

    from montrage.analysis.gradients import training_images
    from montrage.errors import TrainingImagesChangedError

    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    cfg, capture = small_configs()
    train(data, tmp_path / "r", cfg=cfg, capture=capture, probes_file=small_probes, store_images=False, **INLINE)
    st = RunStore.open(tmp_path / "r")
    assert not st.images_stored
    from montrage.data.imagefolder import load_imagefolder

    np.testing.assert_array_equal(training_images(st).images, load_imagefolder(tiny_data, 16).images)
    names = st.train_meta[S.ATTR_FILE_NAMES]
    img = np.array(Image.open(data / names[2]))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(data / names[2])
    with pytest.raises(TrainingImagesChangedError, match=names[2].replace(".", r"\.") + r".*images stored \(the default\)"):
        training_images(st)
    shutil.rmtree(data)
    with pytest.raises(TrainingImagesChangedError, match="is gone"):
        training_images(st)
