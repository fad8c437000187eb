"""Counterfactual supervision for the fused model: ``montrage fit RUN --retrains N``.

The fused model is otherwise fitted on self-supervised anchors (perturbed copies, the run's own generations),
which say which image a query came from but not how much each training image *mattered*. Retraining the LoRA
on random subsets of the training set and measuring how the loss of the run's own generations changes gives
that directly (D-TRAK's LDS, used as a training signal): this module retrains (no monitor; same settings, the
same passes over each image), measures the losses, and stores them beside the run, where
:func:`montrage.analysis.fused.fitted_model` picks them up. The fit then reports a held-out LDS, measured on
retrained subsets it was not fitted on.

It sits beside :mod:`montrage.training` (it trains), above ``analysis`` (it fits).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.config import LoraSettings, TrainConfig, from_dict, to_dict
from montrage.errors import ConfigError, ScorerError
from montrage.storage import RunStore
from montrage.storage import schema as S

log = logging.getLogger(__name__)

RETRAIN_SEED0 = 900_000  # subset m of --seed s is drawn with seed RETRAIN_SEED0 + 1000 s + m
LOSS_TIMESTEPS = (100, 300, 500, 700, 900)
LOSS_NOISE_SEED = 5151


@dataclass
class RetrainResult:
    loras: List[Path]
    masks: np.ndarray  # (M, N)
    reused: int
    targets: Path


def subsets(n: int, m: int, fraction: float, seed: int) -> List[List[int]]:
    """``m`` sorted random subsets of size round(fraction * n) of range(n)."""
    size = max(1, min(n - 1, int(round(fraction * n))))
    return [sorted(np.random.default_rng(RETRAIN_SEED0 + 1000 * seed + j).choice(n, size, replace=False).tolist())
            for j in range(m)]


def _train_config(store: RunStore, fraction: float, steps: Optional[int]) -> TrainConfig:
    """The run's training settings for retraining a ``fraction`` of its images with the same passes over each.

    ``montrage train`` records all of them; a user's loop records them with ``TrainingMonitor(training=...)``,
    where fields left None are read from what every run records: steps from its last checkpoint, lr from its
    optimizer, the adapter from its UNet, the resolution it trained at."""
    rc = store.run_config or {}
    if not isinstance(rc.get("train"), dict):
        raise ConfigError("--retrains retrains the LoRA with the run's own training settings, but this run did not "
                          "record them; record them in your loop with TrainingMonitor(..., training=TrainConfig("
                          "batch_size=B)) (or record with `montrage train`), or fit without --retrains")
    cfg = from_dict(TrainConfig, rc["train"])
    filled = {}
    if cfg.steps is None and len(store.steps):
        filled["steps"] = int(store.steps[-1])
    if cfg.lr is None:
        lr = ((rc.get("optimizer") or {}).get("defaults") or {}).get("lr")
        if lr is None:
            raise ConfigError("--retrains needs the run's learning rate: record it with TrainingMonitor(training="
                              "TrainConfig(lr=...)) or pass the optimizer to TrainingMonitor(optimizer=...)")
        filled["lr"] = float(lr)
    if cfg.lora is None and isinstance(rc.get("lora"), dict) and "r" in rc["lora"]:
        lo = rc["lora"]
        filled["lora"] = LoraSettings(rank=int(lo["r"]), alpha=float(lo.get("lora_alpha") or lo["r"]),
                                      target_modules=tuple(sorted(lo.get("target_modules") or ())) or
                                      LoraSettings().target_modules)
    if cfg.resolution is None and rc.get("resolution"):
        filled["resolution"] = int(rc["resolution"])  # the run's images are stored at the resolution it trained at
    cfg = dataclasses.replace(cfg, **filled)
    # the run trained on world_size processes, each with batch_size images per step; a retrain runs on one
    total = int(cfg.steps or 0) * max(1, int(rc.get("world_size") or 1))
    # same passes over each image as the run (a fraction of the images: that fraction of the steps), unless told
    return dataclasses.replace(cfg, steps=int(steps) if steps else max(1, int(round(total * fraction))))


def _write_subset(store: RunStore, indices: Sequence[int], folder: Path) -> Path:
    """An imagefolder of the run's own (stored) training images ``indices``: what the run trained on."""
    from montrage.analysis.gradients import training_images
    from montrage.data.imagefolder import write_imagefolder

    ts = training_images(store)
    rows = [{"file_name": f"{i:06d}.png", "text": ts.captions[i], "concept": ts.concepts[i]} for i in indices]
    return write_imagefolder(folder, [ts.images[i] for i in indices], rows)


def _prior_dir(store: RunStore, prior_dir: Optional[str | Path], cfg: TrainConfig) -> Optional[Path]:
    if prior_dir:
        return Path(prior_dir)
    recorded = (store.run_config or {}).get("prior_dir")
    if not recorded or not cfg.prior_fraction:
        return None
    if not Path(recorded).is_dir():
        raise ConfigError(f"the run was trained with prior images from {recorded}, which is gone; pass --prior DIR "
                          "(the same images) so the retrained LoRAs match the run")
    return Path(recorded)


def _prior_identity(prior: Optional[Path], store: RunStore) -> Optional[str]:
    """The prior images' content hash: a retrained LoRA's cache key must survive moving or copying the run's folders
    (a path would not) and must change when the images do."""
    if prior is None:
        return None
    from montrage.data.imagefolder import load_imagefolder

    return load_imagefolder(prior, int(store.run_config["resolution"]), lazy=True).fingerprint()


def is_cached(folder: Path, want: dict) -> bool:
    """Whether ``folder`` holds a final LoRA recorded with exactly the key ``want``."""
    lora, meta = folder / S.FINAL_LORA_FILENAME, folder / S.RETRAIN_SUBSET_FILENAME
    if not (lora.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()) == json.loads(json.dumps(want))
    except json.JSONDecodeError:
        return False


def retrained_lora(folder: Path, want: dict, write_data: Callable[[Path], Path], cfg: TrainConfig,
                   base: str = "embedded", prior_dir: Optional[str | Path] = None) -> Tuple[Path, bool]:
    """(final LoRA, reused): trained without a monitor on the imagefolder ``write_data(dst)`` writes, cached in
    ``folder`` under the key ``want`` (JSON: what the LoRA depends on). Reused only when the recorded key matches;
    never half-written (a temporary folder, then a rename). Shared by ``--retrains`` and the LDS benchmark."""
    from montrage.training import train

    lora, meta = folder / S.FINAL_LORA_FILENAME, folder / S.RETRAIN_SUBSET_FILENAME
    if is_cached(folder, want):
        return lora, True
    with tempfile.TemporaryDirectory(prefix="montrage-retrain-") as tmp:
        data = write_data(Path(tmp) / "data")
        res = train(data, Path(tmp) / "run", base=base, cfg=cfg, prior_dir=prior_dir, monitor=False, progress=False)
        folder.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)  # a stale key never describes the new LoRA
        part = folder / (S.FINAL_LORA_FILENAME + ".part")
        shutil.copyfile(res.final_lora, part)
        part.replace(lora)
    meta.write_text(json.dumps(want, indent=1))
    return lora, False


def retrain(run_dir: str | Path, n: int, fraction: float = 0.5, steps: Optional[int] = None, seed: int = 0,
            prior_dir: Optional[str | Path] = None, progress: bool = True) -> RetrainResult:
    """Retrain the run's LoRA on ``n`` random subsets (cached in ``RUN/retrains/subset-<seed>/``), then measure the
    denoising losses of the run's generations of its anchors' captions under each, into ``RUN/retrains/targets.npz``."""
    if n < 2:
        raise ConfigError(f"--retrains needs at least 2 subsets (a correlation across subsets), got {n}")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--fraction must be in (0, 1), got {fraction}")
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    n_train = len(store.train_meta.get(S.ATTR_FILE_NAMES, []))
    if n_train < 4:
        raise ConfigError(f"--retrains needs a run with 4+ training images, this one has {n_train}")
    cfg = _train_config(store, fraction, steps)
    prior = _prior_dir(store, prior_dir, cfg)
    if prior is None:
        cfg = dataclasses.replace(cfg, prior_fraction=0.0)
    base = (store.run_config or {}).get("base") or "embedded"
    root = run_dir / S.RETRAINS_DIRNAME
    loras, reused = [], 0
    picks = subsets(n_train, n, fraction, seed)
    prior_key = _prior_identity(prior, store)
    masks = np.zeros((n, n_train), np.float32)
    for j, idx in enumerate(picks):
        masks[j, idx] = 1.0
        d = root / f"subset-{RETRAIN_SEED0 + 1000 * seed + j}"
        want = {"indices": idx, "train": to_dict(cfg), "base": base, "prior": prior_key,
                "dataset": store.train_meta.get(S.ATTR_DATASET_FINGERPRINT)}
        if progress and not is_cached(d, want):
            print(f"retraining subset {j + 1}/{n} ({len(idx)} of {n_train} images, {cfg.steps} steps)", flush=True)
        lora, was_cached = retrained_lora(d, want, lambda dst, idx=idx: _write_subset(store, idx, dst), cfg, base, prior)
        loras.append(lora)
        reused += int(was_cached)
    targets = measure_targets(store, loras, masks)
    return RetrainResult(loras, masks, reused, targets)


def measure_targets(store: RunStore, loras: Sequence[Path], masks: np.ndarray) -> Path:
    """Losses of the run's generations of its anchors' captions (the fused model's generation supervision) under
    each retrained LoRA, written atomically to ``RUN/retrains/targets.npz``."""
    from safetensors.numpy import load_file

    from montrage.analysis import fused as F
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.queries import probe_queries
    from montrage.models.checkpoints import RunModel
    from montrage.models.sampling import denoising_losses

    last = store.n_checkpoints - 1
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=last, progress=False)
    anchors = F.supervision_anchors(store)
    if not anchors:
        raise ConfigError("--retrains measures the losses of the run's generations of its anchors' captions, but "
                          "this run recorded no anchors (CaptureConfig.anchors=0)")
    captions = list(store.train_meta.get(S.ATTR_CAPTIONS) or [""] * len(masks[0]))
    gen = F.supervision_generations(ctx, anchors, captions)
    prompts = [captions[i] for i in anchors]
    model = RunModel(store.run_config)
    losses = np.zeros((len(loras), len(anchors)), np.float64)
    for j, path in enumerate(loras):
        comps = model.set_weights(load_file(str(path)), tag=None)
        losses[j] = denoising_losses(comps, gen, prompts, LOSS_TIMESTEPS, LOSS_NOISE_SEED)
    out = S.retrain_targets_path(store.run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part.npz")
    np.savez(tmp, masks=masks, losses=losses, anchors=np.asarray(anchors), step=int(store.steps[last]),
             timesteps=np.asarray(LOSS_TIMESTEPS))
    tmp.replace(out)
    return out


def fit_run(run_dir: str | Path, names: Sequence[str] = ("montrage",), options: Optional[dict] = None
            ) -> Dict[str, Dict[str, dict]]:
    """Fit (or load) the fused models of the run's last checkpoint, both query kinds; {name: {kind: model JSON}}."""
    from montrage.analysis import fused as F
    from montrage.analysis.base import ScoringContext, available, get_scorer
    from montrage.analysis.queries import probe_queries

    store = RunStore.open(run_dir)
    ctx = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1,
                         progress=False, options=dict(options or {}))
    out: Dict[str, Dict[str, dict]] = {}
    for name in names:
        scorer = get_scorer(name)
        if not isinstance(scorer, F.FusedScorer):
            fused = [m for m in available() if isinstance(get_scorer(m), F.FusedScorer)]
            raise ScorerError(f"{name!r} is not a fitted model; --methods takes {', '.join(fused)}")
        out[name] = {kind: scorer.model(ctx, kind).to_json() for kind in (F.PROMPT, F.IMAGE)}
    return out
