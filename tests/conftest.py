"""Shared fixtures: one tiny monitored run on the embedded base, reused across test modules."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and two threads thrash when anything else runs on a
# 2-core machine (measured 10-50x slower); MONTRAGE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MONTRAGE_TEST_THREADS", 1)))

TINY_STEPS = 6
TINY_EVERY = 3


def tiny_configs(steps: int = TINY_STEPS, every: int = TINY_EVERY):
    from montrage.config import CaptureConfig, TrainConfig

    return (TrainConfig(steps=steps, batch_size=4, lr=2e-3, prior_fraction=0.0, warmup_steps=2),
            CaptureConfig(every_n_steps=every, probe_steps=4, timesteps=(100, 500), anchors=4))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from montrage.data.synthetic import write_concept_dataset

    return write_concept_dataset(tmp_path_factory.mktemp("data") / "artists", n_artists=2, images_per_artist=4)


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size and modification time (None for a folder): any write shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = None if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def _tiny_run_built(tmp_path_factory, tiny_data) -> tuple:
    """The shared run, a pristine copy of it and its snapshot (for the write guard below)."""
    from montrage.training import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg, capture = tiny_configs()
    train(tiny_data, run, cfg=cfg, capture=capture, progress=False, capture_mode="inline")
    pristine = tmp_path_factory.mktemp("runs-pristine") / "tiny"
    shutil.copytree(run, pristine)
    return run, pristine, _snapshot(run)


@pytest.fixture(scope="session")
def tiny_run(_tiny_run_built) -> Path:
    """2 concepts x 4 images, 3 checkpoints (steps 0, 3, 6). READ ONLY: shared by the whole session, so a test
    (or session fixture) that writes into it (attribution results, montrage-models/, gradient features...) would
    change what later tests see; those use ``tiny_run_copy``. ``_guard_tiny_run`` fails any test that writes.

    Inline capture: no worker process to start (~10 s); the store is bit-identical to background capture's
    (tests/callbacks/test_capture_modes.py), and capture modes are not what the users of this run test."""
    return _tiny_run_built[0]


@pytest.fixture()
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared tiny run, for tests that write into their run."""
    dst = tmp_path / "tiny-run-copy"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(autouse=True)
def _guard_tiny_run(request):
    """After every test that uses the shared tiny run (directly or through a fixture): it must be unchanged.

    A write fails that test loudly (naming what changed) and the run is restored from its pristine copy, so
    later tests still see the run they expect, whatever the order the tests run in."""
    yield
    if "tiny_run" not in request.fixturenames:
        return
    run, pristine, before = request.getfixturevalue("_tiny_run_built")
    after = _snapshot(run)
    if after == before:
        return
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))
    shutil.rmtree(run)
    shutil.copytree(pristine, run)  # copy2: the modification times come back too, so the snapshot matches
    pytest.fail(f"{request.node.nodeid} (or a session fixture it uses) wrote into the shared session run "
                f"`tiny_run` ({len(changed)} paths changed, e.g. {changed[:5]}); a test that writes into its run "
                "must use `tiny_run_copy`", pytrace=False)


@pytest.fixture(autouse=True)
def _light_concept_classifier(monkeypatch):
    """The fused model's concept classifier with 60 steps and one net (the library's default: 600 steps, 3 nets):
    tests of the pipeline do not judge the classifier, and every image-only fit trains 5 of them (about 2 minutes
    of the suite on 2 cores at full size). Its own tests (tests/analysis/test_concept_classifier.py) pass their
    settings explicitly and judge it against ground truth."""
    from montrage.analysis import concept_classifier

    monkeypatch.setattr(concept_classifier, "CLASSIFIER_STEPS", 60)
    monkeypatch.setattr(concept_classifier, "CLASSIFIER_ENSEMBLE", 1)
