"""``montrage bench quality``: the quality gate of the embedded model, judged by a small CNN.

(a) base model: "a {object}" for every object x 8 seeds -> object accuracy;
(b) a LoRA run like ``montrage demo`` (3 artists x 8 images, 400 steps, prior fraction 0.25; reused when
    it already exists): "a {object} by {artist}" for the run's objects x artists x 8 seeds -> accuracy of
    the prompted artist, of the prompted object, and of both.
The judge is :func:`benchmarks.classifier.train_classifier` on ``make_artists(3)`` renders.
Target: >= 80% on every figure.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from benchmarks import metrics as M
from benchmarks.classifier import train_classifier
from montrage.config import CaptureConfig, TrainConfig
from montrage.data.synthetic import OBJECTS, make_artists, write_concept_dataset, write_prior_dataset
from montrage.storage import schema as S

TARGET = 0.8


@dataclass
class QualitySettings:
    n_artists: int = 3
    per_artist: int = 8
    steps: int = 400
    lr: float = 2e-3
    prior_fraction: float = 0.25
    seeds_per_prompt: int = 8
    classifier_steps: int = 1500
    sample_steps: int = CaptureConfig().probe_steps
    guidance_scale: float = CaptureConfig().guidance_scale
    data_seed: int = 0
    prior_seed: int = 1
    train_seed: int = 0
    classifier_seed: int = 0
    sample_seed0: int = 50_000
    n_bootstrap: int = 1000


FULL = QualitySettings()
QUICK = QualitySettings(n_artists=2, per_artist=6, steps=120, seeds_per_prompt=4, classifier_steps=600)


def _fig(values: np.ndarray, s: QualitySettings) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"value": float(v.mean()), "ci": list(M.mean_ci(v, s.n_bootstrap, 0)), "n": int(v.size)}


def _concepts_and_objects(meta: dict) -> tuple[List[str], List[str]]:
    """Artists and objects of a run's training data, from its store's training metadata."""
    concepts, extra = list(meta[S.ATTR_CONCEPTS]), list(meta[S.ATTR_EXTRA])
    objects = sorted({e.get("object") for e in extra if e.get("object") in OBJECTS}, key=OBJECTS.index)
    return sorted({c for c in concepts if c}), objects


def run_quality_bench(out_dir: str | Path, quick: bool = False, run_dir: Optional[str | Path] = None,
                      settings: Optional[QualitySettings] = None, echo: Callable[[str], None] = print) -> dict:
    """Run the quality gate into ``out_dir`` (results.json, results.md); ``run_dir`` reuses a demo run."""
    from montrage.models.checkpoints import RunModel
    from montrage.models.loading import load_base
    from montrage.models.sampling import generate
    from montrage.training import train

    s = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    t_all = time.time()

    t0 = time.time()
    artists = make_artists(3)
    judge = train_classifier(artists, steps=s.classifier_steps, seed=s.classifier_seed)
    timings["classifier"] = round(time.time() - t0, 2)
    echo(f"[1/3] judge CNN trained on make_artists(3) renders ({s.classifier_steps} steps) in {timings['classifier']:.0f} s")

    # (a) base model
    t0 = time.time()
    base = load_base("embedded")
    prompts = [f"a {o}" for o in OBJECTS for _ in range(s.seeds_per_prompt)]
    objs = [o for o in OBJECTS for _ in range(s.seeds_per_prompt)]
    imgs = generate(base, prompts, [s.sample_seed0 + i for i in range(len(prompts))], num_steps=s.sample_steps,
                    guidance_scale=s.guidance_scale)
    pred_obj, _ = judge.predict(imgs)
    base_ok = np.array([OBJECTS[p] == o for p, o in zip(pred_obj, objs)], dtype=np.float64)
    base_per_object = {o: float(base_ok[[i for i, x in enumerate(objs) if x == o]].mean()) for o in OBJECTS}
    timings["base_generations"] = round(time.time() - t0, 2)
    echo(f"[2/3] base model: object accuracy {base_ok.mean():.3f} over {len(objs)} generations")

    # (b) the LoRA run
    t0 = time.time()
    if run_dir is None:
        run = out / "run"
        data = write_concept_dataset(out / "data", n_artists=s.n_artists, images_per_artist=s.per_artist,
                                     seed=s.data_seed)
        prior = write_prior_dataset(out / "prior", n_images=32, seed=s.prior_seed)
        cfg = TrainConfig(steps=s.steps, batch_size=8, lr=s.lr, prior_fraction=s.prior_fraction, seed=s.train_seed)
        train(data, run, cfg=cfg, prior_dir=prior, monitor=False, progress=False)  # re-running reuses a finished run
        run_config = {"base": "embedded", "resolution": base.resolution, "lora": asdict(cfg.lora)}
        concepts = [a.name for a in make_artists(s.n_artists)]
        objects = list(OBJECTS[:4])  # write_concept_dataset's default objects
        source = f"trained here ({s.steps} steps)"
    else:
        run = Path(run_dir)
        from montrage.storage import RunStore

        store = RunStore.open(run)  # a monitored run (e.g. montrage-demo/run): its store names data and config
        run_config, meta = store.run_config, store.train_meta
        store.close()
        concepts, objects = _concepts_and_objects(meta)
        source = f"reused {run}"
    lora_file = run / S.FINAL_LORA_FILENAME
    timings["lora_training"] = round(time.time() - t0, 2)
    t0 = time.time()
    from safetensors.numpy import load_file

    comps = RunModel(run_config).set_weights(load_file(str(lora_file)))
    unknown = [c for c in concepts if c not in judge.artists]
    if unknown:
        echo(f"    note: the judge does not know artists {unknown}; they count as misses")
    combos = [(a, o) for a in concepts for o in objects for _ in range(s.seeds_per_prompt)]
    imgs = generate(comps, [f"a {o} by {a}" for a, o in combos],
                    [s.sample_seed0 + 10_000 + i for i in range(len(combos))], num_steps=s.sample_steps,
                    guidance_scale=s.guidance_scale)
    po, pa = judge.predict(imgs)
    art_ok = np.array([judge.artists[p] == a for p, (a, _) in zip(pa, combos)], dtype=np.float64)
    obj_ok = np.array([OBJECTS[p] == o for p, (_, o) in zip(po, combos)], dtype=np.float64)
    timings["lora_generations"] = round(time.time() - t0, 2)
    timings["total"] = round(time.time() - t_all, 2)
    echo(f"[3/3] LoRA ({source}): artist {art_ok.mean():.3f}, object {obj_ok.mean():.3f}, both "
         f"{(art_ok * obj_ok).mean():.3f} over {len(combos)} generations")

    figures = {"base_object_accuracy": _fig(base_ok, s), "lora_artist_accuracy": _fig(art_ok, s),
               "lora_object_accuracy": _fig(obj_ok, s), "lora_both_accuracy": _fig(art_ok * obj_ok, s)}
    passed = all(f["value"] >= TARGET for f in figures.values())
    rows = ["| figure | value [95% CI] | n | target |", "|---|---|---|---|"]
    for k, f in figures.items():
        rows.append(f"| {k.replace('_', ' ')} | {f['value']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] | {f['n']} | "
                    f">= {TARGET:.2f} {'ok' if f['value'] >= TARGET else 'MISSED'} |")
    md = "\n".join([f"LoRA run: {source}; {len(concepts)} artists x objects {objects} x {s.seeds_per_prompt} seeds; "
                    f"base: {len(OBJECTS)} objects x {s.seeds_per_prompt} seeds; DDIM {s.sample_steps} steps, "
                    f"guidance {s.guidance_scale}. Gate: **{'PASSED' if passed else 'FAILED'}**.", "", *rows, "",
                    "Base object accuracy per object: " + ", ".join(f"{o} {v:.2f}" for o, v in base_per_object.items()),
                    f"Timings (s): {timings}"])
    seeds = (f"data {s.data_seed}, prior {s.prior_seed}, training {s.train_seed}, judge {s.classifier_seed}, "
             f"samples from {s.sample_seed0}")
    results = {"benchmark": "quality", "quick": bool(quick), "settings": asdict(s), "source": source,
               "figures": figures, "base_per_object": base_per_object, "target": TARGET, "passed": passed,
               "timings_s": timings, "seeds": seeds, "markdown": md}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(md + "\n")
    return results
