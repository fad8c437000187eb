"""Dynamics scores on dask, locally or on a dask cluster: the same block kernel, run as dask tasks.

The arithmetic is :mod:`montrage.analysis.kernel`'s, the same functions
:class:`~montrage.analysis.trajectories.Dynamics` calls in-process, so the two paths cannot drift
apart (one NaN rule, one std floor). Here the training axis comes from ``da.from_zarr`` on the
store's arrays, cut into blocks of training images (sized by ``kernel.BLOCK_BUDGET_BYTES``, about
100 MB of float32 per task, holding every checkpoint the channels need); each block is one task of
:func:`kernel.block_moments` (statistics) or :func:`kernel.block_channels` (scores), with a small
result per block, so tasks stream through the store with bounded memory, whatever the number of
training images.

Using it
--------
Command line::

    montrage attribute RUN --method montrage --scheduler tcp://scheduler-host:8786   # your cluster
    montrage attribute RUN --scheduler local      # an in-process LocalCluster (threads)
    montrage attribute RUN --scheduler threads    # dask's default threaded scheduler, no distributed

Python::

    from dask.distributed import Client
    from montrage.analysis.attribute import attribute
    res = attribute("runs/x", "montrage", scheduler="tcp://scheduler-host:8786")  # or scheduler=Client(...)

Pointing it at your cluster: start a scheduler and workers the usual way (``dask scheduler`` then
``dask worker tcp://scheduler-host:8786`` on each machine, or dask-jobqueue / dask-kubernetes / Coiled) and
pass the scheduler address. Workers need the same montrage, numpy, dask and zarr as the client (the
block kernel imports only numpy; torch is not imported by it), and they read the store
directly, so the run folder must be visible to every worker at the same path (a shared filesystem such
as NFS/Lustre). The query side (a few probes or images) and the statistics are computed on the client
and shipped once as a shared graph key; only small per-block results and the (queries x training
images) score matrix come back.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple, Union

import numpy as np

from montrage.analysis import kernel as KN
from montrage.errors import ScorerError
from montrage.storage import schema as S

if TYPE_CHECKING:  # keep torch (imported by trajectories' model code) out of this module's import
    from montrage.analysis.trajectories import Dynamics, QueryTrajectory

CONNECT_TIMEOUT_S = 20.0  # to reach a --scheduler address


# ---------------------------------------------------------------------------------------------- blocks
def auto_chunk(dyn: "Dynamics", budget_bytes: int = KN.BLOCK_BUDGET_BYTES) -> int:
    """Training images per task (as Dynamics.auto_chunk)."""
    return dyn.auto_chunk(budget_bytes)


def train_blocks(dyn: "Dynamics", layout: KN.Layout, chunk: int) -> List[Tuple[List[Any], Any, int]]:
    """Per block of ``chunk`` training images: (lazy feature blocks per module, lazy loss block or None, rows),
    read from the store's Zarr arrays by the task that uses them."""
    import dask.array as da

    c, n = dyn.cidx, dyn.N
    per_module = []
    for m, ks in zip(layout.modules, layout.ks):
        z = dyn.store.array(S.feature_path(S.TRAIN, m))
        arr = da.from_zarr(z, chunks=(z.shape[0], chunk) + tuple(z.shape[2:]))[:, :, c]
        per_module.append(arr[list(ks)] if ks else None)  # a module none of the channels in use reads
    loss = None
    if layout.loss:
        z = dyn.store.array(f"{S.TRAIN}/{S.LOSS}")
        loss = da.from_zarr(z, chunks=(z.shape[0], chunk) + tuple(z.shape[2:]))[: layout.K, :, c]
    out = []
    for b, start in enumerate(range(0, n, chunk)):
        feats = [None if a is None else a.blocks[:, b] for a in per_module]
        out.append((feats, None if loss is None else loss.blocks[:, b], min(n, start + chunk) - start))
    return out


def _delayed(obj: Any) -> Any:
    """Small constants shared by every task: one graph key (shipped once per worker), not one copy per task."""
    import dask

    return dask.delayed(obj, pure=True, traverse=False)


def _task(fn, feats: List[Any], loss: Any, *rest: Any) -> Any:
    import dask

    return dask.delayed(fn, pure=True)(feats, loss, *rest)


# ---------------------------------------------------------------------------------------------- passes
def stats(dyn: "Dynamics", chunk: Optional[int] = None, scheduler: Any = None) -> dict:
    """Dynamics.stats() computed by dask: the same keys and values (kernel.block_moments per block)."""
    import dask

    chunk = chunk or auto_chunk(dyn)
    layout = _delayed(dyn.layout)
    parts = [_task(KN.block_moments, f, loss, layout) for f, loss, _ in train_blocks(dyn, dyn.layout, chunk)]
    (total,) = dask.compute(dask.delayed(KN.add_moments)(parts), scheduler=scheduler)
    return KN.finish_moments(total)


def lazy_score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: Optional[int] = None):
    """The (Q, N) weighted score as a dask array (one kernel.block_channels task per block of training images)."""
    import dask.array as da

    chunk = chunk or auto_chunk(dyn)
    weights = np.asarray(weights, dtype=np.float64)
    if not (weights != 0).any():
        raise ScorerError("every channel weight is zero: nothing to score")
    plan = dyn.plan(q, weights != 0)
    plan_d, w_d = _delayed(plan), _delayed(weights)
    parts = [da.from_delayed(_task(KN.block_channels, f, loss, plan_d, w_d), shape=(q.n, rows), dtype=np.float32)
             for f, loss, rows in train_blocks(dyn, plan.layout, chunk)]
    return da.concatenate(parts, axis=1)


def score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: Optional[int] = None,
          scheduler: Any = None) -> np.ndarray:
    """Dynamics.score(q, weights) computed with dask: (Q, N) float32."""
    import dask

    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(dyn.channels),):
        raise ScorerError(f"{weights.shape[0]} channel weights for {len(dyn.channels)} channels")
    if dyn._stats is None:
        dyn._stats = stats(dyn, chunk, scheduler)
    (out,) = dask.compute(lazy_score(dyn, q, weights, chunk), scheduler=scheduler)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- routing
class DaskBackend:
    """What Dynamics delegates to while :func:`scoring_on` is active."""

    def __init__(self, scheduler: Any = None, chunk: Optional[int] = None) -> None:
        self.scheduler = scheduler
        self.chunk = chunk

    def stats(self, dyn: "Dynamics") -> dict:
        return stats(dyn, self.chunk, self.scheduler)

    def score(self, dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray) -> np.ndarray:
        return score(dyn, q, weights, self.chunk, self.scheduler)


@contextlib.contextmanager
def client_for(scheduler: Union[str, Any, None]) -> Iterator[Any]:
    """What to hand dask.compute(scheduler=...) for a --scheduler value.

    None / 'threads' / 'default': dask's default (threaded) scheduler; 'sync': single-threaded;
    'local': an in-process LocalCluster (closed on exit); a dask.distributed.Client: used as is;
    any other string: the address of a running scheduler, e.g. 'tcp://host:8786' (a Client is
    connected for the duration and closed on exit; the cluster itself is left running).
    """
    if scheduler is None or scheduler in ("threads", "default"):
        yield None
        return
    if scheduler in ("sync", "synchronous", "single-threaded"):
        yield "sync"
        return
    if not isinstance(scheduler, str):  # a Client (or anything dask.compute accepts)
        yield scheduler
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise ScorerError(f"--scheduler {scheduler!r} needs dask.distributed ({exc}); pip install distributed") from exc
    if scheduler == "local":
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ScorerError(f"cannot connect to the dask scheduler at {scheduler!r}: {exc}; start one "
                          "(`dask scheduler`) and workers, or pass --scheduler local") from exc
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def scoring_on(scheduler: Union[str, Any, None], chunk: Optional[int] = None) -> Iterator[DaskBackend]:
    """Within the block, every Dynamics statistics/score pass in this thread runs with dask on ``scheduler``."""
    from montrage.analysis.trajectories import SCORE_BACKEND

    with client_for(scheduler) as sched:
        backend = DaskBackend(sched, chunk)
        token = SCORE_BACKEND.set(backend)
        try:
            yield backend
        finally:
            SCORE_BACKEND.reset(token)
