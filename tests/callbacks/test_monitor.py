"""The TrainingMonitor on its own: events, context manager, resume state, accelerate integration, run config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from montrage.config import CaptureConfig, LoraSettings
from montrage.data.probes import Probe
from montrage.errors import ModelLoadError, StoreLockedError
from montrage.storage import RunStore
from montrage.storage import schema as S

CAPTURE = dict(modules=("mid_block",), timesteps=(300,), anchors=1, probe_steps=2, every_n_steps=2)
PROBES = [Probe("a circle by artist-0", 7, "artist-0"), Probe("a square by artist-1", 8, "artist-1")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from montrage.data.synthetic import write_concept_dataset

    return write_concept_dataset(tmp_path_factory.mktemp("d") / "data", n_artists=2, images_per_artist=2)


def lora_model(rank=4, alpha=None, seed=0):
    from montrage.models.loading import load_base
    from montrage.models.lora import add_lora

    comps = load_base("embedded")
    params = add_lora(comps.unet, LoraSettings(rank=rank, alpha=alpha), seed=seed)
    return comps, params


def make_monitor(run, data, comps, opt=None, **kw):
    from montrage import TrainingMonitor, load_imagefolder

    return TrainingMonitor(run, comps, load_imagefolder(data, comps.resolution), probes=PROBES,
                           capture=CaptureConfig(**CAPTURE), optimizer=opt, **kw)


def sgd_step(comps, params, opt, seed):
    """One optimizer step on a random loss of the LoRA parameters (moves the weights; no data needed)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def test_events_record_checkpoints_loss_and_exact_learning_rate(tmp_path, data):
    comps, params = lora_model()
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a schedule no formula in montrage knows
    mon = make_monitor(tmp_path / "run", data, comps, opt)
    mon.on_train_begin()
    losses = []
    for step in range(1, 6):
        losses.append(sgd_step(comps, params, opt, step))
        sched.step()
        mon.on_step_end(step, losses[-1])
    mon.on_train_end(5)
    st = RunStore.open(tmp_path / "run")
    assert st.steps.tolist() == [0, 2, 4, 5]
    np.testing.assert_allclose(st.learning_rates, [0.1, 0.1 * 0.5 ** 2, 0.1 * 0.5 ** 4, 0.1 * 0.5 ** 5])
    tl = st.scalar_series(S.TRAIN_LOSS)
    assert np.isnan(tl[0])
    np.testing.assert_allclose(tl[1:], [np.mean(losses[0:2]), np.mean(losses[2:4]), losses[4]], rtol=1e-6)
    assert st.run_config["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert st.run_config["optimizer"]["param_groups"][0]["lr"] == 0.1  # as given when the store was created
    np.testing.assert_array_equal(st.train_images(), mon.training_set.images[list(range(4))])


def test_context_manager_records_last_step_and_releases_lock(tmp_path, data):
    comps, params = lora_model()
    opt = torch.optim.SGD(params, lr=0.1)
    with make_monitor(tmp_path / "run", data, comps, opt) as mon:
        with pytest.raises(StoreLockedError):
            RunStore.create_or_resume(tmp_path / "run", {}, {}, None, {}, {})
        mon.on_train_begin()
        for step in (1, 2, 3):
            mon.on_step_end(step, sgd_step(comps, params, opt, step))
    assert RunStore.open(tmp_path / "run").steps.tolist() == [0, 2, 3]  # leaving the block recorded step 3
    make_monitor(tmp_path / "run", data, comps, opt).open_store()  # the lock was released


def test_exception_in_block_leaves_store_consistent_and_unlocked(tmp_path, data, monkeypatch):
    comps, params = lora_model()
    opt = torch.optim.SGD(params, lr=0.1)
    real_write = RunStore.write_featurized

    def dies_midway(self, index, rec, grow=True):  # part of the features written, then the process fails
        if rec.step == 2:
            self.root[S.feature_path(S.TRAIN, "mid_block")].resize(
                (index + 1,) + self.root[S.feature_path(S.TRAIN, "mid_block")].shape[1:])
            raise RuntimeError("disk full")
        return real_write(self, index, rec, grow)

    monkeypatch.setattr(RunStore, "write_featurized", dies_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        with make_monitor(tmp_path / "run", data, comps, opt) as mon:
            mon.on_train_begin()
            for step in (1, 2, 3):
                mon.on_step_end(step, sgd_step(comps, params, opt, step))
    st = RunStore.open(tmp_path / "run")
    assert st.steps.tolist() == [0]  # readers see featurized checkpoints only
    assert st.pending_steps == [2]  # the snapshot of step 2 (its LoRA weights) was committed before: kept
    assert st.array(S.feature_path(S.TRAIN, "mid_block")).shape[0] == 1  # nothing past the commit marker
    monkeypatch.setattr(RunStore, "write_featurized", real_write)
    with make_monitor(tmp_path / "run", data, comps, opt) as again:  # not locked; resumes the same store
        again.on_train_begin(2)  # inline capture featurizes the pending snapshot first
        again.on_step_end(3, 0.5)
    assert RunStore.open(tmp_path / "run").steps.tolist() == [0, 2, 3]


def test_state_dict_round_trip_store_decides_what_is_recorded(tmp_path, data):
    comps, params = lora_model()
    opt = torch.optim.SGD(params, lr=0.1)
    mon = make_monitor(tmp_path / "run", data, comps, opt)
    mon.on_train_begin()
    mon.on_step_end(1, 1.0)
    state = mon.state_dict()
    mon.on_step_end(2, 3.0)  # recorded after the state was saved: the store knows, the state does not
    mon.close()
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # plain values, as accelerate reloads them
    assert state["step"] == 1 and state["loss_sum"] == 1.0 and state["recorded_steps"] == [0]

    resumed = make_monitor(tmp_path / "run", data, comps, opt)
    resumed.load_state_dict(state)
    resumed.on_train_begin(state["step"])
    assert resumed.state.recorded_steps == [0, 2] and resumed.state.step == 1
    resumed.on_step_end(2, 3.0)  # replayed: not recorded twice, its loss stays with checkpoint 2
    resumed.on_step_end(3, 5.0)
    resumed.on_step_end(4, 7.0)
    resumed.on_train_end(4)
    st = RunStore.open(tmp_path / "run")
    assert st.steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(st.scalar_series(S.TRAIN_LOSS)[1:], [2.0, 6.0])


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.hooks = []

    def register_save_state_pre_hook(self, hook):
        self.hooks.append(hook)

    def save_state(self, output_dir):
        for hook in self.hooks:
            hook([], [], output_dir)


def test_attach_uses_global_step_not_directory_names(tmp_path, data):
    from montrage.errors import ConfigError

    comps, _ = lora_model()
    mon = make_monitor(tmp_path / "run", data, comps)
    acc = FakeAccelerator()
    step = 0
    mon.attach(acc, global_step=lambda: step)
    mon.on_train_begin()
    step = 7
    acc.save_state(str(tmp_path / "checkpoint-123"))  # the folder name says nothing about the step
    step = 9
    acc.save_state(str(tmp_path / "latest"))
    mon.on_train_end(9)
    assert RunStore.open(tmp_path / "run").steps.tolist() == [0, 7, 9]
    with pytest.raises(ConfigError, match="callable"):
        make_monitor(tmp_path / "other", data, comps).attach(acc, global_step=5)

    other = make_monitor(tmp_path / "run2", data, comps)
    acc2 = FakeAccelerator()
    other.attach(acc2)  # default: the monitor's own step
    other.on_train_begin()
    other.on_step_end(1)
    acc2.save_state(str(tmp_path / "x"))
    other.close()
    assert RunStore.open(tmp_path / "run2").steps.tolist() == [0, 1]


def test_attach_on_a_process_that_does_not_save_is_inert(tmp_path, data):
    comps, _ = lora_model()
    mon = make_monitor(tmp_path / "run", data, comps)
    acc = FakeAccelerator()
    acc.is_main_process = False
    mon.attach(acc)
    mon.on_train_begin()
    mon.on_step_end(2, 1.0)
    mon.on_train_end(2)
    assert not RunStore.exists(tmp_path / "run")


def test_accelerate_save_state_load_state_resumes_the_monitor(tmp_path, data):
    """register_for_checkpointing: accelerate saves the monitor's state and load_state restores it."""
    from accelerate import Accelerator

    comps, params = lora_model()
    opt = torch.optim.SGD(params, lr=0.1)
    acc = Accelerator(cpu=True)
    unet, opt = acc.prepare(comps.unet, opt)
    mon = make_monitor(tmp_path / "run", data, comps, opt, accelerator=acc)
    step = 0
    mon.attach(acc, global_step=lambda: step)
    acc.register_for_checkpointing(mon)
    mon.on_train_begin()
    for step in (1, 2, 3):
        sgd_step(comps, params, opt, step)
        mon.on_step_end(step, float(step))  # also records at every 2 steps (CaptureConfig.every_n_steps)
        if step == 3:
            acc.save_state(str(tmp_path / "ckpt"))  # the hook records step 3, then the monitor's state is saved
    mon.close()
    assert RunStore.open(tmp_path / "run").steps.tolist() == [0, 2, 3]

    comps2, params2 = lora_model()
    opt2 = torch.optim.SGD(params2, lr=0.1)
    acc2 = Accelerator(cpu=True)
    unet2, opt2 = acc2.prepare(comps2.unet, opt2)
    mon2 = make_monitor(tmp_path / "run", data, comps2, opt2, accelerator=acc2)
    step = 0
    mon2.attach(acc2, global_step=lambda: step)
    acc2.register_for_checkpointing(mon2)
    acc2.load_state(str(tmp_path / "ckpt"))
    assert mon2.state.step == 3 and mon2.state.loss_count == 0  # 3 was recorded: its loss went with it
    step = mon2.state.step
    mon2.on_train_begin(step)
    assert mon2.state.recorded_steps == [0, 2, 3]
    for step in (4, 5):
        mon2.on_step_end(step, float(step))
    mon2.on_train_end(5)
    st = RunStore.open(tmp_path / "run")
    assert st.steps.tolist() == [0, 2, 3, 4, 5]
    np.testing.assert_allclose(st.scalar_series(S.TRAIN_LOSS)[3:], [4.0, 5.0])


def test_rank16_alpha4_run_is_rebuilt_exactly(tmp_path, data):
    """The LoRA config comes from the model (peft_config), so r=16 / alpha=4 is rebuilt as trained."""
    from montrage.models.checkpoints import RunModel

    comps, params = lora_model(rank=16, alpha=4)
    opt = torch.optim.SGD(params, lr=0.5)
    with make_monitor(tmp_path / "run", data, comps, opt) as mon:
        mon.on_train_begin()
        for step in (1, 2):
            mon.on_step_end(step, sgd_step(comps, params, opt, step))
    st = RunStore.open(tmp_path / "run")
    lora = st.run_config["lora"]
    assert (lora["r"], lora["lora_alpha"]) == (16, 4)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    cond = comps.encode_prompts(["a circle by artist-0", ""])
    comps.unet.eval()
    with torch.no_grad():
        trained = comps.predict(x, t, cond)
        rebuilt = RunModel(st.run_config).set_weights(st.lora_weights(1), tag=1)
        again = rebuilt.predict(x, t, cond)
    torch.testing.assert_close(again, trained)
    # the old default (alpha = rank) would have scaled the adapter by 1 instead of 1/4: visibly different
    wrong = dict(st.run_config, lora=dict(lora, lora_alpha=16))
    with torch.no_grad():
        off = RunModel(wrong).set_weights(st.lora_weights(1), tag=1).predict(x, t, cond)
    assert (off - trained).abs().max() > 1e-3


def test_from_diffusers_run_records_the_folder_and_refuses_a_missing_one(tmp_path, data, capsys):
    import shutil

    from montrage import DiffusionComponents
    from montrage.models.checkpoints import RunModel
    from montrage.models.loading import load_base
    from montrage.models.lora import add_lora
    from tests.models.tiny_pipeline import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "sd")
    loaded = load_base(str(folder))
    add_lora(loaded.unet, LoraSettings(rank=2, target_modules=("to_q", "to_v")))
    comps = DiffusionComponents.from_diffusers(loaded.unet, loaded.prompt_encoder.text_encoder,
                                               loaded.prompt_encoder.tokenizer, loaded.noise_scheduler, loaded.vae)
    assert comps.base == "user"  # what a training script's own parts carry
    with make_monitor(tmp_path / "run", data, comps) as mon:
        mon.on_train_begin()
    cfg = RunStore.open(tmp_path / "run").run_config
    assert cfg["base"] == str(folder.resolve())  # found through unet.config._name_or_path
    RunModel(cfg)  # loads, identity matches
    moved = tmp_path / "moved-sd"
    shutil.move(str(folder), moved)
    with pytest.raises(ModelLoadError, match="--base PATH"):
        RunModel(cfg)
    model = RunModel(cfg, base_override=str(moved))
    assert model.components.unet.peft_config["default"].r == 2
    from montrage.cli import main

    run = str(tmp_path / "run")
    assert main(["--quiet", "attribute", run, "--method", "final-sim", "--show", "0"]) == 2  # one typed error
    assert "--base PATH" in capsys.readouterr().err
    assert main(["--quiet", "attribute", run, "--method", "final-sim", "--show", "0", "--base", str(moved)]) == 0
    other = write_tiny_pipeline(tmp_path / "other-sd", seed=1)  # same architecture, other weights
    with pytest.raises(ModelLoadError, match="not the one this run was trained on"):
        RunModel(dict(cfg, base=str(other)))


class StubContext:
    """Rank ``rank`` of a 2-process group whose broadcast delivers rank 0's object."""

    def __init__(self, rank, delivered=None):
        self.rank, self.delivered, self.sent = rank, delivered, []
        self.world_size = 2

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast(self, obj):
        self.sent.append(obj)
        return obj if self.rank == 0 else self.delivered

    def unwrap(self, m):
        return m


def test_every_exception_kind_at_store_open_reaches_the_other_ranks(tmp_path, data, monkeypatch):
    comps, _ = lora_model()
    mon = make_monitor(tmp_path / "run", data, comps)
    mon.ctx = StubContext(0)

    def boom(*a, **kw):
        raise PermissionError("read-only filesystem")

    monkeypatch.setattr(RunStore, "create_or_resume", boom)
    with pytest.raises(PermissionError):
        mon.open_store()
    assert isinstance(mon.ctx.sent[0], PermissionError)  # broadcast before raising: no rank left waiting
    other = make_monitor(tmp_path / "run", data, comps)
    other.ctx = StubContext(1, delivered=mon.ctx.sent[0])
    with pytest.raises(PermissionError, match="read-only"):
        other.open_store()


def test_store_images_false_needs_a_folder(tmp_path, data):
    from montrage.errors import ConfigError
    from montrage.training import TrainingMonitor

    comps, _ = lora_model()
    rows = [{"image": np.zeros((16, 16, 3), np.uint8), "text": "a circle"}]
    with pytest.raises(ConfigError, match="store_images=True"):
        TrainingMonitor(tmp_path / "run", comps, rows, probes=PROBES, capture=CaptureConfig(**CAPTURE),
                        store_images=False)


def test_training_settings_are_recorded_as_montrage_train_records_them(tmp_path, data):
    """``training=`` lands in the run config under the key `montrage train` writes; a wrong type, or settings given
    twice, is one clear error before anything is written."""
    from montrage.config import TrainConfig
    from montrage.errors import ConfigError

    comps, params = lora_model()
    with make_monitor(tmp_path / "run", data, comps, training={"batch_size": 3, "warmup_steps": 0}) as mon:
        mon.on_train_begin()
    train = RunStore.open(tmp_path / "run").run_config["train"]
    assert (train["batch_size"], train["warmup_steps"], train["steps"], train["lr"]) == (3, 0, None, None)
    for bad, match in ((dict(training=4), "takes a montrage TrainConfig"),
                       (dict(training=TrainConfig(batch_size=2), run_config={"train": {"batch_size": 2}}), "twice"),
                       (dict(training={"batch_size": 0}), "batch_size")):
        with pytest.raises(ConfigError, match=match):
            make_monitor(tmp_path / "bad", data, comps, **bad)
    assert not (tmp_path / "bad").exists()
