"""Featurizing outside the training loop: the background worker process and its handle.

The training loop commits snapshots (:meth:`RunStore.append_snapshot`) and wakes the worker with one line on
its stdin; the worker, a separate process with its own copy of the frozen base (rebuilt from the run config,
like analysis does), featurizes every pending snapshot in order and commits each one. It reads the snapshots
from the store, not from the pipe, so when the training process ends or dies (the pipe closes) it still
finishes every committed snapshot, and a killed worker loses only the checkpoint it was computing: the next
worker (or ``montrage capture RUN``) resumes from the commit marker.

The same program, with ``--share R --world W``, is a helper of ``montrage capture --num-processes W``: it
featurizes its strided share of the pending checkpoints into their reserved regions and reports each on
stdout; the coordinating process (rank 0) commits them in order.

    python -m montrage.callbacks.background RUN [--follow] [--threads T] [--device D] [--nice N]
    python -m montrage.callbacks.background RUN --share R --world W --start N --end M [--threads T]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from montrage.errors import CaptureError, MontrageError
from montrage.storage import RunStore
from montrage.storage import schema as S

log = logging.getLogger(__name__)

WORKER_LOG = "capture-worker.log"  # in the run folder: the worker's stdout/stderr


# ---------------------------------------------------------------------------- the work
def _engine(store: RunStore, threads: Optional[int], device: str):
    from montrage.callbacks.capture import CaptureEngine, rebuild_components, set_threads

    set_threads(threads)
    return CaptureEngine.from_store(store, rebuild_components(store, device), threads=threads)


def featurize_pending(store: RunStore, engine, on_commit: Optional[Callable[[int, int], None]] = None,
                      restore: bool = False) -> int:
    """Featurize and commit every pending snapshot, in order (the caller holds the capture lock); ``restore``:
    put the model's own LoRA weights back afterwards (a live training model)."""
    from montrage.callbacks.capture import featurize_snapshot

    done = 0
    while store.n_checkpoints < store.n_snapshots:  # n_snapshots is re-read from disk: follows a live loop
        k = store.n_checkpoints
        rec = featurize_snapshot(store, engine, k, restore=restore)
        store.write_featurized(k, rec)
        store.commit_featurized(k + 1, [k] if rec.has_nonfinite() else [])
        done += 1
        if on_commit is not None:
            on_commit(k, rec.step)
    return done


def share_indices(rank: int, world: int, start: int, end: int) -> List[int]:
    """Checkpoints ``start..end-1`` of rank ``rank`` out of ``world`` (strided: in-order commits come early)."""
    return list(range(start + rank, end, world))


def featurize_share(run_dir: str, rank: int, world: int, start: int, end: int, threads: Optional[int] = None,
                    device: str = "cpu", on_done: Optional[Callable[[int, bool], None]] = None) -> List[Tuple[int, bool]]:
    """A helper's share: write the featurized regions of its checkpoints (reserved by the coordinator, who
    holds the capture lock and commits). Returns [(index, non-finite)]. Also the task run on Dask workers."""
    import zarr

    store = RunStore(Path(run_dir), zarr.open_group(RunStore.store_path(run_dir), mode="r+"), writable=True)
    from montrage.callbacks.capture import featurize_snapshot

    engine = _engine(store, threads, device)
    out = []
    for k in share_indices(rank, world, start, end):
        rec = featurize_snapshot(store, engine, k)
        store.write_featurized(k, rec, grow=False)
        out.append((k, bool(rec.has_nonfinite())))
        if on_done is not None:
            on_done(k, out[-1][1])
    return out


# ---------------------------------------------------------------------------- the worker process
def worker_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m montrage.callbacks.background")
    ap.add_argument("run")
    ap.add_argument("--follow", action="store_true", help="after catching up, featurize on each line read from stdin")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--share", type=int, default=None)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--end", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.nice:
        os.nice(args.nice)
    try:
        if args.share is not None:
            featurize_share(args.run, args.share, args.world, args.start, args.end, args.threads, args.device,
                            on_done=lambda k, bad: print(f"done {k} {int(bad)}", flush=True))
            return 0
        # a worker left by an earlier (killed) training process may still be finishing: wait for it
        store = RunStore.open_featurizer(args.run, wait=args.follow)
        try:
            engine = _engine(store, args.threads, args.device)
            report = lambda k, step: log.info("featurized checkpoint %d (step %d)", k, step)  # noqa: E731
            featurize_pending(store, engine, report)
            if args.follow:
                for _line in sys.stdin:  # one line per new snapshot; EOF when the training process ends or dies
                    featurize_pending(store, engine, report)
                featurize_pending(store, engine, report)
        finally:
            store.close()
    except MontrageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def worker_command(run_dir: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "montrage.callbacks.background", str(run_dir), *extra]


def worker_env(threads: Optional[int]) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


class BackgroundCapture:
    """The training process's handle on its background worker: start, wake, restart if it died, wait."""

    def __init__(self, run_dir: str | Path, threads: Optional[int] = 1, device: str = "cpu", nice: int = 19,
                 max_restarts: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.threads = threads
        self.device = device
        self.nice = nice if device == "cpu" else 0
        self.max_restarts = max_restarts
        self.restarts = 0
        self.proc: Optional[subprocess.Popen] = None
        self.failed = False  # gave up restarting: the snapshots stay pending for `montrage capture`
        self._log = None

    def start(self) -> None:
        extra = ["--follow", "--device", self.device, "--nice", str(self.nice)]
        if self.threads:
            extra += ["--threads", str(self.threads)]
        if self._log is None:
            self._log = open(self.run_dir / WORKER_LOG, "ab")
        self.proc = subprocess.Popen(worker_command(self.run_dir, *extra), stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=worker_env(self.threads))

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def _restart_if_dead(self) -> bool:
        """True when a worker is running (restarted if it had died); False once it died too often: training goes
        on and the snapshots stay pending (never an error inside the training loop)."""
        if self.proc is not None and self.proc.poll() is None:
            return True
        if self.failed:
            return False
        if self.proc is not None:
            if self.restarts >= self.max_restarts:
                self.failed = True
                log.error("montrage: the background capture worker of %s died %d times (exit %s; see %s); training "
                          "goes on, the snapshots stay pending: `montrage capture %s` featurizes them",
                          self.run_dir, self.restarts + 1, self.proc.returncode, self.run_dir / WORKER_LOG,
                          self.run_dir)
                return False
            self.restarts += 1
            log.warning("montrage: the background capture worker exited (code %s); restarting it (it resumes from "
                        "the last featurized checkpoint)", self.proc.returncode)
        self.start()
        return True

    def notify(self) -> None:
        """A snapshot was committed: wake the worker (restarting it if it died)."""
        if not self._restart_if_dead():
            return
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._restart_if_dead()  # it died meanwhile: the new one catches up by itself

    def finish(self, wait: bool = True, progress: bool = True, poll_s: float = 1.0) -> None:
        """No more snapshots: close the pipe; with ``wait``, wait until every snapshot is featurized."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass
        if not wait:
            log.info("montrage: background capture continues in process %d; `montrage attribute` waits for it",
                     self.proc.pid)
            return
        self._normal_priority()  # training is over: nothing left to yield to
        last = None
        while True:
            try:
                code = self.proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                code = None
            pending = RunStore.open(self.run_dir).pending_steps
            if progress and pending and pending != last:
                log.info("montrage: waiting for the background capture: %d checkpoint(s) pending (steps %s)",
                         len(pending), pending)
                last = pending
            if code is None:
                continue
            if not pending:
                break
            if not self._restart_if_dead():  # it died with work left: a new one resumes (and ends at EOF)
                raise CaptureError(f"training finished, but the background capture of {self.run_dir} failed with "
                                   f"{len(pending)} checkpoint(s) pending (see {self.run_dir / WORKER_LOG}); the "
                                   f"snapshots are safe: `montrage capture {self.run_dir}` featurizes them")
            self.proc.stdin.close()
            self._normal_priority()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _normal_priority(self) -> None:
        """Undo the worker's low priority (needs the privilege to raise a priority; otherwise it stays low)."""
        if self.proc is not None and self.nice and self.proc.poll() is None:
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, 0)
            except OSError:
                pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pending_run_steps(run_dir: str | Path) -> List[int]:
    return RunStore.open(run_dir).pending_steps if (Path(run_dir) / S.STORE_DIRNAME).exists() else []


if __name__ == "__main__":
    sys.exit(worker_main())
