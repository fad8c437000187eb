"""Capture modes: inline, background and deferred capture write the same store; pending checkpoints stay
invisible to readers; a killed featurizer (background worker or `montrage capture`) loses nothing committed
and the same command resumes; `montrage capture --num-processes 2` equals one process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from montrage.capture import capture_run, ensure_featurized
from montrage.storage import RunStore
from montrage.storage import schema as S

STEPS, EVERY = 4, 2  # checkpoints at 0, 2, 4


def _configs():
    from montrage.config import CaptureConfig, TrainConfig

    return (TrainConfig(steps=STEPS, batch_size=4, lr=2e-3, prior_fraction=0.0, warmup_steps=1),
            CaptureConfig(every_n_steps=EVERY, probe_steps=2, timesteps=(300,), anchors=2, modules=("mid_block",),
                          conditions=("null",)))


def _probes(tmp: Path) -> Path:
    from montrage.data.probes import Probe, save_probe_file

    path = tmp / "probes.jsonl"
    save_probe_file([Probe("a circle by artist-0", 10000, "artist-0"), Probe("a square by artist-1", 10001, "artist-1")],
                    path)
    return path


def _train(data: Path, out: Path, mode: str, probes: Path):
    from montrage.training import train

    cfg, capture = _configs()
    return train(data, out, cfg=cfg, capture=capture, probes_file=probes, progress=False, capture_mode=mode)


def _arrays(run: Path) -> dict:
    """Every array a reader sees (committed checkpoints only)."""
    st = RunStore.open(run)
    out = {"steps": st.steps, "train_loss": st.scalar_series(S.TRAIN_LOSS), "images": st.probe_images(slice(None)),
           "lora": st.array(f"{S.LORA}/{S.WEIGHTS}")[: st.n_checkpoints]}
    for kind in S.FEATURE_KINDS:
        out[f"{kind}/loss"] = st.losses(kind)
        for m in st.modules:
            out[f"{kind}/{m}"] = st.features(kind, m)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k], equal_nan=True), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """The same tiny training recorded inline, in the background and deferred (snapshots only)."""
    root = tmp_path_factory.mktemp("modes")
    probes = _probes(root)
    out = {}
    for mode in ("inline", "background", "deferred"):
        _train(tiny_data, root / mode, mode, probes)
        out[mode] = root / mode
    out["probes"] = probes
    return out


def test_background_store_is_bit_identical_to_inline(runs):
    inline = _arrays(runs["inline"])
    assert inline["steps"].tolist() == [0, 2, 4]
    _assert_same(inline, _arrays(runs["background"]))
    assert RunStore.open(runs["background"]).pending_steps == []


def test_deferred_checkpoints_are_pending_and_invisible_until_captured(runs, tmp_path, capsys):
    run = tmp_path / "deferred"
    shutil.copytree(runs["deferred"], run)
    st = RunStore.open(run)
    assert st.n_checkpoints == 0 and st.steps.tolist() == [] and st.pending_steps == [0, 2, 4]
    assert st.features(S.TRAIN, "mid_block").shape[0] == 0
    assert st.snapshot_steps.tolist() == [0, 2, 4]  # the loop's part is committed
    from montrage.storage.inspect import summary

    text, data = summary(run)
    assert data["pending_checkpoints"] == [0, 2, 4] and "pending" in text
    assert ensure_featurized(run) == 3  # what `montrage attribute` does first, saying so
    assert "not featurized yet" in capsys.readouterr().out
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def test_capture_on_two_processes_equals_one(runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(runs["deferred"], one)
    shutil.copytree(runs["deferred"], two)
    from montrage.cli import main

    assert main(["--quiet", "capture", str(one)]) == 0  # `montrage capture RUN`: one process
    assert RunStore.open(one).steps.tolist() == [0, 2, 4]
    assert capture_run(one, progress=False).pending_before == 0  # nothing left: a no-op
    res = capture_run(two, num_processes=2, progress=False)
    assert res.featurized == [0, 2, 4] and res.processes == 2
    _assert_same(_arrays(one), _arrays(two))
    _assert_same(_arrays(runs["inline"]), _arrays(two))


def test_units_featurized_in_any_order_give_the_inline_store(runs, tmp_path):
    """A helper's unit loop (`--serve`), fed the units of every checkpoint in reverse order: each unit writes
    only its own arrays, so the committed store is the inline one whoever did which unit, whenever."""
    from montrage.callbacks.background import serve_units, work_units

    run = tmp_path / "units"
    shutil.copytree(runs["deferred"], run)
    store = RunStore.open_featurizer(run)
    try:
        store.reserve_featurized(3)
        said: list = []
        serve_units(str(run), 1, "cpu", lines=[f"{k} {kind}\n" for k, kind in reversed(work_units(0, 3))],
                    emit=said.append)
        assert said[0] == "ready" and len(said) == 1 + 9 and all(s.startswith("done ") and s.endswith(" 0")
                                                                 for s in said[1:])
        assert RunStore.open(run).n_checkpoints == 0  # written, not committed: readers see nothing yet
        store.commit_featurized(3)
    finally:
        store.close()
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def test_capture_with_spawned_helpers_equals_inline(runs, tmp_path, monkeypatch):
    """Where helpers cannot be forked (GPU, several threads per process, not Linux) they are started as
    `python -m montrage.callbacks.background RUN --serve` processes: the same store."""
    import montrage.callbacks.background as bg

    monkeypatch.setattr(bg, "can_fork_helpers", lambda *a: False)
    run = tmp_path / "spawned"
    shutil.copytree(runs["deferred"], run)
    assert capture_run(run, num_processes=2, progress=False).featurized == [0, 2, 4]
    _assert_same(_arrays(runs["inline"]), _arrays(run))


@pytest.mark.parametrize("how", ["forked", "spawned"])
def test_a_helper_that_dies_hands_its_unit_back(runs, tmp_path, monkeypatch, how):
    """`montrage capture --num-processes 2` whose helper takes a unit and dies: the coordinator does that unit
    and the rest, and the store is the inline one."""
    import montrage.callbacks.background as bg

    if how == "spawned":
        dying = [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline(); "
                 f"open({str(tmp_path / 'died')!r}, 'w'); sys.exit(3)"]
        monkeypatch.setattr(bg, "can_fork_helpers", lambda *a: False)
        monkeypatch.setattr(bg, "worker_command", lambda *a, **k: dying)
    else:
        coordinator, run_unit = os.getpid(), bg.UnitFeaturizer.run

        def run_or_die(self, index, kind):
            if os.getpid() != coordinator:
                (tmp_path / "died").touch()
                os._exit(3)  # the forked helper dies on its first unit
            return run_unit(self, index, kind)

        monkeypatch.setattr(bg.UnitFeaturizer, "run", run_or_die)
    run = tmp_path / "dies"
    shutil.copytree(runs["deferred"], run)
    res = capture_run(run, num_processes=2, progress=False)
    assert (tmp_path / "died").exists()  # the helper did take a unit
    assert res.featurized == [0, 2, 4]
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def _committed(run: Path) -> int:
    try:
        return RunStore.open(run).n_checkpoints
    except Exception:  # noqa: BLE001 (the store may be mid-write)
        return 0


def test_killed_capture_resumes_and_keeps_what_was_committed(runs, tmp_path):
    run = tmp_path / "deferred"
    shutil.copytree(runs["deferred"], run)
    cmd = [sys.executable, "-m", "montrage.callbacks.background", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _committed(run) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = RunStore.open(run)
    n = kept.n_checkpoints
    assert 1 <= n <= 3
    before = _arrays(run)
    res = capture_run(run, progress=False)  # the same work again: resumes at the commit marker
    assert res.pending_before == 3 - n
    after = _arrays(run)
    for k, v in before.items():  # nothing committed was lost or changed
        assert np.array_equal(v, after[k][: len(v)], equal_nan=True), k
    _assert_same(_arrays(runs["inline"]), after)


def test_background_worker_killed_mid_run_is_restarted(tiny_data, runs, tmp_path):
    run = tmp_path / "bg"
    lock = run / S.CAPTURE_LOCK_FILENAME
    killed: list = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    _train(tiny_data, run, "background", runs["probes"])
    t.join(timeout=5)
    assert killed, "the worker never started"
    assert RunStore.open(run).pending_steps == []
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def test_per_step_signals_are_recorded_with_dimension_names(runs):
    """Per-sample losses, timesteps and image indices of every step, from the loop (no extra forward pass)."""
    cfg, _ = _configs()
    for mode in ("inline", "background", "deferred"):
        sig = RunStore.open(runs[mode]).step_signals()
        assert sig[S.SIGNAL_STEP].tolist() == [s for s in range(1, STEPS + 1) for _ in range(cfg.batch_size)], mode
        assert ((sig[S.SIGNAL_INDEX] >= 0) & (sig[S.SIGNAL_INDEX] < 8)).all()
        assert ((sig[S.SIGNAL_TIMESTEP] >= 0) & (sig[S.SIGNAL_TIMESTEP] < 1000)).all()
        assert np.isfinite(sig[S.SIGNAL_LOSS]).all() and (sig[S.SIGNAL_LOSS] > 0).all()
    inline = RunStore.open(runs["inline"])
    for name, _ in S.SIGNAL_ARRAYS:
        assert inline.array(f"{S.SIGNALS}/{name}").metadata.dimension_names == (S.DIM_SAMPLE,)
        for mode in ("background", "deferred"):
            assert np.array_equal(inline.step_signals()[name], RunStore.open(runs[mode]).step_signals()[name])
    # the running train loss of a checkpoint is the mean of its steps' per-sample losses
    sig = inline.step_signals()
    mean_2 = sig[S.SIGNAL_LOSS][sig[S.SIGNAL_STEP] <= 2].reshape(2, -1).mean(1).mean()
    assert np.isclose(inline.scalar_series(S.TRAIN_LOSS)[1], mean_2, rtol=1e-5)


def test_loss_trajectory_channel_groups_the_loop_losses_by_image_and_interval(runs):
    from montrage.analysis.step_signals import loss_trajectory

    st = RunStore.open(runs["background"])
    sig = st.step_signals()
    traj = loss_trajectory(st)
    assert traj.intervals.tolist() == [[0, 2], [2, 4]] and traj.loss.shape == (2, 8)
    for k, (lo, hi) in enumerate(traj.intervals):
        for i in range(8):
            rows = (sig[S.SIGNAL_INDEX] == i) & (sig[S.SIGNAL_STEP] > lo) & (sig[S.SIGNAL_STEP] <= hi)
            assert traj.count[k, i] == rows.sum()
            if rows.any():
                assert np.isclose(traj.loss[k, i], sig[S.SIGNAL_LOSS][rows].mean(), rtol=1e-6)
            else:
                assert np.isnan(traj.loss[k, i])
    assert traj.count.sum() == len(sig[S.SIGNAL_STEP])  # no prior images in this run: every row is an image


@pytest.mark.slow
def test_training_loop_killed_in_background_mode_resumes(tiny_data, runs, tmp_path):
    """SIGKILL the training process after its first snapshots: its worker still featurizes what was
    committed, and the same call resumes to the store an uninterrupted run writes."""
    import multiprocessing as mp

    run = tmp_path / "bg-killed"
    child = mp.get_context("fork").Process(target=_train, args=(tiny_data, run, "background", runs["probes"]))
    child.start()
    deadline = time.time() + 120
    while child.is_alive() and time.time() < deadline:
        try:
            if RunStore.open(run).n_snapshots >= 2:
                break
        except Exception:  # noqa: BLE001 (not created yet)
            pass
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    _train(tiny_data, run, "background", runs["probes"])
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def test_capture_on_a_dask_cluster_equals_inline(runs, tmp_path):
    """`montrage capture RUN --dask-scheduler ADDR`: two worker processes of a LocalCluster featurize the
    snapshots (each its share, into its own regions) and this process commits them: the inline store."""
    distributed = pytest.importorskip("distributed")
    run = tmp_path / "dask"
    shutil.copytree(runs["deferred"], run)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        res = capture_run(run, dask_scheduler=cluster.scheduler_address, progress=False)
    assert res.featurized == [0, 2, 4] and res.pending_before == 3
    _assert_same(_arrays(runs["inline"]), _arrays(run))


def test_worker_finishes_on_two_processes_once_training_is_over(runs, tmp_path):
    """The background worker's loop: a wake, then EOF (the training process is done) with every checkpoint
    still pending: it featurizes them with a forked helper, units at a time, into the inline store."""
    from montrage.callbacks.background import _engine, _follow, capture_times

    run = tmp_path / "tail"
    shutil.copytree(runs["deferred"], run)
    read_end, write_end = os.pipe()
    os.write(write_end, b"\n")
    os.close(write_end)  # EOF right after the last snapshot's wake
    store = RunStore.open_featurizer(run)
    try:
        _follow(store, _engine(store, 1, "cpu"), lambda k, step: None, 1, "cpu", fd=read_end)
    finally:
        os.close(read_end)
        store.close()
    _assert_same(_arrays(runs["inline"]), _arrays(run))
    assert capture_times(run)["background"]["checkpoints"] == 3


def test_capture_cost_says_where_featurizing_ran(runs, tmp_path):
    """Every featurizer logs its seconds per checkpoint: the report's cost of capture says what the loop spent
    (featurizing inline, snapshots only otherwise) and what the background worker / `montrage capture` did."""
    from montrage.callbacks.background import capture_times
    from montrage.report.html import _capture_cost

    def cost(run: Path) -> str:
        st = RunStore.open(run)
        return _capture_cost(st, [int(s) for s in st.steps], [float(w) for w in st.scalar_series(S.WALL_TIME)])

    inline, bg = capture_times(runs["inline"]), capture_times(runs["background"])
    assert set(inline) == {"loop"} and inline["loop"]["checkpoints"] == 3 and inline["loop"]["seconds"] > 0
    assert set(bg) == {"loop", "background"} and bg["background"]["checkpoints"] == 3
    assert bg["background"]["seconds"] > bg["loop"]["seconds"]  # the loop only snapshotted
    assert "inline capture" in cost(runs["inline"]) and "featurizing included" in cost(runs["inline"])
    assert "snapshots only" in cost(runs["background"]) and "background worker" in cost(runs["background"])
    run = tmp_path / "deferred"
    shutil.copytree(runs["deferred"], run)
    capture_run(run, num_processes=2, progress=False)
    done = capture_times(run)
    assert done["capture"]["checkpoints"] == 3 and "montrage capture" in cost(run)
