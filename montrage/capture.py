"""``montrage capture RUN``: featurize the snapshots a training loop recorded (``--capture deferred``, or what a
background worker left), after the fact, on as many processes as you have.

Resumable: it starts from the commit marker, so the same command after a kill finishes the job. With
``num_processes`` N > 1, this process (rank 0) and N-1 local helper processes take the pending checkpoints'
units of work (training images, anchors or probes of one checkpoint) from one queue as each gets free, each
writing its units' regions of the featurized arrays; rank 0 commits every checkpoint in order once all its
units are written. ``dask_scheduler`` does the same on a dask.distributed cluster (the workers need the
run folder at the same path).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from montrage.callbacks.background import Committer, featurize_pending, featurize_share, featurize_units, share_indices
from montrage.errors import CaptureError, ConfigError, StoreLockedError
from montrage.storage import RunStore

log = logging.getLogger(__name__)


@dataclass
class CaptureResult:
    run: str
    featurized: List[int] = field(default_factory=list)  # steps featurized by this call
    pending_before: int = 0
    seconds: float = 0.0
    processes: int = 1


def _threads_per_process(threads: Optional[int], n: int) -> int:
    """Default: montrage.callbacks.capture.DEFAULT_THREADS per process (bit-identical to the other modes)."""
    from montrage.callbacks.capture import DEFAULT_THREADS

    return int(threads) if threads else DEFAULT_THREADS


def capture_run(run_dir: str | Path, num_processes: int = 1, threads: Optional[int] = None, device: str = "cpu",
                dask_scheduler: Optional[str] = None, progress: bool = True) -> CaptureResult:
    """Featurize every pending snapshot of ``run_dir`` and commit it. Raises StoreLockedError while another
    featurizer (a background worker, another ``montrage capture``) is at work on the run."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    t0 = time.perf_counter()
    store = RunStore.open_featurizer(run_dir)
    try:
        start, end = store.n_checkpoints, store.n_snapshots
        res = CaptureResult(str(run_dir), pending_before=end - start, processes=num_processes)
        if end <= start:
            return res
        if progress:
            log.info("montrage capture: featurizing %d pending checkpoint(s) of %s (steps %s) on %s", end - start,
                     run_dir, store.pending_steps, f"dask {dask_scheduler}" if dask_scheduler else
                     f"{num_processes} process(es)")
        if dask_scheduler:
            _on_dask(store, start, end, dask_scheduler, num_processes, threads, device)
        elif num_processes == 1:
            from montrage.callbacks.background import _engine

            featurize_pending(store, _engine(store, _threads_per_process(threads, 1), device),
                              lambda k, step: log.info("montrage capture: checkpoint %d (step %d) done", k, step)
                              if progress else None)
        else:
            _on_local_processes(store, start, end, num_processes, _threads_per_process(threads, num_processes), device)
        res.featurized = [int(s) for s in store.root["checkpoints/step"][start: store.n_checkpoints]]
        res.seconds = time.perf_counter() - t0
        return res
    finally:
        store.close()


def _on_local_processes(store: RunStore, start: int, end: int, world: int, threads: int, device: str) -> None:
    featurize_units(store, start, end, world, threads, device)


def _on_dask(store: RunStore, start: int, end: int, address: str, world: int, threads: Optional[int],
             device: str) -> None:
    from dask.distributed import Client, as_completed

    store.reserve_featurized(end)
    committer = Committer(store, start, end)
    cluster = None
    if address == "local":  # a cluster of this machine: one single-threaded worker process per --num-processes
        from dask.distributed import LocalCluster

        cluster = LocalCluster(n_workers=max(1, world), threads_per_worker=1, processes=True, dashboard_address=None)
    with (cluster or contextlib.nullcontext()), Client(cluster if cluster is not None else address) as client:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        world = max(world, workers) if world > 1 else workers
        futures = [client.submit(featurize_share, str(store.run_dir), r, world, start, end,
                                 _threads_per_process(threads, 1), device,
                                 pure=False) for r in range(world) if share_indices(r, world, start, end)]
        for fut in as_completed(futures):
            for k, bad in fut.result():
                committer.add(k, bad)


def ensure_featurized(run_dir: str | Path, progress: bool = True, poll_s: float = 1.0,
                      timeout_s: Optional[float] = None) -> int:
    """Before reading a run: featurize its pending snapshots, or wait for the worker doing it. Returns how many
    were pending. Says what it does (the default capture mode leaves this to the background worker)."""
    if not RunStore.exists(run_dir):
        return 0
    pending = RunStore.open(run_dir).pending_steps
    if not pending:
        return 0
    t0, said = time.time(), False
    while True:
        try:
            RunStore.open_featurizer(run_dir).close()  # free: nobody is featurizing, so do it here
            if progress:
                print(f"montrage: {len(pending)} checkpoint(s) of {run_dir} are not featurized yet (steps {pending}); "
                      "featurizing them now", flush=True)
            capture_run(run_dir, progress=progress)
            return len(pending)
        except StoreLockedError:
            if progress and not said:
                print(f"montrage: waiting for the background capture of {run_dir} ({len(pending)} checkpoint(s) "
                      "pending)", flush=True)
                said = True
        now_pending = RunStore.open(run_dir).pending_steps
        if not now_pending:
            return len(pending)
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise CaptureError(f"{run_dir}: {len(now_pending)} checkpoint(s) still pending after {timeout_s:.0f} s")
        time.sleep(poll_s)
