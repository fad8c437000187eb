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
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from montrage.callbacks.background import (UNIT_KINDS, featurize_pending, featurize_share, share_indices,
                                           work_units, worker_command, worker_env)
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


class _Committer:
    """Rank 0's in-order commit of checkpoints completed out of order by several processes."""

    def __init__(self, store: RunStore, start: int, end: int) -> None:
        self.store, self.next, self.end = store, start, end
        self.done: Dict[int, bool] = {}

    def add(self, k: int, nonfinite: bool) -> None:
        self.done[k] = nonfinite
        upto, bad = self.next, []
        while upto in self.done:
            if self.done[upto]:
                bad.append(upto)
            upto += 1
        if upto > self.next:
            self.store.commit_featurized(upto, bad)
            self.next = upto

    @property
    def complete(self) -> bool:
        return self.next >= self.end


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


class _UnitCommitter:
    """Collects finished units (from any thread) and commits each checkpoint, in order, once all its units are
    written."""

    def __init__(self, store: RunStore, start: int, end: int) -> None:
        self.commit = _Committer(store, start, end)
        self.parts: Dict[int, List[bool]] = {}
        self.lock = threading.Lock()

    def add(self, k: int, kind: str, bad: bool) -> None:
        with self.lock:
            got = self.parts.setdefault(k, [])
            got.append(bool(bad))
            if len(got) == len(UNIT_KINDS):
                self.commit.add(k, any(got))

    @property
    def complete(self) -> bool:
        return self.commit.complete


class _UnitQueue:
    """The units left to do, shared by the coordinator and its helpers' feeding threads; a helper that dies
    puts its unit back."""

    def __init__(self, units: List[Tuple[int, str]]) -> None:
        self.units = deque(units)
        self.cond = threading.Condition()
        self.feeding = 0  # helper threads still running (one may put a unit back)

    def take(self) -> Optional[Tuple[int, str]]:
        with self.cond:
            return self.units.popleft() if self.units else None

    def put_back(self, unit: Tuple[int, str]) -> None:
        with self.cond:
            self.units.appendleft(unit)
            self.cond.notify_all()

    def helper_ended(self) -> None:
        with self.cond:
            self.feeding -= 1
            self.cond.notify_all()

    def wait(self, timeout: float = 1.0) -> None:
        with self.cond:
            if not self.units and self.feeding:
                self.cond.wait(timeout)


def _feed(p: subprocess.Popen, units: _UnitQueue, committer: _UnitCommitter, errors: List[str]) -> None:
    """Hand one unit at a time to helper ``p`` (once it says ``ready``) until none is left."""
    unit = None
    try:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise CaptureError(line.strip() or "it exited before it was ready")
        while True:
            unit = units.take()
            if unit is None:
                break
            p.stdin.write(f"{unit[0]} {unit[1]}\n")
            p.stdin.flush()
            line = p.stdout.readline().split()
            if len(line) != 4 or line[0] != "done" or (int(line[1]), line[2]) != unit:
                raise CaptureError(" ".join(line) or "it exited")
            committer.add(unit[0], unit[1], bool(int(line[3])))
            unit = None
    except (CaptureError, OSError, ValueError) as exc:
        if unit is not None:
            units.put_back(unit)  # the coordinator (or another helper) does it
        errors.append(f"helper {p.pid}: {exc}")
    finally:
        try:
            p.stdin.close()  # EOF: the helper exits
        except OSError:
            pass
        units.helper_ended()


def _on_local_processes(store: RunStore, start: int, end: int, world: int, threads: int, device: str) -> None:
    """Rank 0 and ``world - 1`` helper processes take units of work (one checkpoint's training images, anchors
    or probes) from one queue as each gets free; rank 0 commits the checkpoints in order. On Linux CPU the
    helpers are forked once rank 0's engine is built (they share its loaded model); otherwise they are started
    first, so that their start-up (importing torch, rebuilding the base) overlaps this process's."""
    from montrage.callbacks.background import ForkedHelper, UnitFeaturizer, _engine, can_fork_helpers

    store.reserve_featurized(end)  # before any helper starts: they then write regions, never metadata
    units = _UnitQueue(work_units(start, end))
    committer = _UnitCommitter(store, start, end)
    errors: List[str] = []
    procs: list = []
    n_helpers = max(0, min(world, len(units.units)) - 1)
    fork = can_fork_helpers(threads, device)
    try:
        if not fork:
            for _ in range(n_helpers):
                procs.append(subprocess.Popen(
                    worker_command(store.run_dir, "--serve", "--threads", str(threads), "--device", device),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env(threads),
                    text=True, bufsize=1))
        own = UnitFeaturizer(store, _engine(store, threads, device))
        if fork:  # before any thread of ours starts: the children then hold no lock a thread held
            lock_fd = getattr(store, "_capture_fd", None)
            for _ in range(n_helpers):
                inherited = [fd for p in procs for fd in p.fds] + ([lock_fd] if lock_fd is not None else [])
                procs.append(ForkedHelper(str(store.run_dir), own.engine, close_in_child=inherited))
        for p in procs:
            units.feeding += 1
            threading.Thread(target=_feed, args=(p, units, committer, errors), daemon=True).start()
        while not committer.complete:
            unit = units.take()
            if unit is not None:
                committer.add(unit[0], unit[1], own.run(*unit))
            elif units.feeding:
                units.wait()  # the helpers hold the last units
            else:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=2 if committer.complete else 0.1)  # all done: nothing in flight
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                p.kill()  # still starting up when the work ran out, or stuck
                p.wait()
    if not committer.complete:
        stderr = [((p.stderr.read() if p.stderr else "") or "").strip().splitlines()[-1:] for p in procs if p.returncode]
        why = "; ".join(errors + [e[0] for e in stderr if e]) or "no message"
        raise CaptureError(f"capture helpers of {store.run_dir} failed ({why}); {committer.commit.next - start} of "
                           f"{end - start} checkpoints committed: rerun the same `montrage capture` to finish")


def _on_dask(store: RunStore, start: int, end: int, address: str, world: int, threads: Optional[int],
             device: str) -> None:
    from dask.distributed import Client, as_completed

    store.reserve_featurized(end)
    committer = _Committer(store, start, end)
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
