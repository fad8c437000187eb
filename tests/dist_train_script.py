"""Helper of tests/test_distributed.py: monitored training with an ``Accelerator``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_train_script.py dist DATA RUN INFO
    python tests/dist_train_script.py reference DATA RUN INFO

``dist`` (a subprocess per rank): ``montrage.training.train`` in each process, twice: with inline capture
into ``RUN/inline`` (each rank featurizes its strided share of the items; the shards are gathered on rank 0)
and with background capture (train()'s default: rank 0's worker process featurizes) into
``RUN/background``; each rank writes ``INFO/rank{r}.json`` with the world size it saw.

:func:`reference` (one process; the test calls it in its own process, no launch needed): the same config
into ``RUN/single``, and into ``RUN/concat`` a run whose batch at step s is the rank-0 batch followed by
the rank-1 batch of the 2-process run, i.e. the batch that data-parallel training with gradient averaging
effectively uses.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

WORLD = 2


def configs():
    from montrage.config import CaptureConfig, TrainConfig

    # 6 training images, 3 anchors and 15 default probes: odd counts, so the strided shards are uneven.
    return (TrainConfig(steps=4, batch_size=2, lr=2e-3, prior_fraction=0.0, warmup_steps=0),
            CaptureConfig(every_n_steps=2, probe_steps=2, timesteps=(100, 500), anchors=3))


def _accelerator():
    from accelerate import Accelerator

    # cpu=True on a CPU machine: a plain Accelerator() there leaves every torchrun process on its own
    # (distributed_type NO, world size 1) instead of joining a gloo group.
    return Accelerator(cpu=not torch.cuda.is_available())


def _info(folder: str, accelerator, name: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, name).write_text(json.dumps({
        "world_size": accelerator.num_processes, "rank": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type), "env_world_size": os.environ.get("WORLD_SIZE")}))


def reference(data, run, info) -> None:
    """The single-process references (inline capture: bit-identical to background, and no worker to start)."""
    import montrage.training as T

    cfg, capture = configs()
    accelerator = _accelerator()
    T.train(data, Path(run, "single"), cfg=cfg, capture=capture, accelerator=accelerator, progress=False,
            capture_mode="inline")
    real = T.step_batch

    def both_ranks(step, rank, *args, **kwargs):
        parts = [real(step, r, *args, **kwargs) for r in range(WORLD)]
        out = (torch.cat([p[0] for p in parts]), sum((p[1] for p in parts), []),
               torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]))
        return out + (sum((list(p[4]) for p in parts), []),) if kwargs.get("with_indices") else out

    T.step_batch = both_ranks
    try:
        T.train(data, Path(run, "concat"), cfg=cfg, capture=capture, accelerator=accelerator, progress=False,
                capture_mode="inline")
    finally:
        T.step_batch = real
    _info(info, accelerator, "reference.json")


def main(argv) -> None:
    torch.set_num_threads(1)
    mode, data, run, info = argv
    if mode == "reference":
        return reference(data, run, info)
    assert mode == "dist", mode
    import montrage.training as T

    cfg, capture = configs()
    accelerator = _accelerator()
    for capture_mode in ("inline", "background"):
        T.train(data, Path(run, capture_mode), cfg=cfg, capture=capture, accelerator=accelerator, progress=False,
                capture_mode=capture_mode)
    _info(info, accelerator, f"rank{accelerator.process_index}.json")


if __name__ == "__main__":
    main(sys.argv[1:])
