"""Crash safety of `montrage train` as a subprocess: SIGKILL trials, a concurrent reader, a second writer.

The module fixture runs the uninterrupted reference training (fast settings: 4 steps, checkpoints 0, 2,
4) as a subprocess, launched together with a second identical `montrage train` on the same output (one of
the two must be refused), while this process reads the store and attributes with 'final-sim' in a loop.
"""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from benchmarks import faults as F  # the campaign's trial mechanics, imported from the checkout

SETTINGS = F.TEST_SETTINGS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from montrage.analysis.attribute import attribute
    from montrage.errors import StoreError

    work = tmp_path_factory.mktemp("faults")
    data, probes = F.prepare(work, SETTINGS)
    run = work / "reference"
    cmd = F.train_command(data, run, probes, SETTINGS)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=F.child_env(),
                              cwd=str(F.REPO_ROOT)) for _ in range(2)]
    observations = []
    try:
        deadline = time.monotonic() + SETTINGS.timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            try:  # attribute first: commits only grow, so the snapshot after it holds the checkpoint it used
                res = attribute(run, "final-sim", options={"query_mode": "A"}, write_store=False, progress=False)
                seen = F.snapshot(run)
            except StoreError:  # no store yet, or not initialised yet: nothing committed to see
                time.sleep(0.05)
                continue
            observations.append({"seen": seen, "step": res.step, "scores": res.scores})
            time.sleep(0.05)
        outs = [p.communicate(timeout=SETTINGS.timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ref = F.snapshot(run)
    return {"work": work, "data": data, "probes": probes, "run": run, "arrays": ref, "lora": F.final_lora(run),
            "rcs": [p.returncode for p in procs], "stderr": [o[1].decode(errors="replace") for o in outs],
            "observations": observations}


def test_second_writer_is_refused(reference):
    rcs, errs = reference["rcs"], reference["stderr"]
    assert sorted(rcs) == [0, 2], (rcs, errs)
    loser = errs[rcs.index(2)]
    assert "error:" in loser and "being written by another process" in loser, loser
    assert reference["arrays"]["steps"].tolist() == SETTINGS.checkpoint_steps


def test_reader_sees_only_complete_checkpoints(reference):
    from montrage.analysis.attribute import attribute

    ref, obs = reference["arrays"], reference["observations"]
    assert obs, "the reader never saw a committed checkpoint while training ran"
    final_scores = {}
    for o in obs:
        n = len(o["seen"]["steps"])
        assert n >= 1 and o["step"] in o["seen"]["steps"].tolist() and o["step"] in ref["steps"].tolist()
        cmp = F.compare_checkpoints(o["seen"], ref, n)
        assert all(cmp["intact"]), cmp["diffs"]  # every visible checkpoint complete and final
        assert all(v.shape[0] == n for v in o["seen"].values())  # nothing past the commit marker
        if o["step"] not in final_scores:  # the same attribution, recomputed after training ended
            final_scores[o["step"]] = attribute(reference["run"], "final-sim", checkpoint_step=o["step"],
                                                options={"query_mode": "A"}, write_store=False,
                                                progress=False).scores
        np.testing.assert_allclose(o["scores"], final_scores[o["step"]], rtol=1e-6)


def _trial(reference, name, plan):
    return F.run_trial(reference["work"], name, plan, reference["data"], reference["probes"], SETTINGS,
                       reference["arrays"], reference["lora"])


IN_WRITE = {"mode": "in-write", "k": 1, "array": "train/features/mid_block"}
KILL_PLANS = {"in-write-0": IN_WRITE, "creation": {"mode": "creation"}, "after-commit": {"mode": "after-commit", "k": 1}}


@pytest.fixture(scope="module")
def kill_trials(reference):
    """The kill trials below, run side by side: each kills and reruns its own `montrage train` in its own
    folder, and most of a trial is the child's start-up (this process only polls), so three at once keep
    both cores busy instead of one. Each test takes its own trial's result (or exception)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(KILL_PLANS)) as pool:
        return {name: pool.submit(_trial, reference, name, plan) for name, plan in KILL_PLANS.items()}


def test_kill_inside_a_checkpoint_write(reference, kill_trials):
    """Killed between the train-feature chunk of checkpoint 1 and its commit marker (retried if the poll missed)."""
    for attempt in range(3):
        res = kill_trials["in-write-0"].result() if attempt == 0 else _trial(reference, f"in-write-{attempt}", IN_WRITE)
        assert res["survived"], res
        assert res["data_lost_checkpoints"] == 0
        if res["landed_in_write"]:
            break
    assert res["landed_in_write"], "no kill landed inside the write in 3 attempts"
    assert res["committed_at_kill"] == 1 and res["partial_arrays"], res


def test_kill_during_store_creation(kill_trials):
    res = kill_trials["creation"].result()
    assert res["survived"], res


def test_kill_right_after_a_commit(kill_trials):
    res = kill_trials["after-commit"].result()
    assert res["survived"], res
    assert res["committed_at_kill"] >= 2
    # Killed after the store committed step s but before resume/step-s.pt was saved, the rerun replays from
    # step s - every; the monitor drops the replayed steps' running loss when record_checkpoint(s) finds s
    # already recorded, so the next checkpoint's train_loss is the uninterrupted run's (was an xfail).
    assert res["train_loss_equal"], f"train_loss differs after the rerun at steps {res.get('train_loss_diff_steps')}"
