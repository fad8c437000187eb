"""The training monitor: records training dynamics into the run store at every checkpoint.

In a user's Accelerate loop::

    with TrainingMonitor("runs/x", components, training_set, accelerator=accelerator, optimizer=opt) as monitor:
        monitor.on_train_begin()
        for step in range(1, steps + 1):
            ...  # forward, backward, optimizer.step(), lr_scheduler.step()
            monitor.on_step_end(step, loss.item())
    # leaving the block records the last step; an exception releases the lock and keeps the store consistent

The run is self-contained: the store holds the training images (or their paths + hashes), the LoRA config
read from the model, the base model's location and a hash of its weights, the optimizer and the learning
rate in use at each checkpoint. Capture runs under ``no_grad`` with hooks removed afterwards, restores
train/eval mode and the RNG, and never consumes the training loop's random numbers. Every rank computes its
share of the images; rank 0 alone writes; all ranks meet at each commit.
"""
from __future__ import annotations

import logging
import pickle
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from montrage.callbacks.background import log_capture_time
from montrage.callbacks.base import MontrageCallback
from montrage.callbacks.capture import CaptureEngine
from montrage.callbacks.capture import concat_shards as _concat_shards  # noqa: F401 (tests import it from here)
from montrage.config import CaptureConfig, TrainConfig, from_dict, to_dict
from montrage.data.imagefolder import TrainingSet
from montrage.data.probes import Probe, default_probes
from montrage.data.sources import as_training_set
from montrage.distributed import ProcessContext
from montrage.errors import ConfigError, StoreError
from montrage.models.components import DiffusionComponents
from montrage.models.features import FeatureExtractor
from montrage.models.loading import base_identity, locate_base
from montrage.models.lora import flatten, lora_config_from_model, lora_state
from montrage.storage import RunStore, StoreDims
from montrage.storage import schema as S

log = logging.getLogger(__name__)


@dataclass
class MonitorState:
    step: int = 0
    recorded_steps: List[int] = field(default_factory=list)  # informative: the store decides what is recorded
    loss_sum: float = 0.0
    loss_count: int = 0
    elapsed_before: float = 0.0  # wall time of earlier (interrupted) processes of this run


def _json_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # 0-d tensors / numpy scalars (e.g. a tensor lr)
        return v.item()
    return repr(v)


def describe_optimizer(optimizer: Any) -> Dict[str, Any]:
    """Class and hyperparameters of each parameter group (not the parameters), JSON-ready."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps .optimizer
    cls = type(inner)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "defaults": {k: _json_value(v) for k, v in dict(getattr(inner, "defaults", {}) or {}).items()},
            "param_groups": [{k: _json_value(v) for k, v in g.items() if k != "params"} for g in inner.param_groups]}


def current_learning_rate(optimizer: Any) -> Optional[float]:
    """The lr the optimizer holds now (first parameter group): exact for any schedule."""
    if optimizer is None:
        return None
    lr = optimizer.param_groups[0].get("lr")
    return None if lr is None else float(lr.item() if hasattr(lr, "item") else lr)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to reach the other ranks), else a StoreError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 (any unpicklable exception)
        return StoreError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def _training_settings(training: Any, recorded: Any) -> dict:
    """``training`` as the run config's "train" entry (the key ``montrage train`` writes), validated now."""
    if isinstance(training, dict):
        training = from_dict(TrainConfig, training)
    if not isinstance(training, TrainConfig):
        raise ConfigError(f"TrainingMonitor(training=...) takes a montrage TrainConfig (e.g. TrainConfig(batch_size=4)), "
                          f"got {type(training).__name__}")
    if recorded is not None:
        raise ConfigError("TrainingMonitor got training settings twice (training=... and run_config['train']); "
                          "pass one")
    return to_dict(training)


class TrainingMonitor(MontrageCallback):
    """Records a run; see the module docstring. ``optimizer`` (optional) records its hyperparameters and the
    learning rate at each checkpoint (TracIn needs it); ``store_images=False`` keeps only the training images'
    source paths and content hashes (large sets; checked when read). ``training`` (a :class:`TrainConfig`, e.g.
    ``TrainConfig(batch_size=4)``) records how the loop trains, so that ``montrage fit RUN --retrains N`` can
    retrain subsets with the same passes over each image; fields left None (steps, lr, lora) are read from the
    run (its last step, the optimizer, the UNet's adapter) when retraining."""

    def __init__(self, output_dir: str | Path, components: DiffusionComponents, training_set: TrainingSet,
                 probes: Optional[Sequence[Probe]] = None, capture: Optional[CaptureConfig] = None,
                 run_config: Optional[dict] = None, accelerator: Optional[Any] = None,
                 optimizer: Optional[Any] = None, store_images: bool = True,
                 training: Optional[TrainConfig | dict] = None) -> None:
        self.output_dir = Path(output_dir)
        self.components = components
        self.training_set = training_set = as_training_set(training_set, components.resolution)  # any source, lazy
        self.probes = list(probes) if probes is not None else default_probes(training_set)
        self.capture = capture or CaptureConfig()
        self.ctx = ProcessContext(accelerator)
        self.optimizer = optimizer
        self.store_images = bool(store_images)
        if not self.store_images and not self._source_root():
            raise ConfigError("store_images=False keeps only the training images' paths and hashes, but this training "
                              "source is not an image folder on disk (no .root folder); keep store_images=True")
        self.extractor = FeatureExtractor(components, self.capture)
        self.state = MonitorState()
        n = len(training_set)
        n_anchor = min(n, self.capture.anchors)
        self.anchor_indices = sorted({int(i) for i in np.linspace(0, n - 1, n_anchor).round()}) if n_anchor else []
        self._user_config = dict(run_config or {})
        if training is not None:
            self._user_config["train"] = _training_settings(training, self._user_config.get("train"))
        self.store: Optional[RunStore] = None
        self._opened = False
        self._began = False
        self._ended = False
        self._inactive = False  # attach() on a process that does not save state: every event is a no-op
        self._dataset_fingerprint: Optional[str] = None
        self._base_identity: Optional[str] = None
        self._t0: Optional[float] = None

    # ---------------------------------------------------------------- identity
    def _unet(self) -> Any:
        return self.ctx.unwrap(self.components.unet)

    def _source_root(self) -> Optional[str]:
        root = getattr(self.training_set, "root", None)
        return str(Path(root).resolve()) if root and Path(str(root)).is_dir() else None

    def dataset_fingerprint(self) -> str:
        """Hash of every training image and caption, computed once (it reads all pixels)."""
        if self._dataset_fingerprint is None:
            self._dataset_fingerprint = self.training_set.fingerprint()
        return self._dataset_fingerprint

    def base_identity(self) -> str:
        """Cheap content hash of the base UNet weights (computed once)."""
        if self._base_identity is None:
            self._base_identity = base_identity(self._unet())
        return self._base_identity

    def lora_config(self) -> dict:
        """The adapter's config read from the model (r, lora_alpha, target_modules, ...)."""
        return lora_config_from_model(self._unet())

    @property
    def run_config(self) -> dict:
        """Everything a scorer needs to rebuild the run, whichever way it was recorded."""
        unet = self._unet()
        cfg = {"base": locate_base(self.components.base, unet) or self.components.base,
               "base_name_or_path": str(getattr(getattr(unet, "config", None), "_name_or_path", "") or ""),
               "base_identity": self.base_identity(), "resolution": int(self.components.resolution),
               "world_size": self.ctx.world_size, "store_images": self.store_images,
               "optimizer": describe_optimizer(self.optimizer) if self.optimizer is not None else None}
        cfg.update(self._user_config)
        cfg["capture"] = to_dict(self.capture)
        cfg["capture_mode"] = self.capture_mode  # where featurizing ran (the report's cost of capture)
        cfg["lora"] = self.lora_config()  # always the model's own: what was really trained
        return cfg

    def fingerprint(self) -> dict:
        """What must match for a reopened store to be appended to (not steps or wall-clock details)."""
        return {"capture": to_dict(self.capture), "base": self.base_identity(), "dataset": self.dataset_fingerprint(),
                "probes": [[p.prompt, p.seed] for p in self.probes], "lora": self.lora_config(),
                "train": self._user_config.get("train_identity")}

    def _dims(self) -> StoreDims:
        flat, names, shapes = flatten(lora_state(self.components.unet)) if self.capture.record_lora else (None, [], [])
        r = self.components.resolution
        return StoreDims(n_train=len(self.training_set), n_probes=len(self.probes), n_anchors=len(self.anchor_indices),
                         n_conditions=len(self.capture.conditions), n_timesteps=len(self.capture.timesteps),
                         feature_dims=self.extractor.feature_dims(), image_shape=(r, r, 3),
                         lora_names=names, lora_shapes=shapes, store_train_images=self.store_images)

    def _metadata(self) -> tuple[dict, dict]:
        ts = self.training_set
        train = {S.ATTR_FILE_NAMES: list(ts.file_names), S.ATTR_CAPTIONS: list(ts.captions),
                 S.ATTR_CONCEPTS: list(ts.concepts), S.ATTR_EXTRA: list(ts.extra),
                 S.ATTR_DATASET_FINGERPRINT: self.dataset_fingerprint(), S.ATTR_SOURCE_ROOT: self._source_root()}
        probes = {S.ATTR_PROMPTS: [p.prompt for p in self.probes], S.ATTR_SEEDS: [p.seed for p in self.probes],
                  S.ATTR_CONCEPTS: [p.concept for p in self.probes], S.ATTR_KINDS: [p.kind for p in self.probes],
                  S.ATTR_META: [dict(p.meta) for p in self.probes]}
        return train, probes

    def _read_images(self, indices: List[int]) -> np.ndarray:
        return np.asarray(self.training_set.images[indices])

    def open_store(self) -> None:
        """Create or reopen the store (rank 0), and learn from it what is recorded. A collective.

        Any failure on rank 0 (not only montrage's errors) reaches every rank, so none waits in a collective.
        """
        if self._opened or self._inactive:
            return
        result: object = None
        error: Optional[BaseException] = None
        if self.ctx.is_main:
            try:
                train_meta, probe_meta = self._metadata()
                self.store = RunStore.create_or_resume(self.output_dir, self.run_config, self.fingerprint(),
                                                       self._dims(), train_meta, probe_meta, self.anchor_indices,
                                                       train_images=self._read_images)
                result = self.store.snapshot_steps.tolist()  # featurized or pending
            except Exception as exc:  # tell the other ranks instead of leaving them in the broadcast
                error, result = exc, _portable(exc)
        recorded = self.ctx.broadcast(result)
        if error is not None:
            raise error
        if isinstance(recorded, BaseException):
            raise recorded
        self.state.recorded_steps = [int(s) for s in recorded]  # the store is the source of truth
        self._opened = True

    # ---------------------------------------------------------------- events
    def on_train_begin(self, step: int = 0) -> None:
        if self._inactive:
            return
        self._t0 = time.time()
        self.state.step = step
        self._began, self._ended = True, False
        self.open_store()
        if step == 0 and 0 not in self.state.recorded_steps:
            self.record_checkpoint(0)

    def on_step_end(self, step: int, loss: Optional[float] = None, per_sample_losses: Any = None,
                    timesteps: Any = None, indices: Any = None) -> None:
        """``per_sample_losses``, ``timesteps`` and ``indices`` (training image of each batch item; fewer than
        the batch: the rest are not training images) are stored as per-step signals, if given."""
        if self._inactive:
            return
        self.state.step = step
        self._buffer_signals(step, per_sample_losses, timesteps, indices)
        if loss is not None:
            self.state.loss_sum += float(loss)
            self.state.loss_count += 1
        if step % self.capture.every_n_steps == 0:
            self.record_checkpoint(step)

    def on_checkpoint(self, step: int) -> None:
        self.record_checkpoint(step)

    def on_train_end(self, step: int, wait: bool = True) -> None:
        """Record ``step`` (unless already recorded) and close the store. ``wait=False``: do not wait for a
        background capture here (:meth:`close` waits later; e.g. save the final LoRA first)."""
        if self._inactive:
            return
        self.state.step = step
        self.record_checkpoint(step)
        self._ended = True
        if wait:
            self.close()
        elif self.store is not None:
            self.store.close()  # the store lock; the worker keeps the capture lock until it is done
            self.store = None
            self._opened = False

    def close(self) -> None:
        self._finish_capture()
        if self.store is not None:
            self.store.close()
            self.store = None
        self._opened = False

    def abort(self) -> None:
        """Drop whatever a failed capture appended past the commit marker, and release the lock."""
        self._finish_capture(wait=False)  # a background worker still featurizes the committed snapshots
        if self.store is not None and self.store.writable:
            try:
                self.store.discard_uncommitted()
            finally:
                self.close()
        self.close()

    def __enter__(self) -> "TrainingMonitor":
        self.open_store()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if self._began and not self._ended:
            self.on_train_end(self.state.step)
        self.close()
        return False

    # ---------------------------------------------------------------- capture
    @property
    def engine(self) -> CaptureEngine:
        """The one capture implementation: inline here; the background worker and `montrage capture` run the
        same engine on stored snapshots."""
        if self._engine is None or self._engine.ctx is not self.ctx:
            self._engine = CaptureEngine(self.components, self._read_images, list(self.training_set.captions),
                                         self.probes, self.capture, self.anchor_indices, ctx=self.ctx,
                                         extractor=self.extractor, threads=self.capture_threads)
        return self._engine

    def capture_local(self) -> Dict[str, Dict[str, Any]]:
        """This rank's share of one checkpoint's capture: a function of the current LoRA weights and fixed seeds."""
        return self.engine.capture_local()

    def record_checkpoint(self, step: int) -> None:
        """Capture and commit one checkpoint (a collective: every rank must call it)."""
        if self._inactive:
            return
        self.open_store()
        if step in self.state.recorded_steps:
            # a resumed run replays steps already recorded: their losses belong to that checkpoint
            self.state.loss_sum, self.state.loss_count = 0.0, 0
            return
        if self._t0 is None:
            self._t0 = time.time()
        self._record_snapshot(step)

    # ---------------------------------------------------------------- accelerate integration
    def attach(self, accelerator: Any, global_step: Optional[Callable[[], int]] = None,
               all_ranks_save: bool = False) -> None:
        """Record a montrage checkpoint at every ``accelerator.save_state(...)``.

        ``global_step``: a callable returning the loop's current step (e.g. ``lambda: global_step``);
        default: the monitor's own step (the last ``on_step_end``). diffusers' example scripts call
        ``save_state`` on the main process only; then (the default) that process captures everything, with
        no collectives, and the monitor does nothing on the other processes. Pass ``all_ranks_save=True``
        when every rank calls ``save_state`` (e.g. DeepSpeed), to split capture across ranks.
        """
        if global_step is not None and not callable(global_step):
            raise ConfigError(f"attach(global_step=...) takes a callable returning the current step (e.g. "
                              f"lambda: step), got {type(global_step).__name__}")
        if not all_ranks_save:
            self._inactive = not bool(getattr(accelerator, "is_main_process", True))
            self.ctx = ProcessContext(None)

        def hook(models: List[Any], weights: List[Any], output_dir: str) -> None:
            step = int(global_step()) if global_step is not None else self.state.step
            self.state.step = step
            self.record_checkpoint(step)

        accelerator.register_save_state_pre_hook(hook)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        """Plain Python values (loadable with ``torch.load(weights_only=True)``, e.g. by accelerate's load_state)."""
        state = asdict(self.state)
        if self._t0 is not None:
            state["elapsed_before"] = self.state.elapsed_before + time.time() - self._t0
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the step, the running loss and the elapsed time; which steps are recorded comes from the store."""
        known = {f.name for f in fields(MonitorState)}
        recorded = list(self.state.recorded_steps)
        self.state = MonitorState(**{k: v for k, v in dict(state).items() if k in known})
        if self._opened:
            self.state.recorded_steps = recorded
        if self._t0 is not None:
            self._t0 = time.time()

    # ---------------------------------------------------------------- capture modes: snapshot in the loop
    capture_mode: str = "inline"
    capture_threads: Optional[int] = 1
    _engine: Optional[CaptureEngine] = None
    capture_device: str = "cpu"
    capture_nice: int = 19
    wait_on_close: bool = True
    _worker: Optional[Any] = None
    _capture_finished: bool = False
    _signal_rows: Optional[List[tuple]] = None

    def configure_capture(self, mode: str = "background", threads: Optional[int] = 1, device: str = "cpu",
                          nice: int = 19, wait_on_close: bool = True) -> "TrainingMonitor":
        """Where featurizing happens (call before training starts).

        ``inline``: at each checkpoint, in the loop (the loop waits). ``background``: the loop commits a snapshot
        (LoRA weights, step, running loss, lr, per-step signals: what exists only then) and goes on; a worker
        process with its own copy of the frozen base featurizes it with ``threads`` CPU threads at ``nice``
        (or on ``device``), and :meth:`close` waits for it unless ``wait_on_close=False``. ``deferred``:
        snapshots only; ``montrage capture RUN`` (or ``montrage attribute``) featurizes afterwards. Every mode
        writes the same store. Background and deferred need a base the worker can reload (embedded or a local
        diffusers folder) and ``record_lora``; otherwise capture stays inline, with a warning.
        """
        if mode not in S.CAPTURE_MODES:
            raise ConfigError(f"capture mode {mode!r} is not one of {list(S.CAPTURE_MODES)}")
        if threads is not None and threads < 1:
            raise ConfigError(f"capture threads must be >= 1, got {threads}")
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"capture device {device!r} is not a torch device ({exc}); use e.g. 'cpu' or 'cuda:1'")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"capture device {device!r} asks for CUDA, but torch sees no GPU here; use 'cpu'")
        if mode != "inline":
            why = None
            if not self.capture.record_lora:
                why = "CaptureConfig.record_lora is False, so no snapshot holds the LoRA weights"
            elif locate_base(self.components.base, self._unet()) is None:
                why = (f"the base model ({self.components.base!r}) cannot be reloaded by another process (not "
                       "'embedded' nor a local diffusers folder)")
            if why:
                log.warning("montrage: capturing inline instead of %s: %s", mode, why)
                mode = "inline"
        self.capture_mode, self.capture_threads, self.capture_device = mode, threads, device
        self.capture_nice, self.wait_on_close = nice, wait_on_close
        return self

    def _buffer_signals(self, step: int, per_sample_losses: Any, timesteps: Any, indices: Any) -> None:
        """Keep the batch's per-sample losses, timesteps and image indices until the next snapshot."""
        if per_sample_losses is None or (self.state.recorded_steps and step <= max(self.state.recorded_steps)):
            return  # nothing given, or a step a resumed run replays (its rows are committed already)

        def arr(x: Any, dtype: str) -> np.ndarray:
            x = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            return np.asarray(x).reshape(-1).astype(dtype)

        loss = arr(per_sample_losses, "float32")
        n = len(loss)

        def padded(x: Any) -> np.ndarray:
            out = np.full(n, -1, np.int64)
            if x is not None:
                v = arr(x, "int64")[:n]
                out[: len(v)] = v  # batch items past the given indices (e.g. prior images): -1
            return out

        if self._signal_rows is None:
            self._signal_rows = []
        self._signal_rows.append((step, padded(indices), padded(timesteps), loss))

    def _take_signals(self) -> Optional[Dict[str, np.ndarray]]:
        rows, self._signal_rows = self._signal_rows or [], None
        if not rows:
            return None
        return {S.SIGNAL_STEP: np.concatenate([np.full(len(r[3]), r[0], np.int64) for r in rows]),
                S.SIGNAL_INDEX: np.concatenate([r[1] for r in rows]),
                S.SIGNAL_TIMESTEP: np.concatenate([r[2] for r in rows]),
                S.SIGNAL_LOSS: np.concatenate([r[3] for r in rows])}

    def _snapshot(self, step: int, losses: List[tuple], signals: List[Optional[Dict[str, np.ndarray]]]):
        from montrage.storage.store import SnapshotRecord

        total, count = sum(s for s, _ in losses), sum(c for _, c in losses)
        given = [s for s in signals if s]
        merged = {k: np.concatenate([s[k] for s in given]) for k in given[0]} if given else None
        flat = flatten(lora_state(self.components.unet))[0] if self.capture.record_lora else None
        return SnapshotRecord(step=step, wall_time=self.state.elapsed_before + time.time() - self._t0,
                              train_loss=total / count if count else None, lora=flat,
                              learning_rate=current_learning_rate(self.optimizer), signals=merged)

    def _record_snapshot(self, step: int) -> None:
        """Commit the snapshot of ``step``, then featurize it here (inline) or hand it to the worker (a
        collective). Inline capture is the same engine the worker runs, on the live weights."""
        self._capture_finished = False
        t0 = time.perf_counter()
        parts = self.engine.capture_gathered() if self.capture_mode == "inline" else None
        losses = self.ctx.gather((self.state.loss_sum, self.state.loss_count))
        signals = self.ctx.gather(self._take_signals())
        error: Optional[BaseException] = None
        if self.ctx.is_main:
            try:
                if parts is not None:
                    self._catch_up_inline()
                snap = self._snapshot(step, losses, signals)
                k = self.store.append_snapshot(snap)
                if parts is not None:
                    rec = self.engine.assemble(parts, snap)
                    self.store.write_featurized(k, rec)
                    self.store.commit_featurized(k + 1, [k] if rec.has_nonfinite() else [])
                elif self.capture_mode == "background":
                    self._wake_worker()
                log_capture_time(self.output_dir, "loop", k, step, time.perf_counter() - t0,
                                 "checkpoint" if parts is not None else "snapshot")
                log.info("montrage: checkpoint at step %d recorded (%s capture)", step, self.capture_mode)
            except Exception as exc:  # reaches every rank below, so none waits forever
                error = exc
        status = self.ctx.broadcast(None if error is None else _portable(error))
        if error is not None:
            raise error
        if isinstance(status, BaseException):
            raise status
        self.state.recorded_steps.append(step)
        self.state.loss_sum, self.state.loss_count = 0.0, 0

    def _catch_up_inline(self) -> None:
        """Inline capture on a run an earlier process left with pending snapshots (background or deferred): take
        the capture lock (waiting for a worker still finishing) and featurize them first, on this process alone,
        each snapshot's LoRA weights swapped in and the live ones put back."""
        from montrage.callbacks.background import featurize_pending

        self.store.claim_featurizer(wait=True)
        if self.store.n_snapshots > self.store.n_checkpoints:
            alone = CaptureEngine(self.components, self._read_images, list(self.training_set.captions), self.probes,
                                  self.capture, self.anchor_indices, extractor=self.extractor,
                                  threads=self.capture_threads)
            featurize_pending(self.store, alone, restore=True, where="loop")

    def _wake_worker(self) -> None:
        from montrage.callbacks.background import BackgroundCapture

        if self._worker is None:
            self._worker = BackgroundCapture(self.output_dir, self.capture_threads, self.capture_device,
                                             self.capture_nice)
            self._worker.start()
        self._worker.notify()

    def _finish_capture(self, wait: bool = True) -> None:
        """Training is over (or failed): let the worker finish; wait for it unless told not to."""
        if not self.ctx.is_main or self._capture_finished:
            return  # after abort(): its close() calls neither wait nor catch up
        if not wait:
            self._capture_finished = True  # until the next checkpoint is recorded
        if self.capture_mode == "inline":
            if wait and self.store is not None and self.store.n_snapshots > self.store.n_checkpoints:
                self._catch_up_inline()  # snapshots a failed or earlier process left pending
            return
        if self.capture_mode == "background" and self._worker is None and wait and self.wait_on_close \
                and RunStore.exists(self.output_dir) and RunStore.open(self.output_dir).pending_steps:
            self._wake_worker()  # a resumed run whose snapshots a killed worker left pending
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.finish(wait=wait and self.wait_on_close)
        elif self.capture_mode == "deferred" and RunStore.exists(self.output_dir):
            pending = RunStore.open(self.output_dir).pending_steps
            if pending:
                log.info("montrage: %d checkpoint(s) snapshotted, not featurized yet: run `montrage capture %s` "
                         "(`montrage attribute` does it too)", len(pending), self.output_dir)
