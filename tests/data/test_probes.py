import json
from pathlib import Path

import numpy as np
import pytest

from montrage.data.imagefolder import TrainingSet, load_imagefolder
from montrage.data.probes import Probe, default_probes, load_probe_file, save_probe_file
from montrage.data.synthetic import write_concept_dataset
from montrage.errors import ConfigError, DataError, ProbeFileError


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> TrainingSet:
    root = write_concept_dataset(tmp_path_factory.mktemp("ds") / "concepts", n_artists=2, images_per_artist=4)
    return load_imagefolder(root, 16)


def _ts(captions, concepts, extra=None) -> TrainingSet:
    n = len(captions)
    return TrainingSet(images=np.zeros((n, 4, 4, 3), np.uint8), captions=list(captions), concepts=list(concepts),
                       file_names=[f"{i}.png" for i in range(n)], extra=extra or [{} for _ in range(n)],
                       root="/nowhere", converted=[])


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


# ---------------------------------------------------------------- load / save


def test_load_fields_and_meta(tmp_path):
    p = _write(tmp_path / "p.jsonl", [
        {"prompt": "a circle by artist-0", "seed": 1, "concept": "artist-0", "kind": "exemplar", "target_index": 3},
        "",
        {"prompt": "a square", "seed": 2, "proportions": {"artist-0": 0.5}},
        {"prompt": "", "seed": 0, "concept": None},
    ])
    probes = load_probe_file(p)
    assert probes == [Probe("a circle by artist-0", 1, "artist-0", "exemplar"), Probe("a square", 2),
                      Probe("", 0)]
    assert probes[0].meta == {"target_index": 3}
    assert probes[1].meta == {"proportions": {"artist-0": 0.5}}
    assert probes[1].kind == "between" and probes[1].concept == ""
    assert len({*probes}) == 3  # hashable despite the meta dict


def test_save_load_round_trip(tmp_path, training):
    probes = default_probes(training) + [
        Probe("mix", 7, "artist-0", "mixed", meta={"proportions": {"artist-0": 0.25, "artist-1": 0.75}}),
        Probe("ex", 8, kind="", meta={"target_index": 2}),
    ]
    out = save_probe_file(probes, tmp_path / "sub" / "probes.jsonl")
    back = load_probe_file(out)
    assert back == probes
    assert [p.meta for p in back] == [p.meta for p in probes]
    assert [p.kind for p in back] == [p.kind for p in probes]


def test_save_rejects_unreadable(tmp_path):
    with pytest.raises(ProbeFileError):
        save_probe_file([Probe("a", 1), Probe("a", 1)], tmp_path / "dup.jsonl")
    with pytest.raises(ProbeFileError):
        save_probe_file([Probe("a", 1.5)], tmp_path / "f.jsonl")
    with pytest.raises(ProbeFileError):
        save_probe_file([Probe("a", 1, meta={"seed": 3})], tmp_path / "clash.jsonl")
    with pytest.raises(ProbeFileError):
        save_probe_file([Probe("a", 1, meta={"x": object()})], tmp_path / "obj.jsonl")
    with pytest.raises(ProbeFileError):
        save_probe_file([], tmp_path / "empty.jsonl")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("line,needles", [
    ('{"prompt": "x", "seed": ', ["line 2", "not valid JSON"]),
    ('[1, 2]', ["line 2", "JSON object"]),
    ('{"seed": 3}', ["line 2", "'prompt'"]),
    ('{"prompt": "x"}', ["line 2", "'seed'"]),
    ('{"prompt": 5, "seed": 3}', ["line 2", "'prompt'", "string"]),
    ('{"prompt": "x", "seed": "3"}', ["line 2", "'seed'", "integer"]),
    ('{"prompt": "x", "seed": 3.0}', ["line 2", "'seed'", "integer"]),
    ('{"prompt": "x", "seed": true}', ["line 2", "'seed'", "integer"]),
    ('{"prompt": "x", "seed": -1}', ["line 2", "'seed'"]),
    ('{"prompt": "x", "seed": 3, "concept": 1}', ["line 2", "'concept'"]),
    ('{"prompt": "x", "seed": 3, "kind": ["a"]}', ["line 2", "'kind'"]),
    ('{"prompt": "first", "seed": 1}', ["line 1", "line 2", "first"]),
])
def test_bad_probe_lines(tmp_path, line, needles):
    p = _write(tmp_path / "probes.jsonl", [{"prompt": "first", "seed": 1}, line])
    with pytest.raises(ProbeFileError) as ei:
        load_probe_file(p)
    msg = str(ei.value)
    assert "probes.jsonl" in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_empty_and_missing_probe_file(tmp_path):
    p = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ProbeFileError, match="empty.jsonl"):
        load_probe_file(p)
    with pytest.raises(ProbeFileError, match="missing.jsonl"):
        load_probe_file(tmp_path / "missing.jsonl")
    assert issubclass(ProbeFileError, DataError)


# ---------------------------------------------------------------- default probes


def test_default_probes_from_concepts(training):
    probes = default_probes(training, seeds_per_prompt=2, base_seed=100)
    between = [p for p in probes if p.kind == "between"]
    base = [p for p in probes if p.kind == "base"]
    assert len(probes) == len(between) + len(base)
    objects = ["circle", "cross", "square", "triangle"]  # sorted
    expected = [(f"a {o} by {a}", a) for a in ("artist-0", "artist-1") for o in objects for _ in range(2)]
    assert [(p.prompt, p.concept) for p in between] == expected
    assert [p.prompt for p in base] == [f"a {o}" for o in objects]
    assert all(p.concept == "" for p in base)
    assert [p.seed for p in probes] == list(range(100, 100 + len(probes)))
    assert default_probes(training, seeds_per_prompt=2, base_seed=100) == probes  # deterministic
    assert len(default_probes(training, seeds_per_prompt=1)) == 8 + 4


def test_default_probes_captions_without_object_column():
    ts = _ts(["c1", "c2", "c1", "c3", "c4", "c5", "b1"], ["z"] * 6 + ["a"])
    probes = default_probes(ts, seeds_per_prompt=1, base_seed=0)
    assert [(p.prompt, p.concept, p.kind) for p in probes] == [
        ("b1", "a", "between"), ("c1", "z", "between"), ("c2", "z", "between"),
        ("c3", "z", "between"), ("c4", "z", "between")]  # at most 4 captions per concept, first occurrences
    assert [p.seed for p in probes] == [0, 1, 2, 3, 4]


def test_default_probes_without_concepts():
    caps = [f"cap {i % 20}" for i in range(40)]
    probes = default_probes(_ts(caps, [""] * 40), seeds_per_prompt=3, base_seed=5)
    assert [p.prompt for p in probes] == [f"cap {i}" for i in range(16)]
    assert all(p.concept == "" for p in probes)
    assert [p.seed for p in probes] == list(range(5, 21))


def test_default_probes_bad_args(training):
    with pytest.raises(ConfigError):
        default_probes(training, seeds_per_prompt=0)
    with pytest.raises(ConfigError):
        default_probes(training, base_seed=-1)
    with pytest.raises(DataError):
        default_probes(training.subset([]))
