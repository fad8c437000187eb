"""The training monitor: records training dynamics into the run store at every checkpoint.

Five lines in a user's Accelerate loop::

    monitor = TrainingMonitor("runs/x", components, training_set, accelerator=accelerator)
    monitor.on_train_begin()
    for step in range(1, steps + 1):
        ...  # forward, backward, optimizer.step()
        monitor.on_step_end(step, loss.item())
    monitor.on_train_end(steps)

Capture runs under ``no_grad`` with hooks removed afterwards, restores train/eval mode and the RNG,
and never consumes the training loop's random numbers: training results do not change.
Every rank computes its share of the images; rank 0 alone writes; all ranks meet at each commit.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from montrage.callbacks.base import MontrageCallback
from montrage.callbacks.probes import run_probes
from montrage.config import CaptureConfig, to_dict
from montrage.data.imagefolder import TrainingSet
from montrage.data.probes import Probe, default_probes
from montrage.data.sources import as_training_set
from montrage.distributed import ProcessContext
from montrage.errors import MontrageError
from montrage.models.components import DiffusionComponents
from montrage.models.features import ANCHOR_SEED_OFFSET, TRAIN_SEED_OFFSET, FeatureExtractor
from montrage.models.lora import flatten, lora_state
from montrage.storage import CheckpointRecord, RunStore, StoreDims
from montrage.storage import schema as S

log = logging.getLogger(__name__)


@dataclass
class MonitorState:
    step: int = 0
    recorded_steps: List[int] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    elapsed_before: float = 0.0  # wall time of earlier (interrupted) processes of this run


def _concat_shards(parts: Sequence[Dict[str, Any]], n: int) -> Dict[str, Any]:
    """Reassemble strided per-rank shards (rank r holds items r, r+W, ...) in item order."""
    world = len(parts)
    out: Dict[str, Any] = {}
    for key in parts[0]:
        if isinstance(parts[0][key], dict):
            out[key] = _concat_shards([{k: v for k, v in p[key].items()} for p in parts], n)
            continue
        first = parts[0][key]
        full = np.empty((n,) + first.shape[1:], dtype=first.dtype)
        for r, p in enumerate(parts):
            full[r::world] = p[key]
        out[key] = full
    return out


class TrainingMonitor(MontrageCallback):
    def __init__(self, output_dir: str | Path, components: DiffusionComponents, training_set: TrainingSet,
                 probes: Optional[Sequence[Probe]] = None, capture: Optional[CaptureConfig] = None,
                 run_config: Optional[dict] = None, accelerator: Optional[Any] = None,
                 lora_settings: Optional[dict] = None) -> None:
        self.output_dir = Path(output_dir)
        self.components = components
        self.training_set = training_set = as_training_set(training_set, components.resolution)  # any source, lazy
        self.probes = list(probes) if probes is not None else default_probes(training_set)
        self.capture = capture or CaptureConfig()
        self.ctx = ProcessContext(accelerator)
        self.extractor = FeatureExtractor(components, self.capture)
        self.state = MonitorState()
        n = len(training_set)
        n_anchor = min(n, self.capture.anchors)
        self.anchor_indices = sorted({int(i) for i in np.linspace(0, n - 1, n_anchor).round()}) if n_anchor else []
        self.run_config = dict(run_config or {})
        self.run_config.setdefault("capture", to_dict(self.capture))
        self.run_config.setdefault("base", components.base)
        self.run_config.setdefault("resolution", components.resolution)
        self.run_config.setdefault("lora", lora_settings or {})
        self.store: Optional[RunStore] = None
        self._opened = False
        self._dataset_fingerprint: Optional[str] = None
        self._t0: Optional[float] = None

    # ---------------------------------------------------------------- identity
    def dataset_fingerprint(self) -> str:
        """Hash of every training image and caption, computed once (it reads all pixels)."""
        if self._dataset_fingerprint is None:
            self._dataset_fingerprint = self.training_set.fingerprint()
        return self._dataset_fingerprint

    def fingerprint(self) -> dict:
        """What must match for a reopened store to be appended to (not steps or wall-clock details)."""
        return {"capture": to_dict(self.capture), "base": self.components.base,
                "dataset": self.dataset_fingerprint(),
                "probes": [[p.prompt, p.seed] for p in self.probes],
                "lora": self.run_config.get("lora"), "train": self.run_config.get("train_identity")}

    def _dims(self) -> StoreDims:
        flat, names, shapes = flatten(lora_state(self.components.unet)) if self.capture.record_lora else (None, [], [])
        r = self.components.resolution
        return StoreDims(n_train=len(self.training_set), n_probes=len(self.probes), n_anchors=len(self.anchor_indices),
                         n_conditions=len(self.capture.conditions), n_timesteps=len(self.capture.timesteps),
                         feature_dims=self.extractor.feature_dims(), image_shape=(r, r, 3),
                         lora_names=names, lora_shapes=shapes)

    def _metadata(self) -> tuple[dict, dict]:
        ts = self.training_set
        train = {S.ATTR_FILE_NAMES: list(ts.file_names), S.ATTR_CAPTIONS: list(ts.captions),
                 S.ATTR_CONCEPTS: list(ts.concepts), S.ATTR_EXTRA: list(ts.extra),
                 S.ATTR_DATASET_FINGERPRINT: self.dataset_fingerprint()}
        probes = {S.ATTR_PROMPTS: [p.prompt for p in self.probes], S.ATTR_SEEDS: [p.seed for p in self.probes],
                  S.ATTR_CONCEPTS: [p.concept for p in self.probes], S.ATTR_KINDS: [p.kind for p in self.probes],
                  S.ATTR_META: [dict(p.meta) for p in self.probes]}
        return train, probes

    def open_store(self) -> None:
        """Create or reopen the store (rank 0), and learn what was already recorded. A collective."""
        if self._opened:
            return
        result: object = None
        if self.ctx.is_main:
            try:
                train_meta, probe_meta = self._metadata()
                self.store = RunStore.create_or_resume(self.output_dir, self.run_config, self.fingerprint(),
                                                       self._dims(), train_meta, probe_meta, self.anchor_indices)
                result = self.store.steps.tolist()
            except MontrageError as exc:  # tell the other ranks instead of leaving them in the broadcast
                result = exc
        recorded = self.ctx.broadcast(result)
        if isinstance(recorded, BaseException):
            raise recorded
        self.state.recorded_steps = [int(s) for s in recorded]
        self._opened = True

    # ---------------------------------------------------------------- events
    def on_train_begin(self, step: int = 0) -> None:
        self._t0 = time.time()
        self.state.step = step
        self.open_store()
        if step == 0 and 0 not in self.state.recorded_steps:
            self.record_checkpoint(0)

    def on_step_end(self, step: int, loss: Optional[float] = None) -> None:
        self.state.step = step
        if loss is not None:
            self.state.loss_sum += float(loss)
            self.state.loss_count += 1
        if step % self.capture.every_n_steps == 0:
            self.record_checkpoint(step)

    def on_checkpoint(self, step: int) -> None:
        self.record_checkpoint(step)

    def on_train_end(self, step: int) -> None:
        self.state.step = step
        self.record_checkpoint(step)
        self.close()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        self._opened = False

    # ---------------------------------------------------------------- capture
    def _running_loss(self) -> Optional[float]:
        sums = self.ctx.gather((self.state.loss_sum, self.state.loss_count))
        total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
        return total / count if count else None

    def record_checkpoint(self, step: int) -> None:
        """Capture and commit one checkpoint (a collective: every rank must call it)."""
        self.open_store()
        if step in self.state.recorded_steps:
            # a resumed run replays steps already recorded: their losses belong to that checkpoint
            self.state.loss_sum, self.state.loss_count = 0.0, 0
            return
        if self._t0 is None:
            self._t0 = time.time()
        unet = self.components.unet
        ts = self.training_set
        local = {}
        for kind, items, offset in ((S.TRAIN, list(range(len(ts))), TRAIN_SEED_OFFSET),
                                    (S.ANCHORS, self.anchor_indices, ANCHOR_SEED_OFFSET)):
            mine = [items[j] for j in self.ctx.shard(len(items))]
            out = self.extractor.extract(ts.images[mine], [ts.captions[i] for i in mine], [offset + i for i in mine])
            local[kind] = {"f": out.features, "l": out.losses}
        p_images, p_feats = run_probes(self.components, self.extractor, self.probes,
                                       self.ctx.shard(len(self.probes)), self.capture)
        local[S.PROBES] = {"f": p_feats.features, "l": p_feats.losses, "img": p_images}
        parts = self.ctx.gather(local)
        train_loss = self._running_loss()
        if self.ctx.is_main:
            sizes = {S.TRAIN: len(ts), S.ANCHORS: len(self.anchor_indices), S.PROBES: len(self.probes)}
            full = {kind: _concat_shards([p[kind] for p in parts], sizes[kind]) for kind in S.FEATURE_KINDS}
            flat = flatten(lora_state(unet))[0] if self.capture.record_lora else None
            rec = CheckpointRecord(step=step, wall_time=self.state.elapsed_before + time.time() - self._t0,
                                   train_loss=train_loss, features={k: v["f"] for k, v in full.items()},
                                   losses={k: v["l"] for k, v in full.items()}, probe_images=full[S.PROBES]["img"],
                                   lora=flat)
            self.store.append(rec)
            log.info("montrage: recorded checkpoint at step %d", step)
        self.state.recorded_steps.append(step)
        self.state.loss_sum, self.state.loss_count = 0.0, 0
        self.ctx.barrier()

    # ---------------------------------------------------------------- accelerate integration
    def attach(self, accelerator: Any, all_ranks_save: bool = False) -> None:
        """Record a montrage checkpoint at every ``accelerator.save_state(...)``.

        diffusers' example scripts call ``save_state`` on the main process only; then (the default)
        the hook captures everything on that process, with no collectives. Pass ``all_ranks_save=True``
        when every rank calls ``save_state`` (e.g. DeepSpeed), to split capture across ranks.
        """
        if not all_ranks_save:
            self.ctx = ProcessContext(None)

        def hook(models: List[Any], weights: List[Any], output_dir: str) -> None:
            m = re.search(r"(\d+)$", str(output_dir).rstrip("/"))
            self.record_checkpoint(int(m.group(1)) if m else self.state.step)

        accelerator.register_save_state_pre_hook(hook)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        state = asdict(self.state)
        if self._t0 is not None:
            state["elapsed_before"] = self.state.elapsed_before + time.time() - self._t0
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = MonitorState(**state)
