"""Benchmark data whose attribution ground truth is known by construction.

* Artists: :func:`~montrage.data.synthetic.make_artists` with ``hard=True`` -- pairs (0, 1), (2, 3), ...
  share palette and background and differ only in stroke, the discriminating between-concept case.
* Training set: each artist draws ``per_artist`` images, each a *unique* (colour, object) combination
  within that artist (8 colours x 6 objects = 48 combinations): the object in that named colour, in
  the artist's background and stroke. Caption ``"a {colour} {object} by {artist}"``, concept = artist,
  extra columns ``colour`` and ``object``. Training index = row order of ``metadata.jsonl``.
* Probes (one probe file):

  - ``between``: ``"a {object} by {artist}"`` for every artist x object (concept = artist);
  - ``exemplar``: for each chosen training image, ``"a {colour} {object}, {artist} style"`` (the same
    content as its caption, worded differently), ``meta.target_index`` = that training index.

* Mixed specs: (artist a, artist b, colour, object, alpha, seed); :mod:`benchmarks.attribution`
  generates them with a blend ``alpha * E(prompt_a) + (1 - alpha) * E(prompt_b)`` of prompt-encoder
  outputs, ground-truth share of artist a = alpha.

Everything is a pure function of the arguments (seeded numpy generators).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from montrage.data.probes import Probe, save_probe_file
from montrage.data.synthetic import (COLOURS, OBJECTS, ArtistStyle, ConceptRecord, _write_folder, make_artists,
                                     render, write_prior_dataset)

CAPTION = "a {colour} {object} by {artist}"
EXEMPLAR_PROMPT = "a {colour} {object}, {artist} style"
BETWEEN_PROMPT = "a {object} by {artist}"
MIX_ALPHAS: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
BETWEEN_SEED0 = 100_000
EXEMPLAR_SEED0 = 200_000
MIXED_SEED0 = 300_000


@dataclass(frozen=True)
class BenchDataConfig:
    n_artists: int = 8
    per_artist: int = 14
    n_exemplars: int = 0  # exemplar probes (0 = one per training image)
    between_seeds: int = 1  # seeds per (artist, object) between-concept probe
    mixed_pairs: int = 8  # (artist a, artist b, colour, object) mixtures, each at every alpha
    n_prior: int = 32
    resolution: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.per_artist <= len(COLOURS) * len(OBJECTS):
            raise ValueError(f"per_artist must be in [1, {len(COLOURS) * len(OBJECTS)}]")
        if self.n_artists < 2:
            raise ValueError("the benchmark needs at least 2 artists")


@dataclass(frozen=True)
class MixedSpec:
    artist_a: str
    artist_b: str
    colour: str
    object: str
    alpha: float  # weight of artist a's prompt embedding = its ground-truth share
    seed: int

    @property
    def prompts(self) -> Tuple[str, str]:
        return (CAPTION.format(colour=self.colour, object=self.object, artist=self.artist_a),
                CAPTION.format(colour=self.colour, object=self.object, artist=self.artist_b))

    @property
    def id(self) -> str:
        return f"mix-{self.artist_a}-{self.artist_b}-{self.colour}-{self.object}-{self.alpha:.1f}"


@dataclass
class BenchData:
    root: Path
    data_dir: Path
    prior_dir: Path
    probes_file: Path
    artists: List[ArtistStyle]
    rows: List[Dict[str, str]]  # per training index: file_name, text, concept, colour, object
    probes: List[Probe]
    mixed: List[MixedSpec]
    config: BenchDataConfig = field(default_factory=BenchDataConfig)

    @property
    def concepts(self) -> List[str]:
        return [r["concept"] for r in self.rows]


def artist_combos(rng: np.random.Generator, n: int) -> List[Tuple[str, str]]:
    """``n`` distinct (colour, object) pairs, objects balanced (cycled in a shuffled order)."""
    objects = list(rng.permutation(OBJECTS))
    colours_left = {o: list(rng.permutation(list(COLOURS))) for o in OBJECTS}
    out = []
    for i in range(n):
        obj = str(objects[i % len(objects)])
        out.append((str(colours_left[obj].pop()), obj))
    assert len(set(out)) == n
    return out


def render_in_colour(artist: ArtistStyle, colour: str, obj: str, rng: np.random.Generator,
                     resolution: int = 16) -> np.ndarray:
    """The artist's background and stroke, the object in the named colour."""
    return render(obj, rng, resolution, artist=dataclasses.replace(artist, palette=(COLOURS[colour],)))


def build_bench_data(root: str | Path, cfg: BenchDataConfig = BenchDataConfig()) -> BenchData:
    """Write the training imagefolder, the prior folder and the probe file under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    artists = make_artists(cfg.n_artists, hard=True, seed=cfg.seed)
    images, records, rows = [], [], []
    for a in artists:
        for j, (colour, obj) in enumerate(artist_combos(rng, cfg.per_artist)):
            images.append(render_in_colour(a, colour, obj, rng, cfg.resolution))
            text = CAPTION.format(colour=colour, object=obj, artist=a.name)
            rec = ConceptRecord(f"{a.name}_{j:03d}.png", text, a.name, obj, extra={"colour": colour})
            records.append(rec)
            rows.append({"file_name": rec.file_name, "text": text, "concept": a.name, "colour": colour, "object": obj})
    data_dir = _write_folder(root / "data", images, records)
    prior_dir = write_prior_dataset(root / "prior", n_images=cfg.n_prior, objects=OBJECTS, seed=cfg.seed + 1,
                                    resolution=cfg.resolution)

    probes: List[Probe] = []
    for a in artists:
        for obj in OBJECTS:
            for s in range(cfg.between_seeds):
                probes.append(Probe(BETWEEN_PROMPT.format(object=obj, artist=a.name), BETWEEN_SEED0 + len(probes),
                                    concept=a.name, kind="between", meta={"object": obj}))
    targets = exemplar_targets(len(rows), cfg.n_artists, cfg.per_artist, cfg.n_exemplars)
    for i in targets:
        r = rows[i]
        probes.append(Probe(EXEMPLAR_PROMPT.format(colour=r["colour"], object=r["object"], artist=r["concept"]),
                            EXEMPLAR_SEED0 + i, concept=r["concept"], kind="exemplar",
                            meta={"target_index": int(i), "colour": r["colour"], "object": r["object"]}))
    probes_file = save_probe_file(probes, root / "probes.jsonl")

    mixed = mixed_specs(artists, rng, cfg.mixed_pairs)
    (root / "mixed.json").write_text(json.dumps([dataclasses.asdict(m) for m in mixed], indent=1))
    return BenchData(root, data_dir, prior_dir, probes_file, artists, rows, probes, mixed, cfg)


def exemplar_targets(n_train: int, n_artists: int, per_artist: int, n_exemplars: int) -> List[int]:
    """Training indices that get an exemplar probe: all, or an artist-balanced prefix of each artist."""
    if n_exemplars <= 0 or n_exemplars >= n_train:
        return list(range(n_train))
    per = max(1, n_exemplars // n_artists)
    return [a * per_artist + j for a in range(n_artists) for j in range(min(per, per_artist))]


def mixed_specs(artists: Sequence[ArtistStyle], rng: np.random.Generator, n_pairs: int) -> List[MixedSpec]:
    """``n_pairs`` (a, b, colour, object) mixtures, each at every alpha of :data:`MIX_ALPHAS`.

    Half of the pairs are hard pairs (same palette and background, different stroke), half cross pairs.
    """
    names = [a.name for a in artists]
    out: List[MixedSpec] = []
    for p in range(n_pairs):
        if p % 2 == 0:  # a hard pair (2k, 2k+1)
            k = int(rng.integers(len(names) // 2))
            a, b = names[2 * k], names[2 * k + 1]
        else:  # artists from two different hard pairs
            i = int(rng.integers(len(names)))
            choices = [j for j in range(len(names)) if j // 2 != i // 2]
            a, b = names[i], names[int(rng.choice(choices))] if choices else names[(i + 1) % len(names)]
        colour, obj = str(rng.choice(list(COLOURS))), str(rng.choice(OBJECTS))
        for alpha in MIX_ALPHAS:
            out.append(MixedSpec(a, b, colour, obj, float(alpha), MIXED_SEED0 + len(out)))
    return out
