import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from montrage.data.imagefolder import TrainingSet, load_imagefolder
from montrage.data.synthetic import write_concept_dataset
from montrage.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory) -> Path:
    return write_concept_dataset(tmp_path_factory.mktemp("ds") / "concepts", n_artists=2, images_per_artist=4)


def _write_folder(root: Path, rows, images=None) -> Path:
    """rows: list of dicts or raw strings (written as is); images: {file_name: PIL image}."""
    root.mkdir(parents=True, exist_ok=True)
    for name, im in (images or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / name)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _rgb(size=(16, 16), colour=(10, 20, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


# ---------------------------------------------------------------- round trip


def test_round_trip_synthetic(concept_dir):
    ts = load_imagefolder(concept_dir, 16)
    assert isinstance(ts, TrainingSet)
    assert len(ts) == 8
    assert ts.images.shape == (8, 16, 16, 3) and ts.images.dtype == np.uint8
    meta = [json.loads(l) for l in (concept_dir / "metadata.jsonl").read_text().splitlines() if l.strip()]
    assert ts.file_names == [m["file_name"] for m in meta]
    assert ts.captions == [m["text"] for m in meta]
    assert ts.concepts == ["artist-0"] * 4 + ["artist-1"] * 4
    assert [e["object"] for e in ts.extra] == ["circle", "square", "triangle", "cross"] * 2
    assert all(set(e) == {"object"} for e in ts.extra)
    assert ts.root == str(concept_dir)
    assert ts.converted == []
    # pixels are exactly what is on disk
    first = np.asarray(Image.open(concept_dir / ts.file_names[0]).convert("RGB"))
    np.testing.assert_array_equal(ts.images[0], first)
    assert ts.images.std() > 0


def test_fingerprint_stable_and_sensitive(concept_dir, tmp_path):
    a = load_imagefolder(concept_dir, 16)
    b = load_imagefolder(concept_dir, 16)
    fp = a.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == b.fingerprint()

    # change one caption in a copy of the folder -> different fingerprint
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in concept_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert load_imagefolder(copy, 16).fingerprint() == fp  # moving the folder keeps it
    lines = (copy / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["text"] = row["text"] + " (edited)"
    lines[2] = json.dumps(row)
    (copy / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert load_imagefolder(copy, 16).fingerprint() != fp

    # changing one pixel or a concept also changes it
    c = a.subset(range(len(a)))
    assert c.fingerprint() == fp
    c.images[3, 0, 0, 0] ^= 1
    assert c.fingerprint() != fp
    d = a.subset(range(len(a)))
    d.concepts[0] = "someone-else"
    assert d.fingerprint() != fp


def test_subset(concept_dir):
    ts = load_imagefolder(concept_dir, 16)
    sub = ts.subset([5, 1])
    assert len(sub) == 2
    assert sub.file_names == [ts.file_names[5], ts.file_names[1]]
    assert sub.captions == [ts.captions[5], ts.captions[1]]
    assert sub.concepts == [ts.concepts[5], ts.concepts[1]]
    assert sub.extra == [ts.extra[5], ts.extra[1]]
    np.testing.assert_array_equal(sub.images, ts.images[[5, 1]])
    sub.images[0] = 0  # a copy, not a view
    assert ts.images[5].any()
    mask = np.array(ts.concepts) == "artist-1"
    assert ts.subset(mask).file_names == ts.file_names[4:]
    empty = ts.subset([])
    assert len(empty) == 0 and empty.images.shape == (0, 16, 16, 3)
    with pytest.raises(IndexError):
        ts.subset([8])


def test_no_concept_column_blank_lines_and_subdirs(tmp_path):
    root = _write_folder(tmp_path / "f", [
        {"file_name": "imgs/a.png", "text": "a thing", "tag": 3},
        "",
        "   ",
        {"file_name": "b.png", "text": "", "concept": None},
    ], {"imgs/a.png": _rgb(), "b.png": _rgb(colour=(200, 0, 0))})
    ts = load_imagefolder(root, 16)
    assert ts.concepts == ["", ""]
    assert ts.captions == ["a thing", ""]
    assert ts.extra == [{"tag": 3}, {}]
    assert tuple(ts.images[1, 0, 0]) == (200, 0, 0)


# ---------------------------------------------------------------- conversion


def test_modes_and_sizes_converted_with_one_warning(tmp_path, caplog):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.paste((0, 0, 255, 255), (15, 10, 25, 20))  # opaque blue block in the middle
    grey = Image.new("L", (16, 16), 128)
    pal = _rgb(colour=(0, 200, 0)).convert("P", palette=Image.ADAPTIVE)
    root = _write_folder(tmp_path / "mixed", [
        {"file_name": "ok.png", "text": "fine"},
        {"file_name": "rgba.png", "text": "wide rgba"},
        {"file_name": "grey.png", "text": "grey"},
        {"file_name": "pal.png", "text": "palette"},
    ], {"ok.png": _rgb(), "rgba.png": rgba, "grey.png": grey, "pal.png": pal})
    with caplog.at_level(logging.WARNING, logger="montrage.data.imagefolder"):
        ts = load_imagefolder(root, 16)
    assert ts.images.shape == (4, 16, 16, 3)
    assert ts.converted == ["rgba.png", "grey.png", "pal.png"]
    # RGBA: transparent area composited on white, centre crop keeps the blue block in the middle
    assert tuple(ts.images[1, 0, 0]) == (255, 255, 255)
    c = ts.images[1, 8, 8]
    assert c[2] > 200 and c[0] < 60 and c[1] < 60
    assert tuple(ts.images[2, 5, 5]) == (128, 128, 128)
    assert tuple(ts.images[3, 5, 5]) == (0, 200, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "3 of 4" in msg and "RGBA" in msg and "L (x1)" in msg and "40x30" in msg and "rgba.png" in msg


def test_resize_square_and_custom_logger(concept_dir, caplog):
    logger = logging.getLogger("montrage-test-custom")
    with caplog.at_level(logging.WARNING, logger="montrage-test-custom"):
        ts = load_imagefolder(concept_dir, 8, logger=logger)
    assert ts.images.shape == (8, 8, 8, 3)
    assert ts.converted == ts.file_names
    assert [r.name for r in caplog.records] == ["montrage-test-custom"]
    assert "resized to 8x8" in caplog.records[0].getMessage()


def test_no_warning_when_nothing_converted(concept_dir, caplog):
    with caplog.at_level(logging.DEBUG):
        load_imagefolder(concept_dir, 16)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- errors


def _expect(root, *needles, resolution=16):
    with pytest.raises(DataError) as ei:
        load_imagefolder(root, resolution)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_folder_missing_or_file(tmp_path):
    _expect(tmp_path / "nope", "nope", "does not exist")
    f = tmp_path / "file.txt"
    f.write_text("x")
    _expect(f, "file.txt", "not a directory")


def test_metadata_missing(tmp_path):
    (tmp_path / "d").mkdir()
    msg = _expect(tmp_path / "d", "metadata.jsonl", "diffusers imagefolder", '"file_name"', '"text"')
    assert "{" in msg  # shows an example line


def test_empty_metadata(tmp_path):
    root = _write_folder(tmp_path / "d", ["", "  "])
    _expect(root, "metadata.jsonl", "no rows")


@pytest.mark.parametrize("line,needles", [
    ('{"file_name": "a.png", "text": ', ["line 2", "not valid JSON"]),
    ('["a.png", "cap"]', ["line 2", "JSON object", "list"]),
    ('{"text": "cap"}', ["line 2", "'file_name'"]),
    ('{"file_name": "a.png"}', ["line 2", "'text'"]),
    ('{"file_name": "a.png", "text": 5}', ["line 2", "'text'", "string"]),
    ('{"file_name": 7, "text": "c"}', ["line 2", "'file_name'"]),
    ('{"file_name": "a.png", "text": "c", "concept": 3}', ["line 2", "'concept'"]),
    ('{"file_name": "../a.png", "text": "c"}', ["line 2", "../a.png", "outside"]),
    ('{"file_name": "/etc/a.png", "text": "c"}', ["line 2", "/etc/a.png", "outside"]),
])
def test_bad_lines(tmp_path, line, needles):
    root = _write_folder(tmp_path / "d", [{"file_name": "ok.png", "text": "fine"}, line], {"ok.png": _rgb()})
    msg = _expect(root, "metadata.jsonl", *needles)
    assert str(root) in msg


def test_duplicate_file_name_names_both_lines(tmp_path):
    root = _write_folder(tmp_path / "d", [
        {"file_name": "a.png", "text": "one"},
        {"file_name": "b.png", "text": "two"},
        {"file_name": "./a.png", "text": "three"},
    ], {"a.png": _rgb(), "b.png": _rgb()})
    _expect(root, "a.png", "line 1", "line 3")


def test_missing_image(tmp_path):
    root = _write_folder(tmp_path / "d", [
        {"file_name": "a.png", "text": "one"},
        {"file_name": "gone.png", "text": "two"},
    ], {"a.png": _rgb()})
    _expect(root, "gone.png", "line 2", "not found")


def test_corrupt_image(tmp_path):
    root = _write_folder(tmp_path / "d", [
        {"file_name": "a.png", "text": "one"},
        {"file_name": "bad.png", "text": "two"},
    ], {"a.png": _rgb()})
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    _expect(root, "bad.png", "cannot read image")
    # a truncated real PNG is caught too
    good = (root / "a.png").read_bytes()
    (root / "bad.png").write_bytes(good[: len(good) // 2])
    _expect(root, "bad.png", "cannot read image")


def test_bad_resolution(concept_dir):
    for r in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            load_imagefolder(concept_dir, r)
