"""Benchmark data whose attribution ground truth is known by construction, for the queries users bring.

Two datasets, one shape (:class:`BenchData`):

* ``synthetic``: made-up artists (:func:`~montrage.data.synthetic.make_artists`, ``hard=True``: pairs
  (0, 1), (2, 3), ... share palette and background and differ only in stroke). Each artist draws
  ``per_concept`` images, each a unique (colour, object) with caption ``"a {colour} {object} by {artist}"``;
  one object per artist is **held out** (the artist never draws it). Prior-preservation folder of
  base-domain shapes.
* ``typefaces``: glyphs of real typefaces (:mod:`montrage.data.typefaces`; face = concept, character =
  object), caption ``"the letter {c} in {face}"``, one (face, character) pair per face held out.

Query specifications (all seeded by ``cfg.seed``):

* ``caption``: prompt = an exact training caption (``queries_per_concept`` per concept); ground truth: the
  training image of that caption (exemplar) and its concept (between). Their generations, given **without**
  the prompt, are the ``image-only`` queries (same targets).
* ``composition``: prompt = a concept with the object it never drew (the held-out pair), several seeds;
  ground truth: the concept.
* ``copy``: a perturbed copy (1-pixel shift, Gaussian noise, colour gain) of a training image, no prompt;
  ground truth: that training image.
* ``unseen``: an image rendered by the data generator in a concept's style but not in the training set
  (synthetic: the artist's held-out object; typefaces: characters no training image shows), no prompt;
  ground truth: the concept.
* ``mixed``: generations from a blend ``alpha E(prompt_a) + (1 - alpha) E(prompt_b)`` of two concepts'
  captions of one object, no prompt; ground truth: concept a's share = alpha.

Training index = row order of ``metadata.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.data.probes import Probe, save_probe_file

DATASETS = ("synthetic", "typefaces")
MIX_ALPHAS: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
CAPTION_SEED0 = 100_000
COMPOSITION_SEED0 = 200_000
MIXED_SEED0 = 300_000
PROBE_SEED0 = 400_000
SYN_CAPTION = "a {colour} {object} by {artist}"


@dataclass(frozen=True)
class BenchDataConfig:
    dataset: str = "synthetic"
    n_concepts: int = 8
    per_concept: int = 8  # synthetic: images per artist (typefaces: characters per face, one held out)
    queries_per_concept: int = 6  # caption / image-only / copy / unseen queries per concept
    composition_seeds: int = 6  # generations per held-out (concept, object) pair
    mixed_pairs: int = 6  # (concept a, concept b, object) blends, each at every alpha
    n_prior: int = 32  # synthetic only
    resolution: int = 16
    seed: int = 0

    # what only the query sets depend on: the training images (and the prior set) are drawn before any query, so
    # changing these leaves the training data, hence a cached run and its retrains, as they are
    QUERY_FIELDS = ("queries_per_concept", "composition_seeds", "mixed_pairs")

    def training_fields(self) -> dict:
        """The fields the training data depends on (the cache key of retrained LoRAs)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.QUERY_FIELDS}

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.n_concepts < 2:
            raise ValueError("the benchmark needs at least 2 concepts")
        if self.per_concept < 2 or self.queries_per_concept < 1:
            raise ValueError("per_concept must be >= 2 and queries_per_concept >= 1")


@dataclass(frozen=True)
class MixedSpec:
    concept_a: str
    concept_b: str
    prompt_a: str
    prompt_b: str
    alpha: float  # weight of concept a's prompt embedding = its ground-truth share
    seed: int

    @property
    def id(self) -> str:
        return f"mix-{self.concept_a}-{self.concept_b}-{self.seed}-{self.alpha:.1f}"


@dataclass
class BenchData:
    root: Path
    dataset: str
    data_dir: Path
    prior_dir: Optional[Path]
    probes_file: Path  # the monitor's probes: one per concept (kept small: each costs a sampling per checkpoint)
    rows: List[Dict[str, str]]  # per training index: file_name, text, concept, object (+ colour)
    caption_queries: List[Probe]  # meta.target_index
    composition_queries: List[Probe]
    copy_images: np.ndarray  # uint8 (Q, H, W, 3)
    copy_targets: List[int]
    unseen_images: np.ndarray
    unseen_concepts: List[str]
    unseen_objects: List[str]
    mixed: List[MixedSpec]
    heldout: List[Tuple[str, str]]  # (concept, object) never trained
    config: BenchDataConfig = field(default_factory=BenchDataConfig)

    @property
    def concepts(self) -> List[str]:
        return [r["concept"] for r in self.rows]

    @property
    def concept_names(self) -> List[str]:
        return list(dict.fromkeys(self.concepts))

    def caption_of(self, concept: str, obj: str, colour: Optional[str] = None) -> str:
        if self.dataset == "typefaces":
            from montrage.data.typefaces import caption

            return caption(concept, obj)
        return SYN_CAPTION.format(colour=colour or "red", object=obj, artist=concept)

    def sample_prompts(self, n_objects: int = 4) -> Tuple[List[str], List[str], List[str]]:
        """(concepts, objects, prompts) of a concept x object grid of trained pairs (for sample figures)."""
        objs = list(dict.fromkeys(r["object"] for r in self.rows))[:n_objects]
        concepts, objects, prompts = [], [], []
        for c in self.concept_names:
            for o in objs:
                row = next((r for r in self.rows if r["concept"] == c and r["object"] == o), None)
                if row is not None:
                    concepts.append(c)
                    objects.append(o)
                    prompts.append(row["text"])
        return concepts, objects, prompts


# ----------------------------------------------------------------------------- perturbations
def perturb(image: np.ndarray, rng: np.random.Generator, noise_sigma: float = 3.0, gain: float = 0.04,
            shift: float = 0.3) -> np.ndarray:
    """A near-copy: shifted by ``shift`` pixel in a random direction (linear, edges replicated), per-channel gain
    in [1-gain, 1+gain], Gaussian noise of ``noise_sigma`` grey levels. (A whole pixel is 6% of a 16-pixel image:
    on striped or checkered backgrounds that is a different picture, not a copy.)"""
    dy, dx = [int(v) for v in rng.choice([-1, 0, 1], 2)]
    if dx == 0 and dy == 0:
        dx = 1
    img = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    shifted = img[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    img = (1 - shift) * image.astype(np.float64) + shift * shifted
    img = img * rng.uniform(1 - gain, 1 + gain, 3) + rng.normal(0, noise_sigma, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- builders
def _pick_per_concept(rows: List[Dict[str, str]], per: int, rng: np.random.Generator) -> List[int]:
    out: List[int] = []
    for c in dict.fromkeys(r["concept"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["concept"] == c]
        out += sorted(rng.choice(idx, min(per, len(idx)), replace=False).tolist())
    return out


def _mixed(rows: List[Dict[str, str]], concepts: List[str], rng: np.random.Generator, n_pairs: int,
           hard_pairs: bool) -> List[MixedSpec]:
    """Blends of two concepts' captions of one object both trained on: half hard pairs (synthetic 2k, 2k+1)."""
    out: List[MixedSpec] = []
    for p in range(n_pairs):
        if hard_pairs and p % 2 == 0:
            k = int(rng.integers(len(concepts) // 2))
            a, b = concepts[2 * k], concepts[2 * k + 1]
        else:
            a, b = [concepts[int(i)] for i in rng.choice(len(concepts), 2, replace=False)]
        common = sorted({r["object"] for r in rows if r["concept"] == a} & {r["object"] for r in rows if r["concept"] == b})
        obj = str(rng.choice(common))
        ra = next(r for r in rows if r["concept"] == a and r["object"] == obj)
        rb = next(r for r in rows if r["concept"] == b and r["object"] == obj)
        for alpha in MIX_ALPHAS:
            out.append(MixedSpec(a, b, ra["text"], rb["text"], float(alpha), MIXED_SEED0 + len(out)))
    return out


def _synthetic(root: Path, cfg: BenchDataConfig, rng: np.random.Generator):
    from montrage.data.synthetic import (COLOURS, OBJECTS, ConceptRecord, _write_folder, make_artists, render,
                                         write_prior_dataset)

    artists = make_artists(cfg.n_concepts, hard=True, seed=cfg.seed)
    heldout = {a.name: OBJECTS[(k + cfg.seed) % len(OBJECTS)] for k, a in enumerate(artists)}
    if cfg.per_concept > len(COLOURS) * (len(OBJECTS) - 1):
        raise ValueError(f"synthetic per_concept must be <= {len(COLOURS) * (len(OBJECTS) - 1)}")

    def draw(artist, colour: str, obj: str) -> np.ndarray:
        return render(obj, rng, cfg.resolution, artist=dataclasses.replace(artist, palette=(COLOURS[colour],)))

    images, records, rows = [], [], []
    for a in artists:
        objs = [o for o in rng.permutation(OBJECTS).tolist() if o != heldout[a.name]]
        colours = {o: rng.permutation(list(COLOURS)).tolist() for o in objs}
        for j in range(cfg.per_concept):
            obj = objs[j % len(objs)]
            colour = colours[obj].pop()
            text = SYN_CAPTION.format(colour=colour, object=obj, artist=a.name)
            images.append(draw(a, colour, obj))
            rec = ConceptRecord(f"{a.name}_{j:03d}.png", text, a.name, obj, extra={"colour": colour})
            records.append(rec)
            rows.append({"file_name": rec.file_name, "text": text, "concept": a.name, "object": obj, "colour": colour})
    data_dir = _write_folder(root / "data", images, records)
    prior_dir = write_prior_dataset(root / "prior", n_images=cfg.n_prior, objects=OBJECTS, seed=cfg.seed + 1,
                                    resolution=cfg.resolution)
    unseen, unseen_c, unseen_o = [], [], []
    for a in artists:  # the artist's style, the object it never drew, in random colours
        for _ in range(cfg.queries_per_concept):
            unseen.append(draw(a, str(rng.choice(list(COLOURS))), heldout[a.name]))
            unseen_c.append(a.name)
            unseen_o.append(heldout[a.name])
    composition = [(a.name, heldout[a.name], f"a {heldout[a.name]} by {a.name}") for a in artists]
    return data_dir, prior_dir, np.stack(images), rows, np.stack(unseen), unseen_c, unseen_o, composition, \
        [(a.name, heldout[a.name]) for a in artists]


# characters beyond the 8 defaults, for sets with more images per face (`bench concept --per-concept`); none is
# an unseen-image character, and the first 8 (the default benchmark's) are unchanged
MORE_CHARACTERS = ("c", "f", "j", "o", "q", "r", "v", "z")


def _typefaces(root: Path, cfg: BenchDataConfig, rng: np.random.Generator):
    from montrage.data import typefaces as T

    faces = list(T.DEFAULT_FACES[:cfg.n_concepts])
    chars = list((T.DEFAULT_CHARACTERS + MORE_CHARACTERS)[:cfg.per_concept])
    if len(faces) < cfg.n_concepts or len(chars) < cfg.per_concept:
        raise ValueError(f"typefaces has {len(T.DEFAULT_FACES)} default faces and "
                         f"{len(T.DEFAULT_CHARACTERS) + len(MORE_CHARACTERS)} characters")
    heldout = T.holdout_pairs(faces, chars, seed=cfg.seed)
    data_dir = T.write_typeface_folder(root / "data", faces, chars, resolution=cfg.resolution, seed=cfg.seed,
                                       exclude=heldout)
    rows = [json.loads(ln) for ln in (data_dir / "metadata.jsonl").read_text().splitlines() if ln.strip()]
    rows = [{"file_name": r["file_name"], "text": r["text"], "concept": r["concept"], "object": r["object"]} for r in rows]
    from PIL import Image

    images = np.stack([np.asarray(Image.open(data_dir / r["file_name"]).convert("RGB")) for r in rows])
    unseen_pairs = [(f, T.UNSEEN_CHARACTERS[j % len(T.UNSEEN_CHARACTERS)]) for f in faces
                    for j in range(cfg.queries_per_concept)]
    # copies beyond the first of an unseen character get their own jitter draw
    unseen_imgs = [T.render_pairs([p], 1, cfg.resolution, cfg.seed, first_copy=1 + j // len(T.UNSEEN_CHARACTERS))[0][0]
                   for j, p in enumerate(unseen_pairs)]
    composition = [(f, c, T.caption(f, c)) for f, c in heldout]
    return data_dir, None, images, rows, np.stack(unseen_imgs), [f for f, _ in unseen_pairs], \
        [c for _, c in unseen_pairs], composition, list(heldout)


def build_bench_data(root: str | Path, cfg: BenchDataConfig = BenchDataConfig()) -> BenchData:
    """Write the training imagefolder (+ prior folder, probe file) under ``root``; return every query spec."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    build = _synthetic if cfg.dataset == "synthetic" else _typefaces
    data_dir, prior_dir, train_images, rows, unseen, unseen_c, unseen_o, composition, heldout = build(root, cfg, rng)
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    q_rng = np.random.default_rng([cfg.seed, 7])
    targets = _pick_per_concept(rows, cfg.queries_per_concept, q_rng)
    caption_queries = [Probe(rows[i]["text"], CAPTION_SEED0 + 10_000 * cfg.seed + j, concept=rows[i]["concept"],
                             kind="caption", meta={"target_index": int(i)}) for j, i in enumerate(targets)]
    composition_queries = [Probe(prompt, COMPOSITION_SEED0 + 10_000 * cfg.seed + len(heldout) * s + k, concept=c,
                                 kind="composition", meta={"object": o})
                           for s in range(cfg.composition_seeds) for k, (c, o, prompt) in enumerate(composition)]
    copy_targets = _pick_per_concept(rows, cfg.queries_per_concept, np.random.default_rng([cfg.seed, 11]))
    p_rng = np.random.default_rng([cfg.seed, 13])
    copy_images = np.stack([perturb(train_images[i], p_rng) for i in copy_targets])
    mixed = _mixed(rows, concepts, np.random.default_rng([cfg.seed, 17]), cfg.mixed_pairs,
                   hard_pairs=cfg.dataset == "synthetic")
    probes = [Probe(rows[next(i for i, r in enumerate(rows) if r["concept"] == c)]["text"], PROBE_SEED0 + k,
                    concept=c, kind="between") for k, c in enumerate(concepts)]
    probes_file = save_probe_file(probes, root / "probes.jsonl")
    (root / "queries.json").write_text(json.dumps({
        "caption": [p.to_json() for p in caption_queries], "composition": [p.to_json() for p in composition_queries],
        "copy_targets": copy_targets, "unseen": list(zip(unseen_c, unseen_o)),
        "mixed": [dataclasses.asdict(m) for m in mixed], "heldout": heldout}, indent=1))
    return BenchData(root, cfg.dataset, data_dir, prior_dir, probes_file, rows, caption_queries, composition_queries,
                     copy_images, copy_targets, unseen, unseen_c, unseen_o, mixed, [tuple(h) for h in heldout], cfg)
