"""``montrage bench quality``: the quality gate of the embedded model, judged by a small CNN.

``--dataset synthetic`` (default):
(a) base model: "a {object}" for every object x 8 seeds -> object accuracy;
(b) a LoRA run like ``montrage demo`` (3 artists x 8 images, prior fraction 0.25; reused when it already
    exists): "a {object} by {artist}" for the run's objects x artists x 8 seeds -> accuracy of the prompted
    artist, of the prompted object, and of both. The judge is :func:`benchmarks.classifier.train_classifier`
    on ``make_artists(3)`` renders.
``--dataset typefaces``: a LoRA run on the real glyphs of :mod:`montrage.data.typefaces` (8 faces x 8 characters,
    64 images, no prior): "the letter {c} in {face}" for every face x character x 4 seeds -> accuracy of the
    prompted face, character, and both; the judge is
    :func:`benchmarks.classifier.train_typeface_classifier` on fresh glyph renders (not the training images).
    The base model never saw letters, so there is no base figure.

Training steps, LoRA rank and learning rate are montrage's data-dependent defaults
(:func:`montrage.config.resolve_defaults`) unless the settings fix them: the gate checks the defaults.
Target: >= 80% on every figure.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from benchmarks import metrics as M
from benchmarks.classifier import train_classifier, train_typeface_classifier
from montrage.config import CaptureConfig, LoraSettings, TrainConfig
from montrage.data import typefaces as TF
from montrage.data.synthetic import OBJECTS, make_artists, write_concept_dataset, write_prior_dataset
from montrage.storage import schema as S

TARGET = 0.8


@dataclass
class QualitySettings:
    dataset: str = "synthetic"  # synthetic | typefaces
    n_artists: int = 3
    per_artist: int = 8
    faces: Tuple[str, ...] = TF.DEFAULT_FACES
    characters: Tuple[str, ...] = TF.DEFAULT_CHARACTERS
    per_pair: int = 1
    resolution: Optional[int] = None  # None: the base model's
    steps: Optional[int] = None  # None for steps / lr / rank: montrage's data-dependent defaults
    lr: Optional[float] = None
    rank: Optional[int] = None
    prior_fraction: float = 0.25
    seeds_per_prompt: int = 8
    classifier_steps: int = 1500
    sample_steps: int = 25  # DDIM steps (the gate's own, fixed: probe settings of CaptureConfig may change)
    sampler: str = "ddim"  # or "dpm++2m"; the probes of CaptureConfig use CaptureConfig().probe_sampler
    guidance_scale: float = CaptureConfig().guidance_scale
    data_seed: int = 0
    prior_seed: int = 1
    train_seed: int = 0
    classifier_seed: int = 0
    sample_seed0: int = 50_000
    n_bootstrap: int = 1000


FULL = QualitySettings()
QUICK = QualitySettings(n_artists=2, per_artist=6, steps=120, seeds_per_prompt=4, classifier_steps=600)
TYPEFACES = QualitySettings(dataset="typefaces", prior_fraction=0.0, seeds_per_prompt=4)
TYPEFACES_QUICK = replace(TYPEFACES, faces=TF.DEFAULT_FACES[:3], characters=TF.DEFAULT_CHARACTERS[:3], steps=120,
                          seeds_per_prompt=2, classifier_steps=600)
DATASETS = ("synthetic", "typefaces")


def settings_for(dataset: str = "synthetic", quick: bool = False, seed: Optional[int] = None) -> QualitySettings:
    """The gate's settings for ``dataset``; ``seed`` (when given) seeds the data, the training and the judge."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    s = (QUICK if quick else FULL) if dataset == "synthetic" else (TYPEFACES_QUICK if quick else TYPEFACES)
    return s if seed is None else replace(s, data_seed=seed, train_seed=seed, classifier_seed=seed)


def _fig(values: np.ndarray, s: QualitySettings) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"value": float(v.mean()), "ci": list(M.mean_ci(v, s.n_bootstrap, 0)), "n": int(v.size)}


def _concepts_and_objects(meta: dict) -> tuple[List[str], List[str]]:
    """Artists and objects of a run's training data, from its store's training metadata."""
    concepts, extra = list(meta[S.ATTR_CONCEPTS]), list(meta[S.ATTR_EXTRA])
    objects = sorted({e.get("object") for e in extra if e.get("object") in OBJECTS}, key=OBJECTS.index)
    return sorted({c for c in concepts if c}), objects


def _train_cfg(s: QualitySettings, n_images: int, resolution: int,
               base_resolution: int) -> Tuple[TrainConfig, str, TrainConfig]:
    """The run's TrainConfig (unset fields left to montrage's defaults), a line saying what was used, the resolved one."""
    cfg = TrainConfig(steps=s.steps, batch_size=8, lr=s.lr, seed=s.train_seed, resolution=s.resolution,
                      prior_fraction=s.prior_fraction, lora=None if s.rank is None else LoraSettings(rank=s.rank))
    chosen = cfg.unresolved
    full = cfg.resolved(n_images, resolution, base_resolution)  # what train() resolves: the same function
    how = (f"montrage's defaults for {n_images} images at {resolution} px (chosen: {', '.join(chosen)})" if chosen
           else "explicit settings")
    return cfg, (f"trained here: {full.steps} steps, LoRA rank {full.lora.rank}, lr {full.lr:g}, batch 8, prior "
                 f"fraction {s.prior_fraction} ({how})"), full


def _gate_table(figures: Dict[str, dict]) -> Tuple[bool, List[str]]:
    passed = all(f["value"] >= TARGET for f in figures.values())
    rows = ["| figure | value [95% CI] | n | target |", "|---|---|---|---|"]
    for k, f in figures.items():
        rows.append(f"| {k.replace('_', ' ')} | {f['value']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}] | {f['n']} | "
                    f">= {TARGET:.2f} {'ok' if f['value'] >= TARGET else 'MISSED'} |")
    return passed, rows


def run_quality_bench(out_dir: str | Path, quick: bool = False, run_dir: Optional[str | Path] = None,
                      settings: Optional[QualitySettings] = None, echo: Callable[[str], None] = print,
                      dataset: str = "synthetic", seed: Optional[int] = None) -> dict:
    """Run the quality gate into ``out_dir`` (results.json, results.md); ``run_dir`` reuses a demo run."""
    s = settings or settings_for(dataset, quick, seed)
    if s.dataset == "typefaces":
        if run_dir is not None:
            raise ValueError("--run is for the synthetic gate (a montrage demo run); the typeface gate trains its own")
        return _typeface_gate(Path(out_dir), s, quick, echo)
    return _synthetic_gate(Path(out_dir), s, quick, run_dir, echo)


def _synthetic_gate(out: Path, s: QualitySettings, quick: bool, run_dir: Optional[str | Path],
                    echo: Callable[[str], None]) -> dict:
    from montrage.models.checkpoints import RunModel
    from montrage.models.loading import load_base
    from montrage.models.sampling import generate
    from montrage.training import train

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
    imgs = generate(base, prompts, [s.sample_seed0 + i for i in range(len(prompts))], num_steps=s.sample_steps, sampler=s.sampler,
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
        resolution = s.resolution or base.resolution
        cfg, source, full = _train_cfg(s, s.n_artists * s.per_artist, resolution, base.resolution)
        train(data, run, cfg=cfg, prior_dir=prior, monitor=False, progress=False)  # re-running reuses a finished run
        run_config = {"base": "embedded", "resolution": resolution, "lora": asdict(full.lora)}
        concepts = [a.name for a in make_artists(s.n_artists)]
        objects = list(OBJECTS[:4])  # write_concept_dataset's default objects
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
                    [s.sample_seed0 + 10_000 + i for i in range(len(combos))], num_steps=s.sample_steps, sampler=s.sampler,
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
    passed, rows = _gate_table(figures)
    md = "\n".join([f"Synthetic artists. LoRA run: {source}; {len(concepts)} artists x objects {objects} x "
                    f"{s.seeds_per_prompt} seeds; base: {len(OBJECTS)} objects x {s.seeds_per_prompt} seeds; "
                    f"{s.sampler} {s.sample_steps} steps, guidance {s.guidance_scale}. Gate: **{'PASSED' if passed else 'FAILED'}**.",
                    "", *rows, "",
                    "Base object accuracy per object: " + ", ".join(f"{o} {v:.2f}" for o, v in base_per_object.items()),
                    f"Timings (s): {timings}"])
    seeds = (f"data {s.data_seed}, prior {s.prior_seed}, training {s.train_seed}, judge {s.classifier_seed}, "
             f"samples from {s.sample_seed0}")
    results = {"benchmark": "quality", "dataset": "synthetic", "quick": bool(quick), "settings": asdict(s),
               "source": source, "figures": figures, "base_per_object": base_per_object, "target": TARGET,
               "passed": passed, "timings_s": timings, "seeds": seeds, "markdown": md}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(md + "\n")
    return results


def _sample_grid(images: np.ndarray, rows: int, path: Path, zoom: int = 4) -> None:
    """One row per face: the first generation of each character, enlarged (nearest) for viewing."""
    from PIL import Image

    n, r = len(images), images.shape[1]
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, r, r, 3).transpose(0, 2, 1, 3, 4).reshape(rows * r, cols * r, 3)
    Image.fromarray(grid).resize((cols * r * zoom, rows * r * zoom), Image.NEAREST).save(path)


def _typeface_gate(out: Path, s: QualitySettings, quick: bool, echo: Callable[[str], None]) -> dict:
    from safetensors.numpy import load_file

    from montrage.models.checkpoints import RunModel
    from montrage.models.loading import load_base
    from montrage.models.sampling import generate
    from montrage.training import train

    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    t_all = time.time()
    faces, chars = list(s.faces), list(s.characters)
    base_resolution = load_base("embedded").resolution
    resolution = s.resolution or base_resolution

    t0 = time.time()
    judge = train_typeface_classifier(faces, chars, resolution, steps=s.classifier_steps, seed=s.classifier_seed)
    timings["classifier"] = round(time.time() - t0, 2)
    echo(f"[1/3] judge CNN trained on fresh glyph renders ({s.classifier_steps} steps) in {timings['classifier']:.0f} s")

    t0 = time.time()
    data = TF.write_typeface_folder(out / "data", faces, chars, per_pair=s.per_pair, resolution=resolution,
                                    seed=s.data_seed)
    n_images = len(faces) * len(chars) * s.per_pair
    cfg, source, full = _train_cfg(s, n_images, resolution, base_resolution)
    run = out / "run"
    res = train(data, run, cfg=cfg, monitor=False, progress=False)  # re-running reuses a finished run
    if res.steps != full.steps:  # the gate must check what train() did
        raise RuntimeError(f"train() ran {res.steps} steps, the gate expected {full.steps}")
    timings["lora_training"] = round(time.time() - t0, 2)
    echo(f"[2/3] LoRA on {n_images} glyphs ({len(faces)} faces x {len(chars)} characters): {source} in "
         f"{timings['lora_training']:.0f} s")

    t0 = time.time()
    comps = RunModel({"base": "embedded", "resolution": resolution, "lora": asdict(full.lora)}).set_weights(
        load_file(str(run / S.FINAL_LORA_FILENAME)))
    combos = [(f, c) for f in faces for c in chars for _ in range(s.seeds_per_prompt)]
    imgs = generate(comps, [TF.caption(f, c) for f, c in combos],
                    [s.sample_seed0 + 10_000 + i for i in range(len(combos))], num_steps=s.sample_steps, sampler=s.sampler,
                    guidance_scale=s.guidance_scale)
    pc, pf = judge.predict(imgs)
    face_ok = np.array([faces[p] == f for p, (f, _) in zip(pf, combos)], dtype=np.float64)
    char_ok = np.array([chars[p] == c for p, (_, c) in zip(pc, combos)], dtype=np.float64)
    _sample_grid(imgs[:: s.seeds_per_prompt], len(faces), out / "samples.png")
    timings["lora_generations"] = round(time.time() - t0, 2)
    timings["total"] = round(time.time() - t_all, 2)
    echo(f"[3/3] face {face_ok.mean():.3f}, character {char_ok.mean():.3f}, both {(face_ok * char_ok).mean():.3f} "
         f"over {len(combos)} generations; sample grid {out / 'samples.png'}")

    figures = {"lora_face_accuracy": _fig(face_ok, s), "lora_character_accuracy": _fig(char_ok, s),
               "lora_both_accuracy": _fig(face_ok * char_ok, s)}
    per_face = {f: float(face_ok[[i for i, (x, _) in enumerate(combos) if x == f]].mean()) for f in faces}
    passed, rows = _gate_table(figures)
    md = "\n".join([f"Typefaces (real glyphs of matplotlib's fonts, `montrage.data.typefaces`). LoRA run: {source}; "
                    f"prompts \"the letter {{c}} in {{face}}\" for {len(faces)} faces x {len(chars)} characters x "
                    f"{s.seeds_per_prompt} seeds; judge: CNN on fresh renders of the same faces and characters; "
                    f"{s.sampler} {s.sample_steps} steps, guidance {s.guidance_scale}. Gate: **{'PASSED' if passed else 'FAILED'}**.",
                    "", *rows, "",
                    "Face accuracy per face: " + ", ".join(f"{f} {v:.2f}" for f, v in per_face.items()),
                    f"Timings (s): {timings}"])
    seeds = (f"data {s.data_seed}, training {s.train_seed}, judge {s.classifier_seed}, "
             f"samples from {s.sample_seed0 + 10_000}")
    results = {"benchmark": "quality", "dataset": "typefaces", "quick": bool(quick), "settings": asdict(s),
               "source": source, "train": {"steps": full.steps, "rank": full.lora.rank, "lr": full.lr},
               "figures": figures, "per_face": per_face, "target": TARGET, "passed": passed, "timings_s": timings,
               "seeds": seeds, "markdown": md, "samples": str(out / "samples.png")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(md + "\n")
    return results
