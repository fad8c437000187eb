"""Probes: the (prompt, seed) generations whose training-data attribution montrage measures.

A probe file is JSON lines, one probe per line::

    {"prompt": "a circle by artist-0", "seed": 10000, "concept": "artist-0", "kind": "between"}
    {"prompt": "a square", "seed": 10001, "kind": "base", "target_index": 3}

``prompt`` (string) and ``seed`` (non-negative integer) are required; ``concept`` and ``kind``
are optional strings; every other field is kept in :attr:`Probe.meta`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple, Union

from montrage.data.imagefolder import TrainingSet
from montrage.errors import ConfigError, DataError, ProbeFileError

__all__ = ["Probe", "load_probe_file", "save_probe_file", "default_probes"]

_KNOWN = ("prompt", "seed", "concept", "kind")
_EXAMPLE = '{"prompt": "a circle by artist-0", "seed": 10000, "concept": "artist-0", "kind": "between"}'
_MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed and numpy both accept [0, 2**63)
_MAX_CAPTIONS_PER_CONCEPT = 4
_MAX_CAPTIONS_NO_CONCEPT = 16


@dataclass(frozen=True)
class Probe:
    """One generation to attribute: ``prompt`` rendered from noise seeded with ``seed``."""

    prompt: str
    seed: int
    concept: str = ""  # expected concept, if known
    kind: str = "between"  # free-form label: 'between', 'exemplar', 'mixed', 'base', ...
    meta: Dict[str, Any] = field(default_factory=dict, compare=False)  # other JSON fields

    def to_json(self) -> Dict[str, Any]:
        """The JSON object :func:`save_probe_file` writes for this probe."""
        clash = sorted(set(self.meta) & set(_KNOWN))
        if clash:
            raise ProbeFileError(f"probe {self.prompt!r} (seed {self.seed}) has meta keys {clash} that clash with "
                                 f"the probe fields {list(_KNOWN)}; rename them")
        return {"prompt": self.prompt, "seed": self.seed, "concept": self.concept, "kind": self.kind, **self.meta}


def _check_probe_fields(obj: Dict[str, Any], where: str) -> Probe:
    for key in ("prompt", "seed"):
        if key not in obj:
            raise ProbeFileError(f"{where}: missing required field {key!r} (found fields: "
                                 f"{', '.join(sorted(obj)) or 'none'}); each line needs 'prompt' and 'seed', "
                                 f"e.g. {_EXAMPLE}")
    prompt, seed = obj["prompt"], obj["seed"]
    if not isinstance(prompt, str):
        raise ProbeFileError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__} {prompt!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProbeFileError(f"{where}: field 'seed' must be an integer (e.g. 10000), got "
                             f"{type(seed).__name__} {seed!r}")
    if not 0 <= seed <= _MAX_SEED:
        raise ProbeFileError(f"{where}: field 'seed' must be in [0, 2**63 - 1], got {seed}")
    out: Dict[str, str] = {}
    for key, default in (("concept", ""), ("kind", "between")):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            raise ProbeFileError(f"{where}: field {key!r} must be a string (or absent / null), got "
                                 f"{type(v).__name__} {v!r}")
        out[key] = default if v is None else v
    return Probe(prompt=prompt, seed=seed, concept=out["concept"], kind=out["kind"],
                 meta={k: v for k, v in obj.items() if k not in _KNOWN})


def load_probe_file(path: Union[str, Path]) -> List[Probe]:
    """Read a probe jsonl file; raises :class:`ProbeFileError` naming file and line on bad input."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise ProbeFileError(f"probe file {p} {what}; pass a JSON-lines file with one probe per line, e.g. "
                             f"{_EXAMPLE}")
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProbeFileError(f"probe file {p} is not valid UTF-8 ({e}); save it as UTF-8 text") from None
    except OSError as e:
        raise ProbeFileError(f"cannot read probe file {p}: {e}") from None
    probes: List[Probe] = []
    seen: Dict[Tuple[str, int], int] = {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                 f"JSON object, e.g. {_EXAMPLE}") from None
        if not isinstance(obj, dict):
            raise ProbeFileError(f"{where}: expected a JSON object, got {type(obj).__name__} "
                                 f"({line.strip()[:60]}); each line must look like {_EXAMPLE}")
        probe = _check_probe_fields(obj, where)
        key = (probe.prompt, probe.seed)
        if key in seen:
            raise ProbeFileError(f"{p}: probe (prompt {probe.prompt!r}, seed {probe.seed}) appears on line "
                                 f"{seen[key]} and again on line {lineno}; the same generation would be "
                                 f"attributed twice (remove the duplicate or change its seed)")
        seen[key] = lineno
        probes.append(probe)
    if not probes:
        raise ProbeFileError(f"probe file {p} has no probes; add one JSON object per line, e.g. {_EXAMPLE}")
    return probes


def save_probe_file(probes: Iterable[Probe], path: Union[str, Path]) -> Path:
    """Write ``probes`` as JSON lines (the format :func:`load_probe_file` reads), atomically."""
    probes = list(probes)
    p = Path(path).expanduser()
    lines: List[str] = []
    seen: Dict[Tuple[str, int], int] = {}
    for i, probe in enumerate(probes):
        where = f"probe {i} (prompt {probe.prompt!r}, seed {probe.seed!r})"
        _check_probe_fields(probe.to_json(), where)  # refuse to write what could not be read back
        key = (probe.prompt, probe.seed)
        if key in seen:
            raise ProbeFileError(f"{where} duplicates probe {seen[key]}; each (prompt, seed) must be unique")
        seen[key] = i
        try:
            lines.append(json.dumps(probe.to_json(), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ProbeFileError(f"{where}: meta is not JSON-serialisable ({e}); keep meta to JSON "
                                 f"types (str, number, bool, list, dict)") from None
    if not lines:
        raise ProbeFileError(f"refusing to write an empty probe file {p}; it could not be read back")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def _distinct(values: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(values))


def default_probes(training: TrainingSet, seeds_per_prompt: int = 2, base_seed: int = 10_000) -> List[Probe]:
    """Probes derived from the dataset's concepts; deterministic.

    For each concept (sorted): one prompt ``"a {object} by {concept}"`` per distinct ``object``
    of its rows (sorted), or, without an ``object`` column, each distinct caption of the concept
    (first occurrences, at most 4); each prompt gets ``seeds_per_prompt`` seeds; kind 'between'.
    Then one 'base' probe (``"a {object}"``, no concept) per distinct object in the dataset.
    Without any concepts: one probe per distinct caption (at most 16), no concept.
    Seeds are ``base_seed`` plus a running counter, so every probe has its own seed.
    """
    if isinstance(seeds_per_prompt, bool) or not isinstance(seeds_per_prompt, int) or seeds_per_prompt < 1:
        raise ConfigError(f"seeds_per_prompt must be a positive integer, got {seeds_per_prompt!r}")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ConfigError(f"base_seed must be a non-negative integer, got {base_seed!r}")
    if len(training) == 0:
        raise DataError(f"cannot derive probes from an empty training set (read from {training.root}); "
                        f"pass a non-empty one or a probe file")

    counter = 0
    probes: List[Probe] = []

    def add(prompt: str, concept: str, kind: str, n_seeds: int) -> None:
        nonlocal counter
        for _ in range(n_seeds):
            probes.append(Probe(prompt=prompt, seed=base_seed + counter, concept=concept, kind=kind))
            counter += 1

    def obj_of(row: Dict[str, Any]) -> str:
        v = row.get("object")
        return v if isinstance(v, str) and v else ""

    concepts = sorted({c for c in training.concepts if c})
    if not concepts:
        for caption in _distinct(training.captions)[:_MAX_CAPTIONS_NO_CONCEPT]:
            add(caption, "", "between", 1)
        return probes

    for concept in concepts:
        rows = [i for i, c in enumerate(training.concepts) if c == concept]
        objects = sorted({obj_of(training.extra[i]) for i in rows} - {""})
        if objects:
            for obj in objects:
                add(f"a {obj} by {concept}", concept, "between", seeds_per_prompt)
        else:
            for caption in _distinct(training.captions[i] for i in rows)[:_MAX_CAPTIONS_PER_CONCEPT]:
                add(caption, concept, "between", seeds_per_prompt)
    for obj in sorted({obj_of(row) for row in training.extra} - {""}):
        add(f"a {obj}", "", "base", 1)
    return probes
