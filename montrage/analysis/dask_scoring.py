"""Dynamics scores with dask.array over the run store's Zarr arrays, locally or on a dask cluster.

The same weighted-channel scores as :meth:`montrage.analysis.trajectories.Dynamics.score` (and the same
training-set statistics as :meth:`Dynamics.stats`), but the training axis is a dask.array built with
``da.from_zarr`` on the store's arrays, chunked along the training images: each task reads one block of
training images at one checkpoint, z-normalises it and multiplies it with the (small, in-memory) query
matrix, so memory per task is bounded and the work spreads over the scheduler's workers.

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
pass the scheduler address. Workers need numpy, dask and zarr (montrage itself is not needed on them:
the graph uses dask.array operations only), and they read the store directly, so the run folder must be
visible to every worker at the same path (a shared filesystem such as NFS/Lustre). The query side (a
few probes or images) is computed on the client and shipped inside the graph; only the (queries x
training images) score matrix comes back.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from montrage.errors import ScorerError
from montrage.storage import schema as S

if TYPE_CHECKING:  # keep torch (imported by trajectories) out of this module's import
    from montrage.analysis.trajectories import Dynamics, QueryTrajectory

EPS = 1e-6  # as in trajectories
DEFAULT_CHUNK = 4096  # training images per task (Dynamics' chunk)
CONNECT_TIMEOUT_S = 20.0  # to reach a --scheduler address
Key = Tuple[str, str, int]


# ---------------------------------------------------------------------------------------------- arrays
def train_arrays(dyn: "Dynamics", chunk: int = DEFAULT_CHUNK):
    """Lazy (K, N, T, F) float32 features per module and (K, N, T) losses of dyn's condition, chunked on N."""
    import dask.array as da

    store, K, c = dyn.store, dyn.K, dyn.cidx
    feats = {}
    for m in dyn.modules:
        z = store.array(S.feature_path(S.TRAIN, m))
        x = da.from_zarr(z, chunks=(1, chunk) + tuple(z.shape[2:]))
        feats[m] = x[:K, :, c].astype(np.float32)
    z = store.array(f"{S.TRAIN}/{S.LOSS}")
    loss = da.from_zarr(z, chunks=(1, chunk) + tuple(z.shape[2:]))[:K, :, c].astype(np.float32)
    return feats, loss


def _sums(v) -> Tuple[Any, Any, Any]:
    """Lazy NaN-skipping sum, sum of squares and row count over axis 0 (float64), as Dynamics.stats."""
    import dask.array as da

    v = v.astype(np.float64)
    return da.nansum(v, 0), da.nansum(v ** 2, 0), v.shape[0]


def _blocks(dyn: "Dynamics", feats) -> Iterator[Tuple[Key, Any]]:
    """((kind, module, k), lazy (N, T, F) block) for the kinds in use: raw features and their changes."""
    kinds = {c.kind for c in dyn.channels}
    for m in dyn.modules:
        for k in range(dyn.K):
            if "sim" in kinds:
                yield ("sim", m, k), feats[m][k]
            if "move" in kinds and k >= 1:
                yield ("move", m, k), feats[m][k] - feats[m][k - 1]


def _loss_changes(loss, K: int):
    """(N, (K-1)*T): per image, the changes of its denoising loss between consecutive checkpoints."""
    import dask.array as da

    dl = da.diff(loss, axis=0)  # (K-1, N, T)
    return dl.transpose(1, 0, 2).reshape(dl.shape[1], -1)


def stats(dyn: "Dynamics", chunk: int = DEFAULT_CHUNK, scheduler: Any = None) -> dict:
    """Dynamics.stats() computed by dask, with the same keys and dtypes.

    {(kind, module, k): (mean, std) (T, F) float32, 'loss': (mean, std), 'norms': {(kind, module, k):
    (N, T) float32 norm of each training row's z-vector}}: one pass for the moments, one for the norms.
    """
    import dask
    import dask.array as da

    feats, loss = train_arrays(dyn, chunk)
    blocks = dict(_blocks(dyn, feats))
    graph: Dict[Any, Any] = {key: _sums(v) for key, v in blocks.items()}
    if dyn.K >= 2:
        dl = da.nan_to_num(_loss_changes(loss, dyn.K).astype(np.float64))
        graph["loss"] = (dl.mean(0), dl.std(0))
    keys = list(graph)
    (computed,) = dask.compute([graph[k] for k in keys], scheduler=scheduler)
    out: dict = {}
    for key, val in zip(keys, computed):
        if key == "loss":
            mean, std = val
            out[key] = (np.asarray(mean).astype(np.float32), (np.asarray(std) + EPS).astype(np.float32))
            continue
        s1, s2, n = val
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        out[key] = (mean.astype(np.float32), (std + EPS).astype(np.float32))
    norm_keys = list(blocks)
    norms = [(da.linalg.norm((blocks[key] - out[key][0]) / out[key][1], axis=-1) + np.float32(EPS)).astype(np.float32)
             for key in norm_keys]
    (norms,) = dask.compute(norms, scheduler=scheduler)
    out["norms"] = {key: np.asarray(v) for key, v in zip(norm_keys, norms)}
    return out


# ---------------------------------------------------------------------------------------------- scores
def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def query_unit(dyn: "Dynamics", q: "QueryTrajectory") -> Dict[Key, np.ndarray]:
    """Unit z-normalised query vectors per channel group: (Q, T, F) per (kind, module, k), (Q, D) for loss."""
    st = dyn.stats()
    kinds = {c.kind for c in dyn.channels}
    out: Dict[Key, np.ndarray] = {}
    for m in dyn.modules:
        if q.features[m].shape[0] < dyn.K:
            raise ScorerError(f"query trajectory has {q.features[m].shape[0]} checkpoints, need {dyn.K}")
        f = np.asarray(q.features[m], dtype=np.float32)
        for k in range(dyn.K):
            for kind in ("sim", "move"):
                if kind in kinds and not (kind == "move" and k == 0):
                    x = f[k] if kind == "sim" else f[k] - f[k - 1]
                    mean, std = st[(kind, m, k)]
                    out[(kind, m, k)] = _unit(np.nan_to_num((x - mean) / std)).astype(np.float32)
    if "loss" in kinds and dyn.K >= 2:
        dl = np.diff(np.asarray(q.losses[: dyn.K], np.float32), axis=0).transpose(1, 0, 2).reshape(q.n, -1)
        mean, std = st["loss"]
        out[("loss", "", -1)] = _unit(np.nan_to_num((dl - mean) / std)).astype(np.float32)
    return out


def channel_weights(dyn: "Dynamics", weights: np.ndarray) -> Dict[Key, Dict[int, float]]:
    """Non-zero channel weights grouped as {(kind, module, k): {timestep index: weight}}."""
    out: Dict[Key, Dict[int, float]] = {}
    for w, ch in zip(weights, dyn.channels):
        if w != 0:
            out.setdefault((ch.kind, ch.module, ch.k), {})[ch.t] = float(w)
    return out


def lazy_score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: int = DEFAULT_CHUNK):
    """The (Q, N) weighted score as a dask array (needs dyn.stats()).

    Channel (kind, module, k, t) of query j and training image i is (1 + cos(z_j, z_i)) / 2 with z the
    training-set z-normalised vectors; the loss channel uses the NaN-cleaned unit loss-change vectors.
    """
    import dask.array as da

    st = dyn.stats()
    qu = query_unit(dyn, q)
    feats, loss = train_arrays(dyn, chunk)
    blocks = dict(_blocks(dyn, feats))
    groups = channel_weights(dyn, weights)
    if not groups:
        raise ScorerError("every channel weight is zero: nothing to score")
    acc = None
    const = 0.0
    for key, by_t in groups.items():
        if key[0] == "loss":
            mean, std = st["loss"]
            z = da.nan_to_num((_loss_changes(loss, dyn.K) - mean) / std)
            cos = (z / (da.linalg.norm(z, axis=-1, keepdims=True) + np.float32(EPS))) @ qu[key].T  # (N, Q)
            terms = [(by_t[-1], cos)]
        else:
            mean, std = st[key]
            z = (blocks[key] - mean) / std  # (N, T, F)
            inv = 1.0 / (da.linalg.norm(z, axis=-1) + np.float32(EPS))  # (N, T)
            terms = [(w, (z[:, t, :] @ qu[key][:, t, :].T) * inv[:, t, None]) for t, w in sorted(by_t.items())]
        for w, cos in terms:
            term = np.float32(w / 2.0) * cos
            acc = term if acc is None else acc + term
            const += w / 2.0
    return da.nan_to_num((acc + np.float32(const)).T.astype(np.float32))


def score(dyn: "Dynamics", q: "QueryTrajectory", weights: np.ndarray, chunk: int = DEFAULT_CHUNK,
          scheduler: Any = None) -> np.ndarray:
    """Dynamics.score(q, weights) computed with dask: (Q, N) float32."""
    import dask

    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(dyn.channels),):
        raise ScorerError(f"{weights.shape[0]} channel weights for {len(dyn.channels)} channels")
    if dyn._stats is None:
        dyn._stats = stats(dyn, chunk, scheduler)
    (out,) = dask.compute(lazy_score(dyn, q, weights, chunk), scheduler=scheduler)
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- routing
class DaskBackend:
    """What Dynamics delegates to while :func:`scoring_on` is active."""

    def __init__(self, scheduler: Any = None, chunk: int = DEFAULT_CHUNK) -> None:
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
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
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
def scoring_on(scheduler: Union[str, Any, None], chunk: int = DEFAULT_CHUNK) -> Iterator[DaskBackend]:
    """Within the block, every Dynamics statistics/score pass in this thread runs with dask on ``scheduler``."""
    from montrage.analysis.trajectories import SCORE_BACKEND

    with client_for(scheduler) as sched:
        backend = DaskBackend(sched, chunk)
        token = SCORE_BACKEND.set(backend)
        try:
            yield backend
        finally:
            SCORE_BACKEND.reset(token)


def backend_names() -> List[str]:
    return ["threads", "sync", "local", "tcp://HOST:PORT"]
