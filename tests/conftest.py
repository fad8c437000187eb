"""Shared fixtures: one tiny monitored run on the embedded base, reused across test modules."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """2 concepts x 4 images, 3 checkpoints (steps 0, 3, 6).

    Inline capture: no worker process to start (~10 s); the store is bit-identical to background capture's
    (tests/callbacks/test_capture_modes.py), and capture modes are not what the users of this run test."""
    from montrage.training import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg, capture = tiny_configs()
    train(tiny_data, run, cfg=cfg, capture=capture, progress=False, capture_mode="inline")
    return run
