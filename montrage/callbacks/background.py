"""Featurizing outside the training loop: the background worker process and its handle.

The training loop commits snapshots (:meth:`RunStore.append_snapshot`) and wakes the worker with one line on
its stdin; the worker, a separate process with its own copy of the frozen base (rebuilt from the run config,
like analysis does), featurizes every pending snapshot in order and commits each one. It reads the snapshots
from the store, not from the pipe, so when the training process ends or dies (the pipe closes) it still
finishes every committed snapshot, and a killed worker loses only the checkpoint it was computing: the next
worker (or ``montrage capture RUN``) resumes from the commit marker.

The same program, with ``--serve``, is a helper of ``montrage capture --num-processes W``: it featurizes the
units of work (one checkpoint's training images, anchors or probes) the coordinating process sends on its
stdin into their reserved regions and answers each on stdout; the coordinator (who works too) commits every
checkpoint in order once its units are written. ``--share R --world W`` featurizes a strided share of whole
checkpoints instead (what a Dask task does).

    python -m montrage.callbacks.background RUN [--follow] [--threads T] [--device D] [--nice N]
    python -m montrage.callbacks.background RUN --serve [--threads T] [--device D]
    python -m montrage.callbacks.background RUN --share R --world W --start N --end M [--threads T]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.errors import CaptureError, MontrageError
from montrage.storage import RunStore
from montrage.storage import schema as S

log = logging.getLogger(__name__)

WORKER_LOG = "capture-worker.log"  # in the run folder: the worker's stdout/stderr
# In the run folder: the seconds each featurizer spent, one JSON line per unit of work ({"where": "loop" (the
# training loop: snapshots, and featurizing when inline) | "background" (the worker) | "capture" (`montrage
# capture`, `attribute`), "checkpoint", "step", "part", "seconds"}): what the report says capture cost.
CAPTURE_TIMES = "capture-times.jsonl"


def log_capture_time(run_dir: str | Path, where: str, index: int, step: int, seconds: float,
                     part: str = "checkpoint") -> None:
    """Append one timing line (a single O_APPEND write, so concurrent featurizers never interleave); a timing
    note never fails a capture."""
    line = json.dumps({"where": where, "checkpoint": int(index), "step": int(step), "part": part,
                       "seconds": round(float(seconds), 4)}) + "\n"
    try:
        fd = os.open(Path(run_dir) / CAPTURE_TIMES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def capture_times(run_dir: str | Path) -> Dict[str, Dict[str, float]]:
    """Seconds and checkpoints per place (``where``) from the run's timing lines; a unit featurized again after
    a kill counts once (its last line)."""
    path = Path(run_dir) / CAPTURE_TIMES
    last: Dict[tuple, float] = {}
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            last[(rec["where"], int(rec["checkpoint"]), rec.get("part", "checkpoint"))] = float(rec["seconds"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    out: Dict[str, Dict[str, float]] = {}
    for (where, k, _part), sec in last.items():
        d = out.setdefault(where, {"seconds": 0.0, "checkpoints": set()})
        d["seconds"] += sec
        d["checkpoints"].add(k)
    return {w: {"seconds": d["seconds"], "checkpoints": float(len(d["checkpoints"]))} for w, d in out.items()}


# ---------------------------------------------------------------------------- the work
def _engine(store: RunStore, threads: Optional[int], device: str):
    from montrage.callbacks.capture import CaptureEngine, rebuild_components, set_threads

    set_threads(threads)
    return CaptureEngine.from_store(store, rebuild_components(store, device), threads=threads)


def featurize_pending(store: RunStore, engine, on_commit: Optional[Callable[[int, int], None]] = None,
                      restore: bool = False, where: str = "capture") -> int:
    """Featurize and commit every pending snapshot, in order (the caller holds the capture lock); ``restore``:
    put the model's own LoRA weights back afterwards (a live training model). ``where``: its timing label."""
    from montrage.callbacks.capture import featurize_snapshot

    done = 0
    while store.n_checkpoints < store.n_snapshots:  # n_snapshots is re-read from disk: follows a live loop
        k = store.n_checkpoints
        t0 = time.perf_counter()
        rec = featurize_snapshot(store, engine, k, restore=restore)
        store.write_featurized(k, rec)
        store.commit_featurized(k + 1, [k] if rec.has_nonfinite() else [])
        log_capture_time(store.run_dir, where, k, rec.step, time.perf_counter() - t0)
        done += 1
        if on_commit is not None:
            on_commit(k, rec.step)
    return done


def share_indices(rank: int, world: int, start: int, end: int) -> List[int]:
    """Checkpoints ``start..end-1`` of rank ``rank`` out of ``world`` (strided: in-order commits come early)."""
    return list(range(start + rank, end, world))


# A checkpoint's units of work, the largest first (the probes: generation + featurization), so that the small
# ones left at the end of a run even out the processes' finishing times.
UNIT_KINDS = (S.PROBES, S.TRAIN, S.ANCHORS)


def work_units(start: int, end: int) -> List[Tuple[int, str]]:
    """The (checkpoint, kind) units of checkpoints ``start..end-1``, in checkpoint order (in-order commits)."""
    return [(k, kind) for k in range(start, end) for kind in UNIT_KINDS]


def write_unit(store: RunStore, index: int, kind: str, part: dict) -> None:
    """Write one unit's arrays into checkpoint ``index``'s reserved rows (other arrays than any other unit's, so
    processes write side by side; not visible until committed)."""
    for module in store.modules:
        arr = store.root[S.feature_path(kind, module)]
        arr[index] = np.asarray(part["f"][module], dtype=arr.dtype)
    arr = store.root[f"{kind}/{S.LOSS}"]
    arr[index] = np.asarray(part["l"], dtype=arr.dtype)
    if kind == S.PROBES:
        arr = store.root[f"{S.PROBES}/{S.IMAGES}"]
        arr[index] = np.asarray(part["img"], dtype=arr.dtype)


class UnitFeaturizer:
    """Featurizes single units of stored snapshots into their reserved regions (no commit: the coordinator,
    who holds the capture lock, commits a checkpoint once all its units are written)."""

    def __init__(self, store: RunStore, engine, where: str = "capture") -> None:
        self.store, self.engine, self.where = store, engine, where
        self._loaded: Optional[int] = None
        self._step = -1
        self._loss_bad = False

    def _load(self, index: int) -> None:
        from montrage.callbacks.capture import lora_layout, unflatten

        if self._loaded == index:
            return
        snap = self.store.read_snapshot(index)
        if snap.lora is None or not np.isfinite(snap.lora).all():
            raise CaptureError(f"snapshot {index} (step {snap.step}) of {self.store.run_dir} has no LoRA weights "
                               "(recorded with record_lora=False), so it can only be featurized inline")
        names, shapes = lora_layout(self.store)
        with self.engine.lora_weights(unflatten(snap.lora, names, shapes), restore=False):
            pass  # loaded, kept for the next units of the same checkpoint
        self._loaded, self._step = index, snap.step
        self._loss_bad = snap.train_loss is not None and not np.isfinite(snap.train_loss)

    def run(self, index: int, kind: str) -> bool:
        """Featurize and write unit (``index``, ``kind``); True when it (or the snapshot's loss) is not finite."""
        from montrage.callbacks.capture import torch_threads

        t0 = time.perf_counter()
        self._load(index)
        with torch_threads(self.engine.threads):
            part = self.engine.capture_kind(kind)
        write_unit(self.store, index, kind, part)
        log_capture_time(self.store.run_dir, self.where, index, self._step, time.perf_counter() - t0, kind)
        arrays = [part["l"]] + list(part["f"].values())
        return self._loss_bad or any(not np.isfinite(a).all() for a in arrays if np.size(a))


def _open_regions(run_dir: str) -> RunStore:
    """The run's store for writing reserved regions: no lock (the coordinator holds the capture lock)."""
    import zarr

    return RunStore(Path(run_dir), zarr.open_group(RunStore.store_path(run_dir), mode="r+"), writable=True)


def featurize_share(run_dir: str, rank: int, world: int, start: int, end: int, threads: Optional[int] = None,
                    device: str = "cpu", on_done: Optional[Callable[[int, bool], None]] = None) -> List[Tuple[int, bool]]:
    """A share of whole checkpoints: write the featurized regions of its checkpoints (reserved by the
    coordinator, who holds the capture lock and commits). Returns [(index, non-finite)]. The task run on Dask
    workers."""
    store = _open_regions(run_dir)
    units = UnitFeaturizer(store, _engine(store, threads, device))
    out = []
    for k in share_indices(rank, world, start, end):
        bad = [units.run(k, kind) for kind in UNIT_KINDS]
        out.append((k, any(bad)))
        if on_done is not None:
            on_done(k, out[-1][1])
    return out


def serve_units(run_dir: str, threads: Optional[int], device: str, lines=None, emit=None, engine=None,
                where: str = "capture") -> None:
    """A helper of ``montrage capture --num-processes N``: build the engine (or use ``engine``, a forked
    helper's copy of its parent's), say ``ready``, then featurize each unit named on ``lines`` (``index
    kind``) and answer ``done index kind bad``; EOF ends it."""
    lines = lines if lines is not None else sys.stdin
    emit = emit or (lambda text: print(text, flush=True))
    store = _open_regions(run_dir)
    units = UnitFeaturizer(store, engine if engine is not None else _engine(store, threads, device), where)
    emit("ready")
    for line in lines:
        if not line.strip():
            continue
        k, kind = line.split()
        emit(f"done {int(k)} {kind} {int(units.run(int(k), kind))}")


def can_fork_helpers(threads: Optional[int], device: str) -> bool:
    """Helpers may be forked from a process whose engine is built (Linux, CPU, one thread per process: torch
    then never enters an OpenMP parallel region, the one runtime state a fork would not carry over)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and device == "cpu" and (threads or 1) == 1


class ForkedHelper:
    """A ``--serve`` helper forked from the coordinator after it built its engine: it shares the loaded model
    (copy-on-write), so it starts at once instead of spending ~10 CPU seconds importing torch, diffusers and
    peft and rebuilding the base (measured on 2 cores), which on a busy machine cost more than it saved.
    Looks like a ``subprocess.Popen`` to the coordinator: text ``stdin``/``stdout`` pipes, ``poll``, ``wait``,
    ``kill``. ``close_in_child``: descriptors the child must not keep (other helpers' pipes, the capture lock:
    closing them in the child leaves the parent's lock and pipes as they are)."""

    def __init__(self, run_dir: str, engine, close_in_child: Sequence[int] = (), where: str = "capture") -> None:
        to_child, from_parent = os.pipe()[::-1]  # (write end, read end)
        from_child, to_parent = os.pipe()
        pid = os.fork()
        if pid == 0:  # the helper: never returns
            code = 0
            try:
                for fd in (to_child, from_child, *close_in_child):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                with os.fdopen(from_parent, "r") as lines, os.fdopen(to_parent, "w") as out:
                    serve_units(run_dir, engine.threads, "cpu", lines=lines,
                                emit=lambda text: (out.write(text + "\n"), out.flush()), engine=engine, where=where)
            except BaseException as exc:  # noqa: BLE001 (the coordinator hands the unit back and goes on)
                code = 2
                try:
                    sys.stderr.write(f"capture helper {os.getpid()}: {exc!r}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            finally:
                os._exit(code)
        os.close(from_parent)
        os.close(to_parent)
        self.pid, self.returncode, self.stderr = pid, None, None
        self.stdin = os.fdopen(to_child, "w")
        self.stdout = os.fdopen(from_child, "r")

    @property
    def fds(self) -> List[int]:
        return [self.stdin.fileno(), self.stdout.fileno()]

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"capture helper {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------- several processes
class Committer:
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


class _UnitCommitter:
    """Collects finished units (from any thread) and commits each checkpoint, in order, once all its units are
    written."""

    def __init__(self, store: RunStore, start: int, end: int) -> None:
        self.commit = Committer(store, start, end)
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


def featurize_units(store: RunStore, start: int, end: int, world: int, threads: Optional[int], device: str,
                    engine=None, where: str = "capture") -> None:
    """Featurize and commit checkpoints ``start..end-1`` on this process (the capture lock holder, rank 0) and
    ``world - 1`` helper processes, which take units of work (one checkpoint's training images, anchors or
    probes) from one queue as each gets free; rank 0 commits the checkpoints in order. On Linux CPU the helpers
    are forked once rank 0's engine is built (``engine``, or built here) and share its loaded model; otherwise
    they are started first, so that their start-up (importing torch, rebuilding the base) overlaps this
    process's."""
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
                    worker_command(store.run_dir, "--serve", "--threads", str(threads or 1), "--device", device),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker_env(threads),
                    text=True, bufsize=1))
        own = UnitFeaturizer(store, engine if engine is not None else _engine(store, threads, device), where)
        if fork:  # before any thread of ours starts: the children then hold no lock a thread held
            lock_fd = getattr(store, "_capture_fd", None)
            for _ in range(n_helpers):
                inherited = [fd for p in procs for fd in p.fds] + ([lock_fd] if lock_fd is not None else [])
                procs.append(ForkedHelper(str(store.run_dir), own.engine, close_in_child=inherited, where=where))
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


# ---------------------------------------------------------------------------- the worker process
TAIL_GRACE_S = 0.5  # after a wake, how long the worker waits for the training process's end before starting


def _follow(store: RunStore, engine, report: Callable[[int, int], None], threads: Optional[int], device: str,
            grace: float = TAIL_GRACE_S, fd: Optional[int] = None) -> None:
    """Featurize the pending snapshots now and on each line read from ``fd`` (stdin: one line per new
    snapshot). EOF: the training process is done (or gone) and its cores are free, so what is still pending
    (at least the last checkpoint: the loop's end follows its snapshot within ``grace``) is finished on this
    process and a forked helper, units at a time, which about halves the tail after the final LoRA is saved."""
    import select

    fd = sys.stdin.fileno() if fd is None else fd

    def read(timeout: Optional[float]) -> Optional[bool]:  # True: a line came; False: EOF; None: nothing yet
        if not select.select([fd], [], [], timeout)[0]:
            return None
        return bool(os.read(fd, 4096))

    got = read(grace)  # on start: catch up, unless the training process is already done
    while True:
        deadline = time.monotonic() + grace
        while got and deadline > time.monotonic():
            got = read(deadline - time.monotonic())  # the training loop may be ending right after this snapshot
        if got is False:
            break
        featurize_pending(store, engine, report, where="background")
        got = read(None)
    start, end = store.n_checkpoints, store.n_snapshots
    if end > start and can_fork_helpers(threads, device):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # nothing left to yield to (needs the privilege; else stays low)
        except OSError:
            pass
        featurize_units(store, start, end, 2, threads, device, engine=engine, where="background")
        log.info("featurized checkpoints %d..%d on 2 processes after training ended", start, end - 1)
    featurize_pending(store, engine, report, where="background")


def worker_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m montrage.callbacks.background")
    ap.add_argument("run")
    ap.add_argument("--follow", action="store_true", help="after catching up, featurize on each line read from stdin")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="a helper: featurize the units named on stdin")
    ap.add_argument("--share", type=int, default=None)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--end", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.nice:
        os.nice(args.nice)
    try:
        if args.serve:
            serve_units(args.run, args.threads, args.device)
            return 0
        if args.share is not None:
            featurize_share(args.run, args.share, args.world, args.start, args.end, args.threads, args.device,
                            on_done=lambda k, bad: print(f"done {k} {int(bad)}", flush=True))
            return 0
        # a worker left by an earlier (killed) training process may still be finishing: wait for it
        store = RunStore.open_featurizer(args.run, wait=args.follow)
        try:
            engine = _engine(store, args.threads, args.device)
            report = lambda k, step: log.info("featurized checkpoint %d (step %d)", k, step)  # noqa: E731
            if args.follow:
                _follow(store, engine, report, args.threads, args.device)
            else:
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


def _exit_now(code: int) -> None:
    """End the worker without the interpreter's teardown of torch, diffusers and zarr (measured 1.6 s on 2 CPU
    cores): everything was written and committed, so the training call (or the coordinator) waiting for this
    process's exit returns that much sooner."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(worker_main())
